"""Tokenizer ids against the reference GPT-2 BPE (HuggingFace's GPT2Tokenizer on GPT-2's own files),
and the tiktoken fast path against our pure-Python reference path."""

import hashlib
import json
import pickle
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
    enc = tokenizer.Encoder(get_encoder().encoder, list(get_encoder().bpe_ranks), fast=False)
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


# --- the tiktoken fast path ------------------------------------------------------------------------

# Characters assigned by Unicode 16/17 (a CJK Extension J ideograph, Kirat Rai and Garay letters):
# letters to the regex module; tiktoken's own Unicode tables may not know them.
NEWER_UNICODE = "\U000323fc\U00016d43\U00010d50"
ADVERSARIAL = EDGE_CASES + [
    f"{END_OF_TEXT}",
    f"a{END_OF_TEXT}b {END_OF_TEXT}{END_OF_TEXT} c<|endoftext|",
    "<|startoftext|>not special<|endoftext|>\n",
    " " * 40 + "x" + "\t" * 17 + "\n" * 9 + " \u3000\u2003 \x1c\x1d\x85 end   ",
    "'s 'S 'll 'LL 're've'd'm'tx don''t",
    f"ideograph {NEWER_UNICODE} between words {NEWER_UNICODE}1 x {NEWER_UNICODE}'ll",
    "\u200d\u200c\ufeff\u00ad soft hyphen, zero widths \U0001f3f3\ufe0f\u200d\U0001f308",
]


@pytest.fixture(scope="module")
def fast_and_reference():
    pytest.importorskip("tiktoken", reason="the fast path needs tiktoken (pip install tiktoken)")
    enc = get_encoder()
    assert enc.tiktoken_encoding() is not None, "GPT-2's bundled vocabulary takes the fast path"
    return enc, tokenizer.Encoder(enc.encoder, list(enc.bpe_ranks), fast=False)


def test_fast_path_matches_reference_on_shakespeare(fast_and_reference, shakespeare_text):
    fast, ref = fast_and_reference
    assert fast.encode(shakespeare_text) == ref.encode(shakespeare_text)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_fast_path_matches_reference_on_adversarial_text(fast_and_reference, text):
    fast, ref = fast_and_reference
    assert fast.encode(text) == ref.encode(text)


def test_newer_unicode_takes_the_reference_path(fast_and_reference):
    fast, ref = fast_and_reference
    assert not tokenizer._settled(f"x {NEWER_UNICODE}") and tokenizer._settled("CJK 世界 emoji 👋🏽 ß")
    # tiktoken 0.14 splits "\U000323fc'll" as symbol run + "ll" (it does not know the letter), where
    # the reference keeps "'ll" whole: such a text must not reach tiktoken.
    text = f"word {NEWER_UNICODE}'ll x\U000323fc's \U000107bf'd"
    assert fast.encode(text) == ref.encode(text)


def test_a_run_with_copies_of_gpt2s_files_is_fast(tmp_path):
    pytest.importorskip("tiktoken", reason="the fast path needs tiktoken")
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(BUNDLED_DIR / name, tmp_path / name)
    assert get_encoder(tmp_path).tiktoken_encoding() is not None


def test_custom_vocabulary_never_uses_gpt2s_ranks(tmp_path, shakespeare_text):
    # GPT-2's files with two ids swapped: same merges, different ids. The encoder must follow them.
    encoder = json.loads((BUNDLED_DIR / "encoder.json").read_text("utf-8"))
    encoder["Ġthe"], encoder["Ġand"] = encoder["Ġand"], encoder["Ġthe"]
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    shutil.copy(BUNDLED_DIR / "vocab.bpe", tmp_path / "vocab.bpe")
    enc = get_encoder(tmp_path)
    assert enc.tiktoken_encoding() is None
    gpt2 = get_encoder()
    text = shakespeare_text[:5000]
    swap = {gpt2.encoder["Ġthe"]: encoder["Ġthe"], gpt2.encoder["Ġand"]: encoder["Ġand"]}
    assert enc.encode(text) == [swap.get(i, i) for i in gpt2.encode(text)]
    assert gpt2.encoder["Ġthe"] in gpt2.encode(text)


def test_encoder_pickles_for_worker_processes(fast_and_reference):
    fast, _ = fast_and_reference
    copy = pickle.loads(pickle.dumps(fast))
    assert copy.encode("a pickled encoder, rebuilt") == fast.encode("a pickled encoder, rebuilt")
    assert copy.tiktoken_encoding() is not None
