"""lean.py: the optimizer step inside the backward pass against torch's own optimizers step for
step, activation checkpointing against plain gradients, the state layout across modes, exact
resume of lean runs through finetune(), and the memory plan's choices."""

import pytest
import torch

from gpt_2_simple import lean
from gpt_2_simple.config import GPT2Config, get_config
from gpt_2_simple.model import GPT2
from reference import random_gpt2
from test_train import root, run, weights  # noqa: F401  (root is a fixture)

TINY = GPT2Config(n_ctx=32, n_embd=32, n_head=2, n_layer=2, n_vocab=97)


def _batches(n: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.n_vocab, (batch, TINY.n_ctx + 1), generator=g) for _ in range(n)]


def _train(model, opt, batches, accumulate: int):
    """finetune's step: accumulate micro-batches (token-mean loss), then step."""
    for i in range(0, len(batches), accumulate):
        group = batches[i : i + accumulate]
        n = sum(x[:, 1:].numel() for x in group)
        for m, x in enumerate(group):
            if isinstance(opt, lean.OptimizerInBackward):
                opt.stepping = m == len(group) - 1
            (model(x[:, :-1], targets=x[:, 1:]) / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adam", "adamw", "adafactor", "sgd"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_step_in_backward_equals_the_optimizer(name, accumulate):
    reference, lean_model = random_gpt2(TINY, seed=1), random_gpt2(TINY, seed=1)
    plain = lean.build_optimizer(name, list(reference.parameters()), 3e-3, "cpu")
    in_backward = lean.build_optimizer(name, list(lean_model.parameters()), 3e-3, "cpu", in_backward=True)
    assert type(plain).__name__ == {"adam": "Adam", "adamw": "AdamW", "adafactor": "Adafactor", "sgd": "SGD"}[name]
    batches = _batches(4 * accumulate)
    for step in range(4):  # step for step: the same weights after each
        _train(reference, plain, batches[step * accumulate : (step + 1) * accumulate], accumulate)
        _train(lean_model, in_backward, batches[step * accumulate : (step + 1) * accumulate], accumulate)
        for (k, a), b in zip(reference.state_dict().items(), lean_model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name} step {step + 1}: {k}")
    assert all(p.grad is None for p in lean_model.parameters())  # freed in the backward pass


def test_whole_model_gradients_never_exist():
    model = random_gpt2(TINY, seed=1)
    opt = lean.build_optimizer("adam", list(model.parameters()), 1e-3, "cpu", in_backward=True)
    alive, largest = [], max(p.numel() for p in model.parameters())

    def count(_):  # at each gradient's arrival: how many gradient values exist now
        alive.append(sum(p.grad.numel() for p in model.parameters() if p.grad is not None))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(count)  # runs after lean's hook on the same tensor
    x = _batches(1)[0]
    model(x[:, :-1], targets=x[:, 1:]).backward()
    assert len(alive) == len(list(model.parameters())) and max(alive) <= largest
    opt.remove_hooks()


def test_checkpointing_gives_the_same_gradients():
    a, b = random_gpt2(TINY, seed=3), random_gpt2(TINY, seed=3)
    b.gradient_checkpointing = True
    x = _batches(1)[0]
    for model in (a, b):
        model.train()
        model(x[:, :-1], targets=x[:, 1:]).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_state_moves_between_the_modes(name):
    """A state saved in one mode continues exactly in the other (the plain optimizer's layout)."""
    batches = _batches(6)
    models = [random_gpt2(TINY, seed=4) for _ in range(3)]
    straight = lean.build_optimizer(name, list(models[0].parameters()), 1e-3, "cpu")
    _train(models[0], straight, batches, 1)
    first = lean.build_optimizer(name, list(models[1].parameters()), 1e-3, "cpu", in_backward=True)
    _train(models[1], first, batches[:3], 1)
    saved = first.state_dict()
    assert saved.keys() == straight.state_dict().keys() and [g["params"] for g in saved["param_groups"]] == [g["params"] for g in straight.state_dict()["param_groups"]]
    models[2].load_state_dict(models[1].state_dict())
    second = lean.build_optimizer(name, list(models[2].parameters()), 1e-3, "cpu")  # plain again
    second.load_state_dict(saved)
    _train(models[2], second, batches[3:], 1)
    for a, b in zip(models[0].parameters(), models[2].parameters()):
        assert torch.equal(a, b)
    wrong = lean.build_optimizer(name, list(models[2].parameters())[:-1], 1e-3, "cpu", in_backward=True)
    with pytest.raises(ValueError, match="other parameters"):
        wrong.load_state_dict(saved)


@pytest.mark.parametrize("kw", [dict(optimizer_in_backward=True), dict(optimizer_in_backward=True, optimizer="adafactor", learning_rate=1e-2),
                                dict(optimizer_in_backward=True, accumulate_gradients=2, use_memory_saving_gradients=True)])
def test_lean_runs_resume_exactly(root, kw):  # noqa: F811
    run(root, steps=4, run_name="straight", **kw)
    run(root, steps=2, run_name="resumed", **kw)
    run(root, steps=2, run_name="resumed", **kw)
    a, b = weights(root, 4, "straight"), weights(root, 4, "resumed")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # and the same weights as the plain optimizer (the step in backward is the same arithmetic)
    plain = {**kw, "optimizer_in_backward": False}
    run(root, steps=4, run_name="plain", **plain)
    c = weights(root, 4, "plain")
    assert all((a[k] == c[k]).all() for k in a)


def test_bad_lean_options(root):  # noqa: F811
    with pytest.raises(ValueError, match="adam8bit.*CUDA.*adafactor"):
        run(root, steps=1, optimizer="adam8bit", device="cpu")
    with pytest.raises(ValueError, match="optimizer_in_backward=True works in one process without compile"):
        run(root, steps=1, optimizer_in_backward=True, compile=True)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; choose one of: adam, adamw, sgd, adafactor, adam8bit"):
        run(root, steps=1, optimizer="lion")


def _plan(name="774M", available=16 * 2**30, **kw):
    config = get_config(name)
    with torch.device("meta"):  # shapes only: no memory for the weights
        model = GPT2(config)
    args = dict(optimizer="adam", batch_size=1, accumulate=1, in_backward=None, checkpointing=False, available=available)
    args.update(kw)
    return lean.plan(config, sum(p.numel() for p in model.parameters()), [p.shape for p in model.parameters()], **args)


def test_memory_plan():
    roomy = _plan(available=2**50)
    assert not roomy.in_backward and not roomy.checkpointing and roomy.notes == []
    # 774M with Adam on 16 GiB: the step in backward and checkpointing make it fit (~11 GiB)
    small = _plan()
    assert small.in_backward and small.checkpointing and small.estimate < 0.9 * 16 * 2**30 and len(small.notes) == 2
    # asked for explicitly: kept, whatever the estimate says
    assert not _plan(in_backward=False).in_backward
    # with accumulation the gradients must live: only checkpointing, then advice
    acc = _plan(accumulate=5)
    assert not acc.in_backward and acc.checkpointing
    tight = _plan("1558M", available=15 * 2**30)
    assert "optimizer='adam8bit' (CUDA, bitsandbytes) or 'adafactor'" in tight.notes[-1]
    assert _plan("1558M", available=15 * 2**30, optimizer="adafactor").estimate < 0.9 * 15 * 2**30
    # each lean part lowers the estimate
    full = _plan(in_backward=False)
    assert full.estimate > _plan(in_backward=True).estimate > _plan(in_backward=True, checkpointing=True).estimate > \
        _plan(in_backward=True, checkpointing=True, optimizer="adafactor").estimate
