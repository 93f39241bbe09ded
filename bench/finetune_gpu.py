"""Fine-tuning speed and memory on one GPU: ``finetune`` (bf16 autocast, fused AdamW, with and without
``torch.compile``) against a plain transformers training loop with the same settings, on the same
GPU, in one sitting, interleaved, median of ``--reps`` runs after one warm-up run each.

For 124M and 355M geometry (random init, 1024-token windows of the bundled Shakespeare corpus):
tokens/s over the steps after ``--warmup-steps`` (torch.compile's compilation and the allocator's
first steps excluded; timed from finetune's own per-step log), and the peak GPU memory allocated.
The issue's target: >= 300,000 tokens/s for 124M with bf16 and torch.compile on one H100.

    python bench/finetune_gpu.py                    # 124M and 355M, 5 reps
    python bench/finetune_gpu.py --models 124M --reps 3 --batch 124M=32

Without a CUDA GPU in PyTorch it prints one line saying so and exits 0. Results:
bench/results/finetune_gpu-<date>-<host>.json.
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
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

import gpt_2_simple as gpt2  # noqa: E402
from gpt_2_simple import dataset as ds  # noqa: E402
from gpt_2_simple.config import GPT2Config, get_config  # noqa: E402
from gpt_2_simple.tokenizer import BUNDLED_DIR, get_encoder  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from finetune import make_model_folder  # noqa: E402  (the CPU benchmark's random-init model folder)

DEFAULT_BATCH = {"124M": 16, "355M": 8}
LEARNING_RATE = 1e-4


def summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def ours(root: Path, name: str, model_dir: Path, data: Path, batch: int, steps: int, warmup: int, compiled: bool, rep: int) -> tuple[float, int]:
    """One finetune run: tokens/s over the steps after `warmup` (from its log.jsonl) and peak GPU bytes."""
    run_name = f"{name}-{'compiled' if compiled else 'eager'}-{rep}"
    torch.cuda.reset_peak_memory_stats()
    gpt2.finetune(gpt2.start_tf_sess(), str(data), steps=steps, model_name=name, model_dir=str(model_dir), checkpoint_dir=str(root / "checkpoint"),
                  run_name=run_name, batch_size=batch, accumulate_gradients=1, learning_rate=LEARNING_RATE, optimizer="adamw",
                  sample_every=10**9, save_every=10**9, print_every=1, seed=0, progress=False, restore_from="fresh",
                  device="cuda", mixed_precision="bf16", compile=compiled)
    peak = torch.cuda.max_memory_allocated()
    log = [json.loads(line) for line in (root / "checkpoint" / run_name / "log.jsonl").read_text().splitlines()]
    log = [row for row in log if "loss" in row]
    first, last = log[warmup - 1], log[-1]
    seq = GPT2Config.from_file(model_dir / name / "hparams.json").n_ctx
    return (last["step"] - first["step"]) * batch * seq / (last["time"] - first["time"]), peak


def transformers_loop(config: GPT2Config, tokens: torch.Tensor, batch: int, steps: int, warmup: int) -> tuple[float, int]:
    """The plain peer: transformers' GPT2LMHeadModel, bf16 autocast, fused AdamW, the same batches."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed runs per variant (after one warm-up run)")
    parser.add_argument("--models", nargs="+", default=["124M", "355M"], choices=list(DEFAULT_BATCH))
    parser.add_argument("--batch", nargs="*", default=[], metavar="MODEL=N", help="batch size per model (default 124M=16 355M=8)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps of each run left out of its tokens/s")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/finetune_gpu.py: skipped, no CUDA here: PyTorch sees no NVIDIA GPU")
        return
    if not 1 <= args.warmup_steps < args.steps:
        parser.error("--warmup-steps must be in [1, --steps)")
    batch = dict(DEFAULT_BATCH) | {k: int(v) for k, v in (item.split("=", 1) for item in args.batch)}

    import transformers

    props = torch.cuda.get_device_properties(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {
        "benchmark": "finetune_gpu", "gpu": props.name, "gpu_memory_bytes": props.total_memory, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "transformers": transformers.__version__, "commit": commit, "host": platform.node(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "settings": "bf16 autocast, fused AdamW lr 1e-4, 1024-token windows, "
        f"accumulate_gradients 1, {args.steps} steps per run, tokens/s after step {args.warmup_steps}", "models": [],
    }
    out = args.out or ROOT / "bench" / "results" / f"finetune_gpu-{datetime.date.today()}-{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(results: dict) -> None:
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    print(f"{props.name}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, commit {commit}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = root / "models"
        chunks = ds.load_dataset(get_encoder(), BUNDLED_DIR / "shakespeare.txt", progress=False)
        data = root / "shakespeare.npz"
        np.savez(data, *chunks)  # pre-encoded: finetune's start-up then costs no encoding
        tokens = torch.from_numpy(np.concatenate(chunks).astype(np.int64)).cuda()
        for name in args.models:
            config = get_config(name)
            make_model_folder(model_dir, name, config)
            b = batch[name]
            variants = {
                "finetune_compiled": lambda rep: ours(root, name, model_dir, data, b, args.steps, args.warmup_steps, True, rep),
                "finetune_eager": lambda rep: ours(root, name, model_dir, data, b, args.steps, args.warmup_steps, False, rep),
            }
            if not args.no_transformers:
                variants["transformers"] = lambda rep: transformers_loop(config, tokens, b, args.steps, args.warmup_steps)
            speed = {v: [] for v in variants}
            peak = {v: [] for v in variants}
            for rep in range(args.reps + 1):  # rep 0 warms up every variant
                for v, run in variants.items():  # interleaved
                    tps, mem = run(rep)
                    print(f"  {name} batch {b} rep {rep} {v}: {tps:,.0f} tok/s, peak {mem / 2**30:.2f} GiB", flush=True)
                    if rep:
                        speed[v].append(tps)
                        peak[v].append(mem)
            record = {"model": name, "config": config.to_hparams(), "batch": b, "seq": config.n_ctx, "reps": args.reps,
                      "tokens_per_s": {v: summary(xs) for v, xs in speed.items()}, "peak_gpu_bytes": {v: max(xs) for v, xs in peak.items()}}
            if "transformers" in speed:
                record["ratio_compiled_to_transformers_median_of_pairs"] = statistics.median(
                    a / t for a, t in zip(speed["finetune_compiled"], speed["transformers"]))
            results["models"].append(record)
            write(results)  # after each model, so a run cut short keeps what it measured
            print(f"{name}: finetune compiled {record['tokens_per_s']['finetune_compiled']['median']:,.0f} tok/s "
                  f"(peak {record['peak_gpu_bytes']['finetune_compiled'] / 2**30:.2f} GiB), eager "
                  f"{record['tokens_per_s']['finetune_eager']['median']:,.0f} tok/s", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
