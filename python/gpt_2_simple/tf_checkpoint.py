"""Read TensorFlow checkpoints (the V2 "tensor bundle" format) without TensorFlow.

A checkpoint is a prefix (``models/124M/model.ckpt``, ``checkpoint/run1/model-1000``) with:

- ``<prefix>.index``: a LevelDB-style SSTable. Its keys are variable names; its values are
  ``BundleEntryProto`` messages (dtype, shape, shard, offset, size, masked crc32c). The empty key
  holds the ``BundleHeaderProto`` (number of shards, byte order).
- ``<prefix>.data-SSSSS-of-NNNNN``: the shards, raw little-endian tensor bytes at those offsets.

The index is parsed in pure Python (a few KB for GPT-2); tensors are memory-mapped out of the
shards, so opening even 1558M costs no reads until a tensor is used. The folder's ``checkpoint``
text file (a ``CheckpointState`` in protobuf text format) names the latest prefix.

Every damaged, truncated or hostile file raises ``TFCheckpointError`` (a ``ValueError``) naming the
file, what is wrong and the fix; every count and size read from the index is bounded (``LIMITS``,
docs/weights.md) before anything is allocated or repeated for it. This module knows nothing about
GPT-2; ``weights.py`` maps the variable names.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TFCheckpoint", "TFCheckpointError", "BundleEntry", "LIMITS", "crc32c", "read_checkpoint_state"]

_DAMAGED_FIX = "the checkpoint is damaged or incomplete: download the model again or restore the run folder from a backup"

# What an index may hold. GPT-2 1558M has 580 variables (about 1,740 entries with Adam's two slots
# each) named in under 60 bytes; these bounds are far above that and keep a crafted index to milliseconds
# and megabytes (a key grown by one byte per entry, or one block listed a thousand times, used to
# cost gigabytes and minutes).
LIMITS = {
    "index_bytes": 64 << 20,  # the .index file
    "entries": 100_000,  # keys in the whole index
    "key_bytes": 1024,  # one variable name
    "rank": 32,  # dimensions of one tensor
    "shards": 1 << 16,  # data shards
}


class TFCheckpointError(ValueError):
    """A TensorFlow checkpoint's index or data is damaged, truncated, beyond LIMITS or unsupported."""


def _damaged(path: str | os.PathLike, problem: str) -> TFCheckpointError:
    return TFCheckpointError(f"{os.fspath(path)}: {problem}; {_DAMAGED_FIX}")


@contextlib.contextmanager
def _reader_boundary(path: str | os.PathLike):
    """Whatever a crafted file provokes inside the parser leaves as TFCheckpointError."""
    try:
        yield
    except (TFCheckpointError, OSError):
        raise
    except (_Truncated, TypeError, KeyError, IndexError, OverflowError, RecursionError, struct.error, ValueError, MemoryError) as e:
        raise _damaged(path, f"unreadable ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), as LevelDB and TensorFlow use it for blocks and tensors.

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _make_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _make_table()
_TABLE_LIST = _TABLE.tolist()
_BYTE_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8): bit i of byte b


def _crc_bytes(state: int, data: bytes) -> int:
    """The table-driven loop on the raw register (no pre/post inversion)."""
    t = _TABLE_LIST
    for b in data:
        state = t[(state ^ b) & 0xFF] ^ (state >> 8)
    return state


def _feed_zeros(regs: np.ndarray, n: int) -> np.ndarray:
    """Registers after ``n`` zero bytes."""
    for _ in range(n):
        regs = _TABLE[regs & 0xFF] ^ (regs >> 8)
    return regs


