"""Fine-tuning speed and memory on one GPU: finetune (bf16, fused AdamW, with and without
torch.compile) against a plain transformers loop (one JSON file; the code and what it measures:
gpt_2_simple/benchmark/gpu.py, docs/bench.md).

    python bench/finetune_gpu.py                    # 124M and 355M, 5 reps
    python bench/finetune_gpu.py --models 124M --reps 3 --batch 124M=32

Without a CUDA GPU in PyTorch it prints one line saying so and exits 0.
"""

from checkout import ROOT  # the checkout's sources or the installed package

from gpt_2_simple.benchmark.gpu import finetune_gpu_main

if __name__ == "__main__":
    finetune_gpu_main(results_dir=ROOT / "bench" / "results")
