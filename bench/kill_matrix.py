"""kill -9 at random moments during checkpoint saves, exports and JSONL generation; after every kill
the latest file must load, and in the end nothing is lost or duplicated.

    python bench/kill_matrix.py                 # 20 kills per target, JSON to bench/results/
    python bench/kill_matrix.py --kills 3 --output /tmp/km.json

Targets (each in child processes of this script, on a small random GPT-2):
- ``save``: finetune with save_every=1, killed after a random delay once it saves. After each kill
  the newest checkpoint loads (weights and training state), ``counter`` is that step or the one
  before. At the end the run is resumed and must equal an uninterrupted run bit for bit.
- ``export``: exports the run to one model file again and again, killed at random. After each kill
  the file passes a full verify (every tensor's CRC).
- ``jsonl``: ``gpt_2_simple generate --output``, killed at random and resumed. After each kill the
  records read back without duplicates; the finished file equals an uninterrupted run's bytes.

A kill "lands in a write" when a temporary file (``.<name>.<random>.tmp``) is left behind: those
are counted, since a matrix whose kills all fall between writes would prove nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import checkout  # noqa: F401  (this checkout's sources when built in place)
import gpt_2_simple
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(gpt_2_simple.__file__).resolve().parents[1]), *sys.path]),
       "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TEXT_CHARS = 40_000
FINETUNE = dict(model_name="tt", batch_size=2, accumulate_gradients=1, learning_rate=3e-3, sample_every=10**9,
                print_every=1, seed=7, progress=False)
FINETUNE_CHILD = """
import json, sys
import gpt_2_simple as gpt2
kw = json.loads(sys.argv[1])
gpt2.finetune(gpt2.start_tf_sess(), kw.pop("dataset"), **kw)
"""
# The weights are read once: the loop is then mostly writing, so random kills land inside writes.
EXPORT_CHILD = """
import sys
from gpt_2_simple.export import export
from gpt_2_simple.weights import find_checkpoint, load_weights
config, state = load_weights(find_checkpoint(sys.argv[1]).path)
while True:
    export((config, state), sys.argv[2], "fp32", tokenizer_dir=sys.argv[1], progress=False)
    print("exported", flush=True)
