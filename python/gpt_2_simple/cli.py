"""The ``gpt_2_simple`` command.

``gpt_2_simple finetune shakespeare.txt`` and ``gpt_2_simple generate`` take the original's flags
(and the original's ``--mode``/``--dataset`` spelling); each mode is a subcommand with its own
``--help``. Errors a user can fix print one line and exit with code 2 (GPT2S_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "cmd", "build_parser"]

DESCRIPTION = "Fine-tune GPT-2 on your text and generate from it (PyTorch training, C++/CUDA generation)."


def _bool(text: str) -> bool:
    """The original's boolean flags took 'True'/'False' strings; accept those and the usual spellings."""
    value = str(text).strip().lower()
    if value in {"true", "1", "yes", "y", "on"}:
        return True
    if value in {"false", "0", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_model_args(p: argparse.ArgumentParser, multi_gpu_help: str = "data-parallel training on all GPUs (see also torchrun)") -> None:
    p.add_argument("--run_name", default="run1", help="run folder under --checkpoint_dir to save to / load from (default: run1)")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="folder holding the runs (default: checkpoint)")
    p.add_argument("--model_name", default="124M", help="base model: 124M, 355M, 774M, 1558M (117M/345M aliases) or a from-scratch size: tiny, mini, small")
    p.add_argument("--model_dir", default="models", help="folder holding downloaded base models (default: models)")
    p.add_argument("--multi_gpu", nargs="?", const=True, default=False, type=_bool, help=multi_gpu_help)


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", help="text file, .csv, .npz, folder or glob to train on (default: the bundled Shakespeare corpus)")
    p.add_argument("--dataset", dest="dataset_opt", metavar="DATASET", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=-1, help="number of training steps to add (-1: until Ctrl-C, which saves)")
    p.add_argument("--restore_from", default="latest", help="'latest' checkpoint of the run, 'fresh' base model, or a checkpoint path")
    p.add_argument("--sample_every", type=int, default=1000000, help="print and save a sample every N steps")
    p.add_argument("--save_every", type=int, default=100, help="save a checkpoint every N steps")
    p.add_argument("--print_every", type=int, default=10, help="print the loss every N steps")
    p.add_argument("--optimizer", default="adam", help="adam, adamw, sgd, adafactor (factored states) or adam8bit (8-bit states, CUDA, bitsandbytes)")
    p.add_argument("--overwrite", nargs="?", const=True, default=False, type=_bool, help="replace the run's checkpoints instead of keeping the old ones")
    p.add_argument("--batch_size", type=int, default=1, help="windows per step (per process under DDP)")
    p.add_argument("--learning_rate", type=float, default=0.0001)
    p.add_argument("--accumulate_gradients", type=int, default=5, help="micro-batches averaged into each step")
    p.add_argument("--max_checkpoints", type=int, default=1, help="checkpoints kept in the run folder")
    p.add_argument("--combine", type=int, default=50000, help="join text files shorter than this many characters")
    p.add_argument("--sample_length", type=int, default=1023, help="tokens per sample")
    p.add_argument("--sample_num", type=int, default=1, help="samples each time")
    p.add_argument("--use_memory_saving_gradients", nargs="?", const=True, default=False, type=_bool, help="activation checkpointing: less memory, ~30%% slower")
    p.add_argument("--optimizer_in_backward", nargs="?", const=True, default=None, type=_bool,
                   help="update each weight in the backward pass: whole-model gradients never exist (default: when the model would not fit otherwise)")
    p.add_argument("--only_train_transformer_layers", nargs="?", const=True, default=False, type=_bool, help="freeze wte, wpe and ln_f")
    p.add_argument("--val_fraction", type=float, default=0.0, help="hold out this fraction of the data for validation loss")
    p.add_argument("--val_every", type=int, default=None, help="validate every N steps (default 100)")
    p.add_argument("--mixed_precision", nargs="?", const=True, default=None, type=_bool, help="bf16 autocast (default: on for CUDA GPUs)")
    p.add_argument("--compile", nargs="?", const=True, default=False, type=_bool, help="torch.compile the model")
    p.add_argument("--seed", type=int, default=None, help="make data order, initialisation and samples reproducible")
    p.add_argument("--errors", choices=["strict", "ignore", "replace"], default="strict", help="what to do with text that is not UTF-8")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the GPU when present)")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="FILE.bin", help="generate from this model file (`gpt_2_simple export` output: all a deployment needs) instead of a run or --model_name")
    p.add_argument("--nfiles", type=int, default=1, help="number of files to write into --folder")
    p.add_argument("--nsamples", type=int, default=1, help="texts per file (per prompt with --prompts)")
    p.add_argument("--folder", default="gen", help="output folder (existing files are never overwritten)")
    p.add_argument("--length", type=int, default=1023, help="tokens per text, the prefix's included, as in the original (may exceed the context window)")
    p.add_argument("--temperature", type=float, default=0.7, help="randomness (0: always the most likely token)")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--top_p", type=float, default=0.0, help="nucleus sampling (overrides --top_k when nonzero)")
    p.add_argument("--batch_size", type=int, default=1, help="texts generated together (finished ones are replaced at once)")
    p.add_argument("--prefix", default=None, help="text every sample starts from")
    p.add_argument("--truncate", default=None, help="cut each text at this string (generation stops there)")
    p.add_argument("--include_prefix", nargs="?", const=True, default=True, type=_bool, help="with --truncate: False keeps only the text after the prefix")
    p.add_argument("--sample_delim", default="=" * 20 + "\n", help="written after each text in a file (none with one text per file)")
    p.add_argument("--seed", type=int, default=None, help="make the output reproducible (the same whatever --batch_size)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts file: one per line, or JSONL rows {\"prompt\": ..., optional temperature/top_k/top_p/length/seed}; --nsamples texts each")
    p.add_argument("--output", default=None, metavar="OUT.jsonl", help="write one JSON record per text here (written as they finish) instead of --folder files")
    p.add_argument("--resume", action="store_true", help="add only the texts missing from --output (after a crash or Ctrl-C)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "int8"],
                   help="engine weights (default: bf16; int8: a quarter of fp32's bytes, the fastest on CPUs, not on GPUs)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"], help="engine backend (auto: CUDA when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores, split between local processes)")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run_name", default="run1", help="run folder under --checkpoint_dir to export (default: run1)")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="folder holding the runs (default: checkpoint)")
    p.add_argument("--model_name", default=None, help="export the base model --model_dir/<name> (e.g. 124M) instead of a run")
    p.add_argument("--model_dir", default="models", help="folder holding downloaded base models (default: models)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8", "f32", "f16", "q8_0"],
                   help="weight type: fp32 (exact), bf16 (half the size, faster) or int8 (a quarter, per-row scales, CPU only); "
                        "with --gguf: f32 (= fp32), f16 or q8_0")
    p.add_argument("-o", "--output", default=None, help="file to write (default: model-<step>.<dtype>.bin beside the checkpoint, the file generate reuses)")
    p.add_argument("--hf", default=None, metavar="OUT_DIR", help="write a HuggingFace folder (config.json, model.safetensors, vocab.json, merges.txt) instead")
    p.add_argument("--gguf", default=None, metavar="OUT.gguf", help="write a GGUF file for llama.cpp / ollama / LM Studio instead (needs pip install gguf)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt_2_simple", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="mode", metavar="MODE")
    sub.required = True

    p = sub.add_parser("finetune", help="fine-tune a model on a dataset")
    _add_model_args(p)
    _add_finetune_args(p)
    p.set_defaults(handler=_cmd_finetune)

    p = sub.add_parser("generate", help="generate texts into files")
    _add_model_args(p, multi_gpu_help="accepted for the original's scripts; does nothing for generation (one GPU per "
                    "process: run several with torchrun or RANK/WORLD_SIZE, see docs/generate.md)")
    _add_generate_args(p)
    p.set_defaults(handler=_cmd_generate, model_name=None)  # a run, unless --model_name names a base model

    p = sub.add_parser("verify", help="check a model file completely (every weight's checksum): prints one line, exit code 0 if sound, 1 if not")
    p.add_argument("file", help="a model file written by `gpt_2_simple export` (or generate)")
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("merge", help="merge the part files of a sharded `generate --output` into one file")
    p.add_argument("output", help="the --output file the sharded run was given")
    p.set_defaults(handler=_cmd_merge)

    p = sub.add_parser("score", help="score texts: mean token log-likelihood and perplexity under a model")
    p.add_argument("file", help="UTF-8 text file: one text per line (or the whole file with --whole); - reads standard input")
    p.add_argument("--whole", action="store_true", help="score the whole file as one text")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.add_argument("--run_name", default="run1", help="run folder under --checkpoint_dir to score with (default: run1)")
    p.add_argument("--checkpoint_dir", default="checkpoint")
    p.add_argument("--model_name", default=None, help="score with a downloaded base model instead of a run")
    p.add_argument("--model_dir", default="models")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--stride", type=int, default=None, help="window step for texts longer than the context (default n_ctx/2)")
    p.set_defaults(handler=_cmd_score)

    p = sub.add_parser("export", help="export a run or model to the engine's single-file format (or a HuggingFace folder)")
    _add_export_args(p)
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("download", help="download a pretrained GPT-2 into --model_dir")
    p.add_argument("--model_name", default="124M", help="124M, 355M, 774M or 1558M (117M/345M: their first names)")
    p.add_argument("--model_dir", default="models", help="folder to put <model_name>/ in (default: models)")
    p.add_argument("--source", choices=["openai", "hf"], default="openai",
                   help="openai: OpenAI's TF checkpoint, as the original (mirror: GPT_2_SIMPLE_BASE_URL); "
                   "hf: the Hugging Face hub's safetensors (mirror: GPT_2_SIMPLE_HF_BASE_URL or HF_ENDPOINT)")
    p.set_defaults(handler=_cmd_download)

    p = sub.add_parser("bench", help="measure speed and memory against transformers/tiktoken (JSON, markdown and PNG results)")
    from .benchmark.harness import add_arguments

    add_arguments(p, output_dir="bench_results")
    p.set_defaults(handler=_cmd_bench)

    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    from .serve import add_serve_args

    p = sub.add_parser("serve", help="serve an OpenAI-compatible completions API and a web playground (docs/serve.md)")
    add_serve_args(p)
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> None:
    from .serve import run_server

    run_server(args)


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .fileio import run_folder
    from .weights import latest_checkpoint

    dataset = args.dataset or args.dataset_opt
    if dataset is not None and not os.path.exists(dataset) and not any(c in dataset for c in "*?["):
        raise FileNotFoundError(f"dataset {dataset} not found: give a text/.csv/.npz file, a folder or a glob pattern")
    if args.restore_from != "latest" or latest_checkpoint(run_folder(args.checkpoint_dir, args.run_name)) is None:
        _ensure_base_model(args.model_dir, args.model_name)  # a resumed run does not need its base model
    from .session import start_tf_sess
    from .train import finetune

    finetune(
        start_tf_sess(), dataset, steps=args.steps, model_name=args.model_name, model_dir=args.model_dir, combine=args.combine,
        batch_size=args.batch_size, learning_rate=args.learning_rate, accumulate_gradients=args.accumulate_gradients,
        restore_from=args.restore_from, run_name=args.run_name, checkpoint_dir=args.checkpoint_dir,
        sample_every=args.sample_every, sample_length=args.sample_length, sample_num=args.sample_num, multi_gpu=args.multi_gpu,
        save_every=args.save_every, print_every=args.print_every, max_checkpoints=args.max_checkpoints,
        use_memory_saving_gradients=args.use_memory_saving_gradients, only_train_transformer_layers=args.only_train_transformer_layers,
        optimizer=args.optimizer, overwrite=args.overwrite, val_fraction=args.val_fraction, val_every=args.val_every,
        mixed_precision=args.mixed_precision, compile=args.compile, seed=args.seed, errors=args.errors, device=args.device,
        optimizer_in_backward=args.optimizer_in_backward,
    )


