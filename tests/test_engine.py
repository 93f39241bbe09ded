"""The C++ engine against the PyTorch model and the PyTorch reference generator (torch_generate):
logits at every step on every SIMD path and dtype, greedy and sampled tokens, the sampler draw for
draw against sampling.py, stops, continuous batching, callbacks, threads and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from gpt_2_simple import sampling
from gpt_2_simple.config import GPT2Config
from gpt_2_simple.engine import Engine, Request, Result
from gpt_2_simple.export import export
from gpt_2_simple.tokenizer import END_OF_TEXT, bytes_to_unicode
from gpt_2_simple.torch_generate import generate_tokens, window_size
from conftest import needs_isa
from reference import TINY, Int8Reference, random_gpt2

# native: the best this CPU has (AVX-512 with BF16, AVX-512, AVX2 or scalar); the others are capped
# to with GPT2S_ISA, so only those the host supports can run (host_isa in conftest.py).
ISAS = ["native", *(pytest.param(isa, marks=needs_isa(isa)) for isa in ("avx512", "avx2", "scalar"))]
# bf16: the engine rounds activations to bf16 at each matmul input (docs/engine.md); against
# model.py with the same bf16 weights that costs up to ~1% of the logits' spread.
# int8: against model.py with the file's int8 weights and each matmul input quantized per row as the
# engine does (reference.Int8Reference): most steps agree to float rounding (~3e-7 on logits of
# spread ~0.2; the int8 file is ~8e-3 from the fp32 model). Now and then an activation whose x / s
# lies within float rounding of a half rounds the other way in one of the two, which moves that
# row's later logits by up to a few 1e-3: so at least 3 steps in 4 must agree to INT8_EXACT, and
# every step to the tolerance below.
TOLERANCE = {"fp32": dict(atol=1e-4, rtol=1e-4), "bf16": dict(atol=3e-2, rtol=0.0), "int8": dict(atol=1e-2, rtol=0.0)}
INT8_EXACT = 1e-5
DTYPES = ["fp32", "bf16", "int8"]


# Most tests use a byte-level vocabulary (256 bytes + <|endoftext|>): GPT-2's 50257-token head
# would dominate their run time. The logits and sampler tests use GPT-2's vocabulary.
BYTES = GPT2Config(n_vocab=257, n_ctx=64, n_embd=64, n_head=4, n_layer=2)


def _byte_tokenizer(folder):
    folder.mkdir(parents=True, exist_ok=True)
    encoder = {bytes_to_unicode()[b]: b for b in range(256)} | {END_OF_TEXT: 256}
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def model():
    return random_gpt2()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    return {dtype: export(model, folder / f"tiny.{dtype}.bin", dtype, progress=False) for dtype in DTYPES}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model, engine file) with the byte vocabulary."""
    folder = tmp_path_factory.mktemp("engine_bytes")
    model = random_gpt2(BYTES, seed=2)
    return model, export(model, folder / "bytes.fp32.bin", "fp32", tokenizer_dir=_byte_tokenizer(folder / "tok"), progress=False)


@pytest.fixture(scope="module")
def engine(small):
    return Engine(small[1], backend="cpu")


TOKEN_BYTES = [bytes([b]) for b in range(256)] + [END_OF_TEXT.encode()]


def _bf16_model(model, config=TINY):
    """model.py with the weights the bf16 file holds (matrices and embeddings rounded to bf16)."""
    rounded = random_gpt2(config)
    with torch.no_grad():
        for (name, p), (_, src) in zip(rounded.named_parameters(), model.named_parameters()):
            is_weight = name.endswith("weight") and ".ln_" not in name and not name.startswith("ln_f")
            p.copy_(src.to(torch.bfloat16).float() if is_weight else src)
    return rounded


def _assert_steps_match(dtype, steps):
    """steps: (engine logits, reference logits, label) of every row and step; TOLERANCE and, for
    int8, the share of steps that agree to INT8_EXACT (see TOLERANCE)."""
    for got, want, label in steps:
        np.testing.assert_allclose(got, want, **TOLERANCE[dtype], err_msg=label)
    if dtype == "int8":
        exact = [np.abs(got - want).max() <= INT8_EXACT for got, want, _ in steps]
        assert np.mean(exact) >= 0.75, f"{sum(exact)} of {len(exact)} steps agree to {INT8_EXACT}"


def _reference(model, dtype, path, config=TINY):
    """What the engine's logits are compared with for a file of this dtype."""
    return {"fp32": lambda: model, "bf16": lambda: _bf16_model(model, config), "int8": lambda: Int8Reference(path)}[dtype]()


