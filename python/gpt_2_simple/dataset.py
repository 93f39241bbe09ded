"""Training data: load text, CSV, pre-encoded .npz, folders and globs into token chunks, and draw
training windows from them.

``load_dataset`` keeps the original's rules: files shorter than ``combine`` characters are joined
(with ``<|endoftext|>`` between them) into one chunk, a CSV contributes its first column with each
row wrapped in ``<|startoftext|>``...``<|endoftext|>``, a .npz adds its arrays as chunks, and a
training window never crosses a chunk boundary. What changed: files are decoded as strict UTF-8
(an error names the file and byte offset; ``errors='ignore'`` is the original's silent behaviour),
tokens are kept as one uint16 array per chunk (2 bytes a token, where the original held a Python
list of ints), large files are streamed and encoded in blocks (on several processes when it pays),
and datasets shorter than the context window train on shorter windows instead of failing.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import multiprocessing
import os
import time
import zipfile
from typing import Iterator

import numpy as np
import regex
from tqdm.auto import tqdm

from .tokenizer import END_OF_TEXT, Encoder, get_encoder

__all__ = [
    "load_dataset",
    "encode_csv",
    "encode_dataset",
    "dataset_files",
    "split_chunks",
    "Windows",
    "WindowSampler",
    "START_OF_TEXT",
    "DatasetError",
]

START_OF_TEXT = "<|startoftext|>"
# Text is decoded and encoded in blocks of about this many characters.
BLOCK_CHARS = 1 << 20
# Below this many bytes of text, worker processes cost more than they save.
PARALLEL_MIN_BYTES = 8 << 20
# Last place in a text where a non-space character is followed by a space. No GPT-2 pre-token
# spans such a boundary and none looks past it, so encoding the two sides separately gives the
# same ids as encoding the whole: the stream can be cut there.
_SAFE_SPLIT = regex.compile(r"(?r)\S(?=\s)")


def _token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.int32)


# ----------------------------------------------------------------------------- reading files


def dataset_files(path: str | os.PathLike) -> list[str]:
    """The files ``path`` names: itself, every file under a folder (recursively, sorted, hidden
    files skipped), or the files a glob pattern matches (sorted)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        if not found:
            raise ValueError(f"dataset folder {path} holds no files")
        return found
    found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not found:
        raise FileNotFoundError(f"dataset {path} not found: give a text/.csv/.npz file, a folder or a glob pattern")
    return found


def _undecodable(path: str, offset: int, data: bytes) -> ValueError:
    return ValueError(
        f"{path}: not valid UTF-8 at byte {offset} (0x{data.hex()}); save the file as UTF-8, "
        "or pass errors='ignore' (CLI: --errors ignore) to drop undecodable bytes as the original did"
    )


def _read_blocks(path: str, errors: str) -> Iterator[tuple[str, int]]:
    """Decode ``path`` as UTF-8 in blocks: yields (text, bytes consumed). A leading BOM is dropped."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors)
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(BLOCK_CHARS)
            final = not data
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as e:
                start = offset - pending + e.start
                raise _undecodable(path, start, e.object[e.start : e.end]) from None
            offset += len(data)
            if text or data:
                yield text, len(data)
            if final:
                return


def _read_text(path: str, errors: str) -> str:
    return "".join(text for text, _ in _read_blocks(path, errors))


def _csv_text(path: str, errors: str, header: bool = True, start_token: str = START_OF_TEXT, end_token: str = END_OF_TEXT) -> str:
    """The original's CSV rule: first column of each row, wrapped in the start and end tokens."""
    f = io.StringIO(_read_text(path, errors), newline="")
    if header:
        f.readline()
    rows = []
    for row in csv.reader(f):
        if row:  # the original crashed on blank lines (row[0] of an empty row)
            rows.append(f"{start_token}{row[0]}{end_token}\n")
    return "".join(rows)


# ----------------------------------------------------------------------------- encoding

_worker_encoder: Encoder | None = None


