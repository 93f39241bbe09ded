"""gpt_2_simple: fine-tune GPT-2 on your text (PyTorch) and generate from it (C++/CUDA engine).

Scripts written for the original package run unchanged::

    import gpt_2_simple as gpt2
    sess = gpt2.start_tf_sess()
    gpt2.finetune(sess, "shakespeare.txt", steps=1000)
    gpt2.generate(sess)

This module only re-exports. Names are resolved on first use (PEP 562), so ``import gpt_2_simple``
stays fast and never imports torch: training and scoring import it when called, generation never does.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.9.0"

# public name -> submodule that defines it
_EXPORTS = {
    # session object (the original's tf.Session stand-in)
    "start_tf_sess": "session",
    "start_session": "session",
    "reset_session": "session",
    "load_gpt2": "session",
    "get_available_gpus": "session",
    "Session": "session",
    # pretrained weights
    "download_gpt2": "download",
    "download_file_with_progress": "download",
    "is_gpt2_downloaded": "download",
    # data
    "load_dataset": "dataset",
    "encode_csv": "dataset",
    "encode_dataset": "dataset",
    # training and scoring
    "finetune": "train",
    "score": "score",
    # generation
    "generate": "generate",
    "generate_to_file": "generate",
    "export": "export",
    "export_hf": "export",
    "Engine": "engine",
    # Google Drive helpers of the original (Colab only)
    "mount_gdrive": "gdrive",
    "is_mounted": "gdrive",
    "get_tarfile_name": "gdrive",
    "copy_checkpoint_to_gdrive": "gdrive",
    "copy_checkpoint_from_gdrive": "gdrive",
    "copy_file_to_gdrive": "gdrive",
    "copy_file_from_gdrive": "gdrive",
    # text <-> ids, model sizes, command line
    "get_encoder": "tokenizer",
    "GPT2Config": "config",
    "cmd": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt_2_simple' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package: ``import gpt_2_simple.generate`` (done by the
    CLI, by training, by users) would make ``gpt2.generate`` the module instead of the function.
    For the submodules named after the function they define (generate, export, score) the public
    name stays the function; the modules remain importable (``from gpt_2_simple.generate import ...``)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static tools see the real definitions
    from .cli import cmd
    from .config import GPT2Config
    from .dataset import encode_csv, encode_dataset, load_dataset
    from .download import download_file_with_progress, download_gpt2, is_gpt2_downloaded
    from .engine import Engine
    from .export import export, export_hf
    from .gdrive import (
        copy_checkpoint_from_gdrive,
        copy_checkpoint_to_gdrive,
        copy_file_from_gdrive,
        copy_file_to_gdrive,
        get_tarfile_name,
        is_mounted,
        mount_gdrive,
    )
    from .generate import generate, generate_to_file
    from .score import score
    from .session import Session, get_available_gpus, load_gpt2, reset_session, start_session, start_tf_sess
    from .tokenizer import get_encoder
    from .train import finetune
