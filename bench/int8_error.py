"""How far int8 weights move the logits, on GPT-2 124M's geometry (issue 19, item 3).

Random weights with GPT-2's initial scales (benchmark.common.random_state: the real weights are not
reachable here), exported as fp32 and int8. Prompts of 32 distinct tokens are prefilled; the logits
of their last position are compared:

- ``engine``: the int8 engine against the fp32 engine (what a user of `--dtype int8` gets);
- ``per_row`` / ``per_block_32``: model.py with the weights and every matmul input rounded to int8
  per row (the engine's scheme: one scale per output row of a weight, one per token row of an input,
  docs/engine.md "int8 weights") or per block of 32 inputs (llama.cpp q8_0's blocks, for weights and
  inputs alike), against model.py in fp32: the measurement behind the choice of per-row scales.

Metrics per scheme: the largest and the RMS logit difference, both also relative to the logits'
standard deviation, the share of prompts whose top token is unchanged, and the mean KL divergence
of the int8 softmax from the fp32 one (nats).

    PYTHONPATH=python python bench/int8_error.py [--prompts 32] [--out bench/results/<time>-int8-error.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from gpt_2_simple import _engine
from gpt_2_simple.benchmark.common import context, random_state
from gpt_2_simple.config import get_config
from gpt_2_simple.engine import Engine, Request
from gpt_2_simple.export import export

PROMPT = 32
MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def prompts(n: int) -> list[list[int]]:
    return [[1000 + (row * 7919 + i * 31) % 40000 for i in range(PROMPT)] for row in range(n)]


def engine_logits(path: Path, rows: list[list[int]]) -> np.ndarray:
    """(rows, V) logits of each prompt's last position."""
    engine = Engine(path, backend="cpu")
    out = np.zeros((len(rows), engine.config.n_vocab), np.float32)
    engine.generate([Request(p, 1, temperature=0.0) for p in rows], batch_size=8,
                    on_logits=lambda i, step, x: out.__setitem__(i, x))
    return out


def quantize(x, block: int | None):
    """x rounded to int8 along its last dimension, one scale per row (block None) or per block of
    `block` values: s = max |x| / 127 (1 where all are 0), q = round(x / s) in [-127, 127] -> s q."""
    import torch

    shape = x.shape
    if block is not None:
        x = x.reshape(*shape[:-1], shape[-1] // block, block)
    amax = x.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax == 0, torch.ones_like(amax), (amax.double() / 127.0).float())
    return (torch.clamp(torch.round(x / s), -127, 127) * s).reshape(shape)


def torch_logits(config, state, rows, block: int | None | str) -> np.ndarray:
    """model.py's logits of each prompt's last position: fp32 (block "fp32"), or with weights and
    matmul inputs rounded by quantize(., block)."""
    import torch

    from gpt_2_simple.weights import build_model

    model = build_model(config, state).eval()
    hidden = {}
    if block != "fp32":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in ("wte.weight", "wpe.weight"):
                    p.copy_(quantize(p, block))
                elif name.endswith(MATRICES):  # Conv1D (in, out): each output's inputs, as stored (out, in)
                    p.copy_(quantize(p.T, block).T)
        for m in model.modules():
            if type(m).__name__ == "Conv1D":
                m.register_forward_pre_hook(lambda _, args: (quantize(args[0], block),))
    model.ln_f.register_forward_hook(lambda _, __, out: hidden.__setitem__("x", out))
    with torch.no_grad():
        model(torch.tensor(rows))
        x = hidden["x"][:, -1]
        if block != "fp32":
            x = quantize(x, block)
        return torch.nn.functional.linear(x, model.wte.weight).numpy()


def metrics(got: np.ndarray, want: np.ndarray) -> dict:
    d = got.astype(np.float64) - want
    std = float(want.std())

    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(want), log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    return {"max_abs": float(np.abs(d).max()), "rms": float(np.sqrt(np.mean(d * d))), "logit_std": std,
            "max_abs_over_std": float(np.abs(d).max()) / std, "rms_over_std": float(np.sqrt(np.mean(d * d))) / std,
            "top1_agreement": float(np.mean(got.argmax(axis=1) == want.argmax(axis=1))), "kl_nats": kl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = get_config("124M")
    state = random_state(config)
    rows = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        files = {d: export((config, state), Path(tmp) / f"m.{d}.bin", d, progress=False) for d in ("fp32", "int8")}
        fp32, int8 = (engine_logits(files[d], rows) for d in ("fp32", "int8"))
    reference = torch_logits(config, state, rows, "fp32")
    results = {
        "engine": metrics(int8, fp32),
        "per_row": metrics(torch_logits(config, state, rows, None), reference),
        "per_block_32": metrics(torch_logits(config, state, rows, 32), reference),
        "engine_fp32_vs_torch": metrics(fp32, reference),
    }
    record = {"benchmark": "int8_error", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": "124M geometry, random weights (GPT-2 init: normal 0.02, LayerNorms 1, biases 0)",
              "prompts": args.prompts, "prompt_tokens": PROMPT, "kernels": _engine.cpu_features()["kernels"],
              "machine": context(None), "results": results}
    for name, m in results.items():
        print(f"{name:22s} max {m['max_abs']:.4f} ({m['max_abs_over_std']:.3f} std)  rms {m['rms']:.5f} ({m['rms_over_std']:.4f} std)  "
              f"top-1 {m['top1_agreement']:.3f}  KL {m['kl_nats']:.2e}", file=sys.stderr)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-int8-error.json"
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(out)


if __name__ == "__main__":
    main()
