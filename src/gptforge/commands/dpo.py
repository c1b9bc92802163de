"""``gptforge dpo``: preference tuning (DPO, IPO or SimPO) of an SFT checkpoint on chosen/rejected pairs."""

from __future__ import annotations

from gptforge.commands import add_parser, positive_float, positive_int
from gptforge.commands.sft import LORA_FIELDS, add_lora_flags

EXAMPLE = ("gptforge dpo --checkpoint runs/sft-demo --data $GPTFORGE_DATA_DIR/instruct/"
           "instruction-data-with-preference.json --name dpo-demo --beta 0.1 --lr 5e-6 --epochs 1")


def register(sub) -> None:
    p = add_parser(sub, "dpo", "preference tuning (DPO, IPO or SimPO) of an SFT checkpoint on chosen/rejected pairs",
                   EXAMPLE, accepts_overrides=True)
    p.epilog += ("\n\ndata: {instruction(+input) | prompt, chosen, rejected} records (strings or chat messages) or "
                 "chosen/rejected whole conversations (shared beginning = prompt; Anthropic HH text too)"
                 "\noverrides: any --section.key=value, e.g. --dpo.label_smoothing=0.1 --dpo.simpo_gamma=0.5 "
                 "--train.eval_every=50 --train.patience=3 --optim.warmup_ratio=0.1 --train.precision=bf16")
    p.add_argument("--config", default=None, help="YAML recipe (e.g. recipes/dpo-instruction-preference.yaml)")
    p.add_argument("--checkpoint", default=None,
                   help="the model to tune (an SFT run): step dir, run dir or Hugging Face GPT-2 directory")
    p.add_argument("--data", action="append", default=None, metavar="FILE|HUB_NAME",
                   help="preference pairs: local .json/.jsonl/.parquet or a hub dataset name; repeat to combine")
    p.add_argument("--name", default=None, help="run name: outputs go to <out-dir>/<name>/")
    p.add_argument("--out-dir", default=None, help="parent of the run directory (default runs)")
    p.add_argument("--beta", type=positive_float, default=None, help="DPO beta (IPO tau, SimPO beta); default 0.1")
    p.add_argument("--loss-type", default=None, choices=["sigmoid", "ipo", "simpo"],
                   help="sigmoid = DPO (default), ipo = IPO, simpo = SimPO (reference-free)")
    p.add_argument("--precompute-ref", action="store_true", default=None,
                   help="compute the reference log-probs once before training instead of keeping a second model")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip malformed records and pairs without answer tokens (counted) instead of failing")
    p.add_argument("--max-len", type=positive_int, default=None, help="tokens per side (default: model context)")
    p.add_argument("--split", default=None, help="train,val,test fractions (default 0.85,0.05,0.10)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only N pairs (seeded sample)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training split (default 1)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="train exactly N optimizer steps; overrides --epochs")
    p.add_argument("--batch-size", type=positive_int, default=None, help="pairs per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default 1e-6, as TRL)")
    p.add_argument("--patience", type=positive_int, default=None,
                   help="early stopping after N evaluations without improvement")
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between evaluations (default: each epoch)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run <out-dir>/<name> from its newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start over in a run directory that already has checkpoints (deletes them)")
    add_lora_flags(p)
    p.set_defaults(func=run)


def cli_overrides(args) -> dict:
    """The explicitly given flags as a nested override dict (they win over the recipe)."""
    from gptforge.commands import flag_overrides, parse_fractions

    fields = {"base": "checkpoint", "name": "name", "out_dir": "out_dir", "train.device": "device",
              "data.sources": "data", "data.skip_bad": "skip_bad", "data.max_len": "max_len", "data.limit": "limit",
              "dpo.beta": "beta", "dpo.loss_type": "loss_type", "dpo.precompute_ref": "precompute_ref",
              "optim.lr": "lr", "checkpoint.resume": "resume", "overwrite": "overwrite", **LORA_FIELDS}
    fields.update({f"train.{k}": k for k in ("epochs", "max_steps", "batch_size", "grad_accum", "patience",
                                             "eval_every")})
    o = flag_overrides(args, fields)
    if args.split:
        o.setdefault("data", {})["split"] = parse_fractions(args.split, "--split", "0.85,0.05,0.10")
    return o


def run(args) -> int:
    from gptforge.config import deep_merge, load_config, parse_overrides
    from gptforge.train.dpo import DPOConfig, run_dpo

    overrides = deep_merge(cli_overrides(args), parse_overrides(args.overrides or []))
    config = load_config(DPOConfig, args.config, overrides)
    result = run_dpo(config)
    print(f"tuned model: {result.checkpoint}")
    if (result.run_dir / "adapter").is_dir():
        print(f"LoRA adapter (peft): {result.run_dir / 'adapter'}")
    print(f"try it: gptforge chat --checkpoint {result.run_dir}")
    return 0
