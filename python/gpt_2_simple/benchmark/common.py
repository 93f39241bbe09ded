"""What every benchmark suite shares (BENCHMARKING rules in one place).

- ``context()``: the machine and software a figure was measured on (CPU model and SIMD flags,
  threads, versions, git commit, date, load average).
- ``Worker``: a peer (our engine, transformers, tiktoken, ...) living in its own process, built
  once and then called over a pipe, so that each peer's peak RSS is its own (VmHWM, reset per
  configuration through /proc/self/clear_refs) and no peer's threads or allocator disturb another.
- ``interleave()``: one untimed warm-up call per peer, then A B C A B C ...; ``case_records()``
  turns those samples into records: median/min/max of each peer and per-pair ratios (speedups)
  of ours over each peer, measured in the same sitting.
- ``memory_bandwidth()`` and ``gemm_gflops()``: the physical limits put beside a figure.
- ``ModelFiles``: one random-weight model of a geometry, written once per run in every format a
  suite loads (our flat binary in fp32 and bf16, a HuggingFace folder).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import GPT2Config

__all__ = [
    "Options", "Worker", "WorkerError", "ModelFiles", "context", "load_average", "summary", "interleave", "case_records",
    "memory_bandwidth", "gemm_gflops", "rss", "peak_rss", "reset_peak_rss", "random_state", "to_transformers", "log",
]

PACKAGE_DIR = Path(__file__).resolve().parents[1]
VERSIONED = ("numpy", "torch", "transformers", "tiktoken", "tokenizers", "safetensors")


class Options:
    """What every suite's ``measure`` takes: the model geometry, repetitions, threads, whether this
    is a ``--quick`` smoke run, and a folder for the files it writes (shared by the suites of a run)."""

    def __init__(self, *, model: str = "124M", reps: int = 5, threads: int | None = None, quick: bool = False,
                 workdir: str | os.PathLike | None = None, batches: tuple[int, ...] | None = None,
                 prompts: tuple[int, ...] | None = None, peers: tuple[str, ...] | None = None):
        from ..config import get_config

        if reps < 1:
            raise ValueError(f"reps must be at least 1, got {reps}")
        self.model = model
        self.config = get_config(model)  # raises ValueError naming the known models
        self.reps = reps
        self.threads = threads or os.cpu_count() or 1
        self.quick = quick
        self.batches = batches  # the generation suite's batch sizes and prompt lengths (None: its defaults)
        self.prompts = prompts
        self.peers = peers  # the generation suite's peers (None: all)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="gpt2s-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []  # what a reader of the results must know (a missing peer, a skipped case)
        self._models: ModelFiles | None = None

    def note(self, message: str) -> None:
        log(f"  note: {message}")
        self.notes.append(message)

    @property
    def models(self) -> "ModelFiles":
        if self._models is None:
            self._models = ModelFiles(self.config, self.workdir / f"model-{self.model}")
        return self._models


def log(message: str) -> None:
    """Progress lines go to stderr (stdout carries the tables)."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Context


def _cpuinfo() -> tuple[str, list[str]]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model, flags


def git_commit() -> str | None:
    """Short commit of the checkout this package runs from (``-dirty`` with uncommitted changes),
    or None for an installed wheel."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if not commit or git("rev-parse", "--show-prefix").rstrip("/") != "python/gpt_2_simple":
            return None  # not our repository (a wheel installed inside some other checkout)
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> float:
    """One-minute load average (0 where the OS has none): how busy the machine was."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


def context(threads: int) -> dict:
    """Machine, software and moment of a run: printed and stored beside every figure."""
    from .. import __version__

    cpu, flags = _cpuinfo()
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        from .. import _engine

        isa = _engine.cpu_features()["kernels"]
    except ImportError:
        isa = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        "engine_isa": isa,
        "threads": threads,
        "python": platform.python_version(),
        "versions": {"gpt_2_simple": __version__, **versions},
        "commit": git_commit(),
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }


