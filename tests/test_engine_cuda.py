"""The CUDA engine (csrc/cuda) against the PyTorch model, the CPU engine and sampling.py.

Every engine test runs twice: on the real module with a GPU (marked ``cuda``, skipped without one)
and on the CPU emulation of the same CUDA sources (tests/cuda_emulation/README.md: the kernels,
cuBLAS calls and CUDA graphs run on host threads), skipped unless that test build exists. The
emulation is slow, so the cases are small; the GPU-only test at the end uses GPT-2's real size.
Without either, the tests of the backend choice still run: 'auto' falls back to the CPU (with a
one-line notice when a CUDA build exists but cannot run) and 'cuda' says what is missing.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import gpt_2_simple
from gpt_2_simple import sampling
from gpt_2_simple.config import GPT2Config
from gpt_2_simple.engine import Engine, Request, Result
from gpt_2_simple.export import export
from gpt_2_simple.torch_generate import generate_tokens
from reference import random_gpt2

# The CPU engine's test helpers: the byte-level vocabulary (fast), prompts, request mixes, sampler rows.
from test_engine import BYTES, TOKEN_BYTES, _byte_tokenizer, _draw_args, _mixed_requests, _prompts, _sampler_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32 on the GPU uses fp32 cuBLAS (no TF32) and fp32 attention: as tight as the CPU engine.
# bf16/fp16: weights, KV cache and GEMM inputs rounded to the storage type (docs/cuda.md).
TOLERANCE = {"fp32": dict(atol=1e-4, rtol=1e-4), "bf16": dict(atol=3e-2, rtol=0.0), "fp16": dict(atol=5e-3, rtol=0.0)}


def _emulated_module():
    """The CPU emulation of _engine_cuda, if a test build made it (GPT2S_CUDA_EMULATION=ON)."""
    paths = [os.environ["GPT2S_CUDA_EMULATION_MODULE"]] if os.environ.get("GPT2S_CUDA_EMULATION_MODULE") else []
    # The newest build when there are several build folders.
    paths += sorted(glob.glob(os.path.join(ROOT, "build", "*", "cuda_emulation", "_engine_cuda*.so")), key=os.path.getmtime, reverse=True)
    for path in paths:
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_engine_cuda", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


@pytest.fixture(scope="module", params=[pytest.param("gpu", marks=pytest.mark.cuda), "emulated"])
def cuda_module(request):
    """The _engine_cuda module under test: the real one on a GPU, or the CPU emulation."""
    if request.param == "gpu":
        try:
            from gpt_2_simple import _engine_cuda as module
        except ImportError as e:
            pytest.skip(f"_engine_cuda is not built here ({e})")
        devices, reason = module.cuda_status()
        if devices < 1:
            pytest.skip(f"CUDA cannot run here: {reason}")
    else:
        module = _emulated_module()
        if module is None:
            pytest.skip("the CUDA emulation is not built (tests/cuda_emulation/README.md)")
    return module


@pytest.fixture
def cuda_backend(cuda_module, monkeypatch):
    """Engine(backend='cuda') runs on `cuda_module` (the emulation is put in place of the real module)."""
    monkeypatch.setitem(sys.modules, "gpt_2_simple._engine_cuda", cuda_module)
    monkeypatch.setattr(gpt_2_simple, "_engine_cuda", cuda_module, raising=False)
    return cuda_module


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model, fp32 file, bf16 file) with the byte vocabulary."""
    folder = tmp_path_factory.mktemp("cuda_bytes")
    model = random_gpt2(BYTES, seed=2)
    tok = _byte_tokenizer(folder / "tok")
    files = {dtype: export(model, folder / f"bytes.{dtype}.bin", dtype, tokenizer_dir=tok, progress=False) for dtype in ("fp32", "bf16")}
    return model, files


def _rounded(model, dtype: str):
    """model.py (computing in fp32) with the weights a device of this dtype holds: matrices and
    embeddings rounded to bf16 or fp16, LayerNorms and biases kept in fp32."""
    if dtype == "fp32":
        return model
    rounded = random_gpt2(model.config)
    storage = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with torch.no_grad():
        for (name, p), (_, src) in zip(rounded.named_parameters(), model.named_parameters()):
            is_weight = name.endswith("weight") and ".ln_" not in name and not name.startswith("ln_f")
            p.copy_(src.to(storage).float() if is_weight else src)
    return rounded


