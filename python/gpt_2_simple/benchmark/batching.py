"""Continuous batching against static batching when texts stop at different points.

``gpt_2_simple generate`` hands every sample to one ``Engine.generate`` call: when a row finishes
(truncate, length), the next pending sample takes its slot at once. Static batching (the
original, HF ``generate``) runs groups of ``batch`` samples and each group lasts as long as its
longest text. Both run on the same engine (one worker process per dtype), interleaved, with stop
points drawn uniformly in [min_new, max_new] ("varied") and all equal to max_new ("fixed", where
the two should tie: a check of the machine's noise). Tokens/s counts the tokens the samples need
(what the user gets); the decode steps each mode needed are recorded beside it.
"""

from __future__ import annotations

import numpy as np

from .common import Options, Worker, case_records, log, run_case

SUITE = "batching"
MODES = ("continuous", "static")


def engine_modes(path: str, threads: int | None):
    """Worker side: one engine, generating a list of samples continuously or in static groups."""
    from ..engine import Engine, Request

    engine = Engine(path, backend="cpu", threads=threads)

    def run(mode: str, lengths: list[int], batch: int, prompt: int) -> dict:
        rng = np.random.default_rng(0)
        requests = [Request(prompt=rng.integers(0, 50000, prompt).tolist(), max_new_tokens=m, temperature=0.8, top_k=40, seed=1, sample_index=i)
                    for i, m in enumerate(lengths)]
        # Continuous: one call, finished rows refilled at once. Static: groups one after the other.
        groups = [requests] if mode == "continuous" else [requests[i:i + batch] for i in range(0, len(requests), batch)]
        tokens = steps = 0
        for group in groups:
            tokens += sum(len(r.tokens) for r in engine.generate(group, batch_size=batch))
            steps += engine.last_timings()["decode_steps"]
        if tokens != sum(lengths):
            raise RuntimeError(f"{mode} batching generated {tokens} tokens, expected {sum(lengths)}")
        return {"tokens": tokens, "decode_steps": steps}

    return run


def scenarios(samples: int, min_new: int, max_new: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(1)
    return {"varied": rng.integers(min_new, max_new + 1, samples).tolist(), "fixed": [max_new] * samples}


def measure(opts: Options, *, dtypes: tuple[str, ...] = ("bf16", "fp32"), scenario_names: tuple[str, ...] = ("varied", "fixed"),
            batch: int | None = None, samples: int | None = None, prompt: int = 16, min_new: int = 8, max_new: int | None = None) -> list[dict]:
    """Records for each dtype and scenario: 24 texts of 8..64 new tokens at batch 8 (``--quick``:
    12 texts of 8..24 at batch 4, bf16 only)."""
    if opts.quick:
        dtypes = dtypes[:1]
    batch = batch or (4 if opts.quick else 8)
    samples = samples or (12 if opts.quick else 24)
    max_new = max_new or (24 if opts.quick else 64)
    if not 1 <= min_new <= max_new or prompt + max_new > opts.config.n_ctx:
        raise ValueError(f"need 1 <= min_new <= max_new and prompt + max_new <= n_ctx ({opts.config.n_ctx})")
    lengths = scenarios(samples, min_new, max_new)
    log(f"{SUITE}: {opts.model} geometry, {samples} texts at batch {batch}, {min_new}..{max_new} new tokens (varied) or {max_new} (fixed)")
    records = []
    for dtype in dtypes:
        with Worker(f"{__name__}:engine_modes", name=f"engine-{dtype}", threads=opts.threads, path=str(opts.models.engine(dtype))) as worker:
            for name in scenario_names:
                job = {"lengths": lengths[name], "batch": batch, "prompt": prompt}
                calls = {mode: (lambda m=mode: worker(mode=m, **job)) for mode in MODES}
                runs, peaks, load = run_case(calls, [worker], opts.reps, label=f"{SUITE} {dtype} {name}",
                                             rate=lambda r: f"{r['tokens'] / r['seconds']:.1f} tok/s")
                case = f"{dtype}, {name} lengths"
                config = {"dtype": dtype, "scenario": name, "batch": batch, "samples": samples, "prompt": prompt,
                          "new_tokens": sum(lengths[name]), "new_tokens_range": [min(lengths[name]), max(lengths[name])], "model": opts.model}
                peak = max(peaks.values())  # one process runs both modes
                records += case_records(SUITE, case, config, {m: [r["tokens"] / r["seconds"] for r in rs] for m, rs in runs.items()},
                                        metric="tokens/s", ours=set(MODES), compare_to=["static"], peak_rss={m: peak for m in MODES},
                                        details={m: {"decode_steps": rs[0]["decode_steps"]} for m, rs in runs.items()},
                                        load_average=load, headline={"continuous"} if name == "varied" and dtype == dtypes[0] else set())
    return records
