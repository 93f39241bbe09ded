"""``gpt_2_simple bench`` and ``python bench/run.py``: run the suites and write the results.

One results file per run, ``<output_dir>/<date>-<time>-<host>[-quick].json`` (the machine's
context and one record per peer and configuration), with a markdown file (the README's
Performance section, then every table) and a PNG chart beside it, rewritten after each suite so
that a stopped run keeps what it measured. ``--readme FILE.json`` regenerates the section from a
results file (``--apply README.md`` writes it between the README's markers). See docs/bench.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

__all__ = ["SUITES", "parse_suites", "add_arguments", "run", "readme", "main"]

SUITES = ("generation", "batching", "load", "tokenizer", "finetune", "gpu")


def parse_suites(text: str) -> list[str]:
    """``--suites`` ("generation,load") as a list; ValueError (exit code 2, one line) naming the known ones."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise ValueError(f"--suites: unknown suite(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(SUITES)}")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """The options of ``gpt_2_simple bench`` (and ``bench/run.py``, which writes to bench/results)."""
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated suites to run (default: all: {','.join(SUITES)})")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 2 repetitions (a minute or two; not figures to quote)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per configuration after the warm-up (default 5; 2 with --quick)")
    parser.add_argument("--model", default="124M", help="model geometry, random weights (default 124M; tiny/mini/small for a fast check)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every peer (default: all cores)")
    parser.add_argument("--batches", default=None, help="generation suite: comma-separated batch sizes (default 1,8,20,64)")
    parser.add_argument("--prompts", default=None, help="generation suite: comma-separated prompt lengths in tokens (default 16,512)")
    parser.add_argument("--peers", default=None, help="generation suite: comma-separated peers (default all: engine-fp32, engine-bf16, "
                        "engine-int8, torch, transformers, llama.cpp-f32, llama.cpp-f16, llama.cpp-q8_0)")
    parser.add_argument("--output_dir", default=output_dir, help=f"where results are written (default: {output_dir})")
    parser.add_argument("--workdir", default=None, help="folder for the model files the suites write (default: a temporary folder, removed)")
    parser.add_argument("--readme", nargs="+", default=None, metavar="RESULTS.json",
                        help="instead of measuring, print the README Performance table of results files (focused reruns, then a "
                        "full run: the first file with a case wins; rewrites their .md, .png) and GPU results files of "
                        "bench/generate_cuda.py and bench/finetune_gpu.py")
    parser.add_argument("--apply", default=None, metavar="README.md", help="with --readme: write the table between this file's performance markers, and the list of runs "
                        "between the runs markers of docs/bench.md beside it")


def parse_sizes(text: str | None, option: str) -> tuple[int, ...] | None:
    """``--batches 1,20`` as (1, 20); None stays None (the suite's defaults); ValueError naming the option."""
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{option}: expected positive integers separated by commas (e.g. 1,20), got {text!r}")
    return sizes


def parse_peers(text: str | None) -> tuple[str, ...] | None:
    """``--peers engine-int8,llama.cpp-q8_0`` as a tuple; ValueError naming the known peers."""
    if text is None:
        return None
    from .generation import PEERS

    peers = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [p for p in peers if p not in PEERS]
    if not peers or unknown:
        raise ValueError(f"--peers: unknown peer(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(PEERS)}")
    return peers


def _filename(quick: bool) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", platform.node() or "host")
    return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{host}{'-quick' if quick else ''}.json"


def run(suites: list[str], *, quick: bool = False, reps: int | None = None, model: str = "124M", threads: int | None = None,
        output_dir: str | Path, workdir: str | Path | None = None, command: str = "gpt_2_simple bench",
        batches: tuple[int, ...] | None = None, prompts: tuple[int, ...] | None = None, peers: tuple[str, ...] | None = None) -> Path:
    """Run ``suites`` and write the results; returns the JSON file's path."""
    from . import common, report

    temporary = workdir is None
    opts = common.Options(model=model, reps=reps or (2 if quick else 5), threads=threads, quick=quick, workdir=workdir,
                          batches=batches, prompts=prompts, peers=peers)
    context = common.context(opts.threads)
    context["memory_bandwidth_gb_per_s"] = common.memory_bandwidth(opts.threads)
    context["gemm_gflops"] = {dtype: common.gemm_gflops(dtype, opts.threads) for dtype in ("fp32", "bf16")}
    results = {"schema": report.SCHEMA, "command": command, "quick": quick,
               "options": {"suites": suites, "model": model, "reps": opts.reps, "threads": opts.threads,
                           **({"batches": list(batches)} if batches else {}), **({"prompts": list(prompts)} if prompts else {}),
                           **({"peers": list(peers)} if peers else {})},
               "context": context, "suites": [], "records": []}
    path = Path(output_dir) / _filename(quick)
    common.log(f"gpt_2_simple bench: {report.machine_line(results)}")
    try:
        for name in suites:
            opts.notes = []
            start = time.perf_counter()
            status, records = "ok", []
            try:
                if name == "gpu" and (why := importlib.import_module(".gpu", __package__).unavailable()):
                    status = "skipped"
                    opts.notes.append(f"no CUDA here: {why}")
                    common.log(f"gpu: skipped, no CUDA here: {why}")
                else:
                    records = importlib.import_module(f".{name}", __package__).measure(opts)
            except Exception as e:  # noqa: BLE001 - one suite's failure must not lose the others' figures
                status = "failed"
                opts.notes.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                common.log(f"{name}: FAILED\n{traceback.format_exc()}")
            results["suites"].append({"name": name, "status": status, "notes": opts.notes, "seconds": round(time.perf_counter() - start, 1)})
            results["records"] += records
            context["load_average_end"] = common.load_average()
            report.write_results(results, path)
    finally:
        if temporary:
            shutil.rmtree(opts.workdir, ignore_errors=True)
    print(report.suite_tables(results))
    common.log(f"results: {path} (+ .md, .png)")
    return path


def readme(results_paths: list[str] | str, apply: str | None = None) -> str:
    """The README Performance table of harness results files (a focused rerun, then a full run, in
    the order given) and/or GPU results files; rewrites each harness file's .md and .png, and with
    ``apply`` the README's section and the list of runs in docs/bench.md beside it (when present)."""
    from . import report

    harness, gpu = [], []
    for name in [results_paths] if isinstance(results_paths, str) else results_paths:
        path = Path(name)
        kind, data = report.load_any(path)
        if kind == "gpu":
            gpu.append((report.display_path(path), data))
        else:
            report.write_results(data, path)
            harness.append((report.display_path(path), data))
    section = report.readme_section(harness, gpu=gpu)
    if apply:
        target = Path(apply)
        if not target.is_file():
            raise FileNotFoundError(f"{apply} not found: give the README to update")
        docs = target.parent / "docs" / "bench.md"
        # Both checked before either is written, so a missing marker leaves both files as they were.
        readme_text = report.apply_readme(target.read_text(encoding="utf-8"), section)
        docs_text = docs.is_file() and report.apply_readme(docs.read_text(encoding="utf-8"), report.runs_section(harness, gpu=gpu),
                                                           (report.RUNS_START, report.RUNS_END))
        target.write_text(readme_text, encoding="utf-8")
        if docs_text:
            docs.write_text(docs_text, encoding="utf-8")
    return section


def command_line(program: str, args: argparse.Namespace) -> str:
    """The command that reproduces a run: ``program`` and the options that change what is measured."""
    parts = [program]
    suites = parse_suites(args.suites)
    if suites != list(SUITES):
        parts.append(f"--suites {','.join(suites)}")
    if args.quick:
        parts.append("--quick")
    for option in ("reps", "model", "threads", "batches", "prompts"):
        value = getattr(args, option)
        if value is not None and not (option == "model" and value == "124M"):
            parts.append(f"--{option} {value}")
    return " ".join(parts)


def main(args: argparse.Namespace, program: str) -> None:
    """Run what the parsed options ask for; RuntimeError when a suite failed (after writing the others')."""
    if args.apply and not args.readme:
        raise ValueError("--apply needs --readme RESULTS.json (the results to write into the README)")
    if args.readme:
        sys.stdout.write(readme(args.readme, args.apply))
        return
    suites = parse_suites(args.suites)
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"--reps must be at least 1, got {args.reps}")
    batches, prompts = parse_sizes(args.batches, "--batches"), parse_sizes(args.prompts, "--prompts")
    peers = parse_peers(args.peers)
    path = run(suites, quick=args.quick, reps=args.reps, model=args.model, threads=args.threads, output_dir=args.output_dir,
               workdir=args.workdir, command=command_line(program, args), batches=batches, prompts=prompts, peers=peers)
    from .report import load_results

    failed = [s["name"] for s in load_results(path)["suites"] if s["status"] == "failed"]
    if failed:
        raise RuntimeError(f"suite(s) {', '.join(failed)} failed (traceback above); the other figures are in {path}")
