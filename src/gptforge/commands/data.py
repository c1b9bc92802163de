"""``gptforge data prepare|list|fetch``: tokenize corpora into shards; the named-dataset registry."""

from __future__ import annotations

import json

from gptforge.commands import add_parser, nonneg_int, positive_float
from gptforge.commands.tokenizer import _add_source_options


def _count(text: str) -> int:
    """Positive integers with suffixes: 1e9, 10B, 500M, 20k."""
    import argparse
    import math

    t = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"not a positive count: {text!r} (examples: 1000000, 1e6, 500M, 10B)")
    return int(value)


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare corpora into token shards; named datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="<action>", required=True)

    prep = add_parser(
        dsub,
        "prepare",
        "tokenize text files or a hub dataset into train/val shards + manifest.json",
        "gptforge data prepare $GPTFORGE_DATA_DIR/pretrain/tinystories-sample.txt --text-sep blank "
        "--tokenizer gpt2 --out data/tinystories --val-fraction 0.05",
    )
    prep.add_argument(
        "sources",
        nargs="+",
        help="files, globs, directories, dataset names (gptforge data list) or hub ids (hf:OWNER/NAME)",
    )
    prep.add_argument("--tokenizer", default="gpt2", help="gpt2, gpt2-chat, or a trained tokenizer directory")
    prep.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    prep.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents in val (default 0.01)"
    )
    prep.add_argument("--workers", type=nonneg_int, default=0,
                      help="tokenizing threads (default 0: all cores); any count writes the same bytes")
    prep.add_argument(
        "--shard-tokens", type=_count, default=100_000_000, help="tokens per shard (default 100M)"
    )
    prep.add_argument("--max-tokens", type=_count, default=None, help="token budget, e.g. 2.5B (train + val)")
    prep.add_argument(
        "--buffer-mb", type=positive_float, default=256.0, help="text in flight, bounds memory (default 256)"
    )
    prep.add_argument("--split-salt", default="gptforge", help="changes which documents go to val")
    prep.add_argument(
        "--sample-docs",
        type=_count,
        default=None,
        metavar="N",
        help="keep N documents: the same set as HF datasets' Dataset.shuffle(seed=S).select(range(N)) on these "
        "rows (a counting pass first), written in the file's order, not shuffled (pretrain shuffles anyway)",
    )
    prep.add_argument(
        "--sample-seed", type=nonneg_int, default=0, metavar="S", help="seed of --sample-docs (default 0)"
    )
    prep.add_argument(
        "--val-split",
        default=None,
        metavar="NAME",
        help="hub inputs: the val shards are the dataset's own split NAME (e.g. validation) instead of a hash "
        "split; --val-fraction is ignored and every training-split document goes to train",
    )
    prep.add_argument(
        "--val-source",
        nargs="+",
        default=None,
        metavar="FILE",
        help="local files whose documents all go to val (the --val-split of local data); --val-fraction is "
        "ignored and every input document goes to train",
    )
    prep.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    _add_source_options(prep)
    prep.set_defaults(func=run_prepare)

    lst = add_parser(
        dsub,
        "list",
        "the named datasets, their sources and whether a local copy exists",
        "gptforge data list",
    )
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=run_list)

    fetch = add_parser(
        dsub,
        "fetch",
        "print the local path of named datasets, downloading into the cache if needed",
        "gptforge data fetch tinyshakespeare hellaswag",
    )
    fetch.add_argument("names", nargs="+", help="dataset names (see gptforge data list)")
    fetch.add_argument("--verify", action="store_true", help="check the sha256 of single-file datasets")
    fetch.set_defaults(func=run_fetch)


def run_prepare(args) -> int:
    from gptforge.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        sources=args.sources,
        out=args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        max_tokens=args.max_tokens,
        workers=args.workers,
        separator=args.separator,
        field=args.field,
        column=args.column,
        hub_config=args.hub_config,
        hub_split=args.hub_split,
        split_salt=args.split_salt,
        skip_bad=args.skip_bad,
        buffer_mb=args.buffer_mb,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        sample_docs=args.sample_docs,
        sample_seed=args.sample_seed,
        val_split=args.val_split,
        val_sources=args.val_source,
    )
    prepare(cfg)
    return 0


def run_list(args) -> int:
    from gptforge.data.registry import table

    rows = table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        where = r["local"] or (f"(embedded in the package: {r['embedded']})" if r.get("embedded")
                               else f"(not local: {r['source']})")
        print(f"{r['name']:<{width}}  {r['description']}\n{'':<{width}}  {where}")
    return 0


def run_fetch(args) -> int:
    from gptforge.data.registry import get, resolve, verify
    from gptforge.errors import GptforgeError

    for name in args.names:
        path = resolve(name)
        if args.verify and path.is_file() and not verify(get(name), path):
            raise GptforgeError(
                f"{path} does not match the sha256 of {name!r}: replace it with the original file"
            )
        print(path)
    return 0