# ---------------------------------------------------------------------------------------------
# Memory of this process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss() -> int:
    """Resident bytes of this process now."""
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident bytes since the process started or since ``reset_peak_rss()`` (VmHWM;
    not ru_maxrss, which keeps the parent's size from before exec and cannot be reset)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Start a new peak at the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Peers in worker processes


class WorkerError(RuntimeError):
    """A peer failed in its worker process; the message ends with the worker's stderr."""


class Worker:
    """A peer in its own process. ``target`` ("module:function") is called there with ``kwargs``
    and ``threads`` (None: all cores; also OMP_NUM_THREADS of the process) and returns the peer: a callable taking a configuration's keywords and returning a dict
    (``seconds`` of the timed part when the peer times itself, otherwise the worker times the
    whole call). Each reply also carries ``peak_rss``: the process's peak since ``reset_peak()``.
    Library output of the peer (progress lines, warnings) goes to a log shown only on failure."""

    def __init__(self, target: str, *, name: str | None = None, threads: int | None = None, **kwargs: Any):
        self.name = name or target
        self._log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_DIR.parent), *filter(None, [env.get("PYTHONPATH")])])
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        spec = json.dumps({"target": target, "kwargs": {**kwargs, "threads": threads}})
        self._proc = subprocess.Popen([sys.executable, "-m", "gpt_2_simple.benchmark.worker", spec], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        ready = self._receive()
        self.setup_seconds: float = ready["setup_seconds"]
        self.rss_after_setup: int = ready["rss"]

    def _receive(self) -> dict:
        line = self._proc.stdout.readline()
        message = json.loads(line) if line else {"error": f"the worker process exited with code {self._proc.wait()}"}
        if "error" in message:
            self._log.seek(0)
            tail = self._log.read()[-3000:]
            self.close()
            raise WorkerError(f"{self.name}: {message['error'].strip()}\n--- worker log ---\n{tail}")
        return message

    def _send(self, message: dict) -> dict:
        if self._proc.poll() is not None:
            raise WorkerError(f"{self.name}: the worker process is gone")
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        return self._receive()

    def __call__(self, **config: Any) -> dict:
        return self._send({"op": "run", "config": config})

    def reset_peak(self) -> None:
        self._send({"op": "reset_peak"})

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(spec: dict) -> None:
    """The worker process's side of ``Worker`` (run by ``python -m gpt_2_simple.benchmark.worker``)."""
    import importlib
    import traceback

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the peer prints goes to the log, never into the replies

    def send(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")

    try:
        module, function = spec["target"].split(":")
        start = time.perf_counter()
        peer = getattr(importlib.import_module(module), function)(**spec["kwargs"])
        send({"setup_seconds": time.perf_counter() - start, "rss": rss()})
        for line in sys.stdin:
            message = json.loads(line)
            if message["op"] == "reset_peak":
                send({"reset": reset_peak_rss(), "rss": rss()})
                continue
            start = time.perf_counter()
            result = dict(peer(**message["config"]) or {})
            result.setdefault("seconds", time.perf_counter() - start)
            result["peak_rss"] = peak_rss()
            send(result)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises WorkerError
        send({"error": traceback.format_exc()})


def set_torch_threads(threads: int | None) -> None:
    """Inside a worker: PyTorch's intra-op threads (all cores when None)."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Timing and records


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": len(xs)}


def interleave(peers: dict[str, Callable[[], dict]], reps: int, *, warmup: bool = True, label: str = "",
               rate: Callable[[dict], str] | None = None) -> dict[str, list[dict]]:
    """Call each peer once untimed (page-in, thread pools, allocators), then ``reps`` rounds of
    A B C ... so that a busy moment of a shared machine hits every peer alike. Returns each
    peer's replies in round order (the i-th of two peers form a pair)."""
    if warmup:
        for fn in peers.values():
            fn()
    out: dict[str, list[dict]] = {name: [] for name in peers}
    for rep in range(reps):
        for name, fn in peers.items():
            out[name].append(fn())
        if rate is not None:
            log(f"  {label} rep {rep + 1}/{reps}: " + ", ".join(f"{n} {rate(r[-1])}" for n, r in out.items()) + f" (load {load_average():.1f})")
    return out


def case_records(suite: str, case: str, config: dict, samples: dict[str, list[float]], *, metric: str, ours: set[str],
                 compare_to: list[str], higher_is_better: bool = True, peak_rss: dict[str, int] | None = None,
                 details: dict[str, dict] | None = None, load_average: list[float] | None = None,
                 headline: set[str] | dict[str, list[str]] = frozenset()) -> list[dict]:
    """One record per peer of one configuration. Every peer not in ``compare_to`` gets
    ``speedup[p]`` for each p in ``compare_to``: the median (and min/max) over rounds of its
    per-round ratio to p, oriented so that > 1 means this peer did better (faster, or less memory).
    ``headline``: our peers whose comparisons the README shows, against their first ``compare_to``
    peer (a set) or against the peers listed (a dict)."""
    records = []
    for peer, xs in samples.items():
        shown = headline.get(peer, False) if isinstance(headline, dict) else peer in headline
        record = {"suite": suite, "case": case, "config": config, "peer": peer, "ours": peer in ours, "headline": shown,
                  "metric": metric, "higher_is_better": higher_is_better, **summary(xs), "samples": xs}
        if peer not in compare_to:
            speedup = {}
            for other in compare_to:
                if other in samples:
                    pairs = zip(xs, samples[other])
                    ratios = [a / b if higher_is_better else b / a for a, b in pairs]
                    speedup[other] = {k: v for k, v in summary(ratios).items() if k != "runs"}
            if speedup:
                record["speedup"] = speedup
        record["peak_rss_bytes"] = (peak_rss or {}).get(peer)
        record["details"] = (details or {}).get(peer, {})
        if load_average is not None:
            record["load_average"] = load_average
        records.append(record)
    return records


def run_case(calls: dict[str, Callable[[], dict]], workers: list[Worker], reps: int, *, label: str,
             rate: Callable[[dict], str]) -> tuple[dict[str, list[dict]], dict[str, int], list[float]]:
    """One configuration: the workers' peaks reset, then ``interleave(calls)``. Returns the replies
    per call, the peak RSS each call's worker reached during this configuration, and the load
    average before and after."""
    for w in workers:
        w.reset_peak()
    before = load_average()
    replies = interleave(calls, reps, label=label, rate=rate)
    peaks = {name: max(r["peak_rss"] for r in rs) for name, rs in replies.items() if "peak_rss" in rs[0]}
    return replies, peaks, [before, load_average()]


def run_peers(workers: dict[str, Worker], reps: int, *, label: str, rate: Callable[[dict], str],
              probes: dict[str, Callable[[], dict]] | None = None,
              **job: Any) -> tuple[dict[str, list[dict]], dict[str, int], list[float]]:
    """``run_case`` for the usual configuration: every peer's worker called with the same ``job``.
    Each of ``probes`` (a measurement of the machine, in this process) runs once per round too,
    between the peers; its replies come back with theirs (without a peak RSS)."""
    calls = {name: (lambda w=w: w(**job)) for name, w in workers.items()}
    calls.update(probes or {})
    return run_case(calls, list(workers.values()), reps, label=label, rate=rate)


# ---------------------------------------------------------------------------------------------
# Physical limits


def memory_bandwidth(threads: int, reps: int = 5) -> float:
    """GB/s of a multi-threaded sum over 512 MB (larger than any cache): the read rate a
    memory-bound kernel can hope for on this machine right now. The buffer asks for transparent
    huge pages, as the engine's weights do (cpu_backend.h): on 4 KiB pages the TLB misses alone
    hold a stream well below what the memory gives."""
    import mmap

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    size = 512 * 2**20
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; private, as shared memory gets no huge pages
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.madvise(mmap.MADV_HUGEPAGE)
    else:
        buffer = bytearray(size)
    x = torch.frombuffer(buffer, dtype=torch.float32)
    x.fill_(1.0)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    torch.set_num_threads(previous)
    del x
    return size / statistics.median(times) / 1e9


def gemm_gflops(dtype: str, threads: int, reps: int = 5) -> float:
    """GFLOP/s of a PyTorch (2048 x 768) @ (768 x 3072) matrix product (GPT-2 124M's MLP at a
    large batch) in ``dtype`` ('fp32' or 'bf16'): the compute rate a large batch can approach."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(2048, 768, dtype=kind), torch.randn(768, 3072, dtype=kind)
    t = time.perf_counter()
    a @ b
    times = [time.perf_counter() - t]
    # Over a second (bf16 without bf16 hardware: 20 s on an AVX2 EPYC), the warm-up's time is the
    # figure: its first-call costs are lost in it, and 5 more would cost minutes.
    if times[0] < 1.0:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    torch.set_num_threads(previous)
    return 2 * 2048 * 768 * 3072 / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------
# Random-weight models


def random_state(config: GPT2Config, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2's tensors with GPT-2's initial scales (normal 0.02; LayerNorms 1, biases 0): speed
    does not depend on the values, and the logits stay realistic for sampling."""
    from ..weights import expected_shapes

    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(".bias"):
            state[name] = np.zeros(shape, np.float32)
        elif "ln_" in name:
            state[name] = np.ones(shape, np.float32)
        else:
            state[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return state


class ModelFiles:
    """One random-weight model written once into ``folder`` in the formats the suites load;
    each is created on first use (a second run with the same folder reuses them)."""

    def __init__(self, config: GPT2Config, folder: Path):
        self.config = config
        self.folder = folder
        self._state: dict[str, np.ndarray] | None = None

    @property
    def state(self) -> dict[str, np.ndarray]:
        if self._state is None:
            self._state = random_state(self.config)
        return self._state

    def engine(self, dtype: str) -> Path:
        """Our flat binary (``fp32`` or ``bf16``)."""
        from ..export import export

        path = self.folder / f"model.{dtype}.bin"
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            export((self.config, self.state), path, dtype, progress=False)
        return path

    def gguf(self, dtype: str) -> Path:
        """The GGUF export (``f32``, ``f16`` or ``q8_0``) that llama.cpp loads."""
        from ..export_gguf import export_gguf

        path = self.folder / f"model.{dtype}.gguf"
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            export_gguf((self.config, self.state), path, dtype)
        return path

    def hf(self) -> Path:
        """A HuggingFace folder (``model.safetensors`` + ``config.json`` + tokenizer files): what
        transformers' ``from_pretrained`` and our ``load_weights`` both read."""
        from ..export import export_hf

        path = self.folder / "hf"
        if not (path / "model.safetensors").exists():
            export_hf((self.config, self.state), path)
        return path


def to_transformers(model):
    """The same weights as our ``model.GPT2`` in ``transformers.GPT2LMHeadModel`` (eager attention,
    tied head): the peer on identical weights (also the tests' reference)."""
    import transformers

    c = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=c.n_vocab, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, attn_implementation="eager",
    )
    hf = transformers.GPT2LMHeadModel(hf_config)
    state = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    result = hf.load_state_dict(state, strict=False)
    if not set(result.missing_keys) <= {"lm_head.weight"} or result.unexpected_keys:
        raise RuntimeError(f"the weights do not map onto transformers' GPT-2: {result}")
    hf.tie_weights()
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("transformers did not tie the head to wte")
    return hf.eval()
