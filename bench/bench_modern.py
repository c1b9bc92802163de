"""The modern family with Muon vs our GPT-2 preset with AdamW: same data, tokenizer, parameters and wall-clock budget.

What it compares (issue 14): ``gptforge pretrain`` runs, one subprocess each, on the quickstart's data (tinyshakespeare
+ WikiText-2 + TinyStories sample, the quickstart's 4,096-token byte-level BPE, 5% held out), sequence length 256,
micro-batch 16, the quickstart's schedule (cosine, 5% warmup, weight decay 0.1, AdamW lr 2e-3), the same seed and
the same torch threads. The arms:

* ``gpt2-adamw``  — the baseline: preset ``mini`` (L4 D128 H4, GPT-2 architecture, 1,350,400 parameters) + AdamW;
* ``modern-muon`` — preset ``modern-mini`` (RoPE, RMSNorm, SwiGLU, no biases; 1,352,832 parameters) + Muon
  (``optim.name=muon``, muon_lr 0.02: the blocks' matrices; embeddings/head/gains on the same AdamW);
* ablations (``--ablations``), each one change away from ``modern-muon`` (or from the baseline): the optimizer back
  to AdamW, the architecture back to GPT-2 (keeping Muon), learned positions instead of RoPE, a GELU MLP of equal
  parameters instead of SwiGLU, LayerNorm instead of RMSNorm, and QK-norm added. Ablations run at equal *steps*
  (``--ablation-steps``, the two main arms again included as reference points), two by two: a shared machine's
  load changes between pairs, so equal wall-clock is only fair within a pair.

Equal wall-clock: a short calibration run per arm measures its seconds per step (median after warm-up); the arm then
trains ``budget / step time`` steps with the full schedule (so a slower step, e.g. Muon's Newton–Schulz, buys fewer
steps). The two arms run side by side (ablations too, two by two), one torch thread
each on this 2-core machine, calibration included: whatever else the shared machine runs meanwhile slows both arms
of a pair alike (two threads per run would make OpenMP's spinning barriers collapse under foreign load: 13× slower
steps were measured that way). Each run's CPU seconds are recorded beside its wall time. Held-out loss is measured every ~1/24 of the run on the same fixed validation tokens and converted to bits
per byte (nats/token ÷ ln 2 × tokens/byte of those tokens). The x-axis is training time: the sum of the per-step
times ``metrics.jsonl`` records (evaluation excluded). "Time to target" is when a run's held-out loss first reaches
the baseline's final held-out loss (linear interpolation between evaluations). Goal: ≤ 0.5 of the baseline's time.

The CPU model and flags are printed with every result; the busy share of other processes during each run is
recorded (``other_cpu``), since a shared machine slows one arm and not another. Run it from the repo root with the
venv active and ``GPTFORGE_DATA_DIR`` set; point ``--src`` at a copy of ``src/`` when others edit the tree::

    cp -r src /tmp/bench-src
    python bench/bench_modern.py --src /tmp/bench-src --budget 300 --ablations

It writes ``bench/out/modern.json`` (rewritten after every run), ``bench/out/modern.png`` (bits per byte over
training time) and ``bench/results_modern.md`` (the table that ``python -m bench`` appends to RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import _busy_s, _children_cpu_s, cpu_info, cpu_line, wait_quiet

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"

BASE = ["--data.seq_len=256", "--train.micro_batch=16", "--optim.lr=2e-3", "--optim.weight_decay=0.1",
        "--optim.schedule=cosine", "--train.seed=1337", "--checkpoint.keep_last=1", "--log.progress=false",
        "--log.plot=false", "--eval.sample_tokens=32"]
ARMS = {  # name → (flags, what it changes)
    "gpt2-adamw": (["--model.preset=mini"], "baseline: GPT-2 architecture, AdamW"),
    "modern-muon": (["--model.preset=modern-mini", "--optim.name=muon"], "modern family + Muon"),
}
ABLATIONS = {
    "modern-adamw": (["--model.preset=modern-mini"], "modern family, AdamW (optimizer reverted)"),
    "gpt2-muon": (["--model.preset=mini", "--optim.name=muon"], "GPT-2 architecture, Muon (architecture reverted)"),
    "modern-muon-learned-pos": (["--model.preset=modern-mini", "--optim.name=muon", "--model.pos=learned"],
                                "learned positions instead of RoPE (+32,768 parameters)"),
    "modern-muon-gelu": (["--model.preset=modern-mini", "--optim.name=muon", "--model.mlp=gelu",
                          "--model.mlp_hidden=552"], "GELU MLP (hidden 552, equal parameters) instead of SwiGLU"),
    "modern-muon-layernorm": (["--model.preset=modern-mini", "--optim.name=muon", "--model.norm=layernorm"],
                              "LayerNorm (no bias) instead of RMSNorm"),
    "modern-muon-qk-norm": (["--model.preset=modern-mini", "--optim.name=muon", "--model.qk_norm=true"],
                            "QK-norm added (+256 parameters)"),
}


# ---- data -------------------------------------------------------------------------------------------------------


def prepare_data(src: Path, work: Path, env: dict) -> Path:
    """The quickstart's corpus and 4k BPE, prepared once (5% held out)."""
    data = work / "data"
    if (data / "manifest.json").is_file():
        return data
    corpus = ["tinyshakespeare", "wikitext2", "tinystories"]
    py = [sys.executable, "-m", "gptforge"]
    subprocess.run([*py, "tokenizer", "train", *corpus, "--vocab-size", "4096", "--out", str(work / "tokenizer")],
                   env=env, check=True)
    subprocess.run([*py, "data", "prepare", *corpus, "--tokenizer", str(work / "tokenizer"), "--out", str(data),
                    "--val-fraction", "0.05"], env=env, check=True)
    return data


