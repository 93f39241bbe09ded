"""Generation speed: our C++ engine (fp32, bf16 and int8) against a plain PyTorch KV-cached loop with our
model (``torch_generate``), HuggingFace transformers' ``generate`` and llama.cpp (f32, f16, q8_0 on
the GGUF export; ``benchmark/llama_cpp.py``), on the same random weights. Every row of a batch has
its own prompt (no shared prefix for any peer to reuse).

Each peer lives in its own worker process; one configuration (batch, prompt length) runs them
interleaved, median of ``reps`` runs after one warm-up each. Timed: one whole generate call as the
user waits for it (prefill, decode, top-k sampling, stop checks), tokens/s = batch x new tokens /
seconds. Also recorded: the engine's decode ms per step, prefill ms and sampling share; beside
them the physical limit, measured in the same run: at batch 1 the weight bytes a decode step reads
against the machine's memory bandwidth (probed once per round, between the peers), at larger
batches the FLOPs per token against a measured GEMM rate; peak RSS of every peer during the
configuration.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

from .common import Options, Worker, case_records, gemm_gflops, log, memory_bandwidth, run_peers, set_torch_threads
from .llama_cpp import PEERS as LLAMA_PEERS
from .llama_cpp import extra_buffers_fault
from .llama_cpp import usable as llama_cpp_usable

SUITE = "generation"
PEERS = ("engine-fp32", "engine-bf16", "engine-int8", "torch", "transformers", *LLAMA_PEERS)
COMPARE_TO = ("transformers", "torch", *LLAMA_PEERS)
# The README's rows: bf16 against transformers, and each dtype against llama.cpp's like it.
HEADLINE = {"engine-bf16": ["transformers", "llama.cpp-f16"], "engine-fp32": ["llama.cpp-f32"], "engine-int8": ["llama.cpp-q8_0"]}


def prompt_tokens(length: int, row: int) -> list[int]:
    """Row ``row``'s prompt: distinct from every other row's from the first token on."""
    return [1000 + (row * 7919 + i) % 40000 for i in range(length)]


def engine_peer(path: str, threads: int | None):
    """Worker side: our engine on ``path``, generating ``batch`` samples per call."""
    from ..engine import Engine, Request

    engine = Engine(path, backend="cpu", threads=threads)

    def run(batch: int, prompt: int, new_tokens: int, top_k: int) -> dict:
        requests = [Request(prompt_tokens(prompt, i), new_tokens, temperature=1.0, top_k=top_k, seed=1234, sample_index=i) for i in range(batch)]
        start = time.perf_counter()
        results = engine.generate(requests, batch_size=batch)
        seconds = time.perf_counter() - start
        if any(len(r.tokens) != new_tokens for r in results):
            raise RuntimeError(f"the engine returned {[len(r.tokens) for r in results]} tokens, expected {new_tokens} each")
        t = engine.last_timings()
        keys = ("prefill_seconds", "prefill_tokens", "shared_tokens", "decode_seconds", "decode_steps", "decode_sample_seconds",
                "kv_cache_bytes", "screened_rows")
        return {"seconds": seconds, "timings": {k: t[k] for k in keys}}

    return run


def torch_peer(folder: str, threads: int | None):
    """Worker side: our PyTorch model with its KV-cached loop (``torch_generate.generate_tokens``)."""
    set_torch_threads(threads)
    from ..engine import Request
    from ..torch_generate import generate_tokens
    from ..weights import build_model, load_weights

    model = build_model(*load_weights(folder))

    def run(batch: int, prompt: int, new_tokens: int, top_k: int) -> dict:
        requests = [Request(prompt_tokens(prompt, i), new_tokens, temperature=1.0, top_k=top_k, seed=1234, sample_index=i) for i in range(batch)]
        start = time.perf_counter()
        results = generate_tokens(model, requests, batch_size=batch)
        seconds = time.perf_counter() - start
        if any(len(r.tokens) != new_tokens for r in results):
            raise RuntimeError("the PyTorch loop stopped early")
        return {"seconds": seconds}

    return run


def transformers_peer(folder: str, threads: int | None):
    """Worker side: ``transformers.GPT2LMHeadModel.generate`` (its default attention), top-k sampling."""
    set_torch_threads(threads)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()

    def run(batch: int, prompt: int, new_tokens: int, top_k: int) -> dict:
        ids = torch.tensor([prompt_tokens(prompt, i) for i in range(batch)])
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k, temperature=1.0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        seconds = time.perf_counter() - start
        if out.shape != (batch, prompt + new_tokens):
            raise RuntimeError(f"transformers returned shape {tuple(out.shape)}")
        return {"seconds": seconds}

    return run


def weight_bytes_per_token(path, screened: bool = False) -> int:
    """Bytes a batch-1 decode step reads: every tensor once, except wpe, of which one row (the
    head reads all of wte; the embedding one more row of it). With the screened head (docs/engine.md)
    the head reads wte's int8 copy and 16 bytes of terms per token instead (and the rows of the few
    hundred tokens it computes exactly, left out here: under 1% of the step's bytes)."""
    from ..export import inspect

    info = inspect(path)
    n_ctx, C, V = info["config"]["n_ctx"], info["config"]["n_embd"], info["config"]["n_vocab"]
    total = sum(t["nbytes"] if t["name"] != "wpe.weight" else t["nbytes"] // n_ctx for t in info["tensors"])
    if screened:
        total += V * (C + 16) - next(t["nbytes"] for t in info["tensors"] if t["name"] == "wte.weight")
    total += sum(4 * t["shape"][0] for t in info["tensors"] if t["dtype"] == "int8")  # int8 rows' scales
    return total + C * {"bf16": 2, "int8": 1}.get(info["dtype"], 4)


def flops_per_token(config, position: float) -> float:
    """FLOPs of one decode token at context ``position``: the matrix products (12 C^2 per layer
    and the V x C head, 2 FLOPs per multiply-add) and attention over ``position`` keys."""
    C, L = config.n_embd, config.n_layer
    return 2 * (L * 12 * C * C + config.n_vocab * C) + L * 4 * C * position


def measure(opts: Options, *, new_tokens: int | None = None, top_k: int = 40, peers: tuple[str, ...] | None = None) -> list[dict]:
    """Records of every (prompt, batch) configuration: batch 1/8/20/64 x prompt 16/512 x 128 new
    tokens (``--quick``: batch 1/8, prompt 16, 16 new tokens; ``opts.batches``/``opts.prompts``,
    from ``--batches``/``--prompts``, choose others)."""
    batches = opts.batches or ((1, 8) if opts.quick else (1, 8, 20, 64))
    prompts = opts.prompts or ((16,) if opts.quick else (16, 512))
    new_tokens = new_tokens or (16 if opts.quick else 128)
    config = opts.config
    if max(prompts) + new_tokens > config.n_ctx:
        raise ValueError(f"prompt {max(prompts)} + {new_tokens} new tokens exceed the {opts.model} context ({config.n_ctx})")
    peers = tuple(peers or opts.peers or PEERS)
    if "transformers" in peers and importlib.util.find_spec("transformers") is None:
        opts.note("transformers is not installed: generation compares the engine with the PyTorch loop only (pip install transformers)")
        peers = tuple(p for p in peers if p != "transformers")
    if any(p in LLAMA_PEERS for p in peers) and (why := llama_cpp_usable()):
        opts.note(f"generation runs without llama.cpp: {why}")
        peers = tuple(p for p in peers if p not in LLAMA_PEERS)
    ggufs = {p: opts.models.gguf(p.split("-", 1)[1]) for p in peers if p in LLAMA_PEERS}
    files = {dtype: opts.models.engine(dtype) for dtype in ("fp32", "bf16", "int8") if f"engine-{dtype}" in peers}
    gemm = {dtype: gemm_gflops(dtype, opts.threads) for dtype in files if dtype != "int8"}  # no int8 GEMM in torch to compare with
    if "bf16" in gemm:  # without bf16 hardware (AVX2) bf16 weights are widened to fp32 FMAs: the faster rate is the ceiling
        gemm["bf16"] = max(gemm["bf16"], gemm.get("fp32") or gemm_gflops("fp32", opts.threads))
    log(f"{SUITE}: {opts.model} geometry, random weights, peers {', '.join(peers)}; "
        + ", ".join(f"{d} GEMM {g:.0f} GFLOP/s" for d, g in gemm.items()))

    workers: dict[str, Worker] = {}
    records = []
    try:
        for peer in peers:
            if peer.startswith("engine-"):
                workers[peer] = Worker(f"{__name__}:engine_peer", name=peer, threads=opts.threads, path=str(files[peer[7:]]))
            elif peer in LLAMA_PEERS:
                if fault := extra_buffers_fault(str(ggufs[peer])):
                    opts.note(fault)
                workers[peer] = Worker("gpt_2_simple.benchmark.llama_cpp:llama_peer", name=peer, threads=opts.threads,
                                       path=str(ggufs[peer]), extra_buffers=not fault)
            else:
                target = "torch_peer" if peer == "torch" else "transformers_peer"
                workers[peer] = Worker(f"{__name__}:{target}", name=peer, threads=opts.threads, folder=str(opts.models.hf()))
        for prompt in prompts:
            for batch in batches:
                case = f"batch {batch}, prompt {prompt}"
                cfg = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "top_k": top_k, "temperature": 1.0, "model": opts.model,
                       "prompts": "distinct"}
                job = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "top_k": top_k}
                # The memory bandwidth is probed in every round too: on a shared VM it moves by half
                # within minutes, and a batch-1 step is compared with it.
                replies, peaks, load = run_peers(
                    workers, opts.reps, label=f"{SUITE} {case}",
                    rate=lambda r, b=batch: f"{r['gb_per_s']:.1f} GB/s" if "gb_per_s" in r else f"{b * new_tokens / r['seconds']:.1f} tok/s",
                    probes={"bandwidth": lambda: {"gb_per_s": memory_bandwidth(opts.threads, reps=1)}}, **job)
                bandwidth = statistics.median(r["gb_per_s"] for r in replies.pop("bandwidth"))
                samples = {p: [batch * new_tokens / r["seconds"] for r in rs] for p, rs in replies.items()}
                details = {p: _engine_details(replies[p], files[p[7:]], config, batch, prompt, new_tokens, bandwidth, gemm.get(p[7:]))
                           for p in replies if p.startswith("engine-")}
                details.update({p: _prefill_rate(replies[p]) for p in replies if p in LLAMA_PEERS})
                records += case_records(SUITE, case, cfg, samples, metric="tokens/s", ours={p for p in peers if p.startswith("engine-")},
                                        compare_to=[p for p in COMPARE_TO if p in peers], peak_rss=peaks, details=details,
                                        load_average=load, headline=HEADLINE)
    finally:
        for w in workers.values():
            w.close()
    return records


