"""GGUF export (export_gguf.py), checked against ggml's own reader (the ``gguf`` package's
GGUFReader and its dequantizers) and, where llama-cpp-python is installed, against llama.cpp itself:
it loads the file, tokenizes like our encoder, and generates the same greedy tokens as our engine
from the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import format_reader as fr
from reference import TINY, random_gpt2
from gpt_2_simple.export import export
from gpt_2_simple.export_gguf import GGUFExportError, export_gguf
from gpt_2_simple.tokenizer import BUNDLED_DIR, END_OF_TEXT, get_encoder
from gpt_2_simple.weights import expected_shapes

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package: pip install gguf (it is in the test extra)")

MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
DTYPES = ("f32", "f16", "q8_0")


@pytest.fixture(scope="module")
def model():
    return random_gpt2(TINY, seed=3)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {dtype: export_gguf(model, folder / f"tiny.{dtype}.gguf", dtype) for dtype in DTYPES}


@pytest.fixture(scope="module")
def readers(files):
    # GGUFReader parses 100k token and merge strings one by one (seconds each): read each file once.
    return {dtype: gguf.GGUFReader(path) for dtype, path in files.items()}


def state_of(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def field(reader, key):
    return reader.fields[key].contents()


def llama_names(config) -> dict[str, str]:
    """Our name -> the name llama.cpp expects, from gguf-py's own table of HF GPT-2 names (HF's
    ``transformer.`` prefix + model.py's names are OpenAI's names on the hub)."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    return {name: table.get_name(f"transformer.{name}", try_suffixes=(".weight", ".bias")) for name in expected_shapes(config)}


# --- read back with ggml's reader ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_metadata_is_what_llama_cpp_reads(readers, dtype):
    r = readers[dtype]
    arch = field(r, "general.architecture")
    assert arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]
    keys = gguf.Keys.LLM
    assert field(r, keys.CONTEXT_LENGTH.format(arch=arch)) == TINY.n_ctx
    assert field(r, keys.EMBEDDING_LENGTH.format(arch=arch)) == TINY.n_embd
    assert field(r, keys.FEED_FORWARD_LENGTH.format(arch=arch)) == 4 * TINY.n_embd
    assert field(r, keys.BLOCK_COUNT.format(arch=arch)) == TINY.n_layer
    assert field(r, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)) == TINY.n_head
    assert field(r, gguf.Keys.Attention.LAYERNORM_EPS.format(arch=arch)) == pytest.approx(1e-5)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    assert field(r, gguf.Keys.General.FILE_TYPE) == file_type


def test_tokenizer_is_gpt2s_own_files(readers):
    r = readers["q8_0"]
    tok = gguf.Keys.Tokenizer
    assert field(r, tok.MODEL) == "gpt2" and field(r, tok.PRE) == "gpt-2"
    encoder = json.loads((BUNDLED_DIR / "encoder.json").read_text("utf-8"))
    tokens = field(r, tok.LIST)
    assert len(tokens) == TINY.n_vocab and all(encoder[t] == i for i, t in enumerate(tokens))
    merges = (BUNDLED_DIR / "vocab.bpe").read_text("utf-8").split("\n")[1:]
    assert field(r, tok.MERGES) == [m for m in merges if m]
    types = field(r, tok.TOKEN_TYPE)
    eot = encoder[END_OF_TEXT]
    assert types[eot] == gguf.TokenType.CONTROL and set(types[:eot]) == {gguf.TokenType.NORMAL}
    assert field(r, tok.BOS_ID) == eot and field(r, tok.EOS_ID) == eot
    assert field(r, tok.ADD_BOS) is False


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensors_match_the_weights(model, readers, dtype):
    r = readers[dtype]
    names = llama_names(TINY)
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(names.values())  # no output.weight: llama.cpp ties the head to token_embd
    t = gguf.GGMLQuantizationType
    for ours, array in state_of(model).items():
        if ours not in names:
            continue  # the attention-mask buffer
        tensor = tensors[names[ours]]
        want = array.T if ours.endswith(MATRICES) else array  # ggml rows are (out, in)
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        kind = t.F32 if want.ndim == 1 or ours == "wpe.weight" or dtype == "f32" else {"f16": t.F16, "q8_0": t.Q8_0}[dtype]
        assert tensor.tensor_type == kind, ours
        if kind == t.F32:
            np.testing.assert_array_equal(got, want)
        elif kind == t.F16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
        else:
            # Q8_0 (ggml's definition): blocks of 32 values x = d * q, d = max|x| / 127 stored as f16,
            # q rounded to an int8. Rounding errs by half a step; the f16 scale by 2^-11 of the value.
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (np.abs(got.reshape(-1, 32) - blocks) <= 0.5 * step + np.abs(blocks) * 2.0**-11 + 1e-9).all(), ours