def tokens_per_byte(data: Path, val_tokens: int, src: Path) -> tuple[float, int]:
    """Tokens per UTF-8 byte of the fixed validation slice (to turn nats/token into bits/byte), and its size."""
    sys.path.insert(0, str(src))
    from gptforge.data.loader import validation_windows
    from gptforge.tokenizer import load_tokenizer

    windows = validation_windows(data, 256, val_tokens)
    tok = load_tokenizer(data / "tokenizer") if (data / "tokenizer").is_dir() else load_tokenizer(
        data.parent / "tokenizer")
    ids = windows[:, 1:].reshape(-1).tolist()  # the scored targets
    return len(ids) / len(tok.decode(ids).encode("utf-8")), len(ids)


# ---- runs -------------------------------------------------------------------------------------------------------


def launch(name: str, flags: list[str], steps: int, data: Path, work: Path, env: dict, val_tokens: int,
           eval_every: int) -> dict:
    """Start one ``gptforge pretrain`` subprocess (its output goes to ``<work>/logs/<name>.log``)."""
    cmd = [sys.executable, "-m", "gptforge", "pretrain", *BASE, *flags, f"--data.path={data}",
           f"--out_dir={work / 'runs'}", f"--name={name}", "--overwrite=true", f"--train.max_steps={steps}",
           f"--optim.warmup_steps={max(1, steps // 20)}", f"--eval.interval={eval_every}",
           f"--data.val_tokens={val_tokens}"]
    (work / "logs").mkdir(exist_ok=True)
    log = open(work / "logs" / f"{name}.log", "w")  # noqa: SIM115 - closed in finish()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return {"name": name, "cmd": cmd, "proc": proc, "log": log, "t0": time.perf_counter(), "work": work}


def finish(job: dict) -> dict:
    """Wait for a launched run; its metrics, summary, wall time and CPU seconds."""
    _, status, usage = os.wait4(job["proc"].pid, 0)
    job["proc"].returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - job["t0"]
    job["log"].close()
    run_dir = job["work"] / "runs" / job["name"]
    if job["proc"].returncode != 0:
        tail = (job["work"] / "logs" / f"{job['name']}.log").read_text()[-3000:]
        raise SystemExit(f"{job['name']} failed:\n{tail}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"cmd": job["cmd"], "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "records": records,
            "summary": summary}


