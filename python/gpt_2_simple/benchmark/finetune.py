"""Fine-tuning speed and memory: ``finetune`` against a plain transformers training loop.

- throughput: the same geometry, batch, sequence length, optimizer (Adam, lr 1e-4) and data (random
  windows of the bundled Shakespeare corpus, pre-encoded) in ``finetune`` (tokens/s from its own
  per-step log, so dataset loading and the final save are excluded) and in a plain loop over
  ``transformers.GPT2LMHeadModel`` (forward, cross-entropy, backward, step), each in its own worker
  process, interleaved, one warm-up run each, tokens/s over steps 2.. of each run. Geometries:
  'tiny' (from scratch) and the run's model (124M) with n_ctx 256; peak RSS of each process.
- memory: peak RSS of a fresh process running one step ('small': 51M, 8 layers, batch 2 x 1024
  tokens, SGD so that no optimizer state hides the activations) with and without
  ``use_memory_saving_gradients`` (activation checkpointing), and the same for transformers with
  and without ``gradient_checkpointing_enable()``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import SCRATCH, GPT2Config, get_config
from .common import Options, Worker, case_records, log, random_state, run_peers, set_torch_threads

SUITE = "finetune"
LEARNING_RATE = 1e-4


def make_model_folder(model_dir: Path, name: str, config: GPT2Config) -> None:
    """A base-model folder ``model_dir/name`` with random weights (GPT-2's initial scales), as
    ``finetune(model_name=name, model_dir=model_dir)`` reads it."""
    from ..weights import save_weights

    folder = Path(model_dir) / name
    if (folder / "model-0.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / "hparams.json")
    save_weights(folder / "model-0.safetensors", random_state(config), config)


def model_config(model_name: str, model_dir: Path) -> GPT2Config:
    return SCRATCH.get(model_name) or GPT2Config.from_file(Path(model_dir) / model_name / "hparams.json")


def hf_model(config: GPT2Config, checkpointing: bool = False):
    """transformers' GPT-2 of the same geometry, random init (seed 0), in training mode."""
    import torch
    import transformers

    hf_config = transformers.GPT2Config(vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
                                        n_head=config.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def finetune_peer(model_name: str, model_dir: str, data: str, root: str, threads: int | None, optimizer: str = "adam",
                  checkpointing: bool = False):
    """Worker side: ``gpt2.finetune`` runs from the base model, tokens/s over steps 2.. from its log."""
    set_torch_threads(threads)
    import gpt_2_simple as gpt2

    seq = model_config(model_name, Path(model_dir)).n_ctx
    runs = iter(range(1 << 30))

    def run(batch: int, steps: int) -> dict:
        run_name = f"{model_name}-{next(runs)}"
        gpt2.finetune(gpt2.start_tf_sess(threads=threads or -1), data, steps=steps, model_name=model_name, model_dir=model_dir,
                      checkpoint_dir=root, run_name=run_name, batch_size=batch, accumulate_gradients=1, learning_rate=LEARNING_RATE,
                      optimizer=optimizer, use_memory_saving_gradients=checkpointing, sample_every=10**9, save_every=10**9,
                      print_every=1, seed=0, progress=False, restore_from="fresh")
        folder = Path(root) / run_name
        rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        rows = [row for row in rows if "loss" in row]
        shutil.rmtree(folder)  # the checkpoint it saved: not needed, and 500 MB a run for 124M
        if steps < 2:
            return {}
        return {"tokens_per_s": (rows[-1]["step"] - rows[0]["step"]) * batch * seq / (rows[-1]["time"] - rows[0]["time"])}

    return run


def transformers_peer(hparams: dict, data: str, threads: int | None, optimizer: str = "adam", checkpointing: bool = False):
    """Worker side: the plain transformers loop on the same windows; tokens/s over steps 2.."""
    set_torch_threads(threads)
    import torch

    config = GPT2Config(**hparams)
    model = hf_model(config, checkpointing)
    tokens = np.concatenate(list(np.load(data).values()))
    seq = config.n_ctx
    make_optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]

    def run(batch: int, steps: int) -> dict:
        opt = make_optimizer(model.parameters(), lr=LEARNING_RATE)
        rng = np.random.default_rng(0)
        start = None
        for step in range(steps):
            if step == 1:
                start = time.perf_counter()
            starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
            x = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64))
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"tokens_per_s": (steps - 1) * batch * seq / (time.perf_counter() - start)} if steps > 1 else {}

    return run


def _data(opts: Options) -> Path:
    """The bundled corpus (``--quick``: its first 512 KB), pre-encoded: finetune's start-up then
    costs no encoding."""
    from ..dataset import load_dataset
    from ..tokenizer import BUNDLED_DIR, get_encoder

    path = opts.workdir / ("shakespeare-quick.npz" if opts.quick else "shakespeare.npz")
    if not path.exists():
        text = BUNDLED_DIR / "shakespeare.txt"
        if opts.quick:
            text = opts.workdir / "shakespeare-quick.txt"
            text.write_bytes((BUNDLED_DIR / "shakespeare.txt").read_bytes()[: 512 << 10].decode("utf-8", "ignore").encode("utf-8"))
        np.savez(path, *load_dataset(get_encoder(), text, progress=False))
    return path


