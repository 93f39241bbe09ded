"""Tokenizer speed: MB/s of GPT-2 encoding of the bundled Shakespeare corpus by our tokenizer
(``get_encoder()``: the tiktoken fast path when tiktoken is installed), by our pure-Python
reference encoder (BPE cache emptied before each run: one pass over a new text), by ``load_dataset``
(the same tokenizer in worker processes, what ``finetune`` runs), by ``tiktoken`` (Rust) built
offline from our bundled ``encoder.json``/``vocab.bpe``, and by HuggingFace's ``GPT2TokenizerFast``
(Rust) on the same files (under HF's names). Each in its own worker process, interleaved; the ids of ours, tiktoken
and transformers are checked to be identical (a digest per run).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil

import numpy as np

from ..tokenizer import BUNDLED_DIR, BUNDLED_SHA256
from .common import Options, Worker, case_records, log, run_peers

SUITE = "tokenizer"
CORPUS = BUNDLED_DIR / "shakespeare.txt"
COMPARE_TO = ("tiktoken", "transformers")
QUICK_BYTES = 256 << 10


def _digest(ids) -> str:
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def encoder(kind: str, path: str, threads: int | None):
    """Worker side: a callable encoding the text file ``path`` one way."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if kind == "ours":
        from ..tokenizer import get_encoder

        enc = get_encoder()

        def encode():
            return enc.encode(text)
    elif kind == "reference":
        from ..tokenizer import Encoder, get_encoder

        gpt2 = get_encoder()
        enc = Encoder(gpt2.encoder, list(gpt2.bpe_ranks), fast=False)

        def encode():
            enc.cache.clear()  # a new text: no word seen before
            return enc.encode(text)
    elif kind == "load_dataset":
        from .. import dataset
        from ..tokenizer import get_encoder

        enc = get_encoder()
        dataset.PARALLEL_MIN_BYTES = 0  # worker processes whatever the size, as for a large dataset

        def encode():
            enc.cache.clear()
            dataset.load_dataset(enc, path, progress=False)
    elif kind == "tiktoken":
        os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read our files directly, copy nothing to a cache
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pattern

        ranks = data_gym_to_mergeable_bpe_ranks(str(BUNDLED_DIR / "vocab.bpe"), str(BUNDLED_DIR / "encoder.json"),
                                                BUNDLED_SHA256["vocab.bpe"], BUNDLED_SHA256["encoder.json"])
        enc = tiktoken.Encoding("gpt2-bundled", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})

        def encode():
            return enc.encode(text, allowed_special="all")
    elif kind == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        folder = os.path.join(os.path.dirname(path), "hf-tokenizer")  # GPT-2's files under HF's names
        os.makedirs(folder, exist_ok=True)
        for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            shutil.copyfile(BUNDLED_DIR / ours, os.path.join(folder, theirs))
        tok = transformers.GPT2TokenizerFast.from_pretrained(folder, model_max_length=1 << 60)

        def encode():
            return tok(text)["input_ids"]
    else:
        raise ValueError(f"unknown tokenizer {kind!r}")

    def run() -> dict:
        ids = encode()
        return {} if ids is None else {"tokens": len(ids), "digest": _digest(ids)}

    return run


def measure(opts: Options) -> list[dict]:
    """One record per tokenizer (``--quick``: the corpus's first 256 KB)."""
    text = CORPUS.read_bytes()
    if opts.quick:
        text = text[:QUICK_BYTES].decode("utf-8", "ignore").encode("utf-8")
    path = opts.workdir / "tokenizer-corpus.txt"
    path.write_bytes(text)
    kinds = ["ours", "reference", "load_dataset"]
    for peer, module in (("tiktoken", "tiktoken"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is not None:
            kinds.append(peer)
        else:
            opts.note(f"{module} is not installed: the tokenizer suite reports ours without it (pip install {module})")
    processes = min(os.cpu_count() or 1, 8)
    log(f"{SUITE}: {len(text) / 1e6:.2f} MB of {CORPUS.name}, peers {', '.join(kinds)}")
    workers = {}
    try:
        for kind in kinds:
            workers[kind] = Worker(f"{__name__}:encoder", name=kind, threads=opts.threads, kind=kind, path=str(path))
        replies, peaks, load = run_peers(workers, opts.reps, label=SUITE, rate=lambda r: f"{len(text) / 1e6 / r['seconds']:.2f} MB/s")
    finally:
        for w in workers.values():
            w.close()
    digests = {kind: rs[0]["digest"] for kind, rs in replies.items() if "digest" in rs[0]}
    if len(set(digests.values())) > 1:
        opts.note(f"the tokenizers disagree on the ids: {', '.join(sorted(k for k in digests if digests[k] != digests['ours']))} differ from ours")
    details = {kind: {"tokens": rs[0]["tokens"]} if "tokens" in rs[0] else {"processes": processes} for kind, rs in replies.items()}
    config = {"corpus": CORPUS.name, "bytes": len(text), "ids_identical": len(set(digests.values())) == 1}
    return case_records(SUITE, f"encode {len(text) / 1e6:.2f} MB", config, {k: [len(text) / 1e6 / r["seconds"] for r in rs] for k, rs in replies.items()},
                        metric="MB/s", ours={"ours", "reference", "load_dataset"}, compare_to=[c for c in COMPARE_TO if c in kinds], peak_rss=peaks,
                        details=details, load_average=load, headline={"ours"})
