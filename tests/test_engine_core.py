"""The engine core (EngineCore: requests join a running batch) against running each request alone
and against the PyTorch reference (torch_generate): requests added while others generate, tokens
streamed per request, aborts freeing their slot at the next step, Engine.generate by turns with the
core, bad input. The same cases run on a GPU (marked cuda) and on the CUDA sources' CPU emulation
when it is built."""

from __future__ import annotations

import threading
import time

import pytest

from gpt_2_simple.engine import Engine, EngineCore, Request
from gpt_2_simple.torch_generate import generate_tokens
from test_engine import BYTES, _mixed_requests, _prompts, small  # noqa: F401  (small: the byte-vocabulary model fixture)
from test_engine_cuda import _emulated_module


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda), "cuda-emulated"])
def engine(request, small, monkeypatch):  # noqa: F811
    if request.param == "cpu":
        return Engine(small[1], backend="cpu")
    if request.param == "cuda":
        try:
            return Engine(small[1], backend="cuda")
        except RuntimeError as e:
            pytest.skip(str(e))
    module = _emulated_module()
    if module is None:
        pytest.skip("the CUDA emulation is not built (tests/cuda_emulation/README.md)")
    import gpt_2_simple

    monkeypatch.setitem(__import__("sys").modules, "gpt_2_simple._engine_cuda", module)
    monkeypatch.setattr(gpt_2_simple, "_engine_cuda", module, raising=False)
    return Engine(small[1], backend="cuda")


def _fits(requests, context):
    return [r for r in requests if len(r.prompt) + r.max_new_tokens - 1 <= context]


def test_requests_joining_a_running_batch_get_the_tokens_they_get_alone(small, engine):  # noqa: F811
    # On the CUDA backends 8 (twice the slots, so half join a running batch): the emulation is slow.
    requests = _mixed_requests(16 if engine.backend == "cpu" else 8, seed=3, max_new=30)
    alone = [engine.generate([r], batch_size=1)[0] for r in requests]
    with EngineCore(engine, max_batch=4) as core:
        streams = []
        for r in requests:  # added one by one while the earlier ones generate
            streams.append(core.stream(r))
            time.sleep(0.002)
        got = [(list(s), s.finish_reason) for s in streams]
        assert core.stats()["decode_tokens"] > 0
    assert got == [(a.tokens, a.finish_reason) for a in alone]
    if engine.backend == "cpu":  # the PyTorch reference with numpy's sampler
        assert [t for t, _ in got] == [r.tokens for r in generate_tokens(small[0], requests, batch_size=4)]


class _Gate:
    """An on_event handler that holds the core's loop at the request's first event until released,
    so a test can act between two steps; it records every event."""

    def __init__(self, on_finish=lambda: None):
        self.on_finish = on_finish
        self.events, self.first, self.release, self.done = [], threading.Event(), threading.Event(), threading.Event()

    def __call__(self, tokens, finish):
        self.events.append((tokens, finish))
        if finish:
            self.on_finish()
            self.done.set()
        if not self.first.is_set():
            self.first.set()
            assert self.release.wait(30)

    @property
    def tokens(self):
        return [t for tokens, _ in self.events for t in tokens]


def test_tokens_stream_per_request_while_others_run(engine):
    # A long request streams its tokens step by step; short ones added while it runs finish first.
    long = Request(_prompts([5], vocab=BYTES.n_vocab)[0], 50, temperature=1.0, seed=1)
    short = [Request(p, 3, temperature=0.0) for p in _prompts([3, 7, 2], seed=2, vocab=BYTES.n_vocab)]
    order = []
    gate = _Gate(on_finish=lambda: order.append("long"))

    def on_short(k):
        return lambda tokens, finish: order.append(k) if finish else None

    with EngineCore(engine, max_batch=4) as core:
        core.add(long, gate)
        assert gate.first.wait(30)  # the loop is held after the long request's first step
        for k, r in enumerate(short):
            core.add(r, on_short(k))
        gate.release.set()
        assert gate.done.wait(60)
    assert len(gate.tokens) == 50 and len(gate.events) >= 25  # a step's token at a time, not all at the end
    assert order[-1] == "long" and sorted(order[:-1]) == [0, 1, 2]


