"""``python -m bench``: run every gptforge benchmark and rewrite ``bench/RESULTS.md`` from scratch.

Each benchmark is one of the scripts next to this file, run as a subprocess (so each gets a fresh interpreter
and its own torch thread pool) with fixed flags; each writes JSON under ``bench/out/``. This driver records
what it ran in ``bench/out/suite.json`` (command, start time, seconds, exit status) and renders the report from
those JSON files: machine, date, versions, and per benchmark its method, the numbers, the ratio against the
peer and whether the goal from the issues is met.

    python -m bench                                   # everything (~20 min on 2 CPU cores)
    python -m bench --quick                           # fewer rounds (~8 min)
    python -m bench --only train_tiny generate        # run a subset; the report keeps the other sections'
                                                      # last results (each section says when it was measured)
    python -m bench --quickstart                      # also run `gptforge quickstart --fresh` (~8 min)
    python -m bench --quickstart-summary path/to/summary.json
    python -m bench --report-only                     # re-render RESULTS.md from bench/out/ without running

Set ``GPTFORGE_DATA_DIR`` (offline data) first. All torch benchmarks use ``--threads`` (default: all cores),
the same for gptforge and its peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT = BENCH / "out"
SUITE = OUT / "suite.json"
RESULTS = BENCH / "RESULTS.md"

GOALS = {"train": 1.7, "generate": 2.0, "prepare": 1.8}

TINY = ["--layers", "4", "--dim", "256", "--heads", "4", "--vocab", "4096", "--seq-len", "256", "--batch", "16"]
GPT2_124M = ["--layers", "12", "--dim", "768", "--heads", "12", "--vocab", "50304", "--seq-len", "1024",
             "--batch", "1"]


def commands(quick: bool, threads: int) -> dict[str, dict]:
    """Benchmark name → script, arguments, JSON output and time limit."""
    t = ["--threads", str(threads)]
    py = "bench/"
    return {
        "train_tiny": {
            "argv": [py + "bench_train.py", *TINY, "--precision", "fp32", *t,
                     *(["--steps", "3", "--rounds", "3", "--warmup", "1"] if quick else
                       ["--steps", "4", "--rounds", "5", "--warmup", "2"]),
                     "--out", str(OUT / "train_tiny.json")],
            "json": OUT / "train_tiny.json", "timeout": 900},
        "train_tiny_bf16": {  # a probe: CPU bf16 autocast may be unusably slow without AVX512-BF16/AMX
            "argv": [py + "bench_train.py", *TINY, "--precision", "bf16", *t, "--steps", "1", "--rounds", "1",
                     "--warmup", "0", "--out", str(OUT / "train_tiny_bf16.json")],
            "json": OUT / "train_tiny_bf16.json", "timeout": 120},
        "train_124m": {
            "argv": [py + "bench_train.py", *GPT2_124M, "--precision", "fp32", *t,
                     *(["--steps", "1", "--rounds", "2", "--warmup", "1"] if quick else
                       ["--steps", "2", "--rounds", "3", "--warmup", "1"]),
                     "--out", str(OUT / "train_124m.json")],
            "json": OUT / "train_124m.json", "timeout": 900},
        "generate": {
            "argv": [py + "bench_generate.py", "--presets", "tiny,mini,gpt2", "--batches", "1,16",
                     "--prompt-tokens", "32", "--new-tokens", "32" if quick else "64",
                     "--repeats", "3" if quick else "5", *t, "--out", str(OUT / "generate.json")],
            "json": OUT / "generate.json", "timeout": 900},
        "prepare": {
            "argv": [py + "bench_prepare.py", "--repeat", "4", "--workers", "1", "2",
                     "--rounds", "3" if quick else "5", "--out", str(OUT / "prepare.json"),
                     "--md", ""],  # keep bench/results_prepare.md (the 38.5 MB run)
            "json": OUT / "prepare.json", "timeout": 600},
        "eval": {
            "argv": [py + "bench_eval.py", "--preset", "tiny", "--items", "50" if quick else "100",
                     "--batch-sizes", "1,32", *t, "--out", str(OUT / "eval_hellaswag.json")],
            "json": OUT / "eval_hellaswag.json", "timeout": 900},
        "sft": {
            "argv": [py + "bench_sft.py", "--preset", "tiny", "--steps", "5" if quick else "10",
                     "--batch-size", "8", "--json", str(OUT / "sft.json")],
            "json": OUT / "sft.json", "timeout": 600},
        "load_test": {
            "argv": [py + "load_test.py", "--requests", "100" if quick else "200", "--concurrency", "16",
                     *t, "--out", str(OUT / "load_test.json")],
            "json": OUT / "load_test.json", "timeout": 900},
    }


# ----------------------------------------------------------------------------------------------- running


def run_one(name: str, spec: dict, threads: int, log) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, *spec["argv"]]
    spec["json"].unlink(missing_ok=True)
    log(f"[bench] {name}: {' '.join(spec['argv'])}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=spec["timeout"], capture_output=True, text=True)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.perf_counter() - t0
    (OUT / f"{name}.log").write_text(stdout + "\n--- stderr ---\n" + stderr, encoding="utf-8")
    log(stdout.rstrip())
    if rc != 0:
        log(f"[bench] {name}: exit {rc} after {seconds:.0f} s; last stderr lines:\n"
            + "\n".join(stderr.strip().splitlines()[-8:]))
    return {"command": "python " + " ".join(spec["argv"]), "started": started, "seconds": seconds, "rc": rc,
            "threads": threads, "json": str(spec["json"].relative_to(ROOT)) if spec["json"].exists() else None}


def run_quickstart(out_dir: Path, log) -> dict:
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "gptforge", "quickstart", "--fresh", "--out", str(out_dir)]
    log(f"[bench] quickstart: {' '.join(cmd[1:])}")
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    return {"command": "gptforge quickstart --fresh --out " + str(out_dir.relative_to(ROOT)), "started": started,
            "seconds": time.perf_counter() - t0, "rc": rc, "source": str((out_dir / "summary.json").relative_to(ROOT))}


# ----------------------------------------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram / 2**30 if ram else None, "simd": simd,
            "platform": platform.platform()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "tiktoken", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[mod] = "not installed"
    try:
        out["gptforge"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip() or "?"
    except OSError:
        out["gptforge"] = "?"
    return out


def load(path) -> dict | None:
    try:
        return json.loads((ROOT / path).read_text(encoding="utf-8")) if path else None
    except (OSError, json.JSONDecodeError):
        return None


def verdict(ratio: float, goal: float) -> str:
    return f"**met** (≥ {goal}×)" if ratio >= goal else f"not met (goal ≥ {goal}×)"


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}"


def measured(entry: dict | None) -> str:
    if not entry:
        return "_not measured in this suite run_"
    status = "" if entry["rc"] == 0 else f", exit status {entry['rc']}"
    command = entry["command"].replace(str(ROOT) + os.sep, "")
    threads = "" if "bench_prepare" in command else f", {entry['threads']} torch threads"
    return f"_Measured {entry['started']} with `{command}` ({entry['seconds']:.0f} s{threads}{status})._"


def section_train(suite: dict) -> list[str]:
    lines = ["## Pretraining throughput (gptforge vs transformers)", "",
             "Method (`bench/bench_train.py`): the same model shape in both libraries (no dropout, tied embeddings),"
             " the same random token batches and the same training step: forward with loss, backward, gradient"
             " clipping at 1.0, AdamW step, zero grads. gptforge uses `configure_optimizer` (foreach AdamW on"
             " CPU, fused on CUDA) and SDPA causal attention; `GPT2LMHeadModel` uses SDPA attention and"
             " `torch.optim.AdamW` at its defaults (foreach on CPU). Timed rounds are interleaved (ours, theirs,"
             " theirs, ours, ...) after warm-up steps; the figure is the **median** tokens/s over rounds, the"
             " spread is min–max over rounds. Goal (issue 2): ≥ 1.7× transformers.", "",
             "| config | precision | gptforge tokens/s (spread) | transformers tokens/s (spread) | ratio | goal |",
             "|---|---|---:|---:|---:|---|"]
    notes = []
    for key, label in (("train_tiny", "L4 D256 H4 V4096, T256, B16"),
                       ("train_124m", "GPT-2 124M shape: L12 D768 H12 V50304, T1024, micro-batch 1"),
                       ("train_tiny_bf16", "L4 D256 H4 V4096, T256, B16")):
        entry = suite.get(key)
        data = load(entry and entry.get("json"))
        if not entry:
            continue
        if not data or not data.get("runs"):
            why = "timed out" if entry["rc"] == "timeout" else f"failed (exit {entry['rc']})"
            prec = "bf16 autocast" if "bf16" in key else "fp32"
            lines.append(f"| {label} | {prec} | — | — | — | {why} after {entry['seconds']:.0f} s |")
            if "bf16" in key:
                notes.append(
                    f"bf16 autocast on this CPU: one warm-up-free training step of each model did not finish within"
                    f" {entry['seconds']:.0f} s (model build included). This CPU has no native bf16"
                    " matmul (no AVX512-BF16 / AMX), so autocast falls back to slow conversion paths for both"
                    " libraries; measure bf16 on a GPU or a bf16-capable CPU.")
            continue
        for r in data["runs"]:
            t, rounds = r["tokens_per_s"], r["rounds"]
            goal = "probe (1 step, see note)" if "bf16" in key else verdict(r["speedup"], GOALS["train"])
            lines.append(f"| {label} | {r['precision']}{' + compile' if r['compile'] else ''} "
                         f"| {t['gptforge']:,.0f} ({spread(rounds['gptforge'])}) "
                         f"| {t['transformers']:,.0f} ({spread(rounds['transformers'])}) "
                         f"| {r['speedup']:.2f}× | {goal} |")
        c = data["config"]
        if "bf16" in key:
            notes.append("bf16 row: a probe, not a headline — one step per model without warm-up (each step takes"
                         " tens of seconds). This CPU has no native bf16 matmul (no AVX512-BF16 / AMX), so bf16"
                         " autocast is far slower than fp32 for both libraries (compare the rows); measure bf16 on a GPU or a"
                         " bf16-capable CPU.")
        notes.append(f"{label}: {c['rounds']} rounds × {c['steps']} steps after {c['warmup']} warm-up step(s), "
                     f"{data['machine']['torch_threads']} torch threads. " + measured(entry))
    lines += [""] + [f"- {n}" for n in notes] + [""]
    return lines


def section_generate(suite: dict) -> list[str]:
    entry = suite.get("generate")
    data = load(entry and entry.get("json"))
    lines = ["## Generation (engine vs `GPT2LMHeadModel.generate`)", "",
             "Method (`bench/bench_generate.py`): the same random weights loaded into our `GPT` and into"
             " `GPT2LMHeadModel` (GPT-2 vocabulary, 50,257), greedy decoding, the same mixed-length real-text"
             " prompts (left-padded for HF), the same number of new tokens (end-of-text never stops either side),"
             " fp32. tokens/s = generated tokens / wall time, prefill included. After one warm-up call per side,"
             " timed rounds alternate sides; the figure is the **median** over rounds (spread = min–max). The"
             " last column checks that both produced identical tokens. Goal (issue 5): ≥ 2× HF generate.", ""]
    if not data:
        return lines + [measured(entry), ""]
    lines += [f"{data['prompt_tokens']}-token prompts (mixed lengths), {data['new_tokens']} new tokens, "
              f"{data['repeats']} rounds, {data['threads']} torch threads.", "",
              "| model | batch | gptforge tok/s (spread) | HF generate tok/s (spread) | ratio | goal | identical |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for r in data["runs"]:
        t, rounds = r["tokens_per_s"], r["rounds"]
        lines.append(f"| {r['preset']} ({r['params_m']:.0f}M) | {r['batch']} "
                     f"| {t['gptforge']:,.0f} ({spread(rounds['gptforge'])}) "
                     f"| {t['transformers']:,.0f} ({spread(rounds['transformers'])}) | {r['speedup']:.2f}× "
                     f"| {verdict(r['speedup'], GOALS['generate'])} | {r['identical']}/{r['batch']} |")
    return lines + ["", measured(entry), ""]


def section_prepare(suite: dict) -> list[str]:
    entry = suite.get("prepare")
    data = load(entry and entry.get("json"))
    lines = ["## Corpus preparation and tokenizer training", "",
             "Method (`bench/bench_prepare.py`): corpus = tinyshakespeare + WikiText-2 test (2.4 MB) copied"
             " `--repeat` times, paragraphs as documents, GPT-2 tokenizer. Baseline: one process that loads"
             " `tiktoken`'s `gpt2`, reads, splits and calls `encode_ordinary` on every document (no output)."
             " `gptforge data prepare` is timed end to end (tokenizer load, worker start, read, split, tokenize,"
             " route to train/val, write shards with sha256, manifest); the 1- and 2-worker shards must be"
             " byte-identical. Rounds interleave baseline / 1 worker / 2 workers (order reversed every other"
             " round); the figure is the **median** seconds (spread = min–max). MB/s counts input bytes."
             " Goal (issue 3): ≥ 1.8× the tiktoken loop with 2 workers.", ""]
    if not data:
        return lines + [measured(entry), ""]
    nbytes = data["corpus"]["bytes"]
    base = data["baseline_tiktoken_loop"]
    lines += [f"{nbytes / 1e6:.1f} MB ({data['corpus']['repeat']} copies), {data.get('rounds', 1)} rounds.", "",
              "| method | seconds (spread) | MB/s | M tokens/s | vs tiktoken loop | goal |", "|---|---:|---:|---:|---:|---|"]
    rows = [("plain tiktoken loop, 1 process", base, None)] + [
        (f"`gptforge data prepare`, {w} worker{'s' if w != '1' else ''}", r, w) for w, r in data["prepare"].items()]
    for name, r, w in rows:
        secs = r.get("seconds_rounds", [r["seconds"]])
        ratio = base["seconds"] / r["seconds"]
        goal = verdict(ratio, GOALS["prepare"]) if w == "2" else "—"
        lines.append(f"| {name} | {r['seconds']:.2f} ({min(secs):.2f}–{max(secs):.2f}) | {nbytes / r['seconds'] / 1e6:.2f} "
                     f"| {r['tokens'] / r['seconds'] / 1e6:.2f} | {ratio:.2f}× | {goal} |")
    b = data["bpe_train"]
    lines += ["", f"BPE training (`train_bpe`, streamed) to a {b['vocab_size']:,}-token vocabulary on the 2.4 MB"
              f" corpus: **{b['seconds']:.1f} s** (one run; tiktoken export: {b['tiktoken_export']}).", "",
              measured(entry), ""]
    return lines


def section_eval(suite: dict) -> list[str]:
    entry = suite.get("eval")
    data = load(entry and entry.get("json"))
    lines = ["## Evaluation throughput (HellaSwag)", "",
             "Method (`bench/bench_eval.py`): the first N HellaSwag validation items (offline copy), preset `tiny`"
             " (random weights, GPT-2 vocabulary) loaded into both libraries. gptforge: `evaluate_choice` (the"
             " `gptforge eval choice` code path: the 4 endings share one KV-cached pass over the context, the LM"
             " head is applied only to scored positions), batch 1 and 32. Reference: a per-item `transformers`"
             " loop in the style of nanoGPT's `hellaswag.py` (4 endings per forward, full logits). One warm-up"
             " on 8 items, then one timed pass each; predictions are compared with the reference.", ""]
    if not data:
        return lines + [measured(entry), ""]
    ref = next(r for r in data["results"] if r["impl"].startswith("transformers"))
    lines += [f"{data['items']} items, {data['threads']} torch threads.", "",
              "| implementation | items/s | seconds | vs transformers loop | same predictions as reference |",
              "|---|---:|---:|---:|---:|"]
    for r, agree in zip(data["results"], data["agreement"].values()):
        lines.append(f"| {r['impl']} | {r['items_per_s']:.1f} | {r['seconds']:.1f} "
                     f"| {r['items_per_s'] / ref['items_per_s']:.2f}× | {agree:.0%} |")
    return lines + ["", "No numeric goal in issue 7 (items/s is recorded).", "", measured(entry), ""]


def section_sft(suite: dict) -> list[str]:
    entry = suite.get("sft")
    data = load(entry and entry.get("json"))
    lines = ["## SFT batching", "",
             "Method (`bench/bench_sft.py`): the real instruction data (1,100 conversations, chat style, GPT-2"
             " tokenizer, max length 256), preset `tiny`, plain AdamW; each batching mode trains a fresh model for"
             " the same number of optimizer steps (2 warm-up steps excluded) and reports the fraction of input"
             " positions that are padding and supervised (answer) tokens per second.", ""]
    if not data:
        return lines + [measured(entry), ""]
    pad = next((r for r in data if r["mode"] == "pad"), data[0])
    lines += ["| batching | padding fraction | examples per step | s per step | supervised tokens/s | vs pad |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in data:
        lines.append(f"| {r['mode']} | {r['padding_fraction']:.3f} | {r['examples_per_step']:.1f} "
                     f"| {r['s_per_step']:.3f} | {r['supervised_tokens_per_s']:,.0f} "
                     f"| {r['supervised_tokens_per_s'] / pad['supervised_tokens_per_s']:.2f}× |")
    return lines + ["", "One timed pass per mode (indicative; no numeric goal).", "", measured(entry), ""]


def section_load(suite: dict) -> list[str]:
    entry = suite.get("load_test")
    data = load(entry and entry.get("json"))
    lines = ["## Server load test", "",
             "Method (`bench/load_test.py`): `gptforge serve` in a subprocess on loopback with a random `mini`"
             " model (GPT-2 vocabulary, context 256); N requests, 16 concurrent, about 3 valid ones (completions,"
             " chat, streamed chat; 8–48 new tokens) for each invalid one (bad JSON, wrong types, unknown model,"
             " empty messages, out-of-range `max_tokens`, a prompt over the context, `n` 0). Latency percentiles"
             " over the valid requests (all answered 200); tokens/s = generated tokens / wall time of the whole run. Pass:"
             " no 5xx, every invalid request a 4xx with an OpenAI error object, every valid one a 200.", ""]
    if not data:
        return lines + [measured(entry), ""]
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(data["status_codes"].items()))
    lines += ["| requests | valid | status codes | 5xx / failed | unexpected | p50 latency | p99 latency |"
              " generated tokens/s | wall |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
              f"| {data['requests']} | {data['valid']} | {codes} | {data['failures']} | {data['unexpected']} "
              f"| {data['p50_s']:.2f} s | {data['p99_s']:.2f} s | {data['tokens_per_s']:,.0f} | {data['wall_s']:.1f} s |",
              "", measured(entry), ""]
    return lines


def section_quickstart(suite: dict) -> list[str]:
    entry = suite.get("quickstart")
    lines = ["## Quickstart wall time", "",
             "`gptforge quickstart --fresh` (tokenizer → data → pretrain → SFT → eval → samples → report, CPU-sized"
             " defaults), per-stage seconds from its `summary.json` (`timings`).", ""]
    data = load(entry and entry.get("source")) if entry else None
    if not data:
        return lines + ["_No quickstart summary available: run `python -m bench --quickstart` or pass"
                        " `--quickstart-summary`._", ""]
    timings = data.get("timings", {})
    lines += ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    total = data.get("wall_seconds") or sum(timings.values())
    lines.append(f"| **total (wall)** | **{total:.1f}** ({total / 60:.1f} min) |")
    pre = data.get("pretrain", {})
    if pre:
        lines += ["", f"Pretraining: {pre.get('steps')} steps, {pre.get('tokens', 0):,} tokens, "
                  f"{pre.get('tokens_per_second', 0):,.0f} tokens/s; final val loss {pre.get('final_val_loss', 0):.3f}."]
    ev = data.get("eval", {})
    rows = [(k, v) for k, v in ev.items() if isinstance(v, dict)]
    if rows:
        lines += ["", "| checkpoint | val loss | perplexity | bits/byte | HellaSwag acc | acc_norm | items | items/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, v in rows:
            lines.append(f"| {k} | {v.get('loss', float('nan')):.3f} | {v.get('perplexity', float('nan')):.1f} "
                         f"| {v.get('bits_per_byte', float('nan')):.3f} | {v.get('hellaswag_acc', float('nan')):.3f} "
                         f"| {v.get('hellaswag_acc_norm', float('nan')):.3f} | {v.get('hellaswag_items', '')} "
                         f"| {v.get('hellaswag_items_per_second', float('nan')):.0f} |")
    src = entry.get("source")
    how = (f"Measured by this suite: `{entry['command']}` started {entry['started']} ({entry['seconds']:.0f} s)."
           if entry.get("command") else
           f"Numbers taken from an earlier quickstart run's summary (`{entry.get('origin', src)}`, file modified"
           f" {entry['started']}),"
           " not re-run by this suite.")
    return lines + ["", how, ""]


def summary_table(suite: dict) -> list[str]:
    rows = []

    def add(what, ours, peer, ratio, goal):
        rows.append(f"| {what} | {ours} | {peer} | {ratio:.2f}× | {verdict(ratio, goal) if goal else '—'} |")

    for key, label in (("train_tiny", "training, tiny L4 D256 T256 B16, fp32"),
                       ("train_124m", "training, GPT-2 124M T1024 B1, fp32")):
        d = load(suite.get(key, {}).get("json"))
        for r in (d or {}).get("runs", []):
            add(label, f"{r['tokens_per_s']['gptforge']:,.0f} tok/s", f"{r['tokens_per_s']['transformers']:,.0f} tok/s",
                r["speedup"], GOALS["train"])
    d = load(suite.get("generate", {}).get("json"))
    for r in (d or {}).get("runs", []):
        add(f"generation, {r['preset']}, batch {r['batch']}", f"{r['tokens_per_s']['gptforge']:,.0f} tok/s",
            f"{r['tokens_per_s']['transformers']:,.0f} tok/s", r["speedup"], GOALS["generate"])
    d = load(suite.get("prepare", {}).get("json"))
    if d:
        nbytes, base = d["corpus"]["bytes"], d["baseline_tiktoken_loop"]["seconds"]
        for w, r in d["prepare"].items():
            add(f"data prepare, {w} worker{'s' if w != '1' else ''}", f"{nbytes / r['seconds'] / 1e6:.2f} MB/s",
                f"{nbytes / base / 1e6:.2f} MB/s", base / r["seconds"], GOALS["prepare"] if w == "2" else None)
    d = load(suite.get("eval", {}).get("json"))
    if d:
        ref = next(r for r in d["results"] if r["impl"].startswith("transformers"))
        best = max((r for r in d["results"] if r is not ref), key=lambda r: r["items_per_s"])
        add(f"HellaSwag eval ({best['impl']})", f"{best['items_per_s']:.1f} items/s", f"{ref['items_per_s']:.1f} items/s",
            best["items_per_s"] / ref["items_per_s"], None)
    if not rows:
        return []
    return ["## Summary", "", "| benchmark | gptforge | peer | ratio | goal |", "|---|---:|---:|---:|---|", *rows, ""]


NOTES = """## Reading the numbers (2-core AVX2 CPU, fp32)

