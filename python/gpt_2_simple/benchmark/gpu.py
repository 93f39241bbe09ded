"""GPU suites: generation with our CUDA engine and fine-tuning on one GPU, each against transformers
on the same GPU, in one process and sitting, interleaved (ours, theirs, ours, theirs ...), median of
``reps`` runs after one warm-up each. ``bench/generate_cuda.py`` and ``bench/finetune_gpu.py`` (run
by ``bench/gpu_check.sh``) are thin wrappers of ``generate_cuda_main`` and ``finetune_gpu_main``;
the harness's ``gpu`` suite calls the same ``generate_cuda`` and ``finetune_gpu`` and turns their
results into records (``records``, which also reads results files those scripts wrote).

Generation (``generate_cuda``): GPT-2 124M geometry (random weights, GPT-2's init), bf16, prompt 16
tokens, 128 new tokens, top-k 40 sampling.
- batch 1: ms per generated token of the whole call, the decode steps alone, and the ratio of
  tokens/s to transformers (target <= 0.5 ms/token and >= 10x);
- batch 64, 128, 256: aggregate tokens/s and the ratio to transformers (target >= 100,000 and >= 5x);
- sampling (target <= 30 us at batch 1 and <= 100 us at 256, no logits on the host): the sampler's
  device time per decode step inside the generate calls above (the engine's own events around it,
  queued behind the step's forward pass: what a step pays), and one sampler launch alone at batch
  1 and 256 on real logits of the model for top-k 40, temperature only and top-p 0.9 (event,
  launch, event on an idle GPU: the launch's own latency included);
- context: the engine with CUDA graphs off, the weight bytes a batch-1 token reads and the GPU's
  copy bandwidth measured in the same run (the floor of a batch-1 token), GPU memory in use.

Fine-tuning (``finetune_gpu``): ``finetune`` (bf16 autocast, fused AdamW, with and without
``torch.compile``) against a plain transformers training loop with the same settings, for 124M and
355M geometry (random init, 1024-token windows of the bundled Shakespeare corpus): tokens/s over
the steps after ``warmup_steps`` (torch.compile's compilation and the allocator's first steps
excluded; timed from finetune's own per-step log), and the peak GPU memory allocated. The issue's
target: >= 300,000 tokens/s for 124M with bf16 and torch.compile on one H100.

Verified on an NVIDIA H200 (bench/results/generate_cuda-20261126-h200-sampler.json,
bench/results/finetune_gpu-20261126-h200.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .common import Options, git_commit, log

SUITE = "gpu"
DEFAULT_BATCH = {"124M": 16, "355M": 8}
LEARNING_RATE = 1e-4
GENERATE_BATCHES = (1, 64, 128, 256)


def engine_unavailable() -> str | None:
    """Why the CUDA generation benchmark cannot run here, or None."""
    try:
        from .. import _engine_cuda
    except ImportError as e:
        return f"the CUDA engine (_engine_cuda) is not built ({e})"
    devices, reason = _engine_cuda.cuda_status()
    if devices < 1:
        return reason
    return torch_unavailable()


def torch_unavailable() -> str | None:
    """Why fine-tuning on the GPU cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "PyTorch here has no CUDA (PyTorch sees no NVIDIA GPU)"
    return None


def unavailable() -> str | None:
    """Why the harness's gpu suite cannot run here (no part of it can), or None."""
    return torch_unavailable()


def summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def context(device: int) -> dict:
    import torch
    import transformers

    from .. import __version__, _engine_cuda

    info = _engine_cuda.device_info(device)
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device}"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = ""
    return {
        "gpu": info["name"], "capability": list(info["capability"]), "gpu_memory_bytes": info["total_bytes"], "driver": driver,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
        "gpt_2_simple": __version__, "commit": git_commit() or "", "host": platform.node(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def copy_bandwidth(device: int) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written), median of 7: the rate a
    memory-bound kernel can approach on this GPU now."""
    import torch

    x = torch.empty(2**30, dtype=torch.uint8, device=f"cuda:{device}")
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------
# Generation


def generate_cuda(*, reps: int = 5, batches: tuple[int, ...] = GENERATE_BATCHES, prompt: int = 16, new_tokens: int = 128, top_k: int = 40,
                  device: int = 0, transformers: bool = True, workdir: str | Path | None = None, command: str | None = None,
                  print: Callable[..., None] = print) -> dict:
    """Generation on the GPU (see the module's docstring); returns the results (``generate_cuda-*.json``)."""
    import torch

    from .. import _engine_cuda
    from ..config import get_config
    from ..engine import Request
    from ..export import export, inspect
    from ..model import GPT2
    from .common import to_transformers

    torch.cuda.set_device(device)
    ctx = context(device)
    print(f"{ctx['gpu']} (sm_{ctx['capability'][0]}{ctx['capability'][1]}, driver {ctx['driver']}), torch {ctx['torch']} "
          f"(CUDA {ctx['torch_cuda']}), transformers {ctx['transformers']}, commit {ctx['commit']}")

    config = get_config("124M")
    torch.manual_seed(0)
    model = GPT2(config).eval()  # GPT-2's initialisation: random weights with realistic scales
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="gpt2s-bench-"))
    path = export(model, folder / "124M.bf16.bin", "bf16", progress=False)
    t = time.perf_counter()
    engine = _engine_cuda.Engine(str(path), device=device)
    load_seconds = time.perf_counter() - t
    engine_nographs = _engine_cuda.Engine(str(path), device=device, graphs=False)
    hf = None
    if transformers:
        hf = to_transformers(model).to(device=f"cuda:{device}", dtype=torch.bfloat16)

    ids = list(range(1000, 1000 + prompt))

    def requests(batch: int) -> list[Request]:
        return [Request(ids, new_tokens, temperature=1.0, top_k=top_k, seed=1234, sample_index=i) for i in range(batch)]

    def run(peer: str, batch: int) -> tuple[float, dict]:
        """Wall seconds of one whole generate call for `batch` samples (and the engine's timings)."""
        reqs = requests(batch)
        torch.cuda.synchronize()
        t = time.perf_counter()
        if peer.startswith("engine"):
            e = engine if peer == "engine" else engine_nographs
            out = e.generate(reqs, batch_size=batch)
            elapsed = time.perf_counter() - t
            if not all(len(tokens) == new_tokens for tokens, _ in out):
                raise RuntimeError("the CUDA engine stopped early")
            return elapsed, e.last_timings()
        x = torch.tensor([ids] * batch, device=f"cuda:{device}")
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=top_k, temperature=1.0,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        if out.shape != (batch, prompt + new_tokens):
            raise RuntimeError(f"transformers returned shape {tuple(out.shape)}")
        return elapsed, {}

    peers = ["engine", "engine-nographs"] + ([] if hf is None else ["transformers"])
    results = []
    for batch in batches:
        for peer in peers:
            run(peer, batch)  # warm-up: graph capture, cuBLAS heuristics, allocator, transformers' caches
        times = {peer: [] for peer in peers}
        timings = []
        for _ in range(reps):
            for peer in peers:  # interleaved: a busy moment hits every peer alike
                elapsed, tm = run(peer, batch)
                times[peer].append(elapsed)
                if peer == "engine":
                    timings.append(tm)
        tokens = batch * new_tokens
        record = {
            "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "top_k": top_k, "reps": reps,
            "tokens_per_s": {peer: summary([tokens / s for s in times[peer]]) for peer in peers},
            "ms_per_token_batch_row": summary([1e3 * s / new_tokens for s in times["engine"]]),
            "engine_decode_ms_per_step": summary([1e3 * tm["decode_seconds"] / tm["decode_steps"] for tm in timings]),
            "engine_sample_share_of_decode": statistics.median(tm["decode_sample_seconds"] / tm["decode_seconds"] for tm in timings),
            "engine_prefill_ms": statistics.median(1e3 * tm["prefill_seconds"] for tm in timings),
        }
        line = (f"batch {batch:>3}: engine {record['tokens_per_s']['engine']['median']:>10,.0f} tok/s "
                f"({record['ms_per_token_batch_row']['median']:.3f} ms per token of a row, decode step "
                f"{record['engine_decode_ms_per_step']['median']:.3f} ms, sampler {engine_sampler_us(record):.1f} us of it), "
                f"no graphs {record['tokens_per_s']['engine-nographs']['median']:,.0f}")
        if hf is not None:
            ratios = [h / e for e, h in zip(times["engine"], times["transformers"])]  # seconds theirs / ours
            record["ratio_to_transformers_median_of_pairs"] = statistics.median(ratios)
            line += (f"; transformers {record['tokens_per_s']['transformers']['median']:,.0f} tok/s; "
                     f"ratio {record['ratio_to_transformers_median_of_pairs']:.1f}x")
        print(line, flush=True)
        results.append(record)

    # Sampling alone: real logits of the model (one decode step's), tiled to the batch.
    logits = {}
    engine.generate([Request(ids, 1, temperature=1.0)], batch_size=1, on_logits=lambda i, s, x: logits.setdefault(0, x.copy()))
    sampling = []
    for batch in (1, 256):
        rows = np.tile(logits[0], (batch, 1))
        for name, (temperature, k, p) in {"top_k_40": (1.0, 40, 0.0), "temperature_only": (1.0, 0, 0.0), "top_p_0.9": (1.0, 0, 0.9)}.items():
            us = _engine_cuda.time_sampler(rows, [temperature], [k], [p], iters=100, device=device)
            sampling.append({"batch": batch, "params": name, "microseconds": us})
            print(f"sampling batch {batch:>3}, {name}: {us:.1f} us per step (device time)")

    weight_bytes = sum(t["nbytes"] for t in inspect(path)["tensors"] if t["name"] != "wpe.weight")
    bandwidth = copy_bandwidth(device)
    floor_ms = 1e3 * weight_bytes / (bandwidth * 1e9)
    print(f"weights read per batch-1 token: {weight_bytes / 2**20:.0f} MiB; copy bandwidth {bandwidth:,.0f} GB/s; floor {floor_ms:.3f} ms/token")

    out = {
        "benchmark": "generate_cuda", "model": "124M geometry, random weights, bf16", "context": ctx,
        "engine_load_seconds": load_seconds, "weight_bytes_per_token": weight_bytes, "copy_bandwidth_gb_s": bandwidth,
        "batch1_floor_ms_per_token": floor_ms, "generation": results, "sampling": sampling,
        "gpu_memory_allocated_by_torch": torch.cuda.max_memory_allocated(device),
    }
    if command:
        out["command"] = command
    return out


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def _finetune_run(root: Path, name: str, model_dir: Path, data: Path, batch: int, steps: int, warmup: int, compiled: bool, rep: int) -> tuple[float, int]:
    """One finetune run: tokens/s over the steps after `warmup` (from its log.jsonl) and peak GPU bytes."""
    import torch

    import gpt_2_simple as gpt2

    from ..config import GPT2Config

    run_name = f"{name}-{'compiled' if compiled else 'eager'}-{rep}"
    torch.cuda.reset_peak_memory_stats()
    gpt2.finetune(gpt2.start_tf_sess(), str(data), steps=steps, model_name=name, model_dir=str(model_dir), checkpoint_dir=str(root / "checkpoint"),
                  run_name=run_name, batch_size=batch, accumulate_gradients=1, learning_rate=LEARNING_RATE, optimizer="adamw",
                  sample_every=10**9, save_every=10**9, print_every=1, seed=0, progress=False, restore_from="fresh",
                  device="cuda", mixed_precision="bf16", compile=compiled)
    peak = torch.cuda.max_memory_allocated()
    rows = [json.loads(line) for line in (root / "checkpoint" / run_name / "log.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    first, last = rows[warmup - 1], rows[-1]
    seq = GPT2Config.from_file(model_dir / name / "hparams.json").n_ctx
    return (last["step"] - first["step"]) * batch * seq / (last["time"] - first["time"]), peak


def _transformers_loop(config, tokens, batch: int, steps: int, warmup: int) -> tuple[float, int]:
    """The plain peer: transformers' GPT2LMHeadModel, bf16 autocast, fused AdamW, the same batches."""
    import torch
    import transformers

    hf_config = transformers.GPT2Config(vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
                                        n_head=config.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5)
    device = tokens.device
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
    seq = config.n_ctx
    rng = np.random.default_rng(0)
    torch.cuda.reset_peak_memory_stats()
    start = None
    for step in range(steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        starts = torch.from_numpy(rng.integers(0, len(tokens) - seq - 1, size=batch)).to(device)
        x = tokens[starts[:, None] + torch.arange(seq + 1, device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (steps - warmup) * batch * seq / (time.perf_counter() - start), torch.cuda.max_memory_allocated()


def finetune_gpu(*, reps: int = 5, models: tuple[str, ...] = ("124M", "355M"), batch: dict[str, int] | None = None, steps: int = 40,
                 warmup_steps: int = 10, transformers: bool = True, out: Path | None = None, workdir: str | Path | None = None,
                 command: str | None = None, print: Callable[..., None] = print) -> dict:
    """Fine-tuning on the GPU (see the module's docstring); returns the results (``finetune_gpu-*.json``),
    also written to ``out`` after each model when given, so a run cut short keeps what it measured."""
    import torch
    import transformers as hf_lib

    from .. import dataset as ds
    from ..config import get_config
    from ..tokenizer import BUNDLED_DIR, get_encoder
    from .finetune import make_model_folder

    if not 1 <= warmup_steps < steps:
        raise ValueError("--warmup-steps must be in [1, --steps)")
    batch = dict(DEFAULT_BATCH) | (batch or {})
    props = torch.cuda.get_device_properties(0)
    commit = git_commit() or ""
    results = {
        "benchmark": "finetune_gpu", "gpu": props.name, "gpu_memory_bytes": props.total_memory, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "transformers": hf_lib.__version__, "commit": commit, "host": platform.node(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "settings": "bf16 autocast, fused AdamW lr 1e-4, 1024-token windows, "
        f"accumulate_gradients 1, {steps} steps per run, tokens/s after step {warmup_steps}", "models": [],
    }
    if command:
        results["command"] = command

    def write(results: dict) -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    print(f"{props.name}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {hf_lib.__version__}, commit {commit}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        model_dir = root / "models"
        chunks = ds.load_dataset(get_encoder(), BUNDLED_DIR / "shakespeare.txt", progress=False)
        data = root / "shakespeare.npz"
        np.savez(data, *chunks)  # pre-encoded: finetune's start-up then costs no encoding
        tokens = torch.from_numpy(np.concatenate(chunks).astype(np.int64)).cuda()
        for name in models:
            config = get_config(name)
            make_model_folder(model_dir, name, config)
            b = batch[name]
            variants = {
                "finetune_compiled": lambda rep: _finetune_run(root, name, model_dir, data, b, steps, warmup_steps, True, rep),
                "finetune_eager": lambda rep: _finetune_run(root, name, model_dir, data, b, steps, warmup_steps, False, rep),
            }
            if transformers:
                variants["transformers"] = lambda rep: _transformers_loop(config, tokens, b, steps, warmup_steps)
            speed = {v: [] for v in variants}
            peak = {v: [] for v in variants}
            for rep in range(reps + 1):  # rep 0 warms up every variant
                for v, run in variants.items():  # interleaved
                    tps, mem = run(rep)
                    print(f"  {name} batch {b} rep {rep} {v}: {tps:,.0f} tok/s, peak {mem / 2**30:.2f} GiB", flush=True)
                    if rep:
                        speed[v].append(tps)
                        peak[v].append(mem)
            record = {"model": name, "config": config.to_hparams(), "batch": b, "seq": config.n_ctx, "reps": reps,
                      "tokens_per_s": {v: summary(xs) for v, xs in speed.items()}, "peak_gpu_bytes": {v: max(xs) for v, xs in peak.items()}}
            if "transformers" in speed:
                record["ratio_compiled_to_transformers_median_of_pairs"] = statistics.median(
                    a / t for a, t in zip(speed["finetune_compiled"], speed["transformers"]))
            results["models"].append(record)
            write(results)  # after each model, so a run cut short keeps what it measured
            print(f"{name}: finetune compiled {record['tokens_per_s']['finetune_compiled']['median']:,.0f} tok/s "
                  f"(peak {record['peak_gpu_bytes']['finetune_compiled'] / 2**30:.2f} GiB), eager "
                  f"{record['tokens_per_s']['finetune_eager']['median']:,.0f} tok/s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# The scripts (bench/generate_cuda.py, bench/finetune_gpu.py)


def _default_out(results_dir: Path, name: str) -> Path:
    return results_dir / f"{name}-{datetime.date.today()}-{platform.node()}.json"


def _command(program: str, argv: list[str]) -> str:
    return " ".join(["python", program, *argv])


def generate_cuda_main(argv: list[str] | None = None, *, program: str = "bench/generate_cuda.py", results_dir: Path = Path("bench/results")) -> None:
    """``python bench/generate_cuda.py``: the generation benchmark alone, one JSON file."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=program, description="Generation speed on the GPU: our CUDA engine against transformers' "
                                     "generate on the same GPU (see gpt_2_simple/benchmark/gpu.py and docs/bench.md).")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per configuration (after one warm-up)")
    parser.add_argument("--batch", type=int, nargs="+", default=list(GENERATE_BATCHES))
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sample")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: bench/results/generate_cuda-<date>-<host>.json)")
    args = parser.parse_args(argv)
    why = engine_unavailable()
    if why:
        print(f"{program}: skipped, no CUDA here: {why}")
        return
    results = generate_cuda(reps=args.reps, batches=tuple(args.batch), prompt=args.prompt, new_tokens=args.new, top_k=args.top_k,
                            device=args.device, transformers=not args.no_transformers, command=_command(program, argv))
    out = args.out or _default_out(results_dir, "generate_cuda")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def finetune_gpu_main(argv: list[str] | None = None, *, program: str = "bench/finetune_gpu.py", results_dir: Path = Path("bench/results")) -> None:
    """``python bench/finetune_gpu.py``: the fine-tuning benchmark alone, one JSON file."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=program, description="Fine-tuning speed and memory on one GPU: finetune against a plain "
                                     "transformers loop (see gpt_2_simple/benchmark/gpu.py and docs/bench.md).")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per variant (after one warm-up run)")
    parser.add_argument("--models", nargs="+", default=["124M", "355M"], choices=list(DEFAULT_BATCH))
    parser.add_argument("--batch", nargs="*", default=[], metavar="MODEL=N", help="batch size per model (default 124M=16 355M=8)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps of each run left out of its tokens/s")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    why = torch_unavailable()
    if why:
        print(f"{program}: skipped, no CUDA here: {why}")
        return
    if not 1 <= args.warmup_steps < args.steps:
        parser.error("--warmup-steps must be in [1, --steps)")
    out = args.out or _default_out(results_dir, "finetune_gpu")
    finetune_gpu(reps=args.reps, models=tuple(args.models), batch={k: int(v) for k, v in (item.split("=", 1) for item in args.batch)},
                 steps=args.steps, warmup_steps=args.warmup_steps, transformers=not args.no_transformers, out=out,
                 command=_command(program, argv))
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------
# Records for the harness and the README


def reproduce_command(result: dict) -> str:
    """The command that wrote a ``generate_cuda``/``finetune_gpu`` results file: stored in it, or
    (files written before it was stored) rebuilt from the settings it records."""
    if result.get("command"):
        return result["command"]
    if result["benchmark"] == "generate_cuda":
        gen = result["generation"]
        parts = ["python bench/generate_cuda.py", f"--reps {gen[0]['reps']}", "--batch " + " ".join(str(g["batch"]) for g in gen)]
        parts += [f"--prompt {gen[0]['prompt']}"] if gen[0]["prompt"] != 16 else []
        parts += [f"--new {gen[0]['new_tokens']}"] if gen[0]["new_tokens"] != 128 else []
        return " ".join(parts)
    steps, warmup = re.search(r"(\d+) steps per run, tokens/s after step (\d+)", result["settings"]).groups()
    models = [m["model"] for m in result["models"]]
    parts = ["python bench/finetune_gpu.py", f"--reps {result['models'][0]['reps']}" if models else "", f"--steps {steps}", f"--warmup-steps {warmup}"]
    parts += ["--models " + " ".join(models)] if models and models != ["124M", "355M"] else []
    return " ".join(p for p in parts if p)


def _record(case: str, config: dict, peer: str, metric: str, s: dict, runs: int, *, ours: bool, higher_is_better: bool = True,
            ratio: dict | None = None, headline: bool = False, details: dict | None = None) -> dict:
    record = {"suite": SUITE, "case": case, "config": config, "peer": peer, "ours": ours, "headline": headline, "metric": metric,
              "higher_is_better": higher_is_better, "median": s["median"], "min": s["min"], "max": s["max"], "runs": runs,
              "peak_rss_bytes": None, "details": details or {}}
    if ratio:
        record["speedup"] = {other: {"median": value} for other, value in ratio.items()}
    return record


def engine_sampler_us(g: dict) -> float:
    """The sampler's device time per decode step inside generate (a generation record's fields)."""
    return 1e3 * g["engine_sample_share_of_decode"] * g["engine_decode_ms_per_step"]["median"]


def records(result: dict) -> list[dict]:
    """Harness records (suite ``gpu``) of a ``generate_cuda`` or ``finetune_gpu`` result; the ratios
    are the medians of per-pair ratios those measured (> 1: ours faster)."""
    out = []
    if result.get("benchmark") == "generate_cuda":
        ctx = result["context"]
        gpu = {"gpu": ctx["gpu"], "date": ctx["date"], "commit": ctx.get("commit"), "command": reproduce_command(result)}
        for g in result["generation"]:
            cfg = {k: g[k] for k in ("batch", "prompt", "new_tokens", "top_k")} | {"dtype": "bf16", "model": "124M"} | gpu
            case = f"generate, batch {g['batch']}"
            details = {"ms_per_token_of_a_row": g["ms_per_token_batch_row"], "decode_ms_per_step": g["engine_decode_ms_per_step"],
                       "sampling_share_of_decode": g["engine_sample_share_of_decode"], "prefill_ms": g["engine_prefill_ms"],
                       "copy_bandwidth_gb_per_s": result["copy_bandwidth_gb_s"], "weight_bytes_per_token": result["weight_bytes_per_token"],
                       "batch1_floor_ms_per_token": result["batch1_floor_ms_per_token"], "load_seconds": result["engine_load_seconds"]}
            for peer, s in g["tokens_per_s"].items():
                ratio = {"transformers": g["ratio_to_transformers_median_of_pairs"]} if peer == "engine" and "ratio_to_transformers_median_of_pairs" in g else None
                out.append(_record(case, cfg, peer, "tokens/s", s, g["reps"], ours=peer != "transformers", ratio=ratio,
                                   headline=peer == "engine", details=details if peer == "engine" else None))
            us = engine_sampler_us(g)
            out.append(_record(f"sampler in generate, batch {g['batch']}, top_k_{g['top_k']}", cfg, "engine", "microseconds",
                               {"median": us, "min": us, "max": us}, g["reps"], ours=True, higher_is_better=False))
        for s in result["sampling"]:
            us = s["microseconds"]
            out.append(_record(f"sampler, batch {s['batch']}, {s['params']}", {"batch": s["batch"], "sampling": s["params"]} | gpu, "engine",
                               "microseconds", {"median": us, "min": us, "max": us}, 1, ours=True, higher_is_better=False))
    elif result.get("benchmark") == "finetune_gpu":
        gpu = {"gpu": result["gpu"], "date": result["date"], "commit": result.get("commit"), "command": reproduce_command(result),
               "settings": result["settings"]}
        for m in result["models"]:
            case = f"finetune {m['model']}, batch {m['batch']} x {m['seq']}"
            cfg = {"model": m["model"], "hparams": m["config"], "batch": m["batch"], "seq": m["seq"]} | gpu
            for peer, s in m["tokens_per_s"].items():
                ratio = {"transformers": m["ratio_compiled_to_transformers_median_of_pairs"]} \
                    if peer == "finetune_compiled" and "ratio_compiled_to_transformers_median_of_pairs" in m else None
                out.append(_record(case, cfg, peer, "tokens/s", s, m["reps"], ours=peer != "transformers", ratio=ratio,
                                   headline=peer == "finetune_compiled", details={"peak_gpu_bytes": m["peak_gpu_bytes"][peer]}))
    else:
        raise ValueError("not a generate_cuda or finetune_gpu results file (its 'benchmark' field)")
    return out


def measure(opts: Options) -> list[dict]:
    """Both GPU benchmarks (the caller checks ``unavailable()`` first); ``--quick``: generation at
    batch 1 and 64 with 16 new tokens, fine-tuning 124M for 12 steps a run, tokens/s after step 4."""
    import importlib.util

    has_transformers = importlib.util.find_spec("transformers") is not None
    if not has_transformers:
        opts.note("transformers is not installed: GPU figures are ours alone (pip install transformers)")
    out = []
    progress = lambda *args, **_: log(" ".join(map(str, args)))  # noqa: E731 - the scripts' stdout lines, as progress on stderr
    why = engine_unavailable()
    if why:
        opts.note(f"CUDA generation skipped: {why}")
    else:
        out += records(generate_cuda(reps=opts.reps, batches=(1, 64) if opts.quick else GENERATE_BATCHES, new_tokens=16 if opts.quick else 128,
                                     transformers=has_transformers, workdir=opts.workdir, print=progress))
    out += records(finetune_gpu(reps=opts.reps, models=("124M",) if opts.quick else ("124M", "355M"), steps=12 if opts.quick else 40,
                                warmup_steps=4 if opts.quick else 10, transformers=has_transformers, workdir=opts.workdir, print=progress))
    return out
