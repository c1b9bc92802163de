"""The shared training core: the precision rule, the normalisation rule, dropout, checkpoints, resume, old keys."""

import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.model import GPT, IGNORE_INDEX, GPTConfig
from gptforge.precision import resolve_precision
from gptforge.train import core

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the one precision rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("amx,avx512,expected,feature", [
    (True, False, "bf16", "AMX"), (False, True, "bf16", "AVX512-BF16"), (False, False, "fp32", "no AMX"),
])
def test_precision_rule_on_cpu_follows_the_bf16_capability(monkeypatch, amx, avx512, expected, feature):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512)
    p = resolve_precision("auto", torch.device("cpu"))
    assert p.name == expected and feature in p.reason
    assert p.grad_scaler() is None
    assert resolve_precision("fp32", torch.device("cpu")).reason == "asked for"


@pytest.mark.parametrize("bf16_ok,expected", [(True, "bf16"), (False, "fp16")])
def test_precision_rule_on_cuda_uses_bf16_where_supported_else_fp16_with_a_scaler(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Test GPU")
    p = resolve_precision("auto", torch.device("cuda"))
    assert p.name == expected and "Test GPU" in p.reason
    assert (p.name == "fp16") == (expected == "fp16")
    with pytest.raises(GptforgeError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))


def test_the_quickstart_pretrain_stage_reports_the_precision_it_ran(monkeypatch, shakespeare_shards, tmp_path,
                                                                     small_config):
    from gptforge.train.pretrain import run_pretrain

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    cfg = small_config(shakespeare_shards, tmp_path, steps=2, precision="auto")
    r = run_pretrain(cfg)
    assert r.summary["precision"] == "bf16" and "AMX" in r.summary["precision_reason"]


def test_bf16_loss_curve_stays_close_to_fp32(shakespeare_shards, tmp_path, small_config, losses):
    from gptforge.train.pretrain import run_pretrain

    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = small_config(shakespeare_shards, tmp_path, precision, steps=30, precision=precision)
        curves[precision] = losses(run_pretrain(cfg).run_dir)
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-1] < fp32[0] - 0.5  # it learned something
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.03, list(zip(fp32, bf16))


# ---- the one normalisation rule ------------------------------------------------------------------------------


def test_optimizer_step_averages_over_every_valid_target_of_the_global_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    x = torch.randint(0, 50, (3, 12))
    y = torch.randint(0, 50, (3, 12))
    y[0, :10] = IGNORE_INDEX  # micro-batches with very different numbers of valid targets
    y[2, 3:] = IGNORE_INDEX
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]

    reference = GPT(model.config)
    reference.load_state_dict(model.state_dict())
    _, full_loss = reference(x, y)  # mean over all 2 + 12 + 3 valid targets
    full_loss.backward()

    rt = core.Runtime(core.D.DistInfo(), resolve_precision("fp32", torch.device("cpu")), print)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = core.optimizer_step(model, optimizer, batches, 1.0, loss_fn=lambda m, b: m(b[0], b[1])[1],
                                count_fn=lambda b: int((b[1] != IGNORE_INDEX).sum()), rt=rt)
    assert stats.targets == 17 and not stats.skipped
    assert stats.loss == pytest.approx(full_loss.item(), rel=1e-6)
    for name, p in reference.named_parameters():
        step = before[name] - model.state_dict()[name]  # SGD with lr 1: the applied gradient
        assert torch.allclose(step, p.grad, atol=1e-6), name


def test_optimizer_step_refuses_a_batch_without_valid_targets():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    rt = core.Runtime(core.D.DistInfo(), resolve_precision("fp32", torch.device("cpu")), print)
    y = torch.full((1, 8), IGNORE_INDEX)
    with pytest.raises(GptforgeError, match="no valid targets"):
        core.optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [(y.clamp(min=0), y)], 1.0,
                            loss_fn=lambda m, b: m(b[0], b[1])[1], count_fn=lambda b: 0, rt=rt)


# ---- dropout, keeper, config ---------------------------------------------------------------------------------


def test_pretrain_init_from_sets_the_attention_dropout_too(shakespeare_shards, tmp_path, small_config,
                                                            monkeypatch):
    from gptforge.train import pretrain as P

    base = small_config(shakespeare_shards, tmp_path, "base", steps=1)
    base.model.dropout = 0.3
    first = P.run_pretrain(base)
    seen = []
    real_wrap = P.D.wrap_model
    monkeypatch.setattr(P.D, "wrap_model", lambda m, *a, **k: (seen.append(m), real_wrap(m, *a, **k))[1])
    cfg = small_config(shakespeare_shards, tmp_path, "tuned", steps=1)
    cfg.model.init_from, cfg.model.dropout = str(first.run_dir), 0.0
    P.run_pretrain(cfg)
    (model,) = seen
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.dropout for m in model.modules() if isinstance(getattr(m, "dropout", None), float)]
    assert len(rates) > 4 and set(rates) == {0.0}