def _prompts(lengths, seed=0, vocab=TINY.n_vocab):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _sampler_cases(rng, V: int, B: int):
    """Logits with the cases that break samplers: ties, -inf, NaN, +-0, one finite logit, huge
    spreads; and parameters covering greedy, tiny and large temperatures, top-k 1, V-1, V, beyond V,
    top-p near 0 and 1, and both filters together."""
    logits = rng.standard_normal((B, V)) * 3
    logits[1] = rng.integers(-2, 2, V)  # many exact ties
    logits[2, rng.random(V) < 0.4] = -np.inf
    logits[2, rng.random(V) < 0.05] = np.nan
    logits[3, rng.random(V) < 0.3] = 0.0
    logits[3, rng.random(V) < 0.3] = -0.0
    logits[4] = -np.inf
    logits[4, V // 2] = 1.0
    logits[5] = 2.5  # all equal
    logits[6] *= 40
    params = [
        (float(t), int(k), float(p))
        for t, k, p in zip(
            rng.choice([0.0, 1.0, 0.7, 1e-3, 3.0, 1e-30], B), rng.choice([0, 1, 2, 40, V - 1, V, V + 5], B),
            rng.choice([0.0, 1.0, 0.5, 0.9, 0.999, 1e-6], B),
        )
    ]
    return logits.astype(np.float32), params


def _draw_args(params, rng):
    """(temperature, top_k, top_p, seed, sample_index, position) arrays for rows of (t, k, p):
    top_p rounded to float32 as the engine carries it, random draw counters."""
    B = len(params)
    t, k, p = (np.array(x) for x in zip(*params))
    p = p.astype(np.float32).astype(np.float64)
    return t, k, p, rng.integers(0, 2**63, B), rng.integers(0, 2**40, B), rng.integers(0, 2**33, B)


def _isa_env(isa: str, pythonpath: str | None = None) -> dict:
    """The environment of a subprocess whose engine uses `isa` (the cap is read once per process)."""
    env = {**os.environ, "PYTHONPATH": pythonpath or os.pathsep.join(sys.path)}
    if isa != "native":
        env["GPT2S_ISA"] = isa
    else:
        env.pop("GPT2S_ISA", None)
    return env


def _run_in_subprocess(path, isa: str, requests: list[dict], batch_size: int, python=(sys.executable,), pythonpath=None) -> dict:
    """Engine.generate in a fresh process with GPT2S_ISA=isa (the cap is read once per process);
    returns its results and every step's logits. `python`: the interpreter's command line, and
    `pythonpath` its module path (test_engine_aarch64.py: an arm64 Python under qemu-aarch64)."""
    code = f"""
import json, sys, numpy as np
from gpt_2_simple import _engine
from gpt_2_simple.engine import Engine, Request
e = Engine({os.fspath(path)!r}, backend="cpu")
logits = {{}}
res = e.generate([Request(**r) for r in json.loads(sys.stdin.read())], batch_size={batch_size},
                 on_logits=lambda i, s, x: logits.__setitem__(f"{{i}}_{{s}}", x))
np.savez(sys.argv[1], **logits)
print(json.dumps({{"tokens": [r.tokens for r in res], "isa": e.device}}))
"""
    out_npz = os.path.join(os.path.dirname(path), f"logits_{isa}.npz")
    proc = subprocess.run([*python, "-c", code, out_npz], input=json.dumps(requests), capture_output=True, text=True, timeout=300,
                          env=_isa_env(isa, pythonpath))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    with np.load(out_npz) as z:
        result["logits"] = {k: z[k] for k in z.files}
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_logits_match_pytorch_at_every_step(model, files, isa, dtype):
    _check_logits(model, files, isa, dtype)


def _check_logits(model, files, isa, dtype, **python):
    # Four prompts of different lengths prefilled together, then decoded together; the 33-token
    # prompt is longer than a SIMD vector and not a multiple of one.
    prompts = _prompts([1, 7, 20, 33])
    requests = [dict(prompt=p, max_new_tokens=12, temperature=1.0, seed=3, sample_index=i) for i, p in enumerate(prompts)]
    out = _run_in_subprocess(files[dtype], isa, requests, batch_size=4, **python)
    if isa != "native":
        assert out["isa"].startswith(f"cpu {isa},")
    reference = _reference(model, dtype, files[dtype])
    steps = []
    for i, (prompt, tokens) in enumerate(zip(prompts, out["tokens"])):
        assert len(tokens) == 12
        with torch.no_grad():
            expected = reference(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 :].numpy()  # (13, V)
        steps += [(out["logits"][f"{i}_{step}"], expected[step], f"{isa} {dtype} row {i} step {step}") for step in range(12)]
    _assert_steps_match(dtype, steps)


def _check_shape(tmp_path, config, lengths, isa, dtype, new_tokens=4, **python):
    """Prompts of these lengths prefilled together, then decoded together, on a random model of
    this geometry: the engine's logits against model.py's at every step."""
    model = random_gpt2(config, seed=4)
    prompts = _prompts(lengths, seed=8)
    requests = [dict(prompt=p, max_new_tokens=new_tokens, temperature=1.0, seed=1, sample_index=i) for i, p in enumerate(prompts)]
    path = export(model, tmp_path / f"model.{dtype}.bin", dtype, progress=False)
    out = _run_in_subprocess(path, isa, requests, batch_size=len(prompts), **python)
    reference = _reference(model, dtype, path, config)
    steps = []
    for i, (prompt, tokens) in enumerate(zip(prompts, out["tokens"])):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 :].numpy()
        steps += [(out["logits"][f"{i}_{step}"], expected[step], f"{isa} {dtype} row {i} step {step}") for step in range(new_tokens)]
    _assert_steps_match(dtype, steps)


