"""A results file (``<date>-<host>.json``) turned into what people read: the README's Performance
table (between ``<!-- performance:start -->`` and ``<!-- performance:end -->``), docs/bench.md's
account of the runs behind it (between ``<!-- runs:start -->`` and ``<!-- runs:end -->``), markdown
tables of every record, and a PNG chart of every comparison. Everything here is a pure function of
the results file, so the same file always gives the same text and image.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..plot import png_of
from .gpu import records as gpu_records
from .gpu import reproduce_command

__all__ = ["SCHEMA", "load_results", "load_any", "write_results", "markdown", "readme_section", "runs_section", "apply_readme", "chart_png", "START", "END", "RUNS_START", "RUNS_END"]

SCHEMA = "gpt_2_simple-bench/1"
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
# docs/bench.md's list of the runs behind the README's table
RUNS_START, RUNS_END = "<!-- runs:start -->", "<!-- runs:end -->"
TITLES = {"generation": "Generation", "batching": "Continuous vs static batching", "load": "Model load", "tokenizer": "Tokenizer encode",
          "finetune": "Fine-tuning", "gpu": "GPU"}
ENGINE_SUITES = ("generation", "batching")  # suites whose figures are the CPU engine's kernels
PEERS_INSTALL = 'pip install ".[bench]"    # from the checkout: the peers: transformers, tiktoken'


def load_results(path: str | os.PathLike) -> dict:
    """Read a results file, checking that it is one."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no results file at {path}; run `gpt_2_simple bench` (or python bench/run.py) to make one") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a gpt_2_simple bench results file (schema {SCHEMA!r})")
    return results


def load_any(path: str | os.PathLike) -> tuple[str, dict]:
    """A harness results file (``("harness", results)``) or a GPU results file of
    bench/generate_cuda.py or bench/finetune_gpu.py (``("gpu", results)``)."""
    try:
        return "harness", load_results(path)
    except ValueError:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("benchmark") in ("generate_cuda", "finetune_gpu"):
            return "gpu", data
        raise ValueError(f"{path} is neither a gpt_2_simple bench results file (schema {SCHEMA!r}) nor a GPU results file "
                         "of bench/generate_cuda.py or bench/finetune_gpu.py") from None


