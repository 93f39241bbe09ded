"""Export a model to the flat binary the C++ engines memory-map (docs/format.md), or to a
HuggingFace folder that ``transformers`` loads.

``export(source, "model.bin", dtype="bf16")`` takes a run folder (``checkpoint/run1``), a model
folder (``models/124M``, TensorFlow or HuggingFace files), a single weights file, our PyTorch
``GPT2``, a session, or ``(config, state_dict)``. ``engine_file(source, dtype)`` is what
``generate()`` uses: the export of the newest checkpoint, cached beside it and rebuilt when the
checkpoint changes. Nothing here imports torch unless the source is a torch module.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import Mapping
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import __version__
from .config import GPT2Config
from .fileio import atomic_write
from .tokenizer import BUNDLED_DIR, END_OF_TEXT, Encoder, bytes_to_unicode
from .weights import expected_shapes, find_checkpoint, load_weights, save_weights

__all__ = ["export", "export_hf", "engine_file", "inspect", "verify", "read_tokenizer", "write_tokenizer_files", "DTYPES",
           "file_crc32", "needs_verify", "mark_verified"]

MAGIC = b"GPT2SBIN"
FORMAT_VERSION = 2  # the newest this writer knows; it writes version 1 for fp32 and bf16 files (format_version)
DTYPES = {"fp32": 0, "bf16": 1, "int8": 2}  # on-disk codes
ALIGN = 64
# docs/format.md, "Header" and "Tensor table": both 128 bytes.
HEADER = struct.Struct("<8sIIQ5IIIiQIIQQQQQ12sI")
ENTRY = struct.Struct("<64sII2QQQQQII")
TOKENIZER_HEAD = struct.Struct("<IIQQ")
CRC_OFFSET = 124
# Elements converted and written at a time: bounds the extra memory an export needs (~64 MB).
CHUNK_ELEMENTS = 1 << 23
# The Conv1D projection weights, stored transposed.
MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers and tied copies that some state dicts carry besides GPT-2's parameters.
IGNORED = re.compile(r"^(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$")


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # as stored: matrices (out, in)
    is_weight: bool  # stored in the file's weight dtype (else always fp32)
    transpose: bool  # a Conv1D matrix: the source holds (in, out)


def tensor_layout(config: GPT2Config) -> list[_Tensor]:
    """The tensors of a model file in their canonical order (docs/format.md, "Tensor table"):
    model.py's state-dict order, Conv1D matrices transposed to (out, in)."""
    out = []
    for name, shape in expected_shapes(config).items():
        matrix = name.endswith(MATRICES)
        out.append(_Tensor(name, shape[::-1] if matrix else shape, matrix or name in ("wte.weight", "wpe.weight"), matrix))
    return out


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as PyTorch does; NaNs
    stay NaN (quiet)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even; it cannot wrap for non-NaN inputs.
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


# ---------------------------------------------------------------------------------------------
# Sources: whatever the user hands us -> (config, Conv1D-layout arrays, tokenizer folder, provenance)


def _checkpoint(source: str | os.PathLike) -> tuple[Path, Path, int | None, list[Path]]:
    """``(what to load, file to key a cache on, step or None, the files holding it)`` for the newest
    weights at ``source`` (weights.find_checkpoint decides which). For a TensorFlow checkpoint the
    key is the ``.index``, which every save rewrites, and the files are the index and its shards."""
    ckpt = find_checkpoint(source)
    if ckpt.format == "tf":
        key = Path(f"{ckpt.path}.index")
        return ckpt.path, key, ckpt.step, [key, *sorted(ckpt.folder.glob(f"{glob_escape(ckpt.path.name)}.data-*-of-*"))]
    return ckpt.path, ckpt.path, ckpt.step, [ckpt.path]


