"""The benchmark harness end to end at its smallest size (``bench/run.py --quick --model tiny``,
the fast suites, one repetition): the results file, the markdown and PNG beside it, the README
section and its markers, the GPU results files of bench/generate_cuda.py and bench/finetune_gpu.py,
and the one-line errors. Nothing timed is asserted: figures are compared with the JSON they came from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from gpt_2_simple import cli
from gpt_2_simple.benchmark import gpu, harness, report

ROOT = Path(__file__).resolve().parents[1]
H200_GENERATE = ROOT / "bench" / "results" / "generate_cuda-20261126-h200-sampler.json"
H200_FINETUNE = ROOT / "bench" / "results" / "finetune_gpu-20261126-h200.json"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # The bench scripts choose the package themselves (bench/checkout.py): the checkout's sources
    # after a development build, else the installed one, as on a clean clone in CI.
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real run: the load and tokenizer suites on the tiny geometry, and the gpu suite."""
    out = tmp_path_factory.mktemp("bench")
    proc = _run("bench/run.py", "--quick", "--model", "tiny", "--suites", "load,tokenizer,gpu", "--reps", "1", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("*-quick.json")
    return proc, path, json.loads(path.read_text())


def test_results_file_has_records(quick_run):
    _, path, results = quick_run
    assert results["schema"] == report.SCHEMA and results["quick"] is True
    assert [s["name"] for s in results["suites"]] == ["load", "tokenizer", "gpu"]
    assert results["command"] == "python bench/run.py --suites load,tokenizer,gpu --quick --reps 1 --model tiny"
    assert results["context"]["cores"] >= 1 and results["context"]["memory_bandwidth_gb_per_s"] > 0
    for suite in ("load", "tokenizer"):
        assert next(s for s in results["suites"] if s["name"] == suite)["status"] == "ok"
        records = [r for r in results["records"] if r["suite"] == suite]
        assert any(r["ours"] for r in records) and any(not r["ours"] for r in records)
        for r in records:
            assert r["runs"] == 1 and len(r["samples"]) == 1
            assert r["min"] <= r["median"] <= r["max"] and r["median"] > 0
            assert r["peak_rss_bytes"] > 0
            for other, ratio in r.get("speedup", {}).items():
                peer = next(x for x in records if x["peer"] == other and x["case"] == r["case"])
                expected = r["samples"][0] / peer["samples"][0] if r["higher_is_better"] else peer["samples"][0] / r["samples"][0]
                assert ratio["median"] == pytest.approx(expected)
    load_peers = {r["peer"] for r in results["records"] if r["suite"] == "load"}
    assert {"engine-bf16", "open-bf16", "safetensors"} <= load_peers
    tokenizer = {r["peer"]: r for r in results["records"] if r["suite"] == "tokenizer"}
    if "tiktoken" in tokenizer:
        assert "tiktoken" in tokenizer["ours"]["speedup"]
        assert next(r for r in results["records"] if r["suite"] == "tokenizer")["config"]["ids_identical"] is True


@pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA: the gpu suite runs instead of being skipped")
def test_gpu_suite_skipped_with_a_clear_line(quick_run):
    proc, path, results = quick_run
    assert re.search(r"^gpu: skipped, no CUDA here: \S", proc.stderr, re.M)
    suite = next(s for s in results["suites"] if s["name"] == "gpu")
    assert suite["status"] == "skipped" and suite["notes"][0].startswith("no CUDA here: ")
    assert not [r for r in results["records"] if r["suite"] == "gpu"]
    assert f"Skipped: {suite['notes'][0]}" in path.with_suffix(".md").read_text()


def _close(text: str, value: float) -> bool:
    """A figure as printed (``1,234``, ``12.3``, ``0.0123``, ``4.5 ms``, ``2.1x``) equals ``value`` to its last digit."""
    number, unit = re.fullmatch(r"([\d,.e+-]+)\s*(ms|s|us|x)?", text.strip()).groups()
    shown = float(number.replace(",", ""))
    if unit == "ms":
        shown /= 1e3
    digits = len(number.split(".")[1]) if "." in number and "e" not in number else 0
    tolerance = 0.5 * 10**-digits * (1e-3 if unit == "ms" else 1) if "e" not in number else abs(shown) * 5e-3
    return abs(shown - value) <= tolerance * 1.0001 + 1e-12


def _md_rows(md: str, suite: str) -> list[dict]:
    section = md.split(f"### {suite}\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_markdown_has_the_numbers_of_the_json(quick_run):
    _, path, results = quick_run
    md = path.with_suffix(".md").read_text()
    assert md.startswith(report.START)
    for suite in ("load", "tokenizer"):
        records = [r for r in results["records"] if r["suite"] == suite]
        rows = _md_rows(md, suite)
        assert len(rows) == len(records)
        for r, row in zip(records, rows):
            assert row["case"] == r["case"] and row["peer"].strip("*") == r["peer"] and row["metric"] == r["metric"]
            assert _close(row["median (min-max)"], r["median"]), (row, r["median"])
            for other, ratio in r.get("speedup", {}).items():
                assert _close(row[f"vs {other}"], ratio["median"]), (row, other, ratio)
    headline = [r for r in results["records"] if r["headline"] and r.get("speedup")]
    section = md.split(report.END)[0]
    for r in headline:
        row = next(line for line in section.splitlines() if line.startswith("|") and f"| {r['case']} |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert _close(cells[2].split(" (")[0], r["median"]) and _close(cells[4], next(iter(r["speedup"].values()))["median"])


def test_png_is_valid(quick_run):
    """The chart decodes, is not blank, and shows every comparison of the results file."""
    _, path, results = quick_run
    image = matplotlib.image.imread(path.with_suffix(".png"))
    panels = report.chart_panels(results)
    assert panels and image.shape == (int(3.6 * len(panels) * 100), 1000, 4)
    assert len(np.unique(np.rint(image[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)) > 20
    fig = report.chart_figure(results)
    for ax, panel in zip(fig.axes, panels):
        assert ax.get_title() == panel["title"] and ax.get_yscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == panel["groups"]
        drawn = [(name, column) for name, column in zip(panel["series"], zip(*panel["values"])) if any(column)]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [name for name, _ in drawn]
        assert len(ax.containers) == len(drawn)
        for container, (_, column) in zip(ax.containers, drawn):  # each bar spans 1 .. the ratio
            tops = [bar.get_y() + bar.get_height() for bar in container]
            np.testing.assert_allclose(tops, [v for v in column if v], rtol=1e-12)


README = "# Title\n\nIntro.\n\n{start}\nold text\n{end}\n\n## Next\nunchanged\n"


def test_readme_apply_replaces_the_marker_sections_idempotently(quick_run, tmp_path, capsys):
    _, path, results = quick_run
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "bench.md"
    readme.write_text(README.format(start=report.START, end=report.END))
    docs.parent.mkdir()
    docs.write_text(README.format(start=report.RUNS_START, end=report.RUNS_END))
    before, after = README.split("{start}")[0], README.split("{end}")[1]
    assert cli.main(["bench", "--readme", str(path), str(H200_GENERATE), str(H200_FINETUNE), "--apply", str(readme)]) == 0
    section = capsys.readouterr().out
    text, runs = readme.read_text(), docs.read_text()
    assert text == before + section.rstrip("\n") + after
    assert text.count(report.START) == 1 and text.count(report.END) == 1 and "old text" not in text
    assert runs.startswith(before) and runs.endswith(after) and "old text" not in runs
    # The README: one table, each row naming its machine; the runs' details go to docs/bench.md.
    assert section.count("| What | Case |") == 1 and results["context"]["cpu"] in section
    assert results["command"] in runs and results["context"]["cpu"] in runs
    gen, ft = json.loads(H200_GENERATE.read_text()), json.loads(H200_FINETUNE.read_text())
    for result in (gen, ft):  # each GPU file: device, date, command in the list of runs
        assert gpu.reproduce_command(result) in runs
    assert f"{gen['context']['gpu']} (sm_90" in runs and gen["context"]["date"][:16].replace("T", " ") in runs
    assert f"**GPU fine-tuning** on {ft['gpu']}" in runs and ft["date"][:16].replace("T", " ") in runs
    for g in gen["generation"]:
        row = next(line for line in section.splitlines() if f"| generate, batch {g['batch']} |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert _close(cells[4], g["ratio_to_transformers_median_of_pairs"]) and cells[5] == gen["context"]["gpu"]
    assert cli.main(["bench", "--readme", str(path), str(H200_GENERATE), str(H200_FINETUNE), "--apply", str(readme)]) == 0
    assert readme.read_text() == text and docs.read_text() == runs  # idempotent


def test_readme_takes_reruns_then_a_full_run_in_order(quick_run, tmp_path):
    _, path, results = quick_run
    rerun = json.loads(path.read_text(encoding="utf-8"))
    rerun["command"] = "python bench/run.py --suites tokenizer --reps 1"
    rerun["context"]["date"] = "2031-01-02T03:04:05+00:00"
    rerun["context"]["cpu"] = "Rerun CPU"
    rerun_path = tmp_path / "rerun.json"
    rerun_path.write_text(json.dumps(rerun), encoding="utf-8")
    runs = report.runs_section([(str(rerun_path), rerun), (str(path), results)])
    first, second = runs.index(f"measured by `{rerun['command']}`"), runs.index(f"measured by `{results['command']}`")
    assert first < second and "2031-01-02 03:04" in runs[:second]
    assert f"--readme {rerun_path} {path} --apply README.md" in runs
    # Each case once, from the first file that has it: every headline row names the rerun's machine.
    section = harness.readme([str(rerun_path), str(path)])
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| What")]
    assert rows and all(line.rstrip(" |").endswith("Rerun CPU, " + f"{rerun['context']['cores']} cores, {rerun['context']['engine_isa']}")
                        for line in rows)
    assert len(rows) == len({tuple(line.split(" | ")[:2]) for line in rows})
    assert rerun_path.with_suffix(".md").is_file() and rerun_path.with_suffix(".png").is_file()


def test_readme_keeps_each_kind_of_cpu_and_each_listed_peer(quick_run, tmp_path):
    _, path, results = quick_run
    # The same run again on a CPU of another kind: its generation rows come beside the first run's,
    # its other suites' rows (not the engine's kernels: load, tokenizer) are reruns, the first wins.
    other = json.loads(path.read_text(encoding="utf-8"))
    other["context"]["engine_isa"] = "neondot" if results["context"]["engine_isa"] != "neondot" else "avx2"
    other["context"]["cpu"] = "Other CPU"
    # One record shown against two peers (a list), as the generation suite does for llama.cpp: per-round
    # ratios 10/2, 12/3 (median 4.5) and 10/5, 12/6.
    from gpt_2_simple.benchmark.common import case_records

    records = case_records("generation", "batch 1, prompt 16", {}, {"engine-bf16": [10.0, 12.0], "transformers": [2.0, 3.0],
                           "llama.cpp-f16": [5.0, 6.0]}, metric="tokens/s", ours={"engine-bf16"},
                           compare_to=["transformers", "llama.cpp-f16"], headline={"engine-bf16": ["transformers", "llama.cpp-f16"]})
    other["records"] = other["records"] + records
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other), encoding="utf-8")
    section = harness.readme([str(path), str(other_path)])
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| What")]
    mine = [r for r in rows if results["context"]["cpu"] in r]
    theirs = [r for r in rows if "Other CPU" in r]
    assert mine and len(theirs) == 2
    generation = [[c.strip() for c in r.strip("|").split("|")] for r in theirs if r.startswith("| Generation")]
    assert [(c[3], c[4]) for c in generation] == [("2.50 (transformers)", "4.50x"), ("5.50 (llama.cpp-f16)", "2.00x")]


def test_gpu_records_carry_the_files_figures():
    for file in (H200_GENERATE, H200_FINETUNE):
        result = json.loads(file.read_text())
        kind, loaded = report.load_any(file)
        assert kind == "gpu" and loaded == result
        records = gpu.records(result)
        assert records and all(r["suite"] == "gpu" and r["min"] <= r["median"] <= r["max"] for r in records)
        if result["benchmark"] == "generate_cuda":
            for g in result["generation"]:
                mine = {r["peer"]: r for r in records if r["case"] == f"generate, batch {g['batch']}"}
                assert {p: r["median"] for p, r in mine.items()} == {p: s["median"] for p, s in g["tokens_per_s"].items()}
                assert mine["engine"]["speedup"]["transformers"]["median"] == g["ratio_to_transformers_median_of_pairs"]
                inside = [r for r in records if r["case"] == f"sampler in generate, batch {g['batch']}, top_k_{g['top_k']}"]
                share, step_ms = g["engine_sample_share_of_decode"], g["engine_decode_ms_per_step"]["median"]
                assert [r["median"] for r in inside] == [pytest.approx(share * step_ms * 1e3)]
            assert len([r for r in records if r["metric"] == "microseconds"]) == len(result["sampling"]) + len(result["generation"])
        else:
            for m in result["models"]:
                mine = {r["peer"]: r for r in records if r["config"]["model"] == m["model"]}
                assert {p: r["median"] for p, r in mine.items()} == {p: s["median"] for p, s in m["tokens_per_s"].items()}
                assert {p: r["details"]["peak_gpu_bytes"] for p, r in mine.items()} == m["peak_gpu_bytes"]


def test_readme_errors_are_one_line(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert cli.main(["bench", "--readme", str(H200_GENERATE), "--apply", str(readme)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "performance:start" in err and readme.read_text() == "# no markers\n"
    not_results = tmp_path / "x.json"
    not_results.write_text("{}")
    assert cli.main(["bench", "--readme", str(not_results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.json is neither" in err


def test_bad_suites_exit_2_with_one_line(tmp_path):
    proc = _run("bench/run.py", "--suites", "load,nonsense", "--output_dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown suite(s) nonsense" in proc.stderr and "generation" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_batches_and_prompts_choose_the_generation_cases(tmp_path):
    out = tmp_path / "results"
    proc = _run("bench/run.py", "--quick", "--model", "tiny", "--suites", "generation", "--batches", "3", "--prompts", "5",
                "--reps", "1", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("*-quick.json")
    results = json.loads(path.read_text(encoding="utf-8"))
    assert results["command"].endswith("--batches 3 --prompts 5")
    assert results["options"]["batches"] == [3] and results["options"]["prompts"] == [5]
    assert {r["case"] for r in results["records"]} == {"batch 3, prompt 5"}
    assert {r["peer"] for r in results["records"]} >= {"engine-fp32", "engine-bf16", "engine-int8", "torch"}


def test_peers_choose_the_generation_peers(tmp_path):
    out = tmp_path / "results"
    proc = _run("bench/run.py", "--quick", "--model", "tiny", "--suites", "generation", "--batches", "2", "--prompts", "4",
                "--reps", "1", "--peers", "engine-int8,torch", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("*-quick.json")
    results = json.loads(path.read_text(encoding="utf-8"))
    assert results["options"]["peers"] == ["engine-int8", "torch"]
    assert {r["peer"] for r in results["records"]} == {"engine-int8", "torch"}
    (int8,) = [r for r in results["records"] if r["peer"] == "engine-int8"]
    assert int8["details"]["file_bytes"] > 0 and not int8["details"]["screened_head"]  # an int8 head needs no screen


def test_bad_peers_exit_2_with_one_line(tmp_path):
    proc = _run("bench/run.py", "--suites", "generation", "--peers", "engine-int4", "--output_dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--peers: unknown peer(s) engine-int4; choose from" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option, value", [("--batches", "1,0"), ("--prompts", "16,x"), ("--batches", "")])
def test_bad_sizes_exit_2_with_one_line(option, value, tmp_path):
    proc = _run("bench/run.py", "--suites", "generation", option, value, "--output_dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{option}: expected positive integers" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA")
@pytest.mark.parametrize("script, args", [
    ("bench/generate_cuda.py", ["--reps", "3", "--batch", "1", "64", "256"]),  # bench/gpu_check.sh's command lines
    ("bench/finetune_gpu.py", ["--reps", "1", "--steps", "20", "--warmup-steps", "8"]),
])
def test_gpu_scripts_skip_with_one_line(script, args, tmp_path):
    out = tmp_path / "out.json"
    proc = _run(script, *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rf"{re.escape(script)}: skipped, no CUDA here: [^\n]+\n", proc.stdout)
    assert not out.exists()