def write_results(results: dict, json_path: Path) -> tuple[Path, Path, Path]:
    """Write the results and, beside them, the markdown (``.md``) and the chart (``.png``)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    for path, data in ((json_path, json.dumps(results, indent=2) + "\n"), (md_path, markdown(results, display_path(json_path)))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    tmp = png_path.with_name(png_path.name + ".tmp")
    tmp.write_bytes(chart_png(results))
    os.replace(tmp, png_path)
    return json_path, md_path, png_path


def display_path(path: Path) -> str:
    """The path as a reader of the README would type it (relative to the current folder when inside it)."""
    try:
        return Path(os.path.relpath(path)).as_posix() if not os.path.relpath(path).startswith("..") else path.as_posix()
    except ValueError:
        return path.as_posix()


# ---------------------------------------------------------------------------------------------
# Number formatting


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3g}"


def _value(metric: str, x: float) -> str:
    if metric == "seconds":
        return f"{_num(1e3 * x)} ms" if x < 1 else f"{_num(x)} s"
    if metric == "microseconds":
        return f"{_num(x)} us"
    return _num(x)


def _bytes(n: int | None) -> str:
    if not n:
        return ""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x"


def _notes(record: dict) -> str:
    """The details a reader needs beside the figure (the rest is in the JSON)."""
    d = record.get("details", {})
    parts = []
    if "decode_ms_per_step" in d:
        step = d["decode_ms_per_step"]
        parts.append(f"decode {_num(step['median'] if isinstance(step, dict) else step)} ms/step")
    if "sampling_share_of_decode" in d:
        parts.append(f"sampling {100 * d['sampling_share_of_decode']:.1f}%")
    if d.get("screened_head"):  # the GEMM share below then counts the head's full FLOPs
        parts.append("screened head")
    if d.get("prompt_tokens_shared"):
        parts.append(f"prefill {_num(d['prefill_ms'])} ms: {d['prompt_tokens_computed']} prompt tokens computed, "
                     f"{d['prompt_tokens_shared']} copied from rows sharing the prompt")
    if "share_of_bandwidth" in d:
        parts.append(f"weights read at {_num(d['weight_read_gb_per_s'])} GB/s = {100 * d['share_of_bandwidth']:.0f}% of the measured "
                     f"{_num(d['bandwidth_gb_per_s'])} GB/s")
    if "share_of_gemm" in d:
        parts.append(f"{100 * d['share_of_gemm']:.0f}% of a {_num(d['gemm_gflops'])} GFLOP/s GEMM")
    if "batch1_floor_ms_per_token" in d:
        parts.append(f"floor {d['batch1_floor_ms_per_token']:.3f} ms/token at {_num(d['copy_bandwidth_gb_per_s'])} GB/s")
    if "decode_steps" in d:
        parts.append(f"{d['decode_steps']} decode steps")
    if "peak_gpu_bytes" in d:
        parts.append(f"peak GPU memory {_bytes(d['peak_gpu_bytes'])}")
    if "file_bytes" in d and record["suite"] == "load":
        parts.append(f"file {_bytes(d['file_bytes'])}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Text


def machine_line(results: dict) -> str:
    c = results["context"]
    v = c.get("versions", {})
    simd = ", ".join(c.get("simd") or []) or "no AVX2"
    memory = f", {c['memory_bytes'] / 2**30:.0f} GiB" if c.get("memory_bytes") else ""
    peers = ", ".join(f"{name} {v[name]}" for name in ("torch", "transformers", "tiktoken") if v.get(name))
    commit = f" (commit {c['commit']})" if c.get("commit") else ""
    return (f"{c['cpu']} ({c['cores']} cores{memory}, {simd}; engine ISA {c.get('engine_isa') or 'n/a'}), {c['threads']} threads, "
            f"{c['os']}, Python {c['python']}; gpt_2_simple {v.get('gpt_2_simple')}{commit}, {peers}; "
            f"{c['date'][:16].replace('T', ' ')}; load average {c['load_average_start']:.1f} at the start, "
            f"{c.get('load_average_end', c['load_average_start']):.1f} at the end")


def _method(results: dict) -> str:
    o = results.get("options", {})
    quick = " **A `--quick` smoke run: small sizes and few repetitions, not figures to quote.**" if results.get("quick") else ""
    return (f"Model geometry {o.get('model', '124M')} with random weights; every figure the median of {o.get('reps', '?')} runs after a "
            f"warm-up, every ratio the median of per-round ratios against the peer measured in the same run, interleaved; each peer "
            f"in its own process (its peak RSS its own).{quick}")


def _headline_rows(results: dict, machine: str) -> list[tuple[tuple[str, str, str, str], str]]:
    """``((suite, case, peer, machine), row)`` for each headline comparison: ours, the peer, the
    ratio, the machine. A record's ``headline`` is True (against its first compared peer; older
    files) or the list of peers to show it against."""
    rows = []
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results["records"]:
        by_case.setdefault((r["suite"], r["case"]), {})[r["peer"]] = r
    for r in results["records"]:
        if not r.get("headline") or not r.get("speedup"):
            continue
        peers = [p for p in r["headline"] if p in r["speedup"]] if isinstance(r["headline"], list) else [next(iter(r["speedup"]))]
        # Runs before 2026-12-07 gave every row of a batch the same prompt (a prefix to share).
        shared = r["suite"] == "generation" and r["config"].get("batch", 1) > 1 and r["config"].get("prompts") != "distinct"
        case = f"{r['case']} (one prompt for all rows)" if shared else r["case"]
        for peer in peers:
            other = by_case[(r["suite"], r["case"])].get(peer)
            what = f"{TITLES.get(r['suite'], r['suite'])} ({r['metric']})"
            theirs = f"{_value(r['metric'], other['median'])} ({peer})" if other else peer
            rows.append(((r["suite"], r["case"], peer, machine), f"| {what} | {case} | {_value(r['metric'], r['median'])} ({r['peer']}) | "
                        f"{theirs} | {_ratio(r['speedup'][peer]['median'])} | {machine} |"))
    return rows


def _skipped(results: dict) -> list[str]:
    out = []
    for s in results.get("suites", []):
        if s["status"] != "ok":
            out.append(f"- {s['name']}: {s['status']}" + (f" ({'; '.join(s['notes'])})" if s.get("notes") else ""))
        elif s.get("notes"):
            out.append(f"- {s['name']}: {'; '.join(s['notes'])}")
    return out


def short_machine(results: dict) -> str:
    """The machine of a harness run in a few words: CPU, cores and the engine's kernel family."""
    c = results["context"]
    return f"{c['cpu']}, {c['cores']} cores, {c.get('engine_isa') or 'no engine'}"


