"""Generation speed on the GPU: our CUDA engine against transformers' generate on the same GPU (one
JSON file; the code and what it measures: gpt_2_simple/benchmark/gpu.py, docs/bench.md).

    python bench/generate_cuda.py                       # batch 1, 64, 128, 256, 5 reps
    python bench/generate_cuda.py --reps 3 --batch 1 64 --no-transformers

Without an NVIDIA GPU it prints one line saying so and exits 0.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from gpt_2_simple.benchmark.gpu import generate_cuda_main  # noqa: E402

if __name__ == "__main__":
    generate_cuda_main(results_dir=ROOT / "bench" / "results")
