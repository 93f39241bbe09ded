"""Generation speed on the GPU: our CUDA engine against HuggingFace transformers' ``generate`` on the
same GPU, in one process and sitting, interleaved (ours, theirs, ours, theirs ...), median of
``--reps`` runs after one warm-up each. GPT-2 124M geometry (random weights, GPT-2's init), bf16,
prompt 16 tokens, 128 new tokens, top-k 40 sampling. Writes a JSON record to bench/results/.

Figures (the targets of the CUDA issue):
- batch 1: ms per generated token of the whole call, the decode steps alone, and the ratio of
  tokens/s to transformers (target <= 0.5 ms/token and >= 10x);
- batch 64, 128, 256: aggregate tokens/s and the ratio to transformers (target >= 100,000 and >= 5x);
- sampling: device time of one sampler launch at batch 1 and 256 on real logits of the model, for
  top-k 40, temperature only, and top-p 0.9 (target <= 30 us and <= 100 us), no logits on the host;
- context: the engine with CUDA graphs off, the weight bytes a batch-1 token reads and the GPU's
  copy bandwidth measured in the same run (the floor of a batch-1 token), GPU memory in use.

    python bench/generate_cuda.py                       # everything above
    python bench/generate_cuda.py --reps 3 --batch 1 64 --no-transformers

Without an NVIDIA GPU (or without the _engine_cuda module, or PyTorch without CUDA) it prints one
line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from gpt_2_simple import __version__  # noqa: E402
from gpt_2_simple.engine import Request  # noqa: E402


def cuda_unavailable() -> str | None:
    """Why this benchmark cannot run here, or None."""
    try:
        from gpt_2_simple import _engine_cuda
    except ImportError as e:
        return f"the CUDA engine (_engine_cuda) is not built ({e})"
    devices, reason = _engine_cuda.cuda_status()
    if devices < 1:
        return reason
    import torch

    if not torch.cuda.is_available():
        return "PyTorch here has no CUDA (transformers, the peer, needs it)"
    return None


def summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def context(device: int) -> dict:
    import torch
    import transformers

    from gpt_2_simple import _engine_cuda

    info = _engine_cuda.device_info(device)
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device}"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = ""
    return {
        "gpu": info["name"], "capability": list(info["capability"]), "gpu_memory_bytes": info["total_bytes"], "driver": driver,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
        "gpt_2_simple": __version__, "commit": commit, "host": platform.node(),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed runs per configuration (after one warm-up)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 128, 256])
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sample")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: bench/results/generate_cuda-<date>-<host>.json)")
    args = parser.parse_args()

    why = cuda_unavailable()
    if why:
        print(f"bench/generate_cuda.py: skipped, no CUDA here: {why}")
        return

    import torch

    from gpt_2_simple import _engine_cuda
    from gpt_2_simple.config import get_config
    from gpt_2_simple.export import export, inspect
    from gpt_2_simple.model import GPT2

    torch.cuda.set_device(args.device)
    ctx = context(args.device)
    print(f"{ctx['gpu']} (sm_{ctx['capability'][0]}{ctx['capability'][1]}, driver {ctx['driver']}), torch {ctx['torch']} "
          f"(CUDA {ctx['torch_cuda']}), transformers {ctx['transformers']}, commit {ctx['commit']}")

    config = get_config("124M")
    torch.manual_seed(0)
    model = GPT2(config).eval()  # GPT-2's initialisation: random weights with realistic scales
    path = export(model, Path(tempfile.mkdtemp(prefix="gpt2s-bench-")) / "124M.bf16.bin", "bf16", progress=False)
    t = time.perf_counter()
    engine = _engine_cuda.Engine(str(path), device=args.device)
    load_seconds = time.perf_counter() - t
    engine_nographs = _engine_cuda.Engine(str(path), device=args.device, graphs=False)
    hf = None
    if not args.no_transformers:
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import to_transformers

        hf = to_transformers(model).to(device=f"cuda:{args.device}", dtype=torch.bfloat16)

    prompt = list(range(1000, 1000 + args.prompt))

    def requests(batch: int) -> list[Request]:
        return [Request(prompt, args.new, temperature=1.0, top_k=args.top_k, seed=1234, sample_index=i) for i in range(batch)]

    def run(peer: str, batch: int) -> tuple[float, dict]:
        """Wall seconds of one whole generate call for `batch` samples (and the engine's timings)."""
        reqs = requests(batch)
        torch.cuda.synchronize()
        t = time.perf_counter()
        if peer.startswith("engine"):
            e = engine if peer == "engine" else engine_nographs
            out = e.generate(reqs, batch_size=batch)
            elapsed = time.perf_counter() - t
            assert all(len(tokens) == args.new for tokens, _ in out)
            return elapsed, e.last_timings()
        ids = torch.tensor([prompt] * batch, device=f"cuda:{args.device}")
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=args.top_k, temperature=1.0,
                              max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        assert out.shape == (batch, args.prompt + args.new)
        return elapsed, {}

    peers = ["engine", "engine-nographs"] + ([] if hf is None else ["transformers"])
    results = []
    for batch in args.batch:
        for peer in peers:
            run(peer, batch)  # warm-up: graph capture, cuBLAS heuristics, allocator, transformers' caches
        times = {peer: [] for peer in peers}
        timings = []
        for _ in range(args.reps):
            for peer in peers:  # interleaved: a busy moment hits every peer alike
                elapsed, tm = run(peer, batch)
                times[peer].append(elapsed)
                if peer == "engine":
                    timings.append(tm)
        tokens = batch * args.new
        record = {
            "batch": batch, "prompt": args.prompt, "new_tokens": args.new, "top_k": args.top_k, "reps": args.reps,
            "tokens_per_s": {peer: summary([tokens / s for s in times[peer]]) for peer in peers},
            "ms_per_token_batch_row": summary([1e3 * s / args.new for s in times["engine"]]),
            "engine_decode_ms_per_step": summary([1e3 * tm["decode_seconds"] / tm["decode_steps"] for tm in timings]),
            "engine_sample_share_of_decode": statistics.median(tm["decode_sample_seconds"] / tm["decode_seconds"] for tm in timings),
            "engine_prefill_ms": statistics.median(1e3 * tm["prefill_seconds"] for tm in timings),
        }
        line = (f"batch {batch:>3}: engine {record['tokens_per_s']['engine']['median']:>10,.0f} tok/s "
                f"({record['ms_per_token_batch_row']['median']:.3f} ms per token of a row, decode step "
                f"{record['engine_decode_ms_per_step']['median']:.3f} ms), no graphs {record['tokens_per_s']['engine-nographs']['median']:,.0f}")
        if hf is not None:
            ratios = [h / e for e, h in zip(times["engine"], times["transformers"])]  # seconds theirs / ours
            record["ratio_to_transformers_median_of_pairs"] = statistics.median(ratios)
            line += (f"; transformers {record['tokens_per_s']['transformers']['median']:,.0f} tok/s; "
                     f"ratio {record['ratio_to_transformers_median_of_pairs']:.1f}x")
        print(line, flush=True)
        results.append(record)

    # Sampling alone: real logits of the model (one decode step's), tiled to the batch.
    logits = {}
    engine.generate([Request(prompt, 1, temperature=1.0)], batch_size=1, on_logits=lambda i, s, x: logits.setdefault(0, x.copy()))
    sampling = []
    for batch in (1, 256):
        rows = np.tile(logits[0], (batch, 1))
        for name, (temperature, top_k, top_p) in {"top_k_40": (1.0, 40, 0.0), "temperature_only": (1.0, 0, 0.0), "top_p_0.9": (1.0, 0, 0.9)}.items():
            us = _engine_cuda.time_sampler(rows, [temperature], [top_k], [top_p], iters=100, device=args.device)
            sampling.append({"batch": batch, "params": name, "microseconds": us})
            print(f"sampling batch {batch:>3}, {name}: {us:.1f} us per step (device time)")

    weight_bytes = sum(t["nbytes"] for t in inspect(path)["tensors"] if t["name"] != "wpe.weight")
    bandwidth = copy_bandwidth(args.device)
    floor_ms = 1e3 * weight_bytes / (bandwidth * 1e9)
    print(f"weights read per batch-1 token: {weight_bytes / 2**20:.0f} MiB; copy bandwidth {bandwidth:,.0f} GB/s; floor {floor_ms:.3f} ms/token")

    record = {
        "benchmark": "generate_cuda", "model": "124M geometry, random weights, bf16", "context": ctx,
        "engine_load_seconds": load_seconds, "weight_bytes_per_token": weight_bytes, "copy_bandwidth_gb_s": bandwidth,
        "batch1_floor_ms_per_token": floor_ms, "generation": results, "sampling": sampling,
        "gpu_memory_allocated_by_torch": torch.cuda.max_memory_allocated(args.device),
    }
    out = args.out or ROOT / "bench" / "results" / f"generate_cuda-{datetime.date.today()}-{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
