"""The pieces of `gpt_2_simple generate` at scale that need no model: prompts files, the sample
plan and its seeds, JSONL records with torn lines, gen/ file names, sharding and merging."""

import json
import os
import re

import pytest

from gpt_2_simple.batch import (
    Prompt,
    Shard,
    merge,
    open_new_file,
    part_path,
    plan_samples,
    read_prompts,
    read_records,
)

PLAN = dict(length=20, temperature=0.7, top_k=0, top_p=0.0, seed=5)


def test_text_prompts_one_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffFirst prompt \r\n\n  \nSecond: {not json}\nthird <|endoftext|>\n".encode())
    prompts = read_prompts(path)
    assert [p.text for p in prompts] == ["First prompt ", "Second: {not json}", "third <|endoftext|>"]
    assert prompts[1].where.endswith("prompts.txt line 4")


def test_jsonl_prompts_with_settings(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "A", "temperature": 0, "seed": 7}, {"prompt": None, "length": 5}, {"prompt": "C\nD", "top_p": 0.9, "top_k": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    a, b, c = read_prompts(path)
    assert (a.text, a.temperature, a.seed) == ("A", 0, 7)
    assert (b.text, b.length) == (None, 5)
    assert (c.text, c.top_p, c.top_k) == ("C\nD", 0.9, 3)
    # Detected by content too, whatever the extension.
    other = tmp_path / "p.txt"
    other.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert read_prompts(other) == [Prompt(p.text, p.where.replace("p.jsonl", "p.txt"), p.temperature, p.top_k, p.top_p, p.length, p.seed) for p in (a, b, c)]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has no prompts"),
        ("\n  \n", "has no prompts"),
        ('{"prompt": "a"}\n{"prompt": "b"\n', r"line 2: not valid JSON"),
        ('{"prompt": "abc}\n', r"line 1: not valid JSON \(Unterminated string starting at column 12\)"),  # not "at at"
        ('{"prompt": "a"}\n\n{"prompt": "b", "temp": 1}\n', r"line 3: unknown field 'temp'"),
        ('{"prompt": "a"}\n["b"]\n', r"line 2: expected a JSON object"),
        ('{"prompt": "a"}\n{"length": 3}\n', r'line 2: missing the "prompt" field'),
        ('{"prompt": 3}\n', r'line 1: "prompt" must be a string'),
    ],
)
def test_bad_prompts_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_bad_row_settings_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "top_p": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.jsonl line 2: top_p"):
        plan_samples(read_prompts(path), repeats=1, nsamples=1, **PLAN)
    path.write_text('{"prompt": "a", "seed": -1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.jsonl line 1: seed"):
        plan_samples(read_prompts(path), repeats=1, nsamples=1, **PLAN)


def test_plan_order_and_seeds():
    prompts = [Prompt("a"), Prompt("b", seed=11, temperature=0.0), Prompt(None, length=3)]
    specs = plan_samples(prompts, repeats=2, nsamples=2, **PLAN)
    assert [s.prompt for s in specs] == ["a", "a", "b", "b", None, None] * 2
    # The command's seed keys a sample by its place; a row's own seed keys its samples 0, 1, ...
    assert [(s.seed, s.sample_index) for s in specs] == [
        (5, 0), (5, 1), (11, 0), (11, 1), (5, 4), (5, 5),
        (5, 6), (5, 7), (11, 2), (11, 3), (5, 10), (5, 11),
    ]
    assert [s.temperature for s in specs[:4]] == [0.7, 0.7, 0.0, 0.0]
    assert [s.length for s in specs[4:6]] == [3, 3]
    # Every (seed, sample_index) pair is distinct, so no two samples share their random draws.
    assert len({(s.seed, s.sample_index) for s in specs}) == len(specs)


def _record(i, text="t"):
    return json.dumps({"index": i, "prompt": None, "text": text, "seed": 1, "sample_index": i,
                       "finish_reason": "length", "tokens": 3}, ensure_ascii=False) + "\n"


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = _record(0) + _record(2, "é\n") + _record(1)
    path.write_text(whole + _record(3)[:25], encoding="utf-8")
    assert sorted(read_records(path)) == [0, 1, 2]
    assert path.read_text(encoding="utf-8").endswith(_record(3)[:25])  # reading alone changes nothing
    assert sorted(read_records(path, repair=True)) == [0, 1, 2]
    assert path.read_text(encoding="utf-8") == whole
    # A complete last record that only lacks its newline is kept, and the newline added.
    path.write_text(whole + _record(3)[:-1], encoding="utf-8")
    assert sorted(read_records(path, repair=True)) == [0, 1, 2, 3]
    assert path.read_text(encoding="utf-8") == whole + _record(3)


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "out.jsonl"
    original = _record(0) + "garbage\n" + _record(1)
    path.write_text(original, encoding="utf-8")
    with pytest.raises(ValueError, match="out.jsonl line 2: not a sample record"):
        read_records(path, repair=True)
    assert path.read_text(encoding="utf-8") == original  # user data untouched
    path.write_text(_record(0) + _record(0), encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: sample 0 appears twice"):
        read_records(path)


def test_gen_file_names_never_collide(tmp_path):
    (tmp_path / "keep.txt").write_text("user file", encoding="utf-8")
    files = [open_new_file(tmp_path) for _ in range(12)]
    for f in files:
        f.write("x\r\ny")
        f.close()
    names = sorted(os.path.basename(f.name) for f in files)
    assert len(set(names)) == 12
    for name in names:
        assert re.fullmatch(r"gpt2_gentext_\d{8}_\d{6}(_\d{3})?\.txt", name), name
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "user file"
    assert (tmp_path / names[0]).read_bytes() == b"x\r\ny"  # '\n' is written as is on every OS


def test_shard_from_env():
    assert Shard.from_env({}) == Shard(0, 1, 0, 1)
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == Shard(3, 4, 1, 2)
    assert Shard.from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2, 1, 2)
    with pytest.raises(ValueError, match="RANK must be in"):
        Shard.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="integers"):
        Shard.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_pin_device_gives_each_local_rank_one_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    Shard(3, 4, 1, 2).pin_device()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    Shard(2, 4, 0, 2).pin_device()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_merge_orders_and_checks_completeness(tmp_path):
    out = tmp_path / "out.jsonl"
    part0, part1 = part_path(out, Shard(0, 2)), part_path(out, Shard(1, 2))
    part0.write_text(_record(2) + _record(0), encoding="utf-8")
    part1.write_text(_record(3) + _record(1) + _record(5)[:10], encoding="utf-8")  # torn tail ignored
    with pytest.raises(ValueError, match=r"1 sample missing \(4\)"):
        merge(out, total=5)
    assert part0.exists() and part1.exists() and not out.exists()
    assert merge(out) == 4
    assert out.read_text(encoding="utf-8") == "".join(_record(i) for i in range(4))
    assert not part0.exists() and not part1.exists()
    with pytest.raises(FileNotFoundError, match="nothing to merge"):
        merge(tmp_path / "other.jsonl")