@pytest.mark.parametrize("file_dtype,device_dtype", [("fp32", ""), ("bf16", ""), ("fp32", "fp16"), ("fp32", "bf16")])
@pytest.mark.parametrize("graphs", [True, False])
def test_logits_match_pytorch_at_every_step(cuda_module, small, file_dtype, device_dtype, graphs):
    # Prompts of different lengths prefilled in one packed step, then decoded together (three rows:
    # the decode graph of bucket 4 runs one padding row); the 33-token prompt has two chunks' worth
    # of positions on the 64-token context. Every step's logits against model.py.
    model, files = small
    engine = cuda_module.Engine(str(files[file_dtype]), dtype=device_dtype, graphs=graphs)
    dtype = device_dtype or file_dtype
    assert f", {dtype}" in engine.device
    prompts = _prompts([1, 20, 33], vocab=BYTES.n_vocab)
    requests = [Request(p, 10, temperature=1.0, seed=3, sample_index=i) for i, p in enumerate(prompts)]
    logits = {}
    out = engine.generate(requests, batch_size=3, on_logits=lambda i, s, x: logits.__setitem__((i, s), x.copy()))
    reference = _rounded(model, dtype)
    for i, (prompt, (tokens, reason)) in enumerate(zip(prompts, out)):
        assert len(tokens) == 10 and reason == "length"
        with torch.no_grad():
            expected = reference(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 :].numpy()
        for step in range(10):
            np.testing.assert_allclose(logits[(i, step)], expected[step], **TOLERANCE[dtype], err_msg=f"row {i} step {step}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_steps_of_many_rows_match_pytorch(cuda_module, small, dtype):
    # Decode steps of up to 8 rows run decode.cuh's fused products; 10 rows take cuBLAS and the
    # general kernels (captured in the bucket-16 graph): every step's logits against model.py.
    model, files = small
    engine = cuda_module.Engine(str(files[dtype]))
    prompts = _prompts([1 + 3 * i for i in range(10)], vocab=BYTES.n_vocab)
    logits = {}
    out = engine.generate([Request(p, 4, temperature=1.0, seed=5, sample_index=i) for i, p in enumerate(prompts)],
                          batch_size=10, on_logits=lambda i, s, x: logits.__setitem__((i, s), x.copy()))
    reference = _rounded(model, dtype)
    for i, (prompt, (tokens, _)) in enumerate(zip(prompts, out)):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 :].numpy()
        for step in range(4):
            np.testing.assert_allclose(logits[(i, step)], expected[step], **TOLERANCE[dtype], err_msg=f"row {i} step {step}")


def test_long_contexts_split_attention(cuda_module, tmp_path):
    # Positions past 2 x kAttnSplit (128): every query's attention is cut into up to 3 splits that
    # attention_combine merges, in the prefill of a 300-token prompt and in the decode steps after it.
    config = GPT2Config(n_vocab=257, n_ctx=320, n_embd=64, n_head=2, n_layer=1)
    model = random_gpt2(config, seed=5)
    path = export(model, tmp_path / "long.bin", "fp32", tokenizer_dir=_byte_tokenizer(tmp_path / "tok"), progress=False)
    prompts = _prompts([300, 129], seed=6, vocab=config.n_vocab)
    logits = {}
    out = cuda_module.Engine(str(path)).generate(
        [Request(p, 6, temperature=0.0) for p in prompts], batch_size=2, on_logits=lambda i, s, x: logits.__setitem__((i, s), x.copy()))
    for i, (prompt, (tokens, _)) in enumerate(zip(prompts, out)):
        with torch.no_grad():
            expected = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 :].numpy()
        for step in range(6):
            np.testing.assert_allclose(logits[(i, step)], expected[step], **TOLERANCE["fp32"], err_msg=f"row {i} step {step}")


