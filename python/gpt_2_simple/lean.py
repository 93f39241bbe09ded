"""Optimizers for ``finetune``, and the memory-lean ways to run them on big models.

Full fine-tuning (every weight trained, no adapters) of 774M and 1558M on small machines, from
well-kept parts:

- **The optimizer step inside the backward pass** (``OptimizerInBackward``): each parameter is
  updated by its own optimizer from a ``register_post_accumulate_grad_hook`` as soon as its
  gradient is complete, and the gradient is freed at once, so with one micro-batch per step the
  whole model's gradients never exist together (4 bytes x parameters less at the peak). With
  gradient accumulation the gradients must live across micro-batches; the step then happens in
  the last micro-batch's backward. The update is the same arithmetic as the usual optimizer's.
- **Smaller optimizer states**: ``'adafactor'`` (torch.optim.Adafactor: a factored second moment,
  rows + columns instead of a full matrix, no first moment) and ``'adam8bit'`` (bitsandbytes'
  block-wise 8-bit Adam, CUDA only) instead of Adam's two fp32 moments (8 bytes x parameters).
- **Activation checkpointing** (``use_memory_saving_gradients``, model.py): each block's
  activations are recomputed in the backward pass instead of stored.

``plan`` estimates the peak memory of a setup and turns on the step-in-backward and checkpointing
when the plain setup would not fit the device (docs/finetune.md, "Big models on small machines").
Optimizer states are torch ``state_dict``s (tensors and JSON-able values), in the layout of the
plain optimizer: a run can switch the step-in-backward on or off between resumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

__all__ = ["OPTIMIZERS", "build_optimizer", "OptimizerInBackward", "Plan", "plan", "estimate_bytes", "device_memory"]

OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "adam8bit")
STATE_BYTES_PER_PARAM = {"adam": 8, "adamw": 8, "sgd": 0, "adam8bit": 2}  # adafactor: factored, see _state_bytes
FIT = 0.9  # the share of the device's memory a plan may fill


def _groups(name: str, params: list) -> list[dict]:
    if name == "adamw":  # decay matrices and embeddings, not biases and LayerNorm gains
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01}, {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [{"params": params}]


def _torch_optimizer(name: str, groups: list[dict], lr: float, device_type: str) -> torch.optim.Optimizer:
    # PyTorch's fused kernels: one pass over each tensor, no temporaries. On the CPU (2 cores, 124M)
    # Adam's default per-tensor loop took 180-230 ms a step (435-644 ms while its temporaries still
    # faulted in anew each step), fused 66 ms; finetune's peak RSS fell by 0.2-0.5 GB.
    fused = {"fused": True} if device_type in ("cuda", "cpu") else {}
    if name == "adam":  # the original's tf AdamOptimizer: no weight decay, eps 1e-8
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **fused)
    if name == "adafactor":  # lr is the largest relative step: an update is at most lr x the weights' RMS
        return torch.optim.Adafactor(groups, lr=lr)
    if name == "adam8bit":
        if device_type != "cuda":
            raise ValueError("optimizer='adam8bit' keeps its states on a CUDA GPU (bitsandbytes): on the CPU use optimizer='adafactor'")
        try:
            import bitsandbytes
        except ImportError:
            raise ValueError("optimizer='adam8bit' needs bitsandbytes: pip install bitsandbytes (or use optimizer='adafactor')") from None
        return bitsandbytes.optim.Adam8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.SGD(groups, lr=lr)


def build_optimizer(name: str, params: list, lr: float, device_type: str, *, in_backward: bool = False):
    """The optimizer ``name`` (one of OPTIMIZERS) over ``params``; with ``in_backward`` an
    ``OptimizerInBackward`` of it, which updates each parameter during ``backward()``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    make = partial(_torch_optimizer, name, lr=lr, device_type=device_type)
    return OptimizerInBackward(_groups(name, params), make) if in_backward else make(_groups(name, params))