def test_custom_vocabulary_is_the_runs_own(tmp_path):
    """A run with its own tokenizer exports that tokenizer, never GPT-2's; rows that are not whole
    Q8_0 blocks fall back to F16 as llama.cpp's converter does."""
    folder = fr.make_tokenizer(tmp_path / "run")
    rng = np.random.default_rng(0)
    state = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in expected_shapes(fr.SMALL).items()}
    path = export_gguf((fr.SMALL, state), tmp_path / "small.gguf", "q8_0", tokenizer_dir=folder)
    r = gguf.GGUFReader(path)
    encoder = json.loads((folder / "encoder.json").read_text("utf-8"))
    assert field(r, gguf.Keys.Tokenizer.LIST) == sorted(encoder, key=encoder.__getitem__)
    assert field(r, gguf.Keys.Tokenizer.MERGES) == ["Ġ t", "h e"]
    assert field(r, gguf.Keys.Tokenizer.EOS_ID) == 258
    assert {t.name: t.tensor_type for t in r.tensors}["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.F16  # 16-wide rows


def test_bad_requests_are_clear_errors(model, tmp_path):
    with pytest.raises(GGUFExportError, match="must be one of f32, f16, q8_0"):
        export_gguf(model, tmp_path / "x.gguf", "bf16")
    state = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(fr.SMALL).items()}
    state["h.0.mlp.c_fc.weight"][0, 0] = 1e6
    with pytest.raises(GGUFExportError, match="beyond float16's range"):
        export_gguf((fr.SMALL, state), tmp_path / "big.gguf", "f16", tokenizer_dir=fr.make_tokenizer(tmp_path / "tok"))
    state["h.0.mlp.c_fc.weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        export_gguf((fr.SMALL, state), tmp_path / "nan.gguf", "f32", tokenizer_dir=tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no file, no temporary left behind


def test_cli_export_gguf(model, tmp_path):
    from test_export import make_run

    run = make_run(tmp_path / "checkpoint" / "run1", model, 7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gpt_2_simple", "export", *args], cwd=tmp_path, env=env, capture_output=True, text=True)

    result = cli("--gguf", "out/run1.gguf", "--dtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == Path("out/run1.gguf")
    # The run's newest checkpoint, named after the run: the file the Python API writes, byte for byte.
    assert (tmp_path / "out/run1.gguf").read_bytes() == export_gguf(run, tmp_path / "api.gguf", "q8_0", name="run1").read_bytes()
    assert (tmp_path / "out/run1.gguf").read_bytes() != export_gguf(run, tmp_path / "f16.gguf", "f16").read_bytes()
    result = cli("--gguf", "x.gguf", "--dtype", "bf16")
    assert result.returncode == 2 and "GGUF dtype must be one of f32, f16, q8_0" in result.stderr and "Traceback" not in result.stderr


def test_export_gguf_does_not_import_torch():
    code = "import sys, gpt_2_simple.export_gguf; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


# --- loaded by llama.cpp (llama-cpp-python) --------------------------------------------------------

PROMPTS = ["The quick brown fox", "To be, or not to be:", "\n\n   spaces\tand 1234 numbers"]
NEW_TOKENS = 24


def _llama(path, n_ctx, monkeypatch):
    try:
        import llama_cpp
    except (ImportError, FileNotFoundError, OSError) as e:  # not installed, or installed without its library
        pytest.skip(f"llama-cpp-python is not usable here ({e}); docs/bench.md shows how to build it")
    from gpt_2_simple.benchmark.llama_cpp import extra_buffers_fault

    if extra_buffers_fault(str(path)):  # ggml's AMX kernels kill the process on this CPU: the file is under test, not them
        default = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_buffers():
            params = default()
            params.use_extra_bufts = False
            return params

        monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_extra_buffers)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True, verbose=False)


def _llama_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding by hand on llama.cpp's raw logits (argmax; no sampler in between)."""
    llm.reset()
    llm.eval(prompt)
    tokens, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        logits.append(row)
        tokens.append(int(row.argmax()))
        llm.eval([tokens[-1]])
    return tokens, logits


def _engine_greedy(path, prompts: list[list[int]], n: int) -> tuple[list[list[int]], dict]:
    from gpt_2_simple.engine import Engine, Request

    engine = Engine(path, backend="cpu", threads=1)
    logits: dict = {}
    results = engine.generate([Request(p, n, temperature=0.0) for p in prompts],
                              on_logits=lambda i, step, row: logits.setdefault(i, []).append(np.array(row)))
    return [r.tokens for r in results], logits


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_cpp_generates_what_our_engine_generates(model, files, tmp_path, dtype, monkeypatch):
    """f32: the same greedy tokens as our engine on the same weights, logits equal to float32 noise.
    f16 and q8_0 round the weights, so greedy paths may part: there the logits of llama.cpp fed our
    engine's tokens stay within the rounding's reach of ours."""
    llm = _llama(files[dtype], TINY.n_ctx, monkeypatch)
    enc = get_encoder()
    prompts = [enc.encode(p) for p in PROMPTS]
    ours, our_logits = _engine_greedy(export(model, tmp_path / "tiny.fp32.bin", progress=False), prompts, NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        if dtype == "f32":
            theirs, their_logits = _llama_greedy(llm, prompt, NEW_TOKENS)
            assert enc.decode(theirs) == enc.decode(ours[i])
            assert theirs == ours[i]
            np.testing.assert_allclose(np.stack(their_logits), np.stack(our_logits[i]), atol=1e-3, rtol=0)
        else:
            llm.reset()
            llm.eval(prompt + ours[i][:-1])
            theirs = np.array(llm.scores[len(prompt) - 1 : llm.n_tokens], dtype=np.float32)
            want = np.stack(our_logits[i])
            spread = want.std()
            # f16 keeps 11 bits of each weight, q8_0 about 8 (measured here: 0.2% and 5% of the spread;
            # a wrong tensor or layout gives errors of the order of the spread itself).
            assert np.abs(theirs - want).max() < (0.01 if dtype == "f16" else 0.15) * spread
            assert np.corrcoef(theirs.ravel(), want.ravel())[0, 1] > (0.99999 if dtype == "f16" else 0.9995)


def test_llama_cpp_tokenizes_like_our_encoder(files, shakespeare_text, monkeypatch):
    llm = _llama(files["f32"], TINY.n_ctx, monkeypatch)
    enc = get_encoder()
    for text in [shakespeare_text[:20_000], *PROMPTS, "Ünïcödé ñ ß Ω ж 世界 👋🏽  \n\n\t x"]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == enc.encode(text)
        ids = enc.encode(text)
        assert llm.detokenize(ids) == enc.decode_bytes(ids)


def test_llama_cpp_uses_a_custom_vocabulary(tmp_path, monkeypatch):
    folder = fr.make_tokenizer(tmp_path / "run")
    rng = np.random.default_rng(0)
    state = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in expected_shapes(fr.SMALL).items()}
    llm = _llama(export_gguf((fr.SMALL, state), tmp_path / "small.gguf", "f32", tokenizer_dir=folder), fr.SMALL.n_ctx, monkeypatch)
    assert llm.tokenize(b" the heat", add_bos=False) == get_encoder(folder).encode(" the heat")
    assert llm.token_eos() == 258
