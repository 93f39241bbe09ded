"""Peak memory of full fine-tuning (every weight trained) of big GPT-2 geometries with lean.py's
options: random init (no download), batch 1 x n_ctx, a few optimizer steps, each case in its own
process; peak RSS on the CPU, ``max_memory_allocated`` on a GPU. The training step is finetune's
(token-mean loss through model.py's chunked head, step in backward, checkpointing, malloc.py's
reuse of freed memory on the CPU); data loading, logging and saving are left out.

    python bench/finetune_memory.py                                 # 774M and 1558M on this device
    python bench/finetune_memory.py --cases 774M:adam,774M:adafactor --steps 2 --device cpu

Writes bench/results/finetune_memory-<date>-<host>.json. Check free memory first: a case that
does not fit is killed by the kernel (recorded as failed).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time

from checkout import ROOT  # the checkout's sources or the installed package


def measure(model_name: str, optimizer: str, steps: int, device: str, in_backward: bool, checkpointing: bool) -> dict:
    import torch

    from gpt_2_simple import lean
    from gpt_2_simple.config import get_config
    from gpt_2_simple.malloc import reuse_freed_memory
    from gpt_2_simple.model import GPT2

    config = get_config(model_name)
    torch.manual_seed(0)
    dev = torch.device(device)
    with reuse_freed_memory() if dev.type == "cpu" else torch.device(dev):
        start = time.perf_counter()
        model = GPT2(config).to(dev).train()
        init_s = time.perf_counter() - start
        model.gradient_checkpointing = checkpointing
        params = list(model.parameters())
        opt = lean.build_optimizer(optimizer, params, 1e-4 if optimizer != "adafactor" else 1e-2, dev.type, in_backward=in_backward)
        estimate = lean.estimate_bytes(config, sum(p.numel() for p in params), [p.shape for p in params], optimizer=optimizer, batch_size=1,
                                       accumulate=1, in_backward=in_backward, checkpointing=checkpointing)
        g = torch.Generator().manual_seed(1)
        step_s, losses = [], []
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        for _ in range(steps):
            x = torch.randint(0, config.n_vocab, (1, config.n_ctx + 1), generator=g).to(dev)
            start = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x[:, :-1], targets=x[:, 1:])
            (loss / config.n_ctx).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item() / config.n_ctx)
            step_s.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": model_name, "params": sum(p.numel() for p in params), "optimizer": optimizer, "in_backward": in_backward,
            "checkpointing": checkpointing, "batch": 1, "tokens": config.n_ctx, "steps": steps, "device": device,
            "peak_bytes": peak, "peak_kind": "max_memory_allocated" if dev.type == "cuda" else "peak RSS (ru_maxrss)",
            "estimate_bytes": estimate, "init_seconds": init_s, "step_seconds": step_s, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="774M:adam,774M:adafactor,1558M:adafactor", help="model:optimizer, comma separated")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when PyTorch sees a GPU)")
    ap.add_argument("--no_in_backward", action="store_true", help="step after the backward pass (whole-model gradients)")
    ap.add_argument("--no_checkpointing", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()
    if args.one:
        model, optimizer = args.one.split(":")
        print(json.dumps(measure(model, optimizer, args.steps, args.device, not args.no_in_backward, not args.no_checkpointing)))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    context = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(), "cpu": cpu,
               "isa": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags], "cores": torch.get_num_threads(),
               "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "command": "python bench/finetune_memory.py " + " ".join(sys.argv[1:]), "load_average_start": list(os.getloadavg())}
    records = []
    out = ROOT / "bench" / "results" / f"finetune_memory-{datetime.datetime.now():%Y%m%d-%H%M%S}-{socket.gethostname()}.json"
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--one", case, "--steps", str(args.steps), "--device", device]
        cmd += ["--no_in_backward"] * args.no_in_backward + ["--no_checkpointing"] * args.no_checkpointing
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            records.append(json.loads(proc.stdout.splitlines()[-1]))
            r = records[-1]
            print(f"{case}: peak {r['peak_bytes'] / 2**30:.2f} GiB (estimate {r['estimate_bytes'] / 2**30:.2f}), steps "
                  + ", ".join(f"{s:.0f} s" for s in r["step_seconds"]), flush=True)
        else:
            records.append({"case": case, "failed": proc.stderr[-2000:] or f"exit code {proc.returncode}"})
            print(f"{case}: failed ({proc.returncode})", flush=True)
        context["load_average"] = list(os.getloadavg())  # at the end of the case: the machine is shared
        out.write_text(json.dumps({"benchmark": "finetune_memory", "context": context, "records": records}, indent=2) + "\n")  # after each case
    print(out)


if __name__ == "__main__":
    main()