def test_best_keeper_counts_evaluations_without_improvement():
    keeper = core.BestKeeper(mode="min", patience=2)
    assert keeper.update(3.0, 1) and keeper.update(2.5, 2)
    assert not keeper.update(float("nan"), 3) and not keeper.should_stop
    assert not keeper.update(2.6, 4) and keeper.should_stop and keeper.best_step == 2
    acc = core.BestKeeper(mode="max")
    assert acc.update((0.9, -0.4), 1) and acc.update((0.9, -0.3), 2) and not acc.update([0.8, -0.1], 3)
    restored = core.BestKeeper(mode="min", patience=2)
    restored.load_state_dict(json.loads(json.dumps(keeper.state_dict())))
    assert restored.should_stop and restored.best == 2.5


def test_shared_sections_reject_nonsense_optimizer_settings():
    for key, value in [("lr", -1.0), ("min_lr_ratio", -5.0), ("weight_decay", -0.1), ("warmup_steps", -3),
                       ("beta2", 1.0)]:
        with pytest.raises(GptforgeError, match=f"optim.{key}"):
            core.OptimConfig(**{key: value}).validate()
    with pytest.raises(GptforgeError, match="optim.min_lr"):
        core.OptimConfig(lr=1e-3, min_lr=1.0).validate()
    with pytest.raises(GptforgeError, match="grad_clip"):
        core.TrainCommon(grad_clip=-1.0).validate_common()


def test_old_sft_and_classify_spellings_still_load_with_a_deprecation_warning(capsys):
    from gptforge.train.classify import ClassifyConfig
    from gptforge.train.sft import SFTConfig

    old = {"checkpoint": "runs/base", "seed": 7, "device": "cpu", "data": {"sources": ["x.json"]},
           "train": {"lr": 1e-3, "betas": [0.8, 0.99], "warmup_ratio": 0.1, "log_every": 5}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(SFTConfig, None, old).validate()
    assert (cfg.base, cfg.train.seed, cfg.train.device) == ("runs/base", 7, "cpu")
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.warmup_ratio) == (1e-3, 0.8, 0.99, 0.1)
    assert {str(w.message).split(" is deprecated")[0] for w in caught} >= {"sft: train.lr", "sft: train.betas"}
    assert "deprecated" in capsys.readouterr().out
    cls = load_config(ClassifyConfig, None, {"checkpoint": "b", "data": {"path": "d.tsv"},
                                             "train": {"lr": 2e-3, "weight_decay": 0.0}}).validate()
    assert (cls.base, cls.optim.lr, cls.optim.weight_decay, cls.optim.schedule) == ("b", 2e-3, 0.0, "constant")


# ---- SFT: resume and integrity, through the shared checkpoint writer -----------------------------------------


def _sft_config(base, out_dir, data_dir, **train):
    from gptforge.train.sft import SFTConfig

    tree = {"base": str(base), "out_dir": str(out_dir), "name": "resumable",
            "data": {"sources": [str(data_dir / "instruct" / "instruction-data.json")], "limit": 80,
                     "split": [0.9, 0.1, 0.0]},
            "train": {"device": "cpu", "precision": "fp32", "epochs": 1, "batch_size": 8, "neftune_alpha": 5.0,
                      "dropout": 0.1, "eval_every": 100, **train},
            "optim": {"lr": 1e-3}, "checkpoint": {"interval": 2, "keep_last": 10}, "log": {"progress": False},
            "generate": {"enabled": False}}
    return load_config(SFTConfig, None, tree)


def test_sft_resume_continues_to_the_same_weights(tiny_base, tmp_path, data_dir):
    from gptforge.train.sft import run_sft

    config = _sft_config(tiny_base, tmp_path, data_dir)
    full = run_sft(config, progress=False)
    ckpt = full.run_dir / "ckpt"
    steps = full.steps
    assert steps == 9 and (ckpt / "step_0000008").is_dir()  # 72 train examples / 8; checkpoints every 2 steps
    reference = load_file(str(ckpt / f"step_{steps:07d}" / "model.safetensors"))
    # a kill after step 4: the later checkpoints never happened
    for later in ("step_0000006", "step_0000008", f"step_{steps:07d}"):
        shutil.rmtree(ckpt / later)
    config.checkpoint.resume = True
    resumed = run_sft(config, progress=False)
    assert resumed.steps == steps
    again = load_file(str(ckpt / f"step_{steps:07d}" / "model.safetensors"))
    assert reference.keys() == again.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    records = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # each step once, 1-based
    assert {"loss", "lr", "grad_norm", "tokens", "epoch"} <= set(records[1])


def test_sft_refuses_to_overwrite_a_run_and_its_checkpoints_are_verified(tiny_base, tmp_path, data_dir):
    from gptforge.checkpoint import load_model
    from gptforge.train.sft import run_sft

    config = _sft_config(tiny_base, tmp_path, data_dir, max_steps=2)
    result = run_sft(config, progress=False)
    with pytest.raises(GptforgeError, match="already has checkpoints"):
        run_sft(config, progress=False)
    weights = result.checkpoint / "model.safetensors"
    assert (result.checkpoint / "files.json").is_file() and (result.checkpoint / "optimizer.pt").is_file()
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(GptforgeError, match="SHA-256"):
        load_model(result.run_dir)
    config.overwrite = True
    assert run_sft(config, progress=False).steps == 2