def throughput(opts: Options, name: str, model_dir: Path, data: Path, batch: int, steps: int, peers: list[str]) -> list[dict]:
    config = model_config(name, model_dir)
    args = {"threads": opts.threads, "data": str(data)}
    workers = {"finetune": Worker(f"{__name__}:finetune_peer", name="finetune", model_name=name, model_dir=str(model_dir),
                                  root=str(opts.workdir / "checkpoint"), **args)}
    try:
        if "transformers" in peers:
            workers["transformers"] = Worker(f"{__name__}:transformers_peer", name="transformers", hparams=config.to_hparams(), **args)
        case = f"{name}, batch {batch} x {config.n_ctx}"
        replies, peaks, load = run_peers(workers, opts.reps, label=f"{SUITE} {case}",
                                         rate=lambda r: f"{r['tokens_per_s']:,.0f} tok/s", batch=batch, steps=steps)
    finally:
        for w in workers.values():
            w.close()
    cfg = {"model": name, "hparams": config.to_hparams(), "batch": batch, "seq": config.n_ctx, "steps_per_run": steps,
           "optimizer": "Adam lr 1e-4", "dtype": "fp32"}
    return case_records(SUITE, case, cfg, {p: [r["tokens_per_s"] for r in rs] for p, rs in replies.items()}, metric="tokens/s",
                        ours={"finetune"}, compare_to=["transformers"], peak_rss=peaks, load_average=load, headline={"finetune"})


def memory(opts: Options, name: str, data: Path, peers: list[str]) -> list[dict]:
    """Peak RSS of one SGD step in a fresh process, plain and with activation checkpointing."""
    config = get_config(name)
    batch = 2
    records = []
    for checkpointing in (False, True):
        peaks = {}
        for peer in peers:
            if peer == "finetune":
                w = Worker(f"{__name__}:finetune_peer", name=peer, threads=opts.threads, model_name=name, model_dir=str(opts.workdir / "models"),
                           data=str(data), root=str(opts.workdir / "checkpoint"), optimizer="sgd", checkpointing=checkpointing)
            else:
                w = Worker(f"{__name__}:transformers_peer", name=peer, threads=opts.threads, hparams=config.to_hparams(), data=str(data),
                           optimizer="sgd", checkpointing=checkpointing)
            with w:
                peaks[peer] = w(batch=batch, steps=1)["peak_rss"]
            log(f"  {SUITE} memory {name} checkpointing={checkpointing} {peer}: peak RSS {peaks[peer] / 2**20:,.0f} MiB")
        case = f"peak RSS {name} {batch}x{config.n_ctx}" + (" checkpointed" if checkpointing else "")  # short: a chart label
        cfg = {"model": name, "hparams": config.to_hparams(), "batch": batch, "seq": config.n_ctx, "optimizer": "SGD (no optimizer state)",
               "activation_checkpointing": checkpointing, "dtype": "fp32"}
        records += case_records(SUITE, case, cfg, {p: [v / 2**20] for p, v in peaks.items()}, metric="peak RSS MiB", higher_is_better=False,
                                ours={"finetune"}, compare_to=["transformers"] if "transformers" in peaks else [], peak_rss=peaks)
    return records


def measure(opts: Options, *, geometries: bool = True, with_memory: bool = True) -> list[dict]:
    """Throughput for 'tiny' (batch 8, 8 steps a run) and the run's model at n_ctx 256 (batch 2,
    5 steps: 4 timed; two timed steps of seconds each moved the ratio by 15% between runs), then
    memory on 'small' (``--quick``: 'tiny' at batch 2 for 3 steps, memory on 'tiny')."""
    peers = ["finetune"]
    if importlib.util.find_spec("transformers") is not None:
        peers.append("transformers")
    else:
        opts.note("transformers is not installed: finetune figures are ours alone (pip install transformers)")
    data = _data(opts)
    model_dir = opts.workdir / "models"
    plans = [("tiny", 2, 3) if opts.quick else ("tiny", 8, 8)]
    if geometries and not opts.quick and opts.model not in SCRATCH:
        name = f"{opts.model}-ctx256"
        make_model_folder(model_dir, name, GPT2Config(**{**opts.config.to_hparams(), "n_ctx": 256}))
        plans.append((name, 2, 5))
    log(f"{SUITE}: {', '.join(p[0] for p in plans)}; peers {', '.join(peers)}")
    records = []
    for name, batch, steps in plans:
        records += throughput(opts, name, model_dir, data, batch, steps, peers)
    if with_memory:
        records += memory(opts, "tiny" if opts.quick else "small", data, peers)
    return records
