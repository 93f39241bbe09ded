"""model.py against transformers.GPT2LMHeadModel with the same weights."""

import pytest
import torch

from gpt_2_simple.config import ALIASES, PRETRAINED, SCRATCH, GPT2Config, canonical_name, get_config
from gpt_2_simple.model import GPT2
from reference import TINY, random_gpt2, to_transformers


def test_logits_match_transformers():
    pytest.importorskip("transformers")
    model = random_gpt2()
    hf = to_transformers(model)
    idx = torch.randint(0, TINY.n_vocab, (3, TINY.n_ctx), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == (3, TINY.n_ctx, TINY.n_vocab)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_kv_cache_matches_full_forward():
    model = random_gpt2()
    idx = torch.randint(0, TINY.n_vocab, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        logits, past = model(idx[:, :17], use_cache=True)
        steps = [logits]
        for t in range(17, 40):  # one token at a time, as decoding does
            logits, past = model(idx[:, t : t + 1], past=past, use_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_same_gradients():
    idx = torch.randint(0, TINY.n_vocab, (2, 32), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        model = random_gpt2().train()
        model.gradient_checkpointing = checkpointing
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("freeze_wte", [False, True])
def test_chunked_head_loss_equals_cross_entropy_of_the_logits(freeze_wte, device, monkeypatch):
    """model(idx, targets=...) (head_loss.py: logits a chunk of CHUNK_ROWS tokens at a time)
    against PyTorch's own F.cross_entropy on the whole logits: the loss and every gradient, over
    several chunks and a partial one, with ignored targets in the first, a middle and the last.
    On CUDA this is finetune's path with mixed_precision=False (autocast keeps the plain form)."""
    from gpt_2_simple import head_loss
    from gpt_2_simple.head_loss import IGNORE

    monkeypatch.setattr(head_loss, "CHUNK_ROWS", 50)  # 192 tokens: 3 chunks and 42 tokens
    g = torch.Generator().manual_seed(4)
    B, T = 3, TINY.n_ctx
    idx = torch.randint(0, TINY.n_vocab, (B, T), generator=g)
    targets = torch.randint(0, TINY.n_vocab, (B, T), generator=g)
    targets[0, :5] = IGNORE
    targets[1, T // 2 :] = IGNORE
    targets[2, -1] = IGNORE
    idx, targets = idx.to(device), targets.to(device)
    losses, grads = [], []
    for chunked in (False, True):
        model = random_gpt2().to(device).train()
        model.wte.weight.requires_grad_(not freeze_wte)
        if chunked:
            loss = model(idx, targets=targets)
        else:
            loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        (loss * 0.37).backward()  # a scale, as the trainer's 1 / n_targets
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    assert grads[1].keys() == grads[0].keys() and ("wte.weight" in grads[0]) == (not freeze_wte)
    for name, ref in grads[0].items():  # sums in another order: float32 rounding of the tensor's scale
        torch.testing.assert_close(grads[1][name], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()), msg=name)
    with torch.no_grad():  # validation's use: the loss alone
        torch.testing.assert_close(model(idx, targets=targets), losses[1], rtol=0, atol=0)


def test_context_overflow_is_a_clear_error():
    model = random_gpt2()
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_state_dict_names_are_gpt2_names():
    names = set(random_gpt2().state_dict())
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} <= names
    for i in range(TINY.n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            assert {f"h.{i}.{part}.weight", f"h.{i}.{part}.bias"} <= names
    assert random_gpt2().state_dict()["h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D (in, out)


@pytest.mark.parametrize("name", [*PRETRAINED, *SCRATCH])
def test_parameter_counts_match_transformers(name):
    transformers = pytest.importorskip("transformers")
    c = get_config(name)
    hf_config = transformers.GPT2Config(vocab_size=c.n_vocab, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head)
    with torch.device("meta"):  # no memory for the large sizes
        hf = transformers.GPT2Model(hf_config)
        ours = GPT2(c)
    assert c.n_params() == sum(p.numel() for p in hf.parameters())
    assert c.n_params() == sum(p.numel() for p in ours.parameters())


def test_config_names_and_hparams_round_trip(tmp_path):
    assert canonical_name("117M") == "124M" and ALIASES["345M"] == "355M"
    assert get_config("345M") == get_config("355M")
    assert 3_000_000 < get_config("tiny").n_params() < 10_000_000
    with pytest.raises(ValueError, match="unknown model name 'huge'"):
        get_config("huge")
    get_config("mini").save(tmp_path / "hparams.json")
    assert GPT2Config.from_file(tmp_path / "hparams.json") == get_config("mini")
    hf_style = {"vocab_size": 100, "n_positions": 32, "n_embd": 16, "n_head": 2, "n_layer": 1, "model_type": "gpt2"}
    assert GPT2Config.from_hparams(hf_style) == GPT2Config(n_vocab=100, n_ctx=32, n_embd=16, n_head=2, n_layer=1)
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=10, n_head=3)