def _init_worker(enc: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = enc


def _encode_block(text: str) -> np.ndarray:
    enc = _worker_encoder
    return np.asarray(enc.encode(text), dtype=_token_dtype(enc.n_vocab))


class _ChunkEncoder:
    """Encodes one chunk's text as it streams in, cutting it at safe places into blocks that are
    encoded here or by worker processes, and returns the chunk's ids in order."""

    def __init__(self, enc: Encoder, pool, workers: int, bar):
        self.enc, self.pool, self.workers, self.bar = enc, pool, workers, bar
        self.dtype = _token_dtype(enc.n_vocab)
        self.carry: list[str] = []
        self.carry_len = 0
        self.chars = 0  # characters fed into this chunk (the original's len(raw_text))
        self.parts: list = []  # encoded blocks (arrays, or pending results from the pool)

    def feed(self, text: str, nbytes: int = 0) -> None:
        self.carry.append(text)
        self.carry_len += len(text)
        self.chars += len(text)
        if self.carry_len >= BLOCK_CHARS:
            joined = "".join(self.carry)
            m = _SAFE_SPLIT.search(joined)
            cut = m.end() if m else 0
            if cut:
                self._encode(joined[:cut])
                joined = joined[cut:]
            self.carry, self.carry_len = [joined], len(joined)
        if nbytes:
            self.bar.update(nbytes)

    def _encode(self, text: str) -> None:
        if self.pool is not None:
            self.parts.append(self.pool.apply_async(_encode_block, (text,)))
            # Bound the text in flight: wait for the oldest block once enough are queued.
            pending = [i for i, p in enumerate(self.parts) if not isinstance(p, np.ndarray)]
            if len(pending) > 2 * self.workers:
                self.parts[pending[0]] = self.parts[pending[0]].get()
        else:
            self.parts.append(np.asarray(self.enc.encode(text), dtype=self.dtype))

    def finish(self) -> np.ndarray | None:
        """The chunk's ids (None when it is empty); the encoder is then ready for the next chunk."""
        if self.carry_len:
            self._encode("".join(self.carry))
        parts = [p if isinstance(p, np.ndarray) else p.get() for p in self.parts]
        self.carry, self.carry_len, self.chars, self.parts = [], 0, 0, []
        parts = [p for p in parts if len(p)]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class DatasetError(ValueError):
    """A pre-encoded dataset file that cannot be used; the message names the fix."""


def _npz_chunks(path: str, n_vocab: int) -> list[np.ndarray]:
    dtype = _token_dtype(n_vocab)
    chunks = []
    try:
        with np.load(path, allow_pickle=False) as npz:  # a pickle can run code: never loaded
            for name in npz.files:
                arr = np.asarray(npz[name]).reshape(-1)
                if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= n_vocab):
                    raise DatasetError(f"{path}: array {name} is not token ids below {n_vocab}; re-encode it with encode_dataset()")
                chunks.append(arr.astype(dtype, copy=False))
    except DatasetError:
        raise
    except ValueError as e:
        if "pickle" in str(e):  # numpy refuses object arrays, and files that are a pickle, without allow_pickle
            raise DatasetError(
                f"{path}: holds pickled Python objects, which gpt_2_simple never loads (unpickling can run any code); "
                "a pre-encoded dataset is plain integer arrays: re-create it from the text with encode_dataset()"
            ) from None
        raise DatasetError(f"{path}: not a readable .npz file ({e}); re-create it with encode_dataset()") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # a torn or fake zip
        raise DatasetError(f"{path}: not a readable .npz file ({e}); re-create it with encode_dataset()") from None
    return chunks


def load_dataset(enc: Encoder, path: str | os.PathLike, combine: int = 50000, *, errors: str = "strict", progress: bool = True) -> list[np.ndarray]:
    """Token chunks of a dataset: a text file, .csv, .npz, a folder (recursive) or a glob pattern.

    Text files shorter than ``combine`` characters are joined with ``<|endoftext|>`` between them
    until the joined text reaches ``combine`` characters, as in the original; every chunk is a
    1-D uint16 array, and training windows never cross from one chunk into the next.
    ``errors``: 'strict' (a ValueError naming file and byte offset) or 'ignore'/'replace'.
    """
    if errors not in {"strict", "ignore", "replace"}:
        raise ValueError(f"errors must be 'strict', 'ignore' or 'replace', got {errors!r}")
    paths = dataset_files(path)
    text_bytes = sum(os.path.getsize(p) for p in paths if not p.endswith(".npz"))
    workers = min(os.cpu_count() or 1, 8)
    use_pool = workers > 1 and text_bytes >= PARALLEL_MIN_BYTES and "fork" in multiprocessing.get_all_start_methods()
    # fork: workers inherit the encoder, and user scripts without a __main__ guard are not re-run.
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (enc,)) if use_pool else None
    start = time.perf_counter()
    chunks: list[np.ndarray] = []
    bar = tqdm(total=text_bytes, unit="B", unit_scale=True, desc="Encoding", disable=not progress or text_bytes < (1 << 20), leave=False)
    try:
        chunk = _ChunkEncoder(enc, pool, workers, bar)

        def flush() -> None:
            ids = chunk.finish()
            if ids is not None:
                chunks.append(ids)

        for p in paths:
            if p.endswith(".npz"):
                chunks.extend(_npz_chunks(p, enc.n_vocab))
            elif p.endswith(".csv"):
                chunk.feed(_csv_text(p, errors), os.path.getsize(p))  # no combine check, as in the original
            else:
                for text, nbytes in _read_blocks(p, errors):
                    chunk.feed(text, nbytes)
                if chunk.chars >= combine:
                    flush()
                else:
                    chunk.feed(END_OF_TEXT)
        flush()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    n_tokens = sum(len(c) for c in chunks)
    if progress and text_bytes >= (1 << 20):
        print(f"Encoded {text_bytes / 1e6:.1f} MB into {n_tokens:,} tokens in {seconds:.1f} s ({text_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)")
    return chunks


