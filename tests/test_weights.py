"""weights.py: our safetensors checkpoints, HF files and OpenAI TensorFlow checkpoints (the
fixture in tests/fixtures/tf was written by real TensorFlow: tests/fixtures/make_tf_checkpoints.py)."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as st_load_file
from safetensors.numpy import save_file as st_save_file

from gpt_2_simple.config import GPT2Config
from gpt_2_simple.model import GPT2
from gpt_2_simple.weights import expected_shapes, find_checkpoint, latest_checkpoint, load_weights, save_weights
from reference import TINY, random_gpt2, to_transformers

FIXTURE = Path(__file__).parent / "fixtures" / "tf"


def _numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _assert_same(state: dict, reference: dict) -> None:
    assert sorted(state) == sorted(reference)
    for name, array in reference.items():
        assert state[name].dtype == array.dtype, name
        np.testing.assert_array_equal(state[name], array, err_msg=name)


# --------------------------------------------------------------------------- our safetensors files


def test_round_trip_is_bit_exact_and_readable_by_safetensors(tmp_path):
    model = random_gpt2()
    save_weights(tmp_path / "model-3.safetensors", model.state_dict(), TINY, metadata={"step": 3})
    reference = _numpy_state(model)
    _assert_same(st_load_file(tmp_path / "model-3.safetensors"), reference)  # the library reads our writer
    with safe_open(tmp_path / "model-3.safetensors", "np") as f:
        meta = f.metadata()
    assert meta["format"] == "gpt_2_simple" and meta["step"] == "3"
    assert GPT2Config.from_hparams(json.loads(meta["config"])) == TINY
    config, state = load_weights(tmp_path)  # no hparams.json: the config comes from the metadata
    assert config == TINY
    _assert_same(state, reference)


def test_reads_what_the_safetensors_library_writes(tmp_path):
    reference = _numpy_state(random_gpt2(seed=1))
    st_save_file(reference, tmp_path / "model-1.safetensors")
    TINY.save(tmp_path / "hparams.json")
    config, state = load_weights(tmp_path / "model-1.safetensors")
    assert config == TINY
    _assert_same(state, reference)


def test_half_precision_round_trip(tmp_path):
    state = random_gpt2().state_dict()
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    fp16 = {k: v.numpy().astype(np.float16) for k, v in state.items()}
    save_weights(tmp_path / "bf16.safetensors", bf16, TINY)
    save_weights(tmp_path / "fp16.safetensors", fp16, TINY)
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "bf16.safetensors")
    assert all(torch.equal(loaded[k], bf16[k]) for k in bf16)
    _, read = load_weights(tmp_path / "bf16.safetensors")  # numpy has no bfloat16: widened exactly
    _assert_same(read, {k: v.float().numpy() for k, v in bf16.items()})
    _, read = load_weights(tmp_path / "fp16.safetensors")
    _assert_same(read, fp16)


def test_mixed_dtypes_stay_aligned(tmp_path):
    state = {"a": np.arange(3, dtype=np.float16), "b": np.arange(5, dtype=np.float32), "c": np.arange(2, dtype=np.int64)}
    save_weights(tmp_path / "w.safetensors", state)
    from gpt_2_simple.weights import _read_safetensors

    _, read = _read_safetensors(tmp_path / "w.safetensors")
    _assert_same(read, state)
    _assert_same(st_load_file(tmp_path / "w.safetensors"), state)
    assert all(a.flags.aligned for a in read.values())


def _run_without_torch(code: str) -> None:
    """Run ``code`` in a fresh interpreter and check it never imported torch."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}
    out = subprocess.run([sys.executable, "-c", code + "\nassert 'torch' not in sys.modules\n"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


def test_save_from_numpy_does_not_import_torch(tmp_path):
    _run_without_torch(
        "import sys, numpy as np\n"
        "from gpt_2_simple.weights import save_weights\n"
        f"save_weights({str(tmp_path / 'w.safetensors')!r}, {{'a': np.arange(6, dtype=np.float32).reshape(2, 3)}})\n"
    )
    np.testing.assert_array_equal(st_load_file(tmp_path / "w.safetensors")["a"], np.arange(6).reshape(2, 3))


def test_failed_save_leaves_previous_file(tmp_path):
    path = tmp_path / "model-1.safetensors"
    save_weights(path, random_gpt2().state_dict(), TINY)
    before = path.read_bytes()
    bad = dict(random_gpt2().state_dict())
    bad["wpe.weight"] = bad["wpe.weight"][:10]
    with pytest.raises(ValueError, match=r"wpe.weight has shape \(10, 64\)"):
        save_weights(path, bad, TINY)
    with pytest.raises(TypeError, match="give numpy arrays or torch tensors"):
        save_weights(path, {"wte.weight": [1.0, 2.0]})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model-1.safetensors"]  # no temporary file left behind


def test_latest_is_the_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None
    state = random_gpt2().state_dict()
    for step in (2, 10, 9):
        save_weights(tmp_path / f"model-{step}.safetensors", {**state, "wte.weight": state["wte.weight"] * step}, TINY)
    (tmp_path / "model-99.safetensors.tmp").write_bytes(b"partial")  # not a checkpoint
    latest = latest_checkpoint(tmp_path)
    assert (latest.step, latest.format, latest.name) == (10, "safetensors", "model-10.safetensors")
    _, weights = load_weights(tmp_path)
    np.testing.assert_array_equal(weights["wte.weight"], state["wte.weight"].numpy() * 10)
    assert find_checkpoint(tmp_path, 9).step == 9
    assert find_checkpoint(tmp_path, "model-2").step == 2
    assert find_checkpoint(tmp_path, "model-2.safetensors").step == 2
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 'model-5'.*model-2.safetensors, model-9.safetensors"):
        find_checkpoint(tmp_path, "model-5")


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    state = _numpy_state(random_gpt2())
    del state["h.1.mlp.c_fc.bias"]
    state["h.2.ln_1.weight"] = np.ones(64, np.float32)
    save_weights(tmp_path / "model-1.safetensors", state)
    TINY.save(tmp_path / "hparams.json")
    with pytest.raises(ValueError, match=r"missing 1 tensors \(h.1.mlp.c_fc.bias\); unexpected 1 tensors \(h.2.ln_1.weight\)"):
        load_weights(tmp_path)


def test_hparams_that_do_not_fit_the_weights(tmp_path):
    save_weights(tmp_path / "model-1.safetensors", random_gpt2().state_dict())
    GPT2Config(n_ctx=128, n_embd=64, n_head=4, n_layer=2).save(tmp_path / "hparams.json")
    with pytest.raises(ValueError, match=r"wpe.weight has shape \(64, 64\) but hparams.json .* needs \(128, 64\)"):
        load_weights(tmp_path)
    os.remove(tmp_path / "hparams.json")
    with pytest.raises(FileNotFoundError, match="no hparams.json or config.json beside"):
        load_weights(tmp_path)
    save_weights(tmp_path / "model-2.safetensors", random_gpt2().state_dict(), TINY)
    GPT2Config(n_ctx=64, n_embd=64, n_head=8, n_layer=2).save(tmp_path / "hparams.json")
    with pytest.raises(ValueError, match="disagrees with the config stored in model-2.safetensors"):
        load_weights(tmp_path)


def test_damaged_safetensors(tmp_path):
    path = tmp_path / "model-1.safetensors"
    save_weights(path, random_gpt2().state_dict(), TINY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="past the end of the .* file \\(truncated\\)"):
        load_weights(path)
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(path)
    path.write_bytes(data[:8] + b"x" + data[9:])
    with pytest.raises(ValueError, match="unreadable header"):
        load_weights(path)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short for a safetensors file"):
        load_weights(path)


def test_nothing_to_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model weights in"):
        load_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "model-1.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_weights(tmp_path / "weights.npz")


def test_expected_shapes_match_model_py():
    config = GPT2Config(n_vocab=96, n_ctx=32, n_embd=16, n_head=2, n_layer=3)
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in GPT2(config).state_dict().items()}


# --------------------------------------------------------------------------- HF files


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """The same random model as transformers saves it (model.safetensors) and as the hub's
    pytorch_model.bin for gpt2 is laid out (GPT2Model names, no prefix, mask buffers included).
    transformers 5 no longer writes .bin files, so torch.save writes it and transformers must
    load it back to the same logits, which shows the file is what transformers reads."""
    transformers = pytest.importorskip("transformers")
    model = random_gpt2(seed=4)
    hf = to_transformers(model)
    root = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(root / "safe")
    (root / "bin").mkdir()
    shutil.copy(root / "safe" / "config.json", root / "bin" / "config.json")
    state = dict(model.state_dict())
    for i in range(TINY.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, TINY.n_ctx, TINY.n_ctx))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, root / "bin" / "pytorch_model.bin")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(root / "bin").eval()
    idx = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    return model, root


