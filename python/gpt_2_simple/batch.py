"""``gpt_2_simple generate`` at scale: prompts files, crash-safe JSONL output with resume, the
original's ``gen/`` text files, and sharding across processes (torchrun or RANK/WORLD_SIZE).

Every sample of a command has a fixed place in one list (file, then prompt, then sample), and
with ``--seed`` a fixed RNG key, so the output is the same whatever the batch size, however often
the run is interrupted and resumed, and however many processes share it. Never imports torch:
torchrun only sets environment variables.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from .fileio import atomic_write
from .generate import (
    GeneratedSample,
    GenerateSettings,
    InOrder,
    SampleSpec,
    check_seed,
    check_settings,
    generate_samples,
    load_engine,
    model_source,
    random_seed,
)

__all__ = ["Prompt", "read_prompts", "plan_samples", "read_records", "Shard", "part_path", "merge", "run_generate"]

PROMPT_FIELDS = ("prompt", "temperature", "top_k", "top_p", "length", "seed")
# What decides a text besides its prompt and seed: recorded in every record, so --resume can refuse
# to add texts made otherwise (a file holding rows of 597 tokens and rows of 21, with no reason given).
SETTING_FIELDS = ("length", "temperature", "top_k", "top_p", "truncate", "include_prefix", "model")
RECORD_FIELDS = ("index", "prompt", "text", "seed", "sample_index", "finish_reason", "tokens", *SETTING_FIELDS)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Prompt:
    """One prompt and the settings it overrides (None: the command's)."""

    text: str | None
    where: str = ""  # for error messages: 'prompts.jsonl line 3'
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    length: int | None = None
    seed: int | None = None


def _count(n: int, noun: str) -> str:
    """'1 sample', '2 samples'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _json_prompt(line: str, where: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        at = "" if e.msg.endswith(" at") else " at"  # json's "Unterminated string starting at" ends in it already
        raise ValueError(f"{where}: not valid JSON ({e.msg}{at} column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f'{where}: expected a JSON object like {{"prompt": "..."}}, got {type(row).__name__}')
    unknown = [k for k in row if k not in PROMPT_FIELDS]
    if unknown:
        raise ValueError(f"{where}: unknown field {', '.join(map(repr, unknown))}; the fields are {', '.join(PROMPT_FIELDS)}")
    if "prompt" not in row:
        raise ValueError(f'{where}: missing the "prompt" field')
    if row["prompt"] is not None and not isinstance(row["prompt"], str):
        raise ValueError(f'{where}: "prompt" must be a string (or null to start from <|endoftext|>), got {row["prompt"]!r}')
    return Prompt(row["prompt"] or None, where, **{k: v for k, v in row.items() if k != "prompt"})


def _looks_like_jsonl(line: str) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "prompt" in row


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a text file (one per line; blank lines skipped) or JSONL (``.jsonl``, or a file
    whose first line is a JSON object with a "prompt" field) with optional per-row settings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise ValueError(f'prompts file {path} has no prompts: write one per line, or JSONL rows like {{"prompt": "..."}}')
    jsonl = path.suffix.lower() in JSONL_SUFFIXES or _looks_like_jsonl(lines[0][1])
    if jsonl:
        return [_json_prompt(line, f"{path} line {n}") for n, line in lines]
    return [Prompt(line, f"{path} line {n}") for n, line in lines]


def plan_samples(prompts: list[Prompt], *, repeats: int, nsamples: int, length: int, temperature: float, top_k: int,
                 top_p: float, seed: int) -> list[SampleSpec]:
    """Every sample of the command in output order: ``repeats`` times (the gen/ files) each prompt
    ``nsamples`` times. A row's own seed keys its samples 0, 1, ... (reproducible row by row);
    the command's seed keys each sample by its place in the list."""
    specs: list[SampleSpec] = []
    for repeat in range(repeats):
        for p in prompts:
            settings = dict(length=length, temperature=temperature, top_k=top_k, top_p=top_p)
            settings.update({k: getattr(p, k) for k in settings if getattr(p, k) is not None})
            check_settings(**settings, where=p.where)
            check_seed(p.seed, where=p.where)
            for k in range(nsamples):
                if p.seed is None:
                    specs.append(SampleSpec(p.text, **settings, seed=seed, sample_index=len(specs)))
                else:
                    specs.append(SampleSpec(p.text, **settings, seed=p.seed, sample_index=repeat * nsamples + k))
    return specs


# ---- JSONL output -----------------------------------------------------------------------------


def model_fingerprint(path: str | os.PathLike) -> str:
    """16 hex digits naming a model file's content: its config, dtype, tokenizer and every tensor's
    name, shape and CRC-32 (from the file's table: no data is read). The same weights exported again
    give the same fingerprint; other weights, another dtype or another tokenizer another one."""
    from .export import inspect

    info = inspect(path)
    table = [(t["name"], list(t["shape"]), t["dtype"], t["crc32"]) for t in info["tensors"]]
    h = hashlib.sha256(json.dumps([info["config"], info["dtype"], table], sort_keys=True).encode())
    for token in info["token_bytes"]:
        h.update(len(token).to_bytes(4, "little") + token)
    h.update(info["merges"])
    return h.hexdigest()[:16]


def record_settings(spec: SampleSpec, settings: GenerateSettings, model: str) -> dict:
    return dict(length=spec.length, temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                truncate=settings.truncate, include_prefix=settings.include_prefix, model=model)


def to_record(index: int, sample: GeneratedSample, recorded: dict) -> dict:
    spec = sample.spec
    return dict(index=index, prompt=spec.prompt, text=sample.text, seed=spec.seed, sample_index=spec.sample_index,
                finish_reason=sample.finish_reason, tokens=sample.n_tokens, **recorded)


def _dump(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def read_records(path: Path, *, repair: bool = False) -> dict[int, dict]:
    """The records of an output (or part) file by index. A torn last line (a crash mid-write) is
    ignored, and cut off when ``repair``; damage anywhere else is an error naming the line."""
    data = path.read_bytes()
    records: dict[int, dict] = {}
    lines = data.split(b"\n")
    end = 0  # bytes of complete, valid records
    for n, raw in enumerate(lines, start=1):
        last = n == len(lines)  # the text after the final newline: empty unless torn
        if last and not raw:
            break
        try:
            record = json.loads(raw)
            index = record["index"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError
        except (ValueError, TypeError, KeyError):
            if last:
                break
            raise ValueError(f"{path} line {n}: not a sample record; fix or delete that line, then --resume") from None
        if index in records:
            raise ValueError(f"{path} line {n}: sample {index} appears twice; delete one of them, then --resume")
        records[index] = record
        end += len(raw) + 1
    if repair and end != len(data):
        with open(path, "r+b") as f:  # drop the torn tail (or add the missing final newline)
            if end > len(data):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(end)
    return records


def _write_sorted(path: Path, records: dict[int, dict]) -> None:
    with atomic_write(path, "w") as f:
        for index in sorted(records):
            f.write(_dump(records[index]))


# ---- sharding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This process's share of the samples: every ``world``-th one, from ``rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, env=os.environ) -> "Shard":
        """From torchrun's (or any launcher's) RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE."""
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE): got RANK={rank}, WORLD_SIZE={world}")
        return cls(rank, world, local_rank, max(1, local_world))

    def pin_device(self) -> None:
        """One GPU per process: expose only the LOCAL_RANK-th visible GPU (before CUDA starts)."""
        if self.world == 1:
            return
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[self.local_rank % len(visible)] if visible else str(self.local_rank)

    def threads(self) -> int | None:
        """CPU threads when none were asked for: the cores split between this machine's processes."""
        return None if self.local_world == 1 else max(1, (os.cpu_count() or 1) // self.local_world)


def part_path(output: Path, shard: Shard) -> Path:
    return output.with_name(f"{output.name}.part-{shard.rank:05d}-of-{shard.world:05d}")


def _part_files(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{output.name}.part-*-of-*"))


def _existing_records(output: Path, repair: Path | None = None) -> dict[int, dict]:
    """Records already in the output and in any part files; ``repair`` (the file this process
    appends to) loses its torn last line."""
    records: dict[int, dict] = {}
    for path in [output, *_part_files(output)]:
        try:
            found = read_records(path, repair=path == repair)
        except FileNotFoundError:  # no output yet, or a part merged away meanwhile
            continue
        for index, record in found.items():
            records.setdefault(index, record)
    return records


def merge(output: str | os.PathLike, total: int | None = None) -> int:
    """Merge the part files of a sharded run (and the output, if any) into ``output`` in sample
    order, then delete the parts. Returns the number of samples."""
    output = Path(output)
    parts = _part_files(output)
    if not parts and not output.exists():
        raise FileNotFoundError(f"no {output} and no part files {output.name}.part-*: nothing to merge")
    records = _existing_records(output)
    expected = total if total is not None else max(records, default=-1) + 1
    missing = [i for i in range(expected) if i not in records]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{output}: {_count(len(missing), 'sample')} missing ({shown}); rerun the command with --resume to finish them")
    _write_sorted(output, records)
    for part in parts:
        part.unlink()
    return len(records)


def _wait_for_ranks(output: Path, total: int, poll_s: float = 0.5) -> None:
    """Rank 0: wait until the output and the parts hold every sample (counting lines is cheap;
    the records are read once the count says they may all be there)."""
    with tqdm(total=total, desc="waiting for the other ranks", unit="sample", leave=False) as bar:
        while True:
            lines = 0
            for path in [output, *_part_files(output)]:
                with contextlib.suppress(FileNotFoundError):
                    lines += path.read_bytes().count(b"\n")
            if lines >= total and len(_existing_records(output)) >= total:
                return
            bar.update(min(lines, total) - bar.n)
            time.sleep(poll_s)


# ---- the gen/ text files ----------------------------------------------------------------------


def open_new_file(folder: Path) -> IO[str]:
    """A new ``gpt2_gentext_<UTC time>.txt`` in ``folder``; a name taken (several files a second,
    or another process) gets a suffix ``_001``, ``_002``... Existing files are never touched."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    for n in itertools.count():
        path = folder / f"gpt2_gentext_{stamp}{f'_{n:03d}' if n else ''}.txt"
        try:
            return open(path, "x", encoding="utf-8", newline="\n")
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


class GenFiles:
    """Writes samples, in order, into one new file per ``per_file`` samples (the original's layout)."""

    def __init__(self, folder: Path, per_file: int, sample_delim: str):
        self.folder, self.per_file = folder, per_file
        self.delim = "" if per_file == 1 else sample_delim  # the original's rule for one text per file
        self.file: IO[str] | None = None
        self.file_no = -1
        self.paths: list[str] = []

    def write(self, index: int, sample: GeneratedSample) -> None:
        if index // self.per_file != self.file_no:
            self.close()
            self.file_no = index // self.per_file
            self.file = open_new_file(self.folder)
            self.paths.append(self.file.name)
        self.file.write(f"{sample.text}\n{self.delim}")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---- the command ------------------------------------------------------------------------------


class Progress:
    """The tqdm bar (samples, tokens/s, ETA) and the end-of-run summary."""

    def __init__(self, total: int, shard: Shard):
        self.tokens, self.samples, self.start = 0, 0, time.perf_counter()
        self.label = f"rank {shard.rank}/{shard.world}: " if shard.world > 1 else ""
        self.bar = tqdm(total=total, unit="sample", desc=f"{self.label}generating", disable=shard.rank != 0 or None)

    def update(self, sample: GeneratedSample) -> None:
        self.tokens += sample.n_tokens
        self.samples += 1
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.tokens / max(elapsed, 1e-9):.1f} tokens/s", refresh=False)
        self.bar.update(1)

    def summary(self, seed: int) -> str:
        self.bar.close()
        wall = time.perf_counter() - self.start
        rate = self.tokens / wall if wall > 0 else 0.0
        ms = 1000 * wall / self.tokens if self.tokens else 0.0
        return (f"{self.label}{_count(self.samples, 'sample')}, {_count(self.tokens, 'token')} in {wall:.1f} s: "
                f"{rate:.1f} tokens/s, {ms:.2f} ms/token (seed {seed})")


def _check_resumable(existing: dict[int, dict], specs: list[SampleSpec], output: Path, settings: GenerateSettings,
                     model: str | None = None) -> None:
    """Refuse to add texts to an output made otherwise: other prompts, seed, settings or (when
    ``model`` is given) another model. The error names the first setting that differs."""
    for index, record in sorted(existing.items()):
        if index >= len(specs):
            raise ValueError(f"{output} holds sample {index} but this command makes {len(specs)}: "
                             "it was made by another command; choose another --output")
        spec = specs[index]
        if record.get("prompt") != spec.prompt or record.get("seed") != spec.seed:
            raise ValueError(f"{output} sample {index} was made with another prompt or seed than this command's; "
                             "resume with the same prompts and --seed, or choose another --output")
        wanted = record_settings(spec, settings, model)
        for name in SETTING_FIELDS:
            if name == "model" and model is None:
                continue
            if name not in record:
                raise ValueError(f"{output} sample {index} does not record its {name} (an output of an earlier gpt_2_simple): "
                                 "it cannot be resumed safely; finish it with the version that started it, or choose another --output")
            if record[name] != wanted[name]:
                if name == "model":
                    what, now, fix = "the model (its weights, dtype or tokenizer)", f"this command's model is {model}", "the run and --dtype"
                else:
                    what, now, fix = f"{name} {record[name]!r}", f"this command's {name} is {wanted[name]!r}", f"--{name} (or the prompts row's {name})"
                raise ValueError(f"{output} sample {index} was made with {what} ({now}); resume with {fix} it was started with, "
                                 "or choose another --output")


def run_generate(args: argparse.Namespace) -> None:
    """The ``gpt_2_simple generate`` command (flags: cli.py)."""
    for name in ("nfiles", "nsamples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_seed(args.seed, dashes="--")
    check_settings(length=args.length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, dashes="--")
    if args.prompts and args.prefix:
        raise ValueError("give either --prefix or --prompts, not both")
    output = Path(args.output) if args.output else None
    if output is None and args.resume:
        raise ValueError("--resume continues a --output file: pass --output")
    if output is not None and args.nfiles != 1:
        raise ValueError("--nfiles counts the gen/ text files; with --output use --nsamples (per prompt)")
    prompts = read_prompts(args.prompts) if args.prompts else [Prompt(args.prefix or None)]
    shard = Shard.from_env()
    mine = part_path(output, shard) if output is not None and shard.world > 1 else output

    existing: dict[int, dict] = {}
    if output is not None:
        # The other ranks of this run may have created their parts already: only ours and older
        # runs' files mean there is something to resume.
        ours = re.compile(rf"\.part-\d{{5}}-of-{shard.world:05d}$")
        left = [p for p in [output, *_part_files(output)] if p.exists() and (p == mine or not ours.search(p.name))]
        if left and not args.resume:
            raise FileExistsError(f"{left[0]} exists: pass --resume to add the missing samples, or choose another --output")
        existing = _existing_records(output, repair=mine)

    seed = args.seed
    if seed is None:  # resuming without --seed: keep the seed the output was started with
        seed = next((r["seed"] for i, r in sorted(existing.items())
                     if prompts[(i // args.nsamples) % len(prompts)].seed is None), None)
    if seed is None:
        seed = random_seed()
    specs = plan_samples(prompts, repeats=args.nfiles, nsamples=args.nsamples, length=args.length,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed)
    settings = GenerateSettings(args.truncate or None, args.include_prefix)
    _check_resumable(existing, specs, output, settings)  # before the (maybe slow) model export

    per_file = len(prompts) * args.nsamples
    if output is None:  # gen/ files: each process writes whole files
        mine_idx = [i for i in range(len(specs)) if (i // per_file) % shard.world == shard.rank]
    else:
        mine_idx = [i for i in range(len(specs)) if i % shard.world == shard.rank and i not in existing]

    source = getattr(args, "model", None) or model_source(None, args.run_name, args.checkpoint_dir, args.model_name, args.model_dir)
    shard.pin_device()
    engine, enc = load_engine(source, dtype=args.dtype, backend=args.backend, threads=args.threads or shard.threads())
    for p in prompts if args.prompts else []:  # (--prefix gets generate_samples' message)
        n = len(enc.encode(p.text)) if p.text else 1
        if n > engine.config.n_ctx:
            raise ValueError(f"{p.where}: the prompt is {n} tokens, longer than the model's context of "
                             f"{engine.config.n_ctx}; shorten it")
    model = model_fingerprint(engine.path) if output is not None else None
    _check_resumable(existing, specs, output, settings, model)
    progress = Progress(len(mine_idx), shard)

    if output is None:
        Path(args.folder).mkdir(parents=True, exist_ok=True)
        sink = GenFiles(Path(args.folder), per_file, args.sample_delim)
        ordered = InOrder(lambda local, sample: sink.write(mine_idx[local], sample))

        def on_sample(local: int, sample: GeneratedSample) -> None:
            progress.update(sample)
            ordered(local, sample)
    else:
        sink = open(mine, "a", encoding="utf-8", newline="\n")

        def on_sample(local: int, sample: GeneratedSample) -> None:
            # Written as each sample finishes, so an interruption loses nothing generated.
            sink.write(_dump(to_record(mine_idx[local], sample, record_settings(sample.spec, settings, model))))
            sink.flush()
            progress.update(sample)

    try:
        generate_samples(engine, enc, [specs[i] for i in mine_idx], settings,
                         batch_size=args.batch_size, on_sample=on_sample)
    except KeyboardInterrupt:
        if output is not None:
            print(f"gpt_2_simple generate: {_count(len(existing) + progress.samples, 'sample')} saved in {mine}; "
                  "rerun with --resume to finish", file=sys.stderr)
        raise
    finally:
        sink.close()
    print(f"gpt_2_simple generate: {progress.summary(seed)}", file=sys.stderr)

    if output is not None and shard.rank == 0:
        if shard.world > 1:
            _wait_for_ranks(output, len(specs))
        merge(output, len(specs))  # finishing order -> sample order, part files folded in
        print(f"gpt_2_simple generate: {_count(len(specs), 'sample')} in {output}", file=sys.stderr)
    elif output is None:
        for path in sink.paths:
            print(path)
