"""Where a CUDA decode step spends its time, kernel by kernel (needs Nsight Compute's ncu and a GPU).

    python bench/profile_cuda.py --batch 1 64          # runs itself under ncu, prints a table per batch

124M geometry, random weights, bf16, prompt 16, a few new tokens with top-k 40. ncu times each
kernel alone (serialised, clocks left alone), so the sum is a little above a real step's time; the
split between kernels is what this is for. Used by bench/gpu_check.sh's `profile` step.
"""

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import checkout  # noqa: F401  (puts the checkout's sources first after a development build)

NEW_TOKENS = 9


def generate(batches: list[int]) -> None:
    """The profiled program: one generate call per batch size (its first step is the prefill)."""
    import torch

    from gpt_2_simple import _engine_cuda
    from gpt_2_simple.config import get_config
    from gpt_2_simple.engine import Request
    from gpt_2_simple.export import export
    from gpt_2_simple.model import GPT2

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # the engine maps the file; it is deleted once the engine is gone
        path = export(GPT2(get_config("124M")).eval(), Path(tmp) / "124M.bf16.bin", "bf16", progress=False)
        engine = _engine_cuda.Engine(str(path))
        ids = list(range(1000, 1016))
        for batch in batches:
            engine.generate([Request(ids, NEW_TOKENS, temperature=1.0, top_k=40, seed=1, sample_index=i)
                             for i in range(batch)], batch_size=batch)
        del engine


def kernel_name(signature: str) -> str:
    """ncu's "void ns::kernel<T, 1, (ns::E)0>(args)" -> "kernel<bf16, 1, (E)0>": the template
    arguments tell decode_product's fused products apart."""
    depth = 0
    for end, ch in enumerate(signature):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            break
    else:
        end = len(signature)
    name = signature[:end].removeprefix("void ").replace("gpt2s::cuda::", "")
    return name.replace("__nv_bfloat16", "bf16").replace("(DecodeOut)", "out ")


def profile(batch: int) -> None:
    """Runs generate(batch) under ncu and prints GPU time per kernel name."""
    command = [os.environ.get("NCU", "ncu"), "--clock-control", "none", "--metrics", "gpu__time_duration.sum", "--csv",
               "--print-units", "base", sys.executable, __file__, "--child", "--batch", str(batch)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0 or '"ID"' not in out.stdout:
        sys.exit(f"ncu failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    per_name = defaultdict(list)
    for row in csv.DictReader(io.StringIO(out.stdout[out.stdout.index('"ID"'):])):
        if row.get("Metric Name") == "gpu__time_duration.sum":  # ns
            per_name[kernel_name(row["Kernel Name"])].append(float(row["Metric Value"].replace(",", "")) * 1e-3)
    total = sum(sum(v) for v in per_name.values())
    print(f"batch {batch}: {sum(map(len, per_name.values()))} kernels, {total:.0f} us in all "
          f"(prefill and {NEW_TOKENS - 1} decode steps)")
    print(f"{'kernel':56s} {'launches':>8s} {'us total':>10s} {'us mean':>9s} {'share':>6s}")
    for name, times in sorted(per_name.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name[:56]:56s} {len(times):8d} {sum(times):10.1f} {sum(times) / len(times):9.2f} {sum(times) / total:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        generate(args.batch)
    else:
        for batch in args.batch:
            profile(batch)


if __name__ == "__main__":
    main()
