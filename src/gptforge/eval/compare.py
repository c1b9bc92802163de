"""Compare runs on the same held-out windows: test loss, the change against a baseline with a paired 95%
confidence interval, wall time, tokens and cost (``gptforge compare``).

Every run (a run directory = its latest checkpoint, a step directory, a ``latest``/``best`` pointer or a
Hugging Face directory) is evaluated by :func:`gptforge.eval.loss.evaluate_loss` on the same token windows;
the first run is the baseline. For run ``r`` the change is ``loss_r - loss_baseline`` (negative = better), and
its interval comes from the paired per-window differences ``d_i = loss_r(window i) - loss_baseline(window i)``:

    Δ ± t(0.975, W - 1) · SE(d)

with ``Δ`` the token-weighted mean of ``d_i`` (exactly the difference of the two test losses), ``SE`` from
:func:`gptforge.eval.loss.weighted_mean_se` (``std(d, ddof=1) / sqrt(W)`` when all windows are full) and the
Student t quantile with ``W - 1`` degrees of freedom (1.96 for many windows). Pairing removes what the windows
have in common (a hard passage is hard for every model), so the interval is far narrower than the two
separate ones.

What the interval covers: the sampling noise of the held-out text, i.e. "would this difference hold on more
text like it". It does not contain seed-to-seed variation of training: two seeds of one recipe are two
different models, and with enough windows their (real, usually small) difference is significant too. To ask
whether a change beats seed noise, train the baseline again with another seed and read its Δ as the noise
floor.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.eval.loss import (
    _stream_for,
    checkpoint_step,
    evaluate_loss,
    expand_checkpoints,
    is_prepared_dir,
    weighted_mean_se,
)

CI_LEVEL = 0.95


# ---- statistics ----------------------------------------------------------------------------------------------


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` (0.5 < p < 1) of Student's t with ``df`` degrees of freedom.

    Exact (bisection on the closed-form CDF of Abramowitz & Stegun 26.7.3/26.7.4) up to 200 degrees of
    freedom, the Cornish-Fisher expansion (26.7.5, error < 1e-6 there) above."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    from statistics import NormalDist

    if df > 200:
        z = NormalDist().inv_cdf(p)
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    target = 2 * p - 1  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while _t_abs_cdf(hi, df) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if _t_abs_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _t_abs_cdf(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df`` (finite sums in cos θ, θ = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 1) // 2):  # 1 + 2/3 c² + 2·4/(3·5) c⁴ + … up to c^(df-3)
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.sqrt(c2) * total)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):  # 1 + 1/2 c² + 1·3/(2·4) c⁴ + … up to c^(df-2)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def paired_difference(baseline: np.ndarray, other: np.ndarray, weights: np.ndarray,
                      level: float = CI_LEVEL) -> dict:
    """Mean of ``other - baseline`` over windows (token-weighted) with its SE and a two-sided ``level``
    Student-t interval (``W - 1`` degrees of freedom); ``None`` bounds below two windows."""
    d = np.asarray(other, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    diff = float((w * d).sum() / w.sum())
    se = weighted_mean_se(d, w)
    if se is None:
        return {"diff": diff, "se": None, "t": None, "low": None, "high": None}
    q = t_quantile(0.5 + level / 2, len(d) - 1)
    return {"diff": diff, "se": se, "t": q, "low": diff - q * se, "high": diff + q * se}


def verdict(low: float | None, high: float | None) -> str:
    """``better`` / ``worse`` when the interval excludes 0 (lower loss is better), else ``no clear difference``."""
    if low is None or high is None:
        return "–"
    if high < 0:
        return "better"
    if low > 0:
        return "worse"
    return "no clear difference"


# ---- what each run cost --------------------------------------------------------------------------------------


def run_accounting(checkpoint: Path) -> dict:
    """Training step, tokens, wall seconds and processes (GPUs) of the run up to ``checkpoint``.

    From the checkpoint's ``state.json`` (``tokens``, ``elapsed``: wall time of the run including its evaluation
    and checkpointing, summed over resumes; ``plan.world_size``), else from the run's ``metrics.jsonl`` (the
    last record up to that step; seconds = the sum of step times ``dt``, so evaluation time is missing). Values
    that are not recorded (a Hugging Face directory) are ``None``."""
    checkpoint = Path(checkpoint)
    out: dict = {"step": checkpoint_step(checkpoint), "train_tokens": None, "wall_seconds": None, "gpus": None,
                 "accounting": None}
    state_path = checkpoint / "state.json"
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = {}
        if isinstance(state, dict):
            plan = state.get("plan") if isinstance(state.get("plan"), dict) else {}
            out["train_tokens"] = _number(state.get("tokens"))
            out["wall_seconds"] = _number(state.get("elapsed"))
            out["gpus"] = _number(plan.get("world_size") or state.get("world_size"))
            if out["train_tokens"] is not None or out["wall_seconds"] is not None:
                out["accounting"] = str(state_path)
    metrics = checkpoint.parent.parent / "metrics.jsonl" if checkpoint.parent.name == "ckpt" else None
    if metrics is not None and metrics.is_file() and (out["train_tokens"] is None or out["wall_seconds"] is None):
        tokens, seconds = None, 0.0
        with open(metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed run
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                    continue
                if out["step"] is not None and rec["step"] > out["step"]:
                    break
                tokens = _number(rec.get("tokens")) if rec.get("tokens") is not None else tokens
                seconds += _number(rec.get("dt")) or 0.0
        if out["train_tokens"] is None:
            out["train_tokens"] = tokens
        if out["wall_seconds"] is None and seconds > 0:
            out["wall_seconds"] = seconds
        out["accounting"] = (out["accounting"] + " + " if out["accounting"] else "") + str(metrics)
    return out


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---- the comparison -----------------------------------------------------------------------------------------


def run_label(checkpoint: Path) -> str:
    """``<run name>`` for ``runs/<name>/ckpt/step_N``, else the directory's name."""
    return checkpoint.parent.parent.name if checkpoint.parent.name == "ckpt" else checkpoint.name


