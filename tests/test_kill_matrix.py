"""A bounded slice of bench/kill_matrix.py: kill -9 at random moments during checkpoint saves,
exports and JSONL generation; after every kill the latest file loads, and in the end the resumed run
equals an uninterrupted one (weights bit for bit, the JSONL file byte for byte)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gpt_2_simple._engine")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kill_matrix.py"


@pytest.mark.slow  # ~10 child processes, each importing torch
def test_kill_matrix_slice(tmp_path):
    out = tmp_path / "km.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--kills", "1", "--seed", "1", "--size", "tiny", "--workdir", str(tmp_path), "--output", str(out)],
                          capture_output=True, text=True, timeout=900)
    record = json.loads(out.read_text())
    assert proc.returncode == 0 and record["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    for target in ("save", "export", "jsonl"):
        r = record["targets"][target]
        assert r["failures"] == [] and r["latest_loads"] == r["kills"], (target, r)
    assert record["targets"]["save"]["kills"] == 1 and record["targets"]["save"]["resume_exact"]
    assert record["targets"]["export"]["kills"] == 1
    assert record["targets"]["jsonl"]["final_equals_uninterrupted"]