class OptimizerInBackward:
    """One optimizer per parameter, stepped by a post-accumulate-grad hook in the backward pass.

    Set ``stepping`` False for the backward passes of all micro-batches but a step's last: their
    gradients then accumulate in ``.grad`` as usual. ``step()`` does nothing (the update is done);
    ``zero_grad``, ``param_groups``, ``state_dict`` and ``load_state_dict`` behave as the plain
    optimizer's, whose state layout this one reads and writes.
    """

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer]):
        self.stepping = True
        self.optimizers: list[torch.optim.Optimizer] = []
        self.group_indices: list[list[int]] = []  # the plain optimizer's parameter numbers, per group
        self._hooks = []
        for group in groups:
            indices = []
            for p in group["params"]:
                indices.append(len(self.optimizers))
                opt = make([{**group, "params": [p]}])
                self.optimizers.append(opt)
                self._hooks.append(p.register_post_accumulate_grad_hook(partial(self._step, opt)))
            self.group_indices.append(indices)

    def _step(self, opt: torch.optim.Optimizer, param: torch.Tensor) -> None:
        if self.stepping:
            opt.step()
            param.grad = None  # freed now, not at the end of the backward pass

    def step(self) -> None:
        """Nothing: each parameter was updated in the backward pass."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def state_dict(self) -> dict:
        """The plain optimizer's layout: ``{"state": {i: ...}, "param_groups": [{..., "params": [i, ...]}]}``."""
        state, groups = {}, []
        for indices in self.group_indices:
            settings = {k: v for k, v in self.optimizers[indices[0]].state_dict()["param_groups"][0].items() if k != "params"}
            groups.append({**settings, "params": list(indices)})
            for i in indices:
                saved = self.optimizers[i].state_dict()["state"]
                if 0 in saved:
                    state[i] = saved[0]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(ix) for ix in self.group_indices]:
            raise ValueError("the saved optimizer state is for other parameters (a different model or only_train_transformer_layers setting)")
        for group, indices in zip(groups, self.group_indices):
            for saved_i, i in zip(group["params"], indices):
                own = state_dict["state"].get(saved_i, state_dict["state"].get(str(saved_i)))  # int keys may come back as text
                self.optimizers[i].load_state_dict({"state": {} if own is None else {0: own}, "param_groups": [{**group, "params": [0]}]})

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


# ----------------------------------------------------------------------------- memory plan


def _state_bytes(name: str, shapes: list[torch.Size]) -> int:
    if name == "adafactor":  # a row and a column second moment per matrix, a full one per vector
        return sum(4 * (s[0] + s[1]) if len(s) == 2 else 4 * s.numel() for s in shapes)
    return STATE_BYTES_PER_PARAM[name] * sum(s.numel() for s in shapes)


def estimate_bytes(config, n_params: int, trainable: list[torch.Size], *, optimizer: str, batch_size: int, accumulate: int,
                   in_backward: bool, checkpointing: bool, n_ctx: int | None = None) -> int:
    """Peak training memory, estimated: fp32 weights, gradients (one tensor's with the step in
    backward and no accumulation), optimizer states, activations of a micro-batch (Korthikanti et
    al.'s 34 C + 5 NH T bytes per token and layer in 16-bit training, twice that in fp32; one
    block's when checkpointed, plus each block's input) and the chunked loss's 512-token logits."""
    T, C, L, NH = n_ctx or config.n_ctx, config.n_embd, config.n_layer, config.n_head
    weights = 4 * n_params
    grads = 4 * (max(s.numel() for s in trainable) if in_backward and accumulate == 1 else sum(s.numel() for s in trainable))
    per_layer = 2 * batch_size * T * (34 * C + 5 * NH * T)
    activations = (4 * batch_size * T * C * L + per_layer) if checkpointing else per_layer * L
    head = 3 * 4 * 512 * config.n_vocab
    return weights + grads + _state_bytes(optimizer, trainable) + activations + head


def device_memory(device: torch.device) -> int:
    """Bytes this process may use: a GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Plan:
    in_backward: bool
    checkpointing: bool
    estimate: int
    available: int
    notes: list[str] = field(default_factory=list)


def plan(config, n_params: int, trainable: list[torch.Size], *, optimizer: str, batch_size: int, accumulate: int, in_backward: bool | None,
         checkpointing: bool, available: int, can_step_in_backward: bool = True) -> Plan:
    """The step-in-backward and checkpointing settings for a run: what the caller asked, and for
    ``in_backward=None`` (automatic) the plain setup unless it would not fit ``available`` bytes;
    then the step in backward, then checkpointing, then advice on the optimizer."""
    def estimate(ib, ckpt):
        return estimate_bytes(config, n_params, trainable, optimizer=optimizer, batch_size=batch_size, accumulate=accumulate,
                              in_backward=ib, checkpointing=ckpt)

    budget = int(FIT * available)
    ib, ckpt, notes = bool(in_backward), checkpointing, []
    if in_backward is None and estimate(ib, ckpt) > budget:
        if can_step_in_backward and accumulate == 1:
            ib = True
            notes.append("optimizer step inside the backward pass (whole-model gradients never exist)")
        if not ckpt and estimate(ib, True) < estimate(ib, False) and estimate(ib, ckpt) > budget:
            ckpt = True
            notes.append("activation checkpointing (use_memory_saving_gradients)")
    need = estimate(ib, ckpt)
    if in_backward is None and need > budget:
        smaller = "'adam8bit' (CUDA, bitsandbytes) or 'adafactor'" if optimizer in ("adam", "adamw") else "a smaller batch_size"
        notes.append(f"still about {need / 2**30:.1f} GiB against {available / 2**30:.1f} GiB available: try optimizer={smaller}"
                     + (", accumulate_gradients=1" if accumulate > 1 else ""))
    return Plan(ib, ckpt, need, available, notes)
