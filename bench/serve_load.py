"""Load on `gpt_2_simple serve`: N concurrent streaming clients against the offline batch figure.

The issue's measurement (docs/serve.md "Load"): 64 clients, each streaming one completion from a
server with 64 slots, on the 124M geometry with random weights. Reported:

- aggregate tokens/s (all clients' tokens / wall time from the first request to the last [DONE]),
- the offline tokens/s of the same requests through ``Engine.generate`` at batch 64 (what
  ``gpt_2_simple generate --batch_size 64`` runs), measured in the same run, interleaved
  (offline, served, offline, served, ...), and the ratio of the medians (target >= 0.8),
- time to first token per client (request sent -> first streamed chunk): p50 / p99,
- and, when a llama.cpp build and a GGUF export of the same weights are given, ``llama-server``
  with the same number of slots under the same clients.

Run: ``python bench/serve_load.py`` (about two minutes on 2 cores); JSON to bench/results/.
Random weights: the text is noise, the speed is the real model's (ignore_eos keeps every row to
max_tokens).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from gpt_2_simple.benchmark.common import ModelFiles, context  # noqa: E402
from gpt_2_simple.config import get_config  # noqa: E402
from gpt_2_simple.engine import Engine, Request  # noqa: E402
from gpt_2_simple.export import read_tokenizer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


def stream_one(port: int, body: dict, out: dict) -> None:
    """One streaming client: records the time of its first chunk, its tokens and its end."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        out["error"] = f"{response.status} {response.read()[:200]!r}"
        return
    first, tokens, pieces = None, 0, 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk.get("choices"):
            first = time.perf_counter() - t0
        pieces += sum(1 for c in chunk.get("choices", ()) if c.get("text"))
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    # A server that sends no usage: its text chunks (llama-server streams one token per chunk).
    out.update(ttft=first, tokens=tokens or pieces, end=time.perf_counter())
    conn.close()


def load(port: int, prompts: list[str], args, extra: dict | None = None) -> dict:
    """All clients at once; aggregate tokens/s and TTFTs."""
    results = [{} for _ in prompts]
    threads = []
    start = time.perf_counter()
    for k, prompt in enumerate(prompts):
        body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 1.0, "top_k": 40,
                "seed": 1000 + k, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **(extra or {})}
        t = threading.Thread(target=stream_one, args=(port, body, results[k]))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, e.g. {errors[0]}")
    wall = max(r["end"] for r in results) - start
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {"tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "ttft_max": ttfts[-1]}


def offline(path: Path, prompt_ids: list[list[int]], args) -> dict:
    engine = Engine(path, backend="cpu", threads=args.threads)
    requests = [Request(ids, args.max_tokens, temperature=1.0, top_k=40, seed=1000 + k) for k, ids in enumerate(prompt_ids)]
    t0 = time.perf_counter()
    results = engine.generate(requests, batch_size=args.clients)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.tokens) for r in results)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="124M", help="geometry (random weights)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients = server slots = offline batch")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2, help="interleaved offline / served pairs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--llama-server", dest="llama_server", default=os.environ.get("GPT2S_LLAMA_SERVER") or shutil.which("llama-server") or "",
                   help="llama.cpp's llama-server binary (default: $GPT2S_LLAMA_SERVER, else llama-server on PATH; "
                        "docs/bench.md shows how to build it)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpt2s-serve-load-"))
    config = get_config(args.model)
    files = ModelFiles(config, workdir / f"model-{args.model}")
    path = files.engine(args.dtype)
    enc = read_tokenizer(path)
    prompts = [f"Client {k} asks the server about topic number {k * 7 + 3}, and then" for k in range(args.clients)]
    prompt_ids = [enc.encode(t) for t in prompts]
    context_needed = max(len(ids) for ids in prompt_ids) + args.max_tokens

    port = free_port()
    log_file = open(workdir / "server.log", "wb")
    cmd = [sys.executable, "-m", "gpt_2_simple", "serve", "--model", str(path), "--port", str(port), "--dtype", args.dtype,
           "--max-batch", str(args.clients), "--context", str(context_needed), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    record: dict = {"benchmark": "serve_load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "model": args.model, "dtype": args.dtype, "clients": args.clients, "slots": args.clients,
                    "max_tokens": args.max_tokens, "prompt_tokens": [min(map(len, prompt_ids)), max(map(len, prompt_ids))],
                    "sampling": "temperature 1, top_k 40, ignore_eos", "context": context(args.threads or os.cpu_count() or 1)}
    try:
        wait_healthy(port, server)
        print("warm-up", file=sys.stderr)
        load(port, prompts[:4], argparse.Namespace(max_tokens=4))
        offline_runs, served_runs = [], []
        for rep in range(args.reps):
            offline_runs.append(offline(path, prompt_ids, args))
            print(f"rep {rep}: offline {offline_runs[-1]['tokens_per_second']:.1f} tok/s", file=sys.stderr)
            served_runs.append(load(port, prompts, args))
            print(f"rep {rep}: served  {served_runs[-1]['tokens_per_second']:.1f} tok/s, TTFT p50 "
                  f"{served_runs[-1]['ttft_p50']:.2f} s p99 {served_runs[-1]['ttft_p99']:.2f} s", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        log_file.close()
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    record["offline"] = offline_runs
    record["served"] = served_runs
    record["offline_tokens_per_second"] = med(offline_runs, "tokens_per_second")
    record["served_tokens_per_second"] = med(served_runs, "tokens_per_second")
    record["served_over_offline"] = record["served_tokens_per_second"] / record["offline_tokens_per_second"]
    record["pair_ratios"] = [s["tokens_per_second"] / o["tokens_per_second"] for o, s in zip(offline_runs, served_runs)]
    record["ttft_p50"] = med(served_runs, "ttft_p50")
    record["ttft_p99"] = med(served_runs, "ttft_p99")
    record["target_met"] = record["served_over_offline"] >= 0.8

    if os.path.isfile(args.llama_server):
        # The GGUF export of the same weights: f16 beside our bf16 (llama.cpp's 16-bit CPU type), f32 beside fp32.
        gguf = files.gguf("f16" if args.dtype == "bf16" else "f32")
        record["llama_server_gguf"] = gguf.name
        lport = free_port()
        lproc = subprocess.Popen([args.llama_server, "-m", str(gguf), "--port", str(lport), "--parallel", str(args.clients),
                                  "-c", str(args.clients * context_needed), "-t", str(args.threads or os.cpu_count())],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(lport, lproc)
            load(lport, prompts[:4], argparse.Namespace(max_tokens=4))
            record["llama_server"] = [load(lport, prompts, args, {"n_predict": args.max_tokens}) for _ in range(args.reps)]
            record["llama_server_tokens_per_second"] = med(record["llama_server"], "tokens_per_second")
            record["served_over_llama_server"] = record["served_tokens_per_second"] / record["llama_server_tokens_per_second"]
        finally:
            lproc.send_signal(signal.SIGTERM)
            lproc.wait(60)
    else:
        record["llama_server"] = f"not measured: no llama-server binary (--llama-server or $GPT2S_LLAMA_SERVER; got {args.llama_server!r})"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = out / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-serve-load.json"
    name.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("offline_tokens_per_second", "served_tokens_per_second", "served_over_offline",
                                             "ttft_p50", "ttft_p99", "target_met", "llama_server_tokens_per_second",
                                             "served_over_llama_server") if k in record}, indent=2))
    print(f"written {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
