"""Weight files in, weight files out: every reader returns ``(GPT2Config, {name: np.ndarray})``.

Names are ``model.py``'s state-dict names (``wte.weight``, ``h.0.attn.c_attn.weight``, ...,
``ln_f.bias``); the four projection weights keep GPT-2's Conv1D layout ``(in, out)``. Arrays are
memory-mapped where the format allows (our safetensors, TensorFlow shards), so opening a model
reads only headers and indexes; pages are read when a tensor is used.

What ``load_weights(path)`` accepts:

- a run folder of ours (``checkpoint/run1``): the newest ``model-<step>.safetensors``;
- an OpenAI model folder (``models/124M``: ``model.ckpt.*``) or an original gpt-2-simple run
  folder (``model-<step>.index`` + data shard), read without TensorFlow;
- an HF folder or file: ``model.safetensors`` / ``pytorch_model.bin`` with ``config.json``;
- a single ``.safetensors`` / ``.bin`` file or a TensorFlow checkpoint prefix.

Only ``pytorch_model.bin`` needs torch (imported when one is read), and ``build_model``, which
turns a state into a PyTorch ``GPT2``. ``save_weights`` writes the safetensors format itself,
streaming each tensor into an atomically renamed file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import GPT2Config, HparamsError
from .fileio import atomic_write, confined
from .tf_checkpoint import TFCheckpoint, read_checkpoint_state

__all__ = [
    "Checkpoint",
    "WeightsFileError",
    "SAFETENSORS_LIMITS",
    "build_model",
    "expected_shapes",
    "find_checkpoint",
    "latest_checkpoint",
    "load_weights",
    "save_weights",
]

State = dict[str, np.ndarray]


class WeightsFileError(ValueError):
    """A safetensors file's header is damaged, hostile or beyond SAFETENSORS_LIMITS, or weights do
    not match their config. (TensorFlow checkpoints raise tf_checkpoint.TFCheckpointError and
    hyperparameter files config.HparamsError; all three are ValueErrors.)"""

# ---------------------------------------------------------------------------------------------
# What a GPT-2 with a given config holds.


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a GPT-2 with ``config`` and its shape (Conv1D weights are (in, out))."""
    V, C, L = config.n_vocab, config.n_embd, config.n_layer
    shapes = {"wte.weight": (V, C), "wpe.weight": (config.n_ctx, C)}
    per_layer = {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
    }  # fmt: skip
    for i in range(L):
        shapes.update({f"h.{i}.{name}": shape for name, shape in per_layer.items()})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def _check_state(config: GPT2Config, state: State, source: str, config_source: str) -> None:
    """Every expected tensor present, nothing else, each of the config's shape and a float dtype."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({_listing(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors ({_listing(unexpected)})")
        raise WeightsFileError(
            f"{source} does not hold a GPT-2 with n_layer={config.n_layer} (from {config_source}): "
            f"{'; '.join(parts)}. Check that the weights and {config_source} belong together"
        )
    for name, shape in expected.items():
        array = state[name]
        if tuple(array.shape) != shape:
            raise WeightsFileError(
                f"{source}: {name} has shape {tuple(array.shape)} but {config_source} ({_config_str(config)}) needs "
                f"{shape}. The hyperparameters do not belong to these weights: restore the right {config_source}"
            )
        if array.dtype.kind != "f":
            raise WeightsFileError(f"{source}: {name} has dtype {array.dtype}; GPT-2 weights are floating point")


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _config_str(config: GPT2Config) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.to_hparams().items())


# ---------------------------------------------------------------------------------------------
# Which file holds the weights ('latest' and named checkpoints).

_OUR_FILE = re.compile(r"^model-(\d+)\.safetensors$")
_STEP_SUFFIX = re.compile(r"-(\d+)$")
_FORMAT_PREFERENCE = {"safetensors": 0, "tf": 1, "torch": 2}  # among equal steps


@dataclass(frozen=True)
class Checkpoint:
    """One set of weights on disk: ``path`` is the file (or the TensorFlow prefix), ``step`` the
    global step it was saved at (None for released models), ``format`` one of "safetensors",
    "tf", "torch"."""

    path: Path
    format: str
    step: int | None

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.path.name


def _tf_step(prefix: Path) -> int | None:
    m = _STEP_SUFFIX.search(prefix.name)
    return int(m.group(1)) if m else None


def _all_checkpoints(folder: Path) -> list[Checkpoint]:
    """Every set of weights in the folder."""
    found = []
    for p in folder.glob("model-*.safetensors"):
        m = _OUR_FILE.match(p.name)
        if m:
            found.append(Checkpoint(p, "safetensors", int(m.group(1))))
    for index in folder.glob("*.index"):
        prefix = index.with_suffix("")
        found.append(Checkpoint(prefix, "tf", _tf_step(prefix)))
    if (folder / "model.safetensors").is_file():
        found.append(Checkpoint(folder / "model.safetensors", "safetensors", None))
    if (folder / "pytorch_model.bin").is_file():
        found.append(Checkpoint(folder / "pytorch_model.bin", "torch", None))
    return sorted(found, key=_order)


def _order(c: Checkpoint) -> tuple[int, int]:
    """Oldest first; at equal steps the preferred format last."""
    return (-1 if c.step is None else c.step, -_FORMAT_PREFERENCE[c.format])


def _tf_latest(folder: Path, found: list[Checkpoint]) -> list[Checkpoint]:
    """The TensorFlow checkpoint the folder's ``checkpoint`` file names, as
    ``tf.train.latest_checkpoint`` resolves it; when it names nothing that exists (the file was
    written on another machine, or lost), every TensorFlow checkpoint found, with a warning."""
    state = read_checkpoint_state(folder)
    if state is None:
        return found
    # By its last part only (it may be absolute, or relative to where TensorFlow ran): a file from
    # someone else must not make the engine-file cache read, write or delete in another folder.
    prefix = confined(folder, re.split(r"[/\\]", state[0])[-1], what=f"{folder / 'checkpoint'} names", single=True)
    if Path(f"{prefix}.index").is_file():
        return [Checkpoint(prefix, "tf", _tf_step(prefix))]
    if found:
        warnings.warn(
            f"{folder / 'checkpoint'} names {state[0]!r}, which is not in the folder; using the newest checkpoint there",
            stacklevel=3,
        )
    return found


def latest_checkpoint(folder: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint 'latest' means in ``folder`` (the highest step; a released model's weights
    when none has a step), or None when the folder holds no weights."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = _all_checkpoints(folder)
    tf = [c for c in found if c.format == "tf"]
    found = [c for c in found if c.format != "tf"] + _tf_latest(folder, tf)
    return max(found, key=_order, default=None)


def find_checkpoint(path: str | os.PathLike, checkpoint: str | int = "latest") -> Checkpoint:
    """Resolve what to load: ``path`` is a folder (then ``checkpoint`` is 'latest', a step number,
    or a name inside it such as 'model-500' or 'model-500.safetensors', as the original's
    ``load_gpt2(checkpoint=...)``), a weights file, or a TensorFlow checkpoint prefix."""
    path = Path(path)
    if not path.is_dir():
        if checkpoint != "latest":
            raise ValueError(f"checkpoint={checkpoint!r} needs a folder, but {os.fspath(path)} is not one")
        return _checkpoint_at(path)
    if checkpoint == "latest":
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"no model weights in {os.fspath(path)} (looked for model-<step>.safetensors, a TensorFlow checkpoint, "
                "model.safetensors, pytorch_model.bin): train a model there first or point at a downloaded model"
            )
        return found
    name = str(checkpoint)
    if name.isdigit():  # a step number
        name = f"model-{int(name)}"
    candidate = path / name  # an absolute name stays absolute, as in the original
    for option in (candidate, Path(f"{candidate}.safetensors")):
        if option.is_file() or Path(f"{option}.index").is_file():
            return _checkpoint_at(option)
    raise FileNotFoundError(
        f"no checkpoint {checkpoint!r} in {os.fspath(path)} (it holds: {', '.join(c.name for c in _all_checkpoints(path)) or 'none'}); pass one of those or 'latest'"
    )


def _checkpoint_at(path: Path) -> Checkpoint:
    """A file or TensorFlow prefix, classified by what is on disk."""
    if path.suffix == ".index" and path.is_file():
        path = path.with_suffix("")
    if Path(f"{path}.index").is_file():
        return Checkpoint(path, "tf", _tf_step(path))
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {os.fspath(path)}: the path does not exist")
    m = _OUR_FILE.match(path.name)
    if path.suffix == ".safetensors":
        return Checkpoint(path, "safetensors", int(m.group(1)) if m else None)
    if path.suffix in (".bin", ".pt", ".pth"):
        return Checkpoint(path, "torch", None)
    raise ValueError(
        f"{os.fspath(path)}: unknown weights format; give a .safetensors or pytorch_model.bin file, a TensorFlow "
        "checkpoint prefix (without .index), or a model/run folder"
    )


# ---------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header length, a JSON header, then the tensor bytes.

_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items() if k != "BF16"}
_ST_MAX_HEADER = 100 << 20  # the safetensors library's own limit
# Bounds on what a header may declare (docs/weights.md, "Limits"); GPT-2 1558M has 580 tensors.
SAFETENSORS_LIMITS = {"header_bytes": _ST_MAX_HEADER, "tensors": 100_000, "rank": 8, "metadata_bytes": 1 << 20}


def _is_count(x) -> bool:
    """A JSON integer >= 0 (not a float such as 2.0 or 2.5, not true/false)."""
    return type(x) is int and x >= 0


def _read_safetensors(path: Path) -> tuple[dict[str, str], State]:
    """(metadata, tensors mapped from the file); bfloat16 is widened to float32. Every problem is a
    WeightsFileError, whatever the header holds."""
    try:
        return _parse_safetensors(path)
    except (WeightsFileError, OSError):
        raise
    except (TypeError, KeyError, IndexError, OverflowError, RecursionError, ValueError, MemoryError, struct.error) as e:
        raise WeightsFileError(f"{os.fspath(path)}: unreadable safetensors header ({type(e).__name__}: {e}); "
                               "the file is damaged or incomplete, save or download it again") from None


def _parse_safetensors(path: Path) -> tuple[dict[str, str], State]:
    def damaged(problem: str) -> WeightsFileError:
        return WeightsFileError(f"{os.fspath(path)}: {problem}; the file is damaged or incomplete, save or download it again")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise damaged(f"only {size} bytes, too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(_ST_MAX_HEADER, size - 8):
            raise damaged(f"header length {header_len} does not fit the {size}-byte file (not safetensors, or truncated)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise damaged(f"unreadable header ({type(e).__name__}: {e})") from None
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else b""
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise damaged("__metadata__ is not a JSON object of strings")
    if sum(len(k) + len(v) for k, v in metadata.items()) > SAFETENSORS_LIMITS["metadata_bytes"]:
        raise damaged(f"__metadata__ holds more than {SAFETENSORS_LIMITS['metadata_bytes']} bytes")
    if len(header) > SAFETENSORS_LIMITS["tensors"]:
        raise damaged(f"the header lists {len(header)} tensors, more than the {SAFETENSORS_LIMITS['tensors']} allowed")
    start = 8 + header_len
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in _ST_DTYPES or not isinstance(info.get("shape"), list) \
                or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2:
            raise damaged(f"tensor {name!r} has an unreadable header entry {str(info)[:200]}")
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if len(shape) > SAFETENSORS_LIMITS["rank"] or not all(map(_is_count, shape)):
            raise damaged(f"tensor {name!r} has shape {str(shape)[:200]}: dimensions must be integers >= 0, at most {SAFETENSORS_LIMITS['rank']}")
        if not (_is_count(begin) and _is_count(end)):
            raise damaged(f"tensor {name!r} has data_offsets {info['data_offsets']}, which are not integers >= 0")
        if end - begin != math.prod(shape) * _ST_DTYPES[info["dtype"]].itemsize:
            raise damaged(f"tensor {name!r} of shape {tuple(shape)} and dtype {info['dtype']} has data_offsets {begin}..{end}")
        if start + end > size:
            raise damaged(f"tensor {name!r} ends at byte {start + end}, past the end of the {size}-byte file (truncated)")
        spans.append((begin, end, name))
    # As the safetensors library requires: the tensors tile the data exactly, no overlap, no gap.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap of {begin - position} bytes before it"
            raise damaged(f"tensor {name!r} at data bytes {begin}..{end} {what}")
        position = max(position, end)
    if start + position != size and spans:
        raise damaged(f"the tensors end at byte {start + position} but the file has {size} bytes")
    state: State = {}
    for begin, end, name in spans:
        info = header[name]
        dtype = _ST_DTYPES[info["dtype"]]
        array = np.frombuffer(data, dtype=dtype, count=math.prod(info["shape"]), offset=start + begin).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        state[name] = array
    return metadata, state


def _as_numpy(name: str, value) -> tuple[str, np.ndarray]:
    """(safetensors dtype name, C-contiguous array) for a numpy array or a torch tensor; torch
    itself is never imported (a tensor's own methods do the conversion)."""
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if array.dtype.newbyteorder("<") not in _ST_NAMES:
            raise ValueError(f"save_weights: {name} has dtype {array.dtype}, which safetensors cannot store")
        return _ST_NAMES[array.dtype.newbyteorder("<")], array.astype(array.dtype.newbyteorder("<"), copy=False)
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        tensor = value.detach().cpu().contiguous()
        if str(tensor.dtype) == "torch.bfloat16":  # numpy cannot hold bfloat16: store its bits
            return "BF16", tensor.view(dtype=_torch_int16()).numpy().view(np.uint16)
        return _as_numpy(name, tensor.numpy())
    raise TypeError(f"save_weights: {name} is a {type(value).__name__}; give numpy arrays or torch tensors")


def _torch_int16():
    import torch  # only reached with a torch tensor in hand, so torch is already imported

    return torch.int16


def save_weights(
    path: str | os.PathLike,
    state: dict,
    config: GPT2Config | None = None,
    metadata: dict | None = None,
) -> None:
    """Write ``state`` ({name: numpy array or torch tensor}) to one safetensors file, atomically:
    a crash leaves the old file or the complete new one. With ``config`` the state is checked
    against it and the config is stored in the metadata (key "config", OpenAI's hparams keys), so
    the file describes itself. ``metadata`` values are stored as strings (non-strings as JSON);
    "format" is set to "gpt_2_simple"."""
    path = Path(path)
    meta = {"format": "gpt_2_simple"}
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    arrays = {name: _as_numpy(name, value) for name, value in state.items()}
    if config is not None:
        as_read = {n: a if d != "BF16" else a.view(np.float16) for n, (d, a) in arrays.items()}  # float stand-in
        _check_state(config, as_read, os.fspath(path), "the config given")
        meta["config"] = json.dumps(config.to_hparams())
    header: dict = {"__metadata__": meta}
    offset = 0
    # widest items first (as the safetensors library does): every tensor then starts aligned
    arrays = dict(sorted(arrays.items(), key=lambda item: -item[1][1].dtype.itemsize))
    for name, (dtype, array) in arrays.items():
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, array in arrays.values():
            f.write(memoryview(array.reshape(-1)).cast("B"))


# ---------------------------------------------------------------------------------------------
# Name mapping from the other formats.

_TF_NAME = re.compile(
    r"^model/(?:(?P<emb>wte|wpe)|h(?P<layer>\d+)/(?P<module>ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)"
    r"/(?P<param>[gbw])|ln_f/(?P<lnf>[gb]))(?P<slot>/.+)?$"
)
_TF_PARAM = {"g": "weight", "b": "bias", "w": "weight"}


def _from_tf(prefix: Path, verify_crc: bool) -> State:
    """GPT-2's variables out of a TensorFlow checkpoint; optimizer slots (``.../Adam``,
    ``beta1_power``, ``global_step``, ...) are skipped."""
    ckpt = TFCheckpoint(prefix)
    state: State = {}
    for tf_name in ckpt.entries:
        m = _TF_NAME.match(tf_name)
        if not m:
            if tf_name.startswith("model/"):
                state[tf_name] = np.empty(0, np.float32)  # reported as unexpected by the shape check
            continue
        if m["slot"]:
            continue
        if m["emb"]:
            name = f"{m['emb']}.weight"
        elif m["lnf"]:
            name = f"ln_f.{_TF_PARAM[m['lnf']]}"
        else:
            name = f"h.{m['layer']}.{m['module'].replace('/', '.')}.{_TF_PARAM[m['param']]}"
        array = ckpt.tensor(tf_name, verify_crc=verify_crc)
        if m["param"] == "w" and array.ndim == 3 and array.shape[0] == 1:
            array = array[0]  # TF stored Conv1D weights as (1, in, out) 1x1 convolutions
        state[name] = array
    return state


_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older transformers saved


def _from_hf_names(state: State, source: str) -> State:
    """Drop the ``transformer.`` prefix, the mask buffers and a head tied to wte."""
    out: State = {}
    for name, array in state.items():
        name = name.removeprefix("transformer.")
        if name.endswith(_HF_BUFFERS):
            continue
        out[name] = array
    head = out.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in out and not np.array_equal(head, out["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them and an untied head is not supported")
    return out


def _read_torch(path: Path) -> State:
    import zipfile

    import torch

    try:
        # mmap needs torch's zip format; files saved before torch 1.6 (the hub's 2019 GPT-2 files) are not zips
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle, zip and weights_only errors all mean the same thing here
        raise ValueError(
            f"{os.fspath(path)} could not be read as a PyTorch state dict ({type(e).__name__}: {e}); only plain "
            "tensor state dicts load (weights_only=True); convert the file to safetensors"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{os.fspath(path)} holds a {type(loaded).__name__}, not a state dict of tensors")
    state: State = {}
    for name, tensor in loaded.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        state[name] = tensor.numpy()
    return state


# ---------------------------------------------------------------------------------------------
# Config beside the weights.

# HF options that change the computation away from GPT-2's; our model implements only GPT-2's.
_HF_GPT2_MATH = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
}


def _read_config(path: Path) -> GPT2Config:
    config = GPT2Config.from_file(path)  # HparamsError for anything unreadable or beyond config.LIMITS
    if path.name == "config.json":
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)  # read fine a moment ago
        for key, allowed in _HF_GPT2_MATH.items():
            if key in hf and not any(type(hf[key]) is type(a) and hf[key] == a for a in allowed):
                raise HparamsError(f"{os.fspath(path)}: {key}={repr(hf[key])[:100]} is not GPT-2's architecture, which is all this package runs")
        eps = hf.get("layer_norm_epsilon", 1e-5)
        if type(eps) not in (int, float) or not math.isclose(eps, 1e-5, rel_tol=1e-3):
            raise HparamsError(f"{os.fspath(path)}: layer_norm_epsilon={repr(eps)[:100]} differs from GPT-2's 1e-5, which is all this package runs")
    return config


def _find_config(ckpt: Checkpoint, metadata: dict[str, str]) -> tuple[GPT2Config, str]:
    """The config and where it came from: ``hparams.json`` or ``config.json`` beside the weights,
    or the config our own files carry; when both exist they must agree."""
    beside = next((p for p in (ckpt.folder / "hparams.json", ckpt.folder / "config.json") if p.is_file()), None)
    embedded = None
    if "config" in metadata:
        try:
            embedded = GPT2Config.from_hparams(json.loads(metadata["config"]))
        except (ValueError, RecursionError) as e:  # HparamsError and JSONDecodeError are ValueErrors
            raise HparamsError(f"{ckpt.path}: the config in its metadata is unreadable ({e}); the file is damaged") from None
    if beside is not None:
        config = _read_config(beside)
        if embedded is not None and embedded != config:
            raise HparamsError(
                f"{beside} ({_config_str(config)}) disagrees with the config stored in {ckpt.path.name} "
                f"({_config_str(embedded)}): restore {beside.name} from the run that wrote these weights"
            )
        return config, beside.name
    if embedded is not None:
        return embedded, f"the metadata of {ckpt.path.name}"
    raise FileNotFoundError(
        f"no hparams.json or config.json beside {ckpt.path}: copy the model's hparams.json (or HF config.json) "
        "into that folder"
    )


def load_weights(path: str | os.PathLike, *, verify_crc: bool = False) -> tuple[GPT2Config, State]:
    """Read GPT-2 weights from ``path`` (a run/model/HF folder, a file or a TensorFlow prefix)
    and check them against the config found beside them.

    Returns ``(config, {name: array})`` with ``model.py``'s names. ``verify_crc`` also checks
    TensorFlow's per-tensor CRC32C (reads every byte: 1-2.5 s for 124M on a 2-core VM); the index blocks'
    CRCs are always checked.
    """
    ckpt = find_checkpoint(path)
    metadata: dict[str, str] = {}
    if ckpt.format == "tf":
        state = _from_tf(ckpt.path, verify_crc)
    elif ckpt.format == "safetensors":
        metadata, state = _read_safetensors(ckpt.path)
        state = _from_hf_names(state, os.fspath(ckpt.path))
    else:
        state = _from_hf_names(_read_torch(ckpt.path), os.fspath(ckpt.path))
    config, config_source = _find_config(ckpt, metadata)
    _check_state(config, state, os.fspath(ckpt.path), config_source)
    return config, state


def build_model(config: GPT2Config, state: State):
    """A float32 PyTorch ``GPT2`` holding ``state`` (from ``load_weights``), in eval mode.

    The module is created on the meta device and the tensors assigned, so no random
    initialisation runs and each weight is copied once (out of the memory map)."""
    import torch

    from .model import GPT2

    with torch.device("meta"):
        model = GPT2(config)
    # torch.tensor copies: the arrays may be read-only maps, which torch.from_numpy warns about
    model.load_state_dict({name: torch.tensor(array, dtype=torch.float32) for name, array in state.items()}, assign=True)
    return model.eval()
