"""The one definition of how a next token is drawn from logits (the reference for every backend).

``docs/sampling.md`` is the specification; this module implements it in numpy, and the C++ engine
(``csrc/engine/sampler.*``) and the CUDA engine implement the same steps, so the same request
gives the same tokens on every backend (up to float rounding at a draw's boundary, see the doc).

Per row: logits -> temperature -> top-k -> top-p -> draw; temperature 0 is argmax. The uniform
number of a draw comes from Philox4x32-10 keyed by ``(seed, sample_index, position)``, where
``position`` counts the tokens the row has generated so far, so a sample never depends on the
batch it shares or on the order of the requests. Everything here is a pure function of its inputs.
Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import numpy as np

__all__ = ["philox4x32", "uniform", "support", "probabilities", "sample_row", "sample"]

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key schedule increments (golden ratio, sqrt(3) - 1)
_MASK32 = 0xFFFFFFFF
_UINT64_LIMIT = 1 << 64


def philox4x32(counter, key) -> np.ndarray:
    """Philox4x32-10: ``counter`` (..., 4) and ``key`` (..., 2) uint32 words -> (..., 4) uint32 words."""
    c = np.asarray(counter, dtype=np.uint64) & _MASK32
    k = np.asarray(key, dtype=np.uint64) & _MASK32
    c0, c1, c2, c3 = (c[..., i] for i in range(4))
    k0, k1 = k[..., 0], k[..., 1]
    for _ in range(10):
        p0 = np.uint64(_PHILOX_M0) * c0  # full 64-bit products of two 32-bit words
        p1 = np.uint64(_PHILOX_M1) * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & np.uint64(_MASK32),
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & np.uint64(_MASK32),
        )
        k0 = (k0 + np.uint64(_PHILOX_W0)) & np.uint64(_MASK32)
        k1 = (k1 + np.uint64(_PHILOX_W1)) & np.uint64(_MASK32)
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def _u64(name: str, value) -> np.ndarray:
    v = np.asarray(value, dtype=object)
    flat = [int(x) for x in v.reshape(-1)]
    if any(x < 0 or x >= _UINT64_LIMIT for x in flat):
        raise ValueError(f"{name} must be in [0, 2**64), got {value!r}")
    return np.array(flat, dtype=np.uint64).reshape(v.shape)


def uniform(seed, sample_index, position) -> np.ndarray:
    """The uniform number in [0, 1) of draw ``position`` of sample ``sample_index`` under ``seed``.

    Key = (seed low 32 bits, seed high 32 bits); counter = (position low, position high,
    sample_index low, sample_index high); the result is the 53-bit double
    ``((r0 >> 5) * 2**26 + (r1 >> 6)) / 2**53`` of the first two output words. Arguments broadcast.
    """
    s, i, p = np.broadcast_arrays(_u64("seed", seed), _u64("sample_index", sample_index), _u64("position", position))
    lo = np.uint64(_MASK32)
    counter = np.stack([p & lo, p >> np.uint64(32), i & lo, i >> np.uint64(32)], axis=-1)
    key = np.stack([s & lo, s >> np.uint64(32)], axis=-1)
    r = philox4x32(counter, key).astype(np.uint64)
    hi26 = (r[..., 0] >> np.uint64(5)).astype(np.float64)
    lo27 = (r[..., 1] >> np.uint64(6)).astype(np.float64)
    return (hi26 * 67108864.0 + lo27) / 9007199254740992.0


def _check_params(vocab: int, temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0 = off), got {top_p!r}")
    if vocab < 1:
        raise ValueError("logits must hold at least one token")


def _rank_order(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of ``ids`` ordered by (logit descending, id ascending): the one ranking rule."""
    return np.lexsort((ids, -x[ids]))


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """The k best ids by the ranking rule, found by selection (no full sort), in ascending id order."""
    V = x.shape[0]
    if k == 0 or k >= V:
        return np.arange(V)
    threshold = np.partition(x, V - k)[V - k]  # the k-th largest logit
    above = np.flatnonzero(x > threshold)
    ties = np.flatnonzero(x == threshold)[: k - above.size]  # equal logits: lower ids first
    return np.sort(np.concatenate([above, ties]))


def support(logits, temperature: float, top_k: int = 0, top_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a draw can return and their unnormalised weights.

    ``logits`` (V,) float32. Returns ``(ids, weights)``: kept token ids in ascending order and their
    float32 weights ``exp(logit / temperature - max)`` (a weight may underflow to 0: such a token is
    kept but never drawn). Temperature 0 keeps the argmax alone (lowest id on ties), with weight 1.
    """
    x = np.array(logits, dtype=np.float32).reshape(-1)
    _check_params(x.shape[0], temperature, top_k, top_p)
    x[np.isnan(x)] = -np.inf  # a NaN logit is never drawn
    best = int(np.argmax(x))  # first maximum: lowest id on ties
    if temperature == 0.0:
        return np.array([best]), np.ones(1, dtype=np.float32)
    ids = _top_k_ids(x, top_k)
    z = x[ids] / np.float32(temperature)  # float32 division, as every backend does it
    m = z.max()
    if not np.isfinite(m):  # no finite logit, or one overflowed to +inf: fall back to argmax
        return np.array([best]), np.ones(1, dtype=np.float32)
    w = np.exp(z - m).astype(np.float32)
    if 0.0 < top_p < 1.0:
        order = _rank_order(x, ids)  # highest probability first, lower id first among equals
        mass = np.cumsum(w[order], dtype=np.float64)
        n_keep = int(np.searchsorted(mass, top_p * mass[-1], side="left")) + 1  # first prefix with mass >= p
        keep = np.sort(order[: min(n_keep, order.size)])
        ids, w = ids[keep], w[keep]
    return ids, w


def probabilities(logits, temperature: float, top_k: int = 0, top_p: float = 0.0) -> np.ndarray:
    """The distribution (V,) float64 a draw follows: :func:`support`'s weights normalised, 0 elsewhere."""
    x = np.asarray(logits).reshape(-1)
    ids, w = support(x, temperature, top_k, top_p)
    p = np.zeros(x.shape[0], dtype=np.float64)
    p[ids] = w.astype(np.float64) / w.astype(np.float64).sum()
    return p


def sample_row(logits, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """One draw given the uniform ``u`` in [0, 1): inverse CDF over the kept tokens in id order.

    The running float64 sum of the weights (ascending id) is compared with ``u * total``; the first
    token whose running sum exceeds it is drawn (the last kept token of nonzero weight if rounding
    leaves none).
    """
    ids, w = support(logits, temperature, top_k, top_p)
    if ids.size == 1:
        return int(ids[0])
    running = np.cumsum(w, dtype=np.float64)
    target = u * running[-1]
    i = int(np.searchsorted(running, target, side="right"))  # first running sum > target
    if i >= ids.size:
        i = int(np.flatnonzero(w)[-1])
    return int(ids[i])


def sample(logits, temperature, top_k, top_p, seed, sample_index, position) -> np.ndarray:
    """Draw one token per row. ``logits`` (B, V); every other argument is a scalar or a (B,) array
    (per-row parameters). Returns (B,) int64 token ids."""
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"logits must be (B, V), got shape {x.shape}")
    B = x.shape[0]
    temperature, top_k, top_p = (np.broadcast_to(np.asarray(a), (B,)) for a in (temperature, top_k, top_p))
    u = np.broadcast_to(uniform(seed, sample_index, position), (B,))
    return np.array(
        [sample_row(x[b], float(temperature[b]), int(top_k[b]), float(top_p[b]), float(u[b])) for b in range(B)],
        dtype=np.int64,
    )
