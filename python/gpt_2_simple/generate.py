"""Text-level generation: gpt-2-simple's ``generate`` and ``generate_to_file`` on our engine.

The engine sees token ids only. This module turns prompts into engine requests and the generated
ids back into text with the original's rules, so existing scripts get the same kind of output:

- with a prefix, the text is the prefix followed by the generated text (``length`` counts the
  prefix's tokens, as in the original);
- ``truncate`` cuts each text at its first occurrence (after the prefix when
  ``include_prefix=False``, which then also drops the prefix);
- leading newlines are stripped; texts are printed, returned or written to a UTF-8 file with
  ``sample_delim`` after each one (no delimiter when ``nsamples == 1``).

What is better than the original (docs/generate.md): generation stops once ``truncate`` appears,
``length`` may exceed the context window, ``nsamples`` need not be a multiple of ``batch_size``,
``prefix`` may be a list (one prompt per sample), bad arguments raise ``ValueError`` naming the
argument, and with a seed the texts do not depend on ``batch_size``.

Never imports torch: generation runs on the exported flat binary (``export.engine_file``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from .fileio import atomic_write, run_folder
from .tokenizer import Encoder

__all__ = [
    "generate",
    "generate_to_file",
    "GenerateSettings",
    "SampleSpec",
    "GeneratedSample",
    "check_settings",
    "check_seed",
    "random_seed",
    "sample_text",
    "model_source",
    "load_engine",
    "InOrder",
    "generate_samples",
    "DEFAULT_DTYPE",
    "engine_choice",
]

log = logging.getLogger(__name__)

# bf16 halves the bytes read per token; decoding is bound by memory bandwidth, so it is the faster
# choice on CPU (and on GPUs); see docs/generate.md for the measurements.
DEFAULT_DTYPE = "bf16"
SEED_LIMIT = 2**64  # the engine keys its RNG with an unsigned 64-bit seed


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_settings(*, length, temperature, top_k, top_p, where: str = "", dashes: str = "") -> None:
    """Raise ``ValueError`` naming the first bad sampling argument (``where`` prefixes the message;
    ``dashes='--'`` names them as the command's flags)."""
    at = f"{where}: " if where else ""
    if not _is_int(length) or length < 0:
        raise ValueError(f"{at}{dashes}length must be an integer >= 0 (tokens per text, prefix included), got {length!r}")
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"{at}{dashes}temperature must be a number >= 0 (0 picks the most likely token), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"{at}{dashes}top_k must be an integer >= 0 (0 turns it off), got {top_k!r}")
    if not _is_number(top_p) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"{at}{dashes}top_p must be a number in [0, 1] (0 turns it off), got {top_p!r}")