def run_together(specs: list[tuple], data: Path, work: Path, env: dict, val_tokens: int) -> list[dict]:
    """Run ``(name, flags, steps, eval_every)`` side by side (each with the env's threads); the share of the
    machine that processes outside them used meanwhile is each run's ``other_cpu``."""
    busy0, own0, t0 = _busy_s(), _children_cpu_s(), time.perf_counter()
    jobs = [launch(name, flags, steps, data, work, env, val_tokens, every) for name, flags, steps, every in specs]
    runs = [finish(j) for j in jobs]
    wall = time.perf_counter() - t0
    other = max(0.0, (_busy_s() - busy0) - (_children_cpu_s() - own0)) / (wall * (os.cpu_count() or 1))
    for r in runs:
        r["other_cpu"] = other
    return runs


def step_seconds(run: dict) -> float:
    """Median training seconds per step after warm-up."""
    dts = [r["dt"] for r in run["records"] if "dt" in r]
    return statistics.median(dts[4:] if len(dts) > 8 else dts)


def curve(run: dict, tpb: float) -> list[tuple[float, int, float, float]]:
    """(training seconds, step, held-out loss, bits per byte) at every evaluation."""
    t, out = 0.0, []
    for r in run["records"]:
        t += r.get("dt", 0.0)
        if r.get("val_loss") is not None:
            out.append((t, r["step"], r["val_loss"], r["val_loss"] / math.log(2) * tpb))
    return out


def time_to(points: list[tuple], target: float, axis: int = 0) -> float | None:
    """First training time (``axis=0``; step with ``axis=1``) at which the held-out loss reaches ``target``,
    interpolated linearly between evaluations."""
    prev = None
    for p in points:
        if p[2] <= target:
            if prev is None:
                return p[axis]
            x0, l0, x1, l1 = prev[axis], prev[2], p[axis], p[2]
            return x0 + (x1 - x0) * (l0 - target) / (l0 - l1) if l0 != l1 else x1
        prev = p
    return None


