"""Peak memory of full fine-tuning (every weight trained) of big GPT-2 geometries with lean.py's
options: random init (no download), batch 1 x n_ctx, a few optimizer steps, each case in its own
process; peak RSS on the CPU, ``max_memory_allocated`` on a GPU. The training step is finetune's
(token-mean loss through model.py's chunked head, step in backward, checkpointing, malloc.py's
reuse of freed memory on the CPU); data loading, logging and saving are left out. The step in
backward and checkpointing are chosen as finetune chooses them (``lean.plan``, automatic) against
this machine's available memory, or against ``--available_gb`` (the machine you plan for), unless
``--no_in_backward`` / ``--no_checkpointing`` / ``--forced`` say otherwise. Each step's time and the
peak so far go to stderr as they happen (a 1558M step on 2 CPU cores takes tens of minutes).

    python bench/finetune_memory.py                                 # 774M and 1558M on this device
    python bench/finetune_memory.py --cases 774M:adam,774M:adafactor --steps 2 --device cpu --available_gb 16

Writes bench/results/finetune_memory-<date>-<host>.json. Check free memory first: a case that
does not fit is killed by the kernel (recorded as failed).
"""

import argparse
import collections
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


def _peak(dev) -> int:
    import torch

    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(model_name: str, optimizer: str, steps: int, device: str, in_backward: bool | None, checkpointing: bool | None,
            available: int | None) -> dict:
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
        params = list(model.parameters())
        shapes = [p.shape for p in params]
        n_params = sum(p.numel() for p in params)
        # finetune's automatic choice (in_backward None) unless a setting is forced
        available = available or lean.device_memory(dev)
        chosen = lean.plan(config, n_params, shapes, optimizer=optimizer, batch_size=1, accumulate=1, in_backward=in_backward,
                           checkpointing=bool(checkpointing), available=available)
        if in_backward is None and checkpointing is None:
            in_backward, checkpointing = chosen.in_backward, chosen.checkpointing
        in_backward, checkpointing = bool(in_backward), bool(checkpointing)
        print(f"{model_name}:{optimizer}: in_backward={in_backward} checkpointing={checkpointing} (plan against "
              f"{available / 2**30:.1f} GiB: {'; '.join(chosen.notes) or 'plain'}); init {init_s:.0f} s, peak {_peak(dev) / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)
        model.gradient_checkpointing = checkpointing
        opt = lean.build_optimizer(optimizer, params, 1e-4 if optimizer != "adafactor" else 1e-2, dev.type, in_backward=in_backward)
        estimate = lean.estimate_bytes(config, n_params, shapes, optimizer=optimizer, batch_size=1,
                                       accumulate=1, in_backward=in_backward, checkpointing=checkpointing)
        g = torch.Generator().manual_seed(1)
        step_s, losses, peaks = [], [], []
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
            peaks.append(_peak(dev))
            print(f"  step {len(step_s)}: {step_s[-1]:.0f} s, loss {losses[-1]:.3f}, peak so far {peaks[-1] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return {"model": model_name, "params": n_params, "optimizer": optimizer, "in_backward": in_backward,
            "checkpointing": checkpointing, "plan_available_bytes": available, "plan_notes": chosen.notes,
            "batch": 1, "tokens": config.n_ctx, "steps": steps, "device": device,
            "peak_bytes": peaks[-1], "peak_bytes_after_step": peaks, "peak_kind": "max_memory_allocated" if dev.type == "cuda" else "peak RSS (ru_maxrss)",
            "estimate_bytes": estimate, "init_seconds": init_s, "step_seconds": step_s, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="774M:adam,774M:adafactor,1558M:adafactor", help="model:optimizer, comma separated")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when PyTorch sees a GPU)")
    ap.add_argument("--available_gb", type=float, help="plan the lean options against this many GB (1e9 bytes) as finetune would "
                    "on such a machine (default: this machine's available memory)")
    ap.add_argument("--forced", action="store_true", help="no automatic choice: step in backward and checkpointing on, unless turned off below")
    ap.add_argument("--no_in_backward", action="store_true", help="step after the backward pass (whole-model gradients); implies --forced")
    ap.add_argument("--no_checkpointing", action="store_true", help="implies --forced")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()
    forced = args.forced or args.no_in_backward or args.no_checkpointing
    if args.one:
        model, optimizer = args.one.split(":")
        in_backward, checkpointing = (not args.no_in_backward, not args.no_checkpointing) if forced else (None, None)
        available = int(args.available_gb * 1e9) if args.available_gb else None
        print(json.dumps(measure(model, optimizer, args.steps, args.device, in_backward, checkpointing, available)))
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
        cmd += ["--no_in_backward"] * args.no_in_backward + ["--no_checkpointing"] * args.no_checkpointing + ["--forced"] * args.forced
        cmd += ["--available_gb", str(args.available_gb)] if args.available_gb else []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tail = collections.deque(maxlen=40)
        for line in proc.stderr:  # the case's progress, passed on as it comes
            print(line, end="", file=sys.stderr, flush=True)
            tail.append(line)
        stdout = proc.stdout.read()
        if proc.wait() == 0:
            records.append(json.loads(stdout.splitlines()[-1]))
            r = records[-1]
            print(f"{case}: peak {r['peak_bytes'] / 2**30:.2f} GiB (estimate {r['estimate_bytes'] / 2**30:.2f}), steps "
                  + ", ".join(f"{s:.0f} s" for s in r["step_seconds"]), flush=True)
        else:
            records.append({"case": case, "failed": "".join(tail)[-2000:] or f"exit code {proc.returncode}"})
            print(f"{case}: failed ({proc.returncode})", flush=True)
        context["load_average"] = list(os.getloadavg())  # at the end of the case: the machine is shared
        out.write_text(json.dumps({"benchmark": "finetune_memory", "context": context, "records": records}, indent=2) + "\n")  # after each case
    print(out)


if __name__ == "__main__":
    main()
