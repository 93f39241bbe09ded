"""Keeping freed memory in the process while training on the CPU (glibc only).

PyTorch's CPU tensors come from malloc. glibc serves blocks above its mmap threshold (at most
32 MiB) with mmaps of their own, unmapped again on free, and gives the kernel back the top of its
heap once more than the trim threshold is free there. A training step frees and reallocates the
same large blocks every time (activations, gradients, the loss's chunks), so every step would
fault all their pages in again, each zeroed by the kernel. With mmap off for large blocks and the
heap never trimmed, the next steps reuse those pages as they are (docs/finetune.md, "Memory and
speed", has the figures).

The settings are process-wide, so the block ends by putting them where glibc's own dynamic rule
takes them (mmap above 32 MiB, trim above 64 MiB) and returning the heap's free pages to the
kernel (malloc_trim). A user who tunes malloc themselves (MALLOC_*_ variables, GLIBC_TUNABLES)
is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from typing import Iterator

# mallopt's parameters (malloc.h) and glibc's values for them. Setting a threshold turns glibc's
# dynamic rule off, so both thresholds are set to where that rule ends for a process that frees
# large blocks: mmap above 32 MiB (its maximum), trim above twice that.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD, TRIM_THRESHOLD, MMAP_MAX = 32 << 20, 64 << 20, 65536
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only a free top of over 2 GiB

_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def _glibc():
    """glibc's handle when this process runs on glibc and the user has not tuned malloc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(v in os.environ for v in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, large freed blocks stay in the process for reuse; yields whether it applies."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_MAX, MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.malloc_trim(0)
