"""Shared by the generate tests: a run folder from a PyTorch model, and the original's generate()
computed with the PyTorch reference generator (full length, then the original's text rules)."""

from gpt_2_simple.engine import Request
from gpt_2_simple.tokenizer import BUNDLED_DIR, get_encoder
from gpt_2_simple.torch_generate import generate_tokens
from gpt_2_simple.weights import save_weights
from test_generate_text import original_text

ENC = get_encoder()


def save_run(folder, model, step):
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder / "hparams.json")
    for name in ("encoder.json", "vocab.bpe"):
        (folder / name).write_bytes((BUNDLED_DIR / name).read_bytes())
    save_weights(folder / f"model-{step}.safetensors", model.state_dict(), model.config, metadata={"step": str(step)})
    (folder / "counter").write_text(str(step))


def reference_tokens(model, prompts, *, length, temperature=0.7, top_k=0, top_p=0.0, seed, first_index=0):
    """The original's sampling on the PyTorch generator, full length: (prompt ids, generated ids)
    per sample; sample ``i`` of ``prompts`` draws with (seed, first_index + i)."""
    requests = []
    for i, prefix in enumerate(prompts, start=first_index):
        context = ENC.encode(prefix) if prefix else [ENC.eot_token]
        new = length - len(context) if prefix else length  # gpt_2.py line 465: length counts the prefix
        requests.append(Request(prompt=context, max_new_tokens=max(new, 0), temperature=temperature,
                                top_k=0 if top_p > 0 else top_k, top_p=top_p, seed=seed, sample_index=i))
    results = generate_tokens(model, requests, batch_size=len(requests))
    return [(r.prompt, res.tokens) for r, res in zip(requests, results)]


def texts_of(outputs, prompts, truncate=None, include_prefix=True):
    """The original's text rules applied to ``reference_tokens`` outputs."""
    return [original_text(ENC, context, tokens, p, truncate, include_prefix) for (context, tokens), p in zip(outputs, prompts)]


def reference(model, prompts, *, truncate=None, include_prefix=True, **sampling):
    """The original's generate() on the PyTorch generator: full length, then its text rules."""
    return texts_of(reference_tokens(model, prompts, **sampling), prompts, truncate, include_prefix)
