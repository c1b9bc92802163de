"""Training observability: ``metrics.jsonl``, ``loss.png``, MFU and the end-of-run summary."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from gptforge.charts import save_figure
from gptforge.io import iter_jsonl

# Dense bf16 tensor-core peak FLOP/s (no sparsity), from the vendors' datasheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "RTX 5090": 209.5e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
}


def device_peak_flops(device: torch.device, precision: str = "bf16") -> tuple[float | None, str]:
    """(peak FLOP/s, where the number comes from) for ``device`` in the ``precision`` actually used.

    CUDA: the datasheet's dense bf16/fp16 tensor-core peak (fp32 runs on TF32 tensor cores at half of it).
    CPU: a measured matmul in that precision's dtype. ``None`` for unknown GPUs.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_FLOPS.items():
            if all(part.lower() in name.lower() for part in key.split()):
                if precision == "fp32":
                    return value / 2, f"{key} TF32 datasheet (half the bf16 peak)"
                return value, f"{key} {precision} datasheet"
        return None, f"unknown GPU {name!r}"
    if device.type == "cpu":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measure_cpu_matmul_flops(dtype=dtype), f"measured CPU {precision} matmul"
    return None, f"no peak table for {device.type}"


_CPU_PEAK: dict = {}


def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 12, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``repeats`` matmul throughput on this CPU in ``dtype`` with the current thread count (cached)."""
    if dtype not in _CPU_PEAK:
        gen = torch.Generator().manual_seed(0)  # private: must not move the training RNG (exact resume)
        a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK[dtype] = 2 * n**3 / best
    return _CPU_PEAK[dtype]


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: str | Path, resume_from_step: int | None = None):
        self.path = Path(path)
        if resume_from_step is not None and self.path.is_file():
            # keep steps up to the checkpoint we resume from (``step`` counts completed steps); later ones are
            # about to be redone
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", -1) <= resume_from_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif resume_from_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "inf"/"nan": valid JSON, still readable
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (non-finite values, stored as strings, back as floats)."""
    return [{k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in rec.items()}
            for _, rec in iter_jsonl(path)]


