"""The screened head (docs/engine.md): rows that keep only their top-k tokens take their logits from
an int8 screen plus exact logits of the tokens it cannot rule out. Its draws must be those of the
full head token for token, whatever the ties, bounds and batch; the reference is the same engine
with the screen turned off (GPT2S_SCREEN=0), whose head the logits tests check against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt_2_simple import _engine
from gpt_2_simple.engine import Engine, Request
from gpt_2_simple.export import export
from reference import TINY, random_gpt2

# The kernel tables with an int8 dot product (csrc/engine/simd.h, GPT2S_INT8_DOT).
SCREENED = {"avx512bf16", "avx2", "neondot"}
pytestmark = pytest.mark.skipif(_engine.cpu_features()["kernels"] not in SCREENED,
                                reason="the screen needs an int8 dot product: AVX512-VNNI with -BF16, AVX2, or NEON with sdot")

# Greedy, top-k 1 / 40 / 128 (the largest screened), with top-p, a tiny temperature (the sampler's
# argmax fallback), and a k the 50257-token head has too few panels for (not screened).
SETTINGS = [
    dict(temperature=1.0, top_k=40),
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=1),
    dict(temperature=1.3, top_k=128, top_p=0.9),
    dict(temperature=1e-30, top_k=5),
]


def _engines(path, monkeypatch):
    monkeypatch.setenv("GPT2S_SCREEN", "1")
    screened = Engine(path, backend="cpu")
    monkeypatch.setenv("GPT2S_SCREEN", "0")
    full = Engine(path, backend="cpu")
    return screened, full


def _requests(settings, n=6, new=16, vocab=TINY.n_vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(0, vocab, 1 + 5 * i).tolist(), new, seed=11, sample_index=i, **settings) for i in range(n)]


def _same_draws(screened, full, requests, batch_size):
    a = screened.generate(requests, batch_size=batch_size)
    drawn = screened.last_timings()["screened_rows"]
    b = full.generate(requests, batch_size=batch_size)
    assert full.last_timings()["screened_rows"] == 0
    assert [r.tokens for r in a] == [r.tokens for r in b]
    return drawn, sum(len(r.tokens) for r in a)


def _export(model, tmp_path, dtype):
    return export(model, tmp_path / f"m.{dtype}.bin", dtype, progress=False)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_screened_draws_equal_the_full_head(tmp_path, monkeypatch, dtype):
    screened, full = _engines(_export(random_gpt2(), tmp_path, dtype), monkeypatch)
    for settings in SETTINGS:
        for batch_size in (1, 6):
            drawn, total = _same_draws(screened, full, _requests(settings), batch_size)
            assert drawn == total  # every draw came through the screen


def test_models_screen_by_default(tmp_path, monkeypatch):
    model = random_gpt2()
    monkeypatch.delenv("GPT2S_SCREEN", raising=False)
    for dtype in ("fp32", "bf16"):
        e = Engine(_export(model, tmp_path, dtype), backend="cpu")
        e.generate(_requests(SETTINGS[0], n=1, new=3), batch_size=1)
        assert e.last_timings()["screened_rows"] > 0, dtype


def test_rows_wanting_every_logit_turn_the_screen_off(tmp_path, monkeypatch):
    screened, full = _engines(_export(random_gpt2(), tmp_path, "fp32"), monkeypatch)
    # top_k 0 (the default), top-p alone and top_k 1000 need the whole distribution; while such a
    # row is in the batch every row takes the full head, and the screen comes back once it is done.
    requests = _requests(SETTINGS[0], n=4, new=12)
    requests[1] = Request(requests[1].prompt, 4, temperature=0.9, seed=2)
    requests[2] = Request(requests[2].prompt, 6, temperature=0.9, top_p=0.8, seed=2)
    requests[3] = Request(requests[3].prompt, 5, temperature=0.9, top_k=1000, seed=2)
    drawn, total = _same_draws(screened, full, requests, 4)
    assert 0 < drawn < total
    # A logits hook sees every logit: no screen.
    seen = []
    screened.generate(_requests(SETTINGS[0], n=2, new=3), batch_size=2, on_logits=lambda i, s, x: seen.append(np.isfinite(x).all()))
    assert all(seen) and screened.last_timings()["screened_rows"] == 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ties_keep_the_lowest_ids(tmp_path, monkeypatch, dtype):
    # Every token's embedding row repeats 50 times over the vocabulary: each logit value is shared by
    # about 50 tokens, so a top-40 row keeps 40 of the 50 copies of its best rows, and the ids
    # decide which. The screen must hand the sampler every tied copy.
    model = random_gpt2()
    with torch.no_grad():
        wte = model.wte.weight
        wte.copy_(wte[torch.arange(wte.shape[0]) % 1000])
    screened, full = _engines(_export(model, tmp_path, dtype), monkeypatch)
    for settings in SETTINGS[:3]:
        drawn, total = _same_draws(screened, full, _requests(settings, n=4), 4)
        assert drawn == total


def test_unboundable_weights_fall_back_to_the_full_head(tmp_path, monkeypatch):
    # One embedding row so large that its norm overflows the bound: no screen, same draws.
    model = random_gpt2()
    with torch.no_grad():
        model.wte.weight[7] = 1e35
    screened, full = _engines(_export(model, tmp_path, "fp32"), monkeypatch)
    drawn, _ = _same_draws(screened, full, _requests(SETTINGS[0], n=2, new=4), 2)
    assert drawn == 0


def test_scaled_and_sparse_heads(tmp_path, monkeypatch):
    # Rows at very different scales (a loose bound for most tokens) and all-zero rows (scale 1, no
    # error): still the full head's draws, with the screen in use.
    model = random_gpt2()
    with torch.no_grad():
        wte = model.wte.weight
        scale = torch.logspace(-6, 3, wte.shape[0])[torch.randperm(wte.shape[0], generator=torch.Generator().manual_seed(0))]
        wte.mul_(scale[:, None])
        wte[::97] = 0.0
    screened, full = _engines(_export(model, tmp_path, "fp32"), monkeypatch)
    for settings in SETTINGS[:3]:
        drawn, total = _same_draws(screened, full, _requests(settings, n=3), 3)
        assert drawn == total


def _bf16_bits(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bf16_values(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).float().numpy()


BOUND_CASES = [("fp32", 100), ("bf16", 77), ("bf16", 64)]


@pytest.mark.parametrize("dtype,K", BOUND_CASES)
def test_bounds_hold_where_cauchy_schwarz_is_tight(dtype, K):
    check_bounds(_engine.screen_probe, dtype, K)


def check_bounds(probe, dtype, K):
    """probe(w, x): _engine.screen_probe here, or in another process (test_engine_aarch64.py)."""
    # Rows x along a token's quantization error d_v = w_v - s_v q_v make the screen's main error
    # term nearly exact (x . d_v ~ ||x|| ||d_v||): its bound must still hold, from above for w and,
    # through -w, from below. exact_logits must be the matmul's logits bit for bit, over odd widths.
    rng = np.random.default_rng(5)
    V = 700  # 8 panels, the last one partial
    w = (rng.standard_normal((V, K)) * np.exp(rng.uniform(-3, 3, (V, 1)))).astype(np.float32)
    if dtype == "bf16":
        w = _bf16_values(w)
    scale = (np.abs(w).max(1).astype(np.float64) / 127.0).astype(np.float32).astype(np.float64)
    d = w - scale[:, None] * np.clip(np.rint(w / scale[:, None]), -127, 127)
    # Integers up to 127 times a power of two: quantized without error (and exact in bf16), so the
    # bound's other terms add no slack and its first must cover nearly all of the real error.
    rows = [np.rint(d[v] / np.abs(d[v]).max() * 127) * 2.0**e for v, e in ((3, 4), (400, 12), (699, -10))]
    rows += [w[10] * 3, rng.standard_normal(K) * 2, np.zeros(K), np.r_[1e20, np.zeros(K - 1)]]
    x = np.array(rows, dtype=np.float32)
    if dtype == "bf16":
        x = _bf16_values(x)
    for sign in (1.0, -1.0):
        ws = (sign * w).astype(np.float32)
        out = probe(_bf16_bits(ws) if dtype == "bf16" else ws, x)
        assert out["ok"] and all(out["row_ok"])
        exact, full, upper = out["exact"], out["full"], out["upper"]
        assert np.array_equal(exact.view(np.uint32), full.view(np.uint32))
        assert (upper >= exact).all(), np.argwhere(upper < exact)[:5]
        if sign == 1.0:
            P = out["panel"]
            best = np.array([[exact[m, p * P:(p + 1) * P].max() for p in range(len(out["panel_lower"][0]))] for m in range(len(x))])
            assert (out["panel_lower"] <= best).all()
            # Each panel's best-bounded token (which the engine's tau is computed from) lies in its
            # panel and has a logit at or above the panel's lower bound.
            tokens = out["panel_best"]
            panel_of = np.arange(tokens.shape[1])[None, :]
            assert ((tokens // P == panel_of) & (tokens < V)).all()
            assert (np.take_along_axis(exact, tokens, 1) >= out["panel_lower"]).all()
    # A row the bound cannot cover (an infinite input) is flagged, not screened.
    assert list(probe(w if dtype == "fp32" else _bf16_bits(w), np.full((1, K), np.inf, np.float32))["row_ok"]) == [False]
