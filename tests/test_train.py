"""finetune(): the original's run-folder, counter and log semantics, exact resume, optimizers,
accumulation, frozen layers, validation and the loss plot, on a tiny model in-process."""

import importlib.util
import io
import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import gpt_2_simple as gpt2
from gpt_2_simple import plot
from gpt_2_simple.train import checkpoint_steps
from gpt_2_simple.weights import latest_checkpoint
from gpt_2_simple.config import GPT2Config
from gpt_2_simple.dataset import Windows, WindowSampler
from gpt_2_simple.model import GPT2
from gpt_2_simple.tokenizer import BUNDLED_DIR, get_encoder
from reference import random_gpt2

TINY = GPT2Config(n_ctx=32, n_embd=32, n_head=2, n_layer=2)
LOG_LINE = re.compile(r"^\[(\d+) \| (\d+\.\d\d)\] loss=(\d+\.\d\d) avg=(\d+\.\d\d)$")


def make_base_model(root: Path, name: str = "tt", config: GPT2Config = TINY) -> Path:
    """models/<name>: hparams.json + random weights in our checkpoint format, as a base to fine-tune."""
    folder = root / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / "hparams.json")
    model = random_gpt2(config, seed=0)
    save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(folder / "model-0.safetensors"))
    return folder


def make_text(root: Path, chars: int = 40_000) -> Path:
    from importlib.resources import files

    text = (files("gpt_2_simple") / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:chars]
    path = root / "data.txt"
    path.write_text(text, encoding="utf-8")
    return path


def run(root: Path, **kw):
    """finetune on the tiny base model with fast test settings; returns the session."""
    args = dict(model_name="tt", model_dir=str(root / "models"), checkpoint_dir=str(root / "checkpoint"), batch_size=2, accumulate_gradients=1,
                learning_rate=3e-3, sample_every=10**9, save_every=10**9, print_every=1, seed=7, progress=False)
    args.update(kw)
    sess = gpt2.start_tf_sess()
    gpt2.finetune(sess, str(kw.pop("dataset", root / "data.txt")), **{k: v for k, v in args.items() if k != "dataset"})
    return sess


def weights(root: Path, step: int, run_name: str = "run1") -> dict:
    return load_file(str(root / "checkpoint" / run_name / f"model-{step}.safetensors"))


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # samples/ is written to the working directory, as in the original
    make_base_model(tmp_path)
    make_text(tmp_path)
    return tmp_path


def test_run_folder_log_lines_and_learning(root, capsys):
    sess = run(root, steps=25)
    out = capsys.readouterr().out
    folder = root / "checkpoint" / "run1"
    names = sorted(p.name for p in folder.iterdir())
    # TensorBoard event files, as the original wrote, when tensorboard is installed.
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == (importlib.util.find_spec("tensorboard") is not None)
    assert [n for n in names if n not in events] == ["counter", "encoder.json", "hparams.json", "log.jsonl", "loss.png", "model-25.safetensors", "train_state-25.safetensors", "vocab.bpe"]
    assert (folder / "counter").read_text() == "25\n"
    assert GPT2Config.from_file(folder / "hparams.json") == TINY
    for name in ("encoder.json", "vocab.bpe"):
        assert (folder / name).read_bytes() == (BUNDLED_DIR / name).read_bytes()
    assert f"Saving {folder / 'model-25'}" in out
    # The original's log line and smoothed average: avg = sum(0.99^k loss) / sum(0.99^k)
    lines = [LOG_LINE.match(line) for line in out.splitlines() if line.startswith("[")]
    assert [int(m.group(1)) for m in lines] == list(range(1, 26))
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    num = den = 0.0
    for m, entry in zip(lines, log):
        num, den = num * 0.99 + entry["loss"], den * 0.99 + 1.0
        assert m.group(3) == f"{entry['loss']:.2f}" and m.group(4) == f"{num / den:.2f}"
    assert np.mean([e["loss"] for e in log[-5:]]) < np.mean([e["loss"] for e in log[:5]]) - 1.0
    # the session now holds the trained weights
    assert sess.source == folder and sess.checkpoint.step == 25
    trained = weights(root, 25)
    torch.testing.assert_close(sess.model.state_dict()["h.0.attn.c_attn.weight"], torch.from_numpy(trained["h.0.attn.c_attn.weight"]))
    from safetensors import safe_open

    with safe_open(str(folder / "model-25.safetensors"), "np") as f:
        assert f.metadata()["format"] == "gpt_2_simple" and f.metadata()["step"] == "25"


