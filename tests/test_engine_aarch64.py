"""The engine built for AArch64 (its NEON kernels, and the portable ones) run by an arm64 Python under
qemu-aarch64, against PyTorch on this host: the same logits checks as test_engine.py, the engine in
the emulated process, the reference here (PyTorch has no Debian arm64 package to run under qemu);
and test_engine_screen.py's checks of the screened head on NEON's sdot (the neondot table).

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

import numpy as np
import pytest

from test_engine import ODD, WIDE, _check_logits, _check_shape, files, model  # noqa: F401 (fixtures)
from test_engine_screen import BOUND_CASES, SETTINGS, _requests, check_bounds

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
# The kernel tables of an AArch64 build that the logits tests run: NEON (chosen by HWCAP_ASIMD),
# and the portable one by cap. neondot (NEON with sdot, HWCAP_ASIMDDP) is the same matmul code
# built with +dotprod; it adds the screened head, which a logits hook turns off, so it has a test of
# its own below.
ISAS = ["neon", "scalar"]


def _arm64(code: str, args=(), isa: str | None = None, stdin: str = "", **env) -> dict:
    """Runs `code` in the arm64 Python (GPT2S_ISA=isa where given) and parses the JSON it prints."""
    env = {**os.environ, "PYTHONPATH": ARM["pythonpath"], **env}
    env.pop("GPT2S_ISA", None)
    if isa:
        env["GPT2S_ISA"] = isa
    proc = subprocess.run([*ARM["python"], "-c", code, *args], input=stdin, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def aarch64_features(isa: str | None = None) -> dict:
    """_engine.cpu_features() in the arm64 process (GPT2S_ISA=isa where given)."""
    return _arm64("import json; from gpt_2_simple import _engine; print(json.dumps(_engine.cpu_features()))", isa=isa)


def test_neon_is_chosen_at_run_time_and_capped_by_gpt2s_isa():
    # qemu-aarch64's default CPU ("max") reports Advanced SIMD, its dot product and BF16 in AT_HWCAP.
    native = aarch64_features()
    assert native["asimd"] and native["asimddp"] and native["isa"] == "neon" and native["kernels"] == "neondot", native
    assert not native["avx2"] and not native["avx512f"]
    neon = aarch64_features("neon")
    assert neon["isa"] == neon["kernels"] == "neon" and not neon["asimddp"], neon
    capped = aarch64_features("scalar")
    assert capped["isa"] == capped["kernels"] == "scalar" and not capped["asimd"], capped


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("isa", ISAS)
def test_logits_match_pytorch_at_every_step(model, files, isa, dtype):  # noqa: F811 (fixtures)
    # int8 on "neon" is the widening int8 product (no sdot); on neondot, sdot (below).
    _check_logits(model, files, isa, dtype, **ARM)


def test_int8_logits_on_neondot(model, files):  # noqa: F811 (fixtures)
    # The uncapped process picks neondot (test above): int8 weights multiplied with sdot.
    _check_logits(model, files, "native", "int8", **ARM)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("shape", [WIDE, ODD], ids=["wide", "odd"])
def test_shapes_on_neon(tmp_path, shape, dtype):
    # test_engine.py's wide matrices (several slices, row groups, a partial row block) and odd
    # widths (bf16 pairs and int8 quads padded with zeros, a partial last panel: NEON's panel is 20
    # outputs).
    # NEON only, to bound the time under emulation: the portable kernels are the same source as
    # x86's scalar table, which test_engine.py runs on these shapes.
    _check_shape(tmp_path, *shape, "neon", dtype, **ARM)


_GENERATE = """
import json, sys
from gpt_2_simple.engine import Engine, Request
e = Engine(sys.argv[1], backend="cpu")
res = e.generate([Request(**r) for r in json.loads(sys.stdin.read())], batch_size=int(sys.argv[2]))
print(json.dumps({"tokens": [r.tokens for r in res], "screened_rows": e.last_timings()["screened_rows"], "device": e.device}))
"""


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_screened_head_draws_equal_the_full_head_on_neondot(files, dtype):  # noqa: F811 (fixture)
    # test_engine_screen.py's check on the sdot screen: top-k 40, greedy, top-k 1 and top-k 128
    # with top-p rows in one batch draw exactly the full head's tokens (whose logits the tests
    # above check against PyTorch), every draw through the screen.
    requests = [dict(prompt=r.prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                     seed=r.seed, sample_index=r.sample_index) for settings in SETTINGS[:4] for r in _requests(settings, n=2, new=8)]
    args, stdin = (str(files[dtype]), "4"), json.dumps(requests)
    screened = _arm64(_GENERATE, args, stdin=stdin, GPT2S_SCREEN="1")
    full = _arm64(_GENERATE, args, stdin=stdin, GPT2S_SCREEN="0")
    assert screened["device"].startswith("cpu neondot,") and full["screened_rows"] == 0
    assert screened["screened_rows"] == sum(len(t) for t in screened["tokens"]) > 0
    assert screened["tokens"] == full["tokens"]


_PROBE = """
import json, sys
import numpy as np
from gpt_2_simple import _engine
with np.load(sys.argv[1]) as z:
    out = _engine.screen_probe(z["w"], z["x"])
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in out.items() if k not in ("ok", "panel")})
print(json.dumps({"ok": bool(out["ok"]), "panel": int(out["panel"]), "kernels": _engine.cpu_features()["kernels"]}))
"""


@pytest.mark.parametrize("dtype,K", BOUND_CASES[:2])
def test_screen_bounds_hold_on_neondot(tmp_path, dtype, K):
    # test_engine_screen.py's probe of the sdot screen: its bounds on rows where Cauchy-Schwarz is
    # nearly tight, and exact_logits bit for bit the matmul's, the arrays made here (fp32, and bf16
    # over an odd width: the third case, bf16 at K 64, is left to x86 for time under emulation).
    def probe(w, x):
        np.savez(tmp_path / "in.npz", w=w, x=x)
        out = _arm64(_PROBE, (str(tmp_path / "in.npz"), str(tmp_path / "out.npz")))
        assert out.pop("kernels") == "neondot"
        with np.load(tmp_path / "out.npz") as z:
            return out | {k: z[k] for k in z.files}

    check_bounds(probe, dtype, K)