def test_a_failed_graph_capture_falls_back_to_eager_steps(cuda_module, small, monkeypatch):
    # Where a driver refuses to capture the decode step, generation goes on without graphs and
    # gives the same tokens (only the emulation can make a capture fail on purpose).
    if "emulation" not in cuda_module.device_info(0)["name"]:
        pytest.skip("needs the emulation's GPT2S_CUDA_EMULATION_FAIL_CAPTURE")
    _, files = small
    requests = _mixed_requests(5, seed=11, max_new=12)
    expected = cuda_module.Engine(str(files["fp32"])).generate(requests, batch_size=3)
    monkeypatch.setenv("GPT2S_CUDA_EMULATION_FAIL_CAPTURE", "1")
    engine = cuda_module.Engine(str(files["fp32"]))
    assert engine.generate(requests, batch_size=3) == expected
    assert "off: capture failed" in engine.device


def test_greedy_equals_pytorch_past_the_context(cuda_backend, small):
    # 40 + 60 tokens in a 64-token context: the window slides twice (re-prefill at positions 0..).
    model, files = small
    engine = Engine(files["fp32"], backend="cuda")
    assert engine.backend == "cuda"
    requests = [Request(p, 60, temperature=0.0) for p in _prompts([10, 40], seed=1, vocab=BYTES.n_vocab)]
    assert [r.tokens for r in engine.generate(requests, batch_size=2)] == [r.tokens for r in generate_tokens(model, requests)]


def test_samples_equal_the_cpu_engine_and_pytorch_whatever_the_batch(cuda_backend, small):
    # Mixed parameters and lengths: rows finish at different steps, slots refill at once, decode
    # steps run at batch sizes that need padding rows (graph buckets). The same draws as the CPU
    # engine at another batch size and as the PyTorch reference (fp32: agreement is exact barring
    # float-rounding ties).
    model, files = small
    requests = _mixed_requests(10, seed=3, max_new=24)
    five = Engine(files["fp32"], backend="cuda").generate(requests, batch_size=5)
    assert Engine(files["fp32"], backend="cpu").generate(requests, batch_size=3) == five
    assert [r.tokens for r in five] == [r.tokens for r in generate_tokens(model, requests, batch_size=4)]


def test_shared_prefixes_copied_on_the_device(cuda_backend, small):
    # Rows of one prompt (and one sharing part of it) take the shared positions by copy_kv, in
    # slots refilled while others decode too: the same tokens as the CPU engine and PyTorch.
    model, files = small
    p = _prompts([14], seed=6, vocab=BYTES.n_vocab)[0]
    prompts = [p] * 5 + [p[:9] + [(t + 1) % 256 for t in p[9:]]] * 2
    requests = [Request(x, 4 + 3 * i % 11, temperature=1.0, top_k=40, seed=2, sample_index=i) for i, x in enumerate(prompts)]
    engine = Engine(files["fp32"], backend="cuda")
    ours = engine.generate(requests, batch_size=3)
    t = engine.last_timings()
    assert t["shared_tokens"] >= 3 * 13 and t["prefill_tokens"] + t["shared_tokens"] == sum(len(x) for x in prompts)
    assert ours == Engine(files["fp32"], backend="cpu").generate(requests, batch_size=1)
    assert [r.tokens for r in ours] == [r.tokens for r in generate_tokens(model, requests, batch_size=4)]


