"""Model load time: the C++ loader opening a 124M-geometry export (random weights), against the
ways people load the same weights elsewhere, interleaved in one run (BENCHMARKING.md).

    PYTHONPATH=python python bench/load.py [--reps 7] [--dir /tmp/gpt2s-load-bench]

Timed, per dtype (fp32, bf16), each a whole call as the user waits for it:
- ``open``: ``_engine.ModelFile(path)``: mmap + every structural check + the header checksum
  (what an engine does before its first token); page cache warm.
- ``open_cold``: the same after evicting the file (a copy) from the page cache (posix_fadvise DONTNEED).
- ``open_verify``: plus every tensor's CRC-32 (reads the whole file; on demand only).
Peers (fp32 weights): ``weights.load_weights`` on a safetensors checkpoint (mmap, lazy, like
ours), ``safetensors.numpy.load_file`` (reads every tensor), ``transformers``
``GPT2LMHeadModel.from_pretrained`` on the exported HF folder.
Writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from gpt_2_simple import _engine  # noqa: E402
from gpt_2_simple.config import GPT2Config  # noqa: E402
from gpt_2_simple.export import export, export_hf  # noqa: E402
from gpt_2_simple.weights import expected_shapes, load_weights, save_weights  # noqa: E402


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    if isinstance(fn, tuple):  # (untimed setup, timed call)
        fn[0]()
        fn = fn[1]
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def prepare(folder: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """124M-geometry files with random weights (reused from an earlier run in the same folder),
    and how long exporting them took (one run each; empty when reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": folder / "124M.fp32.bin", "bf16": folder / "124M.bf16.bin", "cold": folder / "124M.fp32.cold.bin",
             "safetensors": folder / "run" / "model-1.safetensors", "hf": folder / "hf"}
    if all(p.exists() for p in paths.values()):
        return paths, {}
    config = GPT2Config()  # 124M
    rng = np.random.default_rng(0)
    state = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02) for name, shape in expected_shapes(config).items()}
    export_s = {}
    for dtype in ("fp32", "bf16"):
        export_s[dtype] = timed(lambda: export((config, state), paths[dtype], dtype, progress=False))
    # A copy for the cold case, so evicting it from the page cache leaves the other cases warm.
    shutil.copyfile(paths["fp32"], paths["cold"])
    paths["safetensors"].parent.mkdir(exist_ok=True)
    config.save(paths["safetensors"].parent / "hparams.json")
    save_weights(paths["safetensors"], state, config)
    export_hf((config, state), paths["hf"])
    return paths, export_s


def summary(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times), "runs": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gpt2s-load-bench"))
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers peer (slow to import)")
    args = parser.parse_args()
    paths, export_s = prepare(args.dir)

    import safetensors.numpy

    cases = {
        "ours_fp32_open": lambda: _engine.ModelFile(str(paths["fp32"])),
        "ours_bf16_open": lambda: _engine.ModelFile(str(paths["bf16"])),
        "ours_fp32_open_cold": (lambda: evict(paths["cold"]), lambda: _engine.ModelFile(str(paths["cold"]))),
        "ours_fp32_open_verify": lambda: _engine.ModelFile(str(paths["fp32"]), verify=True),
        "ours_bf16_open_verify": lambda: _engine.ModelFile(str(paths["bf16"]), verify=True),
        "peer_load_weights_mmap": lambda: load_weights(paths["safetensors"]),
        "peer_safetensors_load_file": lambda: safetensors.numpy.load_file(paths["safetensors"]),
    }
    if not args.no_transformers:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        cases["peer_transformers_from_pretrained"] = lambda: transformers.GPT2LMHeadModel.from_pretrained(paths["hf"])
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up: page cache, imports, allocators
        timed(fn)
    for _ in range(args.reps):  # interleaved: A B C ... A B C ...
        for name, fn in cases.items():
            times[name].append(timed(fn))

    base = times["ours_fp32_open"]
    results = {name: summary(t) for name, t in times.items()}
    for name, t in times.items():
        if name.startswith("peer_"):
            results[name]["ratio_to_ours_fp32_open"] = statistics.median(p / o for p, o in zip(t, base))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    record = {
        "benchmark": "model load (124M geometry, random weights)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "engine_threads": _engine.max_threads(),
        "isa": _engine.cpu_features()["isa"],
        "file_bytes": {k: os.path.getsize(v) for k, v in paths.items() if v.is_file()},
        "versions": {"numpy": np.__version__, **({"torch": torch.__version__, "transformers": transformers.__version__} if not args.no_transformers else {})},
        "results": results,
        "export_s": export_s,  # export() of the same random weights from memory, one run each
    }
    out = ROOT / "bench" / "results" / "load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{'case':38s} {'min ms':>9s} {'median ms':>10s} {'max ms':>9s}  ratio")
    for name, r in results.items():
        ratio = f"{r['ratio_to_ours_fp32_open']:.0f}x" if "ratio_to_ours_fp32_open" in r else ""
        print(f"{name:38s} {1e3 * r['min_s']:9.2f} {1e3 * r['median_s']:10.2f} {1e3 * r['max_s']:9.2f}  {ratio}")
    for dtype, seconds in export_s.items():
        print(f"export {dtype}: {seconds:.2f} s (one run)")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
