"""Continuous batching against static batching when texts stop at different points.

`gpt_2_simple generate` hands every sample to one `Engine.generate` call: when a row finishes
(truncate, length), the next pending sample takes its slot at once. Static batching (the
original, HF `generate`) runs groups of `batch` samples and each group lasts as long as its
longest text. This script times both on the same engine, interleaved, with stop points drawn
uniformly in [min_new, max_new] ("varied") and all equal to max_new ("fixed", where the two
should tie), for each dtype. Tokens/s counts the tokens the samples need (what the user gets).

    python bench/generate_batching.py                # 124M geometry, random weights
    python bench/generate_batching.py --model tiny --reps 3

Writes bench/results/generate_batching.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from gpt_2_simple import _engine  # noqa: E402
from gpt_2_simple.config import get_config  # noqa: E402
from gpt_2_simple.engine import Engine, Request  # noqa: E402
from gpt_2_simple.export import export  # noqa: E402


def random_state(config, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2's shapes with random values (speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    C, L = config.n_embd, config.n_layer

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    state = {"wte.weight": normal(config.n_vocab, C), "wpe.weight": normal(config.n_ctx, C),
             "ln_f.weight": np.ones(C, np.float32), "ln_f.bias": np.zeros(C, np.float32)}
    for i in range(L):
        p = f"h.{i}."
        state.update({
            p + "ln_1.weight": np.ones(C, np.float32), p + "ln_1.bias": np.zeros(C, np.float32),
            p + "attn.c_attn.weight": normal(C, 3 * C), p + "attn.c_attn.bias": np.zeros(3 * C, np.float32),
            p + "attn.c_proj.weight": normal(C, C), p + "attn.c_proj.bias": np.zeros(C, np.float32),
            p + "ln_2.weight": np.ones(C, np.float32), p + "ln_2.bias": np.zeros(C, np.float32),
            p + "mlp.c_fc.weight": normal(C, 4 * C), p + "mlp.c_fc.bias": np.zeros(4 * C, np.float32),
            p + "mlp.c_proj.weight": normal(4 * C, C), p + "mlp.c_proj.bias": np.zeros(C, np.float32),
        })
    return state


def requests(n: int, prompt: int, lengths: list[int], seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(prompt=rng.integers(0, 50000, prompt).tolist(), max_new_tokens=m, temperature=0.8, top_k=40,
                    seed=1, sample_index=i) for i, m in enumerate(lengths[:n])]


def continuous(engine: Engine, reqs: list[Request], batch: int) -> tuple[int, int]:
    """(tokens generated, decode steps): one call, finished rows refilled at once."""
    tokens = sum(len(r.tokens) for r in engine.generate(reqs, batch_size=batch))
    return tokens, engine.last_timings()["decode_steps"]


def static(engine: Engine, reqs: list[Request], batch: int) -> tuple[int, int]:
    """Groups of ``batch`` one after the other: a group lasts as long as its longest text."""
    tokens = steps = 0
    for i in range(0, len(reqs), batch):
        tokens += sum(len(r.tokens) for r in engine.generate(reqs[i:i + batch], batch_size=batch))
        steps += engine.last_timings()["decode_steps"]
    return tokens, steps


def timed(fn, *args) -> tuple[float, int, int]:
    start = time.perf_counter()
    tokens, steps = fn(*args)
    return time.perf_counter() - start, tokens, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="124M", help="config name (geometry only: the weights are random)")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--scenarios", nargs="+", default=["varied", "fixed"], choices=["varied", "fixed"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--min_new", type=int, default=8)
    ap.add_argument("--max_new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate_batching.json"))
    args = ap.parse_args()

    config = get_config(args.model)
    rng = np.random.default_rng(1)
    scenarios = {
        "varied": rng.integers(args.min_new, args.max_new + 1, args.samples).tolist(),
        "fixed": [args.max_new] * args.samples,
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        state = random_state(config)
        for dtype in args.dtypes:
            path = export((config, state), Path(tmp) / f"model.{dtype}.bin", dtype, progress=False)
            engine = Engine(path, backend="cpu", threads=args.threads)
            for name in args.scenarios:
                lengths = scenarios[name]
                reqs = requests(args.samples, args.prompt, lengths)
                continuous(engine, reqs[: args.batch], args.batch)  # warm-up: page in the weights, start the threads
                runs = {"continuous": [], "static": []}
                for _ in range(args.reps):  # interleaved, so both see the same machine
                    for mode, fn in (("continuous", continuous), ("static", static)):
                        runs[mode].append(timed(fn, engine, reqs, args.batch))
                rate = {m: [tok / s for s, tok, _ in r] for m, r in runs.items()}
                steps = {m: r[0][2] for m, r in runs.items()}  # deterministic: the same every run
                ratios = [c / s for c, s in zip(rate["continuous"], rate["static"])]
                record = {
                    "dtype": dtype, "scenario": name, "batch": args.batch, "samples": args.samples,
                    "new_tokens": sum(lengths), "new_tokens_range": [min(lengths), max(lengths)],
                    **{f"{m}_tokens_per_s": {"min": min(v), "median": statistics.median(v), "max": max(v)} for m, v in rate.items()},
                    "ratio_continuous_over_static_median": statistics.median(ratios),
                    "decode_steps": steps,
                }
                results.append(record)
                print(f"{dtype} {name:8s} batch {args.batch}: continuous {statistics.median(rate['continuous']):7.1f} tok/s, "
                      f"static {statistics.median(rate['static']):7.1f} tok/s, ratio {record['ratio_continuous_over_static_median']:.2f}; "
                      f"decode steps {steps['continuous']} vs {steps['static']}",
                      flush=True)
            del engine
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "generate_batching", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": _engine.cpu_features(), "cores": os.cpu_count(), "threads": args.threads or "all",
        "model": args.model, "prompt_tokens": args.prompt, "sampling": "temperature 0.8, top_k 40",
        "reps": args.reps, "commit": commit, "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
