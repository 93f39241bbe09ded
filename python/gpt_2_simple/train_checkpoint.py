"""A run's checkpoints for ``finetune``: where a run starts (this run's latest checkpoint, a path,
the base model or a fresh init), the files the original copied into a run, and saving and pruning
checkpoints.

A save writes the training state, then the weights, then ``counter``, each atomically: a
checkpoint's weights never exist without its state, and a kill at any moment leaves the previous
checkpoint whole (docs/finetune.md, "The run folder").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import config as configs
from .fileio import atomic_write
from .tokenizer import BUNDLED_DIR
from .train_state import STATE_FILES, load_train_state, pickled_state_file, refuse_pickled, save_train_state, state_file
from .weights import latest_checkpoint, load_weights, save_weights

__all__ = ["checkpoint_steps", "Start", "load_start", "write_run_files", "remove_for_overwrite", "save_checkpoint", "prune"]

CHECKPOINT = re.compile(r"model-(\d+)\.safetensors")


def checkpoint_steps(folder: str | os.PathLike) -> list[int]:
    """Steps of the ``model-<step>.safetensors`` checkpoints in a run folder, ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT.fullmatch(p.name)))


def read_counter(folder: Path) -> int | None:
    try:
        return int((folder / "counter").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def write_file(path: Path, data: bytes | str) -> None:
    """``data`` as the whole of ``path``, atomically."""
    with atomic_write(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


# ----------------------------------------------------------------------------- where a run starts


def base_model(model_name: str, model_dir: str):
    """(folder with the base weights or None for a from-scratch size, its config or None)."""
    names = [model_name, configs.ALIASES.get(model_name)] + [old for old, new in configs.ALIASES.items() if new == model_name]
    for name in filter(None, names):  # models/117M serves for 124M and the other way round
        if latest_checkpoint(Path(model_dir) / name) is not None:
            return Path(model_dir) / name, None
    name = configs.canonical_name(model_name)  # unknown names: a ValueError listing the known ones
    if name in configs.SCRATCH:
        return None, configs.SCRATCH[name]
    raise FileNotFoundError(
        f"base model {model_name} not found in {Path(model_dir) / model_name}; download it first with "
        f"gpt_2_simple.download_gpt2(model_name={model_name!r}) (the CLI does this for you), "
        "or train a from-scratch size: " + ", ".join(configs.SCRATCH)
    )


def named_config(model_name: str, model_dir: str):
    """The config ``model_name`` stands for (its folder's hparams, or a known size), else None."""
    folder = Path(model_dir) / model_name
    for name in ("hparams.json", "config.json"):
        if (folder / name).is_file():
            return configs.GPT2Config.from_file(folder / name)
    with contextlib.suppress(ValueError):
        return configs.get_config(model_name)
    return None


@dataclass
class Start:
    """What a run starts from: the config, the weights (numpy dict, None for a fresh init), the step
    to continue from, and the saved training state (exact resume) when restoring this run."""

    config: configs.GPT2Config
    state: dict | None
    step: int
    train_state: dict | None


def load_start(run_dir: Path, restore_from: str, model_name: str, model_dir: str, say: Callable) -> Start:
    """``restore_from='latest'``: this run's newest checkpoint with its training state, else as
    'fresh'; a path: those weights; 'fresh': the base model in ``model_dir`` or a from-scratch size."""
    if restore_from == "latest":
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            config, state = load_weights(latest.path)
            step = latest.step if latest.step is not None else (read_counter(run_dir) or 0)
            expected = named_config(model_name, model_dir)
            if expected is not None and config != expected:
                raise ValueError(
                    f"{run_dir} holds a model of another size ({config}) than model_name={model_name!r}; "
                    "pass the model_name it was trained from, another run_name, or restore_from='fresh'"
                )
            train_state = None
            if latest.format == "safetensors":
                if state_file(run_dir, step).is_file():
                    train_state = load_train_state(state_file(run_dir, step))
                elif pickled_state_file(run_dir, step).is_file():
                    raise refuse_pickled(pickled_state_file(run_dir, step), latest.path)
            say("Loading checkpoint", latest.path)
            return Start(config, state, step, train_state)
    if restore_from not in ("latest", "fresh"):
        config, state = load_weights(restore_from)
        say("Loading checkpoint", restore_from)
        return Start(config, state, 0, None)
    base_dir, base_config = base_model(model_name, model_dir)
    if base_dir is not None:
        config, state = load_weights(base_dir)
        say("Loading pretrained model", base_dir)
        return Start(config, state, 0, None)
    say(f"Initialising a new '{model_name}' model from scratch ({base_config.n_params() / 1e6:.1f}M parameters)")
    return Start(base_config, None, 0, None)


def write_run_files(run_dir: Path, config, model_dir: str, model_name: str) -> None:
    """hparams.json and the tokenizer files, as the original copied them into the run; temporary
    files left by a process killed mid-save are removed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for p in run_dir.glob(".*.tmp"):  # fileio.atomic_write's ".<name>.<random>.tmp"
        p.unlink()
    write_file(run_dir / "hparams.json", json.dumps(config.to_hparams(), indent=2) + "\n")
    base = Path(model_dir) / model_name
    for name in ("encoder.json", "vocab.bpe"):
        source = base / name if (base / name).is_file() else BUNDLED_DIR / name
        if (run_dir / name).resolve() != source.resolve():
            write_file(run_dir / name, source.read_bytes())


def remove_for_overwrite(run_dir: Path, keep_step: int) -> None:
    """``overwrite=True``: the original removed the run's old checkpoints and event files, then saved."""
    for p in list(run_dir.iterdir()):
        m = CHECKPOINT.fullmatch(p.name) or re.fullmatch(r"train_state-(\d+)\.(?:safetensors|pt)", p.name)
        if p.name.startswith("events") or (m and int(m.group(1)) != keep_step):
            p.unlink()


# ----------------------------------------------------------------------------- saving


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, config, optimizer_name: str, optimizer, sampler, seed: int) -> None:
    """Training state, then weights, then counter, each atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_train_state(
        state_file(run_dir, step), step=step, seed=seed, optimizer_name=optimizer_name,
        optimizer=optimizer.state_dict(), sampler=sampler.state(), torch_rng=torch.get_rng_state(),
    )
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    save_weights(run_dir / f"model-{step}.safetensors", weights, config, {"format": "gpt_2_simple", "step": str(step)})
    write_file(run_dir / "counter", f"{step}\n")


def prune(run_dir: Path, saved: list[int], max_checkpoints: int) -> None:
    """Keep the newest ``max_checkpoints``: this call's saves (``saved``, oldest first) count as newer
    than the ones the folder held before, and older checkpoints numbered above the newest save (left
    by a run this one restarted) go, since the highest step is what 'latest' loads."""
    newest = saved[-1]
    earlier = [s for s in checkpoint_steps(run_dir) if s not in saved]
    order = [s for s in earlier if s <= newest] + saved
    drop = order[:-max_checkpoints] + [s for s in earlier if s > newest]
    for s in drop:
        for name in (f"model-{s}.safetensors", *(f.format(step=s) for f in STATE_FILES)):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
