"""Issue 18, findings 4 and 6: crafted weight files fail fast with the reader's own error; stale or
damaged engine files are caught; the deployment file from the CLI.

The crafted files are built here from the formats' specifications (LevelDB table + TensorFlow
BundleEntryProto, safetensors, our flat binary via format_reader); the expensive cases run in a
subprocess with a memory cap and a timeout, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import format_reader as fr
from reference import TINY
from gpt_2_simple.config import HparamsError
from gpt_2_simple.engine import Engine, Request
from gpt_2_simple.export import engine_file, inspect, read_tokenizer, verify
from gpt_2_simple.tf_checkpoint import TFCheckpoint, TFCheckpointError, crc32c
from gpt_2_simple.weights import WeightsFileError, expected_shapes, load_weights, save_weights


def run_capped(code: str, timeout: float = 60, memory: int = 2 << 30) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter limited to ``memory`` bytes of address space and ``timeout``
    seconds: what used to take gigabytes or minutes fails the test instead of the machine."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
    # This process's import path: the package it tests (installed, or the working tree) and tests/.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"took more than {timeout} s")


def refusal(imports: str, call: str, error: str, timeout: float = 60) -> str:
    """What ``call`` raises as ``error`` (its message, after "refused:") in a capped subprocess."""
    r = run_capped(f"{imports}\ntry:\n    {call}\nexcept {error} as e:\n    print('refused:', e)\n", timeout=timeout)
    assert "refused:" in r.stdout, r.stdout + r.stderr
    return r.stdout


# --- a LevelDB table as TensorFlow writes checkpoint indexes -----------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def block(entries: list[tuple[int, bytes, bytes]]) -> bytes:
    """(shared, unshared key bytes, value) entries; one restart point at 0."""
    body = b"".join(varint(s) + varint(len(k)) + varint(len(v)) + k + v for s, k, v in entries)
    return body + struct.pack("<II", 0, 1)


def table(data_blocks: list[bytes], index_refs: list[int] | None = None) -> bytes:
    """An SSTable of ``data_blocks``; the index block lists block ``index_refs[i]`` as its i-th entry."""
    out, handles = bytearray(), []
    for b in data_blocks:
        handles.append(varint(len(out)) + varint(len(b)))
        out += b + b"\0" + struct.pack("<I", masked(crc32c(b"\0", crc32c(b))))
    refs = range(len(data_blocks)) if index_refs is None else index_refs
    index = block([(0, b"k%06d" % i, handles[r]) for i, r in enumerate(refs)])
    index_handle = varint(len(out)) + varint(len(index))
    out += index + b"\0" + struct.pack("<I", masked(crc32c(b"\0", crc32c(index))))
    footer = (varint(0) + varint(0) + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    return bytes(out + footer)


TF_IMPORTS = "from gpt_2_simple.tf_checkpoint import TFCheckpoint, TFCheckpointError"


def test_index_keys_growing_by_one_byte_fail_fast(tmp_path):
    # 344 KB of entries that each extend the previous key by one byte: 3.5 GB and 18 s of keys before
    entries = [(0, b"a", b"")] + [(i, b"a", b"") for i in range(1, 86_000)]
    (tmp_path / "model.ckpt.index").write_bytes(table([block(entries)]))
    assert (tmp_path / "model.ckpt.index").stat().st_size > 300_000
    assert "longer than the 1024" in refusal(TF_IMPORTS, f"TFCheckpoint({str(tmp_path / 'model.ckpt')!r})", "TFCheckpointError")


def test_index_listing_one_block_many_times_fails_fast(tmp_path):
    entries = [(0, b"model/x%05d" % i, b"") for i in range(2000)]
    (tmp_path / "model.ckpt.index").write_bytes(table([block(entries)], index_refs=[0] * 1000))
    message = refusal(TF_IMPORTS, f"TFCheckpoint({str(tmp_path / 'model.ckpt')!r})", "TFCheckpointError", timeout=30)
    assert "listed more than once" in message


def bundle_entry(shape: list[int], size: int, dtype: int = 1) -> bytes:
    dims = b"".join(b"\x12" + varint(len(d)) + d for d in (b"\x08" + varint(x) for x in shape))
    return b"\x08" + varint(dtype) + b"\x12" + varint(len(dims)) + dims + b"\x28" + varint(size)


def test_index_entries_beyond_limits_are_the_readers_error(tmp_path):
    prefix = tmp_path / "model.ckpt"
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(b"")
    # a shape whose product wraps int64 to the declared size (0) and a rank beyond any tensor's
    for shape, size, message in [([1 << 32, 1 << 32], 0, "should take"), ([1] * 40, 4, "more than 32 dimensions")]:
        Path(f"{prefix}.index").write_bytes(table([block([(0, b"model/wte", bundle_entry(shape, size))])]))
        with pytest.raises(TFCheckpointError, match=message):
            TFCheckpoint(prefix).tensor("model/wte")


# --- hyperparameters -----------------------------------------------------------------------------


@pytest.fixture
def tiny_folder(tmp_path):
    rng = np.random.default_rng(0)
    state = {n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(TINY).items()}
    folder = tmp_path / "run"
    folder.mkdir()
    save_weights(folder / "model-5.safetensors", state)
    TINY.save(folder / "hparams.json")
    return folder, state


@pytest.mark.parametrize("where", ["hparams.json", "config.json", "metadata"])
def test_a_billion_layers_is_refused_before_allocating(tiny_folder, where):
    folder, state = tiny_folder
    hparams = {**TINY.to_hparams(), "n_layer": 10**9}
    (folder / "hparams.json").unlink()
    if where == "metadata":
        save_weights(folder / "model-5.safetensors", state, metadata={"config": json.dumps(hparams)})
    else:
        (folder / where).write_text(json.dumps(hparams))
    imports = "from gpt_2_simple.config import HparamsError\nfrom gpt_2_simple.weights import load_weights"
    assert "n_layer=1000000000 is beyond" in refusal(imports, f"load_weights({str(folder)!r})", "HparamsError")


@pytest.mark.parametrize("content", ["[1, 2]", "[" * 100_000 + "]" * 100_000, '{"n_embd": 64, "n_head": 4, "n_layer": 2.0}',
                                     '{"n_embd": 64, "n_head": 4, "n_layer": true}', "\xff"])
def test_unreadable_hparams_are_the_readers_error(tiny_folder, content):
    folder, _ = tiny_folder
    (folder / "hparams.json").write_text(content, encoding="latin-1")
    with pytest.raises(HparamsError):
        load_weights(folder)


def test_hf_config_with_odd_values_is_the_readers_error(tiny_folder):
    folder, _ = tiny_folder
    (folder / "hparams.json").unlink()
    (folder / "config.json").write_text(json.dumps({**TINY.to_hparams(), "layer_norm_epsilon": "small"}))
    with pytest.raises(HparamsError, match="layer_norm_epsilon"):
        load_weights(folder)


# --- safetensors headers -------------------------------------------------------------------------


def safetensors_file(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
     bytes(12), "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
     bytes(16), "gap of 4 bytes"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8), "dimensions must be integers"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, bytes(8), "dimensions must be integers"),
    ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, bytes(8), "dimensions must be integers"),
    ({"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 8]}}, bytes(8), "dimensions must be integers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e400]}}, bytes(8), "not integers"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unreadable header entry"),
    ({"a": {"dtype": "F32", "shape": [1] * 20, "data_offsets": [0, 4]}}, bytes(4), "at most 8"),
    ({"__metadata__": {"config": 5}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "JSON object of strings"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "the tensors end at byte"),
])  # fmt: skip
def test_crafted_safetensors_headers_are_refused(tmp_path, header, data, message):
    path = safetensors_file(tmp_path / "x.safetensors", header, data)
    TINY.save(tmp_path / "hparams.json")
    with pytest.raises(WeightsFileError, match=message):
        load_weights(path)


def test_deeply_nested_safetensors_header_is_the_readers_error(tmp_path):
    path = tmp_path / "x.safetensors"
    encoded = b"[" * 200_000 + b"]" * 200_000
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)
    with pytest.raises(WeightsFileError):
        load_weights(path)


# --- the tokenizer section of a model file --------------------------------------------------------


@pytest.fixture(scope="module")
def small_bytes(tmp_path_factory) -> bytes:
    return fr.small_model_file(tmp_path_factory.mktemp("small")).read_bytes()


def edit_tokenizer(buf: bytearray, kind_of: dict[int, int] = {}, byte_of: dict[int, int] = {}, merges: tuple[bytes, bytes] | None = None):
    t = fr.header(buf)["tokenizer_offset"]
    n = struct.unpack_from("<I", buf, t)[0]
    kinds, ends, blob = t + 28 + 4 * n, t + 24, t + 28 + 5 * n
    for i, k in kind_of.items():
        buf[kinds + i] = k
    for i, b in byte_of.items():
        buf[blob + struct.unpack_from("<I", buf, ends + 4 * i)[0]] = b
    if merges:
        at = buf.index(merges[0], blob)
        buf[at : at + len(merges[0])] = merges[1]
    fr.fix_crc(buf)


@pytest.mark.parametrize("edit, message", [
    ({"byte_of": {1: 0}}, "tokens 0 and 1 are the same bytes"),
    ({"kind_of": {256: 1}}, r"token 256 is a special token \(' t'\); only <\|endoftext\|>"),
    ({"kind_of": {258: 0}}, "the eot_token 258 is not the special token"),
])  # fmt: skip
def test_tokenizer_with_duplicate_or_non_byte_level_tokens_is_refused(small_bytes, tmp_path, edit, message):
    buf = bytearray(small_bytes)
    edit_tokenizer(buf, **edit)
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(buf))
    with pytest.raises(ValueError, match="has an unusable tokenizer: " + message):
        inspect(path)
    with pytest.raises(ValueError, match="unusable tokenizer"):
        Engine(path, backend="cpu")


@pytest.mark.parametrize("merge", [b"h x", b"he ", b"h\xffe"])
def test_merges_that_make_no_token_are_refused_when_read(small_bytes, tmp_path, merge):
    buf = bytearray(small_bytes)
    edit_tokenizer(buf, merges=(b"h e", merge))
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(buf))
    inspect(path)  # the engine never reads the merges ...
    with pytest.raises(ValueError, match="unusable tokenizer: (merge line 3|its merges are not UTF-8)"):
        read_tokenizer(path)  # ... the tokenizer does, and refuses them with a message


def test_the_real_tokenizer_still_loads(small_bytes, tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(small_bytes)
    from gpt_2_simple.tokenizer import get_encoder

    reference = get_encoder(fr.make_tokenizer(tmp_path / "ref"))
    assert read_tokenizer(path).encode("the heat") == reference.encode("the heat")


# --- finding 6: stale or damaged engine files ----------------------------------------------------


def overwrite_keeping_mtime(path: Path, offset: int, data: bytes) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def wte_offset(path: Path) -> int:
    return next(e["offset"] for e in fr.entries(path.read_bytes()) if e["name"] == "wte.weight")


def test_cached_export_with_overwritten_weights_is_rebuilt(tiny_folder):
    folder, state = tiny_folder
    path = engine_file(folder, "fp32", progress=False)
    overwrite_keeping_mtime(path, wte_offset(path), bytes(4096))
    again = engine_file(folder, "fp32", progress=False)
    assert again == path
    verify(path)  # rebuilt: every checksum matches again
    np.testing.assert_array_equal(fr.read(path)["tensors"]["wte.weight"], state["wte.weight"])


def test_cached_export_of_a_replaced_checkpoint_is_rebuilt(tiny_folder):
    folder, state = tiny_folder
    ckpt = folder / "model-5.safetensors"
    path = engine_file(folder, "fp32", progress=False)
    st = ckpt.stat()
    other = {n: a + 1 for n, a in state.items()}
    save_weights(ckpt, other)  # another checkpoint of the same size under the same name ...
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and modification time (tar, rsync -t, cp -p)
    assert ckpt.stat().st_size == st.st_size
    engine_file(folder, "fp32", progress=False)
    np.testing.assert_array_equal(fr.read(path)["tensors"]["wte.weight"], other["wte.weight"])


def test_engine_checks_a_changed_file_once_and_has_an_opt_out(small_bytes, tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(small_bytes)
    Engine(path, backend="cpu")  # first use: verified and stamped
    overwrite_keeping_mtime(path, wte_offset(path), bytes(64))
    with pytest.raises(ValueError, match="tensor wte.weight fails its checksum"):
        Engine(path, backend="cpu")
    Engine(path, backend="cpu", verify=False)  # the opt-out loads it as it is
    with pytest.raises(ValueError, match="verify must be"):
        Engine(path, backend="cpu", verify="sometimes")


def test_engine_reads_into_memory_without_mmap(small_bytes, tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(small_bytes)
    request = [Request([1, 2, 3], max_new_tokens=8, temperature=0)]
    mapped = Engine(path, backend="cpu").generate(request)[0].tokens
    # The file is cut to nothing while the engine holds it: mapped, that would be SIGBUS.
    r = run_capped(f"""
        import os
        from gpt_2_simple.engine import Engine, Request
        e = Engine({str(path)!r}, backend="cpu", mmap=False)
        os.truncate({str(path)!r}, 0)
        print(e.generate([Request([1, 2, 3], max_new_tokens=8, temperature=0)])[0].tokens)
    """, memory=4 << 30)
    assert r.returncode == 0 and r.stdout.strip() == str(mapped), r.stdout + r.stderr


# --- the deployment file from the CLI -----------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "gpt_2_simple", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_verify_gives_a_verdict_and_exit_code(small_bytes, tmp_path):
    good = tmp_path / "good.bin"
    good.write_bytes(small_bytes)
    r = cli("verify", str(good), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and r.stdout.startswith(f"{good}: OK: fp32 GPT-2 (n_layer=2"), r.stdout
    bad = tmp_path / "bad.bin"
    bad.write_bytes(small_bytes)
    overwrite_keeping_mtime(bad, wte_offset(bad), bytes(64))
    r = cli("verify", str(bad), cwd=tmp_path)
    assert r.returncode == 1 and r.stdout.count("\n") == 1 and "FAILED" in r.stdout and "wte.weight fails its checksum" in r.stdout, r.stdout


@pytest.mark.parametrize("flag", ["--model", "--model_name"])
def test_cli_generates_from_a_model_file(small_bytes, tmp_path, flag):
    path = tmp_path / "small.bin"
    path.write_bytes(small_bytes)
    r = cli("generate", flag, str(path), "--prefix", "the", "--length", "12", "--temperature", "0", "--folder", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    enc = read_tokenizer(path)
    prompt = enc.encode("the")
    tokens = Engine(path, backend="cpu").generate([Request(prompt, max_new_tokens=12 - len(prompt), temperature=0)])[0].tokens
    (written,) = (tmp_path / "out").iterdir()
    assert written.read_text(encoding="utf-8") == enc.decode(prompt + tokens) + "\n"  # one text per file, newline-ended