def _fingerprint(file: Path, step: int | None, files: list[Path]) -> dict:
    """What ties an export to its checkpoint: the key file's name, size and step (cheap to compare)
    and the CRC-32 of every byte of the checkpoint's files (its content: a checkpoint overwritten
    with another of the same size and modification time is told apart)."""
    st = file.stat()
    return {"path": str(file.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "step": step,
            "crc32": [file_crc32(f) for f in files]}


# ---------------------------------------------------------------------------------------------
# Stamps: what is known about a file's content, valid while the file is unchanged. The key is
# (device, inode, size, mtime, ctime): any write to the file, even one that restores its size and
# modification time afterwards, moves its ctime, which no user call can set back.


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stamp_file(path: Path) -> Path:
    return _cache_root() / "stamps" / (hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:24] + ".json")


def _read_stamp(path: Path, key: list[int]) -> dict:
    try:
        stamp = json.loads(_stamp_file(path).read_text(encoding="utf-8"))
        return stamp if isinstance(stamp, dict) and stamp.get("key") == key else {}
    except (OSError, ValueError):
        return {}


def _write_stamp(path: Path, key: list[int], **facts) -> None:
    """Best effort: a stamp only saves work, so a cache folder that cannot be written is no error."""
    stamp = {**_read_stamp(path, key), **facts, "key": key, "path": str(path.resolve())}
    try:
        _stamp_file(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(_stamp_file(path)) as f:
            f.write(json.dumps(stamp).encode("utf-8"))
    except OSError:
        pass


def file_crc32(path: str | os.PathLike) -> int:
    """zlib CRC-32 of a whole file, remembered (stamp) until the file changes."""
    path = Path(path)
    key = _stat_key(path)
    known = _read_stamp(path, key).get("crc32")
    if isinstance(known, int):
        return known
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    _write_stamp(path, key, crc32=crc)
    return crc


def needs_verify(path: str | os.PathLike) -> tuple[bool, list[int]]:
    """(whether the model file's weight checksums have not been checked since it last changed, its
    stat key to pass to ``mark_verified`` once they have)."""
    key = _stat_key(Path(path))
    return _read_stamp(Path(path), key).get("verified") is not True, key


def mark_verified(path: str | os.PathLike, key: list[int]) -> None:
    """Remember that the model file as it was at ``key`` passed full verification."""
    _write_stamp(Path(path), key, verified=True)


def _is_model_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:  # a folder, a TF prefix, or nothing
        return False


def _load_source(source: Any, config: GPT2Config | None):
    """-> (config, {name: array in model.py layout}, tokenizer folder, provenance or None)."""
    if isinstance(source, (str, os.PathLike)):
        if _is_model_file(source):
            raise ValueError(f"{os.fspath(source)} is already an exported model file; export from the run or model folder it came from")
        load_path, key_file, step, files = _checkpoint(source)
        cfg, state = load_weights(load_path)
        return cfg, state, key_file.parent, _fingerprint(key_file, step, files)
    if hasattr(source, "cache") and hasattr(source, "source"):  # a Session
        if getattr(source, "source", None) is None:
            raise ValueError("the session has no model: call gpt2.load_gpt2(sess) or gpt2.finetune(sess, ...) first")
        return _load_source(source.source, config)
    if hasattr(source, "state_dict") and isinstance(getattr(source, "config", None), GPT2Config):  # our GPT2 module
        state = {}
        for name, t in source.state_dict().items():
            t = t.detach().cpu()
            state[name] = (t if t.dtype.is_floating_point and t.dtype.itemsize == 4 else t.float()).numpy()
        return source.config, state, None, None
    if isinstance(source, tuple) and len(source) == 2:
        config, source = source
    if isinstance(source, Mapping):
        if not isinstance(config, GPT2Config):
            raise ValueError("a state dict needs its GPT2Config: export((config, state), ...) or export(state, ..., config=config)")
        return config, source, None, None
    raise TypeError(
        f"cannot export a {type(source).__name__}: pass a run or model folder, a weights file, a GPT2 module, "
        "a session, or (GPT2Config, state_dict)"
    )


def _check_state(config: GPT2Config, state: Mapping[str, Any]) -> None:
    """A state dict given directly (files are checked by weights.load_weights): every tensor of
    the config, of its shape, and nothing else but known buffers."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in state]
    if missing:
        raise ValueError(f"the weights lack {len(missing)} GPT-2 tensors, e.g. {missing[0]!r}: not a complete GPT-2 model of this config ({config})")
    extra = [n for n in state if n not in expected and not IGNORED.match(n)]
    if extra:
        raise ValueError(f"the weights hold tensors GPT-2 does not have, e.g. {extra[0]!r}; pass model.py's state dict (names like 'h.0.attn.c_attn.weight')")
    for name, shape in expected.items():
        got = tuple(np.shape(state[name]))
        if got != shape:
            raise ValueError(f"tensor {name} has shape {got}, but the config ({config}) needs {shape} (GPT-2's Conv1D layout: (in, out))")


def _check_finite(name: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"tensor {name} holds NaN or infinite values: the checkpoint is damaged or training diverged; export an earlier checkpoint")


# ---------------------------------------------------------------------------------------------
# The tokenizer section


def _tokenizer_files(folder: Path | None, n_vocab: int) -> tuple[dict[str, int], bytes]:
    """``folder``'s encoder.json (checked) and vocab.bpe bytes; GPT-2's bundled files when it has none."""
    if folder is None or not (folder / "encoder.json").is_file():
        folder = BUNDLED_DIR
    enc_path, bpe_path = folder / "encoder.json", folder / "vocab.bpe"
    if not bpe_path.is_file():
        raise FileNotFoundError(f"{bpe_path} is missing (it belongs with {enc_path}); copy vocab.bpe from the model download")
    try:
        encoder = json.loads(enc_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{enc_path} is not valid JSON ({e}); copy encoder.json from the model download") from None
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise ValueError(f"{enc_path} does not number its tokens 0..{len(encoder) - 1} once each; copy encoder.json from the model download")
    if len(encoder) != n_vocab:
        raise ValueError(f"the tokenizer in {folder} has {len(encoder)} tokens but the model's n_vocab is {n_vocab}; use the model's own encoder.json")
    return encoder, bpe_path.read_bytes()


def _tokenizer_section(encoder: dict[str, int], merges: bytes) -> tuple[bytes, int]:
    """-> (the tokenizer section of docs/format.md, the end-of-text id or -1)."""
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    kinds = bytearray(len(encoder))
    pieces = []
    for i, text in enumerate(sorted(encoder, key=encoder.__getitem__)):
        if text == END_OF_TEXT or any(c not in byte_decoder for c in text):
            kinds[i] = 1  # special: stored as its literal text
            pieces.append(text.encode("utf-8"))
        else:
            pieces.append(bytes(byte_decoder[c] for c in text))
    ends = np.zeros(len(pieces) + 1, dtype="<u4")
    np.cumsum([len(p) for p in pieces], out=ends[1:])
    blob = b"".join(pieces)
    section = TOKENIZER_HEAD.pack(len(pieces), 0, len(blob), len(merges)) + ends.tobytes() + bytes(kinds) + blob + merges
    return section, encoder.get(END_OF_TEXT, -1)


# ---------------------------------------------------------------------------------------------
# Writing


def to_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows (R, K) -> (int8 q (R, K), float32 scales (R,)), docs/format.md "int8": per row
    s = max |x| / 127 rounded to float32 (1 for a row of zeros), q = x / s (a float32 division)
    rounded to nearest even, within [-127, 127]; the row is s * q."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    scales = (amax.astype(np.float64) / 127.0).astype(np.float32)
    scales[amax == 0] = 1.0
    q = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


def format_version(dtype: str) -> int:
    """The version a file of this dtype is written in: int8 needs version 2; fp32 and bf16 files
    keep version 1, so every earlier gpt_2_simple still reads them."""
    return 2 if dtype == "int8" else 1


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _nbytes(t: _Tensor, dtype: str) -> int:
    return int(np.prod(t.shape)) * ({"bf16": 2, "int8": 1}.get(dtype, 4) if t.is_weight else 4)


def _scales_nbytes(t: _Tensor, dtype: str) -> int:
    """Bytes of an int8 weight's per-row fp32 scales (0 for every other tensor)."""
    return 4 * t.shape[0] if t.is_weight and dtype == "int8" else 0


def _chunks(array: Any, t: _Tensor, dtype: str, scales: list | None = None) -> Iterator[np.ndarray]:
    """The stored bytes of one tensor, a few MB at a time (rows of the stored layout); for int8
    the rows' scales are appended to ``scales``."""
    src = np.asarray(array)
    rows = t.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, src.size // rows))
    for r0 in range(0, rows, step):
        part = src[:, r0 : r0 + step].T if t.transpose else src[r0 : r0 + step]  # (rows, in) in stored layout
        part = np.ascontiguousarray(part, dtype=np.float32)
        _check_finite(t.name, part)
        if t.is_weight and dtype == "int8":
            q, s = to_int8(part)
            scales.append(s.astype("<f4", copy=False))
            yield q
        else:
            yield to_bf16(part) if t.is_weight and dtype == "bf16" else part.astype("<f4", copy=False)


def _write(out_path: Path, config: GPT2Config, state: Mapping[str, Any], dtype: str, tokenizer: tuple[bytes, int], metadata: dict, progress: bool) -> None:
    layout = tensor_layout(config)
    tok_bytes, eot = tokenizer
    meta_bytes = json.dumps(metadata, sort_keys=True).encode("utf-8")
    table_offset = HEADER.size
    tok_offset = _align(table_offset + ENTRY.size * len(layout))
    meta_offset = _align(tok_offset + len(tok_bytes))
    data_offset = _align(meta_offset + len(meta_bytes))
    offsets, scale_offsets, end = [], [], data_offset
    for t in layout:  # each tensor, then an int8 tensor's scales
        offsets.append(end)
        end = _align(end + _nbytes(t, dtype))
        scale_offsets.append(end if _scales_nbytes(t, dtype) else 0)
        end = _align(end + _scales_nbytes(t, dtype))
    file_size = offsets[-1] + _nbytes(layout[-1], dtype)  # no padding after the last tensor (an fp32 bias)

    from tqdm.auto import tqdm

    crcs, scale_crcs = [], []
    with atomic_write(out_path) as f, tqdm(total=file_size, unit="B", unit_scale=True, desc=f"export {out_path.name}",
                                           disable=not progress or file_size < (256 << 20)) as bar:
        f.write(bytes(data_offset))
        for t, offset, scale_offset in zip(layout, offsets, scale_offsets):
            f.write(bytes(offset - f.tell()))  # zero padding to the 64-byte boundary
            crc, scales = 0, []
            for chunk in _chunks(state[t.name], t, dtype, scales):
                crc = zlib.crc32(chunk, crc)
                f.write(chunk)
                bar.update(chunk.nbytes)
            crcs.append(crc)
            scale_crcs.append(0)
            if scale_offset:
                f.write(bytes(scale_offset - f.tell()))
                scale_bytes = np.concatenate(scales).tobytes()
                scale_crcs[-1] = zlib.crc32(scale_bytes)
                f.write(scale_bytes)
        assert f.tell() == file_size
        head = bytearray(data_offset)
        HEADER.pack_into(head, 0, MAGIC, format_version(dtype), HEADER.size, file_size, config.n_vocab, config.n_ctx, config.n_embd,
                         config.n_head, config.n_layer, DTYPES[dtype], 0, eot, table_offset, len(layout), ENTRY.size,
                         tok_offset, len(tok_bytes), meta_offset, len(meta_bytes), data_offset, bytes(12), 0)
        for i, (t, offset, crc, scale_offset, scale_crc) in enumerate(zip(layout, offsets, crcs, scale_offsets, scale_crcs)):
            code = DTYPES[dtype] if t.is_weight else DTYPES["fp32"]
            shape = (*t.shape, 0)[:2]
            ENTRY.pack_into(head, table_offset + i * ENTRY.size, t.name.encode("ascii"), code, len(t.shape), *shape, offset,
                            _nbytes(t, dtype), scale_offset, _scales_nbytes(t, dtype), crc, scale_crc)
        head[tok_offset : tok_offset + len(tok_bytes)] = tok_bytes
        head[meta_offset : meta_offset + len(meta_bytes)] = meta_bytes
        struct.pack_into("<I", head, CRC_OFFSET, zlib.crc32(head))  # the crc field is still zero here
        f.seek(0)
        f.write(head)
    mark_verified(out_path, _stat_key(out_path))  # its checksums were just computed from what was written


def export(source: Any, out_path: str | os.PathLike, dtype: str = "fp32", *, config: GPT2Config | None = None,
           tokenizer_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Write ``source`` as one flat model file at ``out_path`` (docs/format.md); returns the path.

    ``source``: a run folder (``checkpoint/run1``: its newest checkpoint), a model folder
    (``models/124M``, TensorFlow or HuggingFace files), a weights file, our PyTorch ``GPT2``, a
    session, or ``(GPT2Config, state_dict)`` (``model.py`` names, Conv1D layout).
    ``dtype``: ``"fp32"`` (exact), ``"bf16"`` (half the size, faster on CPU; rounded to nearest even)
    or ``"int8"`` (a quarter of the size, fastest on CPU; one scale per row, ``to_int8``; CPU only).
    The tokenizer embedded is the source folder's ``encoder.json``/``vocab.bpe`` (or ``tokenizer_dir``'s),
    else GPT-2's. The file is written atomically: a crash leaves the old file or none, never half of one.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg, state, folder, provenance = _load_source(source, config)
    _check_state(cfg, state)
    metadata: dict[str, Any] = {"writer": f"gpt_2_simple {__version__}"}
    if provenance is not None:
        metadata["source"] = provenance
    tokenizer = _tokenizer_section(*_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir is not None else folder, cfg.n_vocab))
    out_path = Path(out_path)
    _write(out_path, cfg, state, dtype, tokenizer, metadata, progress)
    return out_path


