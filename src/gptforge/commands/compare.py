"""``gptforge compare``: test loss of several runs on the same held-out windows, the change vs the first run
with a paired 95% confidence interval, wall time, tokens and cost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptforge.commands import add_parser, nonneg_int, positive_float, positive_int


def register(sub) -> None:
    p = add_parser(sub, "compare",
                   "compare runs on the same held-out windows: test loss, change vs the first run with a paired "
                   "confidence interval, wall time, tokens, cost",
                   "gptforge compare runs/baseline runs/clip-1.0 runs/no-dropout --data data/fineweb "
                   "--tokens 4000000 --price-per-hour 2.5")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT",
                   help="run dirs (their latest checkpoint), step dirs, ckpt/latest|best pointers or HF dirs; "
                        "the first is the baseline")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="a prepared dataset directory (uses its --split shards) or raw .txt/.jsonl files "
                        "(default: the baseline run's training dataset)")
    p.add_argument("--split", default="val", help="shard split to evaluate (default: val)")
    p.add_argument("--start", type=nonneg_int, default=0, help="first token of the evaluated range (default: 0)")
    p.add_argument("--tokens", type=positive_int, default=None, help="number of tokens in the range (default: all)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="window length (default: the smallest context among the runs)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--tokenizer", default=None, help="tokenizer for raw text when the checkpoints have none")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--separator", default=None,
                   help="raw .txt documents: file | blank | line | a literal (default: auto, as data prepare)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps … (default: auto = CUDA, else MPS, else CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (auto: the one precision rule); the same for every run")
    p.add_argument("--price-per-hour", type=positive_float, default=None, metavar="PRICE",
                   help="price per GPU-hour: adds cost = wall hours × GPUs × PRICE (for a CPU machine pass its "
                        "hourly price with --gpus 1)")
    p.add_argument("--gpus", type=positive_int, default=None,
                   help="GPUs billed per run (default: the run's process count from its checkpoint, else 1)")
    p.add_argument("--out", default=None,
                   help="directory for compare.json, compare.md and compare.png (default: <baseline run>/eval)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    p.set_defaults(func=run)


def run(args) -> int:
    from gptforge.eval.compare import compare_runs, describe, format_compare_table, plot_compare
    from gptforge.io import atomic_write_text, write_json
    from gptforge.precision import pick_device
    from gptforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    data = None if args.data is None else args.data[0] if len(args.data) == 1 else args.data
    report = compare_runs(args.runs, data, tokenizer=tokenizer, split=args.split, start=args.start,
                          max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                          device=str(pick_device(args.device)), dtype=args.dtype, text_field=args.text_field,
                          separator=args.separator, price_per_hour=args.price_per_hour, gpus=args.gpus,
                          show_progress=not args.json and sys.stderr.isatty())
    table = format_compare_table(report)
    text = describe(report)
    out = Path(args.out) if args.out else _baseline_eval_dir(report)
    written = []
    if out is not None:
        written = [write_json(out / "compare.json", report),
                   atomic_write_text(out / "compare.md", table + "\n\n" + text + "\n"),
                   plot_compare(report, out / "compare.png")]
    if args.json:
        print(json.dumps(report))
        return 0
    print(table)
    print(text)
    print("wrote " + ", ".join(map(str, written)) if written else
          "no files written (the baseline is not in a run directory): pass --out DIR to keep the report")
    return 0


def _baseline_eval_dir(report: dict) -> Path | None:
    ckpt = Path(report["runs"][0]["checkpoint"])
    return ckpt.parent.parent / "eval" if ckpt.parent.name == "ckpt" else None
