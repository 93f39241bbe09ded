"""Model configurations: OpenAI's four GPT-2 sizes and small sizes for training from scratch.

Field names are those of OpenAI's ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head, n_layer),
so a config round-trips through the files the original wrote and read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

__all__ = [
    "GPT2Config",
    "HparamsError",
    "LIMITS",
    "PRETRAINED",
    "ALIASES",
    "SCRATCH",
    "get_config",
    "canonical_name",
    "is_pretrained",
    "known_names",
]


class HparamsError(ValueError):
    """A hyperparameter file (hparams.json, config.json, a checkpoint's metadata) is unreadable or
    out of the limits below."""


# Largest values read from a file (docs/weights.md, "Limits"): far above any GPT-2 (1558M: 48
# layers, 1600 wide, 25 heads, 1024 positions, 50257 tokens), low enough that nothing sized from
# them (the expected tensor list, a model built on them) can exhaust memory before the weights,
# which must be in the file, are checked against them.
LIMITS = {"n_vocab": 1 << 22, "n_ctx": 1 << 20, "n_embd": 1 << 16, "n_head": 1 << 10, "n_layer": 1 << 10}


@dataclass(frozen=True)
class GPT2Config:
    n_vocab: int = 50257  # V
    n_ctx: int = 1024  # longest sequence the position table covers
    n_embd: int = 768  # C
    n_head: int = 12  # NH
    n_layer: int = 12  # L

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{field.name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )

    @property
    def head_size(self) -> int:  # HS
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        """Parameter count (the head shares wte, so it adds nothing)."""
        C = self.n_embd
        per_layer = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
        return self.n_vocab * C + self.n_ctx * C + self.n_layer * per_layer + 2 * C

    def to_hparams(self) -> dict:
        """The dict written as ``hparams.json`` (OpenAI's keys)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_hparams(cls, hparams: dict) -> "GPT2Config":
        """Build from OpenAI ``hparams.json`` keys or HF ``config.json`` keys; unknown keys are ignored.
        Values beyond ``LIMITS`` are refused (HparamsError), as hparams usually come from a file."""
        if not isinstance(hparams, dict):
            raise HparamsError(f"model hyperparameters must be a JSON object like {{\"n_layer\": 12, ...}}, got {type(hparams).__name__}")
        hf_names = {"vocab_size": "n_vocab", "n_positions": "n_ctx"}
        values = {}
        for key, value in hparams.items():
            key = hf_names.get(key, key)
            if key in LIMITS:
                values[key] = value
        missing = {"n_embd", "n_head", "n_layer"} - values.keys()
        if missing:
            raise HparamsError(f"model hyperparameters lack {sorted(missing)}: got keys {sorted(map(str, hparams))[:20]}")
        for key, value in values.items():
            if isinstance(value, int) and not isinstance(value, bool) and value > LIMITS[key]:
                raise HparamsError(f"{key}={value} is beyond this package's limit of {LIMITS[key]} (docs/weights.md, \"Limits\"); "
                                   "the file is damaged or not a GPT-2's")
        try:
            return cls(**values)
        except ValueError as e:
            raise HparamsError(str(e)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GPT2Config":
        """Read ``hparams.json`` (or an HF ``config.json``); HparamsError names what is wrong."""
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_HPARAMS_BYTES + 1)
        except FileNotFoundError:
            raise FileNotFoundError(f"no model hyperparameters at {os.fspath(path)}") from None
        try:
            if len(raw) > _MAX_HPARAMS_BYTES:
                raise ValueError(f"larger than {_MAX_HPARAMS_BYTES} bytes")
            hparams = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise HparamsError(f"{os.fspath(path)} is not valid JSON ({type(e).__name__}: {e}); restore it from the model download") from None
        try:
            return cls.from_hparams(hparams)
        except HparamsError as e:
            raise HparamsError(f"{os.fspath(path)}: {e}; restore it from the model download") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hparams(), f, indent=2)
            f.write("\n")


_MAX_HPARAMS_BYTES = 1 << 20  # hparams.json is ~100 bytes, an HF config.json a few KB


# OpenAI's released sizes, named as the download bucket names them.
PRETRAINED: dict[str, GPT2Config] = {
    "124M": GPT2Config(n_embd=768, n_head=12, n_layer=12),
    "355M": GPT2Config(n_embd=1024, n_head=16, n_layer=24),
    "774M": GPT2Config(n_embd=1280, n_head=20, n_layer=36),
    "1558M": GPT2Config(n_embd=1600, n_head=25, n_layer=48),
}
# The names OpenAI first published (the original package's examples use them).
ALIASES: dict[str, str] = {"117M": "124M", "345M": "355M"}

# From-scratch sizes with GPT-2's vocabulary, for training on a CPU without downloading anything.
# wte dominates their parameter count (50257 x n_embd).
SCRATCH: dict[str, GPT2Config] = {
    "tiny": GPT2Config(n_ctx=256, n_embd=128, n_head=4, n_layer=4),  # 7.3M params: trains in minutes on 2 cores
    "mini": GPT2Config(n_ctx=512, n_embd=256, n_head=8, n_layer=6),  # 18M params
    "small": GPT2Config(n_ctx=1024, n_embd=512, n_head=8, n_layer=8),  # 51M params
}


def known_names() -> list[str]:
    return [*PRETRAINED, *ALIASES, *SCRATCH]


def canonical_name(name: str) -> str:
    """'117M' -> '124M'; other known names unchanged; unknown names raise ValueError."""
    name = ALIASES.get(name, name)
    if name not in PRETRAINED and name not in SCRATCH:
        raise ValueError(f"unknown model name {name!r}; choose one of: {', '.join(known_names())}")
    return name


def is_pretrained(name: str) -> bool:
    """True for OpenAI's released sizes (weights to download), False for from-scratch sizes."""
    return canonical_name(name) in PRETRAINED


def get_config(name: str) -> GPT2Config:
    name = canonical_name(name)
    return PRETRAINED.get(name) or SCRATCH[name]