# (geometry, prompt lengths) of the two shape tests below.
WIDE = (GPT2Config(n_ctx=48, n_embd=192, n_head=2, n_layer=1), [9, 17, 30])
ODD = (GPT2Config(n_ctx=32, n_embd=45, n_head=3, n_layer=2), [5, 11])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ["native", pytest.param("avx2", marks=needs_isa("avx2")), "scalar"])
def test_wide_matrices_at_every_batch_shape(tmp_path, isa, dtype):
    # n_embd 192: the matmuls run over inputs of 192 and 768 (mlp.c_proj), more than one slice of
    # the matmul's panels (128 inputs) and not a multiple of one; a prefill of 9 + 17 + 30 = 56
    # rows spans several row groups of every ISA (at most 32 rows each) and a partial row block;
    # then three rows decode together. wte of 50257 x 192 (37 MiB fp32, 18 MiB bf16) is also
    # repacked in several slices (cpu_backend.cpp).
    _check_shape(tmp_path, *WIDE, isa, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ["native", pytest.param("avx2", marks=needs_isa("avx2")), "scalar"])
def test_odd_widths(tmp_path, isa, dtype):
    # n_embd 45 (3 heads of 15): every matmul but mlp.c_proj has an odd number of inputs, whose
    # bf16 pairs end with a padding zero (kernels_impl.h, pack), and no width is a multiple of a
    # SIMD vector; 45 x 4 = 180 outputs of mlp.c_fc leave a partial last panel.
    _check_shape(tmp_path, *ODD, isa, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("isa", ["native", pytest.param("avx2", marks=needs_isa("avx2")), "scalar"])
def test_logits_do_not_depend_on_the_batch(tmp_path, isa, dtype):
    # Each row alone and seven rows together give the same logits, bit for bit. Alone, prompts of
    # 1-3 tokens and every decode step run matmuls of 1-3 rows (bf16 pairs split in registers, or
    # vdpbf16ps); together, every matmul has 7 rows or more (on AVX2, AVX-512 and where
    # widen_bf16 chooses it, bf16 panel slices widened to fp32 once per row group; kernels_impl.h,
    # and the test after next). Over several slices, row groups and partial row
    # blocks (n_embd 192) and padded odd widths (n_embd 45).
    for config in (WIDE[0], ODD[0]):
        path = export(random_gpt2(config, seed=5), tmp_path / f"{config.n_embd}.{dtype}.bin", dtype, progress=False)
        prompts = _prompts([1, 2, 3, 5, 11, 17, 9], seed=9)
        requests = [dict(prompt=p, max_new_tokens=4, temperature=1.0, seed=2, sample_index=i) for i, p in enumerate(prompts)]
        together = _run_in_subprocess(path, isa, requests, batch_size=len(requests))
        alone = _run_in_subprocess(path, isa, requests, batch_size=1)
        assert together["tokens"] == alone["tokens"]
        assert sorted(together["logits"]) == sorted(alone["logits"]) and len(alone["logits"]) == 4 * len(requests)
        for key, x in alone["logits"].items():
            assert np.array_equal(together["logits"][key].view(np.uint32), x.view(np.uint32)), f"{isa} {dtype} n_embd {config.n_embd} logits {key}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("isa", ["native", pytest.param("avx2", marks=needs_isa("avx2")), "scalar"])
def test_prefilled_rows_equal_decoded_rows(tmp_path, isa, dtype):
    # A prefill's rows attend in blocks (kernels_impl.h, attend_rows: consecutive positions of one
    # slot share each cached key and value read; the last positions are each row's own), a decode
    # step's rows one by one. Prompts of 5 and 6 tokens decode 9 more one step at a time; then
    # every prefix of those sequences that ends in the last 6 decoded positions is prefilled in one
    # step: 12 prompts of 10-15 tokens, so the row drawn from sits at every place of a 4-row block
    # and the blocks straddle slot boundaries. Its logits are the decoded step's, bit for bit, with
    # an fp32 and a bf16 KV cache, for head sizes of 96 (whole SIMD vectors) and 15 (none).
    for config in (WIDE[0], ODD[0]):
        path = export(random_gpt2(config, seed=6), tmp_path / f"{config.n_embd}.{dtype}.bin", dtype, progress=False)
        prompts = _prompts([5, 6], seed=10)
        decoded = _run_in_subprocess(path, isa, [dict(prompt=p, max_new_tokens=9, temperature=1.0, seed=4) for p in prompts], batch_size=2)
        cases = [(i, step) for i in range(len(prompts)) for step in range(3, 9)]
        prefixes = [dict(prompt=prompts[i] + decoded["tokens"][i][:step], max_new_tokens=1, temperature=1.0) for i, step in cases]
        prefilled = _run_in_subprocess(path, isa, prefixes, batch_size=len(prefixes))
        for j, (i, step) in enumerate(cases):
            x, y = prefilled["logits"][f"{j}_0"], decoded["logits"][f"{i}_{step}"]
            assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), f"{isa} {dtype} n_embd {config.n_embd} row {i} step {step}"


