"""Corpus preparation: `gptforge data prepare` with 1 and N workers vs a plain tiktoken loop, start-up included.

Corpus: tinyshakespeare + WikiText-2 test (2.4 MB, offline copies) copied ``--repeat`` times (default 16:
38.5 MB) into a temporary directory; paragraphs (blank-line separated) are the documents. Every measurement
is a fresh process, timed from spawn to exit, so interpreter start-up, imports and vocabulary loading count:

* loop — ``tiktoken.get_encoding("gpt2")``, then per file: read, split into paragraphs (prepare's rule),
  ``encode_ordinary`` every document into one Python list with an end-of-text before each, and at the end
  ``numpy.array(ids, uint16).tofile(...)``: what a typical hand-written prepare script does;
* prepare W — ``python -m gptforge data prepare FILES --text-sep blank --tokenizer gpt2 --out DIR --workers W
  --overwrite`` (progress bar on, to /dev/null): read, split, tokenize, hash split, shards with sha256,
  checkpoints, manifest, histogram, summary. Shards must be byte-identical for every W, and the loop must
  count the same tokens.

Rounds interleave the methods (the order rotates every round); medians are reported with min–max. Peak RSS
is each child's own ``ru_maxrss`` (``os.wait4``). Start-up is measured separately: ``gptforge --help``,
``gptforge data prepare --help``, and ``data prepare`` from spawn until it asks its first input for text.
``--bpe-vocab N`` (default 8,192) also times ``train_bpe`` on the 2.4 MB corpus once (0: skip).

Writes ``--out`` (JSON) and ``--md`` (Markdown: command, date, CPU and flags, load, table).

    GPTFORGE_DATA_DIR=../shared/data python bench/bench_prepare.py                  # 38.5 MB, workers 1 2, 5 rounds
    GPTFORGE_DATA_DIR=../shared/data python bench/bench_prepare.py --repeat 4 --workers 1 2 4 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["pretrain/tinyshakespeare.txt", "pretrain/wikitext2-raw-test.txt"]

# The hand-written script prepare is compared with (argv: output file, input files...).
LOOP = r"""
import re, sys
import numpy as np
import tiktoken

enc = tiktoken.get_encoding("gpt2")
blank = re.compile(r"\n[ \t\r\f\v]*\n\s*")  # prepare's --text-sep blank rule
ids = []
for path in sys.argv[2:]:
    with open(path, encoding="utf-8") as f:
        for doc in blank.split(f.read()):
            doc = doc.strip()
            if doc:
                ids.append(enc.eot_token)
                ids.extend(enc.encode_ordinary(doc))
np.array(ids, dtype=np.uint16).tofile(sys.argv[1])
print(len(ids))
"""

# `gptforge data prepare` until its first input is asked for text (argv: the CLI's arguments).
FIRST_READ = r"""
import os, sys, time
from gptforge.data import sources

def first_read(self, *args, **kwargs):
    print(time.time(), flush=True)
    os._exit(0)

sources.Source.pieces = first_read
from gptforge.cli import main
main(sys.argv[1:])
"""


def cpu_info() -> dict:
    """CPU model and the flags that decide CPU precision elsewhere in the project."""
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return {"model": model, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "flags": {f: f in flags for f in wanted}}


def make_corpus(data_dir: Path, repeat: int, tmp: Path) -> tuple[list[Path], int]:
    paths = []
    for r in range(repeat):
        for rel in FILES:
            p = tmp / f"{r:03d}_{Path(rel).name}"
            shutil.copyfile(data_dir / rel, p)
            paths.append(p)
    return paths, sum(p.stat().st_size for p in paths)


def timed(argv: list[str], env: dict) -> dict:
    """Run ``argv``; wall seconds from spawn to exit, the child's CPU seconds, peak RSS (MiB) and stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: a full pipe never blocks it
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}):\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")
        return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": out.read().decode(errors="replace")}


def run_loop(paths: list[Path], out: Path, env: dict) -> dict:
    r = timed([sys.executable, "-c", LOOP, str(out), *map(str, paths)], env)
    r["tokens"] = int(r.pop("stdout").split()[-1])
    return r


def prepare_argv(paths: list[Path], out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "gptforge", "data", "prepare", *map(str, paths), "--text-sep", "blank",
            "--tokenizer", "gpt2", "--out", str(out), "--workers", str(workers), "--overwrite"]


