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


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x with each row (last dimension) rounded to int8 with a scale of its own, as the int8
    engine quantizes every matmul input (docs/engine.md, "int8 weights"): s = max |x| / 127 in
    float32 (1 for a row of zeros), q = round(x / s) to nearest even within [-127, 127]; -> s q."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax == 0, torch.ones_like(amax), (amax.double() / 127.0).float())
    return torch.clamp(torch.round(x / s), -127, 127) * s


class Int8Reference(torch.nn.Module):
    """model.py with what an int8 model file holds: the weights s q read from the file by the spec's
    reader (format_reader.py) and every matmul input (the four projections and the tied head)
    rounded by quantize_rows. (B, T) ids -> (B, T, V) logits."""

    def __init__(self, path):
        super().__init__()
        import format_reader as fr

        f = fr.read(path)
        h = f["header"]
        config = GPT2Config(n_vocab=h["n_vocab"], n_ctx=h["n_ctx"], n_embd=h["n_embd"], n_head=h["n_head"], n_layer=h["n_layer"])
        self.model = GPT2(config).eval()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                t = torch.from_numpy(f["tensors"][name].astype("float32"))
                if name in f["scales"]:
                    t = t * torch.from_numpy(f["scales"][name].copy())[:, None]
                if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                    t = t.T  # Conv1D (in, out), stored (out, in)
                p.copy_(t)
        for m in self.model.modules():
            if type(m).__name__ == "Conv1D":
                m.register_forward_pre_hook(lambda _, args: (quantize_rows(args[0]),))
        self.hidden = None
        self.model.ln_f.register_forward_hook(lambda _, __, out: setattr(self, "hidden", out))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.model(idx)
        return torch.nn.functional.linear(quantize_rows(self.hidden), self.model.wte.weight)