def _has_avx512bf16() -> bool:
    from gpt_2_simple import _engine

    return _engine.cpu_features()["kernels"] == "avx512bf16"


@pytest.mark.skipif(not _has_avx512bf16(), reason="needs the avx512bf16 kernels: the widened bf16 matmul is checked against vdpbf16ps")
def test_widened_bf16_matmul_is_vdpbf16ps_bit_for_bit(tmp_path, monkeypatch):
    # With AVX512-BF16, matmuls of more than a row block may run as fp32 FMAs on widened weights
    # (kernels_impl.h, widen_bf16: the CPU's timing decides, GPT2S_BF16_WIDEN forces it). Both
    # ways, seven rows prefilled then decoded together give the same logits, bit for bit. One
    # token's wte row is denormal: vdpbf16ps reads it as zeros, so that logit is exactly 0 both
    # ways only if the widened FMAs flush denormals as the instruction does.
    for config in (WIDE[0], ODD[0]):
        model = random_gpt2(config, seed=7)
        with torch.no_grad():
            model.wte.weight[7] = torch.linspace(1e-39, 9e-39, config.n_embd)  # below bf16's smallest normal, 1.18e-38
        path = export(model, tmp_path / f"{config.n_embd}.bf16.bin", "bf16", progress=False)
        prompts = _prompts([1, 2, 3, 5, 11, 17, 9], seed=11)
        requests = [dict(prompt=p, max_new_tokens=4, temperature=1.0, seed=2, sample_index=i) for i, p in enumerate(prompts)]
        runs = {}
        for widen in ("0", "1"):
            monkeypatch.setenv("GPT2S_BF16_WIDEN", widen)
            runs[widen] = _run_in_subprocess(path, "native", requests, batch_size=len(requests))
        assert runs["0"]["tokens"] == runs["1"]["tokens"]
        assert sorted(runs["0"]["logits"]) == sorted(runs["1"]["logits"]) and len(runs["1"]["logits"]) == 4 * len(requests)
        for key, x in runs["0"]["logits"].items():
            assert np.array_equal(runs["1"]["logits"][key].view(np.uint32), x.view(np.uint32)), f"n_embd {config.n_embd} logits {key}"
            assert x[7] == 0.0, f"n_embd {config.n_embd} logits {key}: the denormal row was not read as zeros"


def test_greedy_equals_pytorch_past_the_context(small, engine):
    # 10 + 150 tokens in a 64-token context: the window slides three times.
    requests = [Request(p, 150, temperature=0.0) for p in _prompts([10, 40], seed=1, vocab=BYTES.n_vocab)]
    expected = generate_tokens(small[0], requests)
    assert [r.tokens for r in engine.generate(requests, batch_size=2)] == [r.tokens for r in expected]
    assert window_size(BYTES.n_ctx) == 32


