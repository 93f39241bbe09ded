"""Export to the flat model file and to a HuggingFace folder; the C++ loader's validation.

References: the spec-based reader in format_reader.py, PyTorch (the model, bf16 rounding),
GPT-2's bundled tokenizer files, and HuggingFace transformers (the HF folder)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import format_reader as fr
from reference import TINY, random_gpt2
from gpt_2_simple.config import GPT2Config
from gpt_2_simple.export import FORMAT_VERSION, engine_file, export, export_hf, inspect, read_tokenizer, to_bf16, verify, write_tokenizer_files
from gpt_2_simple.tokenizer import BUNDLED_DIR, END_OF_TEXT, get_encoder

MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def stored(name: str, array: np.ndarray) -> np.ndarray:
    """The stored layout the spec prescribes: Conv1D matrices transposed to (out, in)."""
    return array.T if name.endswith(MATRICES) else array


def torch_bf16_bits(array: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.fixture(scope="module")
def model():
    return random_gpt2(TINY, seed=1)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return {dtype: export(model, folder / f"tiny.{dtype}.bin", dtype) for dtype in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> bytes:
    """A valid small-vocabulary model file, as bytes: the base of every forged file below."""
    return fr.small_model_file(tmp_path_factory.mktemp("small")).read_bytes()


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_round_trip_is_bit_exact(model, exported, dtype):
    path = exported[dtype]
    ours = fr.read(path)
    engine = inspect(path, verify=True, data=True)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert ours["header"]["dtype"] == {"fp32": 0, "bf16": 1}[dtype] and engine["dtype"] == dtype
    assert [e["name"] for e in ours["entries"]] == list(state)  # the canonical order is model.py's
    for name, source in state.items():
        expected = stored(name, source)
        is_weight = name.endswith((".weight",)) and (name in ("wte.weight", "wpe.weight") or name.endswith(MATRICES))
        if dtype == "bf16" and is_weight:
            expected = torch_bf16_bits(expected)
        np.testing.assert_array_equal(ours["tensors"][name], expected, err_msg=name)
        # What the engine's TensorViews point at, byte for byte.
        assert engine["data"][name] == np.ascontiguousarray(expected).tobytes(), name
    for e in engine["tensors"]:
        assert e["offset"] % 64 == 0
        assert e["dtype"] == (dtype if e["name"] in ("wte.weight", "wpe.weight") or e["name"].endswith(MATRICES) else "fp32")


def test_int8_round_trip_follows_the_spec(model, exported, tmp_path):
    """An int8 file read by the spec's reader: version 2, each weight row q (int8) and its scale as
    docs/format.md defines them (computed here from the spec in float64 where it allows), and
    what the engine's views point at; biases and LayerNorms stay fp32, exactly."""
    path = export(model, tmp_path / "tiny.int8.bin", "int8", progress=False)
    ours = fr.read(path)
    engine = inspect(path, verify=True, data=True)
    assert ours["header"]["version"] == 2 and ours["header"]["dtype"] == 2 and engine["dtype"] == "int8"
    for name, source in model.state_dict().items():
        expected = stored(name, source.numpy())
        if name not in ours["scales"]:
            np.testing.assert_array_equal(ours["tensors"][name], expected, err_msg=name)
            continue
        q, scales = ours["tensors"][name], ours["scales"][name]
        amax = np.abs(expected).max(axis=1).astype(np.float64)
        np.testing.assert_array_equal(scales, np.float32(amax / 127.0), err_msg=name)
        assert q.min() >= -127 and q.max() <= 127 and (np.abs(q).max(axis=1) == 127).all(), name
        # Nearest: |row - s q| <= s / 2 (up to the float32 division's rounding).
        assert (np.abs(expected - scales[:, None] * q.astype(np.float32)) <= scales[:, None] * (0.5 + 1e-5)).all(), name
        assert engine["data"][name] == q.tobytes() and engine["data"][name + ".scales"] == scales.tobytes(), name
    assert os.path.getsize(path) < 0.33 * os.path.getsize(exported["fp32"])  # the tokenizer (1 MB) is the rest


def test_fp32_and_bf16_files_keep_format_version_1(exported):
    """Files without int8 weights are written in version 1's layout, which every earlier
    gpt_2_simple reads, and this one loads them (int8 files are version 2)."""
    for dtype, path in exported.items():
        assert fr.header(Path(path).read_bytes())["version"] == 1, dtype
        info = inspect(path, verify=True)
        assert info["version"] == 1 and info["dtype"] == dtype


