"""GPT-2's byte-level BPE: the only code that turns text into token ids and back.

Ids are identical to OpenAI's ``encoder.py`` with one deliberate difference: the literal text
``<|endoftext|>`` encodes to the single end-of-text token (50256), as GPT-2 was trained to see it,
where the original split it into seven ordinary tokens.

``Encoder._encode_ordinary`` below is the reference (pure Python, what the tests check everything
against). When ``tiktoken`` is installed and the vocabulary is GPT-2's own (the bundled files, or a
run folder holding copies of them), ``encode`` hands the text to a ``tiktoken.Encoding`` built here
from those same ranks (no download): the same ids, several times faster. Any other vocabulary
always takes the reference path (tiktoken merges by the rank of the merged token, which equals
GPT-2's merge order for GPT-2's files but need not for a custom ``vocab.bpe``), and so does a text
holding a character newer than this Python's Unicode tables, whose letter/number class the two
regex engines may see differently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import regex

__all__ = ["Encoder", "get_encoder", "bytes_to_unicode", "END_OF_TEXT", "BUNDLED_DIR", "TokenizerFileError"]

END_OF_TEXT = "<|endoftext|>"
BUNDLED_DIR = Path(__file__).resolve().parent / "data"
# GPT-2's own files, as OpenAI published them; the bundled copies are checked against these.
BUNDLED_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, whitespace.
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# Distinct words seen by one encoder before its BPE cache is emptied (a few tens of MB at most).
CACHE_LIMIT = 100_000


class TokenizerFileError(ValueError):
    """encoder.json / vocab.bpe missing, damaged or inconsistent."""


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# Letters, numbers and spaces as the pre-tokenizer sees them.
_CLASSED = regex.compile(r"[\p{L}\p{N}\s]")


def _settled(text: str) -> bool:
    """False when ``text`` holds a character the ``regex`` module classes as letter, number or space
    but this Python's ``unicodedata`` does not know (assigned by a newer Unicode): tiktoken's Rust
    regex carries its own Unicode tables, so only on such characters can its pre-tokenizer differ
    from ours. One pass over the text in numpy, then a look at each distinct non-ASCII character."""
    if text.isascii():
        return True
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    seen = np.zeros(0x110000, dtype=bool)
    seen[code_points[code_points >= 0x80]] = True
    return not any(unicodedata.category(c) == "Cn" and _CLASSED.match(c) for c in map(chr, np.flatnonzero(seen)))


@functools.lru_cache(maxsize=None)
def _gpt2_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return _parse_files(BUNDLED_DIR, verify=True)


class Encoder:
    """Byte-level BPE over ``encoder`` (token string -> id) and ranked ``merges``.

    ``fast=False`` keeps every text on the pure-Python reference path (tests, benchmarks)."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], *, fast: bool = True):
        self.encoder = encoder
        self.decoder = {i: s for s, i in encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.fast = fast
        self._tiktoken = None  # built on first use (see tiktoken_encoding)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Raw bytes of every token, so decode is one join; the end-of-text token decodes to its text.
        self.token_bytes = {i: bytes(self.byte_decoder[c] for c in s) if s != END_OF_TEXT else s.encode() for i, s in self.decoder.items()}
        self.eot_token = encoder.get(END_OF_TEXT)
        self.cache: dict[str, list[int]] = {}

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    def __getstate__(self) -> dict:
        # Sent to dataset worker processes: they rebuild the tiktoken encoding themselves.
        return {**self.__dict__, "_tiktoken": None, "cache": {}}

    def tiktoken_encoding(self):
        """The ``tiktoken.Encoding`` ``encode`` uses, or None when it takes the reference path
        (``fast=False``, tiktoken not installed, or a vocabulary that is not GPT-2's)."""
        if self._tiktoken is None:
            self._tiktoken = False
            if self.fast and self.eot_token is not None:
                try:
                    import tiktoken
                except ImportError:
                    return None
                try:
                    encoder, merges = _gpt2_vocabulary()
                except TokenizerFileError:  # damaged bundled files: nothing to compare with, stay exact
                    return None
                if self.encoder == encoder and sorted(self.bpe_ranks, key=self.bpe_ranks.__getitem__) == merges:
                    # GPT-2's ranks are its ids: token i is the merge that made it (bytes first).
                    ranks = {b: i for i, b in self.token_bytes.items() if i != self.eot_token}
                    self._tiktoken = tiktoken.Encoding("gpt2-gpt_2_simple", pat_str=PATTERN.pattern, mergeable_ranks=ranks,
                                                       special_tokens={END_OF_TEXT: self.eot_token})
        return self._tiktoken or None

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenized piece (already mapped byte -> unicode)."""
        parts = list(word)
        while len(parts) > 1:
            # Merge the lowest-ranked adjacent pair everywhere it occurs.
            best = min(range(len(parts) - 1), key=lambda i: self.bpe_ranks.get((parts[i], parts[i + 1]), float("inf")))
            pair = (parts[best], parts[best + 1])
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.encoder[p] for p in parts]

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache, byte_encoder = self.cache, self.byte_encoder
        for piece in PATTERN.findall(text):
            cached = cache.get(piece)
            if cached is None:
                mapped = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
                cached = self._bpe(mapped)
                if len(cache) >= CACHE_LIMIT:
                    cache.clear()  # bounded memory on corpora with unbounded vocabularies
                cache[piece] = cached
            ids.extend(cached)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` in the text becomes the single id 50256."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8: replace them with U+FFFD (as tiktoken does).
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        fast = self.tiktoken_encoding()
        encode_ordinary = fast.encode_ordinary if fast is not None and _settled(text) else self._encode_ordinary
        if self.eot_token is None:
            return encode_ordinary(text)
        parts = text.split(END_OF_TEXT)
        if len(parts) == 1:
            return encode_ordinary(text)
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i:
                ids.append(self.eot_token)
            if part:
                ids.extend(encode_ordinary(part))
        return ids

    def decode_bytes(self, ids) -> bytes:
        try:
            return b"".join(self.token_bytes[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is outside the vocabulary (0..{self.n_vocab - 1})") from None

    def decode(self, ids) -> str:
        """Text of ``ids``; bytes that do not form valid UTF-8 (a split character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_files(folder: Path, verify: bool) -> Encoder:
    return Encoder(*_parse_files(folder, verify))


def _parse_files(folder: Path, verify: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    enc_path, bpe_path = folder / "encoder.json", folder / "vocab.bpe"
    for path in (enc_path, bpe_path):
        if not path.is_file():
            raise TokenizerFileError(f"tokenizer file {path} is missing; copy encoder.json and vocab.bpe from the model download")
        if verify and _sha256(path) != BUNDLED_SHA256[path.name]:
            raise TokenizerFileError(f"bundled tokenizer file {path} is damaged (sha256 mismatch); reinstall gpt_2_simple")
    try:
        encoder = json.loads(enc_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{enc_path} is not valid JSON ({e})") from None
    lines = bpe_path.read_text(encoding="utf-8").split("\n")
    # First line is a '#version' comment; the last is empty.
    merges = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerFileError(f"{bpe_path} line {lineno}: expected two symbols, got {line!r}")
        merges.append((pair[0], pair[1]))
    return encoder, merges


@functools.lru_cache(maxsize=8)
def _cached_encoder(folder: str, verify: bool) -> Encoder:
    return _read_files(Path(folder), verify)


def get_encoder(folder: str | os.PathLike | None = None) -> Encoder:
    """The tokenizer of a model folder (its own ``encoder.json``/``vocab.bpe``) or, when ``folder``
    is None or lacks them, GPT-2's bundled files (sha256-verified)."""
    if folder is not None:
        folder = Path(folder)
        if (folder / "encoder.json").is_file() or (folder / "vocab.bpe").is_file():
            return _cached_encoder(str(folder.resolve()), False)
    return _cached_encoder(str(BUNDLED_DIR), True)
