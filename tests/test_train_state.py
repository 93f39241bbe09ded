"""Resuming never unpickles: the training state is safetensors + JSON, a pickled state of an
earlier version is refused (its payload never runs), and run/model names cannot leave their folders."""

import json
import os
import struct
import zipfile

import numpy as np
import pytest
import torch

import gpt_2_simple as gpt2
from gpt_2_simple.fileio import UnsafePathError
from gpt_2_simple.train_state import TrainStateError
from test_train import make_base_model, make_text, run, weights


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_base_model(tmp_path)
    make_text(tmp_path)
    return tmp_path


class _Payload:
    """What a hostile run folder would ship: unpickling it creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_state_file_is_safetensors_with_json_and_no_pickle(root):
    run(root, steps=3, optimizer="adamw")
    path = root / "checkpoint" / "run1" / "train_state-3.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])  # a plain safetensors header: tensors + string metadata
    meta = json.loads(header["__metadata__"]["train_state"])
    assert meta["step"] == 3 and meta["seed"] == 7 and meta["optimizer_name"] == "adamw"
    assert meta["sampler"]["bit_generator"] == "PCG64"
    assert {"torch_rng", "optimizer.0.exp_avg", "optimizer.0.exp_avg_sq", "optimizer.0.step"} <= set(header)
    assert not zipfile.is_zipfile(path) and not list((root / "checkpoint" / "run1").glob("*.pt"))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_exact_resume_through_the_new_state(root, optimizer):
    kw = dict(batch_size=2, accumulate_gradients=1, optimizer=optimizer)
    run(root, steps=6, run_name="straight", **kw)
    run(root, steps=3, run_name="resumed", **kw)
    run(root, steps=3, run_name="resumed", **kw)
    a, b = weights(root, 6, "straight"), weights(root, 6, "resumed")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pickled_state_is_refused_and_its_payload_never_runs(root):
    run(root, steps=2)
    folder = root / "checkpoint" / "run1"
    (folder / "train_state-2.safetensors").unlink()
    marker = root / "PWNED"
    torch.save({"step": 2, "optimizer": _Payload(marker)}, folder / "train_state-2.pt")  # the old format, booby-trapped
    with pytest.raises(TrainStateError, match=r"train_state-2.pt is a pickled training state .* delete train_state-2.pt .* restore_from="):
        run(root, steps=1)
    assert not marker.exists()
    # The way out the message gives: without it the run continues from the weights, numbering kept.
    (folder / "train_state-2.pt").unlink()
    run(root, steps=1)
    assert (folder / "counter").read_text() == "3\n"
    assert not marker.exists()


def test_damaged_state_is_a_clear_error(root):
    run(root, steps=2)
    path = root / "checkpoint" / "run1" / "train_state-2.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TrainStateError, match="train_state-2.safetensors is damaged .* remove train_state-2.safetensors"):
        run(root, steps=1)


@pytest.mark.parametrize("kw, what", [
    (dict(run_name="../escaped"), "run_name"),
    (dict(run_name="/tmp/abs_run"), "run_name"),
    (dict(run_name="a/../../escaped"), "run_name"),
    (dict(run_name=""), "run_name"),
    (dict(model_name="../models/tt"), "model_name"),
])
def test_names_cannot_leave_their_folders(root, kw, what):
    with pytest.raises(UnsafePathError, match=f"{what} .* it must stay inside"):
        run(root, steps=1, **kw)
    assert sorted(p.name for p in root.iterdir()) == ["data.txt", "models"]
    assert not os.path.exists("/tmp/abs_run")


def test_nested_run_names_stay_allowed(root):
    run(root, steps=1, run_name="project/run1")
    assert (root / "checkpoint" / "project" / "run1" / "model-1.safetensors").is_file()
