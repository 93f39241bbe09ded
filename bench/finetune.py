"""Fine-tuning speed and memory: ``finetune`` against a plain transformers training loop.

    python bench/finetune.py [--reps 5] [--skip-124m] [--skip-memory]

- throughput: the same geometry, batch, sequence length, optimizer (Adam, lr 1e-4) and data (random
  windows of shakespeare.txt) in ``finetune`` (timed from its own per-step log, so dataset loading
  and the final save are excluded) and in a plain loop over ``transformers.GPT2LMHeadModel``
  (forward, cross-entropy, backward, step). Interleaved ours/theirs, one warm-up pair, medians
  and per-pair ratios. Geometries: 'tiny' (from scratch) and 124M (random init, n_ctx 256).
- memory: peak RSS of a child process running one ``finetune`` step ('small': 51M, 8 layers,
  batch 2 x 1024 tokens, SGD so that no optimizer state hides the activations) with and without
  ``use_memory_saving_gradients`` (activation checkpointing), and the same for transformers with
  and without ``gradient_checkpointing_enable()``. (With Adam on 124M at batch 1 the peak of the
  whole process is Adam's first step, not the activations, and checkpointing cannot show.)
- encoding: ``load_dataset`` on shakespeare.txt, one process and with worker processes.

Results: bench/results/finetune.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gpt_2_simple as gpt2  # noqa: E402
from gpt_2_simple import dataset as ds  # noqa: E402
from gpt_2_simple.config import SCRATCH, GPT2Config  # noqa: E402
from gpt_2_simple.tokenizer import BUNDLED_DIR, get_encoder  # noqa: E402
from gpt_2_simple.weights import save_weights  # noqa: E402

CORPUS = BUNDLED_DIR / "shakespeare.txt"


def hf_model(config: GPT2Config):
    import transformers

    hf_config = transformers.GPT2Config(vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
                                        n_head=config.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(hf_config).train()


def hf_loop(model, tokens: np.ndarray, batch: int, seq: int, steps: int) -> float:
    """Plain transformers training loop; returns tokens/s over steps 2..steps (step 1 warms up)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    start = None
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
        x = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64))
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - 1) * batch * seq / (time.perf_counter() - start)


def ours(root: Path, model_name: str, model_dir: Path, data: Path, batch: int, steps: int, rep: int) -> float:
    """finetune for `steps` steps; tokens/s from its log.jsonl over steps 2..steps."""
    run_name = f"{model_name}-{rep}"
    gpt2.finetune(gpt2.start_tf_sess(), str(data), steps=steps, model_name=model_name, model_dir=str(model_dir), checkpoint_dir=str(root / "checkpoint"),
                  run_name=run_name, batch_size=batch, accumulate_gradients=1, learning_rate=1e-4, sample_every=10**9, save_every=10**9,
                  print_every=1, seed=0, progress=False, restore_from="fresh")
    log = [json.loads(line) for line in (root / "checkpoint" / run_name / "log.jsonl").read_text().splitlines()]
    seq = model_config(model_name, model_dir).n_ctx
    return (steps - 1) * batch * seq / (log[-1]["time"] - log[0]["time"])


def model_config(model_name: str, model_dir: Path) -> GPT2Config:
    return SCRATCH.get(model_name) or GPT2Config.from_file(model_dir / model_name / "hparams.json")


def make_model_folder(model_dir: Path, name: str, config: GPT2Config) -> None:
    from gpt_2_simple.model import GPT2

    folder = model_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / "hparams.json")
    torch.manual_seed(0)
    save_weights(folder / "model-0.safetensors", GPT2(config).state_dict(), config)


def throughput(root: Path, model_name: str, model_dir: Path, data: Path, tokens: np.ndarray, batch: int, steps: int, reps: int) -> dict:
    config = model_config(model_name, model_dir)
    hf = hf_model(config)
    ours_tps, hf_tps = [], []
    for rep in range(reps + 1):  # rep 0 warms up both
        a = ours(root, model_name, model_dir, data, batch, steps, rep)
        b = hf_loop(hf, tokens, batch, config.n_ctx, steps)
        print(f"  {model_name} rep {rep}: finetune {a:,.0f} tok/s, transformers {b:,.0f} tok/s, ratio {a / b:.2f}", flush=True)
        if rep:
            ours_tps.append(a)
            hf_tps.append(b)
    ratios = [a / b for a, b in zip(ours_tps, hf_tps)]
    summary = lambda xs: {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}  # noqa: E731
    return {"model": model_name, "config": config.to_hparams(), "batch": batch, "seq": config.n_ctx, "steps_per_rep": steps, "reps": reps,
            "finetune_tokens_per_s": summary(ours_tps), "transformers_tokens_per_s": summary(hf_tps), "ratio_median_of_pairs": statistics.median(ratios)}


