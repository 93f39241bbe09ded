"""GPU suites: generation with our CUDA engine and fine-tuning on one GPU, each against transformers
on the same GPU, in one process and sitting, interleaved, median of ``reps`` runs after one warm-up
each; GPU time through ``torch.cuda.synchronize()`` around each timed call, or CUDA events.

Generation (124M geometry, random weights, bf16, prompt 16, 128 new tokens, top-k 40):
- batch 1: ms per generated token of the whole call and of the decode steps alone, tokens/s
  against transformers (the CUDA issue's targets: <= 0.5 ms/token and >= 10x);
- batch 64, 128, 256: aggregate tokens/s and the ratio to transformers (>= 100,000 and >= 5x);
- the engine with CUDA graphs off; sampling alone: device time of one sampler launch at batch 1
  and 256 on real logits, for top-k 40, temperature only and top-p 0.9 (<= 30 us and <= 100 us);
- the weight bytes a batch-1 token reads against the GPU's copy bandwidth measured in the same run.
Fine-tuning (124M and 355M geometry, 1024-token windows of the bundled corpus): ``finetune`` (bf16
autocast, fused AdamW, with and without ``torch.compile``) against a plain transformers loop with
the same settings; tokens/s over the steps after ``warmup_steps``; peak GPU memory allocated.

Without an NVIDIA GPU (or the _engine_cuda module, or a PyTorch with CUDA) ``unavailable()`` says why.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Options, case_records, interleave, log, summary

SUITE = "gpu"
DEFAULT_BATCH = {"124M": 16, "355M": 8}
LEARNING_RATE = 1e-4


def unavailable() -> str | None:
    """Why the GPU suites cannot run here, or None."""
    try:
        from .. import _engine_cuda
    except ImportError as e:
        return f"the CUDA engine (_engine_cuda) is not built ({e})"
    devices, reason = _engine_cuda.cuda_status()
    if devices < 1:
        return reason
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "PyTorch here has no CUDA (transformers, the peer, needs it)"
    return None


def gpu_context(device: int) -> dict:
    import torch

    from .. import _engine_cuda

    info = _engine_cuda.device_info(device)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device}"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = ""
    return {"gpu": info["name"], "capability": list(info["capability"]), "gpu_memory_bytes": info["total_bytes"], "driver": driver,
            "torch_cuda": torch.version.cuda}


def copy_bandwidth(device: int) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written), median of 7: the rate a
    memory-bound kernel can approach on this GPU now."""
    import torch

    x = torch.empty(2**30, dtype=torch.uint8, device=f"cuda:{device}")
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() / statistics.median(times) / 1e9