class _ZeroShift:
    """The linear map "feed n zero bytes into the register", applied to many registers at once.

    CRC registers are GF(2)-linear, so a message cut into K equal lanes can be processed as K
    independent registers in lock-step (numpy does the K at once) and the lanes recombined with
    crc(A || B) = shift_len(B)(crc(A)) ^ crc(B). The map is stored as four 256-entry tables, one
    per input byte, built from the images of the 32 basis vectors.
    """

    def __init__(self, columns: np.ndarray):  # columns[i] = image of 1 << i, (32,) uint32
        self.columns = columns
        self.tables = np.stack(
            [np.bitwise_xor.reduce(np.where(_BYTE_BITS, columns[8 * j : 8 * j + 8], 0), axis=1) for j in range(4)]
        ).astype(np.uint32)  # (4, 256)

    @classmethod
    def of_length(cls, n: int) -> "_ZeroShift":
        return cls(_feed_zeros(np.uint32(1) << np.arange(32, dtype=np.uint32), n))

    def __call__(self, regs: np.ndarray) -> np.ndarray:
        t = self.tables
        return t[0][regs & 0xFF] ^ t[1][(regs >> 8) & 0xFF] ^ t[2][(regs >> 16) & 0xFF] ^ t[3][regs >> 24]

    def doubled(self) -> "_ZeroShift":
        return _ZeroShift(self(self.columns))


# Four bytes per step in the lanes ("slicing by 4" with two 16-bit tables): XOR a 32-bit word
# into the register, then look up what four byte steps make of its low and high halves.
_WORD_LO = _feed_zeros(np.arange(1 << 16, dtype=np.uint32), 4)
_WORD_HI = _feed_zeros(np.arange(1 << 16, dtype=np.uint32) << 16, 4)

_LANE_BYTES = 256  # bytes per lane: numpy runs 64 lock-step word steps per chunk
_MAX_LANES = 1 << 16  # lanes per chunk (16 MiB chunks bound the temporary copy)
_shifts: dict[int, list[_ZeroShift]] = {}  # lanes -> shift by 256 * 2**level bytes, per tree level


