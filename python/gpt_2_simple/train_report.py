"""What ``finetune`` reports while it trains: the original's log line ``[step | seconds] loss=x.xx
avg=x.xx`` and a progress bar, ``log.jsonl``, ``loss.png`` and TensorBoard events in the run
folder, validation loss and perplexity, and samples in ``samples/<run_name>/``.

Samples and validation use their own random streams and the model in eval mode: they never change
training.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .head_loss import IGNORE
from .plot import loss_png
from .train_checkpoint import write_file
from .train_step import inputs_and_targets

__all__ = ["TrainLog", "Reporter", "generate_samples", "validate", "SAMPLE_DIR", "VAL_WINDOWS"]

SAMPLE_DIR = "samples"  # relative to the working directory, as in the original
VAL_WINDOWS = 64  # validation loss is measured on at most this many fixed windows


@dataclass
class TrainLog:
    """``log.jsonl`` (one JSON object per printed step and per validation), ``loss.png`` drawn from
    it and, when TensorBoard is installed, event files in the run folder (the original wrote those)."""

    folder: Path
    enabled: bool
    writer: object = None

    def open(self, resume_step: int | None) -> None:
        if not self.enabled:
            return
        path = self.folder / "log.jsonl"
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                    entry = json.loads(line)
                    if entry["step"] <= resume_step:  # later entries belong to steps being redone
                        kept.append(line)
        write_file(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(self.folder))

    def write(self, entry: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()  # loss.png is drawn from the file
        if self.writer is not None:
            for key in ("loss", "val_loss"):
                if key in entry:
                    self.writer.add_scalar(key, entry[key], entry["step"])

    def plot(self) -> None:
        if not self.enabled:
            return
        try:
            image = loss_png(self.folder / "log.jsonl", self.folder.name)
        except ImportError:  # a training dependency; a broken install must not stop the run at a save
            print("loss.png not drawn: matplotlib is not installed (pip install matplotlib)")
            return
        write_file(self.folder / "loss.png", image)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.writer is not None:
                self.writer.close()


class Reporter:
    """The log line, the progress bar (when ``steps`` is known) and their entries in ``log``, with
    the original's smoothed average ``avg = sum 0.99^k loss / sum 0.99^k`` over the printed steps.
    A context manager: the bar closes with it."""

    def __init__(self, log: TrainLog, steps: int, *, progress: bool, main: bool, say: Callable, tokens_per_step: int):
        self.log, self.tokens_per_step = log, tokens_per_step
        self.avg_loss = (0.0, 0.0)
        self.start_time = time.time()
        self.bar = tqdm(total=steps, unit="step", disable=not (progress and main and steps > 0), dynamic_ncols=True)
        self.write = self.bar.write if not self.bar.disable else say

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def step(self, counter: int, loss: float, elapsed: float, printed: bool) -> None:
        """Step ``counter`` took ``elapsed`` seconds; ``printed``: this is a step to print."""
        self.bar.update(1)
        if not printed:
            return
        self.avg_loss = (self.avg_loss[0] * 0.99 + loss, self.avg_loss[1] * 0.99 + 1.0)
        avg = self.avg_loss[0] / self.avg_loss[1]
        self.write(f"[{counter} | {time.time() - self.start_time:2.2f}] loss={loss:2.2f} avg={avg:2.2f}")
        self.bar.set_postfix(loss=f"{loss:.2f}", avg=f"{avg:.2f}")
        self.log.write({"step": counter, "loss": loss, "avg": avg, "time": time.time() - self.start_time,
                        "tokens_per_s": self.tokens_per_step / max(elapsed, 1e-9)})

    def validation(self, step: int, val_loss: float, ppl: float) -> None:
        self.write(f"[{step} | {time.time() - self.start_time:.2f}] val_loss={val_loss:.2f} val_ppl={ppl:.2f}")
        self.log.write({"step": step, "val_loss": val_loss, "val_ppl": ppl, "time": time.time() - self.start_time})


def generate_samples(model, windows, enc, *, seed: int, counter: int, sample_num: int, sample_length: int, batch_size: int,
                     run_name: str, say: Callable) -> None:
    """sample_num texts of sample_length tokens (top-k 40, temperature 1, as the original),
    each from one random token of the data, written to samples/<run_name>/samples-<counter>."""
    from .engine import Request
    from .torch_generate import generate_tokens

    rng = np.random.default_rng([seed, counter])  # not the data stream: samples never change training
    x, n = windows.batch([int(rng.integers(len(windows)))])
    context = [int(x[0, rng.integers(n[0])])]
    requests = [Request(prompt=context, max_new_tokens=sample_length, temperature=1.0, top_k=40, seed=seed + counter, sample_index=i) for i in range(sample_num)]
    model.eval()
    try:
        results = generate_tokens(model, requests, batch_size=batch_size)
    finally:
        model.train()
    texts = [f"======== SAMPLE {i + 1} ========\n{enc.decode(context + r.tokens)}\n" for i, r in enumerate(results)]
    say(texts[-1])
    write_file(Path(SAMPLE_DIR) / run_name / f"samples-{counter}", "\n".join(texts))


def validate(model, val_windows, *, batch_size: int, device: torch.device, autocast: Callable) -> tuple[float, float]:
    """Mean token loss and perplexity on the fixed validation windows."""
    total, count = 0.0, 0
    tiles = val_windows.tiling(VAL_WINDOWS)
    model.eval()
    with torch.no_grad(), autocast():
        for i in range(0, len(tiles), batch_size * 4):
            x, lengths = val_windows.stack([val_windows.window(c, s) for c, s in tiles[i : i + batch_size * 4]])
            x, target = inputs_and_targets(torch.from_numpy(x), torch.from_numpy(lengths))
            total += model(x.to(device), targets=target.to(device)).item()
            count += int((target != IGNORE).sum())
    model.train()
    loss = total / count
    return loss, math.exp(min(loss, 700.0))