def test_exact_resume_is_bitwise(root):
    kw = dict(batch_size=2, accumulate_gradients=2, learning_rate=1e-3)
    run(root, steps=8, run_name="straight", **kw)
    run(root, steps=4, run_name="resumed", **kw)
    run(root, steps=4, run_name="resumed", **kw)  # restore_from='latest': continues at step 5
    a, b = weights(root, 8, "straight"), weights(root, 8, "resumed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    log = [json.loads(line)["step"] for line in (root / "checkpoint" / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 9))


def test_a_second_ctrl_c_inside_a_step_keeps_its_windows_for_the_resume(root, monkeypatch, capsys):
    """A KeyboardInterrupt inside a step (a second Ctrl-C, before the update) saves the last whole
    step with the data sampler as it was before the broken step drew its windows: resuming then
    equals an uninterrupted run, bit for bit."""
    kw = dict(batch_size=2, accumulate_gradients=2, learning_rate=1e-3)
    run(root, steps=6, run_name="straight", **kw)
    forward, calls = GPT2.forward, []

    def forward_until_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * 3 + 2:  # step 4's second micro-batch: its windows are drawn, the weights untouched
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT2, "forward", forward_until_ctrl_c)
    run(root, steps=6, run_name="resumed", **kw)
    monkeypatch.setattr(GPT2, "forward", forward)
    assert "interrupted" in capsys.readouterr().out
    assert checkpoint_steps(root / "checkpoint" / "resumed") == [3]
    run(root, steps=3, run_name="resumed", **kw)
    a, b = weights(root, 6, "straight"), weights(root, 6, "resumed")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_steps_add_to_the_run_and_max_checkpoints(root, capsys):
    run(root, steps=6, save_every=2, max_checkpoints=2)
    folder = root / "checkpoint" / "run1"
    assert checkpoint_steps(folder) == [4, 6]
    run(root, steps=3, save_every=2, max_checkpoints=2)
    assert checkpoint_steps(folder) == [8, 9]
    assert (folder / "counter").read_text() == "9\n"
    assert sorted(p.name for p in folder.glob("train_state-*")) == ["train_state-8.safetensors", "train_state-9.safetensors"]
    out = capsys.readouterr().out
    assert "[7 | " in out and "Loading checkpoint" in out
    # overwrite (with 'latest'): the old checkpoints go at once
    run(root, steps=1, overwrite=True, max_checkpoints=5)
    assert checkpoint_steps(folder) == [9, 10]


def test_restore_fresh_restarts_numbering_and_replaces_the_old_run(root, capsys):
    run(root, steps=5)
    run(root, steps=2, restore_from="fresh", max_checkpoints=3)
    folder = root / "checkpoint" / "run1"
    assert checkpoint_steps(folder) == [2]  # model-5 would shadow it as 'latest'
    assert "[1 | " in capsys.readouterr().out.split("Training...")[-1]
    # restore_from a path: its weights, step numbering from 1
    run(root, steps=1, restore_from=str(folder), run_name="other")
    assert checkpoint_steps(root / "checkpoint" / "other") == [1]


