"""llama.cpp as a generation peer, through llama-cpp-python's C API bindings, on the GGUF export
(``export_gguf``) of the same random weights our engine runs: f32, f16 and q8_0.

One generate call, as ours: every row's prompt prefilled in one ``llama_decode`` (distinct
sequences, no shared prefix), then one decode per step for all rows at once, each row drawing
its token with llama.cpp's own sampler chain (top-k, then a seeded draw), so no Python sampling
code is timed. llama-cpp-python is built from source (docs/bench.md shows how).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PEERS = ("llama.cpp-f32", "llama.cpp-f16", "llama.cpp-q8_0")


def usable() -> str | None:
    """None when llama-cpp-python imports with its library, else why not (one line)."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, FileNotFoundError) as e:  # not installed, or its libllama missing
        return f"llama-cpp-python is not usable ({type(e).__name__}: {e}); build it as docs/bench.md shows"
    return None


# A 2-token decode with llama.cpp's default weight buffers, in a child process (it may die).
_PROBE = "import sys, llama_cpp; llama_cpp.Llama(model_path=sys.argv[1], n_ctx=16, n_threads=1, verbose=False).eval([1, 2])"


def extra_buffers_fault(path: str) -> str | None:
    """Why llama.cpp must run ``path`` without its extra weight buffers (ggml's repacked and AMX
    kernels, ``llama-bench --repack 0``), else None. ggml's AMX kernels can kill the process on a
    virtual machine that lists AMX: on a Sapphire Rapids guest its q8_0 matmul died of a general
    protection fault at ``ldtilecfg``. A child process tries first, only where ggml has AMX."""
    import llama_cpp as L

    if b"AMX_INT8 = 1" not in L.llama_print_system_info():
        return None
    rc = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, timeout=300).returncode
    if rc >= 0:  # it worked, or failed with an error the peer itself will report
        return None
    return (f"llama.cpp's AMX kernels died of signal {-rc} on this CPU with {Path(path).name}: llama.cpp runs it "
            "without its extra weight buffers (as llama-bench --repack 0), on its AVX-512 kernels")


def llama_peer(path: str, threads: int | None, extra_buffers: bool = True):
    """Worker side: llama.cpp on the GGUF file ``path`` (``extra_buffers``: extra_buffers_fault)."""
    import os

    import llama_cpp as L

    from .generation import prompt_tokens

    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.use_extra_bufts = extra_buffers
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    n_threads = threads or os.cpu_count() or 1
    contexts: dict = {}

    def context(batch: int, tokens: int):
        key = (batch, tokens)
        if key not in contexts:
            for ctx, _ in contexts.values():
                L.llama_free(ctx)
            contexts.clear()
            p = L.llama_context_default_params()
            p.n_ctx = batch * tokens
            p.n_batch = max(batch * tokens, 512)  # the whole prefill in one llama_decode call
            p.n_ubatch = 512
            p.n_seq_max = batch
            p.kv_unified = True
            p.n_threads = p.n_threads_batch = n_threads
            ctx = L.llama_init_from_model(model, p)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {batch} x {tokens} tokens")
            contexts[key] = (ctx, L.llama_batch_init(p.n_batch, 0, batch))
        return contexts[key]

    def fill(b, rows: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)

    def run(batch: int, prompt: int, new_tokens: int, top_k: int) -> dict:
        ctx, b = context(batch, prompt + new_tokens)
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        samplers = []
        for row in range(batch):
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(1234 + row))
            samplers.append(chain)
        try:
            start = time.perf_counter()
            rows = [(t, pos, seq, pos == prompt - 1) for seq in range(batch) for pos, t in enumerate(prompt_tokens(prompt, seq))]
            fill(b, rows)
            if L.llama_decode(ctx, b) != 0:
                raise RuntimeError("llama_decode failed on the prompts")
            last = [i for i, r in enumerate(rows) if r[3]]
            tokens = [L.llama_sampler_sample(samplers[s], ctx, last[s]) for s in range(batch)]
            prefill = time.perf_counter() - start
            for step in range(1, new_tokens):
                fill(b, [(tokens[s], prompt + step - 1, s, True) for s in range(batch)])
                if L.llama_decode(ctx, b) != 0:
                    raise RuntimeError(f"llama_decode failed at step {step}")
                tokens = [L.llama_sampler_sample(samplers[s], ctx, s) for s in range(batch)]
            seconds = time.perf_counter() - start
        finally:
            for chain in samplers:
                L.llama_sampler_free(chain)
        return {"seconds": seconds, "timings": {"prefill_seconds": prefill, "prefill_tokens": batch * prompt}}

    return run