def _mixed_requests(n: int, seed: int = 0, max_new: int = 20) -> list[Request]:
    rng = np.random.default_rng(seed)
    prompts = _prompts(rng.integers(1, 30, n), seed=seed, vocab=BYTES.n_vocab)
    return [
        Request(
            p, int(rng.integers(1, max_new)), temperature=float(rng.choice([0.0, 0.7, 1.0, 1.5])),
            top_k=int(rng.choice([0, 1, 5, 40, 1000])), top_p=float(rng.choice([0.0, 0.5, 0.9, 1.0])),
            seed=int(rng.integers(0, 2**64, dtype=np.uint64)), sample_index=i,
        )
        for i, p in enumerate(prompts)
    ]


def test_samples_equal_pytorch_and_do_not_depend_on_batch_or_order(small, engine):
    requests = _mixed_requests(20)
    one = engine.generate(requests, batch_size=1)
    twenty = engine.generate(requests, batch_size=20)
    order = np.random.default_rng(1).permutation(20)
    shuffled = engine.generate([requests[i] for i in order], batch_size=7)
    assert [r.tokens for r in twenty] == [r.tokens for r in one]
    assert [shuffled[j].tokens for j in np.argsort(order)] == [r.tokens for r in one]
    # The same draws as the PyTorch reference with numpy's sampler (docs/sampling.md explains why
    # fp32 agreement is exact barring a draw within float rounding of a boundary).
    assert [r.tokens for r in one] == [r.tokens for r in generate_tokens(small[0], requests, batch_size=5)]


def test_sampler_draws_equal_the_reference_draw_for_draw(files):
    # One token for each of many sample indices from the same prompt: every C++ draw must be the
    # draw sampling.py makes from the same logits and the same uniform number. GPT-2's vocabulary,
    # so top-k and top-p select among 50257 tokens.
    engine = Engine(files["fp32"], backend="cpu")
    prompt = _prompts([5], seed=2)[0]
    params = [(1.0, 0, 0.0), (0.5, 0, 0.0), (1.0, 3, 0.0), (2.0, 50, 0.0), (1.0, 0, 0.3), (0.8, 0, 0.95), (1.2, 200, 0.8), (1.0, 2, 0.99)]
    requests = [Request(prompt, 1, temperature=t, top_k=k, top_p=p, seed=11, sample_index=i) for t, k, p in params for i in range(150)]
    logits = {}
    results = engine.generate(requests, batch_size=32, on_logits=lambda i, s, x: logits.setdefault(i, x))
    for i, (r, res) in enumerate(zip(requests, results)):
        u = float(sampling.uniform(r.seed, r.sample_index, 0))
        assert res.tokens == [sampling.sample_row(logits[i], r.temperature, r.top_k, r.top_p, u)], r
    # And the draws of one configuration follow its distribution.
    counts = np.bincount([res.tokens[0] for res in results[:150]], minlength=TINY.n_vocab)
    probs = sampling.probabilities(logits[0], 1.0, 0, 0.0)
    assert np.all(counts[probs == 0] == 0)
    assert abs(counts @ np.log(probs + 1e-30) / 150 - probs @ np.log(probs + 1e-30)) < 0.5  # mean log-prob ~ -entropy


@pytest.mark.parametrize("isa", ISAS)
def test_sampler_equals_sampling_py_on_hard_rows(tmp_path, isa):
    # The sampler alone (_engine.sample, with this ISA's kernels) on rows built to break samplers
    # (ties, NaN, -inf, +-0, flat and huge rows; greedy, top-k 1 .. V + 5, top-p near 0 and 1):
    # every draw equals sampling.py's for the same uniform number.
    rng = np.random.default_rng(3)
    cases = {}
    for V in (1, 33, 1000, 50257):
        logits, params = _sampler_cases(rng, V, 12)
        cases[V] = dict(zip(("logits", "t", "k", "p", "seed", "index", "position"), (logits, *_draw_args(params, rng))))
    for V, c in cases.items():
        np.savez(tmp_path / f"case_{V}.npz", **c)
    code = """
import sys, numpy as np
from gpt_2_simple import _engine
for path in sys.argv[1:]:
    with np.load(path) as c:
        args = [c[n].tolist() for n in ("t", "k", "p", "seed", "index", "position")]
        np.save(path + ".drawn.npy", _engine.sample(c["logits"], *args))
"""
    paths = [str(tmp_path / f"case_{V}.npz") for V in cases]
    proc = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300, env=_isa_env(isa))
    assert proc.returncode == 0, proc.stderr
    for path, c in zip(paths, cases.values()):
        expected = sampling.sample(c["logits"], c["t"], c["k"], c["p"], c["seed"], c["index"], c["position"])
        assert np.load(path + ".drawn.npy").tolist() == expected.tolist(), path


