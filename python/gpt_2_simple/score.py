"""``score()``: how likely a model finds each text (mean token log-likelihood and perplexity).

Each text is scored as it would be generated from scratch: ``<|endoftext|>`` comes first as the
context, so every token of the text (the first included) is predicted and counted. Texts longer
than the context window are scored with overlapping windows that advance by ``stride`` tokens;
each token is counted once, in the first window that predicts it, with at least
``n_ctx - stride`` tokens of context (the method of the transformers perplexity guide).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["score", "TextScore"]


@dataclass(frozen=True)
class TextScore:
    """One text's score: ``log_likelihood`` is the mean natural-log probability per token (<= 0;
    higher is more likely), ``perplexity`` = exp(-log_likelihood), ``tokens`` the tokens scored."""

    log_likelihood: float
    perplexity: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def _windows(n: int, n_ctx: int, stride: int):
    """(begin, end, first target) of each window over a sequence of n tokens: the tokens
    [begin, end) are the input; targets first..end-1 are scored there."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            return


def score(
    sess,
    texts: str | list[str],
    *,
    run_name: str = "run1",
    checkpoint_dir: str = "checkpoint",
    model_name: str | None = None,
    model_dir: str = "models",
    batch_size: int = 4,
    stride: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> list[TextScore]:
    """Score ``texts`` (a string or a list of strings) under the session's model.

    Uses the model already in ``sess`` (after ``load_gpt2`` or ``finetune``); otherwise loads the
    run ``checkpoint_dir/run_name`` (or the downloaded ``model_dir/model_name``) as ``load_gpt2``
    does. ``stride`` (default n_ctx // 2) is how far the window moves over long texts;
    ``batch_size`` windows run together. Returns one ``TextScore`` per text, in order.
    """
    import torch
    from tqdm.auto import tqdm

    from .session import load_gpt2
    from .tokenizer import get_encoder

    if isinstance(texts, str):
        texts = [texts]
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("score() takes a string or a list of strings")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not sess.loaded:
        load_gpt2(sess, run_name=run_name, checkpoint_dir=checkpoint_dir, model_name=model_name, model_dir=model_dir)
    model = sess.model
    n_ctx = model.config.n_ctx
    stride = n_ctx // 2 if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride < n_ctx:  # windows must overlap by a token
        raise ValueError(f"stride must be between 1 and n_ctx - 1 ({n_ctx - 1}), got {stride!r}")
    if sess.threads > 0:
        torch.set_num_threads(sess.threads)
    if device is not None and torch.device(device) != next(model.parameters()).device:
        model = type(model)(model.config).to(device)
        model.load_state_dict(sess.model.state_dict())
    device = next(model.parameters()).device
    enc = get_encoder(sess.source if sess.source is not None and sess.source.is_dir() else None)

    # Every window of every text, longest first so a batch wastes little padding.
    seqs = [np.asarray([enc.eot_token] + enc.encode(t), dtype=np.int64) for t in texts]
    jobs = [(i, b, e, f) for i, s in enumerate(seqs) for b, e, f in _windows(len(s), n_ctx, stride)]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)
    totals = np.zeros(len(texts), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(jobs), batch_size), desc="Scoring", unit="batch", disable=not progress):
                batch = jobs[start : start + batch_size]
                width = max(e - b for _, b, e, _ in batch)
                x = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T), zero-padded on the right
                for row, (i, b, e, _) in enumerate(batch):
                    x[row, : e - b] = torch.from_numpy(seqs[i][b:e])
                logits = model(x.to(device))  # (B, T, V)
                for row, (i, b, e, first) in enumerate(batch):
                    scored = logits[row, first - b - 1 : e - b - 1].float()  # (targets, V): predictions of first..e-1
                    targets = torch.from_numpy(seqs[i][first:e]).to(device)
                    logp = scored.gather(1, targets[:, None])[:, 0] - torch.logsumexp(scored, dim=-1)
                    totals[i] += logp.double().sum().item()
    finally:
        model.train(was_training)
    counts = [len(s) - 1 for s in seqs]
    return [
        TextScore(log_likelihood=float(total / n) if n else 0.0, perplexity=math.exp(-total / n) if n else 1.0, tokens=n)
        for total, n in zip(totals, counts)
    ]
