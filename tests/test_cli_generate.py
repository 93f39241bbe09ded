"""`gpt_2_simple generate` end to end, in subprocesses: the original's gen/ files, prompts files,
JSONL output (the same whatever the batch size), resume after Ctrl-C and kill -9, sharding over
two processes (RANK/WORLD_SIZE and torchrun) and the one-line errors. Texts are checked against
the PyTorch reference (generate_helpers.reference) with the same seeds."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from generate_helpers import ENC, reference, save_run  # noqa: E402
from gpt_2_simple.cli import main  # noqa: E402
from reference import TINY, random_gpt2  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONUNBUFFERED": "1"}
DELIM = "=" * 20 + "\n"
NAME = re.compile(r"gpt2_gentext_\d{8}_\d{6}(_\d{3})?\.txt")


@pytest.fixture(scope="module")
def model():
    return random_gpt2(TINY, seed=7)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("cli")
    save_run(root / "checkpoint" / "run1", model, 3)
    return root


def cli(workdir, *args, env=None, check=True):
    out = subprocess.run([sys.executable, "-m", "gpt_2_simple", *map(str, args)], cwd=workdir, capture_output=True,
                         text=True, env={**ENV, **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr
    return out


def start(workdir, *args, env=None, nice=0):
    def child():
        # Ctrl-C as in a terminal: a suite started in the background (`bash .ci/run &` from a
        # script) inherits SIGINT ignored, and a Python started so installs no KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.nice(nice)

    return subprocess.Popen([sys.executable, "-m", "gpt_2_simple", *map(str, args)], cwd=workdir, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=child)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_gen_files_as_the_original_never_deleted_never_colliding(workdir, model):
    folder = workdir / "gen"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me", encoding="utf-8")
    args = ["--nfiles", 3, "--nsamples", 2, "--batch_size", 4, "--length", 14, "--prefix", "Hi", "--seed", 3, "--dtype", "fp32"]
    first = cli(workdir, "generate", *args).stdout.split()
    second = cli(workdir, "--mode", "generate", *args).stdout.split()  # the original's spelling
    assert len(first) == len(second) == 3
    names = {Path(p).name for p in first + second}
    assert len(names) == 6 and all(NAME.fullmatch(n) for n in names)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names | {"mine.txt"})
    assert (folder / "mine.txt").read_text(encoding="utf-8") == "keep me"
    texts = reference(model, ["Hi"] * 6, length=14, seed=3)  # file f holds samples 2f, 2f+1
    for paths in (first, second):
        for f, path in enumerate(paths):
            expected = "".join(f"{t}\n{DELIM}" for t in texts[2 * f:2 * f + 2])
            assert (workdir / path).read_bytes().decode("utf-8") == expected
    # One text per file: no delimiter, as in the original.
    (path,) = cli(workdir, "generate", "--length", 10, "--seed", 1, "--dtype", "fp32", "--folder", "one").stdout.split()
    assert (workdir / path).read_bytes().decode("utf-8") == reference(model, [None], length=10, seed=1)[0] + "\n"


def test_jsonl_prompts_output_is_the_same_whatever_the_batch_size(workdir, model):
    rows = [{"prompt": "Title:"}, {"prompt": "Cold", "seed": 77, "temperature": 0.0, "length": 9},
            {"prompt": None, "top_k": 20, "temperature": 1.0}]
    (workdir / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["--prompts", "p.jsonl", "--nsamples", 3, "--length", 16, "--truncate", "e", "--seed", 12, "--dtype", "fp32"]
    cli(workdir, "generate", *common, "--batch_size", 1, "--output", "b1.jsonl")
    cli(workdir, "generate", *common, "--batch_size", 5, "--output", "b5.jsonl")
    assert (workdir / "b1.jsonl").read_bytes() == (workdir / "b5.jsonl").read_bytes()
    got = records(workdir / "b5.jsonl")
    assert [r["index"] for r in got] == list(range(9))
    assert [r["prompt"] for r in got] == ["Title:"] * 3 + ["Cold"] * 3 + [None] * 3
    # Rows without a seed draw with (--seed, index); a row's own seed with (its seed, 0, 1, ...).
    expected = (reference(model, ["Title:"] * 3, length=16, seed=12, truncate="e", first_index=0)
                + reference(model, ["Cold"] * 3, length=9, temperature=0.0, seed=77, truncate="e")
                + reference(model, [None] * 3, length=16, top_k=20, temperature=1.0, seed=12, truncate="e", first_index=6))
    assert [r["text"] for r in got] == expected
    assert [(r["seed"], r["sample_index"]) for r in got] == [(12, 0), (12, 1), (12, 2), (77, 0), (77, 1), (77, 2), (12, 6), (12, 7), (12, 8)]
    assert {r["finish_reason"] for r in got} <= {"length", "stop_sequence"}
    for r in got:
        if r["finish_reason"] == "length":
            assert r["tokens"] == (9 if r["prompt"] == "Cold" else 16) - (len(ENC.encode(r["prompt"])) if r["prompt"] else 0)
        else:
            assert "e" not in r["text"][len(r["prompt"] or ""):]
    assert "stop_sequence" in {r["finish_reason"] for r in got}


def test_resume_after_ctrl_c_and_kill_gives_the_uninterrupted_file(workdir):
    args = ["generate", "--prefix", "Go", "--nsamples", 150, "--length", 20, "--seed", 21, "--dtype", "fp32", "--threads", 1]
    cli(workdir, *args, "--batch_size", 6, "--output", "whole.jsonl")
    out = workdir / "cut.jsonl"

    def interrupt(sig):
        # At the lowest priority: on a busy machine this test's polling must still see the run
        # mid-way (the whole run takes seconds), or the signal would come after a clean exit.
        proc = start(workdir, *args, "--batch_size", 1, "--output", out, *(["--resume"] if out.exists() else []), nice=19)
        before = len(records(out)) if out.exists() else 0
        deadline = time.time() + 120
        while (not out.exists() or out.read_bytes().count(b"\n") < before + 3) and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err

    code, err = interrupt(signal.SIGINT)
    assert code == 130 and "rerun with --resume" in err, err
    code, _ = interrupt(signal.SIGKILL)
    assert code == -signal.SIGKILL
    done = out.read_bytes()
    assert 6 <= done.count(b"\n") < 150
    with open(out, "ab") as f:  # a crash mid-write leaves a torn line
        f.write(b'{"index": 149, "prompt": "Go", "te')
    refused = cli(workdir, *args, "--output", out, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    cli(workdir, *args, "--batch_size", 4, "--output", out, "--resume")
    assert out.read_bytes() == (workdir / "whole.jsonl").read_bytes()


def _sharded(workdir, args, first_part=None):
    """Ranks 0 and 1 of 2; rank 1 starts only once rank 0 has written to ``first_part``."""
    procs = [start(workdir, *args, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})]
    deadline = time.time() + 120
    while first_part is not None and not (first_part.exists() and first_part.stat().st_size):
        assert procs[0].poll() is None and time.time() < deadline
        time.sleep(0.02)
    procs.append(start(workdir, *args, env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def test_two_processes_merge_to_the_single_process_output(workdir):
    args = ["generate", "--prompts", "prompts.txt", "--nsamples", 5, "--length", 12, "--seed", 4, "--dtype", "fp32",
            "--batch_size", 3]
    (workdir / "prompts.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    cli(workdir, *args, "--output", "single.jsonl")
    single = (workdir / "single.jsonl").read_bytes()
    _sharded(workdir, args + ["--output", "sharded.jsonl"], workdir / "sharded.jsonl.part-00000-of-00002")
    assert (workdir / "sharded.jsonl").read_bytes() == single
    assert not list(workdir.glob("sharded.jsonl.part-*"))
    # gen/ files: each process writes whole files; together the same texts as one process.
    gen = ["--nfiles", 4, "--folder"]
    single_files = cli(workdir, *args, *gen, "gen_single").stdout.split()
    _sharded(workdir, args + [*gen, "gen_sharded"])
    texts = sorted((workdir / p).read_bytes() for p in single_files)
    assert sorted(p.read_bytes() for p in (workdir / "gen_sharded").iterdir()) == texts


def test_torchrun_merges_to_the_single_process_output(workdir):
    pytest.importorskip("torch.distributed.run")
    args = ["generate", "--prefix", "Yes", "--nsamples", 6, "--length", 10, "--seed", 8, "--dtype", "fp32"]
    cli(workdir, *args, "--output", "t_single.jsonl")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "gpt_2_simple", *map(str, args), "--output", "t_sharded.jsonl"],
                         cwd=workdir, capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (workdir / "t_sharded.jsonl").read_bytes() == (workdir / "t_single.jsonl").read_bytes()


def test_generate_command_never_imports_torch(workdir):
    code = ("import sys\nfrom gpt_2_simple.cli import main\n"
            "rc = main(['generate', '--length', '5', '--output', 'notorch.jsonl', '--seed', '1'])\n"
            "print(rc, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, env=ENV)
    assert out.stdout.split() == ["0", "False"], out.stderr


@pytest.mark.parametrize(
    "files, args, message",
    [
        ({}, ["--run_name", "nope"], r"no checkpoint in checkpoint/nope"),
        ({}, ["--model_name", "124M", "--model_dir", "nomodels"], r"download"),
        ({"e.txt": "\n\n"}, ["--prompts", "e.txt"], r"e.txt has no prompts"),
        ({}, ["--prompts", "missing.txt"], r"missing.txt does not exist"),
        ({"m.jsonl": '{"prompt": "a"}\n{"prompt": "b",}\n'}, ["--prompts", "m.jsonl"], r"m.jsonl line 2: not valid JSON"),
        ({"u.jsonl": '{"prompt": "a", "tmp": 1}\n'}, ["--prompts", "u.jsonl"], r"u.jsonl line 1: unknown field 'tmp'"),
        ({"v.jsonl": '{"prompt": "a"}\n{"prompt": "a", "top_k": -2}\n'}, ["--prompts", "v.jsonl"], r"v.jsonl line 2: top_k"),
        ({}, ["--length", "-5"], r"length must be"),
        ({}, ["--top_p", "3"], r"top_p must be"),
        ({}, ["--resume"], r"--resume continues a --output"),
        ({"taken.jsonl": "{}\n"}, ["--output", "taken.jsonl"], r"taken.jsonl .*exists: pass --resume"),
        ({}, ["--output", "o.jsonl", "--nfiles", "2"], r"--nfiles"),
        ({}, ["--prefix", "x", "--prompts", "p.txt"], r"either --prefix or --prompts"),
        ({"d.jsonl": '{"index": 0}\nbroken\n{"index": 1}\n'}, ["--output", "d.jsonl", "--resume"], r"d.jsonl line 2"),
        ({"long.txt": "short\n" + " ".join(["word"] * 70) + "\n"}, ["--prompts", "long.txt"], r"long.txt line 2: the prompt is 70 tokens, longer than the model's context of 64"),
        ({}, ["--prefix", " ".join(["word"] * 70)], r"prefix is 70 tokens, longer than the model's context of 64"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(workdir, monkeypatch, capsys, files, args, message):
    monkeypatch.chdir(workdir)
    for name, content in files.items():
        (workdir / name).write_text(content, encoding="utf-8")
    assert main(["generate", "--length", "5", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpt_2_simple generate: error: "), err
    assert re.search(message, err), err
    for name, content in files.items():
        assert (workdir / name).read_text(encoding="utf-8") == content  # inputs and outputs untouched


def test_bad_input_exit_code_from_the_command(workdir):
    out = cli(workdir, "generate", "--run_name", "nope", check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


# ---- --resume refuses to mix settings or models; generate_to_file is atomic; help and messages


def test_resume_with_other_settings_or_model_is_refused_naming_the_setting(workdir):
    args = ["generate", "--prefix", "Go", "--nsamples", 4, "--length", 12, "--seed", 5, "--dtype", "fp32", "--truncate", "q"]
    cli(workdir, *args, "--output", "full2.jsonl")
    full = (workdir / "full2.jsonl").read_bytes()
    rows = full.splitlines(keepends=True)
    assert {json.loads(r)["length"] for r in rows} == {12} and len({json.loads(r)["model"] for r in rows}) == 1
    save_run(workdir / "checkpoint" / "other", random_gpt2(TINY, seed=8), 3)  # the same shapes, other weights
    cut = workdir / "cut2.jsonl"
    cut.write_bytes(b"".join(rows[:2]))  # an interrupted run
    for change, message in [
        (["--length", 13], r"was made with length 12 \(this command's length is 13\)"),
        (["--temperature", 0.9], r"was made with temperature 0.7 \(this command's temperature is 0.9\)"),
        (["--top_k", 3], r"was made with top_k 0 \(this command's top_k is 3\)"),
        (["--top_p", 0.5], r"was made with top_p 0.0"),
        (["--truncate", "z"], r"was made with truncate 'q' \(this command's truncate is 'z'\)"),
        (["--include_prefix", "false"], r"was made with include_prefix True"),
        (["--dtype", "bf16"], r"was made with the model \(its weights, dtype or tokenizer\)"),
        (["--run_name", "other"], r"was made with the model"),
    ]:
        out = cli(workdir, *args, *change, "--output", cut, "--resume", check=False)
        assert out.returncode == 2 and re.search(message, out.stderr), (change, out.stderr)
        assert cut.read_bytes() == b"".join(rows[:2])  # left as it was
    cli(workdir, *args, "--output", cut, "--resume")
    assert cut.read_bytes() == full


def test_resume_of_an_output_without_recorded_settings_is_refused(workdir):
    args = ["generate", "--prefix", "Go", "--nsamples", 2, "--length", 8, "--seed", 5, "--dtype", "fp32"]
    old = workdir / "old.jsonl"
    old.write_text('{"index": 0, "prompt": "Go", "text": "Go on", "seed": 5, "sample_index": 0, "finish_reason": "length", "tokens": 6}\n')
    out = cli(workdir, *args, "--output", old, "--resume", check=False)
    assert out.returncode == 2 and "does not record its length" in out.stderr, out.stderr


def test_generate_to_file_is_atomic_under_kill(workdir):
    """A kill half-way leaves the previous file whole (it used to be emptied at the first text)."""
    dest = workdir / "texts.txt"
    dest.write_text("the previous texts\n", encoding="utf-8")
    script = ("import gpt_2_simple as gpt2, sys\n"
              "sess = gpt2.start_tf_sess(); sess.dtype = 'fp32'\n"
              "gpt2.generate_to_file(sess, destination_path='texts.txt', nsamples=4000, length=30, seed=1, batch_size=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(workdir.glob(".texts.txt.*.tmp")) and dest.read_text(encoding="utf-8") == "the previous texts\n":
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.3)  # some texts written
    proc.kill()
    proc.wait()
    assert dest.read_text(encoding="utf-8") == "the previous texts\n"
    for tmp in workdir.glob(".texts.txt.*.tmp"):  # what the kill left: removed by the next run's rename or by hand
        tmp.unlink()


def test_generate_help_and_messages(workdir):
    help_text = cli(workdir, "generate", "--help").stdout
    multi = help_text[help_text.rindex("--multi_gpu"):]  # the options section, not the usage line
    assert "does nothing for generation" in " ".join(multi.split()[:40]) and "data-parallel training" not in help_text
    out = cli(workdir, "generate", "--nsamples", 0, check=False)
    assert "--nsamples must be >= 1" in out.stderr
    out = cli(workdir, "generate", "--length", -1, check=False)
    assert "error: --length must be an integer >= 0" in out.stderr  # flags written as flags, like --nsamples
    out = cli(workdir, "generate", "--seed", -1, check=False)
    assert "error: --seed must be an integer in [0, 2**64)" in out.stderr
    out = cli(workdir, "generate", "--prefix", "A", "--length", 6, "--seed", 1, "--dtype", "fp32", "--output", "one.jsonl")
    assert re.search(r"generate: 1 sample, \d+ tokens? in ", out.stderr) and "1 samples" not in out.stderr, out.stderr
    assert "generate: 1 sample in one.jsonl" in out.stderr
