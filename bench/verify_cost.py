"""What checking the weights' CRC-32s costs at load, for GPT-2 124M's geometry (issue 18, finding 6).

Exports random 124M weights (fp32 and bf16) to a temporary folder, then times, interleaved, on a
warm page cache: ``ModelFile(path)`` (map + structural checks), ``ModelFile(path, verify=True)``
(the same plus every tensor's CRC-32) and, as the physical floor, summing the file's bytes with
numpy (one read of the file). The verify cost is the difference of the first two medians.

    PYTHONPATH=python python bench/verify_cost.py [--reps 7] [--out bench/results/verify_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt_2_simple import _engine
from gpt_2_simple.config import get_config
from gpt_2_simple.export import export
from gpt_2_simple.weights import expected_shapes


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = get_config("124M")
    rng = np.random.default_rng(0)
    state = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in expected_shapes(config).items()}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp32", "bf16"):
            path = export((config, state), Path(tmp) / f"m.{dtype}.bin", dtype, progress=False)
            cases = {
                "open": lambda: _engine.ModelFile(os.fspath(path)),
                "open_verify": lambda: _engine.ModelFile(os.fspath(path), verify=True),
                "read_sum": lambda: np.fromfile(path, dtype=np.uint64).sum(),
            }
            for fn in cases.values():  # warm-up: page cache, thread pool
                fn()
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(args.reps):
                for name, fn in cases.items():
                    times[name].append(_time(fn))
            med = {k: statistics.median(v) for k, v in times.items()}
            records.append({
                "dtype": dtype, "file_bytes": path.stat().st_size, "reps": args.reps,
                **{f"{k}_ms": {"min": 1e3 * min(v), "median": 1e3 * med[k], "max": 1e3 * max(v)} for k, v in times.items()},
                "verify_cost_ms": 1e3 * (med["open_verify"] - med["open"]),
                "verify_gb_per_s": path.stat().st_size / max(med["open_verify"] - med["open"], 1e-9) / 1e9,
            })
    result = {
        "bench": "verify_cost", "model": "124M (random weights)", "threads": _engine.max_threads(),
        "cpu": platform.processor() or platform.machine(), "isa": _engine.cpu_features()["isa"],
        "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S"), "records": records,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
