"""AdamW parameter groups and learning-rate schedules."""

import itertools
import math

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.model import GPT, preset
from gptforge.train.optim import LRSchedule, configure_optimizer, set_lr


def group_names(model, opt):
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [{names[id(p)] for p in g["params"]} for g in opt.param_groups]


def test_no_weight_decay_on_biases_layernorms_and_embeddings():
    model = GPT(preset("tiny"))
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = group_names(model, opt)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and ("attn" in n or "mlp" in n) for n in decay)
    assert "transformer.wte.weight" in no_decay or "lm_head.weight" in no_decay  # tied: one tensor
    assert "transformer.wpe.weight" in no_decay and "transformer.ln_f.weight" in no_decay
    assert any(n.endswith(".bias") for n in no_decay)
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == model.num_params()  # the tied matrix counted once, nothing missing


def test_untied_head_is_decayed_and_embeddings_can_be_decayed_on_request():
    model = GPT(preset("tiny", tie_embeddings=False))
    decay, no_decay = group_names(model, configure_optimizer(model, lr=1e-3))
    assert "lm_head.weight" in decay and "transformer.wte.weight" in no_decay
    decay, _ = group_names(model, configure_optimizer(model, lr=1e-3, decay_embeddings=True))
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= decay


def test_frozen_parameters_are_left_out_and_cpu_uses_foreach():
    model = GPT(preset("tiny"))
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    opt = configure_optimizer(model, lr=1e-3)
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    assert opt.defaults["foreach"] and not opt.defaults.get("fused")
    model.requires_grad_(False)
    with pytest.raises(GptforgeError, match="no trainable parameters"):
        configure_optimizer(model, lr=1e-3)


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    s = LRSchedule("cosine", max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 110)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_constant_and_warmup_stable_decay():
    c = LRSchedule("constant", max_lr=2.0, warmup_steps=4, total_steps=100)
    assert [c.lr_at(i) for i in (0, 3, 50, 99)] == [0.5, 2.0, 2.0, 2.0]
    w = LRSchedule("wsd", max_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100, decay_ratio=0.2)
    assert w.lr_at(79) == 1.0 and w.lr_at(80) == pytest.approx(0.95) and w.lr_at(99) == pytest.approx(0.0)
    linear = LRSchedule("wsd", max_lr=1.0, total_steps=10, decay_ratio=1.0)  # HF-style linear decay
    assert [round(linear.lr_at(i), 2) for i in range(10)] == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    with pytest.raises(GptforgeError, match="unknown LR schedule"):
        LRSchedule("linear")


def test_set_lr_updates_every_group():
    model = GPT(preset("tiny"))
    opt = configure_optimizer(model, lr=1e-3)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    before = model.transformer.wpe.weight.detach().clone()
    model(torch.randint(0, 4096, (2, 8)), torch.randint(0, 4096, (2, 8)))[1].backward()
    opt.step()
    assert not torch.equal(before, model.transformer.wpe.weight)