def test_header_describes_the_model(model, exported):
    info = inspect(exported["fp32"])
    assert GPT2Config(**info["config"]) == model.config
    assert info["version"] == 1 and info["flags"] == 0
    assert info["eot_token"] == 50256
    assert info["file_size"] == os.path.getsize(exported["fp32"])
    h = fr.header(Path(exported["fp32"]).read_bytes())
    for key in ("table_offset", "tokenizer_offset", "metadata_offset", "data_offset"):
        assert h[key] % 64 == 0, key
    last = max(info["tensors"], key=lambda e: e["offset"])
    assert last["offset"] + last["nbytes"] == info["file_size"]
    assert info["metadata"]["writer"].startswith("gpt_2_simple ")
    # bf16 halves the weights; biases and LayerNorms stay fp32.
    assert os.path.getsize(exported["bf16"]) < 0.55 * os.path.getsize(exported["fp32"])


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    edge = np.array([0, 0x80000000, 0x00000001, 0x007FFFFF, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                     0x7F800000, 0xFF800000, 0x7F7F8000, 0x3F807FFF], dtype=np.uint32)
    values = np.concatenate([bits, edge]).view(np.float32)
    not_nan = ~np.isnan(values)
    np.testing.assert_array_equal(to_bf16(values[not_nan]), torch_bf16_bits(values[not_nan]))
    nan = to_bf16(np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], dtype=np.uint32).view(np.float32))
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().numpy()).all()


def test_matrices_are_stored_out_by_in(model, exported):
    """A hand check of the transpose rule on one weight: row o of the stored matrix is output o."""
    t = fr.read(exported["fp32"])["tensors"]["h.0.mlp.c_fc.weight"]
    C = TINY.n_embd
    assert t.shape == (4 * C, C)
    x = np.random.default_rng(1).standard_normal(C).astype(np.float32)
    with torch.no_grad():
        ref = model.h[0].mlp.c_fc(torch.from_numpy(x)[None]).numpy()[0]
    np.testing.assert_allclose(t @ x + model.h[0].mlp.c_fc.bias.detach().numpy(), ref, rtol=1e-5, atol=1e-5)


# --- the embedded tokenizer --------------------------------------------------------------------


def test_tokenizer_files_rebuild_byte_identical(exported, tmp_path):
    write_tokenizer_files(exported["bf16"], tmp_path)
    for name in ("encoder.json", "vocab.bpe"):
        assert (tmp_path / name).read_bytes() == (BUNDLED_DIR / name).read_bytes(), name


def test_embedded_tokenizer_encodes_and_decodes_like_gpt2(exported, shakespeare_text):
    text = shakespeare_text[:20000] + " héllo 🤖<|endoftext|>x"
    reference = get_encoder()
    enc = read_tokenizer(exported["fp32"])
    ids = enc.encode(text)
    assert ids == reference.encode(text)
    info = inspect(exported["fp32"])
    assert b"".join(info["token_bytes"][i] for i in ids) == text.encode("utf-8")
    assert info["token_bytes"][50256] == END_OF_TEXT.encode() and info["token_kinds"][50256] == 1
    assert sum(info["token_kinds"]) == 1


def test_custom_tokenizer_round_trips(small_file, tmp_path):
    path = tmp_path / "small.bin"
    path.write_bytes(small_file)
    write_tokenizer_files(path, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "encoder.json").read_text("utf-8")) == json.loads(fr.make_tokenizer(tmp_path / "ref").joinpath("encoder.json").read_text("utf-8"))
    assert (tmp_path / "out" / "vocab.bpe").read_bytes() == (tmp_path / "ref" / "vocab.bpe").read_bytes()
    assert read_tokenizer(path).encode("the heat") == get_encoder(tmp_path / "ref").encode("the heat")


# --- what export refuses -----------------------------------------------------------------------