def test_stop_ids_and_stop_sequences_match_pytorch(small, engine):
    prompt = _prompts([6], seed=4, vocab=BYTES.n_vocab)[0]
    tokens = engine.generate([Request(prompt, 40, temperature=1.0, seed=9)])[0].tokens
    text = b"".join(TOKEN_BYTES[t] for t in tokens)
    stop_id = next(t for j, t in enumerate(tokens) if j >= 8 and t not in tokens[:j])
    seq = text[10:13]  # completed by token 12 (or earlier if it occurs before)
    requests = [
        Request(prompt, 40, temperature=1.0, seed=9, stop_ids=[stop_id, BYTES.n_vocab - 1]),
        Request(prompt, 40, temperature=1.0, seed=9, stop_sequences=[b"\xff\xfe\xfd\xfc", seq]),
        Request(prompt, 40, temperature=1.0, seed=9, stop_sequences=[bytes(prompt[:3])]),  # only in the prompt
    ]
    ours = engine.generate(requests, batch_size=3)
    assert ours == generate_tokens(small[0], requests, token_bytes=TOKEN_BYTES)
    assert ours[0] == Result(tokens[: tokens.index(stop_id)], "stop_token")
    end = text.find(seq) + len(seq)
    assert ours[1] == Result(tokens[:end], "stop_sequence")  # one byte per token here
    assert ours[2].finish_reason == "length" or bytes(prompt[:3]) in text


def test_continuous_batching_refills_slots_at_once(engine):
    # 30 requests of very different lengths through 4 slots: a request starts as soon as another
    # ends, results equal running each alone, and no more than 4 are ever in flight.
    requests = _mixed_requests(30, seed=5, max_new=60)
    events = []
    results = engine.generate(
        requests, batch_size=4,
        on_token=lambda i, t: events.append(("token", i)),
        on_finish=lambda i, r: events.append(("finish", i)),
    )
    alone = [engine.generate([r], batch_size=1)[0] for r in requests]
    assert results == alone
    in_flight, started, finished = set(), set(), set()
    for kind, i in events:
        if kind == "token" and i not in started:
            started.add(i)
            in_flight.add(i)
        if kind == "finish":
            finished.add(i)
            in_flight.discard(i)
        assert len(in_flight) <= 4
    assert finished == set(range(30))
    # Continuous, not static: later requests started while some of the first four still ran.
    first_finish = next(k for k, (kind, _) in enumerate(events) if kind == "finish")
    last_of_first_four = max(k for k, (kind, i) in enumerate(events) if kind == "finish" and i < 4)
    assert any(kind == "token" and i >= 4 for kind, i in events[first_finish:last_of_first_four])


def test_shared_prefixes_are_prefilled_once_with_unchanged_results(small, engine, monkeypatch):
    # Rows admitted together: three with one 12-token prompt, one sharing its first 8 tokens, one
    # unrelated. The first prefills, the others copy what they share (scheduler.cpp) and compute
    # the rest: logits at every step still match PyTorch, and the draws equal running each alone
    # and running with sharing off.
    p = _prompts([12], seed=7, vocab=BYTES.n_vocab)[0]
    q = [(p[0] + 1) % 256] + _prompts([5], seed=8, vocab=BYTES.n_vocab)[0]
    prompts = [p, p, p[:8] + [(t + 1) % 256 for t in p[8:]], q, p]
    requests = [Request(x, 9, temperature=1.0, top_k=5 * i, seed=4, sample_index=i) for i, x in enumerate(prompts)]
    logits = {}
    together = engine.generate(requests, batch_size=5, on_logits=lambda i, step, x: logits.__setitem__((i, step), x.copy()))
    t = engine.last_timings()
    assert t["shared_tokens"] == 11 + 8 + 11  # a row always computes its prompt's last token
    assert t["prefill_tokens"] == 12 + 1 + 4 + len(q) + 1
    assert "30 more copied" in engine.timing_summary()
    assert together == [engine.generate([r], batch_size=1)[0] for r in requests]
    monkeypatch.setenv("GPT2S_SHARE_PREFIX", "0")
    assert engine.generate(requests, batch_size=5) == together
    assert engine.last_timings()["shared_tokens"] == 0
    for i, (r, out) in enumerate(zip(requests, together)):
        with torch.no_grad():
            expected = small[0](torch.tensor([r.prompt + out.tokens]))[0, len(r.prompt) - 1 :].numpy()
        for step in range(len(out.tokens)):
            np.testing.assert_allclose(logits[i, step], expected[step], **TOLERANCE["fp32"], err_msg=f"row {i} step {step}")


