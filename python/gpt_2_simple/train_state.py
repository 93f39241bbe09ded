"""What exact resume needs besides the weights: the optimizer state, the data sampler's and torch's
RNG states, the seed. Stored as ``train_state-<step>.safetensors``: the tensors (optimizer moments,
the torch RNG bytes) as safetensors, everything else as JSON in the file's metadata. One file, so it
is written atomically as a whole, and nothing in it is executed on load: a run folder from someone
else (a shared tar, a Drive copy) cannot run code when resumed. Earlier versions pickled this state
(``train_state-<step>.pt``); such files are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .fileio import atomic_write

__all__ = ["TrainStateError", "state_file", "pickled_state_file", "save_train_state", "load_train_state", "refuse_pickled", "STATE_FILES"]

FORMAT = "gpt_2_simple.train_state"
VERSION = 1
_META = "train_state"  # the metadata key holding the JSON part
STATE_FILES = ("train_state-{step}.safetensors", "train_state-{step}.pt")  # every name a step's state has had


class TrainStateError(ValueError):
    """A training state file that cannot be used: damaged, of another format, or pickled."""


def state_file(run_dir: Path, step: int) -> Path:
    return run_dir / f"train_state-{step}.safetensors"


def pickled_state_file(run_dir: Path, step: int) -> Path:
    return run_dir / f"train_state-{step}.pt"


def save_train_state(path: Path, *, step: int, seed: int, optimizer_name: str, optimizer: dict, sampler: dict, torch_rng: torch.Tensor) -> None:
    """``optimizer`` is an ``Optimizer.state_dict()``: its per-parameter tensors go to the tensor
    part as ``optimizer.<param index>.<name>``, its other values (param_groups, non-tensor state
    entries such as a missing momentum buffer) to the JSON part."""
    tensors = {"torch_rng": torch_rng.detach().cpu().contiguous()}
    plain_state: dict[str, dict] = {}
    for index, entries in optimizer["state"].items():
        plain_state[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state[str(index)][key] = value
    meta = {
        "format": FORMAT, "version": VERSION, "step": step, "seed": seed, "optimizer_name": optimizer_name,
        "sampler": sampler, "param_groups": optimizer["param_groups"], "optimizer_plain": plain_state,
    }
    data = safetensors_bytes(tensors, {_META: json.dumps(meta, allow_nan=True)})
    with atomic_write(path) as f:
        f.write(data)


def load_train_state(path: Path) -> dict:
    """The state ``save_train_state`` wrote: {step, seed, optimizer_name, optimizer (a state dict
    for ``Optimizer.load_state_dict``), sampler, torch_rng}. Raises TrainStateError on any file that
    is not one, saying what to do."""
    fix = f"remove {path.name} to resume from the weights alone (the optimizer and data order then start fresh)"
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META, "null"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise TrainStateError(f"{path} is not a gpt_2_simple training state; {fix}")
            if meta.get("version") != VERSION:
                raise TrainStateError(f"{path} is training state version {meta.get('version')!r}, this gpt_2_simple reads {VERSION}; upgrade it, or {fix}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        state: dict[int, dict] = {}
        for index, entries in meta["optimizer_plain"].items():
            state[int(index)] = dict(entries)
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        groups = meta["param_groups"]
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise TrainStateError(f"{path}: its optimizer param_groups are malformed; {fix}")
        return {
            "step": int(meta["step"]), "seed": int(meta["seed"]), "optimizer_name": str(meta["optimizer_name"]),
            "optimizer": {"state": state, "param_groups": groups}, "sampler": meta["sampler"], "torch_rng": tensors["torch_rng"],
        }
    except TrainStateError:
        raise
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise TrainStateError(f"{path} is damaged ({type(e).__name__}: {e}); {fix}") from None


def refuse_pickled(path: Path, weights: Path) -> TrainStateError:
    """The error for a pickled state of an earlier version: loading it could run any code in it."""
    return TrainStateError(
        f"{path} is a pickled training state from an earlier gpt_2_simple; it is not loaded, because unpickling a "
        "file can run any code it holds (a run folder from a shared archive or Drive copy could). To continue: "
        f"if you trust it and want exact resume, resume once with the gpt_2_simple that wrote it; otherwise delete "
        f"{path.name} and run again (training continues from {weights.name} with a fresh optimizer and data order), "
        f"or start a new run from these weights with restore_from={os.fspath(weights)!r}"
    )
