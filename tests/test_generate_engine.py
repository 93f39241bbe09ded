"""generate() / generate_to_file() end to end on the engine, against the PyTorch reference:
torch_generate with the same requests, run to the full length, then the original's text rules
(the transcription in test_generate_text.py). A tiny random model saved as a run folder."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import gpt_2_simple as gpt2  # noqa: E402
from generate_helpers import reference, reference_tokens, save_run, texts_of  # noqa: E402
from gpt_2_simple.generate import GenerateSettings, SampleSpec, generate_samples, load_engine  # noqa: E402
from reference import TINY, random_gpt2  # noqa: E402


def _peaked(model):
    """GPT-2's init gives a random model near-uniform next-token distributions (logits ~1e-5 apart),
    where float rounding between two correct implementations decides which of two tokens sits at a
    top-p cut. A larger final LayerNorm gain (x10) spreads the logits (std ~1.5) as a trained model's are,
    so exact text equality tests the engine, not the rounding."""
    with torch.no_grad():
        model.ln_f.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def models():
    return {1: _peaked(random_gpt2(TINY, seed=1)), 2: _peaked(random_gpt2(TINY, seed=2))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("generate")
    save_run(root / "checkpoint" / "run1", models[1], 1)
    return root


@pytest.fixture
def sess(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    sess = gpt2.start_tf_sess(threads=2)
    gpt2.load_gpt2(sess, run_name="run1")
    sess.dtype = "fp32"  # the PyTorch reference computes in fp32
    return sess


CASES = [
    dict(length=16, temperature=0.7),
    dict(length=16, temperature=1.0, top_k=40, prefix="Hello there"),
    dict(length=16, temperature=0.9, top_p=0.9, top_k=5, prefix="<|startoftext|>"),
    dict(length=12, temperature=0.0, prefix="The"),
    dict(length=100, temperature=0.8, top_k=100, prefix="A long text"),  # > n_ctx=64: sliding window
]


@pytest.mark.parametrize("case", CASES)
def test_texts_match_the_pytorch_reference(sess, models, case):
    case = dict(case)
    prefix = case.pop("prefix", None)
    got = gpt2.generate(sess, return_as_list=True, prefix=prefix, nsamples=3, batch_size=2, seed=11, **case)
    assert got == reference(models[1], [prefix] * 3, seed=11, **case)
    assert len(set(got)) > 1 or case["temperature"] == 0


def _truncate_candidates(texts, prefix):
    """Strings that occur in the reference texts after the prefix: real truncation points."""
    found = []
    for text in texts:
        body = text[len(prefix):] if prefix and text.startswith(prefix) else text
        words = [w for w in body.split(" ") if len(w) >= 2 and w.isascii() and w.isprintable()]
        found += words[2:3]
    return found


@pytest.mark.parametrize("include_prefix", [True, False])
def test_truncate_stops_early_and_keeps_the_originals_text(sess, models, include_prefix):
    prefix, length, prompts = "Once upon", 30, ["Once upon"] * 5
    outputs = reference_tokens(models[1], prompts, length=length, temperature=1.0, top_k=50, seed=3)
    truncate = _truncate_candidates(texts_of(outputs, prompts), prefix)[0]
    expected = texts_of(outputs, prompts, truncate, include_prefix)
    got = gpt2.generate(sess, return_as_list=True, prefix=prefix, nsamples=5, batch_size=4, length=length,
                        temperature=1.0, top_k=50, seed=3, truncate=truncate, include_prefix=include_prefix)
    assert got == expected
    assert expected != texts_of(outputs, prompts)  # it was found and cut somewhere
    # The engine really stopped those rows at the truncate string.
    engine, enc = load_engine(sess.checkpoint.path, sess=sess, dtype="fp32")
    specs = [SampleSpec(prefix, length, 1.0, 50, 0.0, 3, i) for i in range(5)]
    samples = generate_samples(engine, enc, specs, GenerateSettings(truncate, include_prefix), batch_size=4)
    max_new = length - len(enc.encode(prefix))
    stopped = [s for s in samples if s.finish_reason == "stop_sequence"]
    assert any(s.n_tokens < max_new for s in stopped)
    assert all(s.n_tokens == max_new for s in samples if s.finish_reason == "length")


def test_same_texts_whatever_the_batch_size(sess):
    kwargs = dict(return_as_list=True, prefix="Hi", nsamples=7, length=20, temperature=1.0, top_k=40, seed=5)
    one = gpt2.generate(sess, batch_size=1, **kwargs)
    assert gpt2.generate(sess, batch_size=3, **kwargs) == one  # 7 is not a multiple of 3
    assert gpt2.generate(sess, batch_size=7, **kwargs) == one
    assert gpt2.generate(sess, batch_size=3, **{**kwargs, "nsamples": 4}) == one[:4]


def test_prefix_list_gives_one_prompt_per_sample(sess, models):
    prompts = ["First", "Second prompt", None, "First"]
    got = gpt2.generate(sess, return_as_list=True, prefix=prompts, batch_size=3, length=18, temperature=0.8, seed=9)
    assert got == reference(models[1], prompts, length=18, temperature=0.8, seed=9)
    assert got[0] != got[3]  # the same prompt at another sample number draws differently


def test_printing_files_and_delimiters(sess, workdir, capsys):
    capsys.readouterr()  # load_gpt2's message
    kwargs = dict(prefix="Hey", nsamples=3, batch_size=2, length=12, seed=4)
    texts = gpt2.generate(sess, return_as_list=True, **kwargs)
    assert capsys.readouterr().out == ""
    delim = "=" * 20 + "\n"
    assert gpt2.generate(sess, **kwargs) is None
    assert capsys.readouterr().out == "".join(f"{t}\n{delim}" for t in texts)
    gpt2.generate_to_file(sess, destination_path="out.txt", sample_delim="--\n", **kwargs)
    assert (workdir / "out.txt").read_bytes() == "".join(f"{t}\n--\n" for t in texts).encode("utf-8")
    assert gpt2.generate(sess, destination_path="both.txt", return_as_list=True, **kwargs) == texts
    assert capsys.readouterr().out == ""
    assert (workdir / "both.txt").read_bytes().decode("utf-8") == "".join(f"{t}\n{delim}" for t in texts)
    # One sample: no delimiter, as in the original.
    gpt2.generate(sess, **{**kwargs, "nsamples": 1})
    assert capsys.readouterr().out == texts[0] + "\n"


def test_bad_prefix_never_touches_the_destination(sess, workdir):
    (workdir / "keep.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(ValueError, match="prefix is .* tokens, longer than the model's context of 64"):
        gpt2.generate(sess, destination_path="keep.txt", prefix="word " * 80, length=200)
    assert (workdir / "keep.txt").read_text(encoding="utf-8") == "precious"


def test_weights_follow_the_session(workdir, models, monkeypatch):
    monkeypatch.chdir(workdir)
    save_run(workdir / "checkpoint" / "two", models[1], 1)
    save_run(workdir / "checkpoint" / "two", models[2], 2)
    kwargs = dict(return_as_list=True, nsamples=2, length=10, seed=1)
    sess = gpt2.start_tf_sess()
    sess.dtype = "fp32"
    # No model loaded: the run named, its newest checkpoint.
    assert gpt2.generate(sess, run_name="two", **kwargs) == reference(models[2], [None] * 2, length=10, seed=1)
    # load_gpt2 with a specific checkpoint: that one, whatever run_name generate() is given.
    gpt2.load_gpt2(sess, run_name="two", checkpoint=1)
    assert gpt2.generate(sess, run_name="nope", **kwargs) == reference(models[1], [None] * 2, length=10, seed=1)
    gpt2.load_gpt2(sess, run_name="two")
    assert gpt2.generate(sess, **kwargs) == reference(models[2], [None] * 2, length=10, seed=1)


def test_random_seed_is_kept_and_reproduces(sess):
    kwargs = dict(return_as_list=True, nsamples=3, batch_size=3, length=12, temperature=1.0)
    first = gpt2.generate(sess, **kwargs)
    seed = sess.cache["seed"]
    second = gpt2.generate(sess, **kwargs)
    assert sess.cache["seed"] != seed and second != first
    assert gpt2.generate(sess, seed=seed, **kwargs) == first


def test_default_dtype_is_bf16_and_generation_never_imports_torch(workdir):
    code = (
        "import sys, json, gpt_2_simple as gpt2\n"
        "sess = gpt2.start_tf_sess()\n"
        "gpt2.load_gpt2(sess)\n"
        "texts = gpt2.generate(sess, return_as_list=True, nsamples=2, length=8, seed=1)\n"
        "print(json.dumps([texts, sess.cache['engine'].dtype, 'torch' in sys.modules or 'matplotlib' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    texts, dtype, torch_or_matplotlib_loaded = json.loads(out.stdout.splitlines()[-1])
    assert len(texts) == 2 and dtype == "bf16" and not torch_or_matplotlib_loaded


def test_backend_and_dtype_arguments(workdir, models, monkeypatch):
    monkeypatch.chdir(workdir)
    sess = gpt2.start_tf_sess(threads=2)
    gpt2.load_gpt2(sess, run_name="run1")
    kwargs = dict(return_as_list=True, nsamples=2, length=10, seed=1)
    # dtype="fp32" is the PyTorch reference's arithmetic: the same texts
    assert gpt2.generate(sess, backend="cpu", dtype="fp32", **kwargs) == reference(models[1], [None] * 2, length=10, seed=1)
    assert (sess.cache["engine"].dtype, sess.cache["engine"].backend) == ("fp32", "cpu")
    gpt2.generate(sess, **kwargs)  # neither given nor set on the session: bf16 on 'auto'
    assert sess.cache["engine"].dtype == "bf16"
    sess.dtype = "fp32"
    gpt2.generate(sess, dtype="bf16", **kwargs)  # the argument wins over the session's setting
    assert sess.cache["engine"].dtype == "bf16"
    gpt2.generate_to_file(sess, destination_path="fp32.txt", dtype="fp32", seed=1, length=10)
    assert sess.cache["engine"].dtype == "fp32"
    # bad values: a ValueError naming the choices, before any file is touched
    for bad, match in ((dict(backend="gpu"), r"backend must be one of 'auto', 'cpu', 'cuda'.*got 'gpu'"),
                       (dict(dtype="fp16"), r"dtype must be one of 'fp32', 'bf16'.*got 'fp16'"),
                       (dict(dtype=["bf16"]), r"dtype must be one of .*got \['bf16'\]")):
        with pytest.raises(ValueError, match=match):
            gpt2.generate(sess, destination_path="bad.txt", **bad)
        assert not (workdir / "bad.txt").exists()


def test_backend_cuda_without_a_usable_gpu_says_why(workdir, monkeypatch):
    try:
        from gpt_2_simple import _engine_cuda

        usable = _engine_cuda.cuda_status()[0] > 0
    except ImportError:
        usable = False
    if usable:
        pytest.skip("a GPU is usable here")
    monkeypatch.chdir(workdir)
    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess, run_name="run1")
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: .*; or use backend='cpu'"):
        gpt2.generate(sess, backend="cuda", length=4, seed=1)
