"""Training-loop throughput before vs after a refactor: ``gptforge pretrain`` (and optionally ``gptforge sft``)
timed end to end, through subprocesses, for two source trees on the same machine in the same run.

What it compares: the same CLI command, the same data and the same config, run once with
``PYTHONPATH=<before>/src`` and once with ``PYTHONPATH=<after>/src`` (the same Python and venv), for each
``--train.precision`` asked for (default ``fp32`` and ``auto``). It was written for the training-core refactor:
``dd941c2`` (three separate loops, ``auto`` = fp32 on CPU) vs ``HEAD`` (one core in ``train/core.py``, ``auto`` =
bf16 autocast on CPUs with AMX or AVX512-BF16). So ``fp32`` rows measure the loop itself, ``auto`` rows measure
what a user gets by default (on a bf16-capable CPU: the new bf16 gain).

Method: runs are interleaved in rounds (round 0: before, after; round 1: after, before; ... per precision) so
machine drift hits both trees alike. Each run gets a fresh ``--name``. The figure per run is the median of the
per-step ``tokens_per_s`` in its ``metrics.jsonl`` after the first ``--skip`` steps (both trees write it per
step; the old tree numbers ``step`` from 0, the new from 1, so records are taken in file order); wall time of
the whole subprocess is recorded too. The table shows, per config and precision, the median over runs, the
min-max spread over runs, and the ratio after/before of the medians. Before each run the script waits until the
machine is idle, and it measures how much CPU other processes took during the run; a run disturbed by more than
``--max-foreign`` of the cores is kept in the JSON but left out of the table and re-run. For SFT the figure is
training tokens/s between the step-1 and the last step-multiple-of-10 records (``tokens`` / ``elapsed_s``, which
both trees log), since the old SFT loop does not log per-step throughput. Torch threads: ``OMP_NUM_THREADS`` =
``--threads`` for every run. The CPU model and its avx2 / avx512_bf16 / amx_bf16 / amx_tile flags are printed
with every result.

Prepare the data once and make read-only copies of both trees (pin the new one too when someone is editing
``src/`` meanwhile), then run from the repo root with the venv active::

    git worktree add /tmp/gptforge-before dd941c2
    git worktree add /tmp/gptforge-after HEAD
    PYTHONPATH=src python -m gptforge data prepare $GPTFORGE_DATA_DIR/pretrain/tinyshakespeare.txt \\
        --tokenizer gpt2 --out /tmp/bench-shards
    python bench/bench_loop.py --before /tmp/gptforge-before/src --after /tmp/gptforge-after/src \\
        --configs tiny256:4,l4d256:3 --sft --sft-rounds 5 --out bench/out/loop.json
    # the quickstart's model on the quickstart's 4k-BPE shards (<quickstart --out>/data):
    python bench/bench_loop.py ... --data /tmp/qs-old/data --configs mini:5 --out bench/out/loop_mini.json
    # SFT alone, a longer timed window, from a given checkpoint:
    python bench/bench_loop.py ... --configs "" --sft --sft-limit 1000 --sft-checkpoint RUN/ckpt/step_N \\
        --out bench/out/loop_sft1000.json

It writes ``--out`` (JSON, rewritten after every run, so a cut-short run keeps what it measured) and the markdown
table next to it (``.md``), and prints the table. Run nothing else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # the "tiny" preset (L2 D64 H2) with a 256-token context; vocab = the data's tokenizer (GPT-2, 50,257)
    "tiny256": {"args": ["--model.preset=tiny", "--model.block_size=256"], "seq_len": 256, "micro_batch": 16,
                "steps": 40, "label": "tiny preset L2 D64 H2, T256 B16, vocab 50,257"},
    # the quickstart's model: "mini" preset (L4 D128 H4) on its 4,096-token BPE (--data <quickstart out>/data)
    "mini": {"args": ["--model.preset=mini"], "seq_len": 256, "micro_batch": 16, "steps": 60,
             "label": "mini preset L4 D128 H4, T256 B16, vocab of --data (quickstart: 4,096)"},
    # L4 D256 H4, as in bench_train.py, on GPT-2 tokens (the 50,257-row head dominates the FLOPs)
    "l4d256": {"args": ["--model.preset=tiny", "--model.n_layer=4", "--model.n_embd=256", "--model.n_head=4",
                           "--model.block_size=256"], "seq_len": 256, "micro_batch": 16, "steps": 15,
               "label": "L4 D256 H4, T256 B16, vocab 50,257"},
}


# ---- the machine ------------------------------------------------------------------------------------------------


def cpu_info() -> dict:
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("?", "", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    info = {"model": model, "cores": os.cpu_count(), "flags": {k: k in flags for k in wanted}}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_avx512_bf16"] = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: None)())
        info["torch_amx_tile"] = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)())
    except Exception as e:  # noqa: BLE001 - the benchmark itself only needs subprocesses
        info["torch"] = f"unavailable ({e})"
    return info


def cpu_line(info: dict) -> str:
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["flags"].items())
    return (f"CPU: {info['model']}, {info['cores']} cores; /proc/cpuinfo flags: {flags}; torch {info.get('torch')} "
            f"(capability {info.get('torch_cpu_capability')}, avx512_bf16 {info.get('torch_avx512_bf16')}, "
            f"amx_tile {info.get('torch_amx_tile')})")


# ---- the trees --------------------------------------------------------------------------------------------------


def _git(src: Path, *args: str) -> str | None:
    try:  # --no-optional-locks: never write the index of a tree someone else is editing
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(src), *args], check=False,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def tree_state(src: Path) -> dict:
    """The commit of a source tree and a fingerprint of its uncommitted changes (read-only git)."""
    head = _git(src, "rev-parse", "HEAD")
    diff = _git(src, "diff", "HEAD", "--", ".")
    stat = _git(src, "diff", "HEAD", "--shortstat", "--", ".")
    return {"path": str(src), "commit": head.strip() if head else None,
            "uncommitted": bool(diff), "diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
            "diff_shortstat": stat.strip() if stat else None}


def check_import(src: Path, env: dict) -> str:
    """Import gptforge with PYTHONPATH=src from a neutral cwd; fail unless it comes from that tree."""
    out = subprocess.run([sys.executable, "-c", "import gptforge; print(gptforge.__file__)"], env=env,
                         cwd="/tmp", capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    if not Path(path).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"PYTHONPATH={src} imports gptforge from {path}, not from that tree")
    return path


def base_env(src: Path, threads: int) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env.setdefault("GPTFORGE_DATA_DIR", "/work/shared/data")
    cache = Path(env["GPTFORGE_DATA_DIR"]) / "tokenizers/gpt2/tiktoken_cache"
    if cache.is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(cache))
    return env


# ---- one run ----------------------------------------------------------------------------------------------------


def _precision_from_log(text: str) -> str | None:
    m = re.search(r"^device \S+ × \d+; precision (.+)$", text, re.MULTILINE)  # new tree
    if m:
        return m.group(1).strip()
    m = re.search(r"^training [\d,]+ parameters on \S+ × \d+ \((.+)\): ", text, re.MULTILINE)  # both trees
    if m:
        return m.group(1).strip()
    m = re.search(r"SFT done: .* \((fp32|bf16|fp16)\)", text)  # new SFT
    return m.group(1) if m else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _busy_s() -> float:
    """CPU-seconds the whole machine has spent busy (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait (up to ``max_wait`` s) until the machine is idle: busy share of all cores < ``threshold`` over 3 s.

    Other people's jobs on a 2-core VM (a test suite, say) would otherwise land on one side of the comparison.
    """
    t0, said = time.monotonic(), False
    while True:
        b0 = _busy_s()
        time.sleep(3)
        share = (_busy_s() - b0) / 3 / (os.cpu_count() or 1)
        waited = time.monotonic() - t0
        if share < threshold or waited >= max_wait:
            if said:
                print(f"    ... machine {'quiet' if share < threshold else 'still busy'} after {waited:.0f}s "
                      f"(busy {share:.0%})", flush=True)
            return round(waited, 1)
        if not said:
            print(f"    waiting for the machine to be quiet (busy {share:.0%} of {os.cpu_count()} cores, "
                  f"not started by this benchmark)", flush=True)
            said = True


LAST_WAIT = {"s": 0.0}


def run_cmd(cmd: list[str], env: dict, log_path: Path) -> tuple[int, float, str, dict]:
    """Run one command; also measure how much CPU *other* processes used meanwhile (machine busy − our child)."""
    b0, c0 = _busy_s(), _children_cpu_s()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=False, env=env, cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    wall = time.perf_counter() - t0
    child, busy = _children_cpu_s() - c0, _busy_s() - b0
    foreign = max(0.0, busy - child)
    log_path.write_text(out.stdout)
    load = {"child_cpu_s": round(child, 1), "foreign_cpu_s": round(foreign, 1),
            "foreign_share": round(foreign / (wall * (os.cpu_count() or 1)), 3), "waited_s": LAST_WAIT["s"],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    return out.returncode, wall, out.stdout, load


def pretrain_run(src: Path, side: str, config: str, precision: str, name: str, a) -> dict:
    c = CONFIGS[config]
    steps = a.steps or c["steps"]
    cmd = [sys.executable, "-m", "gptforge", "pretrain", *c["args"], f"--data.path={a.data}",
           f"--data.seq_len={c['seq_len']}", f"--train.micro_batch={c['micro_batch']}", f"--train.max_steps={steps}",
           f"--train.precision={precision}", "--eval.interval=0", "--eval.sample_tokens=8",
           "--checkpoint.interval=0", "--log.progress=false", "--log.plot=false", f"--name={name}",
           f"--out_dir={a.runs}"]
    rc, wall, text, load = run_cmd(cmd, base_env(src, a.threads), Path(a.runs) / f"{name}.log")
    records = [r for r in _read_jsonl(Path(a.runs) / name / "metrics.jsonl") if "tokens_per_s" in r]
    timed = [r["tokens_per_s"] for r in records[a.skip:]]
    finals = [r for r in _read_jsonl(Path(a.runs) / name / "metrics.jsonl") if "val_loss" in r]
    return {"stage": "pretrain", "config": config, "side": side, "precision_asked": precision,
            "precision_used": _precision_from_log(text), "name": name, "rc": rc, "wall_s": round(wall, 2),
            **load, "steps": len(records), "timed_steps": len(timed),
            "tokens_per_s": statistics.median(timed) if timed else None,
            "tokens_per_s_steps": [round(x, 1) for x in timed],
            "final_loss": records[-1]["loss"] if records else None,
            "final_val_loss": finals[-1]["val_loss"] if finals else None,
            "cmd": " ".join(["PYTHONPATH=" + str(src), f"OMP_NUM_THREADS={a.threads}"] + cmd[1:]),
            "tail": text.strip().splitlines()[-1][-400:] if rc and text.strip() else None}


def sft_run(src: Path, side: str, precision: str, name: str, checkpoint: str, a) -> dict:
    cmd = [sys.executable, "-m", "gptforge", "sft", "--checkpoint", checkpoint, "--data", a.sft_data,
           "--limit", str(a.sft_limit), "--lr", "1e-4", "--epochs", "1", "--batch-size", "8", "--no-test-responses",
           "--device", "cpu", "--name", name, "--out-dir", str(a.runs), f"--train.precision={precision}"]
    rc, wall, text, load = run_cmd(cmd, base_env(src, a.threads), Path(a.runs) / f"{name}.log")
    recs = [r for r in _read_jsonl(Path(a.runs) / name / "metrics.jsonl") if "elapsed_s" in r and "tokens" in r]
    by_step = {r["step"]: r for r in recs}
    tok_s, span = None, None
    if 1 in by_step:
        last = max((s for s in by_step if s % 10 == 0), default=None)
        if last and by_step[last]["elapsed_s"] > by_step[1]["elapsed_s"]:
            tok_s = ((by_step[last]["tokens"] - by_step[1]["tokens"])
                     / (by_step[last]["elapsed_s"] - by_step[1]["elapsed_s"]))
            span = [1, last]
    vals = [r["val_loss"] for r in _read_jsonl(Path(a.runs) / name / "metrics.jsonl") if "val_loss" in r]
    used = _precision_from_log(text)
    if used is None and precision in ("auto", "fp32"):
        used = "fp32 (not printed; the old SFT loop resolves auto to fp32 on CPU)"
    return {"stage": "sft", "config": f"sft-limit{a.sft_limit}", "side": side, "precision_asked": precision,
            "precision_used": used, "name": name, "rc": rc, "wall_s": round(wall, 2), **load,
            "steps": max(by_step, default=0), "timed_span_steps": span, "tokens_per_s": tok_s,
            "final_val_loss": vals[-1] if vals else None,
            "cmd": " ".join(["PYTHONPATH=" + str(src), f"OMP_NUM_THREADS={a.threads}"] + cmd[1:]),
            "tail": text.strip().splitlines()[-1][-400:] if rc and text.strip() else None}


# ---- the summary ------------------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> list[dict]:
    rows, keys = [], []
    for r in runs:
        k = (r["stage"], r["config"], r["precision_asked"])
        if k not in keys:
            keys.append(k)
    for stage, config, prec in keys:
        row = {"stage": stage, "config": config, "precision": prec}
        for side in ("before", "after"):
            rs = [r for r in runs if (r["stage"], r["config"], r["precision_asked"], r["side"]) == (stage, config, prec,
                                                                                                     side)]
            ok = [r for r in rs if r["rc"] == 0 and r["tokens_per_s"] and not r.get("disturbed")]
            tps = [r["tokens_per_s"] for r in ok]
            walls = [r["wall_s"] for r in ok]
            row[side] = {"runs": len(rs), "ok": len(ok),
                         "tokens_per_s_median": statistics.median(tps) if tps else None,
                         "tokens_per_s_min": min(tps, default=None), "tokens_per_s_max": max(tps, default=None),
                         "wall_s_median": statistics.median(walls) if walls else None,
                         "wall_s_min": min(walls, default=None), "wall_s_max": max(walls, default=None),
                         "precision_used": sorted({str(r["precision_used"]) for r in rs}),
                         "disturbed": sum(bool(r.get("disturbed")) for r in rs),
                         "max_foreign_share": max((r.get("foreign_share", 0) for r in ok), default=None)}
        b, f = row["before"]["tokens_per_s_median"], row["after"]["tokens_per_s_median"]
        row["ratio_after_before"] = f / b if b and f else None
        bw, fw = row["before"]["wall_s_median"], row["after"]["wall_s_median"]
        row["wall_ratio_after_before"] = fw / bw if bw and fw else None
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    def tps(s):
        if s["tokens_per_s_median"] is None:
            return "—"
        return f"{s['tokens_per_s_median']:,.0f} ({s['tokens_per_s_min']:,.0f}–{s['tokens_per_s_max']:,.0f})"

    def wall(s):
        if s["wall_s_median"] is None:
            return "—"
        return f"{s['wall_s_median']:.1f} ({s['wall_s_min']:.1f}–{s['wall_s_max']:.1f})"

    lines = [f"- {cpu_line(result['cpu'])}",
             (f"- Date: {result['started']} → {result['finished'] or '(running)'}; {result['threads']} torch "
              f"threads (OMP_NUM_THREADS) on both sides; python {result['python']}"),
             f"- before: {json.dumps(result['trees']['before'])}", f"- after: {json.dumps(result['trees']['after'])}",
             ""]
    for c in sorted({r["config"] for r in result["summary"]}):
        if c in CONFIGS:
            lines.append(f"- `{c}`: {CONFIGS[c]['label']}, {result['steps'].get(c)} steps, median of per-step "
                         f"tokens/s after the first {result['skip']} steps")
    lines += ["", ("| stage | config | --train.precision | used (before → after) | before tok/s median (min–max) "
                   "| after tok/s median (min–max) | after/before | wall s before | wall s after "
                   "| counted runs b · a | max other-CPU |"),
              "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for row in result["summary"]:
        b, f = row["before"], row["after"]
        used = f"{', '.join(b['precision_used'])} → {', '.join(f['precision_used'])}"
        ratio = "—" if row["ratio_after_before"] is None else f"{row['ratio_after_before']:.3f}×"
        lines.append(f"| {row['stage']} | {row['config']} | {row['precision']} | {used} | {tps(b)} | {tps(f)} | "
                     f"{ratio} | {wall(b)} | {wall(f)} | {b['ok']} · {f['ok']} "
                     f"({b['disturbed'] + f['disturbed']} re-run) | "
                     f"{max(b['max_foreign_share'] or 0, f['max_foreign_share'] or 0):.0%} |")
    lines += ["", ("_max other-CPU: the largest share of the machine's cores that processes not started by this "
                   "benchmark used during any one counted run of the row (machine busy time from /proc/stat minus "
                   f"the run's own CPU time). Runs above --max-foreign ({result['max_foreign']:.0%}) are flagged "
                   "'disturbed', kept in the JSON, left out of the table and re-run._")]
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--before", type=Path, default=Path("/tmp/gptforge-before/src"), help="old tree's src/")
    p.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1] / "src", help="new tree's src/")
    p.add_argument("--data", default="/tmp/bench-shards", help="prepared shards (gptforge data prepare, gpt2)")
    p.add_argument("--runs", default="/tmp/bench-runs", help="--out_dir of the runs (left in place)")
    p.add_argument("--configs", default="tiny256",
                   help=f"comma-separated, of: {', '.join(CONFIGS)}; NAME:ROUNDS overrides --rounds for one")
    p.add_argument("--precisions", default="fp32,auto")
    p.add_argument("--rounds", type=int, default=3, help="runs per tree, precision and config")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per config)")
    p.add_argument("--skip", type=int, default=5, help="steps left out of the median (warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sft", action="store_true", help="also time gptforge sft (after the pretraining rounds)")
    p.add_argument("--sft-rounds", type=int, default=5)
    p.add_argument("--sft-limit", type=int, default=200)
    p.add_argument("--sft-data", default=str(Path(os.environ.get("GPTFORGE_DATA_DIR", "/work/shared/data"))
                                             / "instruct/instruction-data.json"))
    p.add_argument("--sft-checkpoint", default=None,
                   help="base model for SFT (default: the final checkpoint of the first 'before' pretrain run)")
    p.add_argument("--quiet-threshold", type=float, default=0.15,
                   help="before each run, wait until the machine's busy share is below this (0 = don't wait)")
    p.add_argument("--max-foreign", type=float, default=0.05,
                   help="a run during which other processes used more than this share of the cores is flagged "
                        "'disturbed', left out of the summary and re-run")
    p.add_argument("--retries", type=int, default=3, help="re-runs of a disturbed slot")
    p.add_argument("--max-wait", type=float, default=1800, help="longest wait for quiet before one run, seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "loop.json")
    a = p.parse_args()

    a.before, a.after = a.before.resolve(), a.after.resolve()
    Path(a.runs).mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    trees = {"before": a.before, "after": a.after}
    imports = {side: check_import(src, base_env(src, a.threads)) for side, src in trees.items()}
    configs = [c.split(":")[0] for c in a.configs.split(",") if c]
    rounds = {c.split(":")[0]: int(c.split(":")[1]) if ":" in c else a.rounds for c in a.configs.split(",") if c}
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    precisions = [x for x in a.precisions.split(",") if x]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    result = {"started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "finished": None,
              "cpu": cpu_info(), "python": platform.python_version(), "threads": a.threads, "skip": a.skip,
              "max_foreign": a.max_foreign,
              "steps": {c: a.steps or CONFIGS[c]["steps"] for c in configs}, "rounds": rounds,
              "trees": {side: {**tree_state(src), "imports": imports[side]} for side, src in trees.items()},
              "argv": sys.argv, "runs": [], "summary": []}
    print(cpu_line(result["cpu"]), flush=True)
    for side, t in result["trees"].items():
        print(f"{side}: {t['imports']} (commit {t['commit']}, uncommitted: {t['diff_shortstat'] or 'none'})",
              flush=True)

    def save():
        result["summary"] = summarize(result["runs"])
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        a.out.with_suffix(".md").write_text(markdown(result))

    def quiet():
        LAST_WAIT["s"] = wait_quiet(a.max_wait, a.quiet_threshold) if a.quiet_threshold > 0 else 0.0

    def record(r: dict) -> bool:
        """Keep the run; True when other processes disturbed it (it is kept, flagged, and the slot is re-run)."""
        r["tree_state"] = tree_state(trees[r["side"]]) if r["side"] == "after" else None
        r["disturbed"] = r["foreign_share"] > a.max_foreign
        result["runs"].append(r)
        tps = "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        print(f"  {r['stage']:8s} {r['config']:14s} {r['precision_asked']:4s} {r['side']:6s} rc={r['rc']} "
              f"{tps:>7s} tok/s  wall {r['wall_s']:6.1f}s  other-CPU {r['foreign_share']:.0%}  "
              f"used: {r['precision_used']}"
              + (f"  ERROR: {r['tail']}" if r["rc"] else "")
              + ("  (disturbed by other processes: not counted, re-run)" if r["disturbed"] else ""), flush=True)
        save()
        return r["disturbed"]

    n = 0

    def interleaved(n_rounds: int, label: str, run) -> None:
        """Rounds alternating which side goes first; a disturbed run is retried up to --retries times."""
        nonlocal n
        for rnd in range(n_rounds):
            order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
            for prec in precisions:
                for side in order:
                    for _attempt in range(a.retries + 1):
                        n += 1
                        quiet()
                        if not record(run(side, prec, f"{stamp}-{n:03d}-{label}-{prec}-{side}")):
                            break

    for config in configs:
        interleaved(rounds[config], config,
                    lambda side, prec, name, config=config: pretrain_run(trees[side], side, config, prec, name, a))

    if a.sft:
        ckpt = a.sft_checkpoint
        if ckpt is None:
            first = next((r for r in result["runs"] if r["side"] == "before" and r["rc"] == 0), None)
            ckpt = str(Path(a.runs) / first["name"] / "ckpt" / "latest") if first else None
            if ckpt and Path(ckpt).is_file():  # 'latest' may be a pointer file naming the step directory
                ckpt = str(Path(a.runs) / first["name"] / "ckpt" / Path(ckpt).read_text().strip())
        if not ckpt:
            raise SystemExit("--sft needs --sft-checkpoint or a successful 'before' pretrain run")
        result["sft_checkpoint"] = str(Path(ckpt).resolve())
        interleaved(a.sft_rounds, "sft",
                    lambda side, prec, name: sft_run(trees[side], side, prec, name, result["sft_checkpoint"], a))

    result["finished"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    save()
    print()
    print(markdown(result))
    print(f"wrote {a.out} and {a.out.with_suffix('.md')}; runs in {a.runs}")
    if shutil.which("git") is None:
        print("(git not found: tree commits not recorded)")


if __name__ == "__main__":
    main()
