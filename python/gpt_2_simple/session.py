"""The session: what the original's ``tf.Session`` held, without TensorFlow.

Scripts written for the original keep working::

    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess)                # checkpoint/run1, newest checkpoint
    gpt2.generate(sess)

A ``Session`` records which weights are loaded (``source``, ``checkpoint``, ``config``,
``weights``: numpy arrays, memory-mapped where the format allows) and builds the PyTorch model
from them only when something asks for ``sess.model``; generation never does, so loading and
generating never import torch. ``sess.cache`` is where ``generate`` keeps its exported engine.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ALIASES, GPT2Config
from .fileio import model_folder, run_folder
from .weights import Checkpoint, build_model, find_checkpoint, latest_checkpoint, load_weights

__all__ = ["Session", "start_tf_sess", "start_session", "reset_session", "get_available_gpus", "load_gpt2"]


class Session:
    """Holds one loaded model for this process (the stand-in for the original's ``tf.Session``).

    Fields: ``source`` (the folder or file the weights came from, None before ``load_gpt2`` or
    ``finetune``), ``checkpoint`` (the ``weights.Checkpoint`` loaded: path, format, step),
    ``config`` (``GPT2Config``), ``weights`` (name -> numpy array), ``model`` (the PyTorch
    ``GPT2``, built on first access), ``threads`` (CPU threads for the engine and PyTorch; -1:
    all cores; ``cpu_threads`` resolves it), ``multi_gpu`` (as passed to ``load_gpt2``) and
    ``cache`` (a dict for the generate layer, emptied whenever the weights change).

    Usable as a context manager, like ``tf.Session``: leaving the block closes it.
    """

    def __init__(self, threads: int = -1):
        if not isinstance(threads, int) or isinstance(threads, bool):
            raise TypeError(f"threads must be an integer (-1 for all cores), got {threads!r}")
        self.threads = threads if threads > 0 else -1
        self.source: Path | None = None
        self.checkpoint: Checkpoint | None = None
        self.config: GPT2Config | None = None
        self.weights: dict | None = None
        self.multi_gpu = False
        self.cache: dict = {}
        self.closed = False
        self._model = None

    # -- loading ---------------------------------------------------------------------------

    def load(self, path: str | os.PathLike, checkpoint: str | int = "latest", *, verify_crc: bool = False) -> Checkpoint:
        """Load weights from ``path`` (a run, model or HF folder, a weights file or a TensorFlow
        prefix; ``checkpoint`` picks one in a folder, see ``weights.find_checkpoint``). The
        model is rebuilt from them on the next access to ``model``."""
        self._check_open()
        path = Path(path)
        ckpt = find_checkpoint(path, checkpoint)
        self.config, self.weights = load_weights(ckpt.path, verify_crc=verify_crc)
        self.source = path if path.is_dir() else ckpt.folder
        self.checkpoint = ckpt
        self._model = None
        self.cache.clear()
        return ckpt

    def attach(self, model, source: str | os.PathLike, checkpoint: Checkpoint | None = None) -> None:
        """Point the session at a model in memory (what ``finetune`` leaves behind): ``source``
        is its run folder, ``checkpoint`` the file it was last saved to (default: the latest
        there). ``weights`` becomes None: the model is the truth now."""
        self._check_open()
        self.source = Path(source)
        self.checkpoint = checkpoint if checkpoint is not None else latest_checkpoint(self.source)
        self.config = model.config
        self.weights = None
        self._model = model
        self.cache.clear()

    @property
    def model(self):
        """The PyTorch ``GPT2`` (float32, CPU, eval mode), built from ``weights`` on first use;
        this is the first thing that imports torch."""
        self._check_open()
        if self._model is None:
            if self.weights is None:
                raise RuntimeError("no model is loaded in this session: call gpt2.load_gpt2(sess) or gpt2.finetune(sess, ...) first")
            self._model = build_model(self.config, self.weights)
        return self._model

    @property
    def loaded(self) -> bool:
        return self.weights is not None or self._model is not None

    @property
    def cpu_threads(self) -> int:
        """``threads`` as a count: -1 becomes the cores this process may run on."""
        if self.threads > 0:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the weights, the model and anything cached; the session cannot be used again."""
        self.weights = self._model = self.config = self.checkpoint = self.source = None
        self.cache.clear()
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this session is closed: start a new one with gpt2.start_tf_sess()")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<Session closed>"
        if not self.loaded:
            return f"<Session threads={self.threads} (nothing loaded)>"
        where = self.checkpoint.path if self.checkpoint else self.source
        return f"<Session threads={self.threads} model={where} config={self.config}>"


def start_tf_sess(threads: int = -1, server=None) -> Session:
    """A new, empty session (the original returned a ``tf.Session``; ``threads`` > 0 caps the
    CPU threads used). ``server``, a TensorFlow distributed-runtime target, has no equivalent:
    passing one is an error (multi-GPU training is data-parallel through ``multi_gpu=True``)."""
    if server is not None:
        raise ValueError(
            "start_tf_sess(server=...) connected to a TensorFlow distributed server, which gpt_2_simple no longer "
            "uses: drop the server argument (for several GPUs pass multi_gpu=True to finetune)"
        )
    return Session(threads)


def start_session(threads: int = -1) -> Session:
    """A new, empty session: the clearer name for ``start_tf_sess``."""
    return Session(threads)


def reset_session(sess: Session, threads: int = -1, server=None) -> Session:
    """Close ``sess`` (freeing its model) and return a fresh session, as the original did."""
    if isinstance(sess, Session):
        sess.close()
    return start_tf_sess(threads, server)


def get_available_gpus() -> list[str]:
    """The CUDA devices PyTorch can use, as device names ('cuda:0', 'cuda:1', ...); empty
    without a GPU. (The original listed TensorFlow's '/device:GPU:N'.) Imports torch."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def _model_folder(model_dir: str, model_name: str) -> Path:
    """models/<name>, or the folder of the same model under its other name (117M <-> 124M)."""
    names = [model_name, ALIASES.get(model_name)] + [old for old, new in ALIASES.items() if new == model_name]
    for name in filter(None, names):
        folder = model_folder(model_dir, name)
        if latest_checkpoint(folder) is not None:
            return folder
    raise FileNotFoundError(
        f"no model in {os.path.join(model_dir, model_name)}: download it first with "
        f"gpt2.download_gpt2(model_name={model_name!r}, model_dir={model_dir!r})"
    )


def load_gpt2(
    sess: Session,
    checkpoint: str | int = "latest",
    run_name: str = "run1",
    checkpoint_dir: str = "checkpoint",
    model_name: str | None = None,
    model_dir: str = "models",
    multi_gpu: bool = False,
    reuse: bool = False,
) -> None:
    """Load a fine-tuned run (``checkpoint_dir/run_name``) or, with ``model_name``, a downloaded
    model (``model_dir/model_name``) into ``sess`` for generation, as the original did.

    ``checkpoint`` is 'latest' (the newest checkpoint in the folder) or one checkpoint: a name
    such as 'model-500' (or 'model-500.safetensors'), or a step number. Both our safetensors
    checkpoints and the original's TensorFlow ones load. ``multi_gpu`` is recorded on the
    session (generation runs on one device); ``reuse`` is accepted for compatibility: loading
    again simply replaces what the session held.
    """
    if not isinstance(sess, Session):
        raise TypeError(f"load_gpt2 needs the session from gpt2.start_tf_sess(), got {type(sess).__name__}")
    sess._check_open()
    if model_name:
        folder = _model_folder(model_dir, model_name)
    else:
        folder = run_folder(checkpoint_dir, run_name)
        if latest_checkpoint(folder) is None:
            raise FileNotFoundError(
                f"no checkpoint in {folder}: run gpt2.finetune(sess, ..., run_name={run_name!r}) first, or pass "
                "model_name='124M' to load a downloaded model"
            )
    ckpt = sess.load(folder, checkpoint)
    sess.multi_gpu = bool(multi_gpu)
    print("Loading pretrained model" if model_name else "Loading checkpoint", ckpt.path)
