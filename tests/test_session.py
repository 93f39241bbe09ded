"""session.py: the original's start_tf_sess / load_gpt2 / reset_session contract, on the TF fixture
written by real TensorFlow and on our own run folders."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt_2_simple as gpt2
from gpt_2_simple.session import Session
from gpt_2_simple.weights import load_weights, save_weights
from reference import TINY, random_gpt2

FIXTURE = Path(__file__).parent / "fixtures" / "tf"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory laid out as the original's users have it: models/ and checkpoint/."""
    shutil.copytree(FIXTURE / "models", tmp_path / "models")
    shutil.copytree(FIXTURE / "checkpoint", tmp_path / "checkpoint")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_original_script_loads_the_latest_checkpoint(workdir, capsys):
    sess = gpt2.start_tf_sess()
    assert isinstance(sess, Session) and sess.source is None and not sess.loaded
    gpt2.load_gpt2(sess)  # checkpoint/run1, latest
    assert "Loading checkpoint checkpoint/run1/model-5" in capsys.readouterr().out
    assert sess.source == Path("checkpoint/run1")
    assert (sess.checkpoint.format, sess.checkpoint.step) == ("tf", 5)
    config, state = load_weights(FIXTURE / "checkpoint" / "run1")
    assert sess.config == config
    for name, array in state.items():
        np.testing.assert_array_equal(sess.weights[name], array)


def test_model_name_and_specific_checkpoints(workdir, capsys):
    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess, model_name="tiny")
    assert "Loading pretrained model models/tiny/model.ckpt" in capsys.readouterr().out
    assert sess.source == Path("models/tiny") and sess.checkpoint.step is None
    base = sess.weights["wte.weight"].copy()
    gpt2.load_gpt2(sess, checkpoint="model-3")
    assert sess.checkpoint.step == 3
    np.testing.assert_array_equal(sess.weights["wte.weight"], base + np.float32(0.5))
    gpt2.load_gpt2(sess, checkpoint=5, run_name="run1", checkpoint_dir="checkpoint")
    np.testing.assert_array_equal(sess.weights["wte.weight"], base)


def test_our_run_folder_and_run_names(workdir):
    model = random_gpt2()
    save_weights(workdir / "checkpoint" / "mine" / "model-12.safetensors", model.state_dict(), TINY, {"step": 12})
    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess, run_name="mine")
    assert (sess.checkpoint.format, sess.checkpoint.step, sess.config) == ("safetensors", 12, TINY)
    idx = torch.arange(10).view(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(sess.model(idx), model(idx), atol=0, rtol=0)


def test_model_is_built_lazily_and_generation_path_never_imports_torch(workdir):
    code = (
        "import sys, gpt_2_simple as gpt2\n"
        "sess = gpt2.start_tf_sess(threads=2)\n"
        "gpt2.load_gpt2(sess)\n"
        "assert 'torch' not in sys.modules, 'load_gpt2 imported torch'\n"
        "m = sess.model\n"
        "assert 'torch' in sys.modules and sess.model is m and not m.training\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(gpt2.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workdir, env=env)
    assert out.returncode == 0, out.stderr


def test_clear_errors_when_nothing_is_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sess = gpt2.start_tf_sess()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in checkpoint/run1: run gpt2.finetune\(sess, \.\.\., run_name='run1'\) first, or pass model_name="):
        gpt2.load_gpt2(sess)
    with pytest.raises(FileNotFoundError, match=r"no model in models/124M: download it first with gpt2.download_gpt2\(model_name='124M'"):
        gpt2.load_gpt2(sess, model_name="124M")
    with pytest.raises(RuntimeError, match="no model is loaded in this session"):
        sess.model
    shutil.copytree(FIXTURE / "checkpoint", tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 'model-4' in checkpoint/run1 \(it holds: model-3, model-5\)"):
        gpt2.load_gpt2(sess, checkpoint="model-4")
    with pytest.raises(TypeError, match="needs the session from gpt2.start_tf_sess"):
        gpt2.load_gpt2("sess")


def test_model_name_aliases(tmp_path, monkeypatch):
    """Scripts that say 117M find a model downloaded as 124M (and the other way round)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURE / "models" / "tiny", tmp_path / "models" / "124M")
    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess, model_name="117M")
    assert sess.source == Path("models/124M")


def test_reset_and_close(workdir):
    sess = gpt2.start_tf_sess(threads=3)
    assert sess.threads == 3 and sess.cpu_threads == 3
    gpt2.load_gpt2(sess)
    sess.cache["engine"] = object()
    fresh = gpt2.reset_session(sess)
    assert fresh is not sess and not fresh.loaded and fresh.threads == -1 and fresh.cpu_threads >= 1
    assert sess.closed and sess.weights is None and sess.cache == {}
    with pytest.raises(RuntimeError, match="this session is closed"):
        gpt2.load_gpt2(sess)
    with gpt2.start_session() as other:
        gpt2.load_gpt2(other)
        assert other.loaded
    assert other.closed


def test_loading_again_replaces_model_and_cache(workdir):
    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess)
    model = sess.model
    sess.cache["engine"] = object()
    gpt2.load_gpt2(sess, checkpoint="model-3")
    assert sess.cache == {} and sess.model is not model
    torch.testing.assert_close(sess.model.wte.weight, model.wte.weight + 0.5)


def test_attach_a_trained_model(workdir):
    """What finetune does: the session points at the run folder and holds the model in memory."""
    model = random_gpt2()
    save_weights(workdir / "checkpoint" / "new" / "model-2.safetensors", model.state_dict(), TINY)
    sess = gpt2.start_tf_sess()
    sess.cache["engine"] = object()
    sess.attach(model, workdir / "checkpoint" / "new")
    assert sess.model is model and sess.config == TINY and sess.cache == {}
    assert sess.checkpoint.step == 2 and sess.weights is None


def test_server_argument_and_threads():
    with pytest.raises(ValueError, match="drop the server argument"):
        gpt2.start_tf_sess(server=object())
    with pytest.raises(TypeError, match="threads must be an integer"):
        gpt2.start_tf_sess(threads="4")
    assert gpt2.start_tf_sess(threads=0).threads == -1


def test_get_available_gpus_matches_torch():
    expected = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert gpt2.get_available_gpus() == expected


def test_downloaded_hf_layout_and_partial_downloads(tmp_path, monkeypatch):
    """download_gpt2(source='hf') leaves config.json + model.safetensors; an interrupted download
    leaves only model.safetensors.part, which is not a model."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models" / "124M"
    shutil.copytree(FIXTURE / "hf", folder)
    (folder / ".download.lock").write_bytes(b"")
    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess, model_name="124M")
    assert sess.checkpoint.name == "model.safetensors"
    np.testing.assert_array_equal(sess.weights["wpe.weight"], load_weights(FIXTURE / "models" / "tiny")[1]["wpe.weight"])
    (folder / "model.safetensors").rename(folder / "model.safetensors.part")
    with pytest.raises(FileNotFoundError, match="no model in models/124M: download it first"):
        gpt2.load_gpt2(sess, model_name="124M")