def run_prepare(paths: list[Path], out: Path, workers: int, env: dict) -> dict:
    r = timed(prepare_argv(paths, out, workers), env)
    r.pop("stdout")
    m = json.loads((out / "manifest.json").read_text())
    r["tokens"] = m["tokens"]["train"] + m["tokens"]["val"]
    r["shards"] = {s["name"]: s["sha256"] for s in m["shards"]}
    return r


def startup(paths: list[Path], tmp: Path, envs: dict[str, dict], repeats: int) -> dict:
    """Per tree (``envs``: label -> environment), median seconds of ``gptforge --help``, ``data prepare --help``
    and ``data prepare`` up to its first read."""
    cli = [sys.executable, "-m", "gptforge"]
    names = ["gptforge --help", "gptforge data prepare --help", "gptforge data prepare, until it reads"]
    runs: dict[str, dict[str, list[float]]] = {label: {n: [] for n in names} for label in envs}
    for _ in range(repeats):
        for label, env in envs.items():
            runs[label][names[0]].append(timed([*cli, "--help"], env)["seconds"])
            runs[label][names[1]].append(timed([*cli, "data", "prepare", "--help"], env)["seconds"])
            argv = prepare_argv(paths, tmp / "startup_out", 2)[3:]
            spawn = time.time()
            r = timed([sys.executable, "-c", FIRST_READ, *argv], env)
            runs[label][names[2]].append(float(r["stdout"].split()[-1]) - spawn)
    return {label: {k: {"seconds": statistics.median(v), "seconds_rounds": v} for k, v in per.items()}
            for label, per in runs.items()}


def train_time(data_dir: Path, vocab: int) -> dict:
    from gptforge.data.sources import ReadStats, expand_sources, iter_texts
    from gptforge.tokenizer import train_bpe

    sources = expand_sources([str(data_dir / rel) for rel in FILES], separator="blank")
    start = time.perf_counter()
    tok = train_bpe(iter_texts(sources, ReadStats()), vocab_size=vocab)
    return {"seconds": time.perf_counter() - start, "vocab_size": tok.vocab_size,
            "tiktoken_export": tok.tiktoken_ranks() is not None}


def summarize(rs: list[dict]) -> dict:
    secs = [r["seconds"] for r in rs]
    return {"seconds": statistics.median(secs), "seconds_rounds": secs, "tokens": rs[0]["tokens"],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}


