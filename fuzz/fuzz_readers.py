"""atheris harnesses for the Python readers of files from strangers (fuzz/README.md):

- ``tf_index``: a TensorFlow checkpoint ``.index`` (tf_checkpoint.TFCheckpoint, then every tensor);
- ``safetensors``: a safetensors file's header and the config in its metadata (weights.py);
- ``prompts``: a ``--prompts`` JSONL file (batch.read_prompts, then plan_samples' checks).

Each input must end in the reader's documented error or a result; anything else (TypeError,
KeyError, RecursionError, ...) is a finding and stops the run with its traceback and the input.

    python fuzz/fuzz_readers.py TARGET [libFuzzer flags: -runs=N -max_total_time=S] [CORPUS_DIR ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris
import numpy  # noqa: F401  (imported uninstrumented: coverage is wanted in our code only)

with atheris.instrument_imports(include=["gpt_2_simple"]):
    from gpt_2_simple import batch, tf_checkpoint, weights
    from gpt_2_simple.config import HparamsError

# CRC32C gains nothing from coverage feedback and, instrumented (its numpy lane path above 1 KB
# especially), took most of every tf_index input's time: the harness swaps in an uninstrumented
# byte loop with the same table and result. The lane code has its own tests (test_weights).
_TABLE = tf_checkpoint._TABLE_LIST


def _crc32c(data, value: int = 0) -> int:
    state = value ^ 0xFFFFFFFF
    for b in bytes(data):
        state = _TABLE[(state ^ b) & 0xFF] ^ (state >> 8)
    return state ^ 0xFFFFFFFF


tf_checkpoint.crc32c = _crc32c

TMP = Path(tempfile.mkdtemp(prefix="gpt2s-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


PREFIX = TMP / "model.ckpt"
Path(f"{PREFIX}.data-00000-of-00001").write_bytes(bytes(range(256)) * 4)  # what entries may point into


def tf_index(data: bytes) -> None:
    prefix = PREFIX
    Path(f"{prefix}.index").write_bytes(data)
    try:
        ckpt = tf_checkpoint.TFCheckpoint(prefix)
        for name in list(ckpt.entries)[:64]:
            ckpt.tensor(name, verify_crc=True)
    except (tf_checkpoint.TFCheckpointError, FileNotFoundError):
        pass


def safetensors(data: bytes) -> None:
    path = TMP / "model.safetensors"
    path.write_bytes(data)
    try:
        metadata, _ = weights._read_safetensors(path)
        weights._find_config(weights.Checkpoint(path, "safetensors", None), metadata)
    except (weights.WeightsFileError, HparamsError, FileNotFoundError):
        pass  # FileNotFoundError: no config in the metadata and none beside the file


def prompts(data: bytes) -> None:
    path = TMP / "prompts.jsonl"
    path.write_bytes(data)
    try:
        rows = batch.read_prompts(path)
        batch.plan_samples(rows, repeats=1, nsamples=1, length=10, temperature=1.0, top_k=0, top_p=0.0, seed=1)
    except ValueError:  # the reader's error (JSON, fields, UTF-8, settings)
        pass


TARGETS = {"tf_index": tf_index, "safetensors": safetensors, "prompts": prompts}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