def engine_choice(sess, backend: str | None, dtype: str | None) -> tuple[str, str]:
    """The (backend, dtype) a ``generate`` call asks for: the arguments, else ``sess.backend`` /
    ``sess.dtype`` when set, else "auto" / DEFAULT_DTYPE; ``ValueError`` naming a bad value."""
    from .engine import BACKENDS
    from .export import DTYPES

    backend = backend if backend is not None else getattr(sess, "backend", None) or "auto"
    dtype = dtype if dtype is not None else getattr(sess, "dtype", None) or DEFAULT_DTYPE
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))} ('auto': the GPU when one is usable), got {backend!r}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))} (the engine's weight type; bf16 is faster), got {dtype!r}")
    return backend, dtype


def check_seed(seed, where: str = "", dashes: str = "") -> None:
    at = f"{where}: " if where else ""
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise ValueError(f"{at}{dashes}seed must be " + ("" if dashes else "None or ") + f"an integer in [0, 2**64), got {seed!r}")


def random_seed() -> int:
    """A fresh seed for ``seed=None``: small enough to read back and type in again."""
    return random.SystemRandom().randrange(2**31)


@dataclass(frozen=True)
class GenerateSettings:
    """How the generated ids become text: the original's ``truncate`` and ``include_prefix``."""

    truncate: str | None = None
    include_prefix: bool = True


@dataclass(frozen=True)
class SampleSpec:
    """One text to generate. ``prompt`` None (or '') starts from ``<|endoftext|>`` as the original did.
    ``length`` counts the prompt's tokens, as the original's ``length`` did."""

    prompt: str | None
    length: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    sample_index: int  # with ``seed``, keys the engine's RNG: the text is independent of the batch


@dataclass(frozen=True)
class GeneratedSample:
    spec: SampleSpec
    text: str  # after the original's prefix / truncate / newline rules
    n_tokens: int  # generated tokens (prompt excluded)
    finish_reason: str  # "length" | "stop_sequence" | "stop_token"


def sample_text(enc: Encoder, prompt_tokens: Sequence[int], tokens: Sequence[int], prefix: str | None,
                settings: GenerateSettings) -> str:
    """The text the original produced for ``prompt_tokens`` followed by generated ``tokens``.

    With a prefix the original decoded the first prompt token on its own and the rest of the
    sequence in one piece (so a character split across that boundary reads as U+FFFD, as it did).
    """
    if prefix:
        text = enc.decode(prompt_tokens[:1]) + enc.decode([*prompt_tokens[1:], *tokens])
    else:
        text = enc.decode(tokens)
    truncate = settings.truncate
    if truncate:
        start = 0
        if prefix and not settings.include_prefix:
            # Text between the prefix's first occurrence and the next truncate; unchanged if either is missing.
            at = text.find(prefix)
            start = -1 if at < 0 else at + len(prefix)
        end = text.find(truncate, start) if start >= 0 else -1
        if end >= 0:
            text = text[start:end]
    return text.lstrip("\n")


def _stops_early(enc: Encoder, prompt_tokens: Sequence[int], prefix: str | None, settings: GenerateSettings) -> bool:
    """Whether stopping at ``truncate`` leaves the text as the full-length generation's. It does,
    except with include_prefix=False when the decoded prompt lacks the prefix (its first token
    splits a character): the original then looked for the prefix in the generated text too."""
    if not settings.truncate:
        return False
    if not prefix or settings.include_prefix:
        return True
    return prefix in enc.decode(prompt_tokens[:1]) + enc.decode(prompt_tokens[1:])


def model_source(sess, run_name: str = "run1", checkpoint_dir: str = "checkpoint", model_name: str | None = None,
                 model_dir: str = "models") -> Path:
    """Which weights to generate from: the session's checkpoint (after ``load_gpt2``/``finetune``),
    else the base model ``model_dir/model_name`` when ``model_name`` is given, else the newest
    checkpoint of ``checkpoint_dir/run_name`` (the original read the same folders)."""
    from .session import _model_folder
    from .weights import latest_checkpoint

    loaded = getattr(sess, "checkpoint", None)
    if loaded is not None:
        return Path(loaded.path)  # the one load_gpt2 picked, not necessarily the newest
    if getattr(sess, "source", None) is not None:
        return Path(sess.source)
    if model_name:
        return _model_folder(model_dir, model_name)
    folder = run_folder(checkpoint_dir, run_name)
    if latest_checkpoint(folder) is None:
        raise FileNotFoundError(
            f"no checkpoint in {folder}: fine-tune one first (gpt2.finetune / `gpt_2_simple finetune`), "
            "or pass the right run_name and checkpoint_dir (or model_name for a downloaded model)"
        )
    return folder


def load_engine(source: str | os.PathLike, *, sess=None, dtype: str | None = None, backend: str = "auto",
                threads: int | None = None) -> tuple[object, Encoder]:
    """The engine for ``source`` and the tokenizer embedded in its model file. The model is
    exported to the flat binary on first use (cached beside the checkpoint, rebuilt when the
    checkpoint changes); the loaded engine is kept in ``sess.cache`` between calls."""
    from .engine import Engine
    from .export import engine_file, read_tokenizer

    path = Path(engine_file(source, dtype=dtype or DEFAULT_DTYPE))
    if threads is None:
        threads = getattr(sess, "threads", None)
    if threads is not None and threads < 1:
        threads = None  # -1 (the session's default): every core
    stat = path.stat()
    key = (os.fspath(path.resolve()), stat.st_mtime_ns, stat.st_size, backend, threads)
    cache = getattr(sess, "cache", None)
    if cache is not None:
        if cache.get("engine_key") == key:
            return cache["engine"], cache["encoder"]
        cache.pop("engine", None)  # unmap the previous model before loading the next
    loaded = Engine(path, backend=backend, threads=threads), read_tokenizer(path)
    if cache is not None:
        cache.update(engine=loaded[0], encoder=loaded[1], engine_key=key)
    return loaded


def generate_samples(engine, enc: Encoder, specs: Sequence[SampleSpec], settings: GenerateSettings = GenerateSettings(),
                     *, batch_size: int = 1,
                     on_sample: Callable[[int, GeneratedSample], None] | None = None) -> list[GeneratedSample]:
    """Generate every spec in one engine call (continuous batching: a finished row's slot is
    refilled at once). ``on_sample(i, sample)`` runs as each one finishes, in finishing order;
    the returned list is in ``specs`` order. ``truncate`` is handed to the engine as a stop
    sequence, so a row stops as soon as its text can no longer change."""
    from .engine import Request

    n_ctx = engine.config.n_ctx
    encoded: dict[str | None, list[int]] = {}
    requests = []
    for i, spec in enumerate(specs):
        tokens = encoded.get(spec.prompt)
        if tokens is None:
            tokens = encoded[spec.prompt] = enc.encode(spec.prompt) if spec.prompt else [enc.eot_token]
            if len(tokens) > n_ctx:
                raise ValueError(
                    f"prefix is {len(tokens)} tokens, longer than the model's context of {n_ctx}: shorten it "
                    "(length may exceed the context; the prefix may not)"
                )
        # The original's length counted the prefix's tokens.
        new_tokens = spec.length - len(tokens) if spec.prompt else spec.length
        if new_tokens < 0:
            log.warning("prefix %r is %d tokens, more than length=%d: nothing is generated for it",
                        spec.prompt[:40], len(tokens), spec.length)
        requests.append(Request(
            prompt=tokens, max_new_tokens=max(0, new_tokens), temperature=float(spec.temperature),
            # The original's rule: a nonzero top_p overrides top_k.
            top_k=0 if spec.top_p > 0 else int(spec.top_k), top_p=float(spec.top_p),
            seed=int(spec.seed), sample_index=int(spec.sample_index),
            stop_sequences=[settings.truncate.encode("utf-8")] if _stops_early(enc, tokens, spec.prompt, settings) else [],
        ))

    samples: list[GeneratedSample | None] = [None] * len(specs)

    def finished(i: int, result) -> None:
        spec = specs[i]
        text = sample_text(enc, requests[i].prompt, result.tokens, spec.prompt, settings)
        samples[i] = GeneratedSample(spec, text, len(result.tokens), result.finish_reason)
        if on_sample is not None:
            on_sample(i, samples[i])

    if requests:
        engine.generate(requests, batch_size=max(1, min(batch_size, len(requests))), on_finish=finished)
    return samples


class InOrder:
    """Calls ``emit(i, item)`` for i = 0, 1, 2, ... as items arrive in any order."""

    def __init__(self, emit: Callable[[int, object], None], start: int = 0):
        self.emit, self.next, self.pending = emit, start, {}

    def __call__(self, i: int, item) -> None:
        self.pending[i] = item
        while self.next in self.pending:
            self.emit(self.next, self.pending.pop(self.next))
            self.next += 1


def _prompts(prefix, nsamples: int) -> list[str | None]:
    if prefix is None or isinstance(prefix, str):
        return [prefix or None] * nsamples
    prompts = list(prefix)
    if not prompts or not all(p is None or isinstance(p, str) for p in prompts):
        raise ValueError("prefix must be a string, None, or a non-empty list of strings (one per sample)")
    if nsamples not in (1, len(prompts)):
        raise ValueError(f"prefix is a list of {len(prompts)} prompts (one per sample): "
                         f"leave nsamples at 1 or set it to {len(prompts)}, got nsamples={nsamples}")
    return [p or None for p in prompts]


def generate(sess,
             run_name='run1',
             checkpoint_dir='checkpoint',
             model_name=None,
             model_dir='models',
             sample_dir='samples',
             return_as_list=False,
             truncate=None,
             destination_path=None,
             sample_delim='=' * 20 + '\n',
             prefix=None,
             seed=None,
             nsamples=1,
             batch_size=1,
             length=1023,
             temperature=0.7,
             top_k=0,
             top_p=0.0,
             include_prefix=True,
             *,
             backend=None,
             dtype=None):
    """Generate ``nsamples`` texts from the session's model (or ``run_name`` / ``model_name``).

    Texts are printed, or returned as a list (``return_as_list=True``), or written to
    ``destination_path`` (UTF-8), each followed by a newline and ``sample_delim``. ``prefix``
    starts every text (a list gives one prompt per sample); ``length`` counts the prefix's tokens
    and may exceed the model's context. ``truncate`` cuts each text at its first occurrence and
    stops generating it there. ``temperature`` 0 is greedy; ``top_k``/``top_p`` 0 are off, and a
    nonzero ``top_p`` overrides ``top_k``. With a ``seed`` the texts are reproducible and do not
    depend on ``batch_size``; without one a random seed is drawn (logged, and kept in
    ``sess.cache['seed']``). ``backend`` ("auto", "cpu", "cuda") and ``dtype`` ("bf16", "fp32":
    the engine's weight type) choose the engine; None takes ``sess.backend`` / ``sess.dtype`` when
    set, else "auto" and "bf16". ``sample_dir`` is unused, as in the original.
    """
    if batch_size is None:
        batch_size = 1
    for name, value in (("nsamples", nsamples), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    check_settings(length=length, temperature=temperature, top_k=top_k, top_p=top_p)
    check_seed(seed)
    backend, dtype = engine_choice(sess, backend, dtype)
    if truncate is not None and not isinstance(truncate, str):
        raise ValueError(f"truncate must be a string or None, got {truncate!r}")
    prompts = _prompts(prefix, nsamples)
    if seed is None:
        seed = random_seed()
        log.info("generate: seed=%d (pass seed=%d to reproduce these texts)", seed, seed)
    cache = getattr(sess, "cache", None)
    if cache is not None:
        cache["seed"] = seed

    source = model_source(sess, run_name, checkpoint_dir, model_name, model_dir)
    engine, enc = load_engine(source, sess=sess, dtype=dtype, backend=backend)
    specs = [SampleSpec(p, length, temperature, top_k, top_p, seed, i) for i, p in enumerate(prompts)]
    settings = GenerateSettings(truncate or None, bool(include_prefix))
    if len(prompts) == 1:
        sample_delim = ''

    printing = not return_as_list and not destination_path
    bar = tqdm(total=len(specs), unit="text", leave=False, disable=printing or len(specs) == 1)
    # The file is written beside its final name and renamed over it at the end: an error or a kill
    # half-way leaves the previous file whole, never a file holding some of the texts.
    files = contextlib.ExitStack()
    out = None

    def emit(i: int, sample: GeneratedSample) -> None:
        nonlocal out
        block = f"{sample.text}\n{sample_delim}"
        if destination_path:
            if out is None:
                out = files.enter_context(atomic_write(destination_path, "w"))
            out.write(block)
        elif printing:
            print(block, end="", flush=True)

    ordered = InOrder(emit)

    def on_sample(i: int, sample: GeneratedSample) -> None:
        bar.update(1)
        ordered(i, sample)

    try:
        with files:
            samples = generate_samples(engine, enc, specs, settings, batch_size=batch_size, on_sample=on_sample)
    finally:
        bar.close()
    if return_as_list:
        return [s.text for s in samples]


def generate_to_file(sess,
                     run_name='run1',
                     checkpoint_dir='checkpoint',
                     model_name=None,
                     model_dir='models',
                     truncate=None,
                     destination_path='gpt_2_gen_texts.txt',
                     sample_delim='=' * 20 + '\n',
                     prefix=None,
                     seed=None,
                     nsamples=1,
                     batch_size=1,
                     length=1023,
                     temperature=0.7,
                     top_k=0,
                     top_p=0.0,
                     include_prefix=True,
                     *,
                     backend=None,
                     dtype=None):
    """Generate the texts into ``destination_path`` (UTF-8, '\\n' line ends), each followed by
    ``sample_delim``: set it to '' when each text is a small document. Arguments as ``generate``."""
    generate(sess, run_name=run_name, checkpoint_dir=checkpoint_dir, model_name=model_name, model_dir=model_dir,
             return_as_list=False, truncate=truncate, destination_path=destination_path,
             sample_delim=sample_delim, prefix=prefix, seed=seed, nsamples=nsamples, batch_size=batch_size,
             length=length, temperature=temperature, top_k=top_k, top_p=top_p, include_prefix=include_prefix,
             backend=backend, dtype=dtype)
