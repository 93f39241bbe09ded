"""``finetune()``: the original's training loop in PyTorch, with exact resume, crash-safe saves,
clean interrupts, validation, logs and data-parallel training.

Observable behaviour kept from the original: the run folder ``checkpoint/<run_name>`` with the
tokenizer files, ``hparams.json`` and ``counter``; ``restore_from='latest'|'fresh'|<path>``;
``steps`` counts steps added to the run (the step number continues across resumes); the log
line ``[step | seconds] loss=x.xx avg=x.xx`` with the original's smoothed average; samples in
``samples/<run_name>/samples-<step>``; Ctrl-C saves a checkpoint and returns.

What differs, on purpose (docs/finetune.md): gradient accumulation averages the micro-batch
gradients (the original summed them); the optimizer and data-sampler state are saved so resuming
gives bitwise the weights of an uninterrupted run; ``use_memory_saving_gradients`` is activation
checkpointing and works with accumulation; ``multi_gpu`` is DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import config as configs
from .dataset import Windows, WindowSampler, load_dataset, split_chunks
from .fileio import atomic_write, model_folder, run_folder
from .head_loss import IGNORE
from .lean import OPTIMIZERS, build_optimizer, device_memory, plan
from .malloc import reuse_freed_memory
from .model import GPT2
from .plot import loss_png
from .tokenizer import BUNDLED_DIR, get_encoder
from .train_state import STATE_FILES, load_train_state, pickled_state_file, refuse_pickled, save_train_state, state_file
from .weights import build_model, latest_checkpoint, load_weights, save_weights

__all__ = ["finetune", "checkpoint_steps", "OPTIMIZERS"]

SAMPLE_DIR = "samples"  # relative to the working directory, as in the original
VAL_WINDOWS = 64  # validation loss is measured on at most this many fixed windows
_CHECKPOINT = re.compile(r"model-(\d+)\.safetensors")


# ----------------------------------------------------------------------------- run folder


def checkpoint_steps(folder: str | os.PathLike) -> list[int]:
    """Steps of the ``model-<step>.safetensors`` checkpoints in a run folder, ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)))


