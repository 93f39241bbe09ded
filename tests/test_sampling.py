"""sampling.py, the reference sampler: Philox against Random123's published vectors, the kept set
and its distribution against an independent torch computation, sampled frequencies against the
exact distribution, and the properties the engines rely on (seeded, batch- and order-independent)."""

import numpy as np
import pytest
import torch

from gpt_2_simple import sampling

# Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors file).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in sampling.philox4x32(counter, key)) == expected


def test_uniform_recipe_and_keying():
    # The documented bit recipe, from the raw Philox words.
    seed, index, pos = 0x0123456789ABCDEF, 0xFEDCBA9876543210, 0x1122334455667788
    r = sampling.philox4x32(
        [pos & 0xFFFFFFFF, pos >> 32, index & 0xFFFFFFFF, index >> 32], [seed & 0xFFFFFFFF, seed >> 32]
    )
    expected = ((int(r[0]) >> 5) * 2**26 + (int(r[1]) >> 6)) / 2**53
    assert sampling.uniform(seed, index, pos) == expected
    # Each key component changes the number; the same key gives the same number.
    base = sampling.uniform(7, 3, 11)
    assert base == sampling.uniform(7, 3, 11)
    assert len({float(base), float(sampling.uniform(8, 3, 11)), float(sampling.uniform(7, 4, 11)), float(sampling.uniform(7, 3, 12))}) == 4
    with pytest.raises(ValueError, match="seed"):
        sampling.uniform(-1, 0, 0)
    with pytest.raises(ValueError, match="position"):
        sampling.uniform(0, 0, 2**64)


def test_uniform_is_uniform():
    u = sampling.uniform(1234, 5, np.arange(200_000))
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.bincount((u * 100).astype(int), minlength=100)
    chi2 = ((counts - 2000.0) ** 2 / 2000.0).sum()
    assert chi2 < 160  # 99 degrees of freedom: p < 1e-4 beyond this; deterministic for this key


def _torch_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """An independent float64 implementation of docs/sampling.md for logits without ties."""
    x = torch.from_numpy(logits.astype(np.float64))
    V = x.shape[0]
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < top_k < V:
        keep[:] = False
        keep[torch.topk(x, top_k).indices] = True
    probs = torch.where(keep, torch.softmax(torch.where(keep, x / temperature, -torch.inf), 0), 0.0)
    if 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above each
        nucleus = torch.zeros(V, dtype=torch.bool)
        nucleus[order[before < top_p]] = True  # kept while the mass before it is still short of p
        probs = torch.where(nucleus, probs, 0.0)
        probs = probs / probs.sum()
    return probs.numpy()


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 0.0), (0.7, 0, 0.0), (1.3, 40, 0.0), (1.0, 1, 0.0), (0.8, 0, 0.9), (1.0, 0, 0.5), (0.9, 100, 0.95), (1.0, 5000, 0.0), (2.0, 0, 1.0)],
)
def test_distribution_matches_independent_reference(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(5000) * 3).astype(np.float32)
    ours = sampling.probabilities(logits, temperature, top_k, top_p)
    theirs = _torch_distribution(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(ours > 0, theirs > 0)  # the support mask exactly
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = np.array([0.5, 2.0, -1.0, 2.0, 1.0], dtype=np.float32)
    for top_k, top_p in [(0, 0.0), (2, 0.0), (0, 0.3)]:
        assert sampling.sample(logits[None], 0.0, top_k, top_p, 0, 0, 0)[0] == 1
    ids, weights = sampling.support(logits, 0.0)
    assert ids.tolist() == [1] and weights.tolist() == [1.0]


def test_tie_rules_for_top_k_and_top_p():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0], dtype=np.float32)
    # Top-k ranks by logit, lower id first among equals.
    assert sampling.support(logits, 1.0, top_k=1)[0].tolist() == [1]
    assert sampling.support(logits, 1.0, top_k=3)[0].tolist() == [1, 2, 3]
    assert sampling.support(logits, 1.0, top_k=4)[0].tolist() == [1, 2, 3, 4]
    # Top-p keeps the shortest prefix of that ranking whose mass reaches p.
    p = sampling.probabilities(logits, 1.0)
    assert sampling.support(logits, 1.0, top_p=float(p[1]) * 0.5)[0].tolist() == [1]
    assert sampling.support(logits, 1.0, top_p=float(p[1] + p[3] + p[2]) * 0.999)[0].tolist() == [1, 2, 3]
    assert sampling.support(logits, 1.0, top_p=float(p[1] + p[3] + p[2]) * 1.001)[0].tolist() == [1, 2, 3, 4]