def plot_metrics(metrics_path: str | Path, out_png: str | Path, grad_clip: float | None = None,
                 points: int = 100) -> Path | None:
    """Draw ``loss.png`` for any stage: train loss (interval mean with min/max band) + val loss, LR, grad norm
    (max/mean), accuracy when the records carry it (classifiers), and in-training HellaSwag / CORE.

    Non-finite values are drawn at a cap just above the finite maximum, marked with an ×.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    if not train:
        return None
    steps = np.array([r["step"] for r in train])
    loss = np.array([r["loss"] for r in train], dtype=float)
    lr = np.array([r.get("lr", np.nan) for r in train], dtype=float)
    gnorm = np.array([r.get("grad_norm", np.nan) for r in train], dtype=float)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]

    def capped(x):
        finite = x[np.isfinite(x)]
        cap = (finite.max() * 1.5 if finite.size else 1.0)
        bad = ~np.isfinite(x)
        return np.where(bad, cap, x), bad

    def bands(x):
        width = max(1, math.ceil(len(x) / points))
        groups = [x[i:i + width] for i in range(0, len(x), width)]
        centers = [steps[i:i + width].mean() for i in range(0, len(x), width)]
        return (np.array(centers), np.array([g.mean() for g in groups]), np.array([g.min() for g in groups]),
                np.array([g.max() for g in groups]))

    accuracy = [(r["step"], r[k], k) for r in records for k in ("train_accuracy", "val_accuracy") if k in r]
    bench_keys = ("hellaswag_acc_norm", "core")  # in-training benchmarks (eval.hellaswag_interval, core_interval)
    benchmarks = {k: [(r["step"], r[k]) for r in records if k in r] for k in bench_keys}
    benchmarks = {k: v for k, v in benchmarks.items() if v}
    ratios = [3, 1, 1.5] + ([1.5] if accuracy else []) + ([1.5] if benchmarks else [])
    fig, axes = plt.subplots(len(ratios), 1, figsize=(9, 2.2 * sum(ratios) / 1.5 + 1), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    loss_c, loss_bad = capped(loss)
    c, mean, lo, hi = bands(loss_c)
    ax = axes[0]
    ax.fill_between(c, lo, hi, alpha=0.25, label="train loss min–max")
    ax.plot(c, mean, label="train loss (mean)")
    if loss_bad.any():
        ax.scatter(steps[loss_bad], loss_c[loss_bad], marker="x", color="red", label="non-finite (capped)")
    if val:
        vs, vl = zip(*val)
        ax.plot(vs, vl, "o-", color="C3", label="val loss")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    axes[1].plot(steps, lr, color="C2")
    axes[1].set_ylabel("learning rate")
    axes[1].grid(alpha=0.3)
    g_c, g_bad = capped(gnorm)
    c, mean, lo, hi = bands(g_c)
    axes[2].plot(c, hi, color="C1", alpha=0.7, label="grad norm (max)")
    axes[2].plot(c, mean, color="C0", label="grad norm (mean)")
    clipped = np.array([bool(r.get("clipped")) for r in train])
    overflow = np.array([bool(r.get("norm_overflow")) for r in train])
    if clipped.any():  # exploding-gradient diagnostics: which steps were clipped, overflowed, non-finite
        axes[2].scatter(steps[clipped], g_c[clipped], s=6, color="C1", label=f"clipped ({int(clipped.sum())})")
    if overflow.any():
        axes[2].scatter(steps[overflow], g_c[overflow], marker="^", color="orange",
                        label=f"norm overflow, finite grads ({int(overflow.sum())})")
    if g_bad.any():
        axes[2].scatter(steps[g_bad], g_c[g_bad], marker="x", color="red", label="non-finite (capped)")
    if grad_clip:
        axes[2].axhline(grad_clip, color="k", linestyle="--", linewidth=1, label=f"clip {grad_clip}")
    axes[2].set_ylabel("grad norm (pre-clip)")
    axes[2].legend(loc="upper right")
    axes[2].grid(alpha=0.3)
    if accuracy:  # classifiers: per-step training accuracy (banded) and validation accuracy
        ax = axes[3]
        tr = np.array([(st, v) for st, v, k in accuracy if k == "train_accuracy"], dtype=float).reshape(-1, 2)
        if len(tr):
            width = max(1, math.ceil(len(tr) / points))
            c = [tr[i:i + width, 0].mean() for i in range(0, len(tr), width)]
            ax.plot(c, [tr[i:i + width, 1].mean() for i in range(0, len(tr), width)], label="train accuracy")
        va = [(st, v) for st, v, k in accuracy if k == "val_accuracy"]
        if va:
            ax.plot(*zip(*va), "o-", color="C3", label="val accuracy")
        ax.set_ylabel("accuracy")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    if benchmarks:  # HellaSwag acc_norm and CORE (centered accuracy: 0 = chance) over training
        ax = axes[-1]
        labels = {"hellaswag_acc_norm": "HellaSwag acc_norm", "core": "CORE subset (centered)"}
        for i, (k, pts) in enumerate(benchmarks.items()):
            ax.plot(*zip(*pts), "o-", color=f"C{4 + i}", label=labels[k])
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_ylabel("benchmark")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step (optimizer steps completed)")
    fig.tight_layout()
    out_png = Path(out_png)
    return save_figure(fig, out_png, dpi=90)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def summary_text(s: dict) -> str:
    """One paragraph describing a finished run (printed and stored in the result)."""
    parts = [f"trained {s['steps']} steps ({s['tokens']:,} tokens) in {format_duration(s['seconds'])}",
             f"{s['tokens_per_s']:,.0f} tokens/s"]
    if s.get("mfu") is not None:
        parts.append(f"MFU {100 * s['mfu']:.1f}%")
    if s.get("peak_memory") is not None:
        parts.append(f"peak memory {s['peak_memory'] / 2**30:.2f} GiB")
    if s.get("final_loss") is not None:
        parts.append(f"final train loss {s['final_loss']:.4f}")
    if s.get("best_val_loss") is not None:
        final = s.get("final_val_loss")
        parts.append(f"best val loss {s['best_val_loss']:.4f}" + (f" (final {final:.4f})" if final is not None else ""))
    parts.append(f"skipped steps: {s['skipped_steps']} (non-finite grads {s['nonfinite_steps']}, "
                 f"fp16 scaler {s['scaler_skips']})")
    if s.get("precision"):
        parts.append(f"precision {s['precision']}" + (f" ({s['precision_reason']})" if s.get("precision_reason") else ""))
    return "; ".join(parts) + f". Outputs in {s['run_dir']}."
