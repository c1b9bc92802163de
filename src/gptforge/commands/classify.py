"""``gptforge classify``: fine-tune a checkpoint into a text classifier; ``gptforge classify predict`` uses one."""

from __future__ import annotations

from gptforge.commands import add_parser, positive_float, positive_int
from gptforge.commands.sft import LORA_FIELDS, add_lora_flags

EXAMPLE = ("gptforge classify --checkpoint runs/base --data $GPTFORGE_DATA_DIR/classify/SMSSpamCollection "
           "--name spam --balance --trainable last_blocks --epochs 5\n"
           "  gptforge classify predict --checkpoint runs/spam --text \"You won a free prize! Call now\"")


def register(sub) -> None:
    p = add_parser(sub, "classify", "fine-tune a checkpoint as a text classifier (last-token head), or predict with one",
                   EXAMPLE, accepts_overrides=True)
    p.add_argument("--config", default=None, help="YAML recipe (e.g. recipes/classify-sms-spam.yaml)")
    p.add_argument("--checkpoint", default=None, help="base model: step dir, run dir or Hugging Face GPT-2 directory")
    p.add_argument("--data", default=None, metavar="FILE", help="labelled TSV, CSV or JSONL file")
    p.add_argument("--name", default=None, help="run name: outputs go to <out-dir>/<name>/")
    p.add_argument("--out-dir", default=None, help="parent of the run directory (default runs)")
    p.add_argument("--text-column", default=None, help="column name, or 0-based index without a header")
    p.add_argument("--label-column", default=None, help="column name, or 0-based index without a header")
    p.add_argument("--balance", action="store_true", default=None, help="downsample classes to the smallest")
    p.add_argument("--skip-bad", action="store_true", default=None, help="skip malformed rows (counted)")
    p.add_argument("--split", default=None, help="train,val,test fractions (default 0.7,0.1,0.2)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only N examples (seeded sample)")
    p.add_argument("--max-len", type=positive_int, default=None, help="tokens per text; longer texts are truncated")
    p.add_argument("--trainable", default=None, choices=["all", "last_blocks", "head"],
                   help="what trains: everything, the last k blocks + final LayerNorm + head, or the head only")
    p.add_argument("--last-k", type=positive_int, default=None, help="blocks that train with --trainable last_blocks")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training split")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="train exactly N optimizer steps; overrides --epochs (as in HF Trainer)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run <out-dir>/<name> from its newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start over in a run directory that already has checkpoints (deletes them)")
    add_lora_flags(p)  # with LoRA the adapters and the head train; --trainable does not apply
    p.set_defaults(func=run)

    psub = p.add_subparsers(dest="classify_command", metavar="[predict]")
    pred = add_parser(psub, "predict", "class probabilities for new texts from a trained classifier",
                      "gptforge classify predict --checkpoint runs/spam --text \"Are we still on for lunch?\"")
    pred.add_argument("--checkpoint", required=True, help="classifier run directory or step directory")
    pred.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    pred.add_argument("--file", default=None, help="a file with one text per line")
    pred.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    pred.add_argument("--device", default="cpu")
    pred.set_defaults(func=run_predict, accepts_overrides=False)


def cli_overrides(args) -> dict:
    """The explicitly given flags as a nested override dict (they win over the recipe)."""
    from gptforge.commands import flag_overrides, parse_fractions

    fields = {"base": "checkpoint", "name": "name", "out_dir": "out_dir", "train.device": "device",
              "data.path": "data", "data.text_column": "text_column", "data.label_column": "label_column",
              "data.balance": "balance", "data.skip_bad": "skip_bad", "data.limit": "limit",
              "data.max_len": "max_len"}
    fields.update({f"train.{k}": k for k in ("trainable", "last_k", "epochs", "max_steps", "batch_size")})
    fields.update({"optim.lr": "lr", "checkpoint.resume": "resume", "overwrite": "overwrite", **LORA_FIELDS})
    o = flag_overrides(args, fields)
    if args.split:
        o.setdefault("data", {})["split"] = parse_fractions(args.split, "--split", "0.7,0.1,0.2")
    return o


def run(args) -> int:
    from gptforge.config import deep_merge, load_config, parse_overrides
    from gptforge.train.classify import ClassifyConfig, run_classify

    overrides = deep_merge(cli_overrides(args), parse_overrides(args.overrides or []))
    config = load_config(ClassifyConfig, args.config, overrides)
    result = run_classify(config)
    test = result.metrics.get("test")
    if test:
        print(f"test accuracy {test.accuracy:.2%} on {test.size} examples")
    print(f"classifier: {result.checkpoint}")
    print(f"try it: gptforge classify predict --checkpoint {result.run_dir} --text \"...\"")
    return 0


def run_predict(args) -> int:
    import json
    from pathlib import Path

    from gptforge.errors import GptforgeError
    from gptforge.train.classify import load_classifier, predict

    texts = list(args.text)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise GptforgeError(f"text file not found: {path}")
        texts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise GptforgeError("nothing to classify: pass --text TEXT (repeatable) or --file FILE")
    model, tokenizer, info = load_classifier(args.checkpoint, device=args.device)
    for row in predict(model, tokenizer, info, texts, device=args.device):
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in row["probabilities"].items())
            print(f"{row['label']:>12s}  {probs}  {row['text'][:80]}")
    return 0
