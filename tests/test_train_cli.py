"""`gpt_2_simple finetune` and `gpt_2_simple score` as a user runs them (subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpt_2_simple as gpt2
from gpt_2_simple.score import score
from test_train import make_base_model, make_text

PYTHON_PATH = str(Path(gpt2.__file__).resolve().parents[1])


def cli(cwd, *args, stdin=None):
    env = {**os.environ, "PYTHONPATH": PYTHON_PATH}
    return subprocess.run([sys.executable, "-m", "gpt_2_simple", *args], cwd=cwd, env=env, capture_output=True, text=True, input=stdin, timeout=300)


def test_quick_start_trains_tiny_on_the_bundled_corpus(tmp_path):
    out = cli(tmp_path, "finetune", "--model_name", "tiny", "--steps", "2", "--accumulate_gradients", "1", "--print_every", "1")
    assert out.returncode == 0, out.stderr
    assert "No dataset given: training on the bundled Shakespeare corpus" in out.stdout
    assert "[2 | " in out.stdout and "Saving checkpoint/run1/model-2" in out.stdout
    assert (tmp_path / "checkpoint/run1/model-2.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "--model_name", "nope", "--steps", "1"], "unknown model name 'nope'"),
        (["finetune", "missing.txt", "--model_name", "tiny"], "dataset missing.txt not found"),
        (["finetune", "--model_name", "tiny", "--optimizer", "lion", "--steps", "1"], "unknown optimizer 'lion'"),
        (["score", "missing.txt"], "missing.txt not found"),
        (["score", "data.txt", "--checkpoint_dir", "nowhere"], "no checkpoint in nowhere"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    make_text(tmp_path, 200)
    out = cli(tmp_path, *args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Shakespeare" not in out.stdout  # checks come before any work


def test_original_flags_then_score(tmp_path):
    make_base_model(tmp_path)
    make_text(tmp_path)
    out = cli(tmp_path, "--mode", "finetune", "--dataset", "data.txt", "--model_name", "tt", "--steps", "4", "--save_every", "2",
              "--print_every", "2", "--sample_every", "1000", "--batch_size", "2", "--learning_rate", "0.003", "--accumulate_gradients", "1",
              "--max_checkpoints", "2", "--seed", "1", "--val_fraction", "0.1", "--val_every", "2", "--overwrite", "False")
    assert out.returncode == 0, out.stderr
    assert [line.split(" |")[0] for line in out.stdout.splitlines() if " loss=" in line] == ["[2", "[4"]
    assert sorted(p.name for p in (tmp_path / "checkpoint/run1").glob("model-*")) == ["model-2.safetensors", "model-4.safetensors"]
    texts = ["First Citizen: we are accounted poor citizens.", "zq xv kk 00 ## frobnicate"]
    (tmp_path / "lines.txt").write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    out = cli(tmp_path, "score", "lines.txt", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    expected = score(gpt2.start_tf_sess(), texts, checkpoint_dir=str(tmp_path / "checkpoint"))
    assert [r["text"] for r in rows] == texts
    for row, e in zip(rows, expected):
        assert row["log_likelihood"] == pytest.approx(e.log_likelihood, abs=1e-5) and row["tokens"] == e.tokens
    assert "2 texts" in out.stderr and "perplexity" in out.stderr
    out = cli(tmp_path, "score", "-", "--whole", stdin="\n".join(texts))
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