def test_abort_frees_the_slot_at_the_next_step(engine):
    # One slot: a long request holds it; aborting it lets the queued one run, with its own tokens.
    prompts = _prompts([4, 6], seed=4, vocab=BYTES.n_vocab)
    long = Request(prompts[0], BYTES.n_ctx - 4, temperature=1.0, seed=2)
    queued = Request(prompts[1], 10, temperature=0.8, top_k=20, seed=9, sample_index=3)
    expected = engine.generate([queued], batch_size=1)[0]
    with EngineCore(engine, max_batch=1, context=BYTES.n_ctx) as core:
        gate = _Gate()
        long_id = core.add(long, gate)
        assert gate.first.wait(30)  # the loop is held after the long request's first step
        second = core.stream(queued)
        assert core.stats()["queued"] == 1 and core.stats()["running"] == 1
        core.abort(long_id)
        gate.release.set()
        assert list(second) == expected.tokens and second.finish_reason == expected.finish_reason
        assert gate.done.wait(30) and gate.events[-1] == ([], "cancelled") and len(gate.tokens) == 1
        # Aborting a queued request drops it; aborting an ended or unknown one does nothing.
        gate = _Gate()
        blocker = core.add(long, gate)
        assert gate.first.wait(30)
        waiting = core.stream(queued)
        waiting.close()
        core.abort(long_id)
        core.abort(12345)
        gate.release.set()
        assert list(waiting) == [] and waiting.finish_reason == "cancelled"
        assert gate.done.wait(30) and gate.events[-1][1] == "length"
        core.abort(blocker)  # ended: nothing happens
        assert core.stats()["running"] == 0 and core.stats()["queued"] == 0


def test_engine_generate_and_the_core_take_turns(engine):
    requests = _mixed_requests(6, seed=5)
    expected = engine.generate(requests, batch_size=3)
    results = {}
    with EngineCore(engine, max_batch=2, context=BYTES.n_ctx) as core:
        fitting = _fits(requests, BYTES.n_ctx)
        t = threading.Thread(target=lambda: results.setdefault("core", core.generate(fitting)))
        t.start()
        results["generate"] = engine.generate(requests, batch_size=5)  # while the core runs
        t.join()
    assert results["generate"] == expected
    assert results["core"] == [e for r, e in zip(requests, expected) if r in fitting]


def test_close_drains_or_cancels(engine):
    r = Request(_prompts([3], vocab=BYTES.n_vocab)[0], 20, temperature=0.0)
    expected = engine.generate([r])[0].tokens
    core = EngineCore(engine, max_batch=2)
    s = core.stream(r)
    core.close(drain=True)
    assert list(s) == expected and s.finish_reason == "length"
    with pytest.raises(RuntimeError, match="shutting down"):
        core.add(r, lambda tokens, finish: None)
    # Without drain the rows still running end "cancelled" at the next step.
    core = EngineCore(engine, max_batch=2)
    gate = _Gate()
    core.add(Request(r.prompt, 60, temperature=0.0), gate)
    assert gate.first.wait(30)
    core.close(timeout=0)
    gate.release.set()
    assert gate.done.wait(30) and gate.events[-1] == ([], "cancelled") and gate.tokens == expected[:1]


def test_bad_requests_and_arguments(engine):
    with pytest.raises(ValueError, match="max_batch"):
        EngineCore(engine, max_batch=0)
    with pytest.raises(ValueError, match="context"):
        EngineCore(engine, context=BYTES.n_ctx + 1)
    with EngineCore(engine, max_batch=2, context=16) as core:
        with pytest.raises(ValueError, match=r"requests\[0\]\.max_new_tokens.*context of 16"):
            core.add(Request([1, 2, 3], 15), lambda *a: None)
        with pytest.raises(ValueError, match=r"requests\[0\]\.prompt must be in \[0, 256\]"):
            core.add(Request([BYTES.n_vocab], 1), lambda *a: None)
        # A consumer whose callback raises loses its request; the others go on.
        core.add(Request([1, 2], 10, temperature=0.0), lambda *a: 1 / 0)
        assert list(core.stream(Request([3], 5, temperature=0.0))) == engine.generate([Request([3], 5, temperature=0.0)])[0].tokens
        assert core.error is None
