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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run_name", default="run1", help="run folder under --checkpoint_dir to save to / load from (default: run1)")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="folder holding the runs (default: checkpoint)")
    p.add_argument("--model_name", default="124M", help="base model: 124M, 355M, 774M, 1558M (117M/345M aliases) or a from-scratch size: tiny, mini, small")
    p.add_argument("--model_dir", default="models", help="folder holding downloaded base models (default: models)")
    p.add_argument("--multi_gpu", nargs="?", const=True, default=False, type=_bool, help="data-parallel training on all GPUs (see also torchrun)")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", help="text file, .csv, .npz, folder or glob to train on")
    p.add_argument("--dataset", dest="dataset_opt", metavar="DATASET", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=-1, help="number of training steps (-1: until interrupted)")
    p.add_argument("--restore_from", default="latest", help="'latest' checkpoint of the run, 'fresh' base model, or a checkpoint path")
    p.add_argument("--sample_every", type=int, default=1000000, help="print and save a sample every N steps")
    p.add_argument("--save_every", type=int, default=100, help="save a checkpoint every N steps")
    p.add_argument("--print_every", type=int, default=10, help="print the loss every N steps")
    p.add_argument("--optimizer", default="adam", help="adam, adamw or sgd")
    p.add_argument("--overwrite", nargs="?", const=True, default=False, type=_bool, help="replace the run's checkpoints instead of keeping the old ones")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=0.0001)
    p.add_argument("--accumulate_gradients", type=int, default=5)
    p.add_argument("--max_checkpoints", type=int, default=1)


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nfiles", type=int, default=1, help="number of files to write into --folder")
    p.add_argument("--nsamples", type=int, default=1, help="texts per file")
    p.add_argument("--folder", default="gen", help="output folder (existing files are never overwritten)")
    p.add_argument("--length", type=int, default=1023, help="tokens to generate per text (may exceed the context window)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--top_p", type=float, default=0.0, help="nucleus sampling (overrides --top_k when nonzero)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--prefix", default=None, help="text every sample starts from")
    p.add_argument("--truncate", default=None, help="cut each text at this string (generation stops there)")
    p.add_argument("--include_prefix", nargs="?", const=True, default=True, type=_bool)
    p.add_argument("--sample_delim", default="=" * 20 + "\n")
    p.add_argument("--seed", type=int, default=None, help="make the output reproducible")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run_name", default="run1", help="run folder under --checkpoint_dir to export (default: run1)")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="folder holding the runs (default: checkpoint)")
    p.add_argument("--model_name", default=None, help="export the base model --model_dir/<name> (e.g. 124M) instead of a run")
    p.add_argument("--model_dir", default="models", help="folder holding downloaded base models (default: models)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weight type: fp32 (exact) or bf16 (half the size, faster)")
    p.add_argument("-o", "--output", default=None, help="file to write (default: model-<step>.<dtype>.bin beside the checkpoint, the file generate reuses)")
    p.add_argument("--hf", default=None, metavar="OUT_DIR", help="write a HuggingFace folder (config.json, model.safetensors, vocab.json, merges.txt) instead")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt_2_simple", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="mode", metavar="MODE")
    sub.required = True

    p = sub.add_parser("finetune", help="fine-tune a model on a dataset")
    _add_model_args(p)
    _add_finetune_args(p)
    p.set_defaults(handler=_cmd_finetune)

    p = sub.add_parser("generate", help="generate texts into files")
    _add_model_args(p)
    _add_generate_args(p)
    p.set_defaults(handler=_cmd_generate)

    p = sub.add_parser("download", help="download a pretrained GPT-2 into --model_dir")
    p.add_argument("--model_name", default="124M", help="124M, 355M, 774M or 1558M (117M/345M: their first names)")
    p.add_argument("--model_dir", default="models", help="folder to put <model_name>/ in (default: models)")
    p.add_argument("--source", choices=["openai", "hf"], default="openai",
                   help="openai: OpenAI's TF checkpoint, as the original (mirror: GPT_2_SIMPLE_BASE_URL); "
                   "hf: the Hugging Face hub's safetensors (mirror: GPT_2_SIMPLE_HF_BASE_URL or HF_ENDPOINT)")
    p.set_defaults(handler=_cmd_download)

    p = sub.add_parser("export", help="export a run or model to the engine's single-file format (or a HuggingFace folder)")
    _add_export_args(p)
    p.set_defaults(handler=_cmd_export)
    return parser


def _cmd_finetune(args: argparse.Namespace) -> None:
    raise NotImplementedError("finetune: implemented in the fine-tuning issue")


def _cmd_generate(args: argparse.Namespace) -> None:
    raise NotImplementedError("generate: implemented in the engine issue")


def _cmd_download(args: argparse.Namespace) -> None:
    from .download import download_gpt2

    folder = download_gpt2(model_dir=args.model_dir, model_name=args.model_name, source=args.source)
    print(f"GPT-2 {args.model_name} is in {folder}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import engine_file, export, export_hf

    source = os.path.join(args.model_dir, args.model_name) if args.model_name else os.path.join(args.checkpoint_dir, args.run_name)
    if args.hf:
        path = export_hf(source, args.hf)
    elif args.output:
        path = export(source, args.output, args.dtype)
    else:
        path = engine_file(source, args.dtype)
    print(path)


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
