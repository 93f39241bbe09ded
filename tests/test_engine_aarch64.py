"""The engine built for AArch64 (its NEON kernels, and the portable ones) run by an arm64 Python under
qemu-aarch64, against PyTorch on this host: the same logits checks as test_engine.py, the engine in
the emulated process, the reference here (PyTorch has no Debian arm64 package to run under qemu).

Runs where GPT2S_AARCH64_PYTHON holds the arm64 Python's command line, e.g.
"qemu-aarch64 -L <root> <root>/usr/bin/python3.11", and the cross build put
python/gpt_2_simple/_engine.cpython-311-aarch64-linux-gnu.so beside the sources (.ci/run does both;
docs/engine.md, "ARM"). qemu says nothing about speed on ARM: these are correctness tests only."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from test_engine import ODD, WIDE, _check_logits, _check_shape, files, model  # noqa: F401 (fixtures)

SOURCES = Path(__file__).resolve().parents[1] / "python"
PYTHON = os.environ.get("GPT2S_AARCH64_PYTHON", "")

pytestmark = pytest.mark.skipif(not PYTHON, reason="GPT2S_AARCH64_PYTHON (an arm64 Python under qemu-aarch64) is not set")


@pytest.fixture(autouse=True, scope="module")
def _arm64_module():
    # Asked for (GPT2S_AARCH64_PYTHON set) but not built: a failure, never a silent skip in CI.
    assert list(SOURCES.glob("gpt_2_simple/_engine.*aarch64*.so")), (
        f"no AArch64 build of _engine in {SOURCES / 'gpt_2_simple'}: build it with cmake/aarch64-linux-gnu.cmake (docs/engine.md)")
# How _run_in_subprocess (test_engine.py) starts the arm64 engine: only the sources and the arm64
# module on its path, never this interpreter's x86 site-packages.
ARM = dict(python=tuple(shlex.split(PYTHON)), pythonpath=str(SOURCES))
# The kernel tables of an AArch64 build: NEON (chosen by HWCAP_ASIMD), and the portable one by cap.
ISAS = ["neon", "scalar"]


def aarch64_features(isa: str | None = None) -> dict:
    """_engine.cpu_features() in the arm64 process (GPT2S_ISA=isa where given)."""
    env = {**os.environ, "PYTHONPATH": ARM["pythonpath"]}
    env.pop("GPT2S_ISA", None)
    if isa:
        env["GPT2S_ISA"] = isa
    code = "import json; from gpt_2_simple import _engine; print(json.dumps(_engine.cpu_features()))"
    proc = subprocess.run([*ARM["python"], "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_neon_is_chosen_at_run_time_and_capped_by_gpt2s_isa():
    # qemu-aarch64's default CPU ("max") reports Advanced SIMD, its dot product and BF16 in AT_HWCAP.
    native = aarch64_features()
    assert native["asimd"] and native["isa"] == native["kernels"] == "neon", native
    assert not native["avx2"] and not native["avx512f"]
    capped = aarch64_features("scalar")
    assert capped["isa"] == capped["kernels"] == "scalar" and not capped["asimd"], capped


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("isa", ISAS)
def test_logits_match_pytorch_at_every_step(model, files, isa, dtype):  # noqa: F811 (fixtures)
    _check_logits(model, files, isa, dtype, **ARM)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [WIDE, ODD], ids=["wide", "odd"])
def test_shapes_on_neon(tmp_path, shape, dtype):
    # test_engine.py's wide matrices (several slices, row groups, a partial row block) and odd
    # widths (bf16 pairs padded with a zero, a partial last panel: NEON's panel is 20 outputs).
    # NEON only, to bound the time under emulation: the portable kernels are the same source as
    # x86's scalar table, which test_engine.py runs on these shapes.
    _check_shape(tmp_path, *shape, "neon", dtype, **ARM)