def test_accumulation_averages_gradients(root):
    """One SGD step with 2 accumulated micro-batches of 1 = one step on the mean loss of both
    windows, computed here directly with torch from the same windows."""
    run(root, steps=1, optimizer="sgd", learning_rate=0.5, batch_size=1, accumulate_gradients=2, run_name="acc")
    enc = get_encoder()
    ids = np.asarray(enc.encode((root / "data.txt").read_text(encoding="utf-8") + "<|endoftext|>"), dtype=np.uint16)
    x, _ = WindowSampler(Windows([ids], TINY.n_ctx + 1), seed=7).sample(2)
    x = torch.from_numpy(x)
    model = GPT2(TINY)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(root / "models/tt/model-0.safetensors")).items()})
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    trained = weights(root, 1, "acc")
    with torch.no_grad():
        for name, p in model.named_parameters():
            np.testing.assert_allclose(trained[name], (p - 0.5 * p.grad).numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_only_train_transformer_layers_and_checkpointing(root):
    run(root, steps=3, only_train_transformer_layers=True, run_name="frozen", optimizer="adamw")
    base, trained = load_file(str(root / "models/tt/model-0.safetensors")), weights(root, 3, "frozen")
    for name in base:
        same = np.array_equal(base[name], trained[name])
        assert same == (not name.startswith("h.")), name
    # activation checkpointing recomputes the same numbers
    run(root, steps=3, run_name="plain")
    run(root, steps=3, run_name="ckpt", use_memory_saving_gradients=True)
    a, b = weights(root, 3, "plain"), weights(root, 3, "ckpt")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_validation_and_loss_png(root, capsys):
    run(root, steps=6, val_fraction=0.1, val_every=3)
    out = capsys.readouterr().out
    folder = root / "checkpoint" / "run1"
    val = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [v["step"] for v in val] == [3, 6]
    assert all(abs(v["val_ppl"] - np.exp(v["val_loss"])) < 1e-6 * v["val_ppl"] for v in val)
    assert re.search(r"^\[6 \| \d+\.\d\d\] val_loss=\d+\.\d\d val_ppl=\d+\.\d\d$", out, re.M)
    # loss.png decodes to an 800 x 450 image with both curves in it
    image = matplotlib.image.imread(folder / "loss.png")  # (H, W, 4) floats in [0, 1]
    assert image.shape == (plot.HEIGHT_IN * plot.DPI, plot.WIDTH_IN * plot.DPI, 4)
    rgb = np.rint(image[..., :3] * 255).astype(int)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20  # not blank: text, axes, lines
    assert (np.abs(rgb - (31, 119, 180)).sum(-1) < 30).sum() > 300  # the training curve (and its legend entry)
    assert (np.abs(rgb - (255, 127, 14)).sum(-1) < 30).sum() > 50  # the validation one
    # what it shows is log.jsonl: its steps and losses, axis names, legend, the run name
    entries = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    fig = plot.loss_figure(*plot.read_log(folder / "log.jsonl"), "run1")
    ax = fig.axes[0]
    train_line, val_line = ax.get_lines()
    assert train_line.get_xydata().tolist() == [[e["step"], e["loss"]] for e in entries if "loss" in e]
    assert val_line.get_xydata().tolist() == [[e["step"], e["val_loss"]] for e in entries if "val_loss" in e]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "loss", "run1")
    assert np.array_equal(matplotlib.image.imread(io.BytesIO(plot.png_of(fig))), image)  # the file is this figure


def test_loss_png_reads_only_complete_log_entries(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": NaN}\n{"step": 3, "val_loss": 4.5}\nnot json\n{"step": 4, "loss": 4.0}\n{"step": 5, "lo', encoding="utf-8")
    assert plot.read_log(log) == ([(1, 5.0), (4, 4.0)], [(3, 4.5)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    image = matplotlib.image.imread(io.BytesIO(plot.loss_png(empty, "run1")))  # a run saved before its first log line
    assert image.shape[:2] == (450, 800)


def test_short_dataset_trains_on_shorter_windows(root, capsys):
    (root / "short.txt").write_text("To be, or not to be.", encoding="utf-8")
    run(root, steps=2, dataset=root / "short.txt")
    assert "training on" in capsys.readouterr().out
    assert checkpoint_steps(root / "checkpoint" / "run1") == [2]


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(optimizer="rmsprop"), ValueError, "unknown optimizer 'rmsprop'"),
        (dict(model_name="999M"), ValueError, "unknown model name '999M'"),
        (dict(model_name="355M"), FileNotFoundError, "download_gpt2"),
        (dict(dataset="missing.txt"), FileNotFoundError, "missing.txt not found"),
        (dict(steps=0), ValueError, "steps must be"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive integer"),
        (dict(restore_from="nowhere"), FileNotFoundError, "restore_from='nowhere'"),
        (dict(val_fraction=1.5), ValueError, "val_fraction"),
    ],
)
def test_bad_arguments_are_clear_errors(root, kw, error, match):
    with pytest.raises(error, match=match):
        run(root, steps=kw.pop("steps", 1), **kw)


def test_resume_with_another_model_size_is_refused(root):
    run(root, steps=1)
    make_base_model(root, "other", GPT2Config(n_ctx=32, n_embd=64, n_head=2, n_layer=1))
    with pytest.raises(ValueError, match="another size"):
        run(root, steps=1, model_name="other")


def test_from_scratch_size_needs_no_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_text(tmp_path, 3000)
    sess = gpt2.start_tf_sess()
    gpt2.finetune(sess, str(tmp_path / "data.txt"), model_name="tiny", steps=1, batch_size=1, accumulate_gradients=1, seed=0, progress=False)
    assert GPT2Config.from_file(tmp_path / "checkpoint/run1/hparams.json") == gpt2.config.SCRATCH["tiny"]
    assert sess.config == gpt2.config.SCRATCH["tiny"]


def test_samples_every_n_steps_in_the_original_format(root, capsys):
    run(root, steps=4, sample_every=3, sample_num=3, batch_size=2, sample_length=12)
    folder = root / "samples" / "run1"
    assert sorted(p.name for p in folder.iterdir()) == ["samples-4"]  # named by the counter, as the original
    text = (folder / "samples-4").read_text(encoding="utf-8")
    parts = re.split(r"^======== SAMPLE (\d) ========\n", text, flags=re.M)
    assert parts[0] == "" and parts[1::2] == ["1", "2", "3"]
    enc = get_encoder()
    for body in parts[2::2]:
        assert body.endswith("\n")
        assert 8 <= len(enc.encode(body.rstrip("\n").rstrip("\n"))) <= 16  # 1 context token + 12 sampled
    assert f"======== SAMPLE 3 ========\n{parts[6].rstrip(chr(10))}" in capsys.readouterr().out
    # samples draw from their own random stream: training is the same with and without them
    run(root, steps=4, run_name="nosamples")
    for k, v in weights(root, 4).items():
        np.testing.assert_array_equal(v, weights(root, 4, "nosamples")[k])


def test_bf16_autocast_and_compile_train_the_same_model(root):
    run(root, steps=3, run_name="eager")
    run(root, steps=3, run_name="bf16", mixed_precision=True)
    run(root, steps=3, run_name="compiled", compile=True)
    eager, bf16, compiled = (weights(root, 3, name) for name in ("eager", "bf16", "compiled"))
    for k in eager:
        assert bf16[k].dtype == np.float32  # autocast computes in bf16, the weights stay fp32
        np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-4, atol=1e-5, err_msg=k)
        # three Adam steps of lr 3e-3 move a weight by at most ~1e-2; bf16 rounding may flip a few signs
        assert np.abs(bf16[k] - eager[k]).max() < 2e-2, k
    with pytest.raises(ValueError, match="mixed_precision"):
        run(root, steps=1, mixed_precision="fp16")