def test_export_rejects_bad_sources(model, tmp_path):
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16"):
        export(model, tmp_path / "x.bin", "fp16")
    with pytest.raises(ValueError, match="needs its GPT2Config"):
        export(state, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="lack 1 GPT-2 tensors, e.g. 'ln_f.bias'"):
        export((TINY, {k: v for k, v in state.items() if k != "ln_f.bias"}), tmp_path / "x.bin")
    with pytest.raises(ValueError, match=r"h.0.attn.c_attn.weight has shape \(192, 64\).*needs \(64, 192\)"):
        export((TINY, {**state, "h.0.attn.c_attn.weight": state["h.0.attn.c_attn.weight"].T}), tmp_path / "x.bin")
    with pytest.raises(ValueError, match="tensors GPT-2 does not have, e.g. 'h.0.extra'"):
        export((TINY, {**state, "h.0.extra": state["ln_f.bias"]}), tmp_path / "x.bin")
    broken = state["h.1.mlp.c_fc.bias"].copy()
    broken[3] = np.nan
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.bias holds NaN"):
        export((TINY, {**state, "h.1.mlp.c_fc.bias": broken}), tmp_path / "x.bin")
    with pytest.raises(ValueError, match="has 259 tokens but the model's n_vocab is 50257"):
        export(model, tmp_path / "x.bin", tokenizer_dir=fr.make_tokenizer(tmp_path / "tok"))
    with pytest.raises(TypeError, match="cannot export a int"):
        export(3, tmp_path / "x.bin")
    assert not any(p.name.endswith(".bin") or p.name.endswith(".tmp") for p in tmp_path.iterdir())  # nothing half-written


def test_ignores_buffers_that_state_dicts_carry(model, tmp_path):
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"]
    state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), dtype=np.float32))
    path = export((TINY, state), tmp_path / "x.bin")
    assert len(inspect(path)["tensors"]) == 12 * TINY.n_layer + 4


# --- the loader's validation: each damage gets its own message ----------------------------------


def forge(small_file: bytes, tmp_path: Path, edit, fix: bool = True) -> Path:
    buf = bytearray(small_file)
    edit(buf)
    if fix:
        fr.fix_crc(buf)
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(buf))
    return path


def entry_index(buf, name: str) -> int:
    return [e["name"] for e in fr.entries(buf)].index(name)


def set_entry(buf, name: str, field: str, value) -> None:
    off, code = fr.ENTRY_FIELDS[field]
    fr.put(buf, fr.entry_offset(buf, entry_index(buf, name)) + off, code, value)


def set_header(buf, field: str, value) -> None:
    off, code = fr.HEADER_FIELDS[field]
    fr.put(buf, off, code, value)


def data_offset_of(buf, name):
    return fr.entries(buf)[entry_index(buf, name)]["offset"]


