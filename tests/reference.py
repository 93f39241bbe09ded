"""Reference models for tests: our PyTorch GPT-2 with random weights and the same weights in
HuggingFace transformers (the peer implementation every layer is checked against)."""

from __future__ import annotations

import torch

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


def to_transformers(model: GPT2):
    """The same weights in ``transformers.GPT2LMHeadModel`` (eager attention, tied head)."""
    import transformers

    c = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=c.n_vocab, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, attn_implementation="eager",
    )
    hf = transformers.GPT2LMHeadModel(hf_config)
    state = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    result = hf.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"}, result
    assert not result.unexpected_keys, result
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf.eval()