- Where the goals are missed, both sides run the same fp32 matmul kernels and those dominate: a tiny training
  step is ~75 % `mm`/`addmm` + SDPA for both libraries (torch.profiler), and decoding with the GPT-2 vocabulary
  reads the 50,257-row LM head every token (memory-bound, ~1.3 ms per token at batch 1 for both). gptforge
  wins only the overheads: tanh-GELU as one kernel instead of HF's composed `gelu_new` (mul/pow/tanh, ~10 % of
  HF's step), no attention-mask construction, a preallocated KV cache, LM head only on the positions needed.
  That gives 1.2–1.4× at small sizes and ~1.0–1.3× at 124M; ≥ 1.7× (training) or ≥ 2× (generation) is not
  reachable here without changing numerics (bf16 has no native matmul on this CPU, see above).
- Data preparation: the 2-worker run shares 2 cores with the main process (read, split, route, sha256, write),
  so it cannot approach 2× here; `prepare` with 1 worker does more than the baseline loop and is slower than
  it. cProfile of the 1-worker run (9.6 MB, ~34k documents): tiktoken's own encoding ~1.0 s of ~2.0 s; the rest is
  per-document Python work the baseline does not do — the train/val hash per document (~0.16 s), numpy
  conversion and concatenation (~0.23 s), reading/splitting into pieces (~0.27 s), tokenizer load (~0.16 s).
  With 2 workers that main-process work (plus routing and writing) competes with the workers for the 2 cores.