CASES = {
    "bad magic": (lambda b: b.__setitem__(slice(0, 8), b"GGUF\0\0\0\0"), False, r"is not a gpt_2_simple model file \(it starts with 'GGUF\.\.\.\.'"),
    "newer version": (lambda b: set_header(b, "version", 3), False, r"written by a newer gpt_2_simple \(format version 3; this one reads version 2\): upgrade"),
    "version 0": (lambda b: set_header(b, "version", 0), False, "format version 0 does not exist"),
    "file_size lies": (lambda b: set_header(b, "file_size", len(b) + 1000), True, r"is truncated: it has \d+ bytes but its header says \d+ \(1000 bytes missing"),
    "header crc": (lambda b: b.__setitem__(fr.header(b)["tokenizer_offset"] + 900, 0x55), False, "header checksum mismatch .*re-export it with `gpt_2_simple export`"),
    "reserved byte": (lambda b: b.__setitem__(115, 1), True, "reserved header byte 115 is not zero"),
    "incompatible flag": (lambda b: set_header(b, "flags", 1 << 20), True, r"uses features this gpt_2_simple does not know \(flags 0x100000\)"),
    "int8 in version 1": (lambda b: set_header(b, "dtype", 2), True, r"its weights are int8 \(dtype code 2\), which format version 1 does not have"),
    "unknown dtype": (lambda b: set_header(b, "dtype", 7), True, "unknown weight dtype code 7"),
    "zero dim": (lambda b: set_header(b, "n_embd", 0), True, "header field n_embd is 0; it must be 1..2147483647"),
    "huge dim": (lambda b: set_header(b, "n_vocab", 0xFFFFFFFF), True, "header field n_vocab is 4294967295"),
    "huge n_layer": (lambda b: set_header(b, "n_layer", 0x7FFFFFFF), True, "n_layer is 2147483647, but the table of 25769803768 tensors that needs would not fit"),
    "heads": (lambda b: set_header(b, "n_head", 3), True, r"n_embd \(16\) is not a multiple of n_head \(3\)"),
    "eot": (lambda b: set_header(b, "eot_token", 259), True, "eot_token is 259, outside the vocabulary of 259 tokens"),
    "vocab vs tokenizer": (lambda b: (set_header(b, "n_vocab", 300)), True, "the tokenizer has 259 tokens but the model's vocabulary has 300"),
    "misaligned section": (lambda b: set_header(b, "metadata_offset", fr.header(b)["metadata_offset"] + 8), True, "the metadata .* is not 64-byte aligned"),
    "section past data": (lambda b: set_header(b, "tokenizer_size", 1 << 62), True, r"the tokenizer \(offset \d+, 4611686018427387904 bytes\) is not 64-byte aligned inside"),
    "sections overlap": (lambda b: set_header(b, "metadata_offset", fr.header(b)["tokenizer_offset"]), True, "the tokenizer and the metadata overlap"),
    "data offset": (lambda b: set_header(b, "data_offset", 1 << 40), True, "data_offset 1099511627776 is not a multiple of 64 inside the file"),
    "token ends": (lambda b: fr.put(b, fr.header(b)["tokenizer_offset"] + 24 + 4 * 10, "I", 1 << 30), True, "token 9's bytes end before they start|token 10's bytes end before"),
    "token kind": (lambda b: b.__setitem__(fr.header(b)["tokenizer_offset"] + 24 + 4 * 260 + 5, 9), True, "token 5 has unknown kind 9"),
    "unknown name": (lambda b: set_entry(b, "h.1.ln_2.bias", "name", b"h.7.ln_2.bias"), True, r"holds an unknown tensor 'h.7.ln_2.bias' \(entry \d+\), which a 2-layer GPT-2 does not have"),
    "duplicate name": (lambda b: set_entry(b, "h.1.ln_2.bias", "name", b"h.1.ln_2.weight"), True, r"tensor h.1.ln_2.weight appears twice \(entries \d+ and \d+\)"),
    "missing name": (lambda b: set_header(b, "n_tensors", 27), True, r"tensor ln_f.bias is missing \(the table has 27 entries; a 2-layer model has 28\)"),
    "malformed name": (lambda b: set_entry(b, "wpe.weight", "name", b"wpe weight"), True, "has a malformed name"),
    "wrong shape": (lambda b: (set_entry(b, "h.0.attn.c_attn.weight", "shape0", 16), set_entry(b, "h.0.attn.c_attn.weight", "shape1", 48)), True,
                    r"has tensor h.0.attn.c_attn.weight of shape \(16, 48\) but the header's config .* needs \(48, 16\)"),
    "wrong ndim": (lambda b: set_entry(b, "ln_f.weight", "ndim", 5), True, r"has tensor ln_f.weight of shape 5-d"),
    "huge shape": (lambda b: set_entry(b, "wte.weight", "shape0", 1 << 63), True, r"has tensor wte.weight of shape \(9223372036854775808, 16\)"),
    "wrong dtype": (lambda b: set_entry(b, "h.0.ln_1.bias", "dtype", 1), True, r"tensor h.0.ln_1.bias has dtype code 1, expected 0 \(fp32\)"),
    "wrong nbytes": (lambda b: set_entry(b, "wpe.weight", "nbytes", 4), True, "tensor wpe.weight has 4 bytes but its shape needs 1024"),
    "misaligned tensor": (lambda b: set_entry(b, "h.1.mlp.c_fc.bias", "offset", data_offset_of(b, "h.1.mlp.c_fc.bias") + 4), True,
                          r"tensor h.1.mlp.c_fc.bias starts at byte \d+, which is not a 64-byte aligned position"),
    "tensor in header": (lambda b: set_entry(b, "ln_f.bias", "offset", 0), True, "tensor ln_f.bias starts at byte 0"),
    "tensor past end": (lambda b: set_entry(b, "h.0.ln_2.weight", "offset", len(b) - 64 + 64 * 100), True,
                        r"is truncated or damaged: tensor h.0.ln_2.weight ends at byte \d+ but the file has \d+ bytes; re-export it"),
    "offset overflow": (lambda b: set_entry(b, "h.0.ln_2.weight", "offset", (1 << 64) - 64), True, r"tensor h.0.ln_2.weight ends at byte 18446744073709551552\+64"),
    "tensors overlap": (lambda b: set_entry(b, "h.1.ln_1.bias", "offset", data_offset_of(b, "h.1.ln_1.weight")), True, "tensors h.1.ln_1.(weight|bias) and h.1.ln_1.(weight|bias) overlap"),
    "reserved entry": (lambda b: set_entry(b, "wte.weight", "scales_offset", 64), True, "tensor wte.weight's reserved fields are not zero"),
}