def encode_csv(csv_path: str, out_path: str = "csv_encoded.txt", header: bool = True, start_token: str = START_OF_TEXT, end_token: str = END_OF_TEXT, *, errors: str = "ignore") -> None:
    """Write a single-column CSV as text with each row wrapped in ``start_token``/``end_token``
    (one row a line), as the original did; ``errors='ignore'`` drops undecodable bytes as it did."""
    from .fileio import atomic_write

    text = _csv_text(csv_path, errors, header, start_token, end_token)
    with atomic_write(out_path, "w") as f:
        f.write(text)


def encode_dataset(file_path: str, model_dir: str = "models", out_path: str = "text_encoded.npz", model_name: str = "124M", combine: int = 50000, *, errors: str = "strict") -> None:
    """Pre-encode a dataset into a compressed .npz of token chunks (``arr_0``, ``arr_1``, ...), the
    original's format: ``finetune`` and the original's ``load_dataset`` both read it."""
    from .fileio import atomic_write

    enc = get_encoder(os.path.join(model_dir, model_name))
    print("Reading files")
    chunks = load_dataset(enc, file_path, combine, errors=errors)
    print("Writing", out_path)
    with atomic_write(out_path) as f:
        np.savez_compressed(f, *chunks)


# ----------------------------------------------------------------------------- windows


def split_chunks(chunks: list[np.ndarray], val_fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out the last ``val_fraction`` of the tokens (views, no copies) for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    total = sum(len(c) for c in chunks)
    n_val = int(round(total * val_fraction))
    if n_val == 0:
        return list(chunks), []
    train, val, seen = [], [], 0
    cut = total - n_val
    for c in chunks:
        lo, hi = seen, seen + len(c)
        if hi <= cut:
            train.append(c)
        elif lo >= cut:
            val.append(c)
        else:
            train.append(c[: cut - lo])
            val.append(c[cut - lo :])
        seen = hi
    return [c for c in train if len(c)], [c for c in val if len(c)]


class Windows:
    """Every training window of ``length`` tokens that lies inside one chunk.

    A chunk shorter than ``length`` is one shorter window (padded in a batch and masked in the
    loss), so small datasets train instead of failing. Chunks of fewer than 2 tokens hold no
    next-token target and are skipped.
    """

    def __init__(self, chunks: list[np.ndarray], length: int):
        self.chunks = [c for c in chunks if len(c) >= 2]
        if not self.chunks:
            raise ValueError("the dataset has fewer than 2 tokens: give it more text")
        self.length = min(length, max(len(c) for c in self.chunks))
        counts = np.array([max(len(c) - self.length + 1, 1) for c in self.chunks], dtype=np.int64)
        self.ends = np.cumsum(counts)  # window index -> chunk, by binary search
        self.n_tokens = sum(len(c) for c in self.chunks)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Windows ``indices`` as (tokens (N, L) int64, zero-padded; lengths (N,))."""
        found = []
        for i in indices:
            c = int(np.searchsorted(self.ends, i, side="right"))
            found.append(self.window(c, int(i) - (int(self.ends[c - 1]) if c else 0)))
        return self.stack(found)

    def stack(self, windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (N, L) int64, zero-padded; lengths (N,)) of up to L-token windows."""
        x = np.zeros((len(windows), self.length), dtype=np.int64)
        for row, w in enumerate(windows):
            x[row, : len(w)] = w
        return x, np.array([len(w) for w in windows], dtype=np.int64)

    def tiling(self, limit: int) -> list[tuple[int, int]]:
        """Non-overlapping (chunk, start) windows covering every chunk, at most ``limit`` of them
        (evenly spaced): the fixed set a validation loss is measured on."""
        spans = [(c, s) for c, chunk in enumerate(self.chunks) for s in range(0, len(chunk) - 1, self.length)]
        if len(spans) > limit:
            spans = [spans[i] for i in np.linspace(0, len(spans) - 1, limit).round().astype(int)]
        return spans

    def window(self, chunk: int, start: int) -> np.ndarray:
        return self.chunks[chunk][start : start + self.length]


class WindowSampler:
    """Draws window indices uniformly (with replacement) from a seeded PCG64 stream whose state is
    saved in checkpoints, so a resumed run sees exactly the windows an uninterrupted run would."""

    def __init__(self, windows: Windows, seed: int):
        self.windows = windows
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.windows.batch(self.rng.integers(0, len(self.windows), size=n))

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
