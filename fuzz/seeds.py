"""Write a seed corpus for every fuzz target into OUT/<target>/ (valid files to mutate)."""

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import format_reader as fr  # noqa: E402
from gpt_2_simple.config import GPT2Config  # noqa: E402
from gpt_2_simple.weights import expected_shapes, save_weights  # noqa: E402

out = Path(sys.argv[1])
for target in ("bin_loader", "tf_index", "safetensors", "prompts"):
    (out / target).mkdir(parents=True, exist_ok=True)
# The smallest model the byte-level tokenizer allows (short inputs keep the fuzzer fast).
from gpt_2_simple.export import export  # noqa: E402

tiny = GPT2Config(n_vocab=259, n_ctx=2, n_embd=2, n_head=1, n_layer=1)
rng = np.random.default_rng(0)
weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(tiny).items()}
export((tiny, weights), out / "bin_loader" / "tiny.bin", "bf16", tokenizer_dir=fr.make_tokenizer(out / "tmp"), progress=False)
for i, index in enumerate(sorted((ROOT / "tests" / "fixtures" / "tf").rglob("*.index"))):
    shutil.copy(index, out / "tf_index" / f"{i}.index")
config = GPT2Config(n_vocab=8, n_ctx=4, n_embd=4, n_head=2, n_layer=1)
state = {n: np.zeros(s, np.float32) for n, s in expected_shapes(config).items()}
save_weights(out / "safetensors" / "tiny.safetensors", state, config=config)
header = json.dumps({"a": {"dtype": "BF16", "shape": [2, 1], "data_offsets": [0, 4]}}).encode()
(out / "safetensors" / "bf16.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
(out / "prompts" / "rows.jsonl").write_text('{"prompt": "Hello", "temperature": 0.5, "top_k": 4}\n{"prompt": null, "seed": 3, "length": 5}\n')
(out / "prompts" / "lines.txt").write_text("one prompt\n\nanother\n")
shutil.rmtree(out / "tmp")
