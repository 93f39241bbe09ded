"""Download GPT-2's pretrained weights, from OpenAI's bucket (the original's seven files) or from the
Hugging Face hub (``config.json`` + ``model.safetensors``).

Every file is streamed into ``<name>.part``; a dropped connection is retried with exponential backoff
and resumed with an HTTP Range request; the result is checked (its size against Content-Length /
Content-Range and the sizes known below, its sha256/MD5 where the server or this module knows them)
and only then renamed to its final name. So a model folder never holds a file that looks complete but
is not, and an interrupted download continues where it stopped when run again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests
from tqdm import tqdm

from . import __version__
from .config import ALIASES, PRETRAINED, SCRATCH, GPT2Config
from .fileio import atomic_write, confined, fsync_dir
from .tokenizer import BUNDLED_DIR, BUNDLED_SHA256

__all__ = [
    "download_gpt2",
    "download_file_with_progress",
    "is_gpt2_downloaded",
    "fetch_file",
    "Expected",
    "DownloadError",
    "RemoteFileNotFound",
    "OPENAI_URL",
    "HF_URL",
    "BASE_URL_ENV",
    "HF_BASE_URL_ENV",
    "OPENAI_FILES",
    "HF_FILES",
    "HF_REPOS",
    "SOURCES",
]

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2"
HF_URL = "https://huggingface.co"
BASE_URL_ENV = "GPT_2_SIMPLE_BASE_URL"  # a mirror of OpenAI's bucket: replaces OPENAI_URL
HF_BASE_URL_ENV = "GPT_2_SIMPLE_HF_BASE_URL"  # a mirror of the HF hub (HF_ENDPOINT is honoured too)
SOURCES = ("openai", "hf")

# The original's files, in the original's order.
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
# config.json first: its check against the model's config fails fast, before the big download.
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
# The HF files hold GPT-2's tokenizer under other names; the copies let get_encoder(folder) find it.
HF_TOKENIZER_COPIES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}
HF_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}

CHUNK_SIZE = 64 * 1024  # bytes per read: a dropped connection loses at most this much
MAX_BACKOFF = 60.0  # seconds between two attempts, at most
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class DownloadError(RuntimeError):
    """A download failed (server error, broken connection, wrong size or checksum)."""


class RemoteFileNotFound(FileNotFoundError):
    """The server answered 404/410 for ``url``."""

    def __init__(self, url: str):
        super().__init__(f"{url} not found (HTTP 404)")
        self.url = url


@dataclass(frozen=True)
class Expected:
    """What a file is known to be, independently of the server that sends it."""

    size: int | None = None  # bytes
    sha256: str | None = None  # hex


# ---------------------------------------------------------------------------------------------------
# What the files are known to be.
#
# OpenAI bucket sizes: the Content-Length the bucket reports, as checked against the live bucket by
# the tests of rasbt/LLMs-from-scratch (ch05/01_main-chapter-code/tests.py, test_model_files). The data
# shard is exactly n_params * 4 bytes (float32). 774M and 1558M have no public record we could check,
# so only their tokenizer files (and the server's own Content-Length and Content-MD5) are verified.
_OPENAI_SIZES = {
    "124M": {
        "checkpoint": 77,
        "hparams.json": 90,
        "model.ckpt.data-00000-of-00001": 497_759_232,
        "model.ckpt.index": 5_215,
        "model.ckpt.meta": 471_155,
    },
    "355M": {
        "checkpoint": 77,
        "hparams.json": 91,
        "model.ckpt.data-00000-of-00001": 1_419_292_672,
        "model.ckpt.index": 10_399,
        "model.ckpt.meta": 926_519,
    },
}
# openai-community/gpt2's model.safetensors is a git-lfs object: this is its lfs oid (sha256) and size.
# Its vocab.json and merges.txt have the sha256 of OpenAI's encoder.json and vocab.bpe (as the hub lists them).
_HF_GPT2_SAFETENSORS = Expected(548_105_171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707")


def _bundled(file_name: str) -> Expected:
    """GPT-2's tokenizer file as shipped with this package (sha256-pinned)."""
    return Expected((BUNDLED_DIR / file_name).stat().st_size, BUNDLED_SHA256[file_name])