def test_classifier_checkpoints_are_atomic_and_verified(tiny_base, tmp_path, data_dir):
    from gptforge.train.classify import ClassifyConfig, load_classifier, run_classify

    config = load_config(ClassifyConfig, None, {
        "base": str(tiny_base), "out_dir": str(tmp_path), "name": "spam",
        "data": {"path": str(data_dir / "classify" / "SMSSpamCollection"), "limit": 120, "max_len": 32},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "precision": "fp32"}, "log": {"progress": False}})
    result = run_classify(config, progress=False)
    step = result.checkpoint
    assert {"classifier.safetensors", "model_config.json", "files.json", "state.json", "optimizer.pt"} <= {
        p.name for p in step.iterdir()}
    assert not list((tmp_path / "spam" / "ckpt").glob(".tmp-*"))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and {"loss", "lr", "grad_norm", "train_accuracy"} <= set(records[0])
    assert any("val_accuracy" in r for r in records)
    load_classifier(result.run_dir)
    (step / "model_config.json").write_text("{}")
    with pytest.raises(GptforgeError, match="model_config.json"):
        load_classifier(result.run_dir)


def test_resuming_a_finished_pretraining_run_does_nothing_and_says_so(shakespeare_shards, tmp_path,
                                                                       small_config):
    from gptforge.train.pretrain import run_pretrain

    cfg = small_config(shakespeare_shards, tmp_path, steps=2)
    first = run_pretrain(cfg)
    cfg.checkpoint.resume = True
    lines = []
    again = run_pretrain(cfg, log=lines.append)
    assert again.steps == first.steps == 2 and math.isfinite(again.final_loss)
    assert any("already finished (step 2 of 2)" in line for line in lines)


def test_sft_and_classify_send_their_metrics_to_trackers(tiny_base, tmp_path, data_dir):
    """The shared run directory feeds trackers in every stage (seed 002 logged its fine-tuning to MLflow)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptforge.train.classify import ClassifyConfig, run_classify
    from gptforge.train.sft import run_sft

    config = _sft_config(tiny_base, tmp_path, data_dir, max_steps=3)
    config.log.trackers = ["tensorboard"]
    sft = run_sft(config, progress=False)
    classify = run_classify(load_config(ClassifyConfig, None, {
        "base": str(tiny_base), "out_dir": str(tmp_path), "name": "spam-tracked",
        "data": {"path": str(data_dir / "classify" / "SMSSpamCollection"), "limit": 80, "max_len": 32},
        "train": {"max_steps": 3, "batch_size": 16, "device": "cpu", "precision": "fp32"},
        "log": {"progress": False, "trackers": ["tensorboard"]}}), progress=False)
    for run in (sft.run_dir, classify.run_dir):
        ea = EventAccumulator(str(run / "tensorboard"))
        ea.Reload()
        assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3]


def test_optimizer_step_tells_clipped_overflowed_and_non_finite_steps_apart():
    """Seed 004's exploding-gradient diagnostics: a clipped step, a norm that overflows although every gradient
    is finite, and a step with a non-finite gradient; counted per checkpoint period by the guard."""
    from gptforge.train.nonfinite import NonFiniteGuard

    rt = core.Runtime(core.D.DistInfo(), resolve_precision("fp32", torch.device("cpu")), print)
    w = torch.nn.Parameter(torch.ones(10))
    model = torch.nn.Module()
    model.w = w
    optimizer = torch.optim.SGD([w], lr=0.0)

    def step(scale: float, clip=1.0):
        return core.optimizer_step(model, optimizer, [scale], 0.0, loss_fn=lambda m, s: (m.w * s).sum(),
                                   count_fn=lambda b: 1, rt=rt, grad_clip=clip)

    ok, clipped, overflow, broken = step(0.01), step(5.0), step(1e20), step(float("inf"))
    assert [s.fields()["clipped"] for s in (ok, clipped, overflow, broken)] == [False, True, False, False]
    assert overflow.norm_overflow and overflow.skipped and not overflow.fields()["nonfinite"]
    assert broken.fields()["nonfinite"] and not broken.norm_overflow and broken.skipped
    guard = NonFiniteGuard(0, lambda line: None)
    for i, s in enumerate((ok, clipped, overflow, broken), 1):
        guard.update(i, s)
    assert guard.period() == {"period_clipped": 1, "period_norm_overflow": 1, "period_nonfinite": 1}
    assert guard.period() == {"period_clipped": 0, "period_norm_overflow": 0, "period_nonfinite": 0}
    train = core.TrainCommon(nonfinite="raise")
    assert NonFiniteGuard.for_train(train, print).limit == 1