def generation(opts: Options, *, batches: tuple[int, ...] | None = None, prompt: int = 16, new_tokens: int | None = None,
               top_k: int = 40, device: int = 0, transformers: bool = True) -> list[dict]:
    """Records of the CUDA engine (with and without graphs) against transformers, the sampler alone,
    and the batch-1 floor (``--quick``: batch 1 and 64, 16 new tokens)."""
    import torch

    from .. import _engine_cuda
    from ..engine import Request
    from ..export import inspect

    batches = batches or ((1, 64) if opts.quick else (1, 64, 128, 256))
    new_tokens = new_tokens or (16 if opts.quick else 128)
    torch.cuda.set_device(device)
    gpu = gpu_context(device)
    log(f"{SUITE} generation: {gpu['gpu']} (sm_{gpu['capability'][0]}{gpu['capability'][1]}, driver {gpu['driver']}), CUDA {gpu['torch_cuda']}")
    path = opts.models.engine("bf16")
    start = time.perf_counter()
    engine = _engine_cuda.Engine(str(path), device=device)
    load_seconds = time.perf_counter() - start
    engine_nographs = _engine_cuda.Engine(str(path), device=device, graphs=False)
    hf = None
    if transformers:
        import transformers as hf_lib

        hf_lib.logging.set_verbosity_error()
        hf = hf_lib.GPT2LMHeadModel.from_pretrained(opts.models.hf()).to(device=f"cuda:{device}", dtype=torch.bfloat16).eval()
    ids = list(range(1000, 1000 + prompt))

    def run(peer: str, batch: int) -> dict:
        """Wall seconds of one whole generate call for ``batch`` samples (and the engine's timings)."""
        requests = [Request(ids, new_tokens, temperature=1.0, top_k=top_k, seed=1234, sample_index=i) for i in range(batch)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        if peer.startswith("engine"):
            e = engine if peer == "engine" else engine_nographs
            out = e.generate(requests, batch_size=batch)
            seconds = time.perf_counter() - start
            if any(len(tokens) != new_tokens for tokens, _ in out):
                raise RuntimeError("the CUDA engine stopped early")
            return {"seconds": seconds, "timings": e.last_timings()}
        x = torch.tensor([ids] * batch, device=f"cuda:{device}")
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=top_k, temperature=1.0,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if out.shape != (batch, prompt + new_tokens):
            raise RuntimeError(f"transformers returned shape {tuple(out.shape)}")
        return {"seconds": seconds}

    peers = ["engine", "engine-nographs"] + ([] if hf is None else ["transformers"])
    weight_bytes = sum(t["nbytes"] for t in inspect(path)["tensors"] if t["name"] != "wpe.weight")
    bandwidth = copy_bandwidth(device)
    records = []
    for batch in batches:
        replies = interleave({p: (lambda p=p: run(p, batch)) for p in peers}, opts.reps, label=f"{SUITE} batch {batch}",
                             rate=lambda r, b=batch: f"{b * new_tokens / r['seconds']:,.0f} tok/s")
        timings = [r["timings"] for r in replies["engine"]]
        engine_details = {
            "ms_per_token_of_a_row": summary([1e3 * r["seconds"] / new_tokens for r in replies["engine"]]),
            "decode_ms_per_step": summary([1e3 * t["decode_seconds"] / t["decode_steps"] for t in timings]),
            "sampling_share_of_decode": statistics.median(t["decode_sample_seconds"] / t["decode_seconds"] for t in timings),
            "prefill_ms": statistics.median(1e3 * t["prefill_seconds"] for t in timings),
            "load_seconds": load_seconds, "copy_bandwidth_gb_per_s": bandwidth, "weight_bytes_per_token": weight_bytes,
            "batch1_floor_ms_per_token": 1e3 * weight_bytes / (bandwidth * 1e9),
        }
        config = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "top_k": top_k, "dtype": "bf16", "model": opts.model, **gpu}
        records += case_records(SUITE, f"generate, batch {batch}", config, {p: [batch * new_tokens / r["seconds"] for r in rs] for p, rs in replies.items()},
                                metric="tokens/s", ours={"engine", "engine-nographs"}, compare_to=["transformers"] if hf else [],
                                details={"engine": engine_details}, headline={"engine"})

    # Sampling alone: real logits of the model (one decode step's), tiled to the batch.
    logits = {}
    engine.generate([Request(ids, 1, temperature=1.0)], batch_size=1, on_logits=lambda i, s, x: logits.setdefault(0, x.copy()))
    for batch in (1, 256):
        rows = np.tile(logits[0], (batch, 1))
        for name, (temperature, k, p) in {"top-k 40": (1.0, 40, 0.0), "temperature only": (1.0, 0, 0.0), "top-p 0.9": (1.0, 0, 0.9)}.items():
            us = _engine_cuda.time_sampler(rows, [temperature], [k], [p], iters=100, device=device)
            log(f"  {SUITE} sampling batch {batch}, {name}: {us:.1f} us per step (device time)")
            records += case_records(SUITE, f"sampler, batch {batch}, {name}", {"batch": batch, "sampling": name, **gpu}, {"engine": [us]},
                                    metric="microseconds", higher_is_better=False, ours={"engine"}, compare_to=[])
    return records