def _expected(source: str, model_name: str, file_name: str) -> Expected:
    canonical = ALIASES.get(model_name, model_name)
    if source == "hf":
        if canonical != "124M":
            return Expected()
        if file_name == "model.safetensors":
            return _HF_GPT2_SAFETENSORS
        file_name = HF_TOKENIZER_COPIES.get(file_name, file_name)
    # GPT-2 has one tokenizer: every size (the 117M/345M names too) ships the same two files.
    if file_name in BUNDLED_SHA256 and canonical in PRETRAINED:
        return _bundled(file_name)
    return Expected(_OPENAI_SIZES.get(model_name, {}).get(file_name) if source == "openai" else None)


# ---------------------------------------------------------------------------------------------------
# One file.


def _safetensors_size(path: Path) -> int | None:
    """The size a safetensors file must have according to its own header (None: unreadable header)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return 8 + n + max(ends, default=0)


def _is_complete(path: Path, expected: Expected) -> bool:
    """Cheap completeness test (no hashing): present, non-empty, the known size, a consistent
    safetensors header, and no ``.part`` beside it."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size == 0 or path.with_name(path.name + ".part").exists():
        return False
    if expected.size is not None and size != expected.size:
        return False
    return path.suffix != ".safetensors" or _safetensors_size(path) == size


@dataclass
class _Served:
    """What the server said about the file it sent."""

    total: int | None = None
    sha256: str | None = None
    md5: str | None = None
    resumed: bool = False


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/200' -> (100, 200); 'bytes */200' -> (None, 200); total None when '*'."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _server_hashes(r: requests.Response, served: _Served) -> None:
    """Checksums the server vouches for: the HF hub's X-Linked-Etag (sha256 of an LFS file, sent with
    the redirect to its CDN) and Azure's MD5 (Content-MD5 on a full response; x-ms-blob-content-md5
    holds the whole blob's MD5 on a range response too)."""
    for resp in (*r.history, r):
        etag = resp.headers.get("X-Linked-Etag", "").strip().removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            served.sha256 = etag
    md5 = r.headers.get("x-ms-blob-content-md5") or (r.headers.get("Content-MD5") if r.status_code == 200 else None)
    if md5:
        try:
            served.md5 = base64.b64decode(md5, validate=True).hex()
        except ValueError:
            pass


class _Retryable(Exception):
    """A failure worth another attempt (5xx, 429, a body cut short)."""


