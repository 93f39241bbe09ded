"""Names that become paths stay in their folders: run and model names from the API and the CLI, and
the prefix a run folder's TensorFlow ``checkpoint`` file names (which the engine-file cache trusts to
read, write and delete files beside it)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpt_2_simple as gpt2
from gpt_2_simple.export import engine_file
from gpt_2_simple.fileio import UnsafePathError
from gpt_2_simple.weights import find_checkpoint, latest_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "tf"


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("named", ["{other}/model-5", "../other/model-5", "{other}\\\\model-5"])
def test_checkpoint_file_naming_another_folder_is_not_followed(tmp_path, named):
    """The engine-file cache exports beside the checkpoint and deletes stale exports there: a
    ``checkpoint`` file naming another folder's prefix must not make it work in that folder."""
    other = tmp_path / "other"
    shutil.copytree(FIXTURE / "checkpoint" / "run1", other)
    (other / "model-7.fp32.bin").write_bytes(b"someone's file")  # what _remove_stale would delete there
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(other / "hparams.json", run)
    (run / "checkpoint").write_text(f'model_checkpoint_path: "{named.format(other=other)}"\n')
    before = _tree(other)
    assert latest_checkpoint(run) is None
    with pytest.raises(FileNotFoundError, match="no model weights in"):
        engine_file(run, "fp32")
    assert _tree(other) == before


def test_checkpoint_file_from_another_machine_still_resolves_by_name(tmp_path):
    run = tmp_path / "run1"
    shutil.copytree(FIXTURE / "checkpoint" / "run1", run)
    (run / "checkpoint").write_text('model_checkpoint_path: "C:\\\\Users\\\\me\\\\checkpoint\\\\run1\\\\model-3"\n')
    assert find_checkpoint(run).path == run / "model-3"
    (run / "checkpoint").write_text('model_checkpoint_path: "/content/x/.."\n')
    with pytest.raises(UnsafePathError, match="checkpoint names '..' climbs out of its folder"):
        latest_checkpoint(run)


@pytest.mark.parametrize("run_name", ["../x", "/tmp/x", "a/../../x"])
def test_load_and_generate_refuse_run_names_outside_checkpoint_dir(tmp_path, monkeypatch, run_name):
    monkeypatch.chdir(tmp_path)
    sess = gpt2.start_tf_sess()
    with pytest.raises(UnsafePathError, match="run_name .* must stay inside checkpoint"):
        gpt2.load_gpt2(sess, run_name=run_name)
    with pytest.raises(UnsafePathError, match="run_name .* must stay inside checkpoint"):
        gpt2.generate(sess, run_name=run_name, seed=1)
    with pytest.raises(UnsafePathError, match="model_name .* must stay inside models"):
        gpt2.load_gpt2(sess, model_name=run_name)


@pytest.mark.parametrize("args, what", [(["finetune", "--run_name", "../../x"], "run_name"),
                                        (["generate", "--run_name", "../x"], "run_name"),
                                        (["export", "--model_name", "../x"], "model_name")])
def test_cli_refuses_names_outside_their_folders(tmp_path, args, what):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "gpt_2_simple", *args], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"error: {what} '" in out.stderr and "must stay inside" in out.stderr
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "x").exists()