def finetune_run(root: Path, name: str, model_dir: Path, data: Path, batch: int, steps: int, warmup: int, compiled: bool, rep: int) -> tuple[float, int]:
    """One finetune run on the GPU: tokens/s over the steps after ``warmup`` (from its log.jsonl) and peak GPU bytes."""
    import torch

    import gpt_2_simple as gpt2

    from ..config import GPT2Config

    run_name = f"{name}-{'compiled' if compiled else 'eager'}-{rep}"
    torch.cuda.reset_peak_memory_stats()
    gpt2.finetune(gpt2.start_tf_sess(), str(data), steps=steps, model_name=name, model_dir=str(model_dir), checkpoint_dir=str(root / "checkpoint"),
                  run_name=run_name, batch_size=batch, accumulate_gradients=1, learning_rate=LEARNING_RATE, optimizer="adamw",
                  sample_every=10**9, save_every=10**9, print_every=1, seed=0, progress=False, restore_from="fresh",
                  device="cuda", mixed_precision="bf16", compile=compiled)
    peak = torch.cuda.max_memory_allocated()
    rows = [json.loads(line) for line in (root / "checkpoint" / run_name / "log.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    first, last = rows[warmup - 1], rows[-1]
    seq = GPT2Config.from_file(model_dir / name / "hparams.json").n_ctx
    return (last["step"] - first["step"]) * batch * seq / (last["time"] - first["time"]), peak


def transformers_loop(config, tokens, batch: int, steps: int, warmup: int) -> tuple[float, int]:
    """The plain peer: transformers' GPT2LMHeadModel, bf16 autocast, fused AdamW, the same batches."""
    import torch
    import transformers

    hf_config = transformers.GPT2Config(vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
                                        n_head=config.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5)
    device = tokens.device
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
    seq = config.n_ctx
    rng = np.random.default_rng(0)
    torch.cuda.reset_peak_memory_stats()
    start = None
    for step in range(steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        starts = torch.from_numpy(rng.integers(0, len(tokens) - seq - 1, size=batch)).to(device)
        x = tokens[starts[:, None] + torch.arange(seq + 1, device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (steps - warmup) * batch * seq / (time.perf_counter() - start), torch.cuda.max_memory_allocated()


def finetune(opts: Options, *, models: tuple[str, ...] | None = None, batch: dict[str, int] | None = None, steps: int | None = None,
             warmup_steps: int | None = None, transformers: bool = True) -> list[dict]:
    """Records of finetune (compiled and eager) against transformers for 124M and 355M (``--quick``:
    124M, 12 steps a run, tokens/s after step 4)."""
    import torch

    from .. import dataset as ds
    from ..config import get_config
    from ..tokenizer import BUNDLED_DIR, get_encoder
    from .finetune import make_model_folder

    models = models or (("124M",) if opts.quick else ("124M", "355M"))
    steps = steps or (12 if opts.quick else 40)
    warmup_steps = warmup_steps or (4 if opts.quick else 10)
    if not 1 <= warmup_steps < steps:
        raise ValueError("warmup_steps must be in [1, steps)")
    batch = DEFAULT_BATCH | (batch or {})
    props = torch.cuda.get_device_properties(0)
    gpu = {"gpu": props.name, "gpu_memory_bytes": props.total_memory, "torch_cuda": torch.version.cuda}
    settings = f"bf16 autocast, fused AdamW lr 1e-4, 1024-token windows, {steps} steps a run, tokens/s after step {warmup_steps}"
    log(f"{SUITE} finetune: {props.name}; {settings}")
    records = []
    with tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        root = Path(tmp)
        model_dir = root / "models"
        chunks = ds.load_dataset(get_encoder(), BUNDLED_DIR / "shakespeare.txt", progress=False)
        data = root / "shakespeare.npz"
        np.savez(data, *chunks)  # pre-encoded: finetune's start-up then costs no encoding
        tokens = torch.from_numpy(np.concatenate(chunks).astype(np.int64)).cuda()
        for name in models:
            config = get_config(name)
            make_model_folder(model_dir, name, config)
            b = batch[name]
            reps = iter(range(1 << 30))
            variants = {
                "finetune-compiled": lambda: finetune_run(root, name, model_dir, data, b, steps, warmup_steps, True, next(reps)),
                "finetune-eager": lambda: finetune_run(root, name, model_dir, data, b, steps, warmup_steps, False, next(reps)),
            }
            if transformers:
                variants["transformers"] = lambda: transformers_loop(config, tokens, b, steps, warmup_steps)
            calls = {v: (lambda fn=fn: dict(zip(("tokens_per_s", "peak_gpu_bytes"), fn()))) for v, fn in variants.items()}
            replies = interleave(calls, opts.reps, label=f"{SUITE} finetune {name}", rate=lambda r: f"{r['tokens_per_s']:,.0f} tok/s")
            cfg = {"model": name, "hparams": config.to_hparams(), "batch": b, "seq": config.n_ctx, "settings": settings, **gpu}
            records += case_records(SUITE, f"finetune {name}, batch {b} x {config.n_ctx}", cfg,
                                    {v: [r["tokens_per_s"] for r in rs] for v, rs in replies.items()}, metric="tokens/s",
                                    ours={"finetune-compiled", "finetune-eager"}, compare_to=["transformers"] if transformers else [],
                                    details={v: {"peak_gpu_bytes": max(r["peak_gpu_bytes"] for r in rs)} for v, rs in replies.items()},
                                    headline={"finetune-compiled"})
    return records


def measure(opts: Options) -> list[dict]:
    """Both GPU suites (the caller checks ``unavailable()`` first)."""
    import importlib.util

    has_transformers = importlib.util.find_spec("transformers") is not None
    if not has_transformers:
        opts.note("transformers is not installed: GPU figures are ours alone (pip install transformers)")
    return generation(opts, transformers=has_transformers) + finetune(opts, transformers=has_transformers)
