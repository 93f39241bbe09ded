"""malloc.reuse_freed_memory: large freed tensors are reused without page faults inside the block,
and their memory goes back to the kernel after it (the kernel's own counters are the reference).
Each case runs in a fresh process: the settings are process-wide."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

# A 96 MiB tensor (a logits-sized block, above glibc's largest mmap threshold) allocated, written
# and freed round after round, as a training step does: page faults of the last rounds, then the
# RSS once it is freed. (Inside the block glibc keeps a few freed copies before it starts reusing
# them, 6 here: torch's 64-byte aligned requests are a little larger than the freed block.)
SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from gpt_2_simple.malloc import reuse_freed_memory

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def rounds():
        for _ in range(10):
            torch.empty(24 << 20).fill_(1.0)  # 24 Mi floats: 96 MiB
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):
            torch.empty(24 << 20).fill_(1.0)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2

    base = rss_mib()
    plain = rounds()
    with reuse_freed_memory() as applies:
        reused = rounds()
        held = rss_mib() - base
    print(json.dumps({"applies": applies, "plain": plain, "reused": reused, "held": held, "after": rss_mib() - base}))
""")


def run(env_extra: dict | None = None) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_inside_the_block_and_returned_after():
    r = run()
    assert r["applies"] is True
    pages = (96 << 20) // 4096
    assert r["plain"] > pages // 2  # outside: glibc maps the block anew, every page faults
    assert r["reused"] < pages // 20  # inside: the freed block's pages are reused as they are
    assert r["held"] > 64  # ...because the process keeps them
    assert r["after"] < 32  # and gives them back when the block ends


def test_a_user_who_tunes_malloc_is_left_alone():
    r = run({"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert r["applies"] is False
    assert r["reused"] > (96 << 20) // 4096 // 2
