"""The options seed 004's baseline needs do what they say: weight decay on every parameter, PyTorch's default
initialisation, and the best checkpoint chosen by mean training loss."""

from __future__ import annotations

import json

import pytest
import torch

from gptforge.model import GPT, GPTConfig
from gptforge.train.optim import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64, tie_embeddings=False)


def test_decay_all_puts_every_parameter_in_the_decayed_group():
    model = GPT(SMALL)
    total = sum(p.numel() for p in model.parameters())
    (only,) = param_groups(model, 0.1, decay="all")
    assert only["weight_decay"] == 0.1 and sum(p.numel() for p in only["params"]) == total
    decayed, kept = param_groups(model, 0.1)  # matrices: linear weights only
    assert all(p.ndim == 2 for p in decayed["params"]) and kept["weight_decay"] == 0.0
    assert any(p.ndim == 1 for p in kept["params"])  # biases and LayerNorm gains are not decayed
    assert sum(p.numel() for g in (decayed, kept) for p in g["params"]) == total


def test_torch_default_init_has_pytorch_statistics_and_gpt2_init_does_not():
    torch.manual_seed(0)
    gpt2 = GPT(SMALL)
    torch.manual_seed(0)
    plain = GPT(SMALL, init="torch_default")
    # nn.Embedding's default is N(0, 1); GPT-2's is N(0, 0.02)
    assert abs(plain.transformer.wte.weight.std().item() - 1.0) < 0.02
    assert abs(gpt2.transformer.wte.weight.std().item() - 0.02) < 0.002
    # nn.Linear's default is Kaiming-uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std = 1/sqrt(3 fan_in)
    fc = plain.transformer.h[0].mlp.c_fc.weight
    bound = 1 / SMALL.n_embd ** 0.5
    assert fc.abs().max().item() <= bound and abs(fc.std().item() - bound / 3 ** 0.5) < 0.005
    assert plain.transformer.h[0].mlp.c_fc.bias.abs().max().item() > 0  # default biases are not zero
    assert gpt2.transformer.h[0].mlp.c_fc.bias.abs().max().item() == 0
    with pytest.raises(Exception, match="model.init"):
        GPT(SMALL, init="xavier")


def test_best_checkpoint_by_mean_training_loss(shakespeare_shards, tmp_path, small_config):
    from gptforge.train.pretrain import run_pretrain

    cfg = small_config(shakespeare_shards, tmp_path, steps=6)
    cfg.checkpoint.interval = 2
    cfg.checkpoint.best_by = "train_loss_mean"
    cfg.data.val_tokens = 0
    cfg.optim.lr = 1e-2
    result = run_pretrain(cfg)
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    means = {step: sum(losses[step - 2:step]) / 2 for step in (2, 4, 6)}
    best = min(means, key=means.get)
    assert (result.run_dir / "ckpt" / "best").read_text().strip() == f"step_{best:07d}"
    assert result.summary["best_val_loss"] is None  # nothing was validated


def test_pretrain_accounts_for_its_time_and_counts_gradient_trouble_per_checkpoint(shakespeare_shards, tmp_path,
                                                                                     small_config):
    from gptforge.train.pretrain import run_pretrain

    cfg = small_config(shakespeare_shards, tmp_path, steps=4)
    cfg.checkpoint.interval = 2
    cfg.train.grad_clip = 0.05  # every step's gradient norm is above this: every step is clipped
    result = run_pretrain(cfg)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["train_seconds"] > 0 and summary["eval_seconds"] > 0 and summary["checkpoint_seconds"] > 0
    assert summary["train_seconds"] + summary["eval_seconds"] + summary["checkpoint_seconds"] <= \
        summary["seconds"] * 1.05 + 0.5
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clipped"] and not r["nonfinite"] and not r["norm_overflow"] for r in records)
    periods = [(r["step"], r["period_clipped"]) for r in records if "period_clipped" in r]
    assert periods == [(2, 2), (4, 2)]
