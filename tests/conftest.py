import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and friends

# PyTorch's x86 wheels multiply fp32 matrices with Intel MKL, whose AVX-512 kernels vary in the last
# bits from run to run on an Intel Xeon (Sapphire Rapids; MKL_CBWR=AUTO,STRICT did not help): the
# tests that compare a resumed fine-tune with an uninterrupted one bit for bit then fail at random.
# MKL's AVX2 kernels are reproducible (what AVX2-only machines run anyway). MKL reads this when it
# first multiplies, before any test does; the test processes inherit it. docs/finetune.md, "Exact resume".
os.environ.setdefault("MKL_CBWR", "AVX2")

# Kernel families from the least to the most capable, per architecture. GPT2S_ISA caps the engine
# to one at or below what the CPU has (csrc/engine/cpu_features.cpp), never above, so a test of a
# family the host (or the cap this process runs under) lacks is skipped rather than failed.
_ISA_ORDERS = (("scalar", "avx2", "avx512"), ("scalar", "neon"))


def needs_isa(isa: str):
    from gpt_2_simple import _engine

    have = _engine.cpu_features()["isa"]
    runs = any(isa in order and have in order and order.index(isa) <= order.index(have) for order in _ISA_ORDERS)
    return pytest.mark.skipif(not runs, reason=f"this CPU's best kernels are {have}, not {isa}")


def pytest_report_header(config):
    """The kernel tables this session exercises: the host's best (the per-ISA tests cap it lower),
    and the AArch64 build's under qemu where test_engine_aarch64.py runs."""
    from gpt_2_simple import _engine

    features = _engine.cpu_features()
    lines = [f"gpt_2_simple kernels: {features['kernels']} ({features})"]
    aarch64 = os.environ.get("GPT2S_AARCH64_PYTHON")
    if aarch64:
        try:
            from test_engine_aarch64 import aarch64_features

            features = aarch64_features()
            lines.append(f"gpt_2_simple aarch64 kernels under qemu: {features['kernels']} ({features})")
        except Exception as e:  # the tests themselves report it
            lines.append(f"gpt_2_simple aarch64 kernels under qemu: unavailable ({e})")
    return lines


def pytest_collection_modifyitems(config, items):
    """CUDA tests run only where a GPU and the _engine_cuda module are present."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA not available here)")
    for item in items:
        # The marker itself: item.keywords also holds every folder name (e.g. a checkout in .../cuda/).
        if item.get_closest_marker("cuda") is not None and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    from importlib.resources import files

    return (files("gpt_2_simple") / "data" / "shakespeare.txt").read_text(encoding="utf-8")