def test_transformers_files_load_identically(hf_folders):
    model, root = hf_folders
    reference = _numpy_state(model)
    for folder in (root / "safe", root / "bin"):
        config, state = load_weights(folder)
        assert config == TINY
        _assert_same(state, reference)
    _, state = load_weights(root / "safe" / "model.safetensors")
    _assert_same(state, reference)
    assert find_checkpoint(root / "bin").format == "torch"


def test_legacy_torch_serialization(hf_folders, tmp_path):
    """The hub's GPT-2 .bin files predate torch's zip format (torch < 1.6)."""
    model, root = hf_folders
    shutil.copy(root / "bin" / "config.json", tmp_path)
    state = torch.load(root / "bin" / "pytorch_model.bin", weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same(load_weights(tmp_path)[1], _numpy_state(model))


def test_hf_keys_with_buffers_and_tied_head(tmp_path):
    """Older transformers saved the causal-mask buffers and lm_head; both are dropped."""
    reference = _numpy_state(random_gpt2())
    state = {f"transformer.{k}": v for k, v in reference.items()}
    state["lm_head.weight"] = reference["wte.weight"]
    for i in range(TINY.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        state[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    st_save_file(state, tmp_path / "model.safetensors")
    json.dump({"vocab_size": 50257, "n_positions": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}, open(tmp_path / "config.json", "w"))
    _assert_same(load_weights(tmp_path)[1], reference)
    state["lm_head.weight"] = reference["wte.weight"] + 1
    st_save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="untied head is not supported"):
        load_weights(tmp_path)


def test_hf_config_of_another_architecture(tmp_path):
    st_save_file(_numpy_state(random_gpt2()), tmp_path / "model.safetensors")
    hf = {"vocab_size": 50257, "n_positions": 64, "n_embd": 64, "n_head": 4, "n_layer": 2, "activation_function": "relu"}
    json.dump(hf, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="activation_function='relu' is not GPT-2's architecture"):
        load_weights(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's own, before it refuses
def test_pickled_bin_is_refused(tmp_path):
    import pickle

    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"wte.weight": object()}, f)
    TINY.save(tmp_path / "hparams.json")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_weights(tmp_path)


# --------------------------------------------------------------------------- TensorFlow checkpoints


def _fixture_reference() -> dict[str, np.ndarray]:
    """The arrays the fixture script gave TensorFlow, under our names (Conv1D weights squeezed)."""
    reference = {}
    for name, array in np.load(FIXTURE / "arrays.npz").items():
        parts = name.split(".")[1:]  # model.h0.attn.c_attn.w -> h0 attn c_attn w
        if parts[0].startswith("h"):
            parts[0] = f"h.{parts[0][1:]}"
        if len(parts) == 1:
            parts.append("w")
        parts[-1] = {"g": "weight", "b": "bias", "w": "weight"}[parts[-1]]
        reference[".".join(parts)] = array[0] if array.ndim == 3 else array
    return reference


FIXTURE_CONFIG = GPT2Config(n_vocab=64, n_ctx=16, n_embd=8, n_head=2, n_layer=2)


@pytest.mark.parametrize("folder", ["models/tiny", "checkpoint/run1", "hf"])
def test_fixture_formats_load_to_the_same_tensors(folder):
    config, state = load_weights(FIXTURE / folder, verify_crc=True)
    assert config == FIXTURE_CONFIG
    _assert_same(state, _fixture_reference())


def test_tf_run_folder_checkpoints_and_optimizer_slots():
    from gpt_2_simple.tf_checkpoint import TFCheckpoint, read_checkpoint_state

    run = FIXTURE / "checkpoint" / "run1"
    assert read_checkpoint_state(run) == ("model-5", ["model-3", "model-5"])
    names = set(TFCheckpoint(run / "model-5").entries)
    assert {"global_step", "beta1_power", "model/wte/Adam", "model/h1/mlp/c_fc/w/Adam_1"} <= names  # really there
    latest = find_checkpoint(run)
    assert (latest.format, latest.step, latest.name) == ("tf", 5, "model-5")
    reference = _fixture_reference()
    for which in ("model-3", 3, "3"):
        _, state = load_weights(find_checkpoint(run, which).path)
        _assert_same(state, {k: v + np.float32(0.5) for k, v in reference.items()})
    assert find_checkpoint(FIXTURE / "models" / "tiny").step is None


def test_checkpoint_file_from_another_machine(tmp_path):
    """Colab runs write absolute paths; a folder copied elsewhere still resolves by file name,
    and a `checkpoint` file naming a lost checkpoint falls back to the newest one, with a warning."""
    run = tmp_path / "run1"
    shutil.copytree(FIXTURE / "checkpoint" / "run1", run)
    (run / "checkpoint").write_text('model_checkpoint_path: "/content/checkpoint/run1/model-3"\n')
    assert find_checkpoint(run).name == "model-3"
    (run / "checkpoint").write_text('model_checkpoint_path: "model-9"\n')
    with pytest.warns(UserWarning, match="names 'model-9', which is not in the folder"):
        assert find_checkpoint(run).name == "model-5"
    os.remove(run / "checkpoint")
    assert find_checkpoint(run).name == "model-5"


def test_our_checkpoints_beside_tf_ones(tmp_path):
    """A gpt-2-simple run resumed by this package: the highest step wins, whatever the format."""
    run = tmp_path / "run1"
    shutil.copytree(FIXTURE / "checkpoint" / "run1", run)
    config, state = load_weights(run)
    save_weights(run / "model-4.safetensors", state, config)
    assert find_checkpoint(run).name == "model-5"
    save_weights(run / "model-7.safetensors", state, config)
    assert find_checkpoint(run).name == "model-7.safetensors"
    assert find_checkpoint(run, 5).format == "tf"


def test_crc32c_against_known_values():
    from gpt_2_simple.tf_checkpoint import _crc_bytes, crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4 test vectors
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    data = np.random.default_rng(0).integers(0, 256, 3 * 65536 + 1234, dtype=np.uint8).tobytes()
    expected = _crc_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF  # the plain table loop
    assert crc32c(data) == expected
    assert crc32c(data[1000:], crc32c(data[:1000])) == expected


def _damaged_copy(tmp_path, folder="models/tiny") -> Path:
    target = tmp_path / folder.replace("/", "_")
    shutil.copytree(FIXTURE / folder, target)
    return target


def test_flipped_byte_in_an_index_block(tmp_path):
    folder = _damaged_copy(tmp_path)
    index = folder / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    for position in (20, len(data) - 48 - 5 - 1):  # in a data block; the index block's last byte
        damaged = bytearray(data)
        damaged[position] ^= 0x40
        index.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"model.ckpt.index: CRC mismatch in the block at offset \d+; the checkpoint is damaged"):
            load_weights(folder)


