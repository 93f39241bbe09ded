import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and friends



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