# ---- report -----------------------------------------------------------------------------------------------------


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, arm in result["arms"].items():
        pts = arm["curve"]
        style = "-" if name in ARMS else ":"
        ax.plot([p[0] for p in pts], [p[3] for p in pts], style, marker="o" if name in ARMS else None,
                markersize=3, label=f"{name} ({arm['params']:,} params)")
    target = result["target_bpb"]
    ax.axhline(target, color="grey", linewidth=0.8, linestyle="--", label="gpt2-adamw final")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"modern + Muon vs GPT-2 + AdamW: {result['budget_s']:.0f} s each, {result['threads']} thread(s), "
                 "side by side")
    lo = min(p[3] for a in result["arms"].values() for p in a["curve"])
    ax.set_ylim(lo - 0.05, lo + 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    base = result["arms"]["gpt2-adamw"]
    lines = [
        "## Modern family + Muon vs GPT-2 + AdamW (bench/bench_modern.py)",
        "",
        f"- {result['cpu_line']}",
        (f"- Date: {result['started']} → {result['finished']} UTC; {result['threads']} torch thread(s) per run, "
        f"{result['together']} runs side by side (pairs: {'; '.join(' + '.join(p) for p in result['pairs'])}); "
        f"precision auto → {base['summary'].get('precision')} ({base['summary'].get('precision_reason')})"),
        f"- Command: `{result['command']}`",
        (f"- Data: the quickstart corpus (tinyshakespeare + WikiText-2 test + TinyStories sample) in its 4,096-token "
        f"BPE, 5% held out; held-out slice {result['val_tokens']:,} tokens ({result['tokens_per_byte']:.4f} "
        "tokens/byte). Sequence 256, micro-batch 16, cosine schedule with 5% warmup, AdamW lr 2e-3 wd 0.1, "
        "seed 1337; Muon lr 0.02, momentum 0.95 Nesterov, 5 Newton–Schulz steps (fp32 on CPU)."),
        (f"- Budget: {result['budget_s']:.0f} s of training per arm (steps = budget ÷ calibrated step time); target "
        f"= the baseline's final held-out loss {result['target_loss']:.4f} ({result['target_bpb']:.4f} bits/byte)."),
        "",
        ("| arm | change | params | steps | s/step | train s | CPU s | final held-out bits/byte | time to baseline's "
        "final loss | vs baseline | steps to it | steps × s/step vs baseline | other CPU |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    t_base = base["time_to_target"]
    cost_base = base["steps"] * base["step_s"]
    for name, arm in result["arms"].items():
        t = arm["time_to_target"]
        n = time_to(arm["curve"], result["target_loss"], axis=1)
        ratio = f"{t / t_base:.2f}×" if t is not None and t_base else "not reached"
        est = f"{n * arm['step_s'] / cost_base:.2f}×" if n is not None else "not reached"
        lines.append(
            f"| {name} | {arm['what']} | {arm['params']:,} | {arm['steps']:,} | {arm['step_s']:.3f} | "
            f"{arm['train_s']:.0f} | {arm['cpu_s']:.0f} | {arm['curve'][-1][3]:.4f} | "
            f"{f'{t:.0f} s' if t is not None else '—'} | {ratio} | {f'{n:.0f}' if n is not None else '—'} | {est} | "
            f"{arm['other_cpu']:.0%} |")
    mm = result["arms"]["modern-muon"]["time_to_target"]
    verdict = ("met" if mm is not None and mm <= 0.5 * t_base else "not met")
    lines += [
        "",
        f"Goal (modern + Muon reaches the baseline's final loss in ≤ half its time): **{verdict}**"
        + (f" ({mm / t_base:.2f}× of the baseline's {t_base:.0f} s)." if mm is not None else "."),
        "",
        *ablation_table(result),
        *[*result.get("notes", []), ""][: len(result.get("notes", [])) + bool(result.get("notes"))],
        "![held-out bits per byte over training time](out/modern.png)",
        "",
        ("_time to target: training seconds (sum of per-step times; evaluations excluded) until the held-out loss "
        "first reaches the baseline's final value, interpolated between evaluations (every ~1/24 of a run). "
        "steps × s/step: the same from the step at which the target is reached and the step times calibrated side "
        "by side — insensitive to load that changes *during* the runs (the direct time compares one arm's middle "
        "with the other's end, which a shared machine may run at different speeds). "
        "CPU s: the run's process CPU time (startup and evaluations included). other CPU: busy share of the "
        "machine's cores used by processes outside this benchmark while the pair ran._"),
        "",
    ]
    return "\n".join(lines)


def ablation_table(result: dict) -> list[str]:
    abl = result.get("ablations") or {}
    if not abl:
        return []
    ref = abl.get("gpt2-adamw")
    lines = [f"Ablations: each one change, at equal steps ({result['ablation_steps']} steps × 4,096 tokens, the same "
             "schedule), two runs side by side; the held-out bits/byte after the last step, and the step time "
             "measured beside its pair partner (comparable within a pair only: "
             + "; ".join(" + ".join(p) for p in result["ablation_pairs"]) + ").", "",
             ("| run | change | params | final held-out bits/byte | vs gpt2-adamw | steps to gpt2-adamw's final loss "
             "| s/step | other CPU |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, arm in abl.items():
        bpb = arm["curve"][-1][3]
        delta = f"{bpb - ref['curve'][-1][3]:+.4f}" if ref else "—"
        n = time_to(arm["curve"], ref["curve"][-1][2], axis=1) if ref else None
        lines.append(f"| {name} | {arm['what']} | {arm['params']:,} | {bpb:.4f} | {delta} | "
                     f"{f'{n:.0f}' if n is not None else '—'} | {arm['step_s']:.3f} | {arm['other_cpu']:.0%} |")
    return [*lines, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", type=Path, default=ROOT / "src", help="gptforge source tree to run (a copy: see above)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-modern"), help="data and run directories")
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per arm")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--together", type=int, default=2,
                   help="runs side by side (default 2: the baseline beside modern + Muon, ablations in pairs)")
    p.add_argument("--wait-quiet", type=float, default=300.0,
                   help="wait up to this many seconds for an idle machine before each pair")
    p.add_argument("--val-tokens", type=int, default=65536)
    p.add_argument("--ablations", action="store_true", help="also run the one-change ablations")
    p.add_argument("--ablation-steps", type=int, default=200, help="steps of every ablation run (equal tokens)")
    p.add_argument("--only", nargs="*", default=None, help="run only these ablation arms")
    p.add_argument("--out", type=Path, default=OUT / "modern.json")
    p.add_argument("--report-only", action="store_true", help="re-render the chart and markdown from --out")
    a = p.parse_args()
    if a.report_only:
        result = json.loads(a.out.read_text())  # a "notes" list of markdown lines, when added, is rendered too
        chart(result, a.out.with_suffix(".png"))
        (ROOT / "bench" / "results_modern.md").write_text(markdown(result), encoding="utf-8")
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(a.src.resolve()),
           "TOKENIZERS_PARALLELISM": "false"}
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    info = cpu_info()
    print(cpu_line(info), flush=True)
    data = prepare_data(a.src, a.work, env)
    tpb, scored = tokens_per_byte(data, a.val_tokens, a.src)
    names = list(ARMS)
    abl = ([*ARMS, *ABLATIONS] if a.ablations else [])
    if a.only:
        abl = [n for n in abl if n in a.only]
    main_pairs = [names]
    abl_pairs = [abl[i:i + a.together] for i in range(0, len(abl), a.together)]
    result = {"cpu": info, "cpu_line": cpu_line(info), "threads": a.threads, "together": a.together,
              "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "pairs": main_pairs,
              "ablation_pairs": abl_pairs, "ablation_steps": a.ablation_steps, "budget_s": a.budget,
              "val_tokens": scored, "tokens_per_byte": tpb,
              "command": "python bench/bench_modern.py " + " ".join(sys.argv[1:]), "arms": {}, "ablations": {}}

    def record(name: str, steps: int, run: dict, calib: dict | None, pair: list[str]) -> dict:
        pts = curve(run, tpb)
        print(f"  {name}: final held-out loss {pts[-1][2]:.4f} ({pts[-1][3]:.4f} bits/byte) after {steps} steps, "
              f"{pts[-1][0]:.0f} s of training; other CPU {run['other_cpu']:.0%}", flush=True)
        return {"flags": ({**ARMS, **ABLATIONS})[name][0], "what": ({**ARMS, **ABLATIONS})[name][1],
                "step_s": step_seconds(calib or run), "steps": steps, "params": run["summary"]["params"],
                "train_s": run["summary"]["train_seconds"], "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
                "other_cpu": run["other_cpu"], "curve": pts, "summary": run["summary"], "together": pair,
                "time_to_target": None}

    def save() -> None:
        result["finished"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        a.out.write_text(json.dumps(result, indent=1, default=str))

    # equal wall-clock: the baseline beside modern + Muon, each trains its budget's worth of steps
    for pair in main_pairs:
        wait_quiet(a.wait_quiet, 0.15)
        calib = run_together([(f"calib-{n}", ARMS[n][0], 12, 0) for n in pair], data, a.work, env, 0)
        specs = []
        for name, run in zip(pair, calib):
            steps = max(24, int(a.budget / step_seconds(run)))
            print(f"{name}: {step_seconds(run):.3f} s/step → {steps} steps", flush=True)
            specs.append((name, ARMS[name][0], steps, max(1, steps // 24)))
        runs = run_together(specs, data, a.work, env, a.val_tokens)
        for (name, _, steps, _), run, c in zip(specs, runs, calib):
            result["arms"][name] = record(name, steps, run, c, pair)
        base = result["arms"]["gpt2-adamw"]["curve"]
        result["target_loss"], result["target_bpb"] = base[-1][2], base[-1][3]
        for arm in result["arms"].values():
            arm["time_to_target"] = time_to(arm["curve"], result["target_loss"])
        save()
    # ablations: equal steps (= equal tokens), so a pair's machine load does not change what is compared
    for pair in abl_pairs:
        wait_quiet(a.wait_quiet, 0.15)
        n = a.ablation_steps
        specs = [(f"abl-{name}", ({**ARMS, **ABLATIONS})[name][0], n, max(1, n // 12)) for name in pair]
        for name, run in zip(pair, run_together(specs, data, a.work, env, a.val_tokens)):
            result["ablations"][name] = record(name, n, run, None, pair)
        save()
    chart(result, a.out.with_suffix(".png"))
    md = markdown(result)
    (ROOT / "bench" / "results_modern.md").write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