def test_bad_magic_and_truncated_index(tmp_path):
    folder = _damaged_copy(tmp_path)
    index = folder / "model.ckpt.index"
    data = index.read_bytes()
    index.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="bad magic number"):
        load_weights(folder)
    index.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.ckpt.index: bad magic number"):
        load_weights(folder)
    index.write_bytes(data[:20])
    with pytest.raises(ValueError, match="too short for a checkpoint index"):
        load_weights(folder)


def test_truncated_and_missing_data_shard(tmp_path):
    folder = _damaged_copy(tmp_path)
    shard = folder / "model.ckpt.data-00000-of-00001"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"data-00000-of-00001: variable model/\S+ lies at bytes .* the file is truncated"):
        load_weights(folder)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match="model.ckpt.data-00000-of-00001 is missing"):
        load_weights(folder)


def test_flipped_byte_in_a_tensor_needs_verify_crc(tmp_path):
    folder = _damaged_copy(tmp_path)
    shard = folder / "model.ckpt.data-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(data)
    load_weights(folder)  # pages are not read unless asked
    with pytest.raises(ValueError, match="data-00000-of-00001: CRC mismatch in variable"):
        load_weights(folder, verify_crc=True)


def test_wrong_hparams_for_tf_weights(tmp_path):
    folder = _damaged_copy(tmp_path)
    (folder / "hparams.json").write_text(json.dumps({"n_vocab": 64, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing 12 tensors \(h.2.ln_1.weight"):
        load_weights(folder)
    (folder / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}))
    with pytest.raises(ValueError, match=r"wte.weight has shape \(64, 8\) but hparams.json .* needs \(50257, 8\)"):
        load_weights(folder)
    (folder / "hparams.json").write_text("{not json")
    with pytest.raises(ValueError, match="hparams.json is not valid JSON"):
        load_weights(folder)


def test_tf_reader_does_not_import_torch():
    _run_without_torch(
        "import sys\n"
        "from gpt_2_simple.weights import load_weights\n"
        f"config, state = load_weights({str(FIXTURE / 'checkpoint' / 'run1')!r}, verify_crc=True)\n"
        "assert len(state) == 28\n"
    )


def test_fixture_logits_match_transformers():
    """TF weights through model.py give transformers' logits for the HF copy of the fixture."""
    transformers = pytest.importorskip("transformers")
    from gpt_2_simple.weights import build_model

    config, state = load_weights(FIXTURE / "checkpoint" / "run1")
    model = build_model(config, state)
    hf = transformers.GPT2LMHeadModel.from_pretrained(FIXTURE / "hf", attn_implementation="eager").eval()
    idx = torch.randint(0, config.n_vocab, (2, config.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
