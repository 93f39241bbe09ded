"""Does lean fine-tuning reach the loss plain Adam reaches? ``finetune`` on the bundled Shakespeare
corpus from one random init, once per variant, same data order (same seed), then the final
validation loss and the mean and spread of the last training losses (a record, not a test).

    python bench/finetune_quality.py                        # 'tiny' geometry, 64-token windows, 200 steps
    python bench/finetune_quality.py --model 124M --n_ctx 128 --steps 200

The geometry is a known size's with a shorter context (``--n_ctx``) so that it runs on a small
CPU; the weights are a random init written as the base model. Writes
bench/results/finetune_quality-<date>-<host>.json.
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
    args = ap.parse_args()

    import dataclasses

    import torch
    from safetensors.torch import save_file

    import gpt_2_simple as gpt2
    from gpt_2_simple.config import get_config
    from gpt_2_simple.model import GPT2

    config = dataclasses.replace(get_config(args.model), n_ctx=args.n_ctx)
    records = []
    out = ROOT / "bench" / "results" / f"finetune_quality-{datetime.datetime.now():%Y%m%d-%H%M%S}-{socket.gethostname()}.json"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "models" / "base"
        base.mkdir(parents=True)
        config.save(base / "hparams.json")
        torch.manual_seed(args.seed)
        save_file({k: v.contiguous() for k, v in GPT2(config).state_dict().items()}, str(base / "model-0.safetensors"))
        for name in args.variants.split(","):
            start = time.time()
            with contextlib.redirect_stdout(io.StringIO()):
                gpt2.finetune(gpt2.start_tf_sess(), None, steps=args.steps, model_name="base", model_dir=str(Path(tmp) / "models"),
                              checkpoint_dir=str(Path(tmp) / "checkpoint"), run_name=name, batch_size=args.batch_size, accumulate_gradients=1,
                              sample_every=10**9, save_every=10**9, val_fraction=0.05, val_every=50, seed=args.seed, progress=False,
                              **VARIANTS[name])
            log = [json.loads(line) for line in (Path(tmp) / "checkpoint" / name / "log.jsonl").read_text().splitlines()]
            train = [e["loss"] for e in log if "loss" in e]
            val = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
            last = train[-20:]
            records.append({"variant": name, "options": VARIANTS[name], "seconds": time.time() - start, "val_loss": val,
                            "final_val_loss": val[-1][1], "last20_mean": statistics.mean(last), "last20_stdev": statistics.stdev(last)})
            print(f"{name}: val {val[-1][1]:.3f}, last 20 train {statistics.mean(last):.3f} +- {statistics.stdev(last):.3f}", flush=True)
            out.write_text(json.dumps({"benchmark": "finetune_quality", "model": args.model, "n_ctx": args.n_ctx, "steps": args.steps,
                                       "batch_size": args.batch_size, "seed": args.seed, "dataset": "bundled shakespeare.txt",
                                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                       "load_average": list(os.getloadavg()), "command": "python bench/finetune_quality.py "
                                       + " ".join(f"--{k} {v}" for k, v in vars(args).items()), "records": records}, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