def _gpu_summary(result: dict) -> dict:
    """A GPU results file (bench/generate_cuda.py or bench/finetune_gpu.py): its title, device (long
    and short), date, software and settings."""
    if result["benchmark"] == "generate_cuda":
        c = result["context"]
        g = result["generation"][0]
        software = f"torch {c['torch']} (CUDA {c['torch_cuda']}), transformers {c['transformers']}; gpt_2_simple {c['gpt_2_simple']} (commit {c['commit']})"
        if c.get("commit_note"):
            software += f"; {c['commit_note']}"
        return dict(title="GPU generation", gpu=c["gpu"], date=c["date"], software=software,
                    device=f"{c['gpu']} (sm_{c['capability'][0]}{c['capability'][1]}, {c['gpu_memory_bytes'] / 2**30:.0f} GiB, driver {c['driver']})",
                    what=(f"124M geometry, random weights, bf16, prompt {g['prompt']}, {g['new_tokens']} new tokens, top-k {g['top_k']}; our CUDA "
                          f"engine against transformers `generate` on the same GPU, median of {g['reps']} runs after a warm-up, interleaved; "
                          f"batch-1 floor {result['batch1_floor_ms_per_token']:.3f} ms/token (weights over the copy bandwidth measured in the "
                          f"same run, {_num(result['copy_bandwidth_gb_s'])} GB/s)"))
    reps = result["models"][0]["reps"] if result["models"] else "?"
    return dict(title="GPU fine-tuning", gpu=result["gpu"], date=result["date"],
                software=f"torch {result['torch']} (CUDA {result['torch_cuda']}), transformers {result['transformers']}; commit {result['commit']}",
                device=f"{result['gpu']} ({result['gpu_memory_bytes'] / 2**30:.0f} GiB)",
                what=(f"Random init, {result['settings']}; `finetune` against a plain transformers loop, {reps} timed run(s) per variant after "
                      "a warm-up run, interleaved"))