def markdown(results: dict, command: str) -> str:
    cpu, corpus = results["machine"]["cpu"], results["corpus"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    base = results["baseline_tiktoken_loop"]
    rows = [("plain tiktoken loop, 1 process", base)] + [
        (f"`gptforge data prepare`, {w} worker{'s' if w != '1' else ''}", r) for w, r in results["prepare"].items()]
    rows += [(f"before ({results['before']['src']}), {w} worker{'s' if w != '1' else ''}", r)
             for w, r in results.get("before", {}).get("prepare", {}).items()]
    lines = [
        "## `gptforge data prepare` vs a plain tiktoken loop (`bench/bench_prepare.py`)", "",
        f"Command: `{command}`  ",
        f"Date: {results['date']} ({results['elapsed_s']:.0f} s)  ",
        f"CPU: {cpu['model']}, {cpu['cores']} cores; {flags}  ",
        (f"Python {results['machine']['python']}, tiktoken {results['machine']['tiktoken']}; load average (1 min) "
         f"before/after: {results['machine']['load_before']:.1f} / {results['machine']['load_after']:.1f} "
         "(other processes shared the cores: compare rows of the same run only)"), "",
        (f"Corpus: tinyshakespeare + WikiText-2 test × {corpus['repeat']} = {corpus['bytes'] / 1e6:.1f} MB, "
         f"{base['tokens']:,} GPT-2 tokens, paragraphs as documents. Every figure is a fresh process from spawn "
         f"to exit (start-up included), median of {results['rounds']} interleaved rounds (min–max; 'best of rounds' "
         "compares the fastest runs, the ones least slowed by other processes); CPU = user + system seconds of "
         "the child and the processes it waited for; peak RSS = the largest resident set among them (a tree with "
         "worker processes holds several at once). Every run wrote byte-identical shards"
         f"{' (the before tree too)' if 'before' in results else ''}, and the loop counted the same tokens."), "",
        ("| method | wall s, median (min–max) | speedup vs loop, median | speedup, best of rounds | CPU s | "
         "peak RSS MiB | MB/s (median) |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        secs = r["seconds_rounds"]
        lines.append(f"| {name} | {r['seconds']:.2f} ({min(secs):.2f}–{max(secs):.2f}) | "
                     f"{base['seconds'] / r['seconds']:.2f}× | {min(base['seconds_rounds']) / min(secs):.2f}× | "
                     f"{r['cpu_seconds']:.2f} | {r['peak_rss_mib']:.0f} | {corpus['bytes'] / r['seconds'] / 1e6:.1f} |")
    labels = list(results["startup"])
    lines += ["", "Start-up (median of the rounds, seconds from spawn):", "",
              "| command | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name in results["startup"][labels[0]]:
        lines.append(f"| `{name}` | " + " | ".join(f"{results['startup'][lb][name]['seconds']:.3f}"
                                                  for lb in labels) + " |")
    if results.get("bpe_train"):
        b = results["bpe_train"]
        lines += ["", (f"BPE training (`train_bpe`, streamed) to {b['vocab_size']:,} tokens on the 2.4 MB corpus: "
                       f"{b['seconds']:.1f} s (one run; tiktoken export: {b['tiktoken_export']}).")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=16, help="copies of the 2.4 MB corpus (default 16: 38.5 MB)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    ap.add_argument("--bpe-vocab", type=int, default=8192, help="also time train_bpe once (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "prepare.json"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "results_prepare.md"), help="Markdown report ('': none)")
    ap.add_argument("--before-src", default=None, metavar="DIR",
                    help="also time the gptforge in DIR (e.g. `git archive <commit> src | tar -x -C /tmp/old` "
                         "then /tmp/old/src), interleaved in the same rounds; its shards must be identical too")
    args = ap.parse_args()
    command = shlex.join(["python", "bench/bench_prepare.py", *sys.argv[1:]])
    data_dir = Path(os.environ.get("GPTFORGE_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
    env = dict(os.environ, GPTFORGE_DATA_DIR=str(data_dir))
    env.setdefault("TIKTOKEN_CACHE_DIR", str(data_dir / "tokenizers" / "gpt2" / "tiktoken_cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    os.environ.update(GPTFORGE_DATA_DIR=env["GPTFORGE_DATA_DIR"], TIKTOKEN_CACHE_DIR=env["TIKTOKEN_CACHE_DIR"])
    envs = {"now": env}
    if args.before_src:
        envs["before"] = dict(env, PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(args.before_src).resolve()), os.environ.get("PYTHONPATH")])))
    import tiktoken

    began = time.time()
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_info(),
                    "cpus": os.cpu_count(), "tiktoken": tiktoken.__version__, "load_before": os.getloadavg()[0]},
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, nbytes = make_corpus(data_dir, args.repeat, tmp)
        results["corpus"] = {"files": FILES, "repeat": args.repeat, "bytes": nbytes}
        keys = ["loop"] + [str(w) for w in args.workers]
        keys += [f"before:{w}" for w in args.workers] if args.before_src else []
        runs: dict[str, list[dict]] = {k: [] for k in keys}
        shards, load = None, []
        for rnd in range(args.rounds):
            for key in keys[rnd % len(keys):] + keys[: rnd % len(keys)]:  # rotate who goes first
                if key == "loop":
                    runs[key].append(run_loop(paths, tmp / "loop.bin", env))
                    continue
                tree, _, w = key.rpartition(":")
                r = run_prepare(paths, tmp / f"out_{tree or 'now'}_w{w}", int(w), envs[tree or "now"])
                if shards is not None and r["shards"] != shards:
                    raise SystemExit(f"workers={key} wrote different shards than another worker count")
                shards = r.pop("shards")
                runs[key].append(r)
            load.append(os.getloadavg()[0])
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{k} {runs[k][-1]['seconds']:.2f}s" for k in keys) + f" (load {load[-1]:.1f})", flush=True)
        tokens = {runs[k][0]["tokens"] for k in keys}
        if len(tokens) != 1:
            raise SystemExit(f"the loop and prepare counted different tokens: {tokens}")
        results["baseline_tiktoken_loop"] = summarize(runs["loop"])
        results["prepare"] = {str(w): summarize(runs[str(w)]) for w in args.workers}
        if args.before_src:
            results["before"] = {"src": args.before_src,
                                 "prepare": {str(w): summarize(runs[f"before:{w}"]) for w in args.workers}}
        results["load_per_round"] = load
        results["startup"] = startup(paths, tmp, envs, args.rounds)
    if args.bpe_vocab:
        results["bpe_train"] = train_time(data_dir, args.bpe_vocab)
    results["machine"]["load_after"] = os.getloadavg()[0]
    results["elapsed_s"] = time.time() - began

    text = markdown(results, command)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if args.md:
        Path(args.md).write_text(text)
    print(f"wrote {args.out}" + (f" and {args.md}" if args.md else ""))


if __name__ == "__main__":
    main()