# ---------------------------------------------------------------------------------------------
# Reading back (through the C++ loader, so Python sees exactly what the engine validates)


def _engine_module():
    try:
        from . import _engine
    except ImportError as e:
        raise ImportError(f"gpt_2_simple's C++ extension is not built ({e}); reinstall with `pip install .` (see CONTRIBUTING.md)") from None
    return _engine


def inspect(path: str | os.PathLike, *, verify: bool = False, data: bool = False) -> dict:
    """Validate a model file and describe it: ``version``, ``config`` (a dict), ``dtype``,
    ``eot_token``, ``tensors`` (the table), ``token_bytes``, ``token_kinds``, ``merges`` and
    ``metadata`` (parsed JSON; None if unreadable). ``verify`` also checks every tensor's checksum
    (reads the whole file); ``data`` adds ``data``: each tensor's stored bytes.
    A damaged or foreign file raises ValueError naming the problem."""
    info = _engine_module().inspect(os.fspath(path), verify=verify, data=data)
    try:
        info["metadata"] = json.loads(info["metadata"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        info["metadata"] = None
    return info


def verify(path: str | os.PathLike) -> None:
    """Check a model file completely, data checksums included; raises ValueError if it is damaged."""
    _engine_module().inspect(os.fspath(path), verify=True)


def _encoder_json(info: dict) -> dict[str, int]:
    byte_encoder = bytes_to_unicode()
    return {
        (raw.decode("utf-8") if kind else "".join(byte_encoder[b] for b in raw)): i
        for i, (raw, kind) in enumerate(zip(info["token_bytes"], info["token_kinds"]))
    }


def read_tokenizer(path: str | os.PathLike) -> Encoder:
    """The tokenizer embedded in a model file: all a deployment needs besides the file itself.
    The loader has checked the tokens; the merges, which only this tokenizer reads, are checked
    here: each line two tokens whose concatenation is a token, or encoding would fail later."""
    info = inspect(path)
    encoder = _encoder_json(info)

    def unusable(problem: str) -> ValueError:
        return ValueError(f"{os.fspath(path)} has an unusable tokenizer: {problem}; export the model again with its own "
                          "encoder.json and vocab.bpe (GPT-2's byte-level BPE)")

    try:
        lines = info["merges"].decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise unusable(f"its merges are not UTF-8 ({e.reason} at byte {e.start})") from None
    merges = []
    for n, line in enumerate(lines[1:], start=2):  # after the '#version' line
        if line:
            pair = tuple(line.split(" "))
            if len(pair) != 2 or pair[0] not in encoder or pair[1] not in encoder or pair[0] + pair[1] not in encoder:
                raise unusable(f"merge line {n} ({line[:80]!r}) is not two tokens that make a token")
            merges.append(pair)
    return Encoder(encoder, merges)


def write_tokenizer_files(path: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Rebuild ``encoder.json`` and ``vocab.bpe`` in ``folder`` from a model file (byte-identical to
    GPT-2's own files when the model uses GPT-2's tokenizer)."""
    info = inspect(path)
    folder = Path(folder)
    with atomic_write(folder / "encoder.json") as f:
        f.write(json.dumps(_encoder_json(info)).encode("utf-8"))
    with atomic_write(folder / "vocab.bpe") as f:
        f.write(info["merges"])


# ---------------------------------------------------------------------------------------------
# The export cache used by generate()


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt_2_simple"


def _cache_dir() -> Path:
    return _cache_root() / "engines"


def _is_current(file: Path, key_file: Path, step: int | None, files: list[Path], dtype: str) -> bool:
    """True when ``file`` is an undamaged export in ``dtype`` of the checkpoint in ``files``.

    The export names its checkpoint by file name, size and step (compared first: one stat) and by
    the CRC-32 of the checkpoint's bytes (``_fingerprint``); the export's own weights are checked
    against their CRC-32s once per change of the file (``needs_verify``). Both checks read whole
    files only when a stamp says the file changed since it was last checked. The path is not
    compared, so a run folder that was moved or copied with its export keeps it."""
    if not file.is_file():
        return False
    try:
        info = inspect(file)
    except (ValueError, OSError):
        return False  # damaged or from another format version: rebuild
    source = (info["metadata"] or {}).get("source")
    if info["dtype"] != dtype or not isinstance(source, dict):
        return False
    if Path(str(source.get("path", ""))).name != key_file.name or source.get("step") != step or source.get("size") != key_file.stat().st_size:
        return False
    if source.get("crc32") != [file_crc32(f) for f in files]:
        return False  # another checkpoint under the same name (a restored backup, a copy over it)
    stale, key = needs_verify(file)
    if stale:
        try:
            verify(file)
        except ValueError:
            return False  # its weights were damaged or overwritten after export: rebuild
        mark_verified(file, key)
    return True


def _remove_stale(folder: Path) -> None:
    """Exports of checkpoints that training has since deleted (max_checkpoints) are dead weight."""
    for f in folder.glob("model-*.bin"):
        m = re.fullmatch(r"model-(\d+)\.(\w+)\.bin", f.name)
        if m and m.group(2) in DTYPES:
            step = m.group(1)
            if not (folder / f"model-{step}.safetensors").is_file() and not (folder / f"model-{step}.index").is_file():
                f.unlink(missing_ok=True)


def engine_file(source: str | os.PathLike, dtype: str = "fp32", *, progress: bool = True) -> Path:
    """The flat model file of ``source``'s newest checkpoint, exporting it only when needed
    (``source`` may also be a model file already, which is validated and returned).

    For a run folder this is ``<run>/model-<step>.<dtype>.bin`` (docs/design.md, "Run folder"); a
    model folder or weights file gets ``<name>.<dtype>.bin`` beside it. When that folder is not
    writable the file goes to ``$XDG_CACHE_HOME/gpt_2_simple/engines/`` (default ``~/.cache``).
    An existing export is reused when its metadata names the same checkpoint (file name, size,
    step and the CRC-32 of the checkpoint's bytes) and it passes the loader's validation, its weight
    checksums included (checked once per change of the file); otherwise it is rebuilt, atomically,
    so a crash never leaves a broken file. Exports of deleted checkpoints are removed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if _is_model_file(source):  # already an export (a deployment may ship nothing else)
        info = inspect(source)
        if info["dtype"] != dtype:
            raise ValueError(f"{os.fspath(source)} holds {info['dtype']} weights, not {dtype}: ask for {info['dtype']} or export the checkpoint again with dtype={dtype!r}")
        return Path(source)
    load_path, key_file, step, files = _checkpoint(source)
    name = f"model-{step}.{dtype}.bin" if step is not None else f"{key_file.name.split('.')[0]}.{dtype}.bin"
    beside = key_file.parent / name
    cached = _cache_dir() / hashlib.sha256(str(key_file.parent.resolve()).encode()).hexdigest()[:16] / name
    for candidate in (beside, cached):
        if _is_current(candidate, key_file, step, files, dtype):
            return candidate
    try:
        if not os.access(beside.parent, os.W_OK):
            raise PermissionError(errno.EACCES, "folder is not writable", str(beside.parent))
        export(load_path, beside, dtype, progress=progress)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return export(load_path, cached, dtype, progress=progress)
    if step is not None:
        _remove_stale(beside.parent)
    return beside


# ---------------------------------------------------------------------------------------------
# HuggingFace folder


def export_hf(source: Any, out_dir: str | os.PathLike, *, config: GPT2Config | None = None,
              tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``source`` (anything ``export`` takes) as a HuggingFace folder: ``config.json``
    (GPT2LMHeadModel), ``model.safetensors`` (float32), ``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json`` and ``generation_config.json``. ``transformers.GPT2LMHeadModel`` and
    ``GPT2Tokenizer`` load it with ``from_pretrained(out_dir)``; it can be shared on a model hub."""
    cfg, state, folder, _ = _load_source(source, config)
    _check_state(cfg, state)
    encoder, merges = _tokenizer_files(Path(tokenizer_dir) if tokenizer_dir is not None else folder, cfg.n_vocab)
    eot = encoder.get(END_OF_TEXT)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # model.py's names and Conv1D layout are exactly those of OpenAI's gpt2 on the HF hub.
    weights = {name: np.asarray(state[name], dtype=np.float32) for name in expected_shapes(cfg)}
    for name, array in weights.items():
        _check_finite(name, array)
    save_weights(out_dir / "model.safetensors", weights, metadata={"format": "pt"})  # transformers wants "pt"
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.n_vocab,
        "n_positions": cfg.n_ctx,
        "n_ctx": cfg.n_ctx,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT} if eot is not None else {}
    files = {
        "config.json": hf_config,
        "generation_config.json": {"bos_token_id": eot, "eos_token_id": eot},
        "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.n_ctx, "add_prefix_space": False, **special},
        "special_tokens_map.json": special,
    }
    for name, content in files.items():
        with atomic_write(out_dir / name, "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    with atomic_write(out_dir / "vocab.json") as f:
        f.write(json.dumps(encoder).encode("utf-8"))
    with atomic_write(out_dir / "merges.txt") as f:
        f.write(merges)
    return out_dir