def readme_section(harness: list[tuple[str, dict]], *, gpu: list[tuple[str, dict]] = ()) -> str:
    """The README's Performance section (markers included): one table of the headline comparisons
    of every ``(path, results)`` of ``harness`` (e.g. a focused rerun, then a full run: where two
    give the same case, the first wins) and of every ``(path, result)`` of ``gpu``, each row naming
    its machine. The runs' details are in ``runs_section``'s text (docs/bench.md)."""
    rows: dict[tuple[str, str, str, str], str] = {}
    skipped = []
    for _, results in harness:
        # The engine's speed depends on the CPU's kernel family: a generation run on another family adds
        # rows beside the first's. Any other run of a case already shown is a rerun (the first wins).
        family = "avx512" if str(results["context"].get("engine_isa")).startswith("avx512") else str(results["context"].get("engine_isa"))
        for (suite, case, peer, _), row in _headline_rows(results, short_machine(results)):
            rows.setdefault((suite, case, peer, family if suite in ENGINE_SUITES else ""), row)
        skipped += [line for line in _skipped(results) if not (gpu and line.startswith("- gpu:"))]  # GPU files stand in
    for _, result in gpu:
        for key, row in _headline_rows({"records": gpu_records(result)}, _gpu_summary(result)["gpu"]):
            rows.setdefault(key, row)
    suites = list(TITLES)
    rows = dict(sorted(rows.items(), key=lambda item: suites.index(item[0][0]) if item[0][0] in suites else len(suites)))
    lines = [START, "## Performance", "", "Ours against each peer measured in the same run on the same machine (ratio > 1: ours better). "
             "Each run's machine, software, date, method and the command that reproduces it: "
             "[docs/bench.md](docs/bench.md#runs-behind-the-readme).", ""]
    lines += ["| What | Case | gpt_2_simple | Peer | Ratio | Machine |", "|---|---|---|---|---|---|", *rows.values(), ""]
    if skipped:
        lines += ["Not measured or with a caveat:", "", *dict.fromkeys(skipped), ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def runs_section(harness: list[tuple[str, dict]], *, gpu: list[tuple[str, dict]] = ()) -> str:
    """docs/bench.md's account of the runs behind the README table (markers included): for each
    run its file, command, machine, software, date and method, then the commands to reproduce them."""
    lines = [RUNS_START]
    commands = [PEERS_INSTALL]
    for results_path, results in harness:
        lines += [f"- `{results_path}`: measured by `{results.get('command', 'gpt_2_simple bench')}` on {machine_line(results)}. "
                  f"{_method(results)} Every table and the chart: its `.md`/`.png` beside it.", ""]
        commands.append(f"{results.get('command', 'gpt_2_simple bench')}    # python bench/run.py = gpt_2_simple bench in a checkout")
    for results_path, result in gpu:
        g = _gpu_summary(result)
        lines += [f"- `{results_path}`: **{g['title']}** on {g['device']}, {g['date'][:16].replace('T', ' ')}; {g['software']}. {g['what']}. "
                  f"Measured by `{reproduce_command(result)}`.", ""]
        commands.append(f"{reproduce_command(result)}    # needs an NVIDIA GPU (or: bash bench/gpu_check.sh)")
    files = " ".join(p for p, _ in [*harness, *gpu])
    commands.append(f"python bench/run.py --readme {files} --apply README.md   # the README table and this list")
    lines += ["To reproduce (figures vary with the machine and its load; compare ratios, not absolute numbers):", "",
              *(f"    {c}" for c in commands), "", RUNS_END]
    return "\n".join(lines) + "\n"


def suite_tables(results: dict) -> str:
    """One markdown table per suite: every record with its spread, ratios, peak RSS and notes."""
    out = []
    records = results["records"]
    for suite in results.get("suites", []):
        name = suite["name"]
        out.append(f"### {name}\n")
        if suite["status"] != "ok":
            out.append(f"{suite['status'].capitalize()}: {'; '.join(suite.get('notes') or [])}\n")
            continue
        if suite.get("notes"):
            out.append("Notes: " + "; ".join(suite["notes"]) + "\n")
        mine = [r for r in records if r["suite"] == name]
        peers = list(dict.fromkeys(p for r in mine for p in r.get("speedup", {})))
        header = ["case", "peer", "metric", "median (min-max)", *[f"vs {p}" for p in peers], "peak RSS", "notes"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in mine:
            spread = f"{_value(r['metric'], r['median'])} ({_value(r['metric'], r['min'])}-{_value(r['metric'], r['max'])})" if r["runs"] > 1 \
                else _value(r["metric"], r["median"])
            ratios = [_ratio(r["speedup"][p]["median"]) if p in r.get("speedup", {}) else "" for p in peers]
            peer = f"**{r['peer']}**" if r.get("ours") else r["peer"]
            out.append("| " + " | ".join([r["case"], peer, r["metric"], spread, *ratios, _bytes(r.get("peak_rss_bytes")), _notes(r)]) + " |")
        out.append("")
    return "\n".join(out)


def markdown(results: dict, results_path: str) -> str:
    """The ``.md`` written beside a results file: the README section, then every table."""
    return (readme_section([(results_path, results)]) + "\n" + runs_section([(results_path, results)]) + "\n## All results\n\n" + f"Machine: {machine_line(results)}.\n\n{_method(results)} "
            "Ours in bold; `vs X` is the median per-round ratio to X, oriented so that > 1 means better (faster, or less memory).\n\n"
            + suite_tables(results))


def apply_readme(readme: str, section: str, markers: tuple[str, str] = (START, END)) -> str:
    """``readme`` with the text between ``markers`` (markers included) replaced by ``section``."""
    start, end = readme.find(markers[0]), readme.find(markers[1])
    if start < 0 or end < start:
        raise ValueError(f"the file has no {markers[0]} ... {markers[1]} pair: add the two lines where the section belongs")
    return readme[:start] + section.rstrip("\n") + readme[end + len(markers[1]):]


# ---------------------------------------------------------------------------------------------
# Chart


def chart_panels(results: dict) -> list[dict]:
    """One panel per suite with comparisons: each case a group of bars, each bar a peer's figure
    relative to the case's reference peer (the first it is compared with), > 1 = better."""
    panels = []
    for suite in results.get("suites", []):
        cases: dict[str, dict[str, dict]] = {}
        for r in results["records"]:
            if r["suite"] == suite["name"]:
                cases.setdefault(r["case"], {})[r["peer"]] = r
        groups, rows, series = [], [], []
        reference_names = []
        for case, by_peer in cases.items():
            reference = next((p for r in by_peer.values() for p in r.get("speedup", {})), None)
            if reference is None or reference not in by_peer:
                continue
            ref = by_peer[reference]
            groups.append(case)
            reference_names.append(reference)
            row = {}
            for peer, r in by_peer.items():
                if peer not in series:
                    series.append(peer)
                row[peer] = r["median"] / ref["median"] if r["higher_is_better"] else ref["median"] / r["median"]
            rows.append(row)
        if groups:
            refs = "/".join(dict.fromkeys(reference_names))
            metrics = "/".join(dict.fromkeys(r["metric"] for c in cases.values() for r in c.values()))
            panels.append({"title": f"{suite['name']}: {metrics} relative to {refs} (log scale, higher is better)", "groups": groups,
                           "series": series, "values": [[row.get(s) for s in series] for row in rows]})
    return panels


def chart_figure(results: dict):
    """A matplotlib Figure with one grouped bar chart per panel of ``chart_panels``: bars grow from
    1 (the reference peer, a darker line) up or down on a log scale, one colour per peer."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogFormatter

    panels = chart_panels(results)
    fig = Figure(figsize=(10, 3.6 * max(1, len(panels))), dpi=100, layout="constrained")
    if not panels:
        fig.text(0.5, 0.5, "no comparisons in this results file", ha="center", va="center")
        return fig
    for ax, panel in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        groups, series = panel["groups"], panel["series"]
        width = 0.8 / len(series)
        for s, name in enumerate(series):
            xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
            values = [row[s] for row in panel["values"]]
            shown = [(x, v) for x, v in zip(xs, values) if v is not None and v > 0 and math.isfinite(v)]
            if shown:
                x, v = zip(*shown)
                ax.bar(x, [vi - 1.0 for vi in v], width=width, bottom=1.0, label=name, color=f"C{s}")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1.4, not 1.4 x 10^0
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))  # labelled on short ranges
        ax.axhline(1.0, color="#404040", linewidth=1.0)
        slanted = len(groups) > 3
        ax.set_xticks(range(len(groups)), groups, rotation=15 if slanted else 0, ha="right" if slanted else "center")
        ax.set_ylabel("ratio (> 1: better)")
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(True, axis="y", which="both", color="#e8e8e8", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, loc="best")
    return fig


def chart_png(results: dict) -> bytes:
    return png_of(chart_figure(results))
