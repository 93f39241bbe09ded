"""dataset.py: the original's loading rules, exact streamed encoding, UTF-8 errors, the window sampler."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from gpt_2_simple import dataset
from gpt_2_simple.dataset import Windows, WindowSampler, encode_csv, encode_dataset, load_dataset, split_chunks
from gpt_2_simple.tokenizer import END_OF_TEXT, get_encoder

EOT = 50256
# Whitespace runs, contractions, unicode spaces and symbols, so that cuts land in awkward places.
TRICKY = "Hello  world!\n\n\n  It's   o'clock\u00a0\u3000ok\t\tx 're 'll\r\n\u2028 ümlaut 123 456 ...??  \n"


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def enc():
    return get_encoder()


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_encoding_equals_whole_text(tmp_path, monkeypatch, enc, parallel, shakespeare_text):
    text = shakespeare_text[:20000] + TRICKY * 300 + "x" * 3000 + TRICKY * 50
    monkeypatch.setattr(dataset, "BLOCK_CHARS", 997)  # many cuts, each checked against the whole
    if parallel:
        monkeypatch.setattr(dataset, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
    chunks = load_dataset(enc, _write(tmp_path / "a.txt", text), combine=1, progress=False)
    assert len(chunks) == 1 and chunks[0].dtype == np.uint16
    assert chunks[0].tolist() == enc.encode(text)


def _original_rule(enc, texts, combine):
    """The original load_dataset's chunking of plain-text files (reference)."""
    chunks, raw = [], ""
    for t in texts:
        raw += t
        if len(raw) >= combine:
            chunks.append(enc.encode(raw))
            raw = ""
        else:
            raw += END_OF_TEXT
    if raw:
        chunks.append(enc.encode(raw))
    return chunks


def test_folder_combine_and_order(tmp_path, enc):
    texts = {"b/2.txt": "second file\n", "a.txt": "first file text " * 10, "b/1.txt": "x" * 30, "c.txt": "third\n", ".hidden": "\xff"}
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _write(tmp_path / name, text)
    ordered = [texts[n] for n in ("a.txt", "c.txt", "b/1.txt", "b/2.txt")]  # os.walk order, sorted, hidden skipped
    for combine in (1, 50, 10_000):
        chunks = load_dataset(enc, tmp_path, combine=combine, progress=False)
        assert [c.tolist() for c in chunks] == _original_rule(enc, ordered, combine)
    # a glob takes the same files
    chunks = load_dataset(enc, str(tmp_path / "b" / "*.txt"), combine=1, progress=False)
    assert [c.tolist() for c in chunks] == [enc.encode(texts["b/1.txt"]), enc.encode(texts["b/2.txt"])]
    # <|endoftext|> between joined files is the single end-of-text token
    assert load_dataset(enc, tmp_path, combine=10_000, progress=False)[0].tolist().count(EOT) == 4


