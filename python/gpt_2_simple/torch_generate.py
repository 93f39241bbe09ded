"""Token generation with the PyTorch model: the reference the engines are tested against.

Same contract as the engine (``engine.Request`` in, ``engine.Result`` out, docs/design.md "Engine")
and the same sampling (``sampling.py``), on ``model.py`` with its KV cache. Training uses it for the
samples it prints, and the benchmark harness (``benchmark/generation.py``) times it as the plain PyTorch KV-cached loop.

Rows run in lockstep batches of requests with the same prompt length (model.py has no padding
mask, and equal lengths need none); a finished row leaves its batch and stops costing compute.
Because every draw is keyed by (seed, sample_index, position), the grouping never changes a sample.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from . import sampling
from .engine import Request, Result, check_request
from .model import GPT2

__all__ = ["generate_tokens", "window_size"]


def window_size(n_ctx: int) -> int:
    """Tokens a row keeps when its context is full and it needs another token (docs/design.md)."""
    return max(1, n_ctx // 2)


def _default_token_bytes(n_vocab: int) -> Sequence[bytes]:
    from .tokenizer import get_encoder

    table = get_encoder().token_bytes
    return [table.get(i, b"") for i in range(n_vocab)]


class _Row:
    """One request in flight: its whole context (for the sliding window) and what it generated."""

    def __init__(self, index: int, request: Request):
        self.index = index
        self.request = request
        self.context = list(request.prompt)
        self.result = Result(tokens=[], finish_reason="length")
        self.text = bytearray()  # bytes of the generated tokens, for stop sequences

    def accept(self, token: int, token_bytes: Sequence[bytes]) -> bool:
        """Record a drawn token; True when the row is finished."""
        req = self.request
        if token in req.stop_ids:
            self.result.finish_reason = "stop_token"
            return True
        self.result.tokens.append(token)
        self.context.append(token)
        if req.stop_sequences:
            before = len(self.text)
            self.text += token_bytes[token]
            for s in req.stop_sequences:
                # Only a match ending in the new bytes is new: earlier ones were checked already.
                if self.text.find(s, max(0, before - len(s) + 1)) != -1:
                    self.result.finish_reason = "stop_sequence"
                    return True
        return len(self.result.tokens) >= req.max_new_tokens


@torch.inference_mode()
def generate_tokens(
    model: GPT2,
    requests: Sequence[Request],
    *,
    batch_size: int = 1,
    token_bytes: Sequence[bytes] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    on_finish: Callable[[int, Result], None] | None = None,
    on_logits: Callable[[int, int, np.ndarray], None] | None = None,
) -> list[Result]:
    """Generate for every request with ``model`` (KV-cached); results in request order.

    ``batch_size`` rows run together. ``token_bytes[i]`` are the bytes of token ``i`` (stop
    sequences are matched on bytes); by default GPT-2's tokenizer. Callbacks as in
    ``Engine.generate``: ``on_token(i, token)``, ``on_finish(i, result)``, ``on_logits(i, step,
    logits)`` with the float32 logits (V,) that drew token number ``step`` of request ``i``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = model.config
    for i, r in enumerate(requests):
        check_request(r, config.n_vocab, config.n_ctx, name=f"requests[{i}]")
    if token_bytes is None and any(r.stop_sequences for r in requests):
        token_bytes = _default_token_bytes(config.n_vocab)
    device = next(model.parameters()).device

    rows = [_Row(i, r) for i, r in enumerate(requests)]
    for row in rows:
        if row.request.max_new_tokens == 0 and on_finish:
            on_finish(row.index, row.result)
    pending = sorted((row for row in rows if row.request.max_new_tokens > 0), key=lambda row: len(row.context))
    while pending:
        # The next lockstep batch: up to batch_size rows with the same prompt length.
        length = len(pending[0].context)
        batch = [row for row in pending if len(row.context) == length][:batch_size]
        taken = {id(row) for row in batch}
        pending = [row for row in pending if id(row) not in taken]
        _run_batch(model, batch, device, token_bytes, on_token, on_finish, on_logits)
    return [row.result for row in rows]


def _run_batch(model, batch, device, token_bytes, on_token, on_finish, on_logits) -> None:
    n_ctx = model.config.n_ctx
    feed = torch.tensor([row.context for row in batch], dtype=torch.long, device=device)  # (B, T)
    past = None
    while batch:
        logits, past = model(feed, past=past, use_cache=True)
        last = logits[:, -1, :].float().cpu().numpy()  # (B, V)
        if on_logits:
            for j, row in enumerate(batch):
                on_logits(row.index, len(row.result.tokens), last[j])
        reqs = [row.request for row in batch]
        drawn = sampling.sample(
            last,
            [r.temperature for r in reqs],
            [r.top_k for r in reqs],
            [r.top_p for r in reqs],
            [r.seed for r in reqs],
            [r.sample_index for r in reqs],
            [len(row.result.tokens) for row in batch],  # position: tokens this row generated so far
        )
        keep = []
        for j, row in enumerate(batch):
            token = int(drawn[j])
            done = row.accept(token, token_bytes)
            if token not in row.request.stop_ids and on_token:
                on_token(row.index, token)
            if done:
                if on_finish:
                    on_finish(row.index, row.result)
            else:
                keep.append(j)
        if len(keep) < len(batch):
            batch = [batch[j] for j in keep]
            if not batch:
                return
            index = torch.tensor(keep, device=device)
            past = [(k.index_select(0, index), v.index_select(0, index)) for k, v in past]
        if past[0][0].shape[2] >= n_ctx:
            # Context full: keep the last window of every row and re-prefill it at positions 0...
            keep_n = window_size(n_ctx)
            feed = torch.tensor([row.context[-keep_n:] for row in batch], dtype=torch.long, device=device)
            past = None
        else:
            feed = torch.tensor([[row.context[-1]] for row in batch], dtype=torch.long, device=device)  # (B, 1)
