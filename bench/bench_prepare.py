"""Corpus preparation throughput: `gptforge data prepare` with 1 and N workers vs a plain tiktoken loop; BPE training.

Corpus: tinyshakespeare + WikiText-2 test (2.4 MB, offline copies), paragraphs as documents, repeated
``--repeat`` times into a temporary directory so that process start-up does not dominate. Measurements:

* baseline — one process, ``tiktoken.get_encoding("gpt2").encode_ordinary`` on every document in a loop
  (loading the vocabulary, reading and splitting included, no output written): what a typical prepare
  script does before it writes anything;
* ``prepare(workers=W)`` for each W in ``--workers`` — the full pipeline (read, split, tokenize, route to
  train/val, write shards with checksums, manifest, no progress bar), wall time including worker start-up;
  every run must produce byte-identical shards;
* ``train_bpe`` to an 8,192-token vocabulary on the corpus once (not repeated).

MB/s counts input bytes. Writes ``bench/out/prepare.json`` and prints a Markdown table.

    GPTFORGE_DATA_DIR=../shared/data python bench/bench_prepare.py                 # repeat 4, workers 1 2
    GPTFORGE_DATA_DIR=../shared/data python bench/bench_prepare.py --repeat 16 --workers 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["pretrain/tinyshakespeare.txt", "pretrain/wikitext2-raw-test.txt"]


def make_corpus(data_dir: Path, repeat: int, tmp: Path) -> tuple[list[Path], int]:
    paths = []
    for r in range(repeat):
        for rel in FILES:
            p = tmp / f"{r:03d}_{Path(rel).name}"
            shutil.copyfile(data_dir / rel, p)
            paths.append(p)
    return paths, sum(p.stat().st_size for p in paths)


def baseline(paths: list[Path]) -> dict:
    """Single-process tiktoken: load GPT-2, read, split into paragraphs, encode each document."""
    import tiktoken

    start = time.perf_counter()
    enc = tiktoken.get_encoding("gpt2")  # timed, like prepare's own tokenizer loading
    tokens = 0
    for p in paths:
        for doc in re.split(r"\n[ \t\r\f\v]*\n\s*", p.read_text(encoding="utf-8")):
            doc = doc.strip()
            if doc:
                tokens += 1 + len(enc.encode_ordinary(doc))
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def run_prepare(paths: list[Path], workers: int, out: Path) -> dict:
    from gptforge.data.prepare import PrepareConfig, prepare

    start = time.perf_counter()
    m = prepare(
        PrepareConfig(
            [str(p) for p in paths],
            str(out),
            separator="blank",
            workers=workers,
            shard_tokens=1_000_000,
            overwrite=True,
            progress=False,
            histogram=False,
        )
    )
    return {
        "seconds": time.perf_counter() - start,
        "tokens": m["tokens"]["train"] + m["tokens"]["val"],
        "shards": {s["name"]: s["sha256"] for s in m["shards"]},
    }


def train_time(data_dir: Path, vocab: int) -> dict:
    from gptforge.data.sources import ReadStats, expand_sources, iter_texts
    from gptforge.tokenizer import train_bpe

    sources = expand_sources([str(data_dir / rel) for rel in FILES], separator="blank")
    start = time.perf_counter()
    tok = train_bpe(iter_texts(sources, ReadStats()), vocab_size=vocab)
    return {
        "seconds": time.perf_counter() - start,
        "vocab_size": tok.vocab_size,
        "tiktoken_export": tok.tiktoken_ranks() is not None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=4, help="copies of the 2.4 MB corpus")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=1,
                    help="interleaved rounds (baseline, prepare per worker count; order reversed every other round); "
                         "the median seconds are reported")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "prepare.json"))
    args = ap.parse_args()
    data_dir = Path(os.environ.get("GPTFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))
    os.environ["GPTFORGE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data_dir / "tokenizers" / "gpt2" / "tiktoken_cache"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, nbytes = make_corpus(data_dir, args.repeat, tmp)
        results = {
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(),
            },
            "corpus": {"files": FILES, "repeat": args.repeat, "bytes": nbytes},
            "rounds": args.rounds,
        }
        runs: dict[str, list[dict]] = {"baseline": []} | {str(w): [] for w in args.workers}
        shards = None
        for rnd in range(args.rounds):
            order = list(runs) if rnd % 2 == 0 else list(reversed(runs))
            for key in order:
                if key == "baseline":
                    runs[key].append(baseline(paths))
                    continue
                r = run_prepare(paths, int(key), tmp / f"out_w{key}")
                if shards is not None and r["shards"] != shards:
                    raise SystemExit(f"workers={key} produced different shards than another worker count")
                shards = r.pop("shards")
                runs[key].append(r)

        def median_run(rs: list[dict]) -> dict:
            secs = [r["seconds"] for r in rs]
            return {"seconds": statistics.median(secs), "tokens": rs[0]["tokens"], "seconds_rounds": secs}

        results["baseline_tiktoken_loop"] = median_run(runs["baseline"])
        results["prepare"] = {str(w): median_run(runs[str(w)]) for w in args.workers}
        results["bpe_train"] = train_time(data_dir, args.vocab)

    base = results["baseline_tiktoken_loop"]
    rows = [("plain tiktoken loop, 1 process", base)] + [
        (f"gptforge data prepare, {w} worker(s)", r) for w, r in results["prepare"].items()
    ]
    print(
        f"corpus: tinyshakespeare + wikitext2-test × {args.repeat} = {nbytes / 1e6:.1f} MB; "
        f"{os.cpu_count()} CPUs, load average {results['machine']['load_avg'][0]:.1f}"
    )
    print("| method | seconds | MB/s | M tokens/s | vs tiktoken loop |\n|---|---|---|---|---|")
    for name, r in rows:
        r["mb_per_s"] = nbytes / r["seconds"] / 1e6
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["speedup"] = base["seconds"] / r["seconds"]
        print(
            f"| {name} | {r['seconds']:.2f} | {r['mb_per_s']:.2f} | {r['tokens_per_s'] / 1e6:.2f} | "
            f"{r['speedup']:.2f}× |"
        )
    b = results["bpe_train"]
    print(
        f"BPE training to {b['vocab_size']:,} tokens on 2.4 MB: {b['seconds']:.1f} s "
        f"(tiktoken export: {b['tiktoken_export']})"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
