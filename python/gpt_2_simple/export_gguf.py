"""Export a model to GGUF, the single-file format of llama.cpp (and of ollama and LM Studio, which
run llama.cpp), written with ggml's own ``gguf`` package (``pip install gguf``; no torch).

``export_gguf(source, "model.gguf", dtype="q8_0")`` takes whatever ``export.export`` takes (a run
folder, a model folder, a weights file, our ``GPT2``, a session, ``(config, state_dict)``). The file
holds what llama.cpp's GPT-2 loader (``src/models/gpt2.cpp``, ``src/llama-vocab.cpp``) reads:

- ``general.architecture = "gpt2"`` and the ``gpt2.*`` hyper-parameters;
- the tokenizer: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE) with the ``"gpt-2"``
  pre-tokenizer, every token string in id order (GPT-2's byte-to-unicode spelling, as in
  ``encoder.json``), token types, the merges in rank order, and ``<|endoftext|>`` as BOS and EOS;
- the tensors under llama.cpp's names, the Conv1D matrices transposed to ggml's ``(out, in)`` rows.
  The output head is tied to ``token_embd`` (llama.cpp duplicates it when ``output.weight`` is absent).

Tensor types follow llama.cpp's own converter (``convert_hf_to_gguf.py``): biases, LayerNorms and
``position_embd`` stay F32; the four matrices per block and ``token_embd`` become F16 or Q8_0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import __version__
from .config import GPT2Config
from .export import _check_finite, _check_state, _load_source, _tokenizer_files
from .fileio import atomic_write
from .tokenizer import BUNDLED_DIR, END_OF_TEXT, bytes_to_unicode, get_encoder
from .weights import expected_shapes

__all__ = ["export_gguf", "gguf_name", "GGUF_DTYPES", "GGUFExportError"]

GGUF_DTYPES = ("f32", "f16", "q8_0")
# The largest finite float16: a weight beyond it would become infinite in an F16 file.
F16_MAX = 65504.0
# Conv1D matrices: (in, out) in our checkpoints, stored (out, in) in GGUF (ggml's ne = {in, out}).
_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# model.py's names -> llama.cpp's (gguf.MODEL_TENSOR names for the GPT2 architecture).
_GLOBAL_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
}
_BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF as asked (a missing ``gguf`` package, a bad dtype,
    weights that do not fit the chosen type)."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package (ggml's writer): pip install 'gpt_2_simple[gguf]' or pip install gguf") from None
    return gguf


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a ``model.py`` state-dict name (``h.3.mlp.c_fc.bias`` ->
    ``blk.3.ffn_up.bias``)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    head, _, rest = name.partition(".")
    block, _, rest = rest.partition(".")
    module, _, kind = rest.rpartition(".")
    if head != "h" or not block.isdigit() or module not in _BLOCK_NAMES:
        raise KeyError(f"{name} is not a GPT-2 tensor")
    return f"blk.{block}.{_BLOCK_NAMES[module]}.{kind}"


def _tensor_type(gguf, gguf_tensor: str, shape: tuple[int, ...], dtype: str):
    """The ggml type of one tensor, by llama.cpp's converter's rules (see the module docstring)."""
    t = gguf.GGMLQuantizationType
    if dtype == "f32" or len(shape) == 1 or gguf_tensor == "position_embd.weight":
        return t.F32
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[t.Q8_0][0] == 0:
        return t.Q8_0
    return t.F16  # f16, or q8_0 on rows that are not whole 32-value blocks (the converter's fallback)


def _tokenizer(folder: Path | None, n_vocab: int, gguf) -> tuple[list[str], list[int], list[str], int | None]:
    """-> (tokens in id order, token types, merges "a b" in rank order, end-of-text id or None):
    the run's own ``encoder.json``/``vocab.bpe`` when it has them, GPT-2's bundled files otherwise."""
    if folder is None or not (folder / "encoder.json").is_file():
        folder = BUNDLED_DIR
    encoder, _ = _tokenizer_files(folder, n_vocab)  # checked: ids 0..n-1 once each, n == n_vocab
    alphabet = set(bytes_to_unicode().values())
    tokens = sorted(encoder, key=encoder.__getitem__)
    types = []
    for text in tokens:
        if text == END_OF_TEXT:
            types.append(gguf.TokenType.CONTROL)
        elif not set(text) <= alphabet:
            # Not byte-level BPE spelling (an added token of a custom vocabulary): llama.cpp emits a
            # USER_DEFINED token's text as it is instead of mapping its characters back to bytes.
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    ranks = get_encoder(folder).bpe_ranks  # the merges exactly as our encoder ranks them
    merges = [f"{a} {b}" for a, b in sorted(ranks, key=ranks.__getitem__)]
    return tokens, [int(t) for t in types], merges, encoder.get(END_OF_TEXT)


def _tensors(config: GPT2Config, dtype: str, gguf) -> Iterator[tuple[str, str, tuple[int, ...], Any]]:
    """(our name, llama.cpp's name, GGUF shape, ggml type) of every tensor, in model.py's order."""
    for name, shape in expected_shapes(config).items():
        target = gguf_name(name)
        stored = tuple(shape[::-1]) if name.endswith(_MATRICES) else tuple(shape)
        yield name, target, stored, _tensor_type(gguf, target, stored, dtype)


def _convert(name: str, array, qtype, gguf) -> np.ndarray:
    """One tensor in its GGUF form: float32, Conv1D matrices transposed, then converted."""
    data = np.asarray(array, dtype=np.float32)
    _check_finite(name, data)
    data = np.ascontiguousarray(data.T if name.endswith(_MATRICES) else data)
    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return data
    if qtype == t.F16:
        peak = float(np.abs(data).max(initial=0.0))
        if peak > F16_MAX:
            raise GGUFExportError(f"tensor {name} holds {peak:g}, beyond float16's range (65504): export it with --dtype f32 or q8_0")
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def export_gguf(source: Any, out_path: str | os.PathLike, dtype: str = "f32", *, config: GPT2Config | None = None,
                tokenizer_dir: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """Write ``source`` (anything ``export.export`` takes) as a GGUF file that llama.cpp, ollama and
    LM Studio load; returns the path.

    ``dtype``: ``"f32"`` (exact), ``"f16"`` or ``"q8_0"`` (llama.cpp's 8-bit blocks: 32 weights and one
    f16 scale). ``name`` goes into ``general.name`` (default: the source folder's name). The tokenizer
    is the source folder's ``encoder.json``/``vocab.bpe`` (or ``tokenizer_dir``'s), else GPT-2's.
    Tensors are converted one at a time while the file is written, and the file appears atomically.
    """
    if dtype == "fp32":
        dtype = "f32"  # the flat binary's spelling of the same thing
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    gguf = _gguf()
    cfg, state, folder, _ = _load_source(source, config)
    _check_state(cfg, state)
    tokens, types, merges, eot = _tokenizer(Path(tokenizer_dir) if tokenizer_dir is not None else folder, cfg.n_vocab, gguf)
    if name is None:
        name = folder.name if folder is not None else "gpt_2_simple"
    layout = list(_tensors(cfg, dtype, gguf))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    writer = gguf.GGUFWriter(None, "gpt2")
    writer.add_name(name)
    writer.add_string("general.generator", f"gpt_2_simple {__version__}")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.n_ctx)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if eot is not None:
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)  # GPT-2 never saw a BOS token in front of its text
    writer.add_add_eos_token(False)
    for _, target, stored, qtype in layout:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(target, stored, np.dtype(np.float32), int(np.prod(stored)) // block * size, raw_dtype=qtype)
    out_path = Path(out_path)
    with atomic_write(out_path) as f:
        # The writer writes into our temporary file (its own would open the final path directly);
        # tensors are converted one at a time as they are written.
        writer.fout, writer.state = [f], gguf.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for ours, _, _, qtype in layout:
            writer.write_tensor_data(_convert(ours, state[ours], qtype, gguf))
        writer.fout = None  # atomic_write flushes, syncs, closes and renames it
    return out_path