def _prefill_rate(replies: list[dict]) -> dict:
    """Prompt tokens per second of the prefill alone (median over rounds)."""
    t = [r["timings"] for r in replies]
    return {"prefill_ms": 1e3 * statistics.median(x["prefill_seconds"] for x in t),
            "prefill_tokens_per_s": statistics.median(x["prefill_tokens"] / x["prefill_seconds"] for x in t)}


def _engine_details(replies: list[dict], path, config, batch: int, prompt: int, new_tokens: int, bandwidth: float, gemm: float | None) -> dict:
    """Where the engine's time went and how close it came to the machine's limit."""
    timings = [r["timings"] for r in replies]
    step = statistics.median(t["decode_seconds"] / t["decode_steps"] for t in timings)
    out = {
        "decode_ms_per_step": 1e3 * step,
        "prefill_ms": 1e3 * statistics.median(t["prefill_seconds"] for t in timings),
        "prefill_tokens_per_s": statistics.median(t["prefill_tokens"] / t["prefill_seconds"] for t in timings),
        "sampling_share_of_decode": statistics.median(t["decode_sample_seconds"] / t["decode_seconds"] for t in timings),
        "kv_cache_bytes": timings[0]["kv_cache_bytes"],
        "file_bytes": path.stat().st_size,
        "bandwidth_gb_per_s": bandwidth,
    }
    out["screened_head"] = all(t["screened_rows"] > 0 for t in timings)
    # The rows share their prompt, so all but one copy it (docs/engine.md "The scheduler").
    out["prompt_tokens_computed"] = timings[0]["prefill_tokens"]
    out["prompt_tokens_shared"] = timings[0]["shared_tokens"]
    if batch == 1:  # memory-bound: every weight is read once per token
        per_token = weight_bytes_per_token(path, screened=out["screened_head"])
        out.update(weight_bytes_per_token=per_token, weight_read_gb_per_s=per_token / step / 1e9,
                   share_of_bandwidth=per_token / step / 1e9 / bandwidth)
    elif gemm is not None:  # compute-bound: FLOPs of the decode tokens against a GEMM's rate
        flops = flops_per_token(config, prompt + new_tokens / 2)
        out.update(flops_per_token=flops, gemm_gflops=gemm, share_of_gemm=batch / step * flops / 1e9 / gemm)
    return out