def scales_offset_of(buf, name):
    return fr.entries(buf)[entry_index(buf, name)]["scales_offset"]


# The same on an int8 file (format version 2): its tensors' scales (docs/format.md, "int8").
INT8_CASES = {
    "scales size": (lambda b: set_entry(b, "h.0.mlp.c_fc.weight", "scales_nbytes", 4), "tensor h.0.mlp.c_fc.weight has 4 bytes of scales but its 64 rows need 256"),
    "scales misaligned": (lambda b: set_entry(b, "wte.weight", "scales_offset", scales_offset_of(b, "wte.weight") + 4), r"tensor wte.weight's scales \(offset \d+\) are not 64-byte aligned"),
    "scales past end": (lambda b: set_entry(b, "wpe.weight", "scales_offset", (1 << 64) - 64), "tensor wpe.weight's scales"),
    "scales in header": (lambda b: set_entry(b, "wpe.weight", "scales_offset", 0), "tensor wpe.weight's scales"),
    "scales overlap": (lambda b: set_entry(b, "h.1.attn.c_proj.weight", "scales_offset", data_offset_of(b, "h.1.attn.c_proj.weight")),
                       r"tensors h.1.attn.c_proj.weight('s scales)? and h.1.attn.c_proj.weight('s scales)? overlap"),
    "scales on fp32 tensor": (lambda b: set_entry(b, "h.0.ln_1.bias", "reserved", 5), "tensor h.0.ln_1.bias's reserved fields are not zero"),
    "fp32 matrix": (lambda b: set_entry(b, "h.0.attn.c_attn.weight", "dtype", 0), r"tensor h.0.attn.c_attn.weight has dtype code 0, expected 2 \(int8\)"),
}


@pytest.fixture(scope="module")
def small_int8_file(tmp_path_factory) -> bytes:
    return fr.small_model_file(tmp_path_factory.mktemp("small8"), "int8").read_bytes()


@pytest.mark.parametrize("case", list(INT8_CASES))
def test_loader_rejects_damaged_int8_tables(small_int8_file, tmp_path, case):
    edit, message = INT8_CASES[case]
    with pytest.raises(ValueError, match=message):
        inspect(forge(small_int8_file, tmp_path, edit))


def test_int8_scale_corruption_is_found_by_full_verification(small_int8_file, tmp_path):
    buf = bytearray(small_int8_file)
    buf[scales_offset_of(buf, "h.1.mlp.c_fc.weight") + 6] ^= 0x01
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(buf))
    inspect(path)
    with pytest.raises(ValueError, match=r"tensor h.1.mlp.c_fc.weight's scales fail their checksum .*re-export it"):
        verify(path)


@pytest.mark.parametrize("case", list(CASES))
def test_loader_rejects_damage_with_a_clear_message(small_file, tmp_path, case):
    edit, fix, message = CASES[case]
    path = forge(small_file, tmp_path, edit, fix)
    with pytest.raises(ValueError, match=message) as excinfo:
        inspect(path)
    assert str(excinfo.value).startswith(str(path))


def test_huge_matrix_dims_are_overflow_checked(small_file, tmp_path):
    """n_embd near 2^31 makes 4C * C * 4 bytes overflow 64 bits; the entry that claims it is put
    first in the table (readers accept any order) so its size computation is the one reached."""
    C = 0x7FFFFFFE

    def edit(b):
        set_header(b, "n_embd", C)
        set_header(b, "n_head", 2)
        i, j = entry_index(b, "wte.weight"), entry_index(b, "h.0.mlp.c_fc.weight")
        ei, ej = fr.entry_offset(b, i), fr.entry_offset(b, j)
        b[ei : ei + 128], b[ej : ej + 128] = b[ej : ej + 128], b[ei : ei + 128]
        set_entry(b, "h.0.mlp.c_fc.weight", "shape0", 4 * C)
        set_entry(b, "h.0.mlp.c_fc.weight", "shape1", C)

    with pytest.raises(ValueError, match=r"tensor h.0.mlp.c_fc.weight of shape \(8589934584, 2147483646\) is too large to address"):
        inspect(forge(small_file, tmp_path, edit))


