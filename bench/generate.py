"""Generation speed on GPT-2 124M geometry (random weights): our C++ engine (fp32 and bf16) against
a plain PyTorch KV-cached loop with our model (torch_generate) and HuggingFace transformers'
``generate``, all in this one process and sitting, interleaved (A B C D A B C D ...), median of
``--reps`` runs after one warm-up each. Writes a JSON record to bench/results/ and prints a table.

Also measured in the same run: memory bandwidth (a multi-threaded sum over 512 MB) next to the
engine's achieved weight-read rate at batch 1, the engine's sampling share of a decode step, model
load time, and peak RSS of a fresh process generating with the engine.

    python bench/generate.py                  # prompt 16, 128 new tokens, top-k 40, batch 1 and 20
    python bench/generate.py --reps 3 --batch 1 --peers engine-bf16 transformers
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from gpt_2_simple import __version__  # noqa: E402
from gpt_2_simple.config import get_config  # noqa: E402
from gpt_2_simple.engine import Engine, Request  # noqa: E402
from gpt_2_simple.export import export, inspect  # noqa: E402
from gpt_2_simple.model import GPT2  # noqa: E402
from gpt_2_simple.torch_generate import generate_tokens  # noqa: E402

PEERS = ("engine-fp32", "engine-bf16", "torch", "transformers")


def cpu_context() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    from gpt_2_simple import _engine

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import transformers

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags],
        "engine_isa": _engine.cpu_features()["isa"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpt_2_simple": __version__,
        "commit": commit,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def load_average() -> float:
    return os.getloadavg()[0]


def memory_bandwidth(threads: int, reps: int = 7) -> float:
    """GB/s of a multi-threaded sum over 512 MB (larger than any cache): the read rate a
    memory-bound kernel can hope for on this machine right now."""
    torch.set_num_threads(threads)
    x = torch.ones(128 * 2**20)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes_per_token(path: Path) -> int:
    """Bytes a batch-1 decode step reads: every tensor once (wte twice over: the head reads all of
    it), except wpe, of which one row."""
    info = inspect(path)
    C = info["config"]["n_embd"]
    total = 0
    for t in info["tensors"]:
        total += t["nbytes"] if t["name"] != "wpe.weight" else t["nbytes"] // info["config"]["n_ctx"]
    return total + C * (2 if info["dtype"] == "bf16" else 4)  # + the one wte row of the embedding


def peak_rss(path: Path, batch: int, prompt: int, new: int, threads: int | None) -> dict:
    """Load time and peak RSS of a fresh process that loads `path` and generates one batch."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT / 'python')!r})