def test_many_rows_finishing_at_different_steps(cuda_backend, small):
    # A longer run: 18 requests of 1..40 new tokens through 5 slots, a third ending on a stop id and
    # a third on a stop sequence taken from their free-running output; every result equals the CPU
    # engine's (same scheduler, same draws) and rows end in a different order than they started.
    _, files = small
    cpu = Engine(files["fp32"], backend="cpu")
    free = _mixed_requests(18, seed=9, max_new=40)
    requests = []
    for i, (r, out) in enumerate(zip(free, cpu.generate(free, batch_size=5))):
        cut = out.tokens[len(out.tokens) // 2 :]
        stops = {}
        if i % 3 == 0 and cut:
            stops = dict(stop_ids=[cut[0]])
        elif i % 3 == 1 and len(cut) >= 2:
            stops = dict(stop_sequences=[bytes(cut[:2]) if max(cut[:2]) < 256 else b"\xff\xfe"])
        requests.append(Request(r.prompt, r.max_new_tokens, r.temperature, r.top_k, r.top_p, r.seed, r.sample_index, **stops))
    finished = []
    ours = Engine(files["fp32"], backend="cuda").generate(requests, batch_size=5, on_finish=lambda i, r: finished.append(i))
    assert ours == cpu.generate(requests, batch_size=5)
    assert sorted(finished) == list(range(18)) and finished != list(range(18))
    assert {r.finish_reason for r in ours} == {"length", "stop_token", "stop_sequence"}


def test_stops_callbacks_and_timings(cuda_backend, small):
    model, files = small
    engine = Engine(files["bf16"], backend="cuda")
    prompt = _prompts([6], seed=4, vocab=BYTES.n_vocab)[0]
    tokens = engine.generate([Request(prompt, 30, temperature=1.0, seed=9)])[0].tokens
    text = b"".join(TOKEN_BYTES[t] for t in tokens)
    stop_id = next(t for j, t in enumerate(tokens) if j >= 5 and t not in tokens[:j])
    seq = text[8:11]
    seen = []
    out = engine.generate(
        [Request(prompt, 30, temperature=1.0, seed=9, stop_ids=[stop_id]), Request(prompt, 30, temperature=1.0, seed=9, stop_sequences=[seq])],
        batch_size=2, on_token=lambda i, t: seen.append((i, t)),
    )
    assert out[0] == Result(tokens[: tokens.index(stop_id)], "stop_token")
    assert out[1] == Result(tokens[: text.find(seq) + len(seq)], "stop_sequence")
    assert [t for i, t in seen if i == 0] == out[0].tokens and [t for i, t in seen if i == 1] == out[1].tokens
    engine.generate([Request([1, 2, 3], 8, temperature=0.0), Request([4], 8, temperature=0.0)], batch_size=2)
    t = engine.last_timings()
    assert t["prefill_tokens"] == 4 and t["decode_tokens"] == 2 * 7 and t["decode_steps"] == 7
    assert 0 < t["decode_sample_seconds"] < t["decode_seconds"] < t["total_seconds"]
    # bf16 cache: (K, V) x layers x (2 slots + 1 scratch slot) x (3 + 8 - 1 positions) x C x 2 bytes
    assert t["kv_cache_bytes"] == 2 * BYTES.n_layer * (2 + 1) * (3 + 8 - 1) * BYTES.n_embd * 2
    assert "cuda:" in engine.device and "ms/token" in engine.timing_summary()


def _check_draws(cuda_module, logits, params, rng):
    # Every draw and every support mask of the GPU sampler equal sampling.py's.
    t, k, p, seed, index, position = _draw_args(params, rng)
    drawn, mask = cuda_module.sample(logits, t, k, p, seed, index, position, support=True)
    assert drawn.tolist() == sampling.sample(logits, t, k, p, seed, index, position).tolist()
    for b in range(len(params)):
        ids, _ = sampling.support(logits[b], t[b], int(k[b]), p[b])
        assert np.flatnonzero(mask[b]).tolist() == ids.tolist(), (b, params[b])


@pytest.mark.parametrize("V", [1, 33, 1000, 50257])
def test_sampler_equals_sampling_py_draw_for_draw(cuda_module, V):
    # The GPU sampler on logits from the host: every draw and every support mask equal sampling.py's
    # for the same logits and the same (seed, sample_index, position), i.e. the same uniform number.
    rng = np.random.default_rng(V)
    for _ in range(2 if V < 50257 else 1):
        logits, params = _sampler_cases(rng, V, 12)
        _check_draws(cuda_module, logits, params, rng)


def test_top_k_rows_take_every_road_and_draw_as_sampling_py(cuda_module):
    # sampler.cuh has two roads for top-k rows: the short road (k <= 1024, when the k-th best of
    # the threads' own bests gathers at most 1024 tokens) and the radix select over the whole row.
    # Rows built to take each, on GPT-2's vocabulary size, with ties across the k-th best.
    V = 50257
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((12, V)) * 2).astype(np.float32)
    logits[2] = 1.5  # every token tied
    logits[3, : V // 2] = 7.0  # 25,000 tied best tokens
    logits[5] = rng.integers(-3, 3, V)  # ties across the k-th best
    logits[6, rng.choice(V, 30, replace=False)] = 12.0  # 30 clear winners, then the crowd
    logits[9] = np.sort(logits[9])  # the best tokens all at the end of the row
    params = [
        (1.0, 40, 0.0), (0.7, 40, 0.9), (1.0, 40, 0.0), (1.0, 40, 0.5), (1.0, 128, 0.0), (1.2, 1, 1e-6),  # short
        (0.8, 40, 0.999), (1.0, 129, 0.0), (0.9, 500, 0.95), (1.0, 100, 0.0),  # short
        (1.0, 1000, 0.0), (1.0, 2000, 0.95),  # the bound gathers too many; k > 1024: radix select
    ]
    _check_draws(cuda_module, logits, params, rng)
    flat = np.full((2, V), 1.5, np.float32)  # all tied: the bound falls among ids, the lowest win
    _check_draws(cuda_module, flat, [(1.0, 500, 0.0), (0.5, 1024, 0.9)], rng)


def test_short_road_bound_edges(cuda_module):
    # The bound is the k-th best of the 1024 threads' own bests (thread t reads ids t, t + 1024, ...).
    # Rows where the best tokens crowd into few threads, so the bound lies far below the k-th best
    # and many more than k are gathered; rows where few tokens are finite; and a vocabulary
    # shorter than the block, where some threads hold no token.
    rng = np.random.default_rng(5)
    V = 8 * 1024 + 7
    logits = (rng.standard_normal((7, V)) * 3).astype(np.float32)
    logits[0, 5::1024] = 40.0 + np.arange(9)  # the 9 best all in thread 5
    logits[1, np.add.outer(np.arange(0, 8 * 1024, 1024), np.arange(64)).ravel()] = 20.0  # 64 threads, 8 tied in each
    logits[2, : V - 7] = -np.inf  # only the last 7 are finite
    logits[3, rng.random(V) < 0.3] = np.nan
    logits[4] = np.round(logits[4])  # ties across thread bests
    logits[5, 1000:1100] = 9.0  # tied best across threads 1000-1023 and 0-75
    params = [(1.0, 8, 0.0), (1.0, 100, 0.0), (0.8, 40, 0.9), (1.0, 30, 0.0), (1.0, 1000, 0.0), (0.7, 99, 0.5),
              (1.0, 1024, 0.0)]
    _check_draws(cuda_module, logits, params, rng)
    short = (rng.standard_normal((4, 700)) * 2).astype(np.float32)  # 700 tokens: threads 700-1023 hold none
    _check_draws(cuda_module, short, [(1.0, 699, 0.0), (1.0, 500, 0.9), (0.9, 1, 0.0), (1.0, 40, 0.0)], rng)


def test_sampler_frequencies_follow_the_distribution(cuda_module):
    # 1500 draws (positions) from one row with temperature, top-k and top-p: the observed
    # frequencies against sampling.probabilities (a chi-square test at a 1e-6 false-alarm rate).
    rng = np.random.default_rng(0)
    V, n = 24, 1500
    row = (rng.standard_normal(V) * 1.5).astype(np.float32)
    temperature, top_k, top_p = 0.8, 12, float(np.float32(0.9))
    drawn, _ = cuda_module.sample(np.tile(row, (n, 1)), [temperature], [top_k], [top_p], [5], [7], np.arange(n))
    probs = sampling.probabilities(row, temperature, top_k, top_p)
    counts = np.bincount(drawn, minlength=V)
    assert np.all(counts[probs == 0] == 0)
    kept = probs > 0
    chi2 = float(((counts[kept] - n * probs[kept]) ** 2 / (n * probs[kept])).sum())
    assert chi2 < 50.0, chi2  # chi-square with < 12 degrees of freedom: P(> 50) < 1e-6


def test_bad_arguments(cuda_module, small):
    _, files = small
    with pytest.raises(ValueError, match="dtype"):
        cuda_module.Engine(str(files["fp32"]), dtype="int8")
    with pytest.raises(ValueError, match="device 7 does not exist"):
        cuda_module.Engine(str(files["fp32"]), device=7)
    with pytest.raises(ValueError, match="logits"):
        cuda_module.sample(np.zeros((0, 3), np.float32), [1.0], [0], [0.0], [0], [0], [0])
    with pytest.raises(ValueError, match="temperature must hold 1 or B"):
        cuda_module.sample(np.zeros((2, 3), np.float32), [1.0, 1.0, 1.0], [0], [0.0], [0], [0], [0])


# ---- the backend choice, here and everywhere ---------------------------------------------------


def test_int8_files_are_refused_with_the_fix_and_auto_runs_them_on_the_cpu(cuda_backend, small, tmp_path):
    # The CUDA engine runs fp32 and bf16 files only: an int8 one is a ValueError naming the fix,
    # never a crash; backend="auto" takes such a file to the CPU engine instead.
    model, files = small
    path = export(model, tmp_path / "bytes.int8.bin", "int8", tokenizer_dir=os.path.dirname(files["fp32"]) + "/tok", progress=False)
    with pytest.raises(ValueError, match=r"int8 weights, which the CUDA engine does not run: export it with dtype 'bf16'"):
        cuda_backend.Engine(str(path))
    with pytest.raises(ValueError, match="export it with dtype 'bf16'"):
        Engine(path, backend="cuda")
    engine = Engine(path, backend="auto")
    assert engine.backend == "cpu" and engine.dtype == "int8"
    assert Engine(files["bf16"], backend="auto").backend == "cuda"


def test_auto_falls_back_to_the_cpu_here(small, capfd, caplog, monkeypatch):
    # Whatever this machine has: no GPU means the CPU; a CUDA build that cannot run says so (once),
    # without a CUDA build nothing is printed, logged or warned.
    import warnings

    from gpt_2_simple import engine as engine_module

    monkeypatch.setattr(engine_module, "_fallback_noticed", set())
    _, files = small
    try:
        from gpt_2_simple import _engine_cuda

        built, has_gpu = True, _engine_cuda.cuda_status()[0] > 0
    except ImportError as e:  # not built, or built but cuBLAS or the driver library is missing
        built, has_gpu = e.name == "gpt_2_simple._engine_cuda" and not isinstance(e, ModuleNotFoundError), False
    capfd.readouterr()
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="gpt_2_simple.engine"):
        warnings.simplefilter("error")
        engine = Engine(files["fp32"], backend="auto")
        Engine(files["fp32"], backend="auto")
    assert engine.backend == ("cuda" if has_gpu else "cpu")
    assert capfd.readouterr() == ("", "")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == (["gpt_2_simple: the CUDA engine is built but cannot run here"] if built and not has_gpu else [])