def test_truncated_files(small_file, tmp_path):
    path = tmp_path / "model.bin"
    for size in (len(small_file) - 1, len(small_file) // 2, 200):
        path.write_bytes(small_file[:size])
        with pytest.raises(ValueError, match=rf"is truncated: it has {size} bytes but its header says {len(small_file)}"):
            inspect(path)
    for size in (0, 127):
        path.write_bytes(small_file[:size])
        with pytest.raises(ValueError, match=f"it has {size} bytes, fewer than the 128-byte header"):
            inspect(path)


def test_data_corruption_is_found_by_full_verification(small_file, tmp_path):
    buf = bytearray(small_file)
    buf[data_offset_of(buf, "h.1.mlp.c_proj.weight") + 10] ^= 0x01
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(buf))
    inspect(path)  # the structure is sound: the default load does not read the weights
    with pytest.raises(ValueError, match=r"tensor h.1.mlp.c_proj.weight fails its checksum .*re-export it"):
        verify(path)
    with pytest.raises(ValueError, match="h.1.mlp.c_proj.weight fails its checksum"):
        inspect(path, verify=True)


def test_wrong_kinds_of_file(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="cannot open model file .*nothing.bin"):
        inspect(tmp_path / "nothing.bin")
    with pytest.raises(ValueError, match="is a folder, not a model file"):
        inspect(tmp_path)
    from safetensors.numpy import save_file

    save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="looks like a safetensors checkpoint: convert it with `gpt_2_simple export`"):
        inspect(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"looks like a PyTorch checkpoint \(zip\)"):
        inspect(tmp_path / "pytorch_model.bin")


def test_format_error_is_a_value_error():
    from gpt_2_simple import _engine

    assert issubclass(_engine.FormatError, ValueError)
    assert _engine.FORMAT_VERSION == 2 == FORMAT_VERSION


# --- HuggingFace folder -------------------------------------------------------------------------


def test_hf_folder_loads_in_transformers(model, tmp_path, shakespeare_text):
    import transformers

    out = export_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    for name, p in model.state_dict().items():
        assert torch.equal(hf.transformer.state_dict()[name], p), name
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    idx = torch.randint(0, TINY.n_vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(hf(idx).logits.numpy(), model(idx).numpy(), rtol=1e-5, atol=1e-5)
    tok = transformers.GPT2Tokenizer.from_pretrained(out)
    text = shakespeare_text[:3000] + " héllo 🤖 <|endoftext|> end"
    assert tok(text)["input_ids"] == get_encoder().encode(text)
    assert tok.eos_token_id == 50256
    assert json.loads((out / "vocab.json").read_text("utf-8")) == json.loads((BUNDLED_DIR / "encoder.json").read_text("utf-8"))
    assert (out / "merges.txt").read_bytes() == (BUNDLED_DIR / "vocab.bpe").read_bytes()


# --- the export cache generate() uses, and the command line --------------------------------------


def make_run(folder: Path, model, step: int) -> Path:
    from gpt_2_simple.weights import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder / "hparams.json")
    for name in ("encoder.json", "vocab.bpe"):
        (folder / name).write_bytes((BUNDLED_DIR / name).read_bytes())
    save_weights(folder / f"model-{step}.safetensors", model.state_dict(), model.config, metadata={"step": str(step)})
    return folder