def crc32c(data, value: int = 0) -> int:
    """CRC32C of ``data`` (bytes, memoryview, mmap or a numpy array), continuing from ``value``
    like ``zlib.crc32``. Small inputs use a table loop; large ones run lanes in numpy (about
    0.3-0.6 GB/s on a 2-core VM, against ~6-9 MB/s for the pure-Python loop)."""
    buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    state = value ^ 0xFFFFFFFF
    pos = 0
    n = buf.size
    while n - pos >= 4 * _LANE_BYTES:
        lanes = min(_MAX_LANES, 1 << ((n - pos) // _LANE_BYTES).bit_length() - 1)  # a power of two
        words = buf[pos : pos + lanes * _LANE_BYTES].view("<u4").reshape(lanes, -1).T.copy()  # (L/4, K)
        regs = np.zeros(lanes, dtype=np.uint32)
        regs[0] = state  # the running register enters through lane 0
        for word in words:
            regs ^= word
            regs = _WORD_LO[regs & 0xFFFF] ^ _WORD_HI[regs >> 16]
        levels = _shifts.setdefault(lanes, [])
        level = 0
        while regs.size > 1:  # pairwise tree: left lane shifted past the right one, then XORed
            if level == len(levels):
                levels.append(levels[-1].doubled() if levels else _ZeroShift.of_length(_LANE_BYTES))
            regs = levels[level](regs[0::2]) ^ regs[1::2]
            level += 1
        state = int(regs[0])
        pos += lanes * _LANE_BYTES
    state = _crc_bytes(state, buf[pos:].tobytes())
    return state ^ 0xFFFFFFFF


_MASK_DELTA = 0xA282EAD8


def _unmask(masked: int) -> int:
    """LevelDB stores crc32c "masked" (rotated and offset) so a CRC of data holding CRCs stays strong."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Protobuf wire format: just enough to read BundleEntryProto / BundleHeaderProto.


class _Truncated(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Truncated("bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, value) of a protobuf message; value is an int or, for
    length-delimited fields, the bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise _Truncated("short fixed64")
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _Truncated("short field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise _Truncated("short fixed32")
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise _Truncated(f"unsupported wire type {wire}")
        yield number, value


# TensorFlow DataType enum -> numpy dtype (what checkpoints of GPT-2 and its optimizer use).
_DTYPES = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    14: np.dtype("<u2"),  # DT_BFLOAT16: numpy has no bfloat16; widened to float32 on read
    19: np.dtype("<f2"),  # DT_HALF
}
_DT_BFLOAT16 = 14


@dataclass(frozen=True)
class BundleEntry:
    """Where one variable lives: its ``BundleEntryProto``."""

    name: str
    dtype: int  # TensorFlow DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored
    sliced: bool  # a partitioned variable (saved in slices): not supported

    @classmethod
    def parse(cls, name: str, value: bytes) -> "BundleEntry":
        f = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": None, "sliced": False}
        for number, v in _fields(value):
            if number == 1:
                f["dtype"] = v
            elif number == 2:  # TensorShapeProto: repeated Dim (field 2) {size = 1}
                dims = []
                for n, dim in _fields(v):
                    if n == 2 and len(dims) == LIMITS["rank"]:
                        raise _Truncated(f"more than {LIMITS['rank']} dimensions")
                    if n == 2:
                        size = next((s for k, s in _fields(dim) if k == 1), 0)
                        dims.append(size - (1 << 64) if size >= 1 << 63 else size)
                    elif n == 3 and dim:
                        raise _Truncated("unknown rank")
                f["shape"] = tuple(dims)
            elif number == 3:
                f["shard_id"] = v
            elif number == 4:
                f["offset"] = v
            elif number == 5:
                f["size"] = v
            elif number == 6:
                f["crc32c"] = v
            elif number == 7:
                f["sliced"] = True
        return cls(name=name, **f)


# ---------------------------------------------------------------------------------------------
# The SSTable (LevelDB table format, as TensorFlow's lib/io/table writes it).

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two BlockHandles padded to 40 bytes, then the 8-byte magic
_BLOCK_TRAILER = 5  # compression type (1 byte) + masked crc32c (4 bytes)


def _block_handle(buf: bytes, pos: int) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _read_block(path: Path, data: bytes, offset: int, size: int) -> bytes:
    """The contents of one block, its trailer's CRC checked."""
    end = offset + size
    if end + _BLOCK_TRAILER > len(data):
        raise _damaged(path, f"a block at offset {offset} runs past the end of the file ({len(data)} bytes): the file is truncated")
    contents = data[offset:end]
    kind = data[end]
    (stored,) = struct.unpack_from("<I", data, end + 1)
    if crc32c(data[end : end + 1], crc32c(contents)) != _unmask(stored):
        raise _damaged(path, f"CRC mismatch in the block at offset {offset}")
    if kind == 1:
        raise TFCheckpointError(
            f"{os.fspath(path)}: the block at offset {offset} is snappy-compressed, which TensorFlow never writes for "
            "checkpoint indexes; re-save the checkpoint with TensorFlow's default options"
        )
    if kind != 0:
        raise _damaged(path, f"unknown block compression type {kind} at offset {offset}")
    return contents


def _block_entries(path: Path, block: bytes, budget: list[int]) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of a block: keys share a prefix with the previous key, except at the
    restart points listed at the end of the block, where they are stored whole. ``budget[0]`` is
    how many more entries the index may hold (LIMITS["entries"]), decreased here."""
    if len(block) < 4:
        raise _damaged(path, "a block is too short to hold its restart count")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * n_restarts
    if limit < 0:
        raise _damaged(path, f"a block claims {n_restarts} restart points, more than fit in it")
    restarts = struct.unpack_from(f"<{n_restarts}I", block, limit)
    entries = []
    whole_keys = set()  # offsets of entries with no shared prefix: the valid restart points
    key = b""
    pos = 0
    try:
        while pos < limit:
            start = pos
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            value_len, pos = _varint(block, pos)
            if shared > len(key) or pos + unshared + value_len > limit:
                raise _Truncated("entry out of bounds")
            if shared + unshared > LIMITS["key_bytes"]:
                raise _damaged(path, f"a key of {shared + unshared} bytes is longer than the {LIMITS['key_bytes']} a variable name may have")
            budget[0] -= 1
            if budget[0] < 0:
                raise _damaged(path, f"the index holds more than {LIMITS['entries']} entries")
            if shared == 0:
                whole_keys.add(start)
            key = key[:shared] + block[pos : pos + unshared]
            pos += unshared
            entries.append((key, block[pos : pos + value_len]))
            pos += value_len
    except _Truncated as e:
        raise _damaged(path, f"a block entry is malformed ({e})") from None
    if any(r not in whole_keys for r in restarts):
        raise _damaged(path, "a block's restart points do not match its entries")
    return entries


def _read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the SSTable at ``path``, in key order."""
    try:
        with open(path, "rb") as f:
            data = f.read(LIMITS["index_bytes"] + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)} is missing; {_DAMAGED_FIX}") from None
    if len(data) > LIMITS["index_bytes"]:
        raise _damaged(path, f"the index is larger than {LIMITS['index_bytes']} bytes, far more than any model's")
    if len(data) < _FOOTER_LEN:
        raise _damaged(path, f"the file is {len(data)} bytes, too short for a checkpoint index (truncated)")
    footer = data[-_FOOTER_LEN:]
    (magic,) = struct.unpack_from("<Q", footer, 40)
    if magic != _TABLE_MAGIC:
        raise _damaged(path, "bad magic number: this is not a TensorFlow checkpoint index, or its end was cut off")
    try:
        _, _, pos = _block_handle(footer, 0)  # the metaindex block: TensorFlow leaves it empty
        index_offset, index_size, _ = _block_handle(footer, pos)
    except _Truncated:
        raise _damaged(path, "the footer's block handles are malformed") from None
    entries = []
    budget = [LIMITS["entries"]]
    seen: set[int] = set()  # data blocks already read: each is listed once by a real index
    for _, handle in _block_entries(path, _read_block(path, data, index_offset, index_size), budget):
        try:
            offset, size, _ = _block_handle(handle, 0)
        except _Truncated:
            raise _damaged(path, "an index entry is malformed") from None
        if offset in seen:
            raise _damaged(path, f"the block at offset {offset} is listed more than once")
        seen.add(offset)
        entries.extend(_block_entries(path, _read_block(path, data, offset, size), budget))
    return entries


# ---------------------------------------------------------------------------------------------


class TFCheckpoint:
    """A TensorFlow V2 checkpoint, opened by its prefix: ``entries`` maps every variable name to
    its ``BundleEntry``; ``tensor(name)`` memory-maps one variable out of its shard."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        self.index_path = Path(f"{self.prefix}.index")
        if not self.index_path.is_file():
            raise FileNotFoundError(f"no TensorFlow checkpoint at {os.fspath(self.prefix)} ({self.index_path.name} is missing)")
        with _reader_boundary(self.index_path):
            self._read_index()
        self._shards: dict[int, mmap.mmap | bytes] = {}

    def _read_index(self) -> None:
        self.entries: dict[str, BundleEntry] = {}
        num_shards = 1
        for key, value in _read_table(self.index_path):
            try:
                if key == b"":  # BundleHeaderProto
                    for number, v in _fields(value):
                        if number == 1:
                            num_shards = v
                        elif number == 2 and v != 0:
                            raise TFCheckpointError(f"{self.index_path}: big-endian checkpoints are not supported; re-save it on a little-endian machine")
                    continue
                name = key.decode("utf-8")
                self.entries[name] = BundleEntry.parse(name, value)
            except (_Truncated, UnicodeDecodeError) as e:
                raise _damaged(self.index_path, f"the entry for {key!r} is malformed ({e})") from None
        if not 1 <= num_shards <= LIMITS["shards"]:
            raise _damaged(self.index_path, f"the header claims {num_shards} data shards (1..{LIMITS['shards']} allowed)")
        self.num_shards = num_shards

    def shard_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def _shard(self, shard_id: int):
        if shard_id not in self._shards:
            path = self.shard_path(shard_id)
            if shard_id >= self.num_shards:
                raise _damaged(self.index_path, f"an entry points at shard {shard_id} of {self.num_shards}")
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    # mmap cannot map an empty file; an empty shard can still hold zero-size tensors
                    self._shards[shard_id] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{os.fspath(path)} is missing: the checkpoint {self.prefix.name} needs its data shard beside its "
                    f"index; {_DAMAGED_FIX}"
                ) from None
        return self._shards[shard_id]

    def tensor(self, name: str, verify_crc: bool = False) -> np.ndarray:
        """The variable ``name`` as a read-only array mapped from its shard (bfloat16 is widened
        to a float32 copy). ``verify_crc`` checks the stored CRC32C: this reads every byte
        (~0.2 s per 100 MB on a 2-core VM) instead of leaving pages to be read on use."""
        entry = self.entries[name]
        with _reader_boundary(self.index_path):
            return self._tensor(entry, verify_crc)

    def _tensor(self, entry: BundleEntry, verify_crc: bool) -> np.ndarray:
        name = entry.name
        if entry.sliced:
            raise TFCheckpointError(f"{self.index_path}: variable {name} is partitioned into slices, which is not supported")
        dtype = _DTYPES.get(entry.dtype)
        if dtype is None:
            raise TFCheckpointError(f"{self.index_path}: variable {name} has TensorFlow dtype {entry.dtype}, which cannot be read as numbers")
        if any(d < 0 for d in entry.shape):
            raise _damaged(self.index_path, f"variable {name} has shape {entry.shape}")
        count = math.prod(entry.shape)  # Python ints: a crafted shape cannot wrap around
        if entry.size != count * dtype.itemsize:
            raise _damaged(
                self.index_path,
                f"variable {name} of shape {entry.shape} should take {count * dtype.itemsize} bytes but its entry says {entry.size}",
            )
        shard = self._shard(entry.shard_id)
        if entry.offset + entry.size > len(shard):
            raise _damaged(
                self.shard_path(entry.shard_id),
                f"variable {name} lies at bytes {entry.offset}..{entry.offset + entry.size} but the shard has only "
                f"{len(shard)} bytes: the file is truncated",
            )
        raw = np.frombuffer(shard, dtype=np.uint8, count=entry.size, offset=entry.offset)
        if verify_crc and entry.crc32c is not None and crc32c(raw) != _unmask(entry.crc32c):
            raise _damaged(self.shard_path(entry.shard_id), f"CRC mismatch in variable {name}")
        array = raw.view(dtype).reshape(entry.shape)
        if entry.dtype == _DT_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


_STATE_LINE = re.compile(r'^\s*(\w+)\s*:\s*"((?:[^"\\]|\\.)*)"\s*$')


def read_checkpoint_state(folder: str | os.PathLike) -> tuple[str, list[str]] | None:
    """The folder's ``checkpoint`` file: (model_checkpoint_path, all_model_checkpoint_paths), as
    written, or None when there is no such file or it names nothing."""
    path = Path(folder) / "checkpoint"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    latest, every = None, []
    for line in text.splitlines():
        m = _STATE_LINE.match(line)
        if not m:
            continue
        # protobuf text format escapes quotes, backslashes and non-ASCII bytes (as octal)
        value = codecs.escape_decode(m.group(2).encode("utf-8"))[0].decode("utf-8", errors="replace")
        if m.group(1) == "model_checkpoint_path":
            latest = value
        elif m.group(1) == "all_model_checkpoint_paths":
            every.append(value)
    return (latest, every) if latest else None
