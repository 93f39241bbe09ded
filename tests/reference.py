"""Reference models for tests: our PyTorch GPT-2 with random weights and the same weights in
HuggingFace transformers (the peer implementation every layer is checked against)."""

from __future__ import annotations

import torch

from gpt_2_simple.benchmark.common import to_transformers  # noqa: F401 - one implementation, shared with the GPU benchmark
from gpt_2_simple.config import GPT2Config
from gpt_2_simple.model import GPT2

# Small enough to run everywhere in milliseconds, large enough to have several heads and layers.
TINY = GPT2Config(n_ctx=64, n_embd=64, n_head=4, n_layer=2)


def random_gpt2(config: GPT2Config = TINY, seed: int = 0) -> GPT2:
    """GPT-2 with every parameter random, biases and LayerNorms included (GPT-2's init leaves
    those at 0 and 1, which would hide bugs in how they are read or applied)."""
    torch.manual_seed(seed)
    model = GPT2(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif ".ln_" in name or name.startswith("ln_f"):
                p.normal_(1.0, 0.1)
    return model.eval()
