"""Fine-tuning speed and memory on one GPU: finetune (bf16, fused AdamW, with and without
torch.compile) against a plain transformers loop (one JSON file; the code and what it measures:
gpt_2_simple/benchmark/gpu.py, docs/bench.md).

    python bench/finetune_gpu.py                    # 124M and 355M, 5 reps
    python bench/finetune_gpu.py --models 124M --reps 3 --batch 124M=32

Without a CUDA GPU in PyTorch it prints one line saying so and exits 0.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from gpt_2_simple.benchmark.gpu import finetune_gpu_main  # noqa: E402

if __name__ == "__main__":
    finetune_gpu_main(results_dir=ROOT / "bench" / "results")
