"""bf16 against fp32 in our CPU engine, and one engine build against another (issue 19, item 2:
"bf16 is never slower than fp32 at any batch or in prefill").

GPT-2 124M's geometry with random weights (benchmark.common.random_state), exported once as fp32
and bf16 into --models. Two cases, each timed as a whole `Engine.generate` call:

- ``prefill``: one 512-token prompt, 1 new token (tokens/s = 512 / seconds);
- ``batch``: 20 distinct 16-token prompts, 128 new tokens each, top-k 40 (20 x 128 / seconds).

Each build (``--build NAME=FOLDER``: a folder holding a built ``gpt_2_simple`` package, e.g. a
checkout's ``python/``) runs in a process of its own, which loads both dtypes, warms each case up
once and then times fp32 and bf16 alternately, ``--reps`` pairs per case. The builds take turns,
``--rounds`` times (A B A B ...), because the machine is shared and its speed drifts; the record
keeps every sample, each side's median and the median of the per-pair bf16/fp32 ratios, in
tokens per second of wall time and per second of the process's CPU time (both threads; less
moved by other jobs' time slices on a busy machine, though the pool's brief spin counts).

    python bench/bf16_vs_fp32.py --models /tmp/m --build base=/tmp/base/python --build new=python \\
        [--rounds 3] [--reps 2] [--out bench/results/<date>-bf16-vs-fp32-avx2.json]

``--env NAME=VAR=VALUE`` sets a variable for one build's process: one build two ways, e.g. the
AVX512-BF16 matmul with and without widened weights (docs/engine.md):

    python bench/bf16_vs_fp32.py --models /tmp/m --build dot=python --env dot=GPT2S_BF16_WIDEN=0 \\
        --build widened=python --env widened=GPT2S_BF16_WIDEN=1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {"prefill": (1, 512, 1), "batch": (20, 16, 128)}  # rows, prompt tokens, new tokens


def worker(models: Path, reps: int, cases: list[str]) -> dict:
    import numpy as np

    from gpt_2_simple import _engine
    from gpt_2_simple.benchmark.common import ModelFiles
    from gpt_2_simple.config import get_config
    from gpt_2_simple.engine import Engine, Request

    files = ModelFiles(get_config("124M"), models)
    engines = {d: Engine(files.engine(d), backend="cpu", threads=2) for d in ("fp32", "bf16")}
    rng = np.random.default_rng(0)
    features = _engine.cpu_features()
    out = {"isa": features["kernels"], "bf16_widened": features.get("bf16_widened"), "device": engines["fp32"].device, "tokens_per_s": {}, "tokens_per_cpu_s": {}}
    for case in cases:
        rows, prompt, new = CASES[case]
        requests = [Request(prompt=rng.integers(0, 50257, prompt).tolist(), max_new_tokens=new, top_k=40, seed=i)
                    for i in range(rows)]
        samples, cpu = {d: [] for d in engines}, {d: [] for d in engines}
        for e in engines.values():
            e.generate(requests)  # warm-up: page-in, pools, caches
        tokens = rows * (prompt if case == "prefill" else new)
        for _ in range(reps):
            for d, e in engines.items():
                t, c = time.perf_counter(), time.process_time()
                e.generate(requests)
                samples[d].append(tokens / (time.perf_counter() - t))
                cpu[d].append(tokens / (time.process_time() - c))
        out["tokens_per_s"][case] = samples
        out["tokens_per_cpu_s"][case] = cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="folder for the exported random-weight models")
    ap.add_argument("--build", action="append", default=[], metavar="NAME=FOLDER", help="a build to measure")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VAR=VALUE", help="an environment variable for build NAME")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cases", default="prefill,batch")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--commit", action="append", default=[], metavar="NAME=COMMIT", help="the commit a build was made from, for the record")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.worker:
        print(json.dumps(worker(args.models, args.reps, cases)))
        return
    if not args.build:
        ap.error("name at least one --build NAME=FOLDER")
    builds = dict(b.split("=", 1) for b in args.build)
    extra = {name: {} for name in builds}
    for spec in args.env:
        name, var, value = spec.split("=", 2)
        if name not in extra:
            ap.error(f"--env {spec}: no --build named {name}")
        extra[name][var] = value
    runs = {name: [] for name in builds}
    for r in range(args.rounds):
        for name, folder in builds.items():
            env = {**os.environ, "PYTHONPATH": str(Path(folder).resolve()), **extra[name]}
            cmd = [sys.executable, __file__, "--worker", "--models", str(args.models), "--reps", str(args.reps), "--cases", args.cases]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            runs[name].append(res)
            print(f"round {r} {name}: " + "; ".join(
                f"{c} fp32 {statistics.median(s['fp32']):.1f} bf16 {statistics.median(s['bf16']):.1f} "
                f"(per CPU s: {statistics.median(res['tokens_per_cpu_s'][c]['fp32']):.1f}, {statistics.median(res['tokens_per_cpu_s'][c]['bf16']):.1f})"
                for c, s in res["tokens_per_s"].items()), flush=True)
    summary = {}
    names = list(builds)
    for metric in ("tokens_per_s", "tokens_per_cpu_s"):
        summary[metric] = {}
        for name, rs in runs.items():
            summary[metric][name] = {}
            for case in cases:
                fp32 = [x for r in rs for x in r[metric][case]["fp32"]]
                bf16 = [x for r in rs for x in r[metric][case]["bf16"]]
                summary[metric][name][case] = {
                    "fp32_median": round(statistics.median(fp32), 1), "bf16_median": round(statistics.median(bf16), 1),
                    "bf16_over_fp32_median": round(statistics.median(b / f for b, f in zip(bf16, fp32)), 3)}
        for other in names[1:]:  # each build against the first, per dtype, round by round (the same minute)
            for case in cases:
                for d in ("fp32", "bf16"):
                    ratios = [statistics.median(b[metric][case][d]) / statistics.median(a[metric][case][d])
                              for a, b in zip(runs[names[0]], runs[other])]
                    summary[metric][other][case][f"{d}_over_{names[0]}_median"] = round(statistics.median(ratios), 3)
    print(json.dumps(summary, indent=1))
    if args.out:
        from gpt_2_simple.benchmark.common import context

        record = {"suite": "bf16_vs_fp32", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "context": context(2), "command": " ".join(sys.argv), "cases": {c: dict(zip(("rows", "prompt", "new_tokens"), CASES[c])) for c in cases},
                  "builds": builds, "build_env": extra, "build_commits": dict(c.split("=", 1) for c in args.commit), "summary": summary, "runs": runs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
