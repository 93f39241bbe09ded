"""The training step of ``finetune`` and what it runs on: the model on its device, the memory plan
(step in backward, checkpointing: lean.py), the optimizer with its restored state, DDP and
``torch.compile``; then forward, backward and update over ``accumulate_gradients`` micro-batches.

Gradient accumulation averages: one step is a step on the token-mean loss of all
``batch_size x processes x accumulate_gradients`` windows (the original summed micro-batches).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .head_loss import IGNORE
from .lean import build_optimizer, device_memory, plan
from .model import GPT2
from .train_checkpoint import Start
from .weights import build_model

__all__ = ["inputs_and_targets", "use_bf16", "Stepper"]


def inputs_and_targets(x, lengths):
    """Windows (N, L) with their lengths -> model inputs (N, L-1) and next-token targets (N, L-1),
    IGNORE (-100, left out of the loss) past each window's end."""
    target = x[:, 1:].clone()
    target[torch.arange(target.shape[1])[None, :] >= (lengths - 1)[:, None]] = IGNORE
    return x[:, :-1], target


def use_bf16(mixed_precision, device: torch.device) -> bool:
    """finetune's ``mixed_precision``: None/'auto' = bf16 autocast on CUDA GPUs that have it."""
    if mixed_precision in (None, "auto"):
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mixed_precision in (True, "bf16"):
        return True
    if mixed_precision in (False, "fp32", "no"):
        return False
    raise ValueError(f"mixed_precision must be None, True/'bf16' or False, got {mixed_precision!r}")


class Stepper:
    """The model, its optimizer and the step. ``global_step`` counts optimizer steps; ``updating``
    is True while the weights are being changed (a second Ctrl-C then must not save), ``in_step``
    while a step's windows are drawn but not yet trained on (``sampler_before_step`` undoes the draw)."""

    def __init__(self, start: Start, *, seed: int, device: torch.device, dist, bf16: bool, optimizer: str, learning_rate: float,
                 batch_size: int, accumulate_gradients: int, optimizer_in_backward: bool | None, use_memory_saving_gradients: bool,
                 only_train_transformer_layers: bool, compile: bool, say: Callable):
        self.device, self.dist, self.bf16, self.say = device, dist, bf16, say
        self.optimizer, self.batch_size, self.accumulate_gradients = optimizer, batch_size, accumulate_gradients
        config, train_state = start.config, start.train_state
        torch.manual_seed(seed)
        self.model = model = GPT2(config) if start.state is None else build_model(config, start.state)
        start.state = None  # the weights are in the model now: the loaded copy goes
        model.to(device).train()
        if only_train_transformer_layers:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("h."))
        params = [p for p in model.parameters() if p.requires_grad]
        self._plan_memory(config, params, optimizer_in_backward, use_memory_saving_gradients, compile)
        self.opt = build_optimizer(optimizer, params, learning_rate, device.type, in_backward=self.in_backward)
        if train_state is not None and train_state.get("optimizer_name") == optimizer:
            self.opt.load_state_dict(train_state["optimizer"])
            for group in self.opt.param_groups:
                group["lr"] = learning_rate  # this call's learning rate, not the saved one
        elif train_state is not None:
            say(f"Optimizer changed from {train_state.get('optimizer_name')} to {optimizer}: starting it fresh")
        self.ddp = None
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.train_model = self.ddp or model
        if compile:
            self.train_model = torch.compile(self.train_model)
        self.global_step = start.step
        self.updating = self.in_step = False
        self.sampler_before_step = None

    def _plan_memory(self, config, params, in_backward: bool | None, checkpointing: bool, compile: bool) -> None:
        """Step in backward and checkpointing: as asked, or chosen by lean.plan for this device."""
        if in_backward and (self.dist.world > 1 or compile):
            raise ValueError("optimizer_in_backward=True works in one process without compile: DDP reduces gradients after the "
                             "step would have used them; leave it None (automatic) or drop multi_gpu/compile")
        choice = plan(config, sum(p.numel() for p in self.model.parameters()), [p.shape for p in params], optimizer=self.optimizer,
                      batch_size=self.batch_size, accumulate=self.accumulate_gradients, in_backward=in_backward,
                      checkpointing=bool(checkpointing), available=device_memory(self.device),
                      can_step_in_backward=self.dist.world == 1 and not compile)
        for note in choice.notes:
            self.say(f"Memory: {note}")
        self.in_backward = choice.in_backward
        self.model.gradient_checkpointing = choice.checkpointing

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, sampler, stop_requested: bool) -> tuple[float, bool]:
        """One optimizer step over batch_size x accumulate_gradients windows per process; returns
        the mean token loss over all processes, and whether any process was asked to stop."""
        b, world, accum = self.batch_size, self.dist.world, self.accumulate_gradients
        self.sampler_before_step = sampler.state()
        self.in_step = True  # until the update: a second Ctrl-C puts this step's windows back
        # Every process draws the same global batch and takes its share, so the data (and the
        # result) depend only on the total batch, not on how many processes share it.
        x, lengths = sampler.sample(b * world * accum)
        n_targets = int((lengths - 1).sum())
        inputs, target = inputs_and_targets(torch.from_numpy(x), torch.from_numpy(lengths))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in range(accum):
            rows = slice((m * world + self.dist.rank) * b, (m * world + self.dist.rank + 1) * b)
            xi, ti = inputs[rows].to(self.device, non_blocking=True), target[rows].to(self.device, non_blocking=True)
            # DDP all-reduces gradients in the last micro-batch's backward only.
            sync = self.ddp is None or m == accum - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self.autocast():
                loss = self.train_model(xi, targets=ti)  # summed over the targets
            if self.in_backward:  # the last micro-batch's backward updates the weights
                self.opt.stepping = self.updating = m == accum - 1
            # DDP averages gradients over processes: scale so the result is the global token mean.
            (loss * (world / n_targets)).backward()
            loss_sum += loss.detach().double()
        self.updating = True
        self.opt.step()
        self.global_step += 1
        self.in_step = False  # before updating turns False: no moment counts as both undone and not updating
        self.updating = False
        self.opt.zero_grad(set_to_none=True)
        if world > 1:
            packed = torch.stack([loss_sum, torch.tensor(float(stop_requested), dtype=torch.float64, device=self.device)])
            torch.distributed.all_reduce(packed)
            loss_sum, stop_requested = packed[0], bool(packed[1].item() > 0)
        return float(loss_sum) / n_targets, stop_requested  # the one host sync of the step
