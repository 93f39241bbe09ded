"""torch_generate, the PyTorch reference generator: greedy against transformers, the sliding window
and sampling against a cache-free recomputation, stops, callbacks and batch independence."""

import numpy as np
import pytest
import torch

from gpt_2_simple import sampling
from gpt_2_simple.engine import Request, Result
from gpt_2_simple.torch_generate import generate_tokens, window_size
from reference import TINY, random_gpt2, to_transformers


@pytest.fixture(scope="module")
def model():
    return random_gpt2()


def _prompts(n, seed=0, lengths=(1, 5, 9, 16)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TINY.n_vocab, lengths[i % len(lengths)]).tolist() for i in range(n)]


def _naive(model, request: Request) -> list[int]:
    """The engine contract recomputed without a KV cache: a full forward over the current window for
    every token, then the sampler on the last logits."""
    n_ctx = model.config.n_ctx
    context, window, out = list(request.prompt), list(request.prompt), []
    while len(out) < request.max_new_tokens:
        with torch.no_grad():
            logits = model(torch.tensor([window]))[0, -1].numpy()
        token = int(sampling.sample(logits[None], request.temperature, request.top_k, request.top_p, request.seed, request.sample_index, len(out))[0])
        if token in request.stop_ids:
            break
        out.append(token)
        context.append(token)
        window = context[-window_size(n_ctx):] if len(window) == n_ctx else window + [token]
    return out


def test_greedy_equals_transformers_greedy(model):
    pytest.importorskip("transformers")
    hf = to_transformers(model)
    prompts = _prompts(4, lengths=(3, 7))
    ours = generate_tokens(model, [Request(p, 30, temperature=0.0) for p in prompts], batch_size=2)
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0,
            )
        assert result.tokens == out[0, len(prompt):].tolist()
        assert result.finish_reason == "length"


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 0.0), (1.0, 0, 0.0), (0.8, 40, 0.0), (1.0, 0, 0.9)])
def test_matches_cache_free_recomputation_past_the_context(model, temperature, top_k, top_p):
    # 10 + 90 tokens in a 64-token context: the window slides twice (at 64 tokens, to 32, then again
    # at 64), so the second slide starts from a slid cache.
    request = Request(_prompts(1, seed=3, lengths=(10,))[0], 90, temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    assert generate_tokens(model, [request])[0].tokens == _naive(model, request)


def test_full_length_prompt_slides_at_once(model):
    request = Request(_prompts(1, seed=4, lengths=(TINY.n_ctx,))[0], 5, temperature=0.0)
    assert generate_tokens(model, [request])[0].tokens == _naive(model, request)


def test_samples_do_not_depend_on_batch_size_or_order(model):
    prompts = _prompts(10, seed=1)
    requests = [Request(p, 12, temperature=0.9, top_k=[0, 20][i % 2], top_p=[0.0, 0.95][i % 3 == 0], seed=42, sample_index=i) for i, p in enumerate(prompts)]
    one = generate_tokens(model, requests, batch_size=1)
    many = generate_tokens(model, requests, batch_size=10)
    order = np.random.default_rng(0).permutation(10)
    shuffled = generate_tokens(model, [requests[i] for i in order], batch_size=4)
    assert [r.tokens for r in many] == [r.tokens for r in one]
    assert [shuffled[j].tokens for j in np.argsort(order)] == [r.tokens for r in one]
    assert one[0].tokens != one[2].tokens  # different sample indices give different samples


def test_stop_ids_and_stop_sequences(model):
    prompt = _prompts(1, seed=2, lengths=(6,))[0]
    base = generate_tokens(model, [Request(prompt, 20, temperature=1.0, seed=9)])[0].tokens
    # Distinct byte strings per token, so the expected cut is easy to compute.
    token_bytes = [f"<{i}>".encode() for i in range(TINY.n_vocab)]
    stop_at = next(j for j in range(3, 20) if base[j] not in base[:j])
    r = generate_tokens(model, [Request(prompt, 20, temperature=1.0, seed=9, stop_ids=[base[stop_at]])], token_bytes=token_bytes)[0]
    assert r == Result(base[:stop_at], "stop_token")
    # A sequence straddling tokens 4 and 5: the row ends with token 5, included.
    text = b"".join(token_bytes[t] for t in base)
    end4 = len(b"".join(token_bytes[t] for t in base[:5]))
    seq = text[end4 - 2 : end4 + 2]
    first = next(j for j in range(20) if len(b"".join(token_bytes[t] for t in base[: j + 1])) >= text.find(seq) + len(seq))
    assert first == 5
    r = generate_tokens(model, [Request(prompt, 20, temperature=1.0, seed=9, stop_sequences=[b"never", seq])], token_bytes=token_bytes)[0]
    assert r == Result(base[: first + 1], "stop_sequence")
    # Sequences appearing only in the prompt do not count.
    r = generate_tokens(model, [Request(prompt, 20, temperature=1.0, seed=9, stop_sequences=["".join(f"<{t}>" for t in prompt[:2])])], token_bytes=token_bytes)[0]
    assert r == Result(base, "length")


def test_callbacks_and_zero_length(model):
    requests = [Request(p, n, temperature=1.0, seed=i) for i, (p, n) in enumerate(zip(_prompts(3, seed=5), [4, 0, 7]))]
    tokens, finished, logits_steps = {}, {}, {}
    results = generate_tokens(
        model, requests, batch_size=3,
        on_token=lambda i, t: tokens.setdefault(i, []).append(t),
        on_finish=lambda i, r: finished.setdefault(i, r),
        on_logits=lambda i, step, x: logits_steps.setdefault(i, []).append((step, x.shape, x.dtype)),
    )
    assert results[1] == Result([], "length")
    assert set(finished) == {0, 1, 2} and [finished[i] for i in range(3)] == results
    assert tokens == {0: results[0].tokens, 2: results[2].tokens}
    assert [s for s, _, _ in logits_steps[2]] == list(range(7))
    assert logits_steps[0][0][1:] == ((TINY.n_vocab,), np.float32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=[]), r"prompt is empty"),
        (dict(prompt=[TINY.n_vocab]), r"requests\[0\].prompt holds 50257"),
        (dict(prompt=[0] * (TINY.n_ctx + 1)), "more than the model's context"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=2.0), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(stop_sequences=[b""]), "stop_sequences"),
    ],
)
def test_bad_requests_are_value_errors(model, kwargs, match):
    fields = dict(prompt=[1, 2], max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=match):
        request = Request(**{k: fields[k] for k in ("prompt", "max_new_tokens")})
        for k, v in fields.items():
            setattr(request, k, v)  # bypass the constructor's check: generate_tokens checks again
        generate_tokens(model, [request])
    with pytest.raises(ValueError, match="batch_size"):
        generate_tokens(model, [Request([1], 1)], batch_size=0)
