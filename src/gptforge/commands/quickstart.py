"""``gptforge quickstart``: tokenizer → data → pretrain → SFT → eval → samples → report, CPU-sized."""

from gptforge.commands import add_parser

MODERN_COUNTERPART = {"tiny": "modern-tiny", "mini": "modern-mini"}  # equal parameters (model_modern.PRESETS)


def register(sub) -> None:
    p = add_parser(sub, "quickstart", "run the whole journey on the default data (about 10 minutes on 2 CPU cores)",
                   "gptforge quickstart", accepts_overrides=True)
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--fresh", action="store_true", help="delete earlier outputs and start over")
    p.add_argument("--smoke", action="store_true", help="a seconds-long variant with tiny sizes (for tests)")
    p.add_argument("--dpo", action="store_true",
                   help="add a DPO stage after SFT on the book's preference pairs (embedded; report: held-out reward "
                        "accuracy before and after)")
    p.add_argument("--family", choices=("gpt2", "modern"), default="gpt2",
                   help="gpt2: GPT-2's architecture + AdamW (default); modern: RoPE, RMSNorm, SwiGLU, no biases "
                        "(preset modern-mini, the same parameter count) + Muon")
    p.epilog += ("\n\nany field of the quickstart config can be overridden, e.g. --pretrain_steps=1500 "
                 "--preset=small --hellaswag_items=1000"
                 "\n\ndata: each default dataset comes from $GPTFORGE_DATA_DIR when it holds it, else the download "
                 "cache,\nelse the copy shipped inside gptforge (tinyshakespeare, the 1.1k instruction set, the first "
                 "1,000\nHellaSwag items; no network needed). WikiText-2 and TinyStories are not shipped (share-alike "
                 "licenses):\nwithout a local copy they are skipped. Datasets you name are required and may be "
                 "downloaded:\n--corpus=[tinyshakespeare,wikitext2] --instructions=FILE|OWNER/NAME "
                 "--hellaswag=FILE|Rowan/hellaswag.\nThe report lists every file used, where it came from and its "
                 "sha256.")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import asdict

    from gptforge.config import from_dict, parse_overrides
    from gptforge.quickstart import QuickstartConfig, run_quickstart, smoke_config

    base = smoke_config(args.out) if args.smoke else QuickstartConfig(out=args.out)
    base.dpo = base.dpo or args.dpo
    if args.family == "modern":  # the modern counterpart of the GPT-2 preset, and Muon
        base.preset, base.optimizer = MODERN_COUNTERPART[base.preset], "muon"
    cfg = from_dict(QuickstartConfig, {**asdict(base), **parse_overrides(args.overrides)}, where="quickstart")
    run_quickstart(cfg, fresh=args.fresh)
    return 0