def _check_status(r: requests.Response, url: str) -> None:
    if r.status_code in (200, 206):
        return
    if r.status_code in (404, 410):
        raise RemoteFileNotFound(url)
    if r.status_code == 429 or r.status_code >= 500:
        raise _Retryable(f"HTTP {r.status_code} {r.reason}")
    raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class _Transfer:
    """One file streamed into ``part``: requests, resumes, retries, the progress bar."""

    def __init__(self, url: str, part: Path, expected: Expected, http: requests.Session, timeout: float, progress: bool):
        self.url, self.part, self.expected, self.http, self.timeout, self.progress = url, part, expected, http, timeout, progress
        self.served = _Served()
        self.bar: tqdm | None = None  # shown from the first byte on: a file that fails before gets none
        self.received = 0  # bytes of the current attempt
        self.from_zero = 0  # transfers that (re)started the file at byte 0, over the whole fetch
        self.ignored_range = False  # the server answered a resume with the whole file

    def _restart(self, retries: int) -> None:
        """Count a transfer from byte 0 (a full fetch): at most ``retries + 1`` per file."""
        self.from_zero += 1
        if self.from_zero > retries + 1:
            raise DownloadError(
                f"{self.url} was fetched from its start {retries + 1} times without arriving whole: the server "
                + ("ignores Range requests (it answers 200 with the whole file to a resume) and " if self.ignored_range else "")
                + "cuts the transfer short or sends bytes that do not fit what was resumed; try again later or use another mirror"
            )

    def _part_size(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    def run(self, retries: int, backoff: float) -> _Served:
        """Attempts until ``part`` holds the whole file. Bounded twice: ``retries`` attempts in a row
        that do not extend the file beyond its longest so far (so a server that cuts every body and
        ignores Range, restarting at 0 each time, is given up on), and ``retries + 1`` attempts that
        start from byte 0 (each a full fetch)."""
        self.served = _Served()
        failures = 0
        longest = self._part_size()
        try:
            while True:
                self.received = 0
                try:
                    if self._attempt(retries):
                        return self.served
                except requests.exceptions.SSLError as e:  # not transient: retrying cannot help
                    raise DownloadError(f"{self.url}: TLS error ({e}); check the system's certificates or proxy") from None
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retryable) as e:
                    # Count only attempts that brought the file no further: a flaky but moving download goes on.
                    size = self._part_size()
                    failures = 1 if size > longest else failures + 1
                    longest = max(longest, size)
                    if failures > retries:
                        cause = ("the server ignores Range requests, so every attempt restarts at byte 0, and it cuts "
                                 "every transfer short: no attempt got further; use another mirror" if self.ignored_range else
                                 "check your connection and run again (what was downloaded is kept and resumed)")
                        raise DownloadError(f"downloading {self.url} failed after {failures} attempts: {e}; {cause}") from None
                    time.sleep(min(backoff * 2 ** (failures - 1), MAX_BACKOFF))
        finally:
            if self.bar is not None:
                self.bar.close()

    def _attempt(self, retries: int) -> bool:
        """One request. True: ``part`` holds the whole file; False: ask again at once."""
        offset = self._part_size()
        if offset == 0 or self.ignored_range:  # this attempt fetches the file from its start
            self._restart(retries)
        headers = {"Accept-Encoding": "identity", "User-Agent": f"gpt_2_simple/{__version__}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with self.http.get(self.url, headers=headers, stream=True, timeout=self.timeout) as r:
            if r.status_code == 416 and offset:
                _, total = _content_range(r.headers.get("Content-Range"))
                if total == offset:  # a previous run got every byte but stopped before the rename
                    self.served.total, self.served.resumed = total, True
                    return True
                self.part.unlink()  # longer than the file: not a prefix of it
                return False
            _check_status(r, self.url)
            _server_hashes(r, self.served)
            if r.status_code == 206 and not offset:
                raise DownloadError(
                    f"{self.url}: the server answered 206 Partial Content to a request for the whole file (no Range "
                    "was sent); it is misconfigured or not a plain file server: use another mirror"
                )
            if r.status_code == 206:
                start, total = _content_range(r.headers.get("Content-Range"))
                if start != offset:  # not the range asked for
                    self.part.unlink()
                    return False
                self.served.resumed = True
            else:  # 200: the whole file, also from a server that ignores Range
                if offset and not self.ignored_range:
                    self.ignored_range = True
                    self._restart(retries)
                offset = 0
                length = r.headers.get("Content-Length", "")
                total = int(length) if length.isdigit() else None
            self._check_total(total, offset)
            self._write(r, offset)
        if self.served.total is not None and offset + self.received < self.served.total:
            raise _Retryable(f"connection closed after {offset + self.received} of {self.served.total} bytes")
        return True

    def _check_total(self, total: int | None, offset: int) -> None:
        name = self.part.name.removesuffix(".part")
        if self.expected.size is not None and total is not None and total != self.expected.size:
            raise DownloadError(
                f"{self.url} is {total} bytes but {name} is known to be {self.expected.size} bytes: "
                "the server sends a different file; check the URL or mirror"
            )
        self.served.total = total if total is not None else self.expected.size
        if self.served.total is not None:
            free = shutil.disk_usage(self.part.parent).free
            if free < self.served.total - offset:
                raise DownloadError(
                    f"not enough disk space for {name}: it needs {_human(self.served.total - offset)}, "
                    f"{_human(free)} free in {self.part.parent}; free some space or choose another model_dir"
                )

    def _write(self, r: requests.Response, offset: int) -> None:
        if self.bar is None:
            self.bar = tqdm(
                desc=f"Fetching {self.part.name.removesuffix('.part')}", ncols=100,
                unit="B", unit_scale=True, unit_divisor=1024, disable=not self.progress,
            )
        self.bar.reset(total=self.served.total)
        self.bar.update(offset)
        with open(self.part, "ab" if offset else "wb") as f:
            for chunk in r.iter_content(chunk_size=CHUNK_SIZE):
                if self.served.total is not None and offset + self.received + len(chunk) > self.served.total:
                    raise DownloadError(
                        f"{self.url}: the server sends more than the {self.served.total} bytes the file has "
                        "(announced or known); it sends another file: check the URL or mirror"
                    )
                f.write(chunk)
                self.received += len(chunk)
                self.bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())