"""


SIZES = {  # 'small': writes take long enough for random kills to land inside them; 'tiny': for the test
    "small": dict(n_ctx=64, n_embd=256, n_head=4, n_layer=4),
    "tiny": dict(n_ctx=32, n_embd=32, n_head=2, n_layer=2),
}


def _setup(root: Path, size: str) -> None:
    """models/tt (random weights of the given size) and data.txt."""
    import torch

    from gpt_2_simple.config import GPT2Config
    from gpt_2_simple.model import GPT2
    from gpt_2_simple.weights import save_weights

    config = GPT2Config(**SIZES[size])
    torch.manual_seed(0)
    model = GPT2(config)
    (root / "models" / "tt").mkdir(parents=True)
    config.save(root / "models" / "tt" / "hparams.json")
    save_weights(root / "models" / "tt" / "model-0.safetensors", model.state_dict(), config, {"step": "0"})
    text = (Path(gpt_2_simple.__file__).parent / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:TEXT_CHARS]
    (root / "data.txt").write_text(text, encoding="utf-8")


def _start(root: Path, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    for line in proc.stdout:
        if needle in line:
            return
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the child never printed {needle!r} (exit code {proc.wait()})")


def _kill(proc: subprocess.Popen, delay: float) -> None:
    time.sleep(delay)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait()


def _temporaries(folder: Path) -> list[Path]:
    return list(folder.glob(".*.tmp"))


def _finetune_args(root: Path, run_name: str, **kw) -> list[str]:
    args = dict(FINETUNE, dataset=str(root / "data.txt"), model_dir=str(root / "models"), checkpoint_dir=str(root / "checkpoint"),
                run_name=run_name, **kw)
    return ["-c", FINETUNE_CHILD, json.dumps(args)]


def matrix_save(root: Path, kills: int, rng: random.Random) -> dict:
    from safetensors.numpy import load_file

    from gpt_2_simple.train_state import load_train_state
    from gpt_2_simple.weights import latest_checkpoint, load_weights

    folder = root / "checkpoint" / "run1"
    outcomes = {"kills": 0, "in_write": 0, "latest_loads": 0, "failures": []}
    for _ in range(kills):
        proc = _start(root, _finetune_args(root, "run1", steps=10_000, save_every=1))
        _wait_for_line(proc, "Saving ")
        _kill(proc, rng.uniform(0.0, 4.0))  # a save of the 'small' model takes ~0.5-2 s here: kills land inside and between
        outcomes["kills"] += 1
        outcomes["in_write"] += bool(_temporaries(folder))
        try:
            latest = latest_checkpoint(folder)
            load_weights(latest.path)
            state = load_train_state(folder / f"train_state-{latest.step}.safetensors")
            counter = int((folder / "counter").read_text())
            assert state["step"] == latest.step and counter in (latest.step, latest.step - 1), (state["step"], latest.step, counter)
            outcomes["latest_loads"] += 1
        except Exception as e:  # noqa: BLE001 - recorded as a failure of the matrix
            outcomes["failures"].append(f"{type(e).__name__}: {e}")
    # Resume what the kills left, and compare with an uninterrupted run of as many steps.
    step = latest_checkpoint(folder).step
    subprocess.run([sys.executable, *_finetune_args(root, "run1", steps=2, save_every=10**9)], cwd=root, env=ENV, check=True, capture_output=True)
    subprocess.run([sys.executable, *_finetune_args(root, "straight", steps=step + 2, save_every=10**9)], cwd=root, env=ENV, check=True, capture_output=True)
    a = load_file(str(folder / f"model-{step + 2}.safetensors"))
    b = load_file(str(root / "checkpoint" / "straight" / f"model-{step + 2}.safetensors"))
    outcomes["resume_exact"] = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    outcomes["temporaries_left_after_resume"] = len(_temporaries(folder))
    return outcomes


def matrix_export(root: Path, kills: int, rng: random.Random) -> dict:
    from gpt_2_simple.export import verify

    out = root / "export" / "model.bin"
    out.parent.mkdir(exist_ok=True)
    outcomes = {"kills": 0, "in_write": 0, "latest_loads": 0, "failures": []}
    for _ in range(kills):
        proc = _start(root, ["-c", EXPORT_CHILD, str(root / "checkpoint" / "run1"), str(out)])
        _wait_for_line(proc, "exported")
        _kill(proc, rng.uniform(0.0, 1.0))
        outcomes["kills"] += 1
        left = _temporaries(out.parent)
        outcomes["in_write"] += bool(left)
        try:
            verify(out)
            outcomes["latest_loads"] += 1
        except Exception as e:  # noqa: BLE001
            outcomes["failures"].append(f"{type(e).__name__}: {e}")
        for tmp in left:  # what a killed writer leaves; finetune removes its own, an export's are the caller's
            tmp.unlink()
    return outcomes


def matrix_jsonl(root: Path, kills: int, rng: random.Random) -> dict:
    from gpt_2_simple.batch import read_records

    args = ["-m", "gpt_2_simple", "generate", "--run_name", "run1", "--prefix", "Go", "--nsamples", "400", "--length", "24",
            "--seed", "3", "--dtype", "fp32", "--threads", "1", "--batch_size", "4"]
    subprocess.run([sys.executable, *args, "--output", "whole.jsonl"], cwd=root, env=ENV, check=True, capture_output=True)
    out = root / "cut.jsonl"
    outcomes = {"kills": 0, "in_write": 0, "latest_loads": 0, "failures": []}
    for _ in range(kills):
        proc = _start(root, [*args, "--output", str(out), *(["--resume"] if out.exists() else [])])
        deadline = time.time() + 300
        start = out.stat().st_size if out.exists() else 0
        while (not out.exists() or out.stat().st_size <= start) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is not None:
            break  # finished before it could be killed: the file is complete
        _kill(proc, rng.uniform(0.0, 0.5))
        outcomes["kills"] += 1
        data = out.read_bytes()
        outcomes["in_write"] += bool(data) and not data.endswith(b"\n")  # a torn last line
        try:
            read_records(out)  # duplicates or damage before the last line raise
            outcomes["latest_loads"] += 1
        except Exception as e:  # noqa: BLE001
            outcomes["failures"].append(f"{type(e).__name__}: {e}")
    subprocess.run([sys.executable, *args, "--output", str(out), "--resume"], cwd=root, env=ENV, check=True, capture_output=True)
    outcomes["final_equals_uninterrupted"] = out.read_bytes() == (root / "whole.jsonl").read_bytes()
    return outcomes


TARGETS = {"save": matrix_save, "export": matrix_export, "jsonl": matrix_jsonl}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20, help="kills per target")
    p.add_argument("--targets", default="save,export,jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default: small)")
    p.add_argument("--workdir", default=None, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--output", default=None, help="JSON results file (default: bench/results/kill_matrix-<time>.json)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    output = Path(args.output) if args.output else ROOT / "bench" / "results" / f"kill_matrix-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "script": "bench/kill_matrix.py", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "kills_per_target": args.kills, "seed": args.seed, "size": args.size, "model": SIZES[args.size], "ok": None, "targets": {},
    }
    results = record["targets"]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        _setup(root, args.size)
        subprocess.run([sys.executable, *_finetune_args(root, "run1", steps=1, save_every=10**9)], cwd=root, env=ENV, check=True, capture_output=True)
        for target in args.targets.split(","):
            start = time.time()
            results[target] = TARGETS[target](root, args.kills, rng)
            results[target]["seconds"] = round(time.time() - start, 1)
            output.write_text(json.dumps(record, indent=2) + "\n")  # after each target: a cut-short run keeps what it measured
    ok = all(not r["failures"] and r.get("resume_exact", True) and r.get("final_equals_uninterrupted", True) for r in results.values())
    record["ok"] = ok
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
