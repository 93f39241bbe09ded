"""An independent reader of the flat model file, written from docs/format.md alone (numpy and
struct, no code shared with export.py or the C++ loader): the tests compare both of ours with it.
Also the helpers that forge files: field positions and the header checksum."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from gpt_2_simple.config import GPT2Config

HEADER_FIELDS = {  # name: (offset, struct code), docs/format.md "Header"
    "magic": (0, "8s"), "version": (8, "I"), "header_size": (12, "I"), "file_size": (16, "Q"),
    "n_vocab": (24, "I"), "n_ctx": (28, "I"), "n_embd": (32, "I"), "n_head": (36, "I"), "n_layer": (40, "I"),
    "dtype": (44, "I"), "flags": (48, "I"), "eot_token": (52, "i"), "table_offset": (56, "Q"),
    "n_tensors": (64, "I"), "table_entry_size": (68, "I"), "tokenizer_offset": (72, "Q"),
    "tokenizer_size": (80, "Q"), "metadata_offset": (88, "Q"), "metadata_size": (96, "Q"),
    "data_offset": (104, "Q"), "header_crc32": (124, "I"),
}
ENTRY_FIELDS = {  # name: (offset within the 128-byte entry, struct code), "Tensor table"
    "name": (0, "64s"), "dtype": (64, "I"), "ndim": (68, "I"), "shape0": (72, "Q"), "shape1": (80, "Q"),
    "offset": (88, "Q"), "nbytes": (96, "Q"), "scales_offset": (104, "Q"), "scales_nbytes": (112, "Q"),
    "crc32": (120, "I"), "reserved": (124, "I"),
}
DTYPE_CODES = {0: "fp32", 1: "bf16", 2: "int8"}  # int8: format version 2 only


def get(buf, offset: int, code: str):
    return struct.unpack_from("<" + code, buf, offset)[0]


def put(buf: bytearray, offset: int, code: str, value) -> None:
    struct.pack_into("<" + code, buf, offset, value)


def header(buf) -> dict:
    return {name: get(buf, off, code) for name, (off, code) in HEADER_FIELDS.items()}


def entry_offset(buf, i: int) -> int:
    return header(buf)["table_offset"] + 128 * i


def entries(buf) -> list[dict]:
    h = header(buf)
    out = []
    for i in range(h["n_tensors"]):
        base = h["table_offset"] + 128 * i
        e = {name: get(buf, base + off, code) for name, (off, code) in ENTRY_FIELDS.items()}
        e["name"] = e["name"].rstrip(b"\0").decode("ascii")
        out.append(e)
    return out


def header_crc(buf) -> int:
    data_offset = header(buf)["data_offset"]
    return zlib.crc32(bytes(buf[:124]) + bytes(4) + bytes(buf[128:data_offset]))


def fix_crc(buf: bytearray) -> bytearray:
    """Make the header checksum match again after a deliberate edit (to reach the later checks)."""
    put(buf, 124, "I", header_crc(buf))
    return buf


def read(path: str | Path) -> dict:
    """-> header fields, tensors as numpy arrays in stored layout (bf16 as uint16 bit patterns,
    int8 as int8 with their per-row float32 scales in ``scales``), the tokenizer (token bytes, kinds,
    merges) and the metadata bytes."""
    buf = Path(path).read_bytes()
    h = header(buf)
    assert h["magic"] == b"GPT2SBIN" and h["version"] in (1, 2) and h["file_size"] == len(buf)
    assert h["dtype"] in DTYPE_CODES and (h["dtype"] != 2 or h["version"] == 2)
    assert h["header_crc32"] == header_crc(buf)
    tensors, scales = {}, {}
    for e in entries(buf):
        shape = (e["shape0"],) if e["ndim"] == 1 else (e["shape0"], e["shape1"])
        dt = {0: np.dtype("<f4"), 1: np.dtype("<u2"), 2: np.dtype("i1")}[e["dtype"]]
        raw = buf[e["offset"] : e["offset"] + e["nbytes"]]
        assert zlib.crc32(raw) == e["crc32"], e["name"]
        tensors[e["name"]] = np.frombuffer(raw, dtype=dt).reshape(shape)
        if e["dtype"] == 2:  # the reserved u32 at 124 is the scales' CRC-32 in version 2
            assert e["scales_nbytes"] == 4 * shape[0] and e["scales_offset"] % 64 == 0
            raw = buf[e["scales_offset"] : e["scales_offset"] + e["scales_nbytes"]]
            assert zlib.crc32(raw) == e["reserved"], e["name"]
            scales[e["name"]] = np.frombuffer(raw, dtype="<f4")
        else:
            assert e["scales_offset"] == e["scales_nbytes"] == e["reserved"] == 0
    t = h["tokenizer_offset"]
    n, _, bytes_size, merges_size = struct.unpack_from("<IIQQ", buf, t)
    ends = np.frombuffer(buf, dtype="<u4", count=n + 1, offset=t + 24)
    kinds = buf[t + 24 + 4 * (n + 1) : t + 28 + 5 * n]
    blob_at = t + 28 + 5 * n
    token_bytes = [buf[blob_at + ends[i] : blob_at + ends[i + 1]] for i in range(n)]
    merges = buf[blob_at + bytes_size : blob_at + bytes_size + merges_size]
    metadata = buf[h["metadata_offset"] : h["metadata_offset"] + h["metadata_size"]]
    return {"header": h, "entries": entries(buf), "tensors": tensors, "scales": scales, "token_bytes": token_bytes,
            "token_kinds": bytes(kinds), "merges": merges, "metadata": metadata}


# A small model with a 259-token vocabulary: a whole valid file in ~40 KB, so forged and fuzzed
# copies are cheap and most of their bytes are structure rather than weights.
SMALL = GPT2Config(n_vocab=259, n_ctx=16, n_embd=16, n_head=2, n_layer=2)


def make_tokenizer(folder: Path) -> Path:
    """A 259-token byte-level BPE (256 bytes, two merges, <|endoftext|>) for SMALL."""
    from gpt_2_simple.tokenizer import END_OF_TEXT, bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    encoder = {bytes_to_unicode()[b]: b for b in range(256)}
    encoder.update({"Ġt": 256, "he": 257, END_OF_TEXT: 258})
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\nĠ t\nh e\n", encoding="utf-8")
    return folder


def small_model_file(folder: Path, dtype: str = "fp32", seed: int = 0) -> Path:
    """Export SMALL with random weights (numpy only: no torch needed)."""
    from gpt_2_simple.export import export
    from gpt_2_simple.weights import expected_shapes

    rng = np.random.default_rng(seed)
    state = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in expected_shapes(SMALL).items()}
    return export((SMALL, state), folder / f"small.{dtype}.bin", dtype, tokenizer_dir=make_tokenizer(folder / "tokenizer"), progress=False)
