import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and friends

# Kernel families from the least to the most capable. GPT2S_ISA caps the engine to one at or below
# what the CPU has (csrc/engine/cpu_features.cpp), never above, so a test of a family the host (or
# the cap this process runs under) lacks is skipped rather than failed.
_ISA_ORDER = ("scalar", "avx2", "avx512")


def needs_isa(isa: str):
    from gpt_2_simple import _engine

    have = _engine.cpu_features()["isa"]
    return pytest.mark.skipif(_ISA_ORDER.index(isa) > _ISA_ORDER.index(have), reason=f"this CPU's best kernels are {have}, not {isa}")


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