def _ensure_base_model(model_dir: str, model_name: str) -> None:
    """Download a pretrained base model that is missing, as the original CLI did (not for
    from-scratch sizes or a folder already in model_dir); unknown names raise ValueError."""
    from .config import is_pretrained

    if os.path.isdir(os.path.join(model_dir, model_name)) or not is_pretrained(model_name):
        return
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 downloads; download before launching several processes
    from .download import download_gpt2, is_gpt2_downloaded

    if not is_gpt2_downloaded(model_dir=model_dir, model_name=model_name):
        download_gpt2(model_dir=model_dir, model_name=model_name)


def _cmd_score(args: argparse.Namespace) -> None:
    import contextlib
    import json
    import math

    from .score import score
    from .session import start_tf_sess

    if args.file == "-":
        text = sys.stdin.read()
    else:
        if not os.path.isfile(args.file):
            raise FileNotFoundError(f"{args.file} not found: give a UTF-8 text file (or - for standard input)")
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    texts = [text] if args.whole else [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{args.file} holds no text to score")
    if args.model_name:
        _ensure_base_model(args.model_dir, args.model_name)
    with contextlib.redirect_stdout(sys.stderr):  # "Loading checkpoint ...": stdout carries only the scores
        results = score(start_tf_sess(), texts, run_name=args.run_name, checkpoint_dir=args.checkpoint_dir, model_name=args.model_name,
                        model_dir=args.model_dir, batch_size=args.batch_size, stride=args.stride, progress=len(texts) > 100)
    for t, r in zip(texts, results):
        if args.json:
            print(json.dumps({**r.as_dict(), "text": t}, ensure_ascii=False))
        else:
            preview = t if len(t) <= 60 else t[:57] + "..."
            print(f"{r.log_likelihood:.4f}\t{r.perplexity:.2f}\t{r.tokens}\t{preview!r}")
    tokens = sum(r.tokens for r in results)
    mean = sum(r.log_likelihood * r.tokens for r in results) / max(tokens, 1)
    print(f"{len(results)} texts, {tokens} tokens: mean log-likelihood {mean:.4f}, perplexity {math.exp(-mean):.2f}", file=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> None:
    from .batch import run_generate

    if args.model is None and args.model_name and args.model_name.endswith(".bin") and os.path.isfile(args.model_name):
        args.model, args.model_name = args.model_name, None  # a model file where a model name goes
    if args.model is not None:
        from .export import inspect

        if not os.path.isfile(args.model):
            raise FileNotFoundError(f"--model {args.model}: no such file; give a model file written by `gpt_2_simple export`")
        if args.model_name:
            raise ValueError("give either --model (a model file) or --model_name (a downloaded base model), not both")
        dtype = inspect(args.model)["dtype"]  # validates it: a wrong file fails here, with the loader's message
        if args.dtype not in (None, dtype):
            raise ValueError(f"--model {args.model} holds {dtype} weights; drop --dtype {args.dtype} or export the model again with --dtype {args.dtype}")
        args.dtype = dtype
    run_generate(args)


def _cmd_verify(args: argparse.Namespace) -> None:
    from .export import inspect

    try:
        info = inspect(args.file, verify=True)
    except (ValueError, OSError) as e:
        print(f"{args.file}: FAILED: {e}")
        raise SystemExit(1) from None
    c = info["config"]
    print(f"{args.file}: OK: {info['dtype']} GPT-2 (n_layer={c['n_layer']}, n_embd={c['n_embd']}, n_vocab={c['n_vocab']}), "
          f"{len(info['tensors'])} tensors, every checksum matches")


def _cmd_merge(args: argparse.Namespace) -> None:
    from .batch import merge

    print(f"gpt_2_simple merge: {merge(args.output)} samples in {args.output}", file=sys.stderr)


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import engine_file, export, export_hf
    from .fileio import model_folder, run_folder

    source = model_folder(args.model_dir, args.model_name) if args.model_name else run_folder(args.checkpoint_dir, args.run_name)
    if args.gguf:
        from .export_gguf import export_gguf

        path = export_gguf(source, args.gguf, args.dtype)
    elif args.hf:
        path = export_hf(source, args.hf)
    elif args.output:
        path = export(source, args.output, args.dtype)
    else:
        path = engine_file(source, args.dtype)
    print(path)


def _cmd_download(args: argparse.Namespace) -> None:
    from .download import download_gpt2

    folder = download_gpt2(model_dir=args.model_dir, model_name=args.model_name, source=args.source)
    print(f"GPT-2 {args.model_name} is in {folder}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .benchmark.harness import main

    main(args, program="gpt_2_simple bench")


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept the original's ``--mode finetune`` / ``--mode=generate`` spelling of the subcommand."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            mode = argv[i + 1]
            return [mode] + argv[:i] + argv[i + 2 :]
        if arg.startswith("--mode="):
            return [arg.split("=", 1)[1]] + argv[:i] + argv[i + 1 :]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("gpt_2_simple: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError) as e:
        if os.environ.get("GPT2S_DEBUG"):
            raise
        print(f"gpt_2_simple {args.mode}: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd() -> None:
    """The original package's console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
