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

The phases live in their own files: where a run starts, the run files and the checkpoints
(train_checkpoint.py); the model, optimizer and step (train_step.py); the log line, log files,
validation and samples (train_report.py). This file holds the arguments, the processes, the
interrupts and the loop that ties them together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as configs
from .dataset import Windows, WindowSampler, load_dataset, split_chunks
from .fileio import model_folder, run_folder
from .lean import OPTIMIZERS
from .malloc import reuse_freed_memory
from .tokenizer import BUNDLED_DIR, get_encoder
from .train_checkpoint import checkpoint_steps, load_start, prune, remove_for_overwrite, save_checkpoint, write_run_files
from .train_report import Reporter, TrainLog, generate_samples, validate
from .train_step import Stepper, use_bf16

__all__ = ["finetune", "checkpoint_steps", "OPTIMIZERS"]


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



# ----------------------------------------------------------------------------- the run


class _Trainer:
    """One ``finetune`` call in one process: set up (train_checkpoint.load_start, the Stepper, the
    data), then the loop of steps with its saves, samples and validations."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.run_dir = run_folder(self.checkpoint_dir, self.run_name)

    def run(self, sess) -> None:
        self.bf16 = use_bf16(self.mixed_precision, self.device)
        start = load_start(self.run_dir, self.restore_from, self.model_name, self.model_dir, self.say)
        if self.seed is None:
            self.seed = int(start.train_state["seed"]) if start.train_state else int(np.random.SeedSequence().entropy % (1 << 63))
            if self.dist.world > 1:  # one data stream for all processes: rank 0's seed
                shared = [self.seed]
                torch.distributed.broadcast_object_list(shared, src=0)
                self.seed = shared[0]
        self.config = start.config
        if self.dist.main:
            write_run_files(self.run_dir, start.config, self.model_dir, self.model_name)
        if self.dist.world > 1:
            torch.distributed.barrier()  # the others read the tokenizer files rank 0 just wrote
        if configs.ALIASES.get(self.model_name, self.model_name) in set(configs.PRETRAINED) - {"124M"}:
            self.say("For larger models, the recommended finetune() parameters are:\n\tuse_memory_saving_gradients = True\n\tonly_train_transformer_layers = True\n\taccumulate_gradients = 1\n")

        self.stepper = Stepper(
            start, seed=self.seed, device=self.device, dist=self.dist, bf16=self.bf16,
            optimizer=self.optimizer, learning_rate=self.learning_rate, batch_size=self.batch_size,
            accumulate_gradients=self.accumulate_gradients, optimizer_in_backward=self.optimizer_in_backward,
            use_memory_saving_gradients=self.use_memory_saving_gradients, only_train_transformer_layers=self.only_train_transformer_layers,
            compile=self.compile, say=self.say,
        )
        self._load_data(start.config, start.train_state)

        resumed = self.restore_from == "latest" and start.step > 0
        self.saved: list[int] = [start.step] if resumed and start.step in checkpoint_steps(self.run_dir) else []
        if self.overwrite and self.restore_from == "latest" and self.dist.main:
            remove_for_overwrite(self.run_dir, start.step)
        self.log = TrainLog(self.run_dir, self.dist.main)
        self.log.open(start.step if resumed else None)
        if self.overwrite and self.restore_from == "latest":
            self.save(start.step)
        try:
            self._loop(start.step)
        finally:
            self.log.close()
        _attach(sess, self.run_dir, self.stepper.model)

    def _load_data(self, config, train_state: dict | None) -> None:
        """The training and validation windows and the sampler (with its saved state on a resume)."""
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

    def save(self, step: int) -> None:
        """A checkpoint of ``step`` (train_checkpoint.save_checkpoint), then retention and loss.png."""
        if not self.dist.main:
            return
        self.say("Saving", os.path.join(self.run_dir, f"model-{step}"))
        save_checkpoint(self.run_dir, step, model=self.stepper.model, config=self.config, optimizer_name=self.optimizer,
                        optimizer=self.stepper.opt, sampler=self.sampler, seed=self.seed)
        if step not in self.saved:
            self.saved.append(step)
        prune(self.run_dir, self.saved, self.max_checkpoints)
        self.log.plot()

    def _loop(self, start_step: int) -> None:
        stepper = self.stepper
        counter = start_step + 1
        counter_base = counter
        val_every = self.val_every or 100
        tokens_per_step = self.batch_size * self.dist.world * self.accumulate_gradients * (self.windows.length - 1)
        report = Reporter(self.log, self.steps, progress=self.progress, main=self.dist.main, say=self.say, tokens_per_step=tokens_per_step)
        stop = False

        def validation(step):
            if self.val_windows is not None and self.dist.main:
                report.validation(step, *validate(stepper.model, self.val_windows, batch_size=self.batch_size, device=self.device,
                                                  autocast=stepper.autocast))

        with _StopSignal() as signals, report:
            try:
                while True:
                    if stop:
                        report.write("interrupted")
                        self.save(counter - 1)
                        return
                    if self.steps > 0 and counter == counter_base + self.steps:
                        validation(counter - 1)
                        self.save(counter - 1)
                        return
                    if (counter - 1) % self.save_every == 0 and counter > 1 and counter - 1 not in self.saved:
                        self.save(counter - 1)
                    if (counter - 1) % self.sample_every == 0 and counter > 1 and self.dist.main:
                        generate_samples(stepper.model, self.windows, self.enc, seed=self.seed, counter=counter, sample_num=self.sample_num,
                                         sample_length=self.sample_length, batch_size=self.batch_size, run_name=self.run_name, say=self.say)
                    if (counter - 1) % val_every == 0 and counter > 1 and counter != counter_base:
                        validation(counter - 1)

                    step_start = time.time()
                    loss, stop = stepper.step(self.sampler, signals.requested)
                    report.step(counter, loss, time.time() - step_start, printed=counter % self.print_every == 0)
                    counter += 1
            except KeyboardInterrupt:  # a second Ctrl-C: stop now
                if stepper.updating:  # weights half updated: keep the last checkpoint instead
                    raise
                report.write("interrupted")
                if stepper.in_step:  # this step's windows were drawn but not used
                    self.sampler.set_state(stepper.sampler_before_step)
                self.save(stepper.global_step)