def _verify(path: Path, expected: Expected, served: _Served) -> str | None:
    """What is wrong with the downloaded ``path`` (None: nothing)."""
    size = path.stat().st_size
    for name, want in (("known", expected.size), ("announced", served.total)):
        if want is not None and size != want:
            return f"it is {size} bytes, the {name} size is {want}"
    if path.suffix == ".safetensors" and _safetensors_size(path) != size:
        return "its safetensors header does not match its size"
    checks = {"sha256": {expected.sha256, served.sha256} - {None}, "md5": {served.md5} - {None}}
    hashers = {name: hashlib.new(name) for name, wanted in checks.items() if wanted}
    if hashers:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                for h in hashers.values():
                    h.update(block)
    for name, h in hashers.items():
        for want in checks[name]:
            if h.hexdigest() != want:
                return f"its {name} is {h.hexdigest()}, expected {want}"
    return None


def fetch_file(
    url: str,
    dest: str | os.PathLike,
    expected: Expected = Expected(),
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (streamed, resumable, verified); skip it when ``dest`` is complete.

    ``retries``: attempts after the first one that receive nothing (connection errors, timeouts,
    HTTP 429/5xx); waits ``backoff * 2**k`` seconds between them. ``timeout``: seconds to connect and
    between two reads. Raises RemoteFileNotFound on HTTP 404, DownloadError on any other failure.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        if _is_complete(dest, expected):
            return dest
        # Keep its bytes: a short file (e.g. from the original package, which wrote in place) is a
        # prefix to resume; a wrong one is replaced once the server says how long the file is.
        os.replace(dest, part)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with requests.Session() as http:
        transfer = _Transfer(url, part, expected, http, timeout, progress)  # counts full fetches across the loop
        while True:
            served = transfer.run(retries, backoff)
            problem = _verify(part, expected, served)
            if problem is None:
                break
            part.unlink()
            if not served.resumed:
                raise DownloadError(
                    f"{dest.name} from {url} is damaged: {problem}. It was deleted; run again, "
                    "and if this repeats the server sends a different file (check the URL or mirror)"
                )
            # The bytes of an earlier attempt did not fit: download the whole file once more (a
            # fresh full fetch, counted against retries + 1 like every other).
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


# ---------------------------------------------------------------------------------------------------
# Models.


def _known_names() -> str:
    return ", ".join([*PRETRAINED, *ALIASES])


def _plan(model_name: str, source: str, base_url: str | None) -> list[tuple[str, str]]:
    """(url, file name) for each file of ``model_name`` from ``source``, validating both."""
    if source not in SOURCES:
        raise ValueError(f"unknown download source {source!r}; choose 'openai' (OpenAI's files, as the original) or 'hf' (Hugging Face hub)")
    if model_name in SCRATCH:
        raise ValueError(f"model {model_name!r} is a from-scratch size: there is nothing to download (finetune trains it from random weights)")
    if source == "openai":
        base = base_url or os.environ.get(BASE_URL_ENV) or OPENAI_URL
    else:
        base = base_url or os.environ.get(HF_BASE_URL_ENV) or os.environ.get("HF_ENDPOINT") or HF_URL
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"download base URL {base!r} must start with http:// or https:// (check {BASE_URL_ENV}/{HF_BASE_URL_ENV})")
    known = model_name in PRETRAINED or model_name in ALIASES
    if not known and base in (OPENAI_URL, HF_URL):
        raise ValueError(f"unknown model name {model_name!r}; choose one of: {_known_names()}")
    if not _NAME.fullmatch(model_name) or ".." in model_name:
        raise ValueError(f"model name {model_name!r} must be a plain folder name (letters, digits, '.', '_', '-')")
    # Other names are fine on a mirror, which may host models of its own.
    if source == "openai":
        return [(f"{base}/models/{model_name}/{name}", name) for name in OPENAI_FILES]
    repo = HF_REPOS[ALIASES.get(model_name, model_name)] if known else model_name
    return [(f"{base}/{repo}/resolve/main/{name}", name) for name in HF_FILES]