def test_auto_fallback_notice_is_one_line_on_stderr(small):
    # A CUDA build without a usable GPU (the module's status says so), in a plain Python process.
    _, files = small
    code = ("import sys, types; sys.modules['gpt_2_simple._engine_cuda'] = types.SimpleNamespace(cuda_status=lambda: (0, 'no CUDA driver'))\n"
            "from gpt_2_simple.engine import Engine\n"
            f"print(Engine({str(files['fp32'])!r}).backend, Engine({str(files['fp32'])!r}, backend='auto').backend)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "cpu cpu\n"
    assert out.stderr == ("gpt_2_simple: the CUDA engine is built but cannot run here (no CUDA driver): generating on the CPU "
                          "(backend='cpu' says this is intended and silences this line)\n")


def _fake_cuda(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "gpt_2_simple._engine_cuda", module)
    if module is None:
        monkeypatch.delattr(gpt_2_simple, "_engine_cuda", raising=False)
    else:
        monkeypatch.setattr(gpt_2_simple, "_engine_cuda", module, raising=False)


def test_forced_cuda_says_what_is_missing_and_auto_notices(small, monkeypatch, caplog):
    from gpt_2_simple import engine as engine_module

    monkeypatch.setattr(engine_module, "_fallback_noticed", set())
    _, files = small
    # Not built (sys.modules[name] = None makes the import fail as for a missing module): 'auto'
    # takes the CPU without a word.
    _fake_cuda(monkeypatch, None)
    with pytest.raises(RuntimeError, match=r"built without its CUDA engine.*backend='cpu'"):
        Engine(files["fp32"], backend="cuda")
    with caplog.at_level("WARNING", logger="gpt_2_simple.engine"):
        assert Engine(files["fp32"], backend="auto").backend == "cpu"
    assert caplog.records == []
    # Built, but no driver or no GPU: the module's own reason, and 'auto' says it falls back, once.
    fake = types.SimpleNamespace(cuda_status=lambda: (0, "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES=)"))
    _fake_cuda(monkeypatch, fake)
    with pytest.raises(RuntimeError, match=r"no CUDA GPU is visible \(CUDA_VISIBLE_DEVICES=\); or use backend='cpu'"):
        Engine(files["fp32"], backend="cuda")
    with caplog.at_level("WARNING", logger="gpt_2_simple.engine"):
        assert Engine(files["fp32"], backend="auto").backend == "cpu"
        assert Engine(files["fp32"], backend="auto").backend == "cpu"
        assert Engine(files["fp32"], backend="cpu").backend == "cpu"
    (record,) = caplog.records
    assert record.getMessage().startswith("gpt_2_simple: the CUDA engine is built but cannot run here "
                                          "(no CUDA GPU is visible (CUDA_VISIBLE_DEVICES=)): generating on the CPU")
    assert "\n" not in record.getMessage()
    # Built, but cuBLAS does not load: the same notice with that reason.
    caplog.clear()
    monkeypatch.delitem(sys.modules, "gpt_2_simple._engine_cuda", raising=False)
    monkeypatch.delattr(gpt_2_simple, "_engine_cuda", raising=False)
    real_import = __import__

    def failing_import(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_engine_cuda" in fromlist:  # as Python's loader reports a library dlopen cannot find
            raise ImportError("libcublas.so.13: cannot open shared object file", name="gpt_2_simple._engine_cuda", path="/x/_engine_cuda.so")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr("builtins.__import__", failing_import)
    with caplog.at_level("WARNING", logger="gpt_2_simple.engine"):
        assert Engine(files["fp32"], backend="auto").backend == "cpu"
    (record,) = caplog.records
    assert "cuBLAS cannot be loaded (libcublas.so.13" in record.getMessage()


def test_forced_cuda_here(small):
    # The real module on this machine: either it runs, or the error names the reason.
    _, files = small
    try:
        from gpt_2_simple import _engine_cuda
    except ImportError:
        _engine_cuda = None
    if _engine_cuda is not None and _engine_cuda.cuda_status()[0] > 0:
        assert Engine(files["fp32"], backend="cuda").backend == "cuda"
    else:
        with pytest.raises(RuntimeError, match="backend='cuda' is not available: .*; or use backend='cpu'"):
            Engine(files["fp32"], backend="cuda")


# ---- GPU only: GPT-2's real size against PyTorch on the same GPU -------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [3, 12])  # decode through decode.cuh's fused products, then cuBLAS
def test_gpt2_124m_geometry_matches_pytorch_on_the_gpu(tmp_path, batch):
    try:
        from gpt_2_simple import _engine_cuda
    except ImportError as e:
        pytest.skip(f"_engine_cuda is not built here ({e})")
    if _engine_cuda.cuda_status()[0] < 1 or not torch.cuda.is_available():
        pytest.skip("needs a GPU for both _engine_cuda and PyTorch")
    config = GPT2Config(n_ctx=1024, n_embd=768, n_head=12, n_layer=12)
    model = random_gpt2(config, seed=1)
    path = export(model, tmp_path / "124m.bf16.bin", "bf16", progress=False)
    reference = _rounded(model, "bf16").cuda()
    engine = _engine_cuda.Engine(str(path))
    prompts = _prompts([16, 300, 5] * (batch // 3), vocab=config.n_vocab)
    requests = [Request(p, 24, temperature=0.0) for p in prompts]
    logits = {}
    out = engine.generate(requests, batch_size=batch, on_logits=lambda i, s, x: logits.__setitem__((i, s), x.copy()))
    for i, (prompt, (tokens, _)) in enumerate(zip(prompts, out)):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt + tokens], device="cuda"))[0, len(prompt) - 1 :].float().cpu().numpy()
        spread = float(expected.std())
        for step in range(24):
            np.testing.assert_allclose(logits[(i, step)], expected[step], atol=0.05 * spread, rtol=0.0, err_msg=f"row {i} step {step}")
        # Greedy: each token is the argmax of the engine's own logits, and PyTorch agrees on it
        # except where its top two logits are closer than the bf16 tolerance.
        for step, token in enumerate(tokens):
            top2 = np.sort(expected[step])[-2:]
            if top2[1] - top2[0] > 0.1 * spread:
                assert token == int(np.argmax(expected[step])), (i, step)

