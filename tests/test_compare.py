"""``gptforge compare``: paired confidence intervals on the same held-out windows, with real tiny runs.

How the sizes were picked (measured on a 2-core AMD EPYC, tinyshakespeare in a 512-token BPE, the 2-layer
32-wide ``small_config`` model, windows of 32 tokens from the start of the val split):

* Two seeds trained *from scratch* are not a null comparison at this scale: after 60–400 steps their test
  losses differ by 0.01–0.2 nats, and the paired interval (rightly: they are different models) excludes 0 for
  most seed pairs even on 256 tokens (e.g. 200 steps: 18 of 28 pairs; 400 steps, batch 32: 9 of 15 at 1,024
  tokens). The interval measures held-out-text noise, not seed noise.
* So the recipe here continues one shared base (100 steps, batch 16) for 20 steps at LR 3e-4; the seed then
  only changes the data order. Over 10 base seeds, on 8 windows (256 tokens), the two-seed interval contained
  0 ten times out of ten (|t| ≤ 1.53, the 7-df quantile is 2.365), and the same continuation at LR 0.1 was
  worse with the interval excluding 0 ten times out of ten (Δ +0.28…+0.51, t ≥ 4.7). On 16 or 32 windows the
  seed pair's interval already excluded 0 once in ten (Δ ≈ +0.004, real): hence 8 windows.
* With the default base seed (1337), evaluated in fp32 as below: seeds Δ +0.0021 [-0.0041, +0.0082] (t 0.80);
  LR 0.1 Δ +0.3186 [+0.1968, +0.4405] (t 6.18). (The sweep above ran in bf16 autocast; fp32 moves Δ by ~1e-4.)

Training takes ~10 s on one thread (module-scoped fixture); the whole file runs in ~17 s on 2 cores.
"""

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch

from gptforge.cli import main
from gptforge.eval.compare import paired_difference, t_quantile
from gptforge.eval.loss import weighted_mean_se

SEQ_LEN, TOKENS = 32, 8 * 32 + 1  # 8 full windows
T_7DF = 2.364624  # Student t, 0.975 quantile, 7 degrees of freedom (statistical tables)


@pytest.fixture(scope="module")
def runs(shakespeare_shards, small_config, tmp_path_factory):
    """``{"seed0", "seed1", "bad_lr"}`` run dirs continued from one shared base."""
    from gptforge.train.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("compare_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread
    try:
        run_pretrain(small_config(shakespeare_shards, out, name="base", steps=100, global_batch_seqs=16))
        dirs = {}
        for name, seed, lr in [("seed0", 0, 3e-4), ("seed1", 1, 3e-4), ("bad_lr", 0, 1e-1)]:
            cfg = small_config(shakespeare_shards, out, name=name, steps=20, seed=seed, global_batch_seqs=16)
            cfg.model.init_from = str(out / "base")
            cfg.model.n_layer = cfg.model.n_embd = cfg.model.n_head = None  # the shape comes with the weights
            cfg.optim.lr = lr
            dirs[name] = run_pretrain(cfg).run_dir
    finally:
        torch.set_num_threads(threads)
    return dirs


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(map(str, args)))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def report(runs, shakespeare_shards, tmp_path_factory):
    """The ``--json`` report of ``gptforge compare seed0 seed1 bad_lr`` on 8 windows; files in ``report["_out"]``."""
    out = tmp_path_factory.mktemp("compare_out")
    rc, stdout, _ = run_cli("compare", runs["seed0"], runs["seed1"], runs["bad_lr"], "--data", shakespeare_shards,
                            "--seq-len", SEQ_LEN, "--tokens", TOKENS, "--device", "cpu", "--dtype", "float32", "--json",
                            "--out", out)
    assert rc == 0
    rep = json.loads(stdout)
    rep["_out"] = out
    return rep


def test_two_seeds_of_the_same_recipe_have_an_interval_containing_zero(report):
    base, other = report["runs"][0], report["runs"][1]
    assert (base["name"], other["name"]) == ("seed0", "seed1") and report["windows"] == 8
    assert other["ci_low"] < 0 < other["ci_high"], other
    assert other["verdict"] == "no clear difference"
    assert abs(other["diff"]) < 0.01


def test_a_clearly_worse_learning_rate_has_an_interval_excluding_zero(report):
    bad = report["runs"][2]
    assert bad["name"] == "bad_lr"
    assert 0 < bad["ci_low"] < bad["diff"] < bad["ci_high"], bad
    assert bad["verdict"] == "worse" and bad["diff"] > 0.15


def test_interval_math_equals_an_independent_numpy_computation(report):
    base = np.array(report["runs"][0]["window_losses"])
    assert report["runs"][0]["window_tokens"] == [SEQ_LEN] * 8
    assert report["runs"][0]["loss"] == pytest.approx(base.mean(), abs=1e-12)
    assert report["runs"][0]["loss_se"] == pytest.approx(base.std(ddof=1) / math.sqrt(8), rel=1e-9)
    for r in report["runs"][1:]:
        d = np.array(r["window_losses"]) - base
        se = d.std(ddof=1) / math.sqrt(len(d))
        assert r["diff"] == pytest.approx(d.mean(), abs=1e-12)
        assert r["diff"] == pytest.approx(r["loss"] - report["runs"][0]["loss"], abs=1e-12)
        assert r["diff_se"] == pytest.approx(se, rel=1e-9)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((d.mean() - T_7DF * se, d.mean() + T_7DF * se),
                                                            abs=1e-6)
    assert report["ci"]["t"] == pytest.approx(T_7DF, abs=1e-6) and report["ci"]["df"] == 7


