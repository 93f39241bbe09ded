"""finetune() in other processes: Ctrl-C / SIGTERM save and exit cleanly, kill -9 during saves never
breaks the latest checkpoint, and 2-process DDP (gloo) equals one process with the same total batch."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import gpt_2_simple as gpt2
from gpt_2_simple.train import checkpoint_steps
from gpt_2_simple.train_state import load_train_state
from gpt_2_simple.weights import latest_checkpoint
from test_train import make_base_model, make_text, run, weights

PYTHON_PATH = str(Path(gpt2.__file__).resolve().parents[1])
SCRIPT = """
import json, sys
import gpt_2_simple as gpt2
from gpt_2_simple.train import checkpoint_steps
from gpt_2_simple.train_state import load_train_state
from gpt_2_simple.weights import latest_checkpoint
kw = json.loads(sys.argv[1])
dataset = kw.pop("dataset")
gpt2.finetune(gpt2.start_tf_sess(), dataset, **kw)
print("returned", flush=True)
"""


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_base_model(tmp_path)
    make_text(tmp_path)
    (tmp_path / "script.py").write_text(SCRIPT)
    return tmp_path


def finetune_args(root: Path, **kw) -> str:
    args = dict(dataset=str(root / "data.txt"), model_name="tt", model_dir=str(root / "models"), checkpoint_dir=str(root / "checkpoint"), batch_size=2,
                accumulate_gradients=1, learning_rate=3e-3, sample_every=10**9, save_every=10**9, print_every=1, seed=7, progress=False, steps=-1)
    args.update(kw)
    return json.dumps(args)


def start(root: Path, *command: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": PYTHON_PATH, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *command], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, prefix: str, lines: list) -> None:
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return
    raise AssertionError(f"process ended before printing {prefix!r}:\n" + "\n".join(lines))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_returns_then_resume_is_exact(root, sig):
    proc = start(root, "script.py", finetune_args(root))
    lines: list = []
    wait_for(proc, "[4 | ", lines)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    lines += rest.splitlines()
    assert proc.returncode == 0, "\n".join(lines)
    assert "interrupted" in lines and lines[-1] == "returned"
    saved = [int(line.rsplit("-", 1)[1]) for line in lines if line.startswith("Saving ")]
    last_step = max(int(line[1:].split(" |")[0]) for line in lines if line.startswith("["))
    assert saved == [last_step] and last_step >= 4  # the step that finished, and nothing after it
    assert checkpoint_steps(root / "checkpoint/run1") == [last_step]
    # continuing to last_step + 2 gives the weights of an uninterrupted run of that length
    run(root, steps=2)
    run(root, steps=last_step + 2, run_name="straight")
    assert_same_weights(weights(root, last_step + 2), weights(root, last_step + 2, "straight"))


# Runs script.py with os.fsync replaced: the N-th call from the start of the first checkpoint save
# (its first temporary file .train_state-* / .model-*) SIGKILLs the process instead. Every write
# fsyncs its temporary file before renaming it, then fsyncs the folder, so N = 1, 2, ... walks the
# kill through each point of a save, whatever the machine's speed.
KILL_AT_FSYNC = """
import os, runpy, signal, sys
n, calls, real_fsync = int(sys.argv.pop(1)), [0], os.fsync
def fsync(fd):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if calls[0] or name.startswith((".train_state-", ".model-")):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
runpy.run_path("script.py", run_name="__main__")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the kill points name files through Linux's /proc/self/fd")
def test_kill_9_during_saves_never_breaks_the_latest_checkpoint(root):
    """A save every step (weights, train state, counter); SIGKILL at each fsync of a save, and at random moments."""
    (root / "kill_at_fsync.py").write_text(KILL_AT_FSYNC)
    rng = random.Random(0)
    folder = root / "checkpoint/run1"
    torn = 0
    kills = [None] + list(range(1, 9)) + [None] * 2  # None: a random moment after the first save; a save has 8 fsyncs
    for at in kills:
        if at is None:
            proc = start(root, "script.py", finetune_args(root, save_every=1))
            wait_for(proc, "Saving ", [])
            time.sleep(rng.uniform(0.0, 0.6))
            proc.kill()
        else:
            proc = start(root, "kill_at_fsync.py", str(at), finetune_args(root, save_every=1))
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, out
        torn += any(folder.glob(".*.tmp"))  # the kill landed inside a write
        latest = latest_checkpoint(folder)
        step = latest.step
        assert set(load_file(str(latest.path))) == set(load_file(str(root / "models/tt/model-0.safetensors")))
        state = load_train_state(folder / f"train_state-{step}.safetensors")
        assert state["step"] == step
        # counter is written last, so it is never ahead of the checkpoints (after several kills it may lag
        # by more than one save: harmless, as resume reads the step from the newest checkpoint's name)
        assert int((folder / "counter").read_text()) <= step
    assert torn >= 1, "no kill landed inside a save: the test did not exercise what it claims"
    run(root, steps=2)  # resumes from whatever the last kill left: exact, and leftovers cleaned
    assert not list(folder.glob(".*.tmp"))
    run(root, steps=step + 2, run_name="straight")
    assert_same_weights(weights(root, step + 2), weights(root, step + 2, "straight"))


def test_two_process_ddp_equals_one_process(root):
    kw = dict(steps=3, accumulate_gradients=2, learning_rate=1e-3)
    proc = start(root, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "script.py", finetune_args(root, batch_size=1, run_name="ddp", **kw))
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert out.count("Saving ") == 1 and out.count("[3 | ") == 1  # only rank 0 prints and writes
    run(root, batch_size=2, run_name="single", **kw)
    a, b = weights(root, 3, "ddp"), weights(root, 3, "single")
    assert a.keys() == b.keys()
    for k in a:  # Adam turns float-rounding noise in near-zero gradients into up to ~lr/100 of movement
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    losses = [[json.loads(line)["loss"] for line in (root / f"checkpoint/{name}/log.jsonl").read_text().splitlines()] for name in ("ddp", "single")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_multi_gpu_launcher_runs_data_parallel_workers(root):
    """multi_gpu=True starts one process per GPU through train._launch; here two CPU processes
    (gloo) stand in for two GPUs. The parent then loads what rank 0 saved."""
    kw = json.loads(finetune_args(root, batch_size=1, run_name="launched", steps=3, accumulate_gradients=2, learning_rate=1e-3))
    code = ("import json, sys\nfrom gpt_2_simple import train\nkw = json.loads(sys.argv[1])\n"
            "train._launch(2, {**kw, 'device': 'cpu', 'threads': 1})\nprint('launched', flush=True)\n")
    proc = start(root, "-c", code, json.dumps(kw))
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and out.count("Saving ") == 1, out
    run(root, batch_size=2, run_name="single", steps=3, accumulate_gradients=2, learning_rate=1e-3)
    a, b = weights(root, 3, "launched"), weights(root, 3, "single")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
