"""The training loss: GPT-2's output head (tied to wte) and the cross-entropy, a chunk of tokens at
a time, so that the (tokens, vocabulary) logits never exist whole.

The plain way, ``F.cross_entropy(F.linear(x, wte), targets)``, keeps the logits, their
log-softmax and then their gradient: three B x T x 50257 float tensors (412 MB each at batch
2 x 1024), most of a small model's peak memory, which activation checkpointing does not touch.
Here each chunk of CHUNK_ROWS tokens computes its logits, its loss and, while they are at hand,
its share of both gradients (softmax - one-hot, times wte and times x); the gradients wait for the
backward pass, which only scales them. The arithmetic is the plain form's. Peak RSS of one
'small' step at batch 2 x 1024 on the CPU: 2.71 -> 1.60 GB (docs/finetune.md).

Under autocast (bf16 on CUDA) the plain form is kept: there the GEMMs and the fused cross-entropy
are what the GPU measurements were made with. Without autocast this module runs on CUDA too
(tests/test_model.py checks it there against F.cross_entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["head_loss", "CHUNK_ROWS", "IGNORE"]

CHUNK_ROWS = 512  # tokens per chunk: logits of 103 MB; 256 was 5% slower, 1024 held 20% more
IGNORE = -100  # target of a position without a next token (as F.cross_entropy's ignore_index)


def head_loss(x: torch.Tensor, wte: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the logits ``x @ wte.T`` against ``targets``.

    x (B, T, C) after ln_f, wte (V, C), targets (B, T) token ids or IGNORE. Returns a float32
    scalar: the sum over the targets that are not IGNORE.
    """
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
    if torch.is_autocast_enabled(x.device.type):
        return F.cross_entropy(F.linear(x, wte).float(), targets, ignore_index=IGNORE, reduction="sum")
    if not torch.is_grad_enabled():  # validation: the loss alone (a Function would still be asked for gradients)
        return _chunks(x, wte, targets, need_x=False, need_w=False)[0]
    return _ChunkedHeadLoss.apply(x, wte, targets)


def _chunks(x, wte, targets, need_x: bool, need_w: bool):
    """The summed loss, and the gradients asked for (else None) of x (N, C) and wte (V, C)."""
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if need_x else None  # (N, C)
    grad_w = torch.zeros_like(wte) if need_w else None  # (V, C)
    for s in range(0, x.shape[0], CHUNK_ROWS):
        xs, ts = x[s : s + CHUNK_ROWS], targets[s : s + CHUNK_ROWS]  # (n, C), (n,)
        valid = ts != IGNORE
        picked = ts.clamp(min=0)[:, None]  # (n, 1): any id for the ignored rows, zeroed below
        logp = torch.log_softmax((xs @ wte.T).float(), dim=1)  # (n, V)
        loss -= torch.where(valid, logp.gather(1, picked).squeeze(1), 0.0).sum()
        if need_x or need_w:
            # d(loss)/d(logits) = softmax - one-hot on the counted rows, 0 on the ignored ones.
            probs = logp.exp_()  # (n, V), in place of the log-probabilities
            probs.scatter_add_(1, picked, -torch.ones_like(probs[:, :1]))
            probs[~valid] = 0
            d_logits = probs.to(wte.dtype)
            if need_x:
                grad_x[s : s + CHUNK_ROWS] = d_logits @ wte
            if need_w:
                grad_w.addmm_(d_logits.T, xs)
    return loss, grad_x, grad_w


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wte, targets):  # x (N, C), wte (V, C), targets (N,)
        loss, grad_x, grad_w = _chunks(x, wte, targets, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_loss if grad_x is not None else None, grad_w * grad_loss if grad_w is not None else None, None)