def test_shared_prefixes_through_refilled_slots_and_slides(small, engine):
    # Ten samples of one prompt through 3 slots, rows of different lengths: a refilled slot copies
    # the prompt from a row already decoding. Every prompt position is computed or copied once.
    p = _prompts([20], seed=9, vocab=BYTES.n_vocab)[0]
    requests = [Request(p, 3 + 4 * i % 13, temperature=1.0, top_k=40, seed=5, sample_index=i) for i in range(10)]
    results = engine.generate(requests, batch_size=3)
    t = engine.last_timings()
    assert t["shared_tokens"] >= 6 * 19 and t["prefill_tokens"] + t["shared_tokens"] == 10 * 20
    assert results == [engine.generate([r], batch_size=1)[0] for r in requests]
    # Two greedy rows of one prompt past the 64-token context: identical windows slide together,
    # and the second copies the first's re-prefilled window. Still PyTorch's tokens.
    greedy = [Request(p, 120, temperature=0.0)] * 2
    assert [r.tokens for r in engine.generate(greedy, batch_size=2)] == [r.tokens for r in generate_tokens(small[0], greedy)]
    assert engine.last_timings()["shared_tokens"] > 19


def test_callbacks_and_edge_lengths(engine):
    requests = [Request([1], 5, temperature=1.0), Request([2, 3], 0), Request(_prompts([BYTES.n_ctx], vocab=BYTES.n_vocab)[0], 3, temperature=0.0)]
    tokens, finished = {}, {}
    results = engine.generate(requests, on_token=lambda i, t: tokens.setdefault(i, []).append(t), on_finish=lambda i, r: finished.setdefault(i, r))
    assert results[1] == Result([], "length")
    assert finished == dict(enumerate(results))
    assert tokens == {0: results[0].tokens, 2: results[2].tokens}
    assert len(results[2].tokens) == 3  # a full-context prompt slides before its second token

    class Stop(Exception):
        pass

    def boom(i, t):
        raise Stop("from the callback")

    with pytest.raises(Stop, match="from the callback"):
        engine.generate(requests, on_token=boom)
    assert engine.generate(requests) == results  # the engine is still usable


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_and_batch_do_not_change_results(tmp_path, dtype):
    # Wide enough (C = 256) that the matmuls and attention run in parallel (kernels_impl.h). Each
    # request's logits at every step are bit-identical with 1 or 2 threads, alone (batch 1) or
    # among the others in shuffled order (batch 3): for int8 too, whose activations are quantized
    # per row and whose products are summed exactly in int32 (docs/engine.md, "Determinism").
    wide = GPT2Config(n_vocab=257, n_ctx=64, n_embd=256, n_head=4, n_layer=2)
    path = export(random_gpt2(wide, seed=3), tmp_path / "wide.bin", dtype, tokenizer_dir=_byte_tokenizer(tmp_path / "tok"), progress=False)
    requests = _mixed_requests(6, seed=6)
    order = np.random.default_rng(2).permutation(len(requests))
    outs = []
    for threads, batch, shuffled in ((1, 3, False), (2, 3, False), (2, 1, False), (2, 3, True)):
        e = Engine(path, backend="cpu", threads=threads)
        assert f"{threads} thread" in e.device
        logits = {}
        ids = order if shuffled else np.arange(len(requests))
        results = e.generate([requests[i] for i in ids], batch_size=batch,
                             on_logits=lambda i, s, x: logits.__setitem__((int(ids[i]), s), x))
        outs.append(([results[j] for j in np.argsort(ids)], logits))
    for results, logits in outs[1:]:
        assert results == outs[0][0]
        assert logits.keys() == outs[0][1].keys()
        assert len(logits) == sum(len(r.tokens) + (r.finish_reason == "stop_token") for r in results)
        for key, x in logits.items():
            assert np.array_equal(x, outs[0][1][key]), key


