"""Generation speed on the GPU: our CUDA engine against transformers' generate on the same GPU (one
JSON file; the code and what it measures: gpt_2_simple/benchmark/gpu.py, docs/bench.md).

    python bench/generate_cuda.py                       # batch 1, 64, 128, 256, 5 reps
    python bench/generate_cuda.py --reps 3 --batch 1 64 --no-transformers

Without an NVIDIA GPU it prints one line saying so and exits 0.
"""

from checkout import ROOT  # the checkout's sources or the installed package

from gpt_2_simple.benchmark.gpu import generate_cuda_main

if __name__ == "__main__":
    generate_cuda_main(results_dir=ROOT / "bench" / "results")