def _read_counter(folder: Path) -> int | None:
    try:
        return int((folder / "counter").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _write_atomic(path: Path, data: bytes | str) -> None:
    with atomic_write(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


# ----------------------------------------------------------------------------- processes


@dataclass
class _Dist:
    """This process's place in a data-parallel job (rank 0 of 1 when training alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_type: str) -> _Dist:
    """Join the process group torchrun (or our own launcher) describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as td

    owns = not td.is_initialized()
    if owns:
        td.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return _Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, nprocs: int, port: int, kwargs: dict) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from .session import start_tf_sess

    finetune(start_tf_sess(kwargs.pop("threads")), **kwargs)


def _launch(nprocs: int, kwargs: dict) -> None:
    """Run ``finetune(**kwargs)`` in ``nprocs`` data-parallel processes on this machine.

    Forked where possible (a user script without a ``__main__`` guard is not re-run); spawned when
    CUDA is already initialised here, which a forked child could not use.
    """
    import torch.multiprocessing as mp

    method = "spawn" if torch.cuda.is_initialized() or "fork" not in mp.get_all_start_methods() else "fork"
    mp.start_processes(_worker, args=(nprocs, _free_port(), kwargs), nprocs=nprocs, start_method=method)


# ----------------------------------------------------------------------------- interrupts


class _StopSignal:
    """Ctrl-C / SIGTERM ask the loop to stop at the end of the current step (a checkpoint is then
    saved and finetune returns); a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Log:
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
        _write_atomic(path, "".join(line + "\n" for line in kept))
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
        _write_atomic(self.folder / "loss.png", image)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.writer is not None:
                self.writer.close()


def _check_args(steps, batch_size, learning_rate, accumulate_gradients, sample_every, sample_length, sample_num, save_every, print_every, max_checkpoints, optimizer, val_fraction, val_every) -> None:
    def positive(name, value):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    for name, value in dict(batch_size=batch_size, accumulate_gradients=accumulate_gradients, sample_every=sample_every, sample_num=sample_num, save_every=save_every, print_every=print_every, max_checkpoints=max_checkpoints).items():
        positive(name, value)
    if not isinstance(sample_length, (int, np.integer)) or sample_length < 0:
        raise ValueError(f"sample_length must be >= 0, got {sample_length!r}")
    if steps == 0 or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be a positive integer, or -1 to train until interrupted; got {steps!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if val_every is not None:
        positive("val_every", val_every)


def _base_model(model_name: str, model_dir: str):
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


def _named_config(model_name: str, model_dir: str):
    """The config ``model_name`` stands for (its folder's hparams, or a known size), else None."""
    folder = Path(model_dir) / model_name
    for name in ("hparams.json", "config.json"):
        if (folder / name).is_file():
            return configs.GPT2Config.from_file(folder / name)
    with contextlib.suppress(ValueError):
        return configs.get_config(model_name)
    return None


def finetune(
    sess,
    dataset: str | os.PathLike | None,
    steps: int = -1,
    model_name: str = "124M",
    model_dir: str = "models",
    combine: int = 50000,
    batch_size: int = 1,
    learning_rate: float = 0.0001,
    accumulate_gradients: int = 5,
    restore_from: str = "latest",
    run_name: str = "run1",
    checkpoint_dir: str = "checkpoint",
    sample_every: int = 100,
    sample_length: int = 1023,
    sample_num: int = 1,
    multi_gpu: bool = False,
    save_every: int = 1000,
    print_every: int = 1,
    max_checkpoints: int = 1,
    use_memory_saving_gradients: bool = False,
    only_train_transformer_layers: bool = False,
    optimizer: str = "adam",
    overwrite: bool = False,
    reuse: bool = False,
    *,
    val_fraction: float = 0.0,
    val_every: int | None = None,
    mixed_precision: bool | str | None = None,
    compile: bool = False,
    seed: int | None = None,
    errors: str = "strict",
    device: str | None = None,
    progress: bool = True,
    optimizer_in_backward: bool | None = None,
) -> None:
    """Fine-tune a model on ``dataset`` and save it in ``checkpoint_dir/run_name``.

    ``dataset``: a text file, .csv, .npz, folder or glob (None: the bundled Shakespeare corpus).
    Parameters and defaults are the original's (see docs/finetune.md for each); ``steps`` is the
    number of steps to add (-1: until Ctrl-C / SIGTERM, which save a checkpoint and return).
    ``model_name`` is a downloaded model in ``model_dir`` or a from-scratch size ('tiny', 'mini',
    'small') trained with GPT-2's tokenizer. ``reuse`` (a TensorFlow graph option) has no effect.

    Keyword-only additions: ``val_fraction`` holds out the tail of the data and reports validation
    loss and perplexity every ``val_every`` steps (default 100) and at the end; ``mixed_precision``
    (bf16 autocast; default on for CUDA); ``compile`` (torch.compile); ``seed`` (data order,
    initialisation and samples; random when None and saved for resumes); ``errors`` for undecodable
    text ('strict', 'ignore', 'replace'); ``device`` ('cuda'/'cpu', default the GPU when present);
    ``progress`` (progress bars); ``optimizer_in_backward`` (update each weight in the backward
    pass, so whole-model gradients never exist; None: when the model would not fit otherwise,
    which also turns on ``use_memory_saving_gradients``; docs/finetune.md "Big models").

    On return the session holds the trained model, so ``generate(sess)`` uses it.
    """
    _check_args(steps, batch_size, learning_rate, accumulate_gradients, sample_every, sample_length, sample_num, save_every, print_every, max_checkpoints, optimizer, val_fraction, val_every)
    run_folder(checkpoint_dir, run_name)  # a name that would leave its folder is refused here, before any work
    model_folder(model_dir, model_name)
    if restore_from not in ("latest", "fresh") and not os.path.exists(restore_from):
        raise FileNotFoundError(f"restore_from={restore_from!r}: no such checkpoint; use 'latest', 'fresh' or a checkpoint path")
    if dataset is None:
        dataset = str(BUNDLED_DIR / "shakespeare.txt")
        print(f"No dataset given: training on the bundled Shakespeare corpus ({dataset})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = getattr(sess, "threads", -1)
    if multi_gpu and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if n_gpus > 1:
            kwargs = {k: v for k, v in locals().items() if k in _LAUNCH_ARGS}
            print(f"multi_gpu: training data-parallel on {n_gpus} GPUs")
            _launch(n_gpus, {**kwargs, "device": "cuda", "threads": threads})
            _attach(sess, Path(checkpoint_dir) / run_name)
            return
        print("multi_gpu: fewer than 2 GPUs visible; training in one process")
    dist = _setup_distributed(device.type)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if threads and threads > 0:
        torch.set_num_threads(threads)
    say = print if dist.main else (lambda *a, **k: None)
    try:
        # On the CPU every step would otherwise map, fault in and unmap its large tensors anew.
        # The trainer (its optimizer state, gradients) is gone before the block gives memory back.
        with reuse_freed_memory() if device.type == "cpu" else contextlib.nullcontext():
            _Trainer(**{k: v for k, v in locals().items() if k in _TRAINER_ARGS}).run(sess)
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


# finetune's parameters a launched worker receives (all but the session).
_LAUNCH_ARGS = {
    "dataset", "steps", "model_name", "model_dir", "combine", "batch_size", "learning_rate", "accumulate_gradients",
    "restore_from", "run_name", "checkpoint_dir", "sample_every", "sample_length", "sample_num", "save_every",
    "print_every", "max_checkpoints", "use_memory_saving_gradients", "only_train_transformer_layers", "optimizer",
    "overwrite", "val_fraction", "val_every", "mixed_precision", "compile", "seed", "errors", "progress",
    "optimizer_in_backward",
}
_TRAINER_ARGS = _LAUNCH_ARGS | {"device", "dist", "say"}


def _attach(sess, run_dir: Path, model=None) -> None:
    """Point the session at the trained run (the original's finetune left its graph loaded)."""
    if sess is None:
        return
    if model is None:  # trained in other processes: load what they saved
        sess.load(run_dir)
    else:
        sess.attach(model.float().cpu().eval(), run_dir)  # the session's model lives on the CPU


def _inputs_and_targets(x, lengths):
    """Windows (N, L) with their lengths -> model inputs (N, L-1) and next-token targets (N, L-1),
    IGNORE (-100, left out of the loss) past each window's end."""
    target = x[:, 1:].clone()
    target[torch.arange(target.shape[1])[None, :] >= (lengths - 1)[:, None]] = IGNORE
    return x[:, :-1], target


class _Trainer:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.run_dir = run_folder(self.checkpoint_dir, self.run_name)

    # --------------------------------------------------------------- model and state

    def _load_start(self):
        """Config, weights (numpy dict or None for a fresh init), the step to continue from, and
        the saved training state (exact resume) when restoring this run's latest checkpoint."""
        restore = self.restore_from
        if restore == "latest":
            latest = latest_checkpoint(self.run_dir)
            if latest is not None:
                config, state = load_weights(latest.path)
                step = latest.step if latest.step is not None else (_read_counter(self.run_dir) or 0)
                expected = _named_config(self.model_name, self.model_dir)
                if expected is not None and config != expected:
                    raise ValueError(
                        f"{self.run_dir} holds a model of another size ({config}) than model_name={self.model_name!r}; "
                        "pass the model_name it was trained from, another run_name, or restore_from='fresh'"
                    )
                train_state = None
                if latest.format == "safetensors":
                    if state_file(self.run_dir, step).is_file():
                        train_state = load_train_state(state_file(self.run_dir, step))
                    elif pickled_state_file(self.run_dir, step).is_file():
                        raise refuse_pickled(pickled_state_file(self.run_dir, step), latest.path)
                self.say("Loading checkpoint", latest.path)
                return config, state, step, train_state
        if restore not in ("latest", "fresh"):
            config, state = load_weights(restore)
            self.say("Loading checkpoint", restore)
            return config, state, 0, None
        base_dir, base_config = _base_model(self.model_name, self.model_dir)
        if base_dir is not None:
            config, state = load_weights(base_dir)
            self.say("Loading pretrained model", base_dir)
            return config, state, 0, None
        self.say(f"Initialising a new '{self.model_name}' model from scratch ({base_config.n_params() / 1e6:.1f}M parameters)")
        return base_config, None, 0, None

    def _write_run_files(self, config) -> None:
        """hparams.json and the tokenizer files, as the original copied them into the run; temporary
        files left by a process killed mid-save are removed."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for p in self.run_dir.glob(".*.tmp"):  # fileio.atomic_write's ".<name>.<random>.tmp"
            p.unlink()
        _write_atomic(self.run_dir / "hparams.json", json.dumps(config.to_hparams(), indent=2) + "\n")
        base = Path(self.model_dir) / self.model_name
        for name in ("encoder.json", "vocab.bpe"):
            source = base / name if (base / name).is_file() else BUNDLED_DIR / name
            if (self.run_dir / name).resolve() != source.resolve():
                _write_atomic(self.run_dir / name, source.read_bytes())

    # --------------------------------------------------------------- saving

    def save(self, step: int) -> None:
        """Training state, then weights, then counter, each atomically: a checkpoint's weights
        never exist without its state, and a kill at any moment leaves the previous one whole."""
        if not self.dist.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.say("Saving", os.path.join(self.run_dir, f"model-{step}"))
        save_train_state(
            state_file(self.run_dir, step), step=step, seed=self.seed, optimizer_name=self.optimizer,
            optimizer=self.opt.state_dict(), sampler=self.sampler.state(), torch_rng=torch.get_rng_state(),
        )
        weights = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        save_weights(self.run_dir / f"model-{step}.safetensors", weights, self.config, {"format": "gpt_2_simple", "step": str(step)})
        _write_atomic(self.run_dir / "counter", f"{step}\n")
        if step not in self.saved:
            self.saved.append(step)
        self._prune()
        self.log.plot()

    def _prune(self) -> None:
        """Keep the newest ``max_checkpoints``: this call's saves count as newer than the ones the
        folder held before, and older checkpoints numbered above the newest save (left by a run this
        one restarted) go, since the highest step is what 'latest' loads."""
        newest = self.saved[-1]
        earlier = [s for s in checkpoint_steps(self.run_dir) if s not in self.saved]
        order = [s for s in earlier if s <= newest] + self.saved
        drop = order[: -self.max_checkpoints] + [s for s in earlier if s > newest]
        for s in drop:
            for name in (f"model-{s}.safetensors", *(f.format(step=s) for f in STATE_FILES)):
                with contextlib.suppress(FileNotFoundError):
                    (self.run_dir / name).unlink()

    # --------------------------------------------------------------- samples and validation

    def generate_samples(self, counter: int) -> None:
        """sample_num texts of sample_length tokens (top-k 40, temperature 1, as the original),
        each from one random token of the data, written to samples/<run_name>/samples-<counter>."""
        from .engine import Request
        from .torch_generate import generate_tokens

        rng = np.random.default_rng([self.seed, counter])  # not the data stream: samples never change training
        x, n = self.windows.batch([int(rng.integers(len(self.windows)))])
        context = [int(x[0, rng.integers(n[0])])]
        requests = [Request(prompt=context, max_new_tokens=self.sample_length, temperature=1.0, top_k=40, seed=self.seed + counter, sample_index=i) for i in range(self.sample_num)]
        self.model.eval()
        try:
            results = generate_tokens(self.model, requests, batch_size=self.batch_size)
        finally:
            self.model.train()
        texts = [f"======== SAMPLE {i + 1} ========\n{self.enc.decode(context + r.tokens)}\n" for i, r in enumerate(results)]
        self.say(texts[-1])
        _write_atomic(Path(SAMPLE_DIR) / self.run_name / f"samples-{counter}", "\n".join(texts))

    def validate(self) -> tuple[float, float]:
        """Mean token loss and perplexity on the fixed validation windows."""
        total, count = 0.0, 0
        tiles = self.val_windows.tiling(VAL_WINDOWS)
        self.model.eval()
        with torch.no_grad(), self.autocast():
            for i in range(0, len(tiles), self.batch_size * 4):
                x, lengths = self.val_windows.stack([self.val_windows.window(c, s) for c, s in tiles[i : i + self.batch_size * 4]])
                x, target = _inputs_and_targets(torch.from_numpy(x), torch.from_numpy(lengths))
                total += self.model(x.to(self.device), targets=target.to(self.device)).item()
                count += int((target != IGNORE).sum())
        self.model.train()
        loss = total / count
        return loss, math.exp(min(loss, 700.0))

    # --------------------------------------------------------------- training

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, stop_requested: bool) -> tuple[float, bool]:
        """One optimizer step over batch_size x accumulate_gradients windows per process; returns
        the mean token loss over all processes, and whether any process was asked to stop."""
        b, world, accum = self.batch_size, self.dist.world, self.accumulate_gradients
        self.sampler_before_step = self.sampler.state()
        # Every process draws the same global batch and takes its share, so the data (and the
        # result) depend only on the total batch, not on how many processes share it.
        x, lengths = self.sampler.sample(b * world * accum)
        n_targets = int((lengths - 1).sum())
        inputs, target = _inputs_and_targets(torch.from_numpy(x), torch.from_numpy(lengths))
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
        self.updating = False
        self.in_step = False
        self.opt.zero_grad(set_to_none=True)
        if world > 1:
            packed = torch.stack([loss_sum, torch.tensor(float(stop_requested), dtype=torch.float64, device=self.device)])
            torch.distributed.all_reduce(packed)
            loss_sum, stop_requested = packed[0], bool(packed[1].item() > 0)
        return float(loss_sum) / n_targets, stop_requested  # the one host sync of the step

    def _plan_memory(self, config, model, params) -> None:
        """Step in backward and checkpointing: as asked, or chosen by lean.plan for this device."""
        if self.optimizer_in_backward and (self.dist.world > 1 or self.compile):
            raise ValueError("optimizer_in_backward=True works in one process without compile: DDP reduces gradients after the "
                             "step would have used them; leave it None (automatic) or drop multi_gpu/compile")
        choice = plan(config, sum(p.numel() for p in model.parameters()), [p.shape for p in params], optimizer=self.optimizer,
                      batch_size=self.batch_size, accumulate=self.accumulate_gradients, in_backward=self.optimizer_in_backward,
                      checkpointing=bool(self.use_memory_saving_gradients), available=device_memory(self.device),
                      can_step_in_backward=self.dist.world == 1 and not self.compile)
        for note in choice.notes:
            self.say(f"Memory: {note}")
        self.in_backward = choice.in_backward
        model.gradient_checkpointing = choice.checkpointing

    def run(self, sess) -> None:
        if self.mixed_precision in (None, "auto"):
            self.bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        elif self.mixed_precision in (True, "bf16"):
            self.bf16 = True
        elif self.mixed_precision in (False, "fp32", "no"):
            self.bf16 = False
        else:
            raise ValueError(f"mixed_precision must be None, True/'bf16' or False, got {self.mixed_precision!r}")

        config, state, start_step, train_state = self._load_start()
        if self.seed is None:
            self.seed = int(train_state["seed"]) if train_state else int(np.random.SeedSequence().entropy % (1 << 63))
            if self.dist.world > 1:  # one data stream for all processes: rank 0's seed
                shared = [self.seed]
                torch.distributed.broadcast_object_list(shared, src=0)
                self.seed = shared[0]
        self.config = config
        if self.dist.main:
            self._write_run_files(config)
        if self.dist.world > 1:
            torch.distributed.barrier()  # the others read the tokenizer files rank 0 just wrote
        if configs.ALIASES.get(self.model_name, self.model_name) in set(configs.PRETRAINED) - {"124M"}:
            self.say("For larger models, the recommended finetune() parameters are:\n\tuse_memory_saving_gradients = True\n\tonly_train_transformer_layers = True\n\taccumulate_gradients = 1\n")

        torch.manual_seed(self.seed)
        self.model = model = GPT2(config) if state is None else build_model(config, state)
        del state
        model.to(self.device).train()
        if self.only_train_transformer_layers:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("h."))
        params = [p for p in model.parameters() if p.requires_grad]
        self._plan_memory(config, model, params)
        self.opt = build_optimizer(self.optimizer, params, self.learning_rate, self.device.type, in_backward=self.in_backward)
        if train_state is not None and train_state.get("optimizer_name") == self.optimizer:
            self.opt.load_state_dict(train_state["optimizer"])
            for group in self.opt.param_groups:
                group["lr"] = self.learning_rate  # this call's learning rate, not the saved one
        elif train_state is not None:
            self.say(f"Optimizer changed from {train_state.get('optimizer_name')} to {self.optimizer}: starting it fresh")
        self.ddp = None
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_model = self.ddp or model
        if self.compile:
            self.train_model = torch.compile(self.train_model)

        self.say("Loading dataset...")
        self.enc = get_encoder(self.run_dir)
        chunks = load_dataset(self.enc, self.dataset, self.combine, errors=self.errors, progress=self.progress and self.dist.main)
        top = max((int(c.max()) for c in chunks if len(c)), default=0)
        if top >= config.n_vocab:
            raise ValueError(f"the dataset holds token id {top}, outside this model's vocabulary of {config.n_vocab}: encode it with the model's own tokenizer")
        train_chunks, val_chunks = split_chunks(chunks, self.val_fraction)
        self.windows = Windows(train_chunks, config.n_ctx + 1)
        self.val_windows = Windows(val_chunks, config.n_ctx + 1) if val_chunks else None
        if self.val_fraction and self.val_windows is None:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no validation tokens: use a larger fraction or more data")
        self.sampler = WindowSampler(self.windows, self.seed)
        if train_state is not None:
            self.sampler.set_state(train_state["sampler"])
            torch.set_rng_state(train_state["torch_rng"])
        self.say("dataset has", sum(len(c) for c in chunks), "tokens")
        if self.windows.length < config.n_ctx + 1:
            self.say(f"The dataset is shorter than the model's {config.n_ctx}-token context: training on {self.windows.length - 1}-token windows")
        self.say("Training...")

        self.updating = self.in_step = False
        self.global_step = start_step
        resumed = self.restore_from == "latest" and start_step > 0
        self.saved: list[int] = [start_step] if resumed and start_step in checkpoint_steps(self.run_dir) else []
        if self.overwrite and self.restore_from == "latest" and self.dist.main:
            # The original removed the run's old checkpoints and event files, then saved.
            for p in list(self.run_dir.iterdir()):
                m = _CHECKPOINT.fullmatch(p.name) or re.fullmatch(r"train_state-(\d+)\.(?:safetensors|pt)", p.name)
                if p.name.startswith("events") or (m and int(m.group(1)) != start_step):
                    p.unlink()
        self.log = _Log(self.run_dir, self.dist.main)
        self.log.open(start_step if resumed else None)
        if self.overwrite and self.restore_from == "latest":
            self.save(start_step)
        try:
            self._loop(start_step)
        finally:
            self.log.close()
        _attach(sess, self.run_dir, model)

    def _loop(self, start_step: int) -> None:
        counter = start_step + 1
        counter_base = counter
        val_every = self.val_every or 100
        tokens_per_step = self.batch_size * self.dist.world * self.accumulate_gradients * (self.windows.length - 1)
        avg_loss = (0.0, 0.0)
        start_time = time.time()
        bar = tqdm(total=self.steps, unit="step", disable=not (self.progress and self.dist.main and self.steps > 0), dynamic_ncols=True)
        write = bar.write if not bar.disable else self.say
        stop = False

        def validate(step):
            if self.val_windows is not None and self.dist.main:
                val_loss, ppl = self.validate()
                write(f"[{step} | {time.time() - start_time:.2f}] val_loss={val_loss:.2f} val_ppl={ppl:.2f}")
                self.log.write({"step": step, "val_loss": val_loss, "val_ppl": ppl, "time": time.time() - start_time})

        with _StopSignal() as signals, bar:
            try:
                while True:
                    if stop:
                        write("interrupted")
                        self.save(counter - 1)
                        return
                    if self.steps > 0 and counter == counter_base + self.steps:
                        validate(counter - 1)
                        self.save(counter - 1)
                        return
                    if (counter - 1) % self.save_every == 0 and counter > 1 and counter - 1 not in self.saved:
                        self.save(counter - 1)
                    if (counter - 1) % self.sample_every == 0 and counter > 1 and self.dist.main:
                        self.generate_samples(counter)
                    if (counter - 1) % val_every == 0 and counter > 1 and counter != counter_base:
                        validate(counter - 1)

                    step_start = time.time()
                    loss, stop = self.train_step(signals.requested)
                    elapsed = time.time() - step_start
                    bar.update(1)
                    if counter % self.print_every == 0:
                        avg_loss = (avg_loss[0] * 0.99 + loss, avg_loss[1] * 0.99 + 1.0)
                        avg = avg_loss[0] / avg_loss[1]
                        write(f"[{counter} | {time.time() - start_time:2.2f}] loss={loss:2.2f} avg={avg:2.2f}")
                        bar.set_postfix(loss=f"{loss:.2f}", avg=f"{avg:.2f}")
                        self.log.write({"step": counter, "loss": loss, "avg": avg, "time": time.time() - start_time, "tokens_per_s": tokens_per_step / max(elapsed, 1e-9)})
                    counter += 1
            except KeyboardInterrupt:  # a second Ctrl-C: stop now
                if self.updating:  # weights half updated: keep the last checkpoint instead
                    raise
                write("interrupted")
                if self.in_step:  # this step's windows were drawn but not used
                    self.sampler.set_state(self.sampler_before_step)
                self.save(self.global_step)