MEMORY_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
which, checkpointing, data, ckpt = sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
if which == "ours":
    import gpt_2_simple as gpt2
    gpt2.finetune(gpt2.start_tf_sess(), data, steps=1, model_name="small", checkpoint_dir=ckpt, batch_size=2, accumulate_gradients=1, optimizer="sgd",
                  use_memory_saving_gradients=checkpointing, sample_every=10**9, save_every=10**9, progress=False, seed=0, restore_from="fresh")
else:
    import transformers
    cfg = transformers.GPT2Config(n_positions=1024, n_embd=512, n_layer=8, n_head=8, activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(cfg).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randint(0, 50257, (2, 1025))
    logits = model(input_ids=x[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def memory(root: Path, data: Path) -> dict:
    out = {}
    for which in ("ours", "transformers"):
        for checkpointing in (False, True):
            proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT / "python"), which, str(int(checkpointing)), str(data), str(root / "mem")],
                                  capture_output=True, text=True, check=True)
            peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            out[f"{which}_{'checkpointing' if checkpointing else 'plain'}_peak_rss_mb"] = peak
            print(f"  {which} checkpointing={checkpointing}: peak RSS {peak:,.0f} MB", flush=True)
    out["ours_saving_mb"] = out["ours_plain_peak_rss_mb"] - out["ours_checkpointing_peak_rss_mb"]
    out["conditions"] = ("'small' geometry (51M: 8 layers, 512 wide, n_ctx 1024), batch 2 x 1024 tokens, fp32, one SGD step "
                         "(no optimizer state, so the peak is the forward/backward), peak RSS of the whole child process")
    return out


def encoding() -> dict:
    enc = get_encoder()
    size = CORPUS.stat().st_size
    out = {}
    for label, min_bytes in (("one_process", 1 << 62), ("worker_processes", 0)):
        ds.PARALLEL_MIN_BYTES = min_bytes
        times = []
        for _ in range(3):
            enc.cache.clear()
            start = time.perf_counter()
            ds.load_dataset(enc, CORPUS, progress=False)
            times.append(time.perf_counter() - start)
        out[f"{label}_mb_per_s"] = size / 1e6 / statistics.median(times)
        print(f"  encoding, {label}: {out[f'{label}_mb_per_s']:.1f} MB/s", flush=True)
    out["workers"] = min(os.cpu_count() or 1, 8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-124m", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true", help="measure memory only and update the memory record of an existing results file")
    args = parser.parse_args()
    import transformers

    if args.only_memory:
        out = ROOT / "bench" / "results" / "finetune.json"
        results = json.loads(out.read_text()) if out.exists() else {}
        with tempfile.TemporaryDirectory() as tmp:
            chunks = ds.load_dataset(get_encoder(), CORPUS, progress=False)
            np.savez(Path(tmp) / "shakespeare.npz", *chunks)
            results["memory"] = memory(Path(tmp), Path(tmp) / "shakespeare.npz")
        out.write_text(json.dumps(results, indent=2) + "\n")
        return
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": "fp32", "optimizer": "Adam lr 1e-4",
    }
    cpu_name = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    results["cpu"] = cpu_name[0] if cpu_name else results["cpu"]
    out = ROOT / "bench" / "results" / "finetune.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a long run that is stopped keeps what it measured
        out.write_text(json.dumps(results, indent=2) + "\n")

    print("encoding", flush=True)
    results["encoding"] = encoding()
    save()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = root / "models"
        enc = get_encoder()
        chunks = ds.load_dataset(enc, CORPUS, progress=False)
        data = root / "shakespeare.npz"
        np.savez(data, *chunks)  # pre-encoded: finetune's start-up then costs no encoding
        tokens = chunks[0]
        results["throughput"] = []
        print("throughput: tiny", flush=True)
        results["throughput"].append(throughput(root, "tiny", model_dir, data, tokens, batch=8, steps=8, reps=args.reps))
        save()
        if not args.skip_124m:
            make_model_folder(model_dir, "m256", GPT2Config(n_ctx=256))
            print("throughput: 124M geometry", flush=True)
            results["throughput"].append(throughput(root, "m256", model_dir, data, tokens, batch=2, steps=3, reps=args.reps))
            save()
        if not args.skip_memory:
            print("memory", flush=True)
            results["memory"] = memory(root, data)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