def test_resumes_an_original_tensorflow_run_and_trains_from_a_tf_model(tmp_path, monkeypatch):
    """The original's files: checkpoint/run1 (model-5.* + counter, written by TensorFlow) and an
    OpenAI-layout models/<name> folder. Step numbering continues from the TF run's step."""
    import shutil

    monkeypatch.chdir(tmp_path)
    fixtures = Path(__file__).parent / "fixtures" / "tf"
    shutil.copytree(fixtures / "checkpoint", tmp_path / "checkpoint")
    shutil.copytree(fixtures / "models", tmp_path / "models")  # models/tiny: a folder wins over the from-scratch size
    ids = np.random.default_rng(0).integers(0, 64, 3000)  # this model's vocabulary has 64 tokens
    np.savez(tmp_path / "ids.npz", ids)
    common = dict(model_name="tiny", model_dir=str(tmp_path / "models"), batch_size=2, accumulate_gradients=1, sample_every=10**9, print_every=1, seed=0, progress=False)
    sess = gpt2.start_tf_sess()
    gpt2.finetune(sess, "ids.npz", steps=3, **common)
    assert checkpoint_steps(tmp_path / "checkpoint/run1") == [8]
    assert (tmp_path / "checkpoint/run1/model-5.index").is_file()  # the original's files are left alone
    assert sess.config.n_vocab == 64 and latest_checkpoint(tmp_path / "checkpoint/run1").step == 8
    gpt2.finetune(gpt2.start_tf_sess(), "ids.npz", steps=2, restore_from="fresh", run_name="from_tf_model", **common)
    assert checkpoint_steps(tmp_path / "checkpoint/from_tf_model") == [2]
    (tmp_path / "text.txt").write_text("ordinary text has ids far above 64", encoding="utf-8")
    with pytest.raises(ValueError, match="outside this model's vocabulary of 64"):
        gpt2.finetune(gpt2.start_tf_sess(), "text.txt", steps=1, run_name="other", **common)


def test_tensorboard_events_when_installed(root):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(root, steps=4, val_fraction=0.1, val_every=2)
    events = EventAccumulator(str(root / "checkpoint" / "run1"))
    events.Reload()
    log = [json.loads(line) for line in (root / "checkpoint/run1/log.jsonl").read_text().splitlines()]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [(x["step"], round(x["loss"], 5)) for x in log if "loss" in x]
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]