- Re-runs on a shared VM host vary: an earlier suite run the same evening (nothing else running inside the
  VM) measured 2.5–3× lower absolute figures for training (e.g. 952 vs 3,094 tokens/s tiny, 44 vs 111 at
  124M) while the ratios stayed similar (1.18×, 1.06×). Compare ratios, not absolute numbers, across runs.
""".splitlines()


def render(suite: dict) -> str:
    m, v = machine_info(), versions()
    threads = sorted({e.get("threads") for e in suite.values() if e.get("threads")})
    lines = ["# gptforge benchmark results", "",
             "Generated by `python -m bench` (see `bench/__main__.py`); do not edit by hand — re-run it instead.", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (each section says when it was measured)",
             f"- Machine: {m['cpu']}, {m['cores']} cores, "
             f"{m['ram_gb']:.0f} GiB RAM" if m["ram_gb"] else f"- Machine: {m['cpu']}, {m['cores']} cores",
             f"- SIMD: {', '.join(m['simd']) or 'none detected'} (no AVX512-BF16/AMX means no native bf16 matmul)"
             if not {"avx512_bf16", "amx_bf16"} & set(m["simd"]) else f"- SIMD: {', '.join(m['simd'])}",
             "- GPU: none" if not _has_cuda() else "- GPU: yes (see per-benchmark device)",
             f"- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- Torch threads: {', '.join(map(str, threads)) or '?'} for both gptforge and its peer in every"
             " comparison (set with `--threads` / `OMP_NUM_THREADS`). No other jobs ran in this VM during the"
             " suite, but the 2-core VM shares its host: rounds are interleaved so both sides see the same"
             " conditions, and the spreads show how stable each measurement was.",
             ""]
    lines += summary_table(suite)
    for section in (section_train, section_generate, section_prepare, section_eval, section_sft, section_load,
                    section_quickstart):
        lines += section(suite)
    lines += NOTES
    for extra in sorted(BENCH.glob("results_*.md")):  # dated results of one-off comparisons (bench_loop.py)
        lines += ["", *extra.read_text(encoding="utf-8").splitlines()]
    return "\n".join(lines).rstrip() + "\n"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    names = list(commands(False, 1))
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME", help="run only these: " + ", ".join(names))
    ap.add_argument("--skip", nargs="+", choices=names, metavar="NAME", default=[], help="skip these")
    ap.add_argument("--quick", action="store_true", help="fewer rounds / items")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for both sides of every comparison (default: all cores)")
    ap.add_argument("--quickstart", action="store_true",
                    help="also run `gptforge quickstart --fresh --out bench/out/quickstart` (~8 min on 2 cores)")
    ap.add_argument("--quickstart-summary", default=None,
                    help="take the quickstart timings from this summary.json instead of bench/out/quickstart")
    ap.add_argument("--report-only", action="store_true", help="only re-render RESULTS.md from bench/out/")
    ap.add_argument("--fresh", action="store_true",
                    help="forget earlier results in bench/out/suite.json (default: sections not re-run keep them)")
    args = ap.parse_args(argv)
    if not os.environ.get("GPTFORGE_DATA_DIR"):
        guess = ROOT.parent / "shared" / "data"
        if guess.is_dir():
            os.environ["GPTFORGE_DATA_DIR"] = str(guess)
        else:
            ap.error("set GPTFORGE_DATA_DIR to the offline data directory")
    data = Path(os.environ["GPTFORGE_DATA_DIR"])
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data / "tokenizers" / "gpt2" / "tiktoken_cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)

    suite = {} if args.fresh else (load(SUITE.relative_to(ROOT)) or {})

    def log(msg):
        print(msg, flush=True)

    if not args.report_only:
        specs = commands(args.quick, args.threads)
        selected = [n for n in (args.only or names) if n not in args.skip]
        t0 = time.perf_counter()
        for name in selected:
            suite[name] = run_one(name, specs[name], args.threads, log)
            SUITE.write_text(json.dumps(suite, indent=2), encoding="utf-8")
        if args.quickstart:
            suite["quickstart"] = run_quickstart(OUT / "quickstart", log)
        log(f"[bench] total {time.perf_counter() - t0:.0f} s")
    if args.quickstart_summary:
        src = Path(args.quickstart_summary).resolve()
        dest = OUT / "quickstart_summary.json"
        shutil.copyfile(src, dest)
        suite["quickstart"] = {"source": str(dest.relative_to(ROOT)),
                               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(src.stat().st_mtime)),
                               "origin": str(src)}
    elif "quickstart" not in suite and (OUT / "quickstart" / "summary.json").exists():
        p = OUT / "quickstart" / "summary.json"
        suite["quickstart"] = {"source": str(p.relative_to(ROOT)),
                               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(p.stat().st_mtime))}
    SUITE.write_text(json.dumps(suite, indent=2), encoding="utf-8")
    RESULTS.write_text(render(suite), encoding="utf-8")
    log(f"[bench] wrote {RESULTS.relative_to(ROOT)}")
    failed = [n for n, e in suite.items() if e.get("rc") not in (0, None) and n != "train_tiny_bf16"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
