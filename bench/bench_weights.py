"""Weight I/O speed on a 124M-shaped checkpoint (random values): our readers and writer against
their peers, and CRC32C throughput.

    python bench/bench_weights.py [--tf-python /work/tfvenv/bin/python] [--reps 7]

- crc32c: our numpy lane implementation vs the plain table loop (pure Python), 16 MiB.
- safetensors: save_weights vs safetensors.numpy.save_file (ours also fsyncs and renames);
  load_weights (header + mmap) and load_weights + copying every tensor out vs
  safetensors.numpy.load_file, interleaved A B A B.
- TensorFlow checkpoint (with --tf-python, a venv with tensorflow): that interpreter writes
  model.ckpt with GPT-2's names and times TensorFlow's own reader (tf.train.load_checkpoint +
  get_tensor of every variable, after import); we time load_weights + copying every tensor
  out, and load_weights(verify_crc=True). The two run in separate processes, one after the other.

Files live in a temporary folder (page cache warm after the untimed first run). Results:
bench/results/weights.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from checkout import ROOT  # noqa: E402  (the checkout's sources or the installed package)

from gpt_2_simple.config import get_config  # noqa: E402
from gpt_2_simple.tf_checkpoint import _crc_bytes, crc32c  # noqa: E402
from gpt_2_simple.weights import expected_shapes, load_weights, save_weights  # noqa: E402

TF_SCRIPT = r"""
import json, sys, time
import numpy as np
import tensorflow as tf
prefix, mode = sys.argv[1], sys.argv[2]
if mode == "write":
    hp = json.load(open(sys.argv[3]))
    C, rng = hp["n_embd"], np.random.default_rng(0)
    shapes = {"model/wte": (hp["n_vocab"], C), "model/wpe": (hp["n_ctx"], C), "model/ln_f/g": (C,), "model/ln_f/b": (C,)}
    for i in range(hp["n_layer"]):
        for m, (n_in, n_out) in {"attn/c_attn": (C, 3 * C), "attn/c_proj": (C, C), "mlp/c_fc": (C, 4 * C), "mlp/c_proj": (4 * C, C)}.items():
            shapes[f"model/h{i}/{m}/w"], shapes[f"model/h{i}/{m}/b"] = (1, n_in, n_out), (n_out,)
        for ln in ("ln_1", "ln_2"):
            shapes[f"model/h{i}/{ln}/g"] = shapes[f"model/h{i}/{ln}/b"] = (C,)
    tf.compat.v1.disable_eager_execution()
    with tf.compat.v1.Session() as sess:
        vs = [tf.compat.v1.get_variable(n, initializer=rng.standard_normal(s, dtype=np.float32)) for n, s in shapes.items()]
        sess.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.train.Saver(vs).save(sess, prefix, write_meta_graph=False)
else:
    reps, times = int(sys.argv[3]), []
    for _ in range(reps + 1):  # the first is the warm-up
        t = time.perf_counter()
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
        times.append(time.perf_counter() - t)
    print(json.dumps(times[1:]))
"""


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(a, b, reps: int) -> tuple[list[float], list[float]]:
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(reps):
        for fn, acc in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return ta, tb


def summary(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times), "runs": len(times)}


def pair(name_a: str, ta: list[float], name_b: str, tb: list[float]) -> dict:
    ratios = [b / a for a, b in zip(ta, tb)]
    return {name_a: summary(ta), name_b: summary(tb), f"{name_b}_over_{name_a}_median": statistics.median(ratios)}


def copy_all(state: dict) -> None:
    for array in state.values():
        np.array(array, copy=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tf-python", help="python of a venv with tensorflow (for the TF reader peer)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    from safetensors.numpy import load_file, save_file

    config = get_config("124M")
    rng = np.random.default_rng(0)
    state = {n: rng.standard_normal(s, dtype=np.float32) for n, s in expected_shapes(config).items()}
    nbytes = sum(a.nbytes for a in state.values())
    results: dict = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__},
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": "124M shapes, float32, random", "bytes": nbytes,
    }  # fmt: skip

    data = rng.integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    small = data[: 1 << 20]
    ours = timed(lambda: crc32c(data), args.reps)
    loop = timed(lambda: _crc_bytes(0xFFFFFFFF, small), 3)
    results["crc32c_16MiB"] = {"ours": summary(ours), "ours_MB_per_s": len(data) / statistics.median(ours) / 1e6,
                               "python_loop_MB_per_s": len(small) / statistics.median(loop) / 1e6}  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours_path, lib_path = tmp / "run" / "model-1.safetensors", tmp / "lib.safetensors"
        ta, tb = interleaved(lambda: save_weights(ours_path, state, config), lambda: save_file(state, lib_path), args.reps)
        results["safetensors_save"] = pair("save_weights", ta, "safetensors_save_file", tb)
        ta, tb = interleaved(lambda: load_weights(ours_path), lambda: load_file(lib_path), args.reps)
        results["safetensors_open"] = pair("load_weights_mmap", ta, "safetensors_load_file", tb)
        ta, tb = interleaved(lambda: copy_all(load_weights(ours_path)[1]), lambda: load_file(lib_path), args.reps)
        results["safetensors_read_all"] = pair("load_weights_and_copy", ta, "safetensors_load_file", tb)

        if args.tf_python:
            script = tmp / "tf_bench.py"
            script.write_text(TF_SCRIPT)
            (tmp / "tf").mkdir()
            config.save(tmp / "tf" / "hparams.json")
            prefix = str(tmp / "tf" / "model.ckpt")
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            subprocess.run([args.tf_python, str(script), prefix, "write", str(tmp / "tf" / "hparams.json")], check=True, env=env)
            out = subprocess.run([args.tf_python, str(script), prefix, "read", str(args.reps)], check=True, capture_output=True, text=True, env=env)
            tf_times = json.loads(out.stdout.strip().splitlines()[-1])
            ours_tf = timed(lambda: copy_all(load_weights(tmp / "tf")[1]), args.reps)
            results["tf_read_all"] = pair("load_weights_and_copy", ours_tf, "tensorflow_reader", tf_times)
            results["tf_open"] = {"load_weights_mmap": summary(timed(lambda: load_weights(tmp / "tf"), args.reps))}
            results["tf_verify_crc"] = {"load_weights_verify_crc": summary(timed(lambda: load_weights(tmp / "tf", verify_crc=True), args.reps))}

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "weights.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
