"""Tokenizer ids against the reference GPT-2 BPE (HuggingFace's GPT2Tokenizer on GPT-2's own files)."""

import hashlib
import shutil

import pytest

from gpt_2_simple import tokenizer
from gpt_2_simple.tokenizer import BUNDLED_DIR, END_OF_TEXT, TokenizerFileError, get_encoder

EDGE_CASES = [
    "",
    "Hello world",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "CJK 世界你好 こんにちは 안녕하세요",
    "combining e\u0301 a\u0308 o\u0302\u0323 zalgo Z\u0351\u036b\u0343\u036a",
    "runs of spaces   and\ttabs\t\t and newlines\n\n\n\nend \n \n",
    "   leading and trailing   ",
    "contractions: I'm we're they've he'll she'd it's don't 'quoted'",
    "numbers 12345 3.14159 1,000,000 ٣٤٥ ⅷ",
    "symbols !@#$%^&*()_+-=[]{}|;:',.<>/?`~ «» — … ™",
    "mixed\r\nline\rendings\u2028sep\u00a0nbsp\u200bzwsp",
    "Ünïcödé ñ ß Ω ж ק ع ह ก",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(BUNDLED_DIR / "encoder.json", folder / "vocab.json")
    shutil.copy(BUNDLED_DIR / "vocab.bpe", folder / "merges.txt")
    return transformers.GPT2Tokenizer.from_pretrained(folder)


def test_whole_shakespeare_matches_reference(reference, shakespeare_text):
    enc = get_encoder()
    ids = enc.encode(shakespeare_text)
    assert len(ids) > 1_000_000
    assert ids == reference(shakespeare_text)["input_ids"]
    assert enc.decode(ids) == shakespeare_text


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_reference_and_round_trip(reference, text):
    enc = get_encoder()
    ids = enc.encode(text)
    assert ids == reference(text)["input_ids"]
    assert enc.decode(ids) == text


def test_end_of_text_is_one_token(reference):
    enc = get_encoder()
    text = f"first document{END_OF_TEXT}second{END_OF_TEXT}{END_OF_TEXT}"
    ids = enc.encode(text)
    assert ids.count(50256) == 3
    assert ids == reference(text)["input_ids"]
    assert enc.decode(ids) == text


def test_lone_surrogates_become_replacement_characters(reference):
    enc = get_encoder()
    ids = enc.encode("bad \ud800 surrogate \udfff end")
    assert enc.decode(ids) == "bad \ufffd surrogate \ufffd end"
    assert ids == reference("bad \ufffd surrogate \ufffd end")["input_ids"]


def test_split_utf8_decodes_with_replacement():
    enc = get_encoder()
    ids = enc.encode("世")  # one character, several byte-level tokens
    assert len(ids) > 1
    assert enc.decode_bytes(ids[:1]) == "世".encode()[: len(enc.decode_bytes(ids[:1]))]
    assert set(enc.decode(ids[:1])) == {"\ufffd"}  # an incomplete character, never an exception
    assert enc.decode(ids) == "世"


def test_decode_rejects_unknown_ids():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        get_encoder().decode([50257])


def test_bpe_cache_is_bounded(monkeypatch):
    enc = tokenizer.Encoder(get_encoder().encoder, list(get_encoder().bpe_ranks))
    monkeypatch.setattr(tokenizer, "CACHE_LIMIT", 100)
    enc.encode(" ".join(f"word{i}x" for i in range(1000)))
    assert 0 < len(enc.cache) <= 100


def test_folder_files_take_precedence(tmp_path):
    # A model folder with its own (here: reduced) vocabulary is used instead of the bundled one.
    shutil.copy(BUNDLED_DIR / "vocab.bpe", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_text('{"a": 0, "b": 1, "ab": 2, "Ġ": 3}', encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\n", encoding="utf-8")
    enc = get_encoder(tmp_path)
    assert enc.encode("ab a") == [2, 3, 0]
    assert get_encoder(None).encode("ab") == [397]


def test_bundled_files_are_verified(tmp_path, monkeypatch):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(BUNDLED_DIR / name, tmp_path / name)
        digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert digest == tokenizer.BUNDLED_SHA256[name]
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("x y\n")
    monkeypatch.setattr(tokenizer, "BUNDLED_DIR", tmp_path)
    with pytest.raises(TokenizerFileError, match="sha256"):
        tokenizer._read_files(tmp_path, verify=True)


def test_missing_folder_file_is_a_clear_error(tmp_path):
    shutil.copy(BUNDLED_DIR / "encoder.json", tmp_path / "encoder.json")
    with pytest.raises(TokenizerFileError, match="vocab.bpe is missing"):
        get_encoder(tmp_path)
