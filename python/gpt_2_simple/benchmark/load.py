"""Model load time: our engine and C++ loader opening an export of the model, against the ways people
load the same weights elsewhere, interleaved in one sitting, each case in its own worker process
(so its peak RSS is its own). Timed, each a whole call as the user waits for it:

- ``engine-bf16`` / ``engine-fp32``: ``Engine(path)``, ready to generate (mmap, checks, weights
  repacked for the kernels);
- ``open-*``: ``_engine.ModelFile(path)``: mmap + every structural check + the header checksum;
  ``-cold`` after evicting the file (a copy) from the page cache; ``-verify`` plus every tensor's
  CRC-32 (reads the whole file);
- ``load_weights``: ``weights.load_weights`` on the safetensors file (mmap, lazy, like ours);
- peers: ``safetensors.numpy.load_file`` (reads every tensor) and transformers'
  ``GPT2LMHeadModel.from_pretrained`` on the same HuggingFace folder.
Page cache warm except for ``-cold``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

from .common import Options, Worker, case_records, log, run_peers

SUITE = "load"
COMPARE_TO = ("transformers", "safetensors")


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def loader(kind: str, path: str, threads: int | None):
    """Worker side: a callable that loads ``path`` one way and drops it, timing the load only."""
    if kind == "engine":
        from ..engine import Engine

        def load():
            return Engine(path, backend="cpu", threads=threads)
    elif kind in ("open", "open-cold", "open-verify"):
        from .. import _engine

        def load():
            return _engine.ModelFile(path, verify=kind == "open-verify")
    elif kind == "load_weights":
        from ..weights import load_weights

        def load():
            return load_weights(path)
    elif kind == "safetensors":
        import safetensors.numpy

        def load():
            return safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    elif kind == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()

        def load():
            return transformers.GPT2LMHeadModel.from_pretrained(path)
    else:
        raise ValueError(f"unknown loader {kind!r}")

    def run() -> dict:
        if kind == "open-cold":
            _evict(path)
        start = time.perf_counter()
        loaded = load()
        seconds = time.perf_counter() - start
        del loaded
        return {"seconds": seconds}

    return run


def cases(opts: Options) -> dict[str, tuple[str, Path]]:
    """Case name -> (loader kind, path)."""
    models = opts.models
    out = {"engine-bf16": ("engine", models.engine("bf16")), "open-bf16": ("open", models.engine("bf16"))}
    if not opts.quick:
        cold = models.folder / "model.fp32.cold.bin"  # a copy: evicting it leaves the other files warm
        if not cold.exists():
            shutil.copyfile(models.engine("fp32"), cold)
        out.update({"engine-fp32": ("engine", models.engine("fp32")), "open-fp32": ("open", models.engine("fp32")),
                    "open-fp32-cold": ("open-cold", cold), "open-fp32-verify": ("open-verify", models.engine("fp32")),
                    "open-bf16-verify": ("open-verify", models.engine("bf16"))})
    out.update({"load_weights": ("load_weights", models.hf()), "safetensors": ("safetensors", models.hf())})
    if importlib.util.find_spec("transformers") is not None:
        out["transformers"] = ("transformers", models.hf())
    else:
        opts.note("transformers is not installed: load times compare with safetensors only (pip install transformers)")
    return out


def measure(opts: Options, *, transformers: bool = True) -> list[dict]:
    """One record per case (``--quick``: Engine and open in bf16, load_weights, the peers)."""
    chosen = cases(opts)
    if not transformers:
        chosen.pop("transformers", None)
    log(f"{SUITE}: {opts.model} geometry, cases {', '.join(chosen)}")
    workers = {}
    try:
        for name, (kind, path) in chosen.items():
            workers[name] = Worker(f"{__name__}:loader", name=name, threads=opts.threads, kind=kind, path=str(path))
        replies, peaks, load = run_peers(workers, opts.reps, label=SUITE, rate=lambda r: f"{1e3 * r['seconds']:.1f} ms")
    finally:
        for w in workers.values():
            w.close()
    sizes = {name: (path.stat().st_size if path.is_file() else (path / "model.safetensors").stat().st_size) for name, (_, path) in chosen.items()}
    config = {"model": opts.model, "page_cache": "warm (open-fp32-cold: evicted)"}
    return case_records(SUITE, f"{opts.model} weights", config, {n: [r["seconds"] for r in rs] for n, rs in replies.items()},
                        metric="seconds", higher_is_better=False, ours={n for n in chosen if n not in COMPARE_TO},
                        compare_to=[c for c in COMPARE_TO if c in chosen], peak_rss=peaks,
                        details={n: {"file_bytes": sizes[n]} for n in chosen}, load_average=load, headline={"engine-bf16"})
