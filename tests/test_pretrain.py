"""Pretraining engine: batch arithmetic, determinism, a real run, checkpoints, resume to the bit, trackers."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.errors import GptforgeError
from gptforge.model import preset
from gptforge.train import checkpoint as C
from gptforge.train.pretrain import PretrainConfig, compute_plan, run_pretrain

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "gptforge", "pretrain", *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False, **kw)


# ---- batch arithmetic ----------------------------------------------------------------------------------------

def test_global_batch_in_tokens_sets_gradient_accumulation():
    cfg = PretrainConfig()
    cfg.train.global_batch_tokens, cfg.train.max_tokens = 524_288, 10_000_000_000
    plan = compute_plan(cfg, preset("gpt2"), world_size=8, micro_batch=32, train_tokens=None)
    assert (plan.global_batch, plan.grad_accum, plan.tokens_per_step) == (512, 2, 524_288)
    assert plan.total_steps == math.ceil(10e9 / 524_288) == 19_074


def test_batch_that_does_not_divide_is_a_clear_error():
    cfg = PretrainConfig()
    cfg.train.global_batch_seqs, cfg.train.max_steps = 96, 10
    with pytest.raises(GptforgeError, match="not divisible by micro_batch 5"):
        compute_plan(cfg, preset("tiny"), world_size=1, micro_batch=5, train_tokens=None)
    cfg.train.global_batch_seqs, cfg.train.global_batch_tokens = None, 1000
    with pytest.raises(GptforgeError, match="not a multiple of the sequence length 128"):
        compute_plan(cfg, preset("tiny"), world_size=1, micro_batch=1, train_tokens=None)


def test_training_length_from_epochs_or_tokens_per_param():
    cfg = PretrainConfig()
    cfg.train.global_batch_seqs, cfg.train.epochs = 8, 2.0
    plan = compute_plan(cfg, preset("tiny"), 1, 4, train_tokens=128 * 8 * 50)
    assert (plan.grad_accum, plan.total_steps) == (2, 100)
    cfg.train.epochs, cfg.train.tokens_per_param = None, 20
    plan = compute_plan(cfg, preset("tiny"), 1, 4, None)
    assert plan.total_steps == math.ceil(20 * plan.params / (8 * 128))
    cfg.train.max_steps = 5
    with pytest.raises(GptforgeError, match="exactly one training length"):
        compute_plan(cfg, preset("tiny"), 1, 4, None)


# ---- training ------------------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_losses_and_another_seed_does_not(shakespeare_shards, tmp_path, small_config,
                                                                   losses):
    a = run_pretrain(small_config(shakespeare_shards, tmp_path, "a", steps=3))
    b = run_pretrain(small_config(shakespeare_shards, tmp_path, "b", steps=3))
    c = run_pretrain(small_config(shakespeare_shards, tmp_path, "c", steps=3, seed=99))
    assert losses(a.run_dir) == losses(b.run_dir)
    assert losses(a.run_dir) != losses(c.run_dir)


@pytest.mark.slow
def test_tiny_model_learns_shakespeare_well_below_uniform(shakespeare_shards, tmp_path, small_config):
    cfg = small_config(shakespeare_shards, tmp_path, "real", steps=200)
    cfg.model.preset, cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head = "tiny", None, None, None
    cfg.data.seq_len, cfg.train.micro_batch, cfg.train.global_batch_seqs = 64, 16, 16
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 5
    cfg.eval.interval, cfg.checkpoint.interval, cfg.log.plot = 100, 100, True
    r = run_pretrain(cfg)
    uniform = math.log(512)
    assert r.final_val_loss < uniform - 1.5, (r.final_val_loss, uniform)  # 6.24 → well under 4.7
    assert r.best_val_loss == pytest.approx(min(r.final_val_loss, r.best_val_loss))
    recs = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 200 and all("grad_norm" in x and "lr" in x and "tokens_per_s" in x for x in recs)
    assert [x["step"] for x in recs if "val_loss" in x] == [100, 200]
    assert (r.run_dir / "loss.png").stat().st_size > 10_000
    assert "## step 200" in (r.run_dir / "samples.md").read_text()
    assert r.summary["tokens"] == 200 * 16 * 64 and r.summary["skipped_steps"] == 0


def test_checkpoint_layout_pointers_and_keep_last(shakespeare_shards, tmp_path, small_config):
    cfg = small_config(shakespeare_shards, tmp_path, steps=4)
    cfg.checkpoint.interval, cfg.checkpoint.keep_last, cfg.eval.interval = 1, 2, 2
    r = run_pretrain(cfg)
    ckpt = r.run_dir / "ckpt"
    assert [p.name for p in C.list_checkpoints(ckpt)] == ["step_0000003", "step_0000004"]
    assert (ckpt / "latest").read_text().strip() == "step_0000004"
    best = (ckpt / "best").read_text().strip()
    assert best in ("step_0000002", "step_0000004") and (ckpt / best).is_dir()  # best survives pruning
    assert not list(ckpt.glob(".tmp-*"))
    step = ckpt / "step_0000004"
    assert {"model.safetensors", "model_config.json", "optimizer.pt", "state.json", "files.json"} <= {
        p.name for p in step.iterdir()}
    state = json.loads((step / "state.json").read_text())
    assert state["step"] == 4 and state["tokens"] == 4 * 8 * 32 and state["loader"]["step"] == 4
    assert not any(k.startswith("module.") for k in load_file(str(step / "model.safetensors")))
    from gptforge.checkpoint import load_model

    model, tok, _ = load_model(r.run_dir)  # the run directory resolves to its latest checkpoint
    assert tok is not None and model.config.n_embd == 32


def test_corrupt_checkpoint_is_refused_and_fallback_uses_the_previous_one(shakespeare_shards, tmp_path,
                                                                          small_config, losses):
    cfg = small_config(shakespeare_shards, tmp_path, steps=2)
    cfg.checkpoint.interval = 1
    r = run_pretrain(cfg)
    ckpt = r.run_dir / "ckpt"
    weights = ckpt / "step_0000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(GptforgeError, match="SHA-256 does not match.*fallback"):
        C.verify_checkpoint(ckpt / "step_0000002")
    with pytest.raises(GptforgeError, match="SHA-256"):
        C.find_resume_checkpoint(ckpt)
    assert C.find_resume_checkpoint(ckpt, fallback=True, log=lambda *a: None).name == "step_0000001"
    cfg.checkpoint.resume, cfg.checkpoint.fallback, cfg.train.max_steps = True, True, 3
    resumed = run_pretrain(cfg)
    assert resumed.steps == 3 and len(losses(r.run_dir)) == 3


def test_nonfinite_gradients_are_counted_and_the_step_skipped(shakespeare_shards, tmp_path, monkeypatch,
                                                              small_config):
    from gptforge.train import core

    real = core.clip_grad_norm
    calls = {"n": 0}

    def poisoned(params, clip):
        calls["n"] += 1
        if calls["n"] == 2:
            params[0].grad.fill_(float("nan"))
        return real(params, clip)

    monkeypatch.setattr(core, "clip_grad_norm", poisoned)
    r = run_pretrain(small_config(shakespeare_shards, tmp_path, steps=3))
    recs = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in recs] == [False, True, False]
    assert recs[1]["grad_norm"] == "nan"
    assert r.summary["nonfinite_steps"] == 1 and r.summary["skipped_steps"] == 1
    model = load_file(str(r.checkpoint / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in model.values())


def test_bf16_autocast_and_fp16_grad_scaler_run_on_cpu(shakespeare_shards, tmp_path, small_config):
    for precision in ("bf16", "fp16"):
        r = run_pretrain(small_config(shakespeare_shards, tmp_path, precision, steps=1, precision=precision))
        assert r.summary["precision"] == precision and math.isfinite(r.final_loss)


def test_micro_batch_auto_on_cpu_picks_a_divisor_of_the_batch(shakespeare_shards, tmp_path, small_config):
    cfg = small_config(shakespeare_shards, tmp_path, steps=1, micro_batch="auto", global_batch_seqs=12)
    logged = []
    r = run_pretrain(cfg, log=logged.append)
    assert any("micro-batch auto" in line for line in logged)
    state = json.loads((r.checkpoint / "state.json").read_text())
    assert 12 % state["plan"]["micro_batch"] == 0 and state["plan"]["global_batch"] == 12


def test_existing_run_is_not_silently_overwritten(shakespeare_shards, tmp_path, small_config):
    run_pretrain(small_config(shakespeare_shards, tmp_path, steps=1))
    with pytest.raises(GptforgeError, match="--resume"):
        run_pretrain(small_config(shakespeare_shards, tmp_path, steps=1))


# ---- resume to the bit, in fresh processes -------------------------------------------------------------------

def test_resume_after_stop_gives_identical_losses_and_weights(shakespeare_shards, tmp_path, small_config,
                                                              cli_args, losses):
    N = 3
    split = small_config(shakespeare_shards, tmp_path, "split", steps=2 * N)
    split.model.dropout = 0.1  # dropout masks depend on the restored RNG state
    full = cli(*cli_args(split), "--name=full")
    assert full.returncode == 0, full.stderr
    first = cli(*cli_args(split), f"--train.stop_at={N}")
    assert first.returncode == 0, first.stderr
    second = cli(*cli_args(split), "--resume")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout + second.stderr
    assert len(losses(tmp_path / "split")) == 2 * N
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # exact, per step
    a = load_file(str(tmp_path / "full" / "ckpt" / "step_0000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "ckpt" / "step_0000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_writes_a_final_checkpoint(shakespeare_shards, tmp_path, small_config, cli_args):
    cfg = small_config(shakespeare_shards, tmp_path, "preempted", steps=10_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "pretrain", *cli_args(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out
    steps_logged = len(metrics.read_text().splitlines())
    latest = C.find_resume_checkpoint(tmp_path / "preempted" / "ckpt")
    assert latest.name == C.step_dir_name(steps_logged)
    assert C.verify_checkpoint(latest)["step"] == steps_logged


# ---- init from weights, trackers -----------------------------------------------------------------------------

def test_init_from_a_checkpoint_or_hf_directory_continues_from_those_weights(shakespeare_shards, tmp_path,
                                                                             small_config, losses):
    from gptforge.checkpoint import load_model
    from gptforge.hf import export_model

    base = small_config(shakespeare_shards, tmp_path, "base", steps=25)
    base.optim.lr = 1e-2
    trained = run_pretrain(base)
    model, tok, _ = load_model(trained.run_dir)
    export_model(model, tok, tmp_path / "hf")
    fresh_first = losses(trained.run_dir)[0]
    for source in (str(trained.run_dir), str(tmp_path / "hf")):
        cfg = small_config(shakespeare_shards, tmp_path, f"cont-{Path(source).name}", steps=1)
        cfg.model.init_from = source
        cfg.model.n_layer = cfg.model.n_embd = cfg.model.n_head = None
        r = run_pretrain(cfg)
        first = losses(r.run_dir)[0]
        assert first < fresh_first - 0.5 and abs(first - trained.final_loss) < 0.5


def test_tensorboard_and_mlflow_receive_the_metrics(shakespeare_shards, tmp_path, small_config):
    cfg = small_config(shakespeare_shards, tmp_path, "tracked", steps=3)
    cfg.log.trackers = ["tensorboard", "mlflow"]
    r = run_pretrain(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(r.run_dir / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3]
    assert ea.Scalars("loss")[-1].value == pytest.approx(r.final_loss, rel=1e-6)

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=(r.run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("gptforge")
    (run,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert run.data.params["train.max_steps"] == "3"


def test_loss_chart_survives_infinite_and_nan_values(tmp_path):
    from gptforge.train.metrics import MetricsLog, plot_metrics, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(50):
        spike = step == 20
        log.write({"step": step, "loss": float("nan") if spike else 5 - step / 20, "lr": 1e-3,
                   "grad_norm": float("inf") if spike else 1.0 + (step % 7) / 3})
        if step % 10 == 9:
            log.write({"step": step, "val_loss": 5 - step / 25})
    log.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    (spiked,) = [r for r in recs if r["step"] == 20 and "loss" in r]
    assert math.isinf(spiked["grad_norm"]) and math.isnan(spiked["loss"])
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png", grad_clip=1.0)
    assert out.stat().st_size > 10_000


def test_hellaswag_hook_logs_accuracy_on_a_fixed_subset(shakespeare_shards, tmp_path, data_dir, small_config):
    cfg = small_config(shakespeare_shards, tmp_path, steps=4)
    cfg.eval.hellaswag_interval = 2
    cfg.eval.hellaswag_items = 8
    run_pretrain(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "hellaswag_acc" in r]
    assert [r["step"] for r in scored] == [2, 4]  # records carry the number of steps completed
    assert all(r["hellaswag_n"] == 8 and 0 <= r["hellaswag_acc_norm"] <= 1 for r in scored)


def test_core_hook_logs_the_subset_score_that_eval_core_gives(shakespeare_shards, tmp_path, data_dir, small_config,
                                                              monkeypatch):
    from gptforge.checkpoint import load_model
    from gptforge.eval.core import evaluate_core
    from gptforge.train.metrics import plot_metrics

    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(data_dir))
    tasks = ["copa", "winogrande", "lambada_openai", "arc_easy"]
    cfg = small_config(shakespeare_shards, tmp_path, steps=4)
    cfg.eval.core_interval = 2
    cfg.eval.core_items = 12
    cfg.eval.core_tasks = tasks
    run_pretrain(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "core" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert all(r["core_n"] == 48 and r["core_entries"] == 4 and -1 <= r["core"] <= 1 for r in scored)
    # the last record's number is what `eval core --max-per-task 12` gives for the final weights
    model, tokenizer, _ = load_model(cfg.run_dir)
    result = evaluate_core(model, tokenizer, max_per_task=12, tasks=tasks, show_progress=False, log=None)
    assert scored[-1]["core"] == pytest.approx(result["score"], abs=1e-12)
    assert plot_metrics(cfg.run_dir / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 10_000


def test_core_tasks_are_checked_before_training(shakespeare_shards, tmp_path, small_config):
    cfg = small_config(shakespeare_shards, tmp_path, steps=2)
    cfg.eval.core_interval = 1
    cfg.eval.core_tasks = ["copa", "not_a_task"]
    with pytest.raises(GptforgeError, match="unknown CORE task.*not_a_task"):
        cfg.validate()