def test_fork_after_use_neither_hangs_nor_changes_results(tmp_path):
    # A forked child has none of the pool's worker threads: it must generate alone and exit cleanly.
    wide = GPT2Config(n_vocab=257, n_ctx=64, n_embd=256, n_head=4, n_layer=2)
    path = export(random_gpt2(wide, seed=3), tmp_path / "wide.bin", "fp32", tokenizer_dir=_byte_tokenizer(tmp_path / "tok"), progress=False)
    code = f"""
import os, sys, time
from gpt_2_simple.engine import Engine, Request
e = Engine({str(path)!r}, threads=2)
reqs = [Request(list(range(1, 30)), 8, temperature=1.0, sample_index=i) for i in range(4)]
expected = e.generate(reqs, batch_size=4)
time.sleep(0.05)  # the workers go to sleep on their condition variable
pid = os.fork()
if pid == 0:
    ok = e.generate(reqs, batch_size=4) == expected
    sys.exit(0 if ok else 3)  # a normal exit: the engine is destroyed at shutdown
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


def test_concurrent_calls_from_python_threads(engine):
    requests = _mixed_requests(8, seed=7)
    expected = engine.generate(requests, batch_size=4)
    got = [None] * 4

    def work(k):
        got[k] = engine.generate(requests, batch_size=k + 1)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g == expected for g in got)


def test_timings(engine):
    engine.generate([Request([1, 2, 3], 10, temperature=0.0), Request([4], 10, temperature=0.0)], batch_size=2)
    t = engine.last_timings()
    assert t["prefill_tokens"] == 4 and t["decode_tokens"] == 2 * 9 and t["decode_steps"] == 9
    assert 0 < t["decode_sample_seconds"] < t["decode_seconds"] < t["total_seconds"]
    assert t["slots"] == 2 and t["ctx"] == 12 and t["kv_cache_bytes"] == 2 * 2 * 12 * BYTES.n_layer * BYTES.n_embd * 4
    assert "ms/token" in engine.timing_summary()


class _Bad:
    """A request-like object whose fields the constructor never saw."""

    def __init__(self, **fields):
        self.__dict__.update(dict(prompt=[1, 2], max_new_tokens=3, temperature=1.0, top_k=0, top_p=0.0, seed=0, sample_index=0, stop_ids=[], stop_sequences=[]) | fields)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(prompt=[]), r"requests\[1\]\.prompt is empty"),
        (dict(prompt=[BYTES.n_vocab]), r"requests\[1\]\.prompt.*257"),
        (dict(prompt=[-1]), r"requests\[1\]\.prompt"),
        (dict(prompt=[1.5]), r"requests\[1\]\.prompt must be an integer"),
        (dict(prompt=[0] * (BYTES.n_ctx + 1)), r"requests\[1\]\.prompt has 65 tokens"),
        (dict(max_new_tokens=-1), r"requests\[1\]\.max_new_tokens"),
        (dict(temperature=-0.5), r"requests\[1\]\.temperature"),
        (dict(temperature=float("nan")), r"requests\[1\]\.temperature"),
        (dict(temperature="hot"), r"requests\[1\]\.temperature must be a number"),
        (dict(top_k=-1), r"requests\[1\]\.top_k"),
        (dict(top_p=1.5), r"requests\[1\]\.top_p"),
        (dict(seed=-1), r"requests\[1\]\.seed"),
        (dict(sample_index=2**64), r"requests\[1\]\.sample_index"),
        (dict(stop_ids=[BYTES.n_vocab]), r"requests\[1\]\.stop_ids"),
        (dict(stop_sequences=[b""]), r"requests\[1\]\.stop_sequences"),
        (dict(stop_sequences=[3]), r"requests\[1\]\.stop_sequences"),
    ],
)
def test_bad_requests_are_value_errors(engine, fields, match):
    with pytest.raises(ValueError, match=match):
        engine.generate([Request([1], 1), _Bad(**fields)])


def test_bad_arguments_and_files(engine, files, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        engine.generate([Request([1], 1)], batch_size=0)
    with pytest.raises(ValueError, match="backend"):
        Engine(files["fp32"], backend="gpu")
    with pytest.raises(ValueError, match="threads"):
        Engine(files["fp32"], threads=0)
    with pytest.raises(FileNotFoundError, match="gpt_2_simple export"):
        Engine(tmp_path / "missing.bin")
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(files["fp32"].read_bytes()[:5000])
    with pytest.raises(ValueError):
        Engine(damaged)
    try:
        from gpt_2_simple import _engine_cuda  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="backend='cpu'"):
            Engine(files["fp32"], backend="cuda")
        assert Engine(files["fp32"], backend="auto").backend == "cpu"