def _check_config(path: Path, model_name: str) -> None:
    """The downloaded hparams.json/config.json must describe the model that was asked for."""
    want = PRETRAINED.get(ALIASES.get(model_name, model_name))
    if want is None:
        return
    try:
        got = GPT2Config.from_file(path)
        problem = None if got == want else f"it says {got}"
    except ValueError as e:
        problem = str(e)
    if problem:
        path.unlink()
        raise DownloadError(
            f"{path.name} of {model_name} does not describe GPT-2 {model_name} ({want}): {problem}. "
            "The server sends another model; check the URL or mirror"
        )


def _copy_tokenizer(folder: Path) -> None:
    for src, dst in HF_TOKENIZER_COPIES.items():
        data = (folder / src).read_bytes()
        if not (folder / dst).is_file() or (folder / dst).read_bytes() != data:
            with atomic_write(folder / dst) as f:
                f.write(data)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """One download per model folder at a time (e.g. every rank of a torchrun job calling
    download_gpt2): the others wait, then find the files complete."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent downloads of one folder are unsafe
        yield
        return
    with open(folder / ".download.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download_gpt2(
    model_dir: str | os.PathLike = "models",
    model_name: str = "124M",
    *,
    source: str = "openai",
    base_url: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
) -> str:
    """Download a pretrained GPT-2 into ``<model_dir>/<model_name>/`` and return that folder.

    ``model_name``: 124M, 355M, 774M or 1558M (117M and 345M are their first names). ``source``:
    ``'openai'`` gets OpenAI's seven TensorFlow checkpoint files, as the original package did;
    ``'hf'`` gets the same weights from the Hugging Face hub (``config.json``, ``model.safetensors``,
    ``vocab.json``, ``merges.txt``, plus copies of the last two as ``encoder.json``/``vocab.bpe``).
    Both folders load with ``load_gpt2``. Files already complete are skipped; an interrupted download
    resumes. ``base_url`` (or the environment variables GPT_2_SIMPLE_BASE_URL for 'openai',
    GPT_2_SIMPLE_HF_BASE_URL or HF_ENDPOINT for 'hf') points at a mirror, which may also serve
    other model names. ``retries``/``backoff``/``timeout``: see ``fetch_file``.
    """
    plan = _plan(model_name, source, base_url)
    folder = Path(model_dir) / model_name
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        for url, name in plan:
            try:
                path = fetch_file(
                    url, folder / name, _expected(source, model_name, name),
                    retries=retries, backoff=backoff, timeout=timeout, progress=progress,
                )
            except RemoteFileNotFound as e:
                raise FileNotFoundError(f"model {model_name!r} not found at {e.url}; check the name (GPT-2's: {_known_names()})") from None
            if name in ("hparams.json", "config.json"):
                _check_config(path, model_name)
        if source == "hf":
            _copy_tokenizer(folder)
    return str(folder)


def download_file_with_progress(url_base: str, sub_dir: str, model_name: str, file_name: str) -> None:
    """The original's helper: download ``url_base/models/<model_name>/<file_name>`` into
    ``sub_dir/<file_name>`` (now resumable and verified, like ``download_gpt2``)."""
    dest = confined(sub_dir, file_name, what="file_name", fix="give the name of one of the model's files, such as 'hparams.json'", single=True)
    fetch_file(f"{url_base.rstrip('/')}/models/{model_name}/{file_name}", dest, _expected("openai", model_name, file_name))


def is_gpt2_downloaded(model_dir: str | os.PathLike = "models", model_name: str = "124M", source: str | None = None) -> bool:
    """True when ``<model_dir>/<model_name>`` holds every file of a complete download: OpenAI's seven
    files or (``source=None`` accepts either) the HF files. A ``.part`` file left by an interrupted
    download, or a file of the wrong size, makes it False."""
    folder = Path(model_dir) / model_name
    files = {"openai": OPENAI_FILES, "hf": (*HF_FILES, *HF_TOKENIZER_COPIES.values())}
    return any(
        all(_is_complete(folder / name, _expected(s, model_name, name)) for name in files[s])
        for s in (SOURCES if source is None else (source,))
    )