from gpt_2_simple.engine import Engine, Request
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
t = time.perf_counter()
e = Engine({str(path)!r}, threads={threads!r})
load = time.perf_counter() - t
reqs = [Request(list(range(100, 100 + {prompt})), {new}, temperature=1.0, top_k=40, sample_index=i) for i in range({batch})]
e.generate(reqs, batch_size={batch})
# VmHWM, not ru_maxrss: the latter keeps the parent's size from before exec.
hwm = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print(json.dumps({{"load_seconds": load, "rss_before_load": before, "peak_rss": hwm,
                  "kv_cache_bytes": e.last_timings()["kv_cache_bytes"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed runs per configuration (after one warm-up)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sample")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every peer (default: all cores)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: bench/results/generate-<date>-<host>.json)")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)

    context = cpu_context() | {"threads": threads, "load_average_start": load_average()}
    print(f"{context['cpu']} ({context['cores']} cores, {', '.join(context['simd'])}), {threads} threads, torch {context['torch']}, "
          f"transformers {context['transformers']}, commit {context['commit']}, load average {context['load_average_start']:.1f}")

    config = get_config("124M")
    torch.manual_seed(0)
    model = GPT2(config).eval()  # GPT-2's initialisation: random weights with realistic scales
    tmp = Path(tempfile.mkdtemp(prefix="gpt2s-bench-"))
    files = {dtype: export(model, tmp / f"124M.{dtype}.bin", dtype, progress=False) for dtype in ("fp32", "bf16")}
    engines = {}
    load_seconds = {}
    for dtype, path in files.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            engines[dtype] = Engine(path, backend="cpu", threads=args.threads)
            times.append(time.perf_counter() - t)
        load_seconds[dtype] = statistics.median(times)
    hf = None
    if "transformers" in args.peers:
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import to_transformers

        hf = to_transformers(model)

    def requests(batch: int) -> list[Request]:
        prompt = list(range(1000, 1000 + args.prompt))
        return [Request(prompt, args.new, temperature=1.0, top_k=args.top_k, seed=1234, sample_index=i) for i in range(batch)]

    def run(peer: str, batch: int) -> tuple[float, dict]:
        """Wall seconds of one whole generate call for `batch` samples, and engine timings."""
        reqs = requests(batch)
        t = time.perf_counter()
        if peer.startswith("engine"):
            engine = engines[peer.split("-")[1]]
            results = engine.generate(reqs, batch_size=batch)
            elapsed = time.perf_counter() - t
            assert all(len(r.tokens) == args.new for r in results)
            return elapsed, engine.last_timings()
        if peer == "torch":
            results = generate_tokens(model, reqs, batch_size=batch)
            elapsed = time.perf_counter() - t
            assert all(len(r.tokens) == args.new for r in results)
            return elapsed, {}
        ids = torch.tensor([r.prompt for r in reqs])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=args.top_k, temperature=1.0,
                              max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)
        elapsed = time.perf_counter() - t
        assert out.shape == (batch, args.prompt + args.new)
        return elapsed, {}

    bandwidth = []
    results = []
    for batch in args.batch:
        for peer in args.peers:
            run(peer, batch)  # warm-up: page-in of the weights, thread pools, allocator
        times = {peer: [] for peer in args.peers}
        timings = {peer: [] for peer in args.peers}
        load_before = load_average()
        for _ in range(args.reps):
            bandwidth.append(memory_bandwidth(threads, reps=3))
            for peer in args.peers:  # interleaved, so a busy moment hits every peer alike
                elapsed, t = run(peer, batch)
                times[peer].append(elapsed)
                timings[peer].append(t)
        tokens = batch * args.new
        for peer in args.peers:
            tps = [tokens / s for s in times[peer]]
            record = {
                "peer": peer, "batch": batch, "prompt": args.prompt, "new_tokens": args.new, "top_k": args.top_k,
                "tokens_per_second": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)},
                "seconds": times[peer], "load_average": [load_before, load_average()],
            }
            if hf is not None and peer != "transformers":
                ratios = [a / b for a, b in zip(times["transformers"], times[peer])]  # same-rep pairs
                record["ratio_to_transformers"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            if peer.startswith("engine"):
                ts = timings[peer]
                step_s = [t["decode_seconds"] / t["decode_steps"] for t in ts]
                record["decode_ms_per_step"] = 1000 * statistics.median(step_s)
                record["prefill_ms"] = 1000 * statistics.median(t["prefill_seconds"] for t in ts)
                record["sampling_share_of_decode"] = statistics.median(t["decode_sample_seconds"] / t["decode_seconds"] for t in ts)
                record["kv_cache_bytes"] = ts[0]["kv_cache_bytes"]
                record["load_seconds"] = load_seconds[peer.split("-")[1]]
                if batch == 1:
                    per_token = weight_bytes_per_token(files[peer.split("-")[1]])
                    record["weight_bytes_per_token"] = per_token
                    record["weight_read_gb_per_s"] = per_token / statistics.median(step_s) / 1e9
            results.append(record)

    bw = statistics.median(bandwidth)
    for record in results:
        if "weight_read_gb_per_s" in record:
            record["measured_bandwidth_gb_per_s"] = bw
            record["share_of_bandwidth"] = record["weight_read_gb_per_s"] / bw
    memory = {}
    for dtype, path in files.items():
        memory[dtype] = {b: peak_rss(path, b, args.prompt, args.new, args.threads) for b in args.batch}
        for m in memory[dtype].values():
            m["file_bytes"] = path.stat().st_size

    context["load_average_end"] = load_average()
    report = {"context": context, "measured_bandwidth_gb_per_s": bw, "bandwidth_samples": bandwidth, "results": results, "memory": memory,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    out = args.out or ROOT / "bench" / "results" / f"generate-{datetime.datetime.now():%Y%m%d-%H%M%S}-{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"\nmemory bandwidth (sum over 512 MB, {threads} threads): {bw:.1f} GB/s (median of {len(bandwidth)})")
    print("| peer | batch | tokens/s (median, min-max) | x transformers | notes |")
    print("|---|---|---|---|---|")
    for r in results:
        tps = r["tokens_per_second"]
        ratio = f"{r['ratio_to_transformers']['median']:.2f}" if "ratio_to_transformers" in r else "1.00"
        notes = ""
        if r["peer"].startswith("engine"):
            notes = f"decode {r['decode_ms_per_step']:.1f} ms/step, sampling {100 * r['sampling_share_of_decode']:.1f}%"
            if "weight_read_gb_per_s" in r:
                notes += f", weights {r['weight_read_gb_per_s']:.1f} GB/s = {100 * r['share_of_bandwidth']:.0f}% of measured"
        print(f"| {r['peer']} | {r['batch']} | {tps['median']:.1f} ({tps['min']:.1f}-{tps['max']:.1f}) | {ratio} | {notes} |")
    for dtype, per_batch in memory.items():
        for b, m in per_batch.items():
            print(f"engine {dtype} batch {b}: load {1000 * m['load_seconds']:.0f} ms (fresh process), peak RSS {m['peak_rss'] / 2**20:.0f} MiB "
                  f"= file {m['file_bytes'] / 2**20:.0f} MiB + KV {m['kv_cache_bytes'] / 2**20:.0f} MiB + python {m['rss_before_load'] / 2**20:.0f} MiB "
                  f"+ {(m['peak_rss'] - m['file_bytes'] - m['kv_cache_bytes'] - m['rss_before_load']) / 2**20:.0f} MiB other")
    print(f"load average {context['load_average_start']:.1f} -> {context['load_average_end']:.1f}; results: {out}")
    for path in files.values():
        path.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