def test_nan_logits_are_never_drawn_and_non_finite_rows_fall_back_to_argmax():
    logits = np.array([np.nan, 0.0, 1.0, np.nan], dtype=np.float32)
    assert set(sampling.support(logits, 1.0)[0][sampling.support(logits, 1.0)[1] > 0].tolist()) == {1, 2}
    assert sampling.sample(np.array([[0.0, np.inf, 1.0]], dtype=np.float32), 1.0, 0, 0.0, 0, 0, 0)[0] == 1
    assert sampling.sample(np.full((1, 3), -np.inf, dtype=np.float32), 1.0, 0, 0.0, 0, 0, 0)[0] == 0


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.0), (0.6, 0, 0.0), (1.0, 4, 0.0), (1.0, 0, 0.8), (1.5, 6, 0.9)])
def test_sampled_frequencies_follow_the_distribution(temperature, top_k, top_p):
    logits = np.array([0.1, 1.2, -0.5, 2.0, 0.7, -2.0, 1.5, 0.0], dtype=np.float32)
    n = 20_000
    draws = sampling.sample(np.broadcast_to(logits, (n, 8)), temperature, top_k, top_p, 99, 3, np.arange(n))
    freq = np.bincount(draws, minlength=8)
    expected = sampling.probabilities(logits, temperature, top_k, top_p) * n
    assert np.all(freq[expected == 0] == 0)  # nothing outside the support, ever
    kept = expected > 0
    chi2 = ((freq[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    assert chi2 < 30  # <= 7 degrees of freedom: p ~ 1e-4 beyond this; deterministic for this seed


def test_inverse_cdf_draw_in_token_id_order():
    # Kept tokens in id order cover [0, 1) in consecutive intervals of their probabilities.
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    for u, expected in [(0.0, 0), (0.099, 0), (0.101, 1), (0.299, 1), (0.301, 2), (0.599, 2), (0.601, 3), (0.9999, 3)]:
        assert sampling.sample_row(logits, 1.0, 0, 0.0, u) == expected


def test_rows_are_independent_of_batch_and_order():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((20, 1000)).astype(np.float32) * 2
    params = dict(
        temperature=rng.uniform(0.0, 1.5, 20).round(1),
        top_k=rng.integers(0, 50, 20),
        top_p=rng.choice([0.0, 0.5, 0.9, 1.0], 20),
        seed=rng.integers(0, 2**63, 20, dtype=np.uint64),
        sample_index=np.arange(20),
        position=rng.integers(0, 1000, 20),
    )
    batched = sampling.sample(logits, **params)
    single = [sampling.sample(logits[b : b + 1], **{k: v[b] for k, v in params.items()})[0] for b in range(20)]
    assert batched.tolist() == single
    perm = rng.permutation(20)
    shuffled = sampling.sample(logits[perm], **{k: v[perm] for k, v in params.items()})
    assert shuffled.tolist() == batched[perm].tolist()
    # Same seed, same draws; another seed, other draws.
    assert sampling.sample(logits, **params).tolist() == batched.tolist()
    reseeded = sampling.sample(logits, **{**params, "seed": params["seed"] + np.uint64(1)})
    assert reseeded.tolist() != batched.tolist()


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p")],
)
def test_bad_parameters_are_value_errors(kwargs, match):
    args = dict(temperature=1.0, top_k=0, top_p=0.0) | kwargs
    with pytest.raises(ValueError, match=match):
        sampling.support(np.zeros(4, dtype=np.float32), **args)
