"""GPT-2 in PyTorch, in one file: the training model and the reference every engine is tested against.

Parameter names are the checkpoint names (wte, wpe, h.{i}.ln_1, h.{i}.attn.c_attn, ...), and the
projection weights keep GPT-2's Conv1D layout (in_features, out_features), so OpenAI's TensorFlow
checkpoints, HuggingFace files and our safetensors checkpoints all load without renaming or
transposing. Shapes: B batch, T time, C channels, NH heads, HS head size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPT2Config
from .head_loss import head_loss

__all__ = ["GPT2", "Conv1D", "KVCache"]

# Per layer: (k, v), each (B, NH, T_past, HS).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``y = x @ weight + bias`` with weight stored (in, out), as TF wrote it."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))  # (in, out)
        self.bias = nn.Parameter(torch.zeros(n_out))  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, NH, T, HS)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, NH, T_past + T, HS)
            v = torch.cat([past[1], v], dim=2)
        T_past = k.shape[2] - T
        if T_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # New query i sits at absolute position T_past + i and may see keys 0..T_past + i.
            mask = torch.ones(T, T_past + T, dtype=torch.bool, device=x.device).tril(diagonal=T_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past=None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.n_vocab, config.n_embd)  # (V, C), also the output head
        self.wpe = nn.Embedding(config.n_ctx, config.n_embd)  # (n_ctx, C)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        # Activation checkpointing (the original's use_memory_saving_gradients): recompute each
        # block in the backward pass instead of keeping its activations.
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L), wpe N(0, 0.01)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name == "wpe.weight":
                nn.init.normal_(p, std=0.01)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, past: KVCache | None = None, use_cache: bool = False, targets: torch.Tensor | None = None):
        """Logits (B, T, V) for token ids ``idx`` (B, T) that follow ``past`` (None: a fresh start).

        Returns ``logits`` alone, or ``(logits, present)`` when ``use_cache``: the KV cache to pass
        as ``past`` for the next tokens. With ``targets`` (B, T) (next-token ids, -100 where none),
        returns instead the summed cross-entropy, without ever holding all the logits (head_loss.py).
        """
        B, T = idx.shape
        T_past = past[0][0].shape[2] if past else 0
        if T_past + T > self.config.n_ctx:
            raise ValueError(f"sequence of {T_past + T} tokens exceeds the model's context of {self.config.n_ctx}")
        pos = torch.arange(T_past, T_past + T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        present: KVCache = []
        for i, block in enumerate(self.h):
            layer_past = past[i] if past else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, kv = checkpoint(block, x, layer_past, use_reentrant=False)
            else:
                x, kv = block(x, layer_past)
            if use_cache:
                present.append(kv)
        x = self.ln_f(x)
        if targets is not None:
            return head_loss(x, self.wte.weight, targets)
        logits = F.linear(x, self.wte.weight)  # (B, T, V): the head is tied to wte
        return (logits, present) if use_cache else logits
