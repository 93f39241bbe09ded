"""score(): per-text mean token log-likelihood and perplexity, against transformers computing the
same numbers (the strided-window method of its perplexity guide for texts longer than n_ctx)."""

import math

import numpy as np
import pytest
import torch

import gpt_2_simple as gpt2
from gpt_2_simple.score import score
from gpt_2_simple.tokenizer import get_encoder
from reference import TINY, random_gpt2, to_transformers

EOT = 50256


def reference_scores(hf, ids_list, n_ctx, stride):
    """transformers' perplexity recipe: windows of n_ctx tokens moving by stride, each token
    counted in the first window that predicts it; <|endoftext|> first so every token is predicted."""
    out = []
    for ids in ids_list:
        seq = torch.tensor([[EOT] + ids])
        total, count, prev_end = 0.0, 0, 0
        for begin in range(0, seq.shape[1], stride):
            end = min(begin + n_ctx, seq.shape[1])
            trg_len = end - prev_end
            input_ids = seq[:, begin:end]
            labels = input_ids.clone()
            labels[:, :-trg_len] = -100
            with torch.no_grad():
                logp = torch.log_softmax(hf(input_ids).logits.double(), dim=-1)[0]
            shifted = labels[0, 1:]  # position j predicts label j + 1
            keep = shifted != -100
            total += logp[:-1][keep].gather(1, shifted[keep][:, None]).sum().item()
            count += int(keep.sum())
            prev_end = end
            if end == seq.shape[1]:
                break
        out.append((total / count, count))
    return out


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("transformers")
    model = random_gpt2(TINY, seed=3)
    return model, to_transformers(model)


def session_with(model):
    sess = gpt2.start_tf_sess()
    sess.attach(model, ".")
    return sess


def test_scores_match_transformers_short_and_long(models, shakespeare_text):
    model, hf = models
    enc = get_encoder()
    texts = ["Hello world.", "x", shakespeare_text[:1500], shakespeare_text[2000:2400]]
    ids = [enc.encode(t) for t in texts]
    assert len(ids[2]) > 3 * TINY.n_ctx  # several windows
    for stride, batch_size in ((TINY.n_ctx // 2, 3), (7, 1), (TINY.n_ctx - 1, 8)):
        got = score(session_with(model), texts, stride=stride, batch_size=batch_size)
        expected = reference_scores(hf, ids, TINY.n_ctx, stride)
        for g, (ll, n), text_ids in zip(got, expected, ids):
            assert g.tokens == n == len(text_ids)
            assert g.log_likelihood == pytest.approx(ll, abs=1e-5)
            assert g.perplexity == pytest.approx(math.exp(-ll), rel=1e-5)


def test_trained_model_prefers_its_training_text(tmp_path, monkeypatch):
    from test_train import make_base_model, make_text, run

    monkeypatch.chdir(tmp_path)
    make_base_model(tmp_path)
    text = make_text(tmp_path).read_text(encoding="utf-8")
    sess = run(tmp_path, steps=15)
    seen, noise = score(sess, [text[:300], "qz vvk 9;; )) ##ad nnn flarb ZZZ"])
    assert seen.log_likelihood > noise.log_likelihood and seen.perplexity < noise.perplexity
    # a fresh session loads the run from checkpoint_dir/run_name, as load_gpt2 does
    again = score(gpt2.start_tf_sess(), text[:300], checkpoint_dir=str(tmp_path / "checkpoint"))
    assert again[0].log_likelihood == pytest.approx(seen.log_likelihood, abs=1e-5)


def test_bad_arguments(models):
    model, _ = models
    with pytest.raises(ValueError, match="stride"):
        score(session_with(model), "abc", stride=TINY.n_ctx)
    with pytest.raises(ValueError, match="batch_size"):
        score(session_with(model), "abc", batch_size=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        score(gpt2.start_tf_sess(), "abc", checkpoint_dir="/nonexistent")
