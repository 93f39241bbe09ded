"""download.py against a real HTTP server on 127.0.0.1 that serves fixture files and misbehaves on cue:
connections cut mid-file, stalls, Range ignored, 404/416/500, wrong checksums, HF-style redirects."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from gpt_2_simple import download
from gpt_2_simple.cli import main
from gpt_2_simple.config import ALIASES, PRETRAINED, GPT2Config
from gpt_2_simple.fileio import UnsafePathError
from gpt_2_simple.download import DownloadError, Expected, download_gpt2, fetch_file, is_gpt2_downloaded
from gpt_2_simple.tokenizer import BUNDLED_DIR, get_encoder

FAST = dict(backoff=0.001, progress=False)  # retries without waiting seconds
DATA = "model.ckpt.data-00000-of-00001"


class Server:
    """Serves ``files`` (URL path -> bytes) with HTTP/1.0 semantics, honouring ``Range: bytes=N-``.

    ``faults[path]`` is a list of actions, one used per request: ("cut", n) sends the full headers but
    only n body bytes, then closes; ("stall", n, s) sends n bytes then waits s seconds; ("status", code)
    answers that status; ("206",) answers 206 Partial Content whatever was asked; ("endless", n) sends n
    bytes of the file repeated, without a Content-Length. ``max_requests`` answers 503 past that many. ``redirects[path] = target`` answers 302 (with ``headers[path]``), as the HF
    hub does. ``md5=True`` adds Azure's MD5 headers. Every request is logged in ``log``.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.redirects: dict[str, str] = {}
        self.faults: dict[str, list[tuple]] = {}
        self.ignore_range = False
        self.md5 = False
        self.max_requests: int | None = None
        self.log: list[dict] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    owner._answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def requests_for(self, path: str) -> list[dict]:
        return [r for r in self.log if r["path"] == path]

    def _answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        entry = {"path": h.path, "range": h.headers.get("Range"), "sent": 0, "status": None}
        self.log.append(entry)
        faults = self.faults.get(h.path)
        fault = faults.pop(0) if faults else None
        extra = self.headers.get(h.path, {})
        if self.max_requests is not None and len(self.log) > self.max_requests:
            fault = ("status", 503)  # a client that never stops would otherwise hang the test
        if fault and fault[0] == "status":
            entry["status"] = fault[1]
            h.send_response(fault[1])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if h.path in self.redirects:
            entry["status"] = 302
            h.send_response(302)
            h.send_header("Location", self.redirects[h.path])
            h.send_header("Content-Length", "0")
            for k, v in extra.items():
                h.send_header(k, v)
            h.end_headers()
            return
        data = self.files.get(h.path)
        if data is None:
            entry["status"] = 404
            h.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if m and not self.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                entry["status"] = 416
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        body = data[start:]
        entry["status"] = 206 if start or (fault and fault[0] == "206") else 200
        h.send_response(entry["status"])
        if fault and fault[0] == "endless":  # no Content-Length: the body ends when the connection closes
            body = (body * (fault[1] // len(body) + 1))[: fault[1]]
        else:
            h.send_header("Content-Length", str(len(body)))
        if entry["status"] == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.md5:
            digest = base64.b64encode(hashlib.md5(data).digest()).decode()
            h.send_header("x-ms-blob-content-md5", digest)
            if not start:
                h.send_header("Content-MD5", digest)
        for k, v in extra.items():
            h.send_header(k, v)
        h.end_headers()
        if fault and fault[0] in ("cut", "stall"):
            body = body[: fault[1]]
        h.wfile.write(body)
        h.wfile.flush()
        entry["sent"] = len(body)
        if fault and fault[0] == "stall":
            time.sleep(fault[2])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv("GPT_2_SIMPLE_BASE_URL", s.url)
    monkeypatch.setenv("GPT_2_SIMPLE_HF_BASE_URL", s.url)
    yield s
    s.close()


def _hparams(config: GPT2Config) -> bytes:
    return (json.dumps(config.to_hparams(), indent=2) + "\n").encode()


CHECKPOINT = b'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'


def openai_files(config: GPT2Config = GPT2Config(n_embd=64, n_head=4, n_layer=2)) -> dict[str, bytes]:
    """The seven files of the original's layout: GPT-2's real tokenizer and text files, random weights."""
    rng = np.random.default_rng(0)
    return {
        "checkpoint": CHECKPOINT,
        "encoder.json": (BUNDLED_DIR / "encoder.json").read_bytes(),
        "hparams.json": _hparams(config),
        DATA: rng.bytes(300_000),
        "model.ckpt.index": rng.bytes(5_000),
        "model.ckpt.meta": rng.bytes(40_000),
        "vocab.bpe": (BUNDLED_DIR / "vocab.bpe").read_bytes(),
    }


def serve_openai(server: Server, name: str = "fixture", **kw) -> dict[str, bytes]:
    files = openai_files(**kw)
    for file_name, data in files.items():
        server.files[f"/models/{name}/{file_name}"] = data
    return files


def assert_folder(folder: Path, files: dict[str, bytes]) -> None:
    for file_name, data in files.items():
        assert (folder / file_name).read_bytes() == data, file_name
    assert not list(folder.glob("*.part"))


def test_full_download_is_byte_identical_with_the_original_layout(server, tmp_path):
    files = serve_openai(server)
    server.md5 = True  # Azure's Content-MD5 is checked too
    folder = download_gpt2(model_dir=str(tmp_path / "models"), model_name="fixture", **FAST)
    assert Path(folder) == tmp_path / "models" / "fixture"
    assert_folder(Path(folder), files)
    # the original's URL scheme, files and order, under the mirror that replaces the bucket's base URL
    assert [r["path"] for r in server.log] == [f"/models/fixture/{f}" for f in download.OPENAI_FILES]
    assert all(r["range"] is None for r in server.log)
    assert is_gpt2_downloaded(str(tmp_path / "models"), "fixture")


def test_connection_cut_mid_file_resumes_with_range(server, tmp_path):
    files = serve_openai(server)
    path = f"/models/fixture/{DATA}"
    server.faults[path] = [("cut", 150_000)]
    download_gpt2(model_dir=str(tmp_path), model_name="fixture", **FAST)
    assert_folder(tmp_path / "fixture", files)
    first, second = server.requests_for(path)
    assert first["sent"] == 150_000 and first["range"] is None
    offset = int(re.fullmatch(r"bytes=(\d+)-", second["range"]).group(1))
    assert 0 < offset <= 150_000
    assert second["status"] == 206 and second["sent"] == len(files[DATA]) - offset


def test_interrupted_download_resumes_on_the_next_run(server, tmp_path):
    files = serve_openai(server)
    path = f"/models/fixture/{DATA}"
    server.faults[path] = [("cut", 200_000)]
    server.md5 = True  # the whole file's MD5 is checked after a resume too
    with pytest.raises(DownloadError, match="failed after 1 attempts"):
        download_gpt2(model_dir=str(tmp_path), model_name="fixture", retries=0, **FAST)
    part = tmp_path / "fixture" / (DATA + ".part")
    kept = part.stat().st_size
    assert 0 < kept <= 200_000 and part.read_bytes() == files[DATA][:kept]
    assert not (tmp_path / "fixture" / DATA).exists()
    assert not is_gpt2_downloaded(str(tmp_path), "fixture")

    server.log.clear()
    download_gpt2(model_dir=str(tmp_path), model_name="fixture", **FAST)
    assert_folder(tmp_path / "fixture", files)
    # the complete files are not fetched again; the partial one continues where it stopped
    assert [(r["path"], r["range"]) for r in server.log] == [(path, f"bytes={kept}-")] + [
        (f"/models/fixture/{f}", None) for f in ("model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
    ]


def test_attempts_that_make_progress_do_not_use_up_retries(server, tmp_path):
    data = np.random.default_rng(8).bytes(400_000)
    server.files["/f"] = data
    server.faults["/f"] = [("cut", 100_000)] * 3
    fetch_file(server.url + "/f", tmp_path / "f", retries=1, **FAST)
    assert (tmp_path / "f").read_bytes() == data
    assert len(server.log) == 4


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    files = serve_openai(server)
    path = f"/models/fixture/{DATA}"
    server.ignore_range = True
    server.faults[path] = [("cut", 100_000)]
    download_gpt2(model_dir=str(tmp_path), model_name="fixture", **FAST)
    assert_folder(tmp_path / "fixture", files)
    first, second = server.requests_for(path)
    assert second["range"] is not None and second["status"] == 200 and second["sent"] == len(files[DATA])


def test_stalled_server_times_out_and_resumes(server, tmp_path):
    data = np.random.default_rng(1).bytes(200_000)
    server.files["/f"] = data
    server.faults["/f"] = [("stall", 70_000, 2.0)]
    start = time.monotonic()
    fetch_file(server.url + "/f", tmp_path / "f", timeout=0.3, **FAST)
    assert time.monotonic() - start < 1.8  # gave up on the stalled response, did not wait it out
    assert (tmp_path / "f").read_bytes() == data
    assert server.log[1]["range"] == f"bytes={download.CHUNK_SIZE}-"  # the whole chunk that arrived was kept


def test_part_file_holding_everything_is_finished_after_416(server, tmp_path):
    data = np.random.default_rng(2).bytes(50_000)
    server.files["/f"] = data
    (tmp_path / "f.part").write_bytes(data)  # killed after the last byte, before the rename
    fetch_file(server.url + "/f", tmp_path / "f", **FAST)
    assert (tmp_path / "f").read_bytes() == data
    assert [(r["range"], r["status"]) for r in server.log] == [("bytes=50000-", 416)]


def test_part_file_longer_than_the_file_is_replaced(server, tmp_path):
    data = np.random.default_rng(3).bytes(50_000)
    server.files["/f"] = data
    (tmp_path / "f.part").write_bytes(data + b"stale tail of another file")
    fetch_file(server.url + "/f", tmp_path / "f", **FAST)
    assert (tmp_path / "f").read_bytes() == data
    assert [r["status"] for r in server.log] == [416, 200]


def test_short_final_file_is_resumed(server, tmp_path):
    """The original package wrote files in place: an interrupted run left a short file under the final name."""
    data = np.random.default_rng(4).bytes(80_000)
    server.files["/f"] = data
    (tmp_path / "f").write_bytes(data[:30_000])
    fetch_file(server.url + "/f", tmp_path / "f", Expected(size=len(data)), **FAST)
    assert (tmp_path / "f").read_bytes() == data
    assert [r["range"] for r in server.log] == ["bytes=30000-"]


def test_resume_that_does_not_fit_is_redone_from_zero(server, tmp_path):
    """The file changed on the server between two runs: the resumed bytes fail the server's MD5, so the
    whole file is fetched once more instead of leaving a spliced file."""
    rng = np.random.default_rng(7)
    old, new = rng.bytes(200_000), rng.bytes(200_000)
    server.files["/f"] = old
    server.faults["/f"] = [("cut", 100_000)]
    server.md5 = True
    with pytest.raises(DownloadError):
        fetch_file(server.url + "/f", tmp_path / "f", retries=0, **FAST)
    server.files["/f"] = new
    server.log.clear()
    fetch_file(server.url + "/f", tmp_path / "f", **FAST)
    assert (tmp_path / "f").read_bytes() == new
    assert [(r["range"] is not None, r["status"]) for r in server.log] == [(True, 206), (False, 200)]


def test_404_names_the_model_and_url(server, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model 'nosuch' not found at http://127\.0\.0\.1:\d+/models/nosuch/checkpoint; check the name"):
        download_gpt2(model_dir=str(tmp_path), model_name="nosuch", **FAST)
    assert len(server.log) == 1  # a 404 is not retried


def test_500_is_retried_then_fails_clearly(server, tmp_path):
    serve_openai(server)
    path = "/models/fixture/checkpoint"
    server.faults[path] = [("status", 500)] * 10
    with pytest.raises(DownloadError, match=r"checkpoint failed after 4 attempts: HTTP 500"):
        download_gpt2(model_dir=str(tmp_path), model_name="fixture", retries=3, **FAST)
    assert len(server.requests_for(path)) == 4
    assert not (tmp_path / "fixture" / "checkpoint").exists()


def test_transient_5xx_and_429_are_retried(server, tmp_path):
    files = serve_openai(server)
    server.faults["/models/fixture/hparams.json"] = [("status", 503), ("status", 429), ("status", 502)]
    download_gpt2(model_dir=str(tmp_path), model_name="fixture", retries=3, **FAST)
    assert_folder(tmp_path / "fixture", files)
    assert len(server.requests_for("/models/fixture/hparams.json")) == 4


def test_backoff_doubles_between_attempts(server, tmp_path, monkeypatch):
    server.faults["/f"] = [("status", 500)] * 5
    waits = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    with pytest.raises(DownloadError):
        fetch_file(server.url + "/f", tmp_path / "f", retries=3, backoff=0.5, progress=False)
    assert waits == [0.5, 1.0, 2.0]


def test_complete_files_are_skipped_without_a_request(server, tmp_path):
    serve_openai(server)
    download_gpt2(model_dir=str(tmp_path), model_name="fixture", **FAST)
    server.log.clear()
    download_gpt2(model_dir=str(tmp_path), model_name="fixture", **FAST)
    assert server.log == []


def test_concurrent_downloads_of_one_folder_fetch_each_file_once(server, tmp_path):
    files = serve_openai(server)
    errors = []

    def run():
        try:
            download_gpt2(model_dir=str(tmp_path), model_name="fixture", **FAST)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_folder(tmp_path / "fixture", files)
    assert sorted(r["path"] for r in server.log) == sorted(f"/models/fixture/{f}" for f in files)


def test_known_gpt2_files_are_checked_against_their_known_sizes(server, tmp_path):
    """A mirror of 124M must serve OpenAI's files: the real small files pass, a wrong data shard is
    refused from its Content-Length alone, before its body is downloaded."""
    serve_openai(server, "124M", config=PRETRAINED["124M"])
    with pytest.raises(DownloadError, match=f"{DATA} is known to be 497759232 bytes"):
        download_gpt2(model_dir=str(tmp_path), model_name="124M", **FAST)
    assert [r["path"].rsplit("/", 1)[1] for r in server.log] == ["checkpoint", "encoder.json", "hparams.json", DATA]
    for f in ("checkpoint", "encoder.json", "hparams.json"):
        assert (tmp_path / "124M" / f).is_file()
    assert not is_gpt2_downloaded(str(tmp_path), "124M")


def test_tokenizer_files_are_sha256_verified(server, tmp_path):
    serve_openai(server, "355M", config=PRETRAINED["355M"])
    bad = bytearray(server.files["/models/355M/encoder.json"])
    bad[100] ^= 1  # same size, one bit off
    server.files["/models/355M/encoder.json"] = bytes(bad)
    with pytest.raises(DownloadError, match="encoder.json .* is damaged: its sha256 is"):
        download_gpt2(model_dir=str(tmp_path), model_name="355M", **FAST)
    assert not (tmp_path / "355M" / "encoder.json").exists()
    assert not (tmp_path / "355M" / "encoder.json.part").exists()


def test_wrong_model_config_is_refused(server, tmp_path):
    serve_openai(server, "117M", config=GPT2Config(n_embd=768, n_head=12, n_layer=6))
    with pytest.raises(DownloadError, match=r"hparams.json of 117M does not describe GPT-2 117M"):
        download_gpt2(model_dir=str(tmp_path), model_name="117M", **FAST)
    assert not (tmp_path / "117M" / "hparams.json").exists()


def test_wrong_md5_from_the_server_is_detected(server, tmp_path):
    data = np.random.default_rng(5).bytes(10_000)
    server.files["/f"] = data
    server.headers["/f"] = {"Content-MD5": base64.b64encode(hashlib.md5(b"other").digest()).decode()}
    with pytest.raises(DownloadError, match="its md5 is"):
        fetch_file(server.url + "/f", tmp_path / "f", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space_is_a_clear_error(server, tmp_path, monkeypatch):
    server.files["/f"] = b"x" * 10_000
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: SimpleNamespace(free=5_000))
    with pytest.raises(DownloadError, match="not enough disk space for f: it needs 9.8 KB, 4.9 KB free"):
        fetch_file(server.url + "/f", tmp_path / "f", **FAST)


def hf_fixture(server: Server, repo: str, config: dict) -> dict[str, bytes]:
    """An HF repo as the hub serves it: small files directly, the LFS safetensors file through a
    302 to a CDN path, with its sha256 in X-Linked-Etag on the redirect."""
    rng = np.random.default_rng(6)
    C, V, T = config["n_embd"], 1000, config["n_positions"]
    tensors = {"wte.weight": rng.standard_normal((V, C), dtype=np.float32), "wpe.weight": rng.standard_normal((T, C), dtype=np.float32)}
    files = {
        "config.json": json.dumps(config, indent=2).encode(),
        "model.safetensors": save(tensors, metadata={"format": "pt"}),
        "vocab.json": (BUNDLED_DIR / "encoder.json").read_bytes(),
        "merges.txt": (BUNDLED_DIR / "vocab.bpe").read_bytes(),
    }
    for name, data in files.items():
        server.files[f"/{repo}/resolve/main/{name}"] = data
    lfs = f"/{repo}/resolve/main/model.safetensors"
    server.files["/cdn/blob"] = server.files.pop(lfs)
    server.redirects[lfs] = "/cdn/blob"
    server.headers[lfs] = {"X-Linked-Etag": '"' + hashlib.sha256(files["model.safetensors"]).hexdigest() + '"'}
    return files


HF_CONFIG = {"model_type": "gpt2", "vocab_size": 1000, "n_positions": 64, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}


def test_hf_source_layout(server, tmp_path):
    files = hf_fixture(server, "fixture", HF_CONFIG)
    folder = Path(download_gpt2(model_dir=str(tmp_path), model_name="fixture", source="hf", **FAST))
    assert_folder(folder, files)
    assert (folder / "encoder.json").read_bytes() == files["vocab.json"]
    assert (folder / "vocab.bpe").read_bytes() == files["merges.txt"]
    text = "Fine-tune GPT-2 on your text <|endoftext|> and généré 🤖"
    assert get_encoder(folder).encode(text) == get_encoder().encode(text)
    assert GPT2Config.from_file(folder / "config.json") == GPT2Config(n_vocab=1000, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
    loaded = load_file(folder / "model.safetensors")
    assert loaded["wte.weight"].shape == (1000, 32) and loaded["wpe.weight"].shape == (64, 32)
    assert is_gpt2_downloaded(str(tmp_path), "fixture", source="hf")
    assert is_gpt2_downloaded(str(tmp_path), "fixture")
    assert not is_gpt2_downloaded(str(tmp_path), "fixture", source="openai")


def test_hf_sha256_from_the_hub_is_verified(server, tmp_path):
    hf_fixture(server, "fixture", HF_CONFIG)
    server.headers["/fixture/resolve/main/model.safetensors"] = {"X-Linked-Etag": '"' + "ab" * 32 + '"'}
    with pytest.raises(DownloadError, match="model.safetensors .* is damaged: its sha256 is .*, expected abab"):
        download_gpt2(model_dir=str(tmp_path), model_name="fixture", source="hf", **FAST)


@pytest.mark.parametrize("name, repo", [("345M", "openai-community/gpt2-medium"), ("774M", "openai-community/gpt2-large"), ("1558M", "openai-community/gpt2-xl")])
def test_hf_source_maps_names_to_the_hub_repos(server, tmp_path, name, repo):
    """Each size comes from its own hub repo; its config.json is checked before the weights are fetched."""
    config = PRETRAINED[ALIASES.get(name, name)]
    hf = {"vocab_size": config.n_vocab, "n_positions": config.n_ctx, "n_embd": config.n_embd, "n_head": config.n_head, "n_layer": 1}
    server.files[f"/{repo}/resolve/main/config.json"] = json.dumps(hf).encode()
    with pytest.raises(DownloadError, match=f"config.json of {name} does not describe GPT-2 {name}"):
        download_gpt2(model_dir=str(tmp_path), model_name=name, source="hf", **FAST)
    assert [r["path"] for r in server.log] == [f"/{repo}/resolve/main/config.json"]


def test_default_urls_are_the_original_bucket_and_the_hub(monkeypatch):
    for var in ("GPT_2_SIMPLE_BASE_URL", "GPT_2_SIMPLE_HF_BASE_URL", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert download._plan("117M", "openai", None)[3] == (
        "https://openaipublic.blob.core.windows.net/gpt-2/models/117M/model.ckpt.data-00000-of-00001", DATA)
    assert download._plan("124M", "hf", None)[1] == ("https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors", "model.safetensors")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    assert download._plan("117M", "hf", None)[0][0] == "https://hf-mirror.example/openai-community/gpt2/resolve/main/config.json"


@pytest.mark.parametrize("name, source, message", [
    ("125M", "openai", "unknown model name '125M'; choose one of: 124M, 355M, 774M, 1558M, 117M, 345M"),
    ("tiny", "openai", "from-scratch size"),
    ("124M", "gdrive", "unknown download source 'gdrive'"),
])
def test_bad_arguments_fail_before_any_request(monkeypatch, tmp_path, name, source, message):
    monkeypatch.delenv("GPT_2_SIMPLE_BASE_URL", raising=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        download_gpt2(model_dir=str(tmp_path), model_name=name, source=source)
    assert list(tmp_path.iterdir()) == []


def test_mirror_url_without_scheme_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_2_SIMPLE_BASE_URL", "mirror.example/gpt-2")
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        download_gpt2(model_dir=str(tmp_path), model_name="124M")


def test_mirror_names_must_be_plain_folder_names(server, tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        download_gpt2(model_dir=str(tmp_path), model_name="../escape")
    assert server.log == []


def test_is_gpt2_downloaded_only_for_complete_files(server, tmp_path):
    files = serve_openai(server)
    models = str(tmp_path)
    assert not is_gpt2_downloaded(models, "fixture")
    download_gpt2(model_dir=models, model_name="fixture", **FAST)
    folder = tmp_path / "fixture"
    assert is_gpt2_downloaded(models, "fixture") and is_gpt2_downloaded(models, "fixture", source="openai")
    (folder / (DATA + ".part")).write_bytes(b"leftover")
    assert not is_gpt2_downloaded(models, "fixture")
    (folder / (DATA + ".part")).unlink()
    (folder / "model.ckpt.meta").write_bytes(b"")
    assert not is_gpt2_downloaded(models, "fixture")
    (folder / "model.ckpt.meta").write_bytes(files["model.ckpt.meta"])
    assert is_gpt2_downloaded(models, "fixture")


def test_is_gpt2_downloaded_checks_safetensors_against_its_header(server, tmp_path):
    hf_fixture(server, "fixture", HF_CONFIG)
    download_gpt2(model_dir=str(tmp_path), model_name="fixture", source="hf", **FAST)
    weights = tmp_path / "fixture" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert not is_gpt2_downloaded(str(tmp_path), "fixture")


def test_is_gpt2_downloaded_with_known_sizes(tmp_path):
    """A 124M folder left by an interrupted run of the original package: every file present, one short."""
    folder = tmp_path / "124M"
    folder.mkdir()
    for name in download.OPENAI_FILES:
        size = download._expected("openai", "124M", name).size
        with open(folder / name, "wb") as f:
            f.truncate(size)  # sparse: no real disk use
    assert is_gpt2_downloaded(str(tmp_path), "124M")
    with open(folder / DATA, "r+b") as f:
        f.truncate(100_000_000)
    assert not is_gpt2_downloaded(str(tmp_path), "124M")


def test_download_file_with_progress_keeps_the_original_signature(server, tmp_path):
    files = serve_openai(server)
    download.download_file_with_progress(server.url, str(tmp_path), "fixture", "hparams.json")
    assert (tmp_path / "hparams.json").read_bytes() == files["hparams.json"]


def test_cli_download_end_to_end(server, tmp_path):
    files = serve_openai(server)
    out = subprocess.run(
        [sys.executable, "-m", "gpt_2_simple", "download", "--model_name", "fixture", "--model_dir", str(tmp_path / "models")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert_folder(tmp_path / "models" / "fixture", files)
    assert "Fetching model.ckpt.data-00000-of-00001" in out.stderr  # the progress bars


def test_cli_download_hf_and_mode_flag(server, tmp_path):
    files = hf_fixture(server, "fixture", HF_CONFIG)
    assert main(["--mode", "download", "--model_name", "fixture", "--model_dir", str(tmp_path), "--source", "hf"]) == 0
    assert_folder(tmp_path / "fixture", files)


def test_cli_download_bad_name_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("GPT_2_SIMPLE_BASE_URL", raising=False)
    assert main(["download", "--model_name", "125M", "--model_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model name '125M'" in err


def test_cli_download_missing_model_on_mirror_is_one_line_exit_2(server, tmp_path, capsys):
    assert main(["download", "--model_name", "nosuch", "--model_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model 'nosuch' not found at" in err


# ---- misbehaving servers: every loop is bounded, the error says what the server did wrong


def test_server_ignoring_range_and_cutting_every_body_is_given_up(server, tmp_path):
    """Each attempt restarts at byte 0 and is cut at the same place: no attempt makes progress. The
    file is fetched from its start at most retries + 1 times (the old loop reset its failure count
    whenever a byte arrived and never stopped: 900 requests in 15 s)."""
    data = np.random.default_rng(11).bytes(300_000)
    server.files["/f"] = data
    server.ignore_range = True
    server.faults["/f"] = [("cut", 100_000)] * 1000
    server.max_requests = 60
    with pytest.raises(DownloadError, match=r"after 4 attempts: .*ignores Range requests.*cuts every transfer short"):
        fetch_file(server.url + "/f", tmp_path / "f", retries=3, **FAST)
    assert len(server.log) == 4
    assert sum(r["sent"] for r in server.log) == 4 * 100_000  # bounded bytes too
    assert not (tmp_path / "f").exists()


def test_server_ignoring_range_with_growing_cuts_is_fetched_at_most_retries_plus_1_times(server, tmp_path):
    """Every attempt goes a little further (so it counts as progress) but restarts at 0: bounded by full fetches."""
    data = np.random.default_rng(12).bytes(300_000)
    server.files["/f"] = data
    server.ignore_range = True
    server.faults["/f"] = [("cut", 70_000 * (k + 1)) for k in range(1000)]  # above CHUNK_SIZE: each cut keeps more
    server.max_requests = 60
    with pytest.raises(DownloadError, match=r"fetched from its start 3 times without arriving whole: the server ignores Range"):
        fetch_file(server.url + "/f", tmp_path / "f", retries=2, **FAST)
    assert len(server.log) == 3


def test_206_without_range_and_content_failing_the_hash_stops_at_once(server, tmp_path):
    """The old loop took a 206 to a plain request as a resume, so a failed hash meant 'fetch it again':
    1,590 requests in 15 s."""
    data = np.random.default_rng(13).bytes(50_000)
    server.files["/f"] = data
    server.faults["/f"] = [("206",)] * 1000
    server.max_requests = 60
    with pytest.raises(DownloadError, match=r"answered 206 Partial Content to a request for the whole file \(no Range was sent\)"):
        fetch_file(server.url + "/f", tmp_path / "f", Expected(sha256="0" * 64), retries=3, **FAST)
    assert len(server.log) == 1
    assert not (tmp_path / "f").exists()


def test_resumed_content_failing_the_hash_is_refetched_once_then_refused(server, tmp_path):
    data = np.random.default_rng(14).bytes(200_000)
    server.files["/f"] = data
    server.faults["/f"] = [("cut", 150_000)]
    server.max_requests = 60
    with pytest.raises(DownloadError, match=r"f from .* is damaged: its sha256 is [0-9a-f]{64}, expected 0{64}"):
        fetch_file(server.url + "/f", tmp_path / "f", Expected(sha256="0" * 64), retries=3, **FAST)
    # cut, resumed (fails the hash), one full fetch (fails again): refused
    assert [(r["range"] is not None, r["status"]) for r in server.log] == [(False, 200), (True, 206), (False, 200)]


def test_body_longer_than_the_file_is_cut_off(server, tmp_path):
    """A server that streams without end (no Content-Length) stops at the file's known size."""
    data = np.random.default_rng(15).bytes(50_000)
    server.files["/f"] = data
    server.faults["/f"] = [("endless", 20_000_000)] * 1000
    server.max_requests = 60
    with pytest.raises(DownloadError, match=r"sends more than the 50000 bytes the file has"):
        fetch_file(server.url + "/f", tmp_path / "f", Expected(size=len(data)), retries=3, **FAST)
    assert len(server.log) == 1
    assert not (tmp_path / "f").exists() and (tmp_path / "f.part").stat().st_size <= 50_000


@pytest.mark.parametrize("name", ["../escaped.txt", "/tmp/abs.txt", "sub/x.txt", ""])
def test_download_file_with_progress_confines_the_file_name(server, tmp_path, name):
    server.files["/models/m/hparams.json"] = b"{}"
    with pytest.raises(UnsafePathError, match="file_name .* must stay inside"):
        download.download_file_with_progress(server.url, str(tmp_path / "models" / "m"), "m", name)
    assert server.log == [] and not (tmp_path / "escaped.txt").exists()