def test_csv_rows_wrapped_and_encode_csv(tmp_path, enc):
    rows = [["text", "other"], ["one, with comma", "z"], ["two\nlines", "z"], [], ["three", "z"]]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    expected = "".join(f"<|startoftext|>{r[0]}<|endoftext|>\n" for r in rows[1:] if r)
    chunks = load_dataset(enc, path, progress=False)
    assert [c.tolist() for c in chunks] == [enc.encode(expected)]
    encode_csv(str(path), str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == expected


def test_encode_dataset_npz_roundtrip_and_original_npz(tmp_path, enc, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(3):
        _write(tmp_path / f"f{i}.txt", f"file number {i} " * 20)
    encode_dataset(str(tmp_path / "f*.txt"), out_path="enc.npz", combine=100)
    with np.load("enc.npz") as npz:  # the original's layout: arr_0, arr_1, ... in order
        assert npz.files == ["arr_0", "arr_1", "arr_2"]
        stored = [npz[k] for k in npz.files]
    expected = _original_rule(enc, [f"file number {i} " * 20 for i in range(3)], 100)
    assert [a.tolist() for a in stored] == expected
    assert [c.tolist() for c in load_dataset(enc, "enc.npz", progress=False)] == expected
    # an npz as the original wrote it (int64 arrays from np.stack) loads too
    np.savez_compressed("orig.npz", *[np.stack(e) for e in expected])
    assert [c.tolist() for c in load_dataset(enc, "orig.npz", progress=False)] == expected
    np.savez_compressed("bad.npz", np.array([1, 70000]))
    with pytest.raises(ValueError, match="not token ids"):
        load_dataset(enc, "bad.npz", progress=False)


def test_utf8_error_names_file_and_byte_offset(tmp_path, enc, monkeypatch):
    monkeypatch.setattr(dataset, "BLOCK_CHARS", 7)  # the bad byte lies past several blocks
    data = "héllo wörld ".encode() * 5 + b"\xff" + b" tail"
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(ValueError) as e:
        load_dataset(enc, path, progress=False)
    bad_at = data.index(b"\xff")
    assert str(path) in str(e.value) and f"byte {bad_at} " in str(e.value)
    assert "errors='ignore'" in str(e.value)
    ok = load_dataset(enc, path, combine=1, errors="ignore", progress=False)
    assert ok[0].tolist() == enc.encode(data.decode("utf-8", "ignore"))
    # a character cut by a block boundary is not an error; a leading BOM is dropped
    path.write_bytes(b"\xef\xbb\xbf" + "ünïcödé ".encode() * 10)
    assert load_dataset(enc, path, combine=1, progress=False)[0].tolist() == enc.encode("ünïcödé " * 10)


def test_missing_dataset_is_a_clear_error(tmp_path, enc):
    with pytest.raises(FileNotFoundError, match="nothing.txt not found"):
        load_dataset(enc, tmp_path / "nothing.txt", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        load_dataset(enc, tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        Windows([np.array([5], dtype=np.uint16)], 16)


def test_windows_stay_inside_chunks_and_cover_them_uniformly():
    # chunk k holds ids 1000*k + position: a window crossing chunks would mix thousands
    chunks = [np.arange(1000 * k, 1000 * k + n, dtype=np.uint16) for k, n in enumerate([40, 9, 25], start=1)]
    windows = Windows(chunks, 10)
    assert windows.length == 10 and len(windows) == (40 - 9) + 1 + (25 - 9)
    x, lengths = WindowSampler(windows, seed=0).sample(4000)
    starts = []
    for row, n in zip(x, lengths):
        w = row[:n]
        assert len(set(w // 1000)) == 1 and np.all(np.diff(w) == 1)
        assert np.all(row[n:] == 0)
        if w[0] // 1000 == 1:
            starts.append(w[0] % 1000)
    assert lengths.min() == 9 and lengths.max() == 10  # the short chunk is one shorter window
    counts = np.bincount(starts, minlength=31)  # every start in chunk 1 equally likely
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


def test_short_dataset_uses_shorter_windows():
    windows = Windows([np.arange(2, 7, dtype=np.uint16)], 1024)
    assert windows.length == 5 and len(windows) == 1


def test_sampler_state_resumes_the_stream():
    windows = Windows([np.arange(500, dtype=np.uint16)], 8)
    a = WindowSampler(windows, seed=3)
    a.sample(5)
    state = a.state()
    expected = a.sample(7)[0]
    b = WindowSampler(windows, seed=99)
    b.set_state(state)
    np.testing.assert_array_equal(b.sample(7)[0], expected)
    np.testing.assert_array_equal(WindowSampler(windows, 3).sample(5)[0], WindowSampler(windows, 3).sample(5)[0])


def test_split_chunks_holds_out_the_tail():
    chunks = [np.arange(0, 60, dtype=np.uint16), np.arange(100, 140, dtype=np.uint16)]
    train, val = split_chunks(chunks, 0.4)
    assert np.concatenate(train).tolist() == list(range(60))
    assert np.concatenate(val).tolist() == list(range(100, 140)) and len(val) == 1
    train, val = split_chunks(chunks, 0.1)
    assert [len(c) for c in train] == [60, 30] and np.concatenate(val).tolist() == list(range(130, 140))
    assert np.shares_memory(train[0], chunks[0])  # views, not copies
    assert split_chunks(chunks, 0.0) == (chunks, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_chunks(chunks, 1.0)
    tiles = Windows(val, 4).tiling(100)
    assert tiles == [(0, 0), (0, 4), (0, 8)]


class _Payload:
    """Unpickling this creates the file ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_npz_is_refused_with_our_error_and_never_loaded(tmp_path, enc, monkeypatch):
    import pickle

    from gpt_2_simple.dataset import DatasetError

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "unpickled"
    assert pickle.loads(pickle.dumps(_Payload(marker))) and marker.exists()  # the payload works...
    marker.unlink()
    np.savez("objects.npz", np.array([1, 2, 3]), np.array([_Payload(marker)], dtype=object))  # an array of Python objects
    Path("pickle.npz").write_bytes(pickle.dumps(_Payload(marker)))  # a pickle named .npz
    for name in ("objects.npz", "pickle.npz"):
        with pytest.raises(DatasetError, match=rf"{name}: holds pickled Python objects, which gpt_2_simple never loads.*encode_dataset\(\)"):
            load_dataset(enc, name, progress=False)
    assert not marker.exists()  # ...and was never run
    Path("junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DatasetError, match="junk.npz: not a readable .npz file"):
        load_dataset(enc, "junk.npz", progress=False)