def test_per_window_losses_are_the_models_own_loss_on_each_window(report, runs, shakespeare_shards):
    from gptforge.checkpoint import load_model
    from gptforge.data.shards import read_shard

    model, _, _ = load_model(runs["seed0"], device="cpu")
    ids = torch.from_numpy(np.asarray(read_shard(shakespeare_shards / "val_00000.bin")[:TOKENS], dtype=np.int64))
    for w in (0, 7):
        x, y = ids[w * SEQ_LEN: (w + 1) * SEQ_LEN], ids[w * SEQ_LEN + 1: (w + 1) * SEQ_LEN + 1]
        with torch.no_grad():
            _, loss = model(x[None], targets=y[None])
        assert report["runs"][0]["window_losses"][w] == pytest.approx(float(loss), abs=1e-5)


def test_short_last_window_is_weighted_by_its_tokens():
    rng = np.random.default_rng(0)
    a, b = rng.normal(4, 0.3, 9), rng.normal(4.1, 0.3, 9)
    w = np.array([32] * 8 + [3])
    paired = paired_difference(a, b, w)
    assert paired["diff"] == pytest.approx(((b - a) * w).sum() / w.sum())
    assert weighted_mean_se(a[:8], w[:8]) == pytest.approx(a[:8].std(ddof=1) / math.sqrt(8))
    assert weighted_mean_se([4.0], [32]) is None


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (7, 2.3646), (30, 2.0423), (120, 1.9799),
                                          (1000, 1.9623), (10**7, 1.9600)])
def test_t_quantile_matches_statistical_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_report_files_and_chart_are_written(report):
    out = report["_out"]
    assert json.loads((out / "compare.json").read_text())["baseline"] == "seed0"
    md = (out / "compare.md").read_text()
    assert "| seed1 |" in md and "Student t, 7 df" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_is_wall_hours_times_gpus_times_price_and_data_defaults_to_the_baseline_run(runs):
    """No --data: the baseline run's prepared dataset (val split); the report lands in <baseline>/eval."""
    rc, stdout, _ = run_cli("compare", runs["seed0"], runs["bad_lr"], "--seq-len", SEQ_LEN, "--tokens", TOKENS,
                            "--device", "cpu", "--price-per-hour", "3.5", "--gpus", "2")
    assert rc == 0
    assert "| GPUs | cost |" in stdout and "3.5 per GPU-hour (GPUs set to 2)" in stdout
    rep = json.loads((runs["seed0"] / "eval" / "compare.json").read_text())
    for r, name in zip(rep["runs"], ("seed0", "bad_lr")):
        state = json.loads((runs[name] / "ckpt" / "step_0000020" / "state.json").read_text())
        assert r["wall_seconds"] == state["elapsed"] > 0
        assert r["train_tokens"] == state["tokens"] == 20 * 16 * SEQ_LEN
        assert r["cost"] == pytest.approx(state["elapsed"] / 3600 * 2 * 3.5)
        assert f"{r['cost']:.3g}" in stdout
    # without --gpus the run's own process count (1 here) is billed
    rc, stdout, _ = run_cli("compare", runs["seed0"], runs["bad_lr"], "--seq-len", SEQ_LEN, "--tokens", TOKENS,
                            "--device", "cpu", "--price-per-hour", "3.5", "--json")
    rep = json.loads(stdout)
    assert [r["cost_gpus"] for r in rep["runs"]] == [1, 1]
    assert rep["runs"][1]["cost"] == pytest.approx(rep["runs"][1]["wall_seconds"] / 3600 * 3.5)


def test_runs_with_different_tokenizers_cannot_be_paired(runs, shakespeare_shards, data_dir, tmp_path):
    from _helpers import train_small_bpe

    other = tmp_path / "other_tok"
    shutil.copytree(runs["seed0"] / "ckpt" / "step_0000020", other)
    (other / "files.json").unlink()  # the copy is edited on purpose
    shutil.rmtree(other / "tokenizer")
    text = (data_dir / "pretrain" / "the-verdict.txt").read_text(encoding="utf-8")
    train_small_bpe(text, 512).save(other / "tokenizer")
    for data in (shakespeare_shards, data_dir / "pretrain" / "the-verdict.txt"):
        rc, _, err = run_cli("compare", runs["seed0"], other, "--data", data, "--seq-len", SEQ_LEN, "--device", "cpu")
        assert rc == 2
        assert err.count("\n") == 1 and err.startswith("gptforge: error: cannot pair other_tok with the baseline "
                                                       "seed0: they use different tokenizers")


def test_one_run_is_not_a_comparison(runs):
    rc, _, err = run_cli("compare", runs["seed0"], "--device", "cpu")
    assert rc == 2 and "at least two different runs" in err


def test_eval_loss_reports_the_standard_error_over_windows(runs, shakespeare_shards, tmp_path):
    rc, stdout, _ = run_cli("eval", "loss", "--checkpoints", runs["seed0"], "--data", shakespeare_shards,
                            "--seq-len", SEQ_LEN, "--tokens", TOKENS, "--device", "cpu", "--out", tmp_path)
    assert rc == 0
    res = json.loads((tmp_path / "loss.json").read_text())["results"][0]
    with torch.no_grad():  # the same windows through compare's per-window path
        from gptforge.eval.loss import evaluate_loss

        windows = np.array(evaluate_loss(runs["seed0"], shakespeare_shards, max_tokens=TOKENS, seq_len=SEQ_LEN,
                                         device="cpu", show_progress=False, per_window=True)["window_losses"])
    se = windows.std(ddof=1) / math.sqrt(len(windows))
    assert res["loss_se"] == pytest.approx(se, rel=1e-9)
    assert "loss ± 1.96·SE" in stdout and f"{res['loss']:.4f} ± {1.96 * se:.4f}" in stdout

