"""``gptforge sft``: fine-tune a base checkpoint into an instruct model on chat/instruction data."""

from __future__ import annotations

from gptforge.commands import add_parser, nonneg_float, nonneg_int, positive_float, positive_int

EXAMPLE = ("gptforge sft --checkpoint runs/base --data $GPTFORGE_DATA_DIR/instruct/instruction-data.json "
           "--name sft-demo --epochs 2 --neftune-alpha 5 --patience 3")


def register(sub) -> None:
    p = add_parser(sub, "sft", "instruction fine-tuning (SFT) of a checkpoint on Alpaca/Dolly/ShareGPT/messages data",
                   EXAMPLE, accepts_overrides=True)
    p.epilog += ("\n\noverrides: any --section.key=value with the keys every stage shares, e.g. --optim.lr=1e-4 "
                 "--optim.schedule=cosine --train.precision=bf16 --train.seed=1 --train.grad_clip=1.0")
    p.add_argument("--config", default=None, help="YAML recipe (e.g. recipes/sft-alpaca-dolly.yaml)")
    p.add_argument("--checkpoint", default=None, help="base model: step dir, run dir or Hugging Face GPT-2 directory")
    p.add_argument("--data", action="append", default=None, metavar="FILE|HUB_NAME",
                   help="local .json/.jsonl/.parquet or a hub dataset name; repeat to combine sources")
    p.add_argument("--name", default=None, help="run name: outputs go to <out-dir>/<name>/")
    p.add_argument("--out-dir", default=None, help="parent of the run directory (default runs)")
    p.add_argument("--format", default=None, choices=["auto", "alpaca", "dolly", "sharegpt", "messages"],
                   help="record format (default: detected from the keys)")
    p.add_argument("--skip-bad", action="store_true", default=None, help="skip malformed records (counted) instead of failing")
    p.add_argument("--style", default=None, choices=["chat", "alpaca"],
                   help="chat = ChatML with new special tokens (default); alpaca = text template, no new tokens")
    p.add_argument("--train-on", default=None, choices=["all", "last"], help="supervise all assistant turns or the last")
    p.add_argument("--max-len", type=positive_int, default=None, help="tokens per example (default: model context)")
    p.add_argument("--overlength", default=None, choices=["drop", "truncate"], help="what to do with longer examples")
    p.add_argument("--batching", default=None, choices=["pad", "group", "pack"],
                   help="pad to longest in batch, length-grouped batches, or packed windows")
    p.add_argument("--split", default=None, help="train,val,test fractions (default 0.85,0.05,0.10)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only N conversations (seeded sample)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training split")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="train exactly N optimizer steps; overrides --epochs (as in HF Trainer)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--grad-accum", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--neftune-alpha", type=nonneg_float, default=None, help="NEFTune noise (e.g. 5); 0 = off")
    p.add_argument("--patience", type=positive_int, default=None, help="early stopping after N evaluations without improvement")
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between evaluations (default: each epoch)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="length cap of the test-split responses")
    p.add_argument("--no-test-responses", action="store_true", help="skip generating responses for the test split")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run <out-dir>/<name> from its newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start over in a run directory that already has checkpoints (deletes them)")
    add_lora_flags(p)
    p.set_defaults(func=run)


# LoRA flags → the ``lora`` config section (shared by sft, classify and dpo)
LORA_FIELDS = {"lora.r": "lora_r", "lora.alpha": "lora_alpha", "lora.dropout": "lora_dropout",
               "lora.target_modules": "lora_target"}


def add_lora_flags(p) -> None:
    """``--lora-r/--lora-alpha/--lora-dropout/--lora-target``: train LoRA adapters instead of every weight."""
    g = p.add_argument_group("LoRA (needs peft: pip install 'gptforge[lora]')")
    g.add_argument("--lora-r", type=nonneg_int, default=None,
                   help="train rank-r LoRA adapters (e.g. 8) instead of every weight; 0 = off (default)")
    g.add_argument("--lora-alpha", type=positive_float, default=None, help="adapter scale alpha/r (default alpha 16)")
    g.add_argument("--lora-dropout", type=nonneg_float, default=None, help="dropout on the adapter input (default 0)")
    g.add_argument("--lora-target", action="append", default=None, metavar="MODULE",
                   help="a linear layer that gets an adapter, by name (repeat; default attn.c_attn, attn.c_proj, "
                        "mlp.c_fc, mlp.c_proj; c_proj names both projections)")


def cli_overrides(args) -> dict:
    """The explicitly given flags as a nested override dict (they win over the recipe)."""
    from gptforge.commands import flag_overrides, parse_fractions

    fields = {"base": "checkpoint", "name": "name", "out_dir": "out_dir", "train.device": "device",
              "data.sources": "data", "data.format": "format", "data.skip_bad": "skip_bad", "data.style": "style",
              "data.train_on": "train_on", "data.max_len": "max_len", "data.overlength": "overlength",
              "data.batching": "batching", "data.limit": "limit",
              "generate.max_new_tokens": "max_new_tokens"}
    fields.update({f"train.{k}": k for k in ("epochs", "max_steps", "batch_size", "grad_accum",
                                             "neftune_alpha", "patience", "eval_every")})
    fields.update({"optim.lr": "lr", "checkpoint.resume": "resume", "overwrite": "overwrite", **LORA_FIELDS})
    o = flag_overrides(args, fields)
    if args.split:
        o.setdefault("data", {})["split"] = parse_fractions(args.split, "--split", "0.85,0.05,0.10")
    if args.no_test_responses:
        o.setdefault("generate", {})["enabled"] = False
    return o


def run(args) -> int:
    from gptforge.config import deep_merge, load_config, parse_overrides
    from gptforge.train.sft import SFTConfig, run_sft

    overrides = deep_merge(cli_overrides(args), parse_overrides(args.overrides or []))
    config = load_config(SFTConfig, args.config, overrides)
    result = run_sft(config)
    print(f"fine-tuned model: {result.checkpoint}")
    if (result.run_dir / "adapter").is_dir():
        print(f"LoRA adapter (peft): {result.run_dir / 'adapter'}")
    print(f"try it: gptforge chat --checkpoint {result.run_dir}")
    return 0