def test_engine_file_is_cached_and_follows_the_checkpoint(model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = make_run(tmp_path / "checkpoint" / "run1", model, 10)
    first = engine_file(run, "bf16", progress=False)
    assert first == run / "model-10.bf16.bin"
    info = inspect(first, verify=True)
    assert info["dtype"] == "bf16" and info["metadata"]["source"]["step"] == 10
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    assert engine_file(run, "bf16", progress=False) == first  # reused, not rewritten
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp
    fp32 = engine_file(run, "fp32", progress=False)
    assert fp32 == run / "model-10.fp32.bin"

    # Training saves step 20 and rotates step 10 out: the new weights are exported, the old exports removed.
    other = random_gpt2(TINY, seed=5)
    make_run(run, other, 20)
    (run / "model-10.safetensors").unlink()
    second = engine_file(run, "bf16", progress=False)
    assert second == run / "model-20.bf16.bin"
    assert not first.exists() and not fp32.exists()
    np.testing.assert_array_equal(fr.read(second)["tensors"]["ln_f.bias"], other.ln_f.bias.detach().numpy())

    # The checkpoint file replaced under the same name (new size/mtime): rebuilt.
    make_run(run, model, 20)
    os.utime(run / "model-20.safetensors", ns=(1, 1))
    third = engine_file(run, "bf16", progress=False)
    assert third == second and inspect(third)["metadata"]["source"]["mtime_ns"] == 1
    np.testing.assert_array_equal(fr.read(third)["tensors"]["ln_f.bias"], model.ln_f.bias.detach().numpy())

    # A damaged export (here truncated) is rebuilt rather than handed to the engine.
    third.write_bytes(third.read_bytes()[:5000])
    assert engine_file(run, "bf16", progress=False) == third
    inspect(third, verify=True)
    assert not list(run.glob(".*.tmp"))


def test_engine_file_falls_back_to_the_user_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = make_run(tmp_path / "models" / "tiny", model, 3)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real_access(p, mode, **kw))
    folder.chmod(0o555)  # read-only for a non-root user; os.access is patched for root, which ignores modes
    try:
        path = engine_file(folder, "fp32", progress=False)
        assert path.is_relative_to(tmp_path / "cache" / "gpt_2_simple" / "engines") and path.name == "model-3.fp32.bin"
        assert engine_file(folder, "fp32", progress=False) == path
        assert not list(folder.glob("*.bin"))
    finally:
        folder.chmod(0o755)


def test_failed_export_leaves_no_file(model, tmp_path):
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    state["ln_f.weight"][0] = np.inf  # the last tensor: most of the file is written when it fails
    run = tmp_path / "run"
    from gpt_2_simple.weights import save_weights

    run.mkdir()
    TINY.save(run / "hparams.json")
    save_weights(run / "model-1.safetensors", state)
    (run / "model-1.fp32.bin").write_bytes(b"previous export")
    with pytest.raises(ValueError, match="ln_f.weight holds NaN or infinite values"):
        export(run, run / "model-1.fp32.bin")
    assert (run / "model-1.fp32.bin").read_bytes() == b"previous export"
    assert sorted(p.name for p in run.iterdir()) == ["hparams.json", "model-1.fp32.bin", "model-1.safetensors"]


def test_hf_folder_exports_back_to_the_same_file(model, exported, tmp_path):
    hf = export_hf(model, tmp_path / "hf")
    again = export(hf, tmp_path / "again.bin")
    ours, theirs = fr.read(exported["fp32"]), fr.read(again)
    assert ours["tensors"].keys() == theirs["tensors"].keys()
    for name in ours["tensors"]:
        np.testing.assert_array_equal(ours["tensors"][name], theirs["tensors"][name])
    assert ours["token_bytes"] == theirs["token_bytes"] and ours["merges"] == theirs["merges"]


def test_cli_export(model, tmp_path):
    make_run(tmp_path / "checkpoint" / "run1", model, 7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python"), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gpt_2_simple", "export", *args], cwd=tmp_path, env=env, capture_output=True, text=True)

    result = cli("--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == Path("checkpoint/run1/model-7.bf16.bin")
    assert inspect(tmp_path / "checkpoint/run1/model-7.bf16.bin")["dtype"] == "bf16"
    result = cli("--run_name", "run1", "-o", "out/model.bin")
    assert result.returncode == 0 and inspect(tmp_path / "out/model.bin")["dtype"] == "fp32"
    result = cli("--hf", "hf")
    assert result.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    result = cli("--run_name", "nope")
    assert result.returncode == 2 and result.stderr.startswith("gpt_2_simple export: error: no model weights at checkpoint/nope")
    assert "Traceback" not in result.stderr


def test_export_does_not_import_torch():
    code = "import sys, gpt_2_simple.export, gpt_2_simple.cli; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_an_export_is_its_own_engine_file(exported, tmp_path):
    assert engine_file(exported["bf16"], "bf16") == exported["bf16"]
    with pytest.raises(ValueError, match="holds bf16 weights, not fp32"):
        engine_file(exported["bf16"], "fp32")
    with pytest.raises(ValueError, match="is already an exported model file"):
        export(exported["fp32"], tmp_path / "again.bin")
