"""Does lean fine-tuning reach the loss plain Adam reaches? ``finetune`` on the bundled Shakespeare
corpus from one random init, once per variant, same data order (same seed), then the final
validation loss and the mean and spread of the last training losses (a record, not a test).

    python bench/finetune_quality.py                        # 'tiny' geometry, 64-token windows, 200 steps
    python bench/finetune_quality.py --model 124M --n_ctx 128 --steps 200

The geometry is a known size's with a shorter context (``--n_ctx``) so that it runs on a small
CPU; the weights are a random init written as the base model. Writes
bench/results/finetune_quality-<date>-<host>.json.

On a slow machine keep the runs in a folder (``--runs``): a call continues them where they stopped
(finetune's exact resume), variants can train at once in separate calls with separate folders
(the same seed gives the same init), and ``--partial`` records the runs as far as they got, at the
last step all of them reached, without training.
"""

import argparse
import contextlib
import datetime
import io
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from checkout import ROOT  # the checkout's sources or the installed package

VARIANTS = {  # name: finetune options
    "adam": dict(optimizer="adam", learning_rate=1e-3, optimizer_in_backward=False),
    "adam-lean": dict(optimizer="adam", learning_rate=1e-3, optimizer_in_backward=True, use_memory_saving_gradients=True),
    "adafactor-lean": dict(optimizer="adafactor", learning_rate=1e-2, optimizer_in_backward=True, use_memory_saving_gradients=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n_ctx", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--variants", default="adam,adafactor-lean")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", action="append", help="keep (and continue) the runs in this folder; repeat with --partial to gather several")
    ap.add_argument("--partial", action="store_true", help="record the runs in --runs as far as they got; no training")
    args = ap.parse_args()

    import dataclasses

    import torch
    from safetensors.torch import save_file

    import gpt_2_simple as gpt2
    from gpt_2_simple.config import get_config
    from gpt_2_simple.model import GPT2
    from gpt_2_simple.train import checkpoint_steps

    config = dataclasses.replace(get_config(args.model), n_ctx=args.n_ctx)
    records = []
    out = ROOT / "bench" / "results" / f"finetune_quality-{datetime.datetime.now():%Y%m%d-%H%M%S}-{socket.gethostname()}.json"

    def write() -> None:
        out.write_text(json.dumps({"benchmark": "finetune_quality", "model": args.model, "n_ctx": args.n_ctx, "steps": args.steps,
                                   "batch_size": args.batch_size, "seed": args.seed, "dataset": "bundled shakespeare.txt",
                                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                   "load_average": list(os.getloadavg()), "command": "python bench/finetune_quality.py "
                                   + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False)), "records": records}, indent=2) + "\n")

    if args.partial:  # the runs as far as they got, cut at the last step every run reached
        runs = [(name, Path(folder) / "checkpoint" / name) for folder in args.runs or [] for name in args.variants.split(",")
                if (Path(folder) / "checkpoint" / name / "log.jsonl").is_file()]
        logs = {name: _read_log(run) for name, run in runs}
        reached = min(max(e["step"] for e in log) for log in logs.values())
        for name, log in logs.items():
            records.append({**_summary(name, [e for e in log if e["step"] <= reached]), "partial": f"{reached} of {args.steps} steps"})
            print(_line(records[-1]), flush=True)
        write()
        print(out)
        return
    with contextlib.ExitStack() as stack:
        tmp = args.runs[0] if args.runs else stack.enter_context(tempfile.TemporaryDirectory())
        base = Path(tmp) / "models" / "base"
        if not (base / "model-0.safetensors").is_file():
            base.mkdir(parents=True, exist_ok=True)
            config.save(base / "hparams.json")
            torch.manual_seed(args.seed)
            save_file({k: v.contiguous() for k, v in GPT2(config).state_dict().items()}, str(base / "model-0.safetensors"))
        for name in args.variants.split(","):
            start = time.time()
            run = Path(tmp) / "checkpoint" / name
            done = max(checkpoint_steps(run), default=0)  # a run killed after its last save redoes the steps since
            with contextlib.redirect_stdout(io.StringIO()):
                gpt2.finetune(gpt2.start_tf_sess(), None, steps=args.steps - done, model_name="base", model_dir=str(Path(tmp) / "models"),
                              checkpoint_dir=str(Path(tmp) / "checkpoint"), run_name=name, batch_size=args.batch_size, accumulate_gradients=1,
                              sample_every=10**9, save_every=25 if args.runs else 10**9, val_fraction=0.05, val_every=50, seed=args.seed,
                              progress=False, restore_from="latest", **VARIANTS[name])
            records.append({**_summary(name, _read_log(run)), "seconds": time.time() - start})
            print(_line(records[-1]), flush=True)
            write()
    print(out)


def _read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _summary(name: str, log: list[dict]) -> dict:
    train = [e["loss"] for e in log if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
    last = train[-20:]
    return {"variant": name, "options": VARIANTS[name], "steps_done": len(train), "val_loss": val, "final_val_loss": val[-1][1] if val else None,
            "last20_mean": statistics.mean(last), "last20_stdev": statistics.stdev(last)}


def _line(r: dict) -> str:
    val = "none yet" if r["final_val_loss"] is None else f"{r['final_val_loss']:.3f} (step {r['val_loss'][-1][0]})"
    return f"{r['variant']}: {r['steps_done']} steps, val {val}, last 20 train {r['last20_mean']:.3f} +- {r['last20_stdev']:.3f}"


if __name__ == "__main__":
    main()