def checkpoint_tokenizer(checkpoint: Path):
    """The tokenizer saved with a checkpoint (gptforge ``tokenizer/`` or a Hugging Face directory's), or None."""
    from gptforge.checkpoint import TOKENIZER_DIR, is_hf_directory
    from gptforge.tokenizer import load_tokenizer

    if (checkpoint / TOKENIZER_DIR).is_dir():
        return load_tokenizer(checkpoint / TOKENIZER_DIR)
    if is_hf_directory(checkpoint):
        from gptforge.hf import import_hf_tokenizer

        return import_hf_tokenizer(checkpoint)
    return None


def context_length(checkpoint: Path) -> int | None:
    """The model's context (block size) from its config file, without loading the weights."""
    from gptforge.checkpoint import is_hf_directory, model_config, read_model_config

    try:
        if is_hf_directory(checkpoint):
            cfg = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
            n = cfg.get("n_positions") or cfg.get("n_ctx") or cfg.get("max_position_embeddings")
            return int(n) if n else None
        return model_config(read_model_config(checkpoint), checkpoint).block_size
    except (GptforgeError, OSError, ValueError, TypeError, KeyError):
        return None


def default_data(checkpoint: Path) -> str | None:
    """The prepared dataset a pretraining run trained on (``config.data.path`` in its ``state.json``), if it
    still exists; its ``val`` split is then the held-out text."""
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        path = state["config"]["data"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if isinstance(path, str) and is_prepared_dir(path) else None


def _tokenizer_text(tok) -> str:
    return f"{tok.name!r} (hash {tok.content_hash()})" if tok is not None else "none saved"


def _check_pairable(labels: list[str], tokenizers: list, streams: dict, start: int, max_tokens: int | None):
    """Refuse runs whose held-out text is not the same tokens: a paired comparison needs identical windows.

    Same token ids are not enough when the tokenizers differ (shards read the same for every model): then both
    tokenizers must also decode a sample of them to the same text (a tokenizer that only appends special
    tokens, as ``gptforge sft`` does, passes)."""
    keys = [t.content_hash() if t is not None else "" for t in tokenizers]
    base_stream = streams[keys[0]][0]
    total = len(base_stream)
    stop = total if max_tokens is None else min(total, start + max_tokens)
    for i in range(1, len(labels)):
        if keys[i] == keys[0] or not keys[i] or not keys[0]:
            continue
        reason = None
        stream = streams[keys[i]][0]
        if len(stream) != total:
            reason = f"the held-out text is {total:,} tokens for one and {len(stream):,} for the other"
        else:
            for lo in range(start, stop, 1 << 20):
                hi = min(stop, lo + (1 << 20))
                if not np.array_equal(base_stream.slice(lo, hi), stream.slice(lo, hi)):
                    reason = f"the held-out text tokenizes differently (first difference in tokens [{lo:,}, {hi:,}))"
                    break
        if reason is None:
            sample = base_stream.slice(start, min(stop, start + 4096)).tolist()
            top = max(sample, default=0)
            same_text = (top < tokenizers[0].vocab_size and top < tokenizers[i].vocab_size
                         and tokenizers[0].decode(sample) == tokenizers[i].decode(sample))
            if not same_text:
                reason = "the same token ids decode to different text"
        if reason:
            raise GptforgeError(
                f"cannot pair {labels[i]} with the baseline {labels[0]}: they use different tokenizers "
                f"({_tokenizer_text(tokenizers[i])} vs {_tokenizer_text(tokenizers[0])}) and {reason}; a paired "
                "comparison needs the same token windows: compare runs that share a tokenizer (across "
                "tokenizers, `gptforge eval loss` reports bits-per-byte)")


def compare_runs(paths: list[str | Path], data=None, tokenizer=None, split: str = "val", start: int = 0,
                 max_tokens: int | None = None, seq_len: int | None = None, batch_size: int = 8,
                 device: str | None = None, dtype: str = "auto", text_field: str = "text",
                 separator: str | None = None, price_per_hour: float | None = None, gpus: int | None = None,
                 show_progress: bool = True, log=None) -> dict:
    """Evaluate every run on the same windows and compare each with the first (the baseline).

    ``paths``: runs or checkpoints in any form ``gptforge eval loss`` takes (each resolved on its own, so the
    order given is kept). ``data`` as :func:`evaluate_loss` takes it; ``None`` = the baseline run's prepared
    dataset. ``price_per_hour`` is per GPU-hour: cost = wall hours × GPUs × price, GPUs = ``gpus`` or else the
    run's recorded process count (``plan.world_size``), else 1. Returns the report (see ``gptforge compare``)."""
    from gptforge.checkpoint import load_model
    from gptforge.eval.loss import _default_device

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    checkpoints: list[Path] = []
    for p in paths:
        for c in expand_checkpoints([p]):
            if c not in checkpoints:
                checkpoints.append(c)
    if len(checkpoints) < 2:
        raise GptforgeError(f"compare needs at least two different runs or checkpoints (the first is the "
                            f"baseline); got {', '.join(map(str, paths))}")
    labels = [run_label(c) for c in checkpoints]
    for i, c in enumerate(checkpoints):  # two checkpoints of one run: tell them apart by step
        if labels.count(run_label(c)) > 1:
            labels[i] = f"{run_label(c)}@{c.name}"
    if data is None:
        data = default_data(checkpoints[0])
        if data is None:
            raise GptforgeError(f"no --data given and the baseline {checkpoints[0]} does not name a prepared "
                                "dataset that exists; pass --data DIR (prepared shards) or text files")
    if seq_len is None:
        contexts = [n for n in (context_length(c) for c in checkpoints) if n]
        seq_len = min(contexts) if contexts else None
    device = device or _default_device()

    # The pairing check first: it fails in seconds, before any model is evaluated.
    tokenizers = [tokenizer or checkpoint_tokenizer(c) for c in checkpoints]
    streams: dict = {}
    for tok in tokenizers:
        key = tok.content_hash() if tok is not None else ""
        if key not in streams:
            streams[key] = _stream_for(data, tok, split, text_field, separator)
    _check_pairable(labels, tokenizers, streams, start, max_tokens)

    runs = []
    for i, (ckpt, label) in enumerate(zip(checkpoints, labels)):
        model, ckpt_tok, _ = load_model(ckpt, device=device)
        res = evaluate_loss(model, data, tokenizer=tokenizer or ckpt_tok, split=split, start=start,
                            max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                            text_field=text_field, separator=separator, show_progress=show_progress,
                            _stream_cache=streams, per_window=True)
        del model
        res.update(name=label, checkpoint=str(ckpt), **run_accounting(ckpt))
        runs.append(res)
        say(f"[{i + 1}/{len(checkpoints)}] {label}: loss {res['loss']:.4f}")

    base = runs[0]
    weights = np.asarray(base["window_tokens"], dtype=np.float64)
    for r in runs:
        if r["window_tokens"] != base["window_tokens"]:  # same stream and seq_len: cannot happen
            raise GptforgeError(f"{r['name']} was evaluated on other windows than the baseline "
                                f"({r['windows']} vs {base['windows']}); this is a bug, please report it")
        paired = paired_difference(base["window_losses"], r["window_losses"], weights)
        r.update(diff=paired["diff"], diff_se=paired["se"], ci_low=paired["low"], ci_high=paired["high"],
                 diff_percent=100 * paired["diff"] / base["loss"] if base["loss"] else None,
                 verdict="baseline" if r is base else verdict(paired["low"], paired["high"]))
        q = t_quantile(0.5 + CI_LEVEL / 2, r["windows"] - 1) if r["windows"] > 1 else None
        r["loss_low"] = r["loss"] - q * r["loss_se"] if q and r["loss_se"] is not None else None
        r["loss_high"] = r["loss"] + q * r["loss_se"] if q and r["loss_se"] is not None else None
        n_gpus = gpus or r["gpus"] or 1
        r["cost_gpus"] = n_gpus
        r["cost"] = (r["wall_seconds"] / 3600 * n_gpus * price_per_hour
                     if price_per_hour is not None and r["wall_seconds"] is not None else None)
    df = base["windows"] - 1
    files = [data] if isinstance(data, (str, Path)) else list(data) if isinstance(data, (list, tuple)) else []
    shards = len(files) == 1 and is_prepared_dir(files[0])
    return {
        "baseline": base["name"], "data": base["data"], "split": split if shards else None,
        "start": base["start"], "stop": base["stop"], "tokens": base["tokens"], "seq_len": base["seq_len"],
        "windows": base["windows"], "precision": base["precision"],
        "ci": {"level": CI_LEVEL, "df": df, "t": t_quantile(0.5 + CI_LEVEL / 2, df) if df > 0 else None,
               "method": "paired per-window differences: mean ± t(0.975, windows-1) · SE (Student t)"},
        "price_per_gpu_hour": price_per_hour, "gpus_override": gpus,
        "runs": runs,
    }


# ---- output --------------------------------------------------------------------------------------------------


def _fmt_signed(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def _fmt_wall(seconds: float) -> str:
    from gptforge.train.metrics import format_duration

    return f"{seconds:.1f}s" if seconds < 60 else format_duration(seconds)


def _fmt_cost(cost: float) -> str:
    return f"{cost:,.2f}" if cost >= 1 else f"{cost:.3g}"


def format_compare_table(report: dict) -> str:
    """The Markdown comparison table: one row per run, the baseline first."""
    priced = report.get("price_per_gpu_hour") is not None
    head = ["run", "step", "test loss (95% CI)", "Δ vs baseline [95% CI]", "Δ %", "verdict", "train tokens",
            "wall"] + (["GPUs", "cost"] if priced else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---|---:|---:|" + ("---:|---:|" if priced else "")]
    for r in report["runs"]:
        loss = f"{r['loss']:.4f}" + (f" ± {r['loss_high'] - r['loss']:.4f}" if r.get("loss_high") is not None else "")
        if r["verdict"] == "baseline":
            delta, pct = "baseline", "–"
        else:
            ci = (f" [{_fmt_signed(r['ci_low'])}, {_fmt_signed(r['ci_high'])}]"
                  if r.get("ci_low") is not None else "")
            delta = _fmt_signed(r["diff"]) + ci
            pct = "–" if r.get("diff_percent") is None else f"{r['diff_percent']:+.2f}%"
        cells = [r["name"], "–" if r.get("step") is None else str(r["step"]), loss, delta, pct,
                 r["verdict"] if r["verdict"] != "baseline" else "–",
                 "–" if r.get("train_tokens") is None else f"{int(r['train_tokens']):,}",
                 "–" if r.get("wall_seconds") is None else _fmt_wall(r["wall_seconds"])]
        if priced:
            cells += [str(r["cost_gpus"]), "–" if r.get("cost") is None else _fmt_cost(r["cost"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(report: dict) -> str:
    """The sentence under the table: what was evaluated and how the interval was computed."""
    ci = report["ci"]
    where = report["data"] + (f", split {report['split']}" if report.get("split") else "")
    text = (f"{len(report['runs'])} runs on the same {report['windows']:,} windows of {report['seq_len']} "
            f"({report['tokens']:,} tokens [{report['start']:,}, {report['stop']:,}) of {where}); "
            f"baseline {report['baseline']}. Δ = loss - baseline loss (negative = better); ")
    if ci["t"] is not None:
        text += (f"95% CI = Δ ± {ci['t']:.3f} (Student t, {ci['df']} df) × SE of the paired per-window "
                 "differences; it covers held-out-text noise, not seed-to-seed variation")
    else:
        text += "one window: no interval"
    if report.get("price_per_gpu_hour") is not None:
        text += (f". Cost = wall hours × GPUs × {report['price_per_gpu_hour']:g} per GPU-hour"
                 + (f" (GPUs set to {report['gpus_override']})" if report.get("gpus_override") else
                    " (GPUs = the run's process count)"))
    return text + "."


def plot_compare(report: dict, path: str | Path) -> Path:
    """Two panels: test loss per run and Δ vs the baseline, both with their 95% intervals; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptforge.charts import save_figure

    runs = report["runs"]
    ys = list(range(len(runs)))[::-1]
    names = [r["name"] for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(runs)), sharey=True)
    for ax, key, low, high, title in ((ax1, "loss", "loss_low", "loss_high", "test loss (95% CI)"),
                                      (ax2, "diff", "ci_low", "ci_high", f"Δ vs {report['baseline']} (95% CI)")):
        for y, r in zip(ys, runs):
            x = r[key]
            err = [[x - r[low]], [r[high] - x]] if r.get(low) is not None else None
            color = {"better": "tab:green", "worse": "tab:red"}.get(r["verdict"], "tab:gray")
            ax.errorbar([x], [y], xerr=err, fmt="o", color="black" if r["verdict"] == "baseline" else color,
                        capsize=4)
            ax.annotate(f"{x:+.4f}" if key == "diff" else f"{x:.4f}", (x, y), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    ax2.axvline(0, color="black", linewidth=1)
    ax1.set_yticks(ys, names)
    ax1.set_xlabel("nats/token")
    ax2.set_xlabel("Δ nats/token (negative = better)")
    fig.suptitle(f"{report['windows']:,} paired windows of {report['seq_len']} tokens", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
