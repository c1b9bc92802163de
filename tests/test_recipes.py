"""Every recipe parses, dry-runs on the meta device, and reproduces its seed's batch and length arithmetic."""

from pathlib import Path

import pytest

from gptforge.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PRETRAIN = sorted(p for p in RECIPES.glob("*.yaml") if not any(s in p.name for s in ("sft", "classify", "dpo")))


def dry_run(capsys, monkeypatch, *configs: Path, world: int = 1, extra: tuple = ()) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = ["pretrain", *[a for c in configs for a in ("--config", str(c))], "--dry-run", *extra]
    assert main(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", PRETRAIN, ids=lambda p: p.stem)
def test_every_pretraining_recipe_dry_runs(recipe, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = dry_run(capsys, monkeypatch, recipe)
    assert "dry run:" in out and "accumulation steps" in out and "memory per process" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_gpt2_124m_fineweb10b_matches_seed_001(capsys, monkeypatch):
    out = dry_run(capsys, monkeypatch, RECIPES / "gpt2-124m-fineweb10b.yaml", world=8)
    assert "524,288 tokens/step = micro-batch 32 × 8 process(es) × 2 accumulation steps" in out
    assert "124,439,808 parameters" in out and "19,074 steps" in out


def test_gpt2_124m_tinystories_matches_seed_003(capsys, monkeypatch):
    out = dry_run(capsys, monkeypatch, RECIPES / "gpt2-124m-tinystories.yaml")
    assert "524,288 tokens/step = micro-batch 64 × 1 process(es) × 8 accumulation steps" in out
    assert "3,000 steps" in out


def test_gpt2_356m_matches_seed_000(capsys, monkeypatch):
    out = dry_run(capsys, monkeypatch, RECIPES / "gpt2-356m-fineweb10bt-bpe52k.yaml")
    assert "1,048,576 tokens/step" in out and "16 accumulation steps" in out and "vocab 52000" in out
    assert "warmup 286 steps" in out  # 3% of 9,537


def test_gpt2_163m_baseline_and_interventions_match_seed_004(capsys, monkeypatch):
    base = RECIPES / "gpt2-163m-fineweb-baseline.yaml"
    out = dry_run(capsys, monkeypatch, base, world=8)
    # 20 tokens/parameter of 163,009,536 parameters, rounded up to whole 96 × 1024-token steps
    assert "163,009,536 parameters" in out and "33,165 steps, 3,260,252,160 tokens" in out
    assert "micro-batch 12 × 8 process(es) × 1 accumulation steps" in out

    from gptforge.commands.pretrain import build_config

    class Args:
        name = init_from = micro_batch = None
        resume = fallback = False
        overrides = ()

    checks = {
        "clip-3.5": lambda c: c.train.grad_clip == 3.5,
        "dropout-0": lambda c: c.model.dropout == 0.0,
        "qkv-bias": lambda c: c.model.qkv_bias is True,
        "lr-schedule": lambda c: c.optim.lr == 1.4e-3 and c.optim.schedule == "cosine" and c.optim.warmup_ratio == 0.05,
        "weight-decay-0.01": lambda c: c.optim.weight_decay == 0.01 and c.optim.decay == "all",
        "weight-tying": lambda c: c.model.tie_embeddings is True,
        "fp32": lambda c: c.train.precision == "fp32",
        "seed-43": lambda c: c.train.seed == 43,
        "stacked": lambda c: (c.train.grad_clip, c.model.dropout, c.optim.weight_decay, c.optim.lr)
                             == (3.5, 0.0, 0.01, 1.4e-3),
    }
    assert sorted(checks) == sorted(p.stem for p in (RECIPES / "interventions").glob("*.yaml"))
    base_cfg = None
    for override, check in checks.items():
        args = Args()
        args.config = [str(base), str(RECIPES / "interventions" / f"{override}.yaml")]
        cfg = build_config(args)
        assert check(cfg), override
        assert cfg.name != "gpt2-163m-fineweb-baseline" and cfg.train.max_tokens == 3_260_252_160  # same budget
        if base_cfg is None:
            args.config = [str(base)]
            base_cfg = build_config(args)
        assert (base_cfg.train.precision, base_cfg.optim.decay, base_cfg.model.init, base_cfg.data.sampling,
                base_cfg.checkpoint.best_by, base_cfg.data.val_tokens) == (
            "fp16", "all", "torch_default", "in_order", "train_loss_mean", 0)  # the author's setup
    out = dry_run(capsys, monkeypatch, base, RECIPES / "interventions" / "qkv-bias.yaml", world=8)
    assert "163,037,184 parameters" in out  # + 12 × 3 × 768 QKV biases
    assert "33,165 steps, 3,260,252,160 tokens" in out  # the baseline's tokens, not a new 20 tokens/parameter


def test_batch_that_does_not_divide_fails_with_a_fix(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = main(["pretrain", "--config", str(RECIPES / "gpt2-163m-fineweb-baseline.yaml"), "--dry-run",
                 "--micro-batch", "7"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not divisible by micro_batch 7" in err and "use train.micro_batch in" in err
