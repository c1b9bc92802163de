"""``gptforge quickstart``: tokenizer → data → pretrain → SFT → eval → samples → report, CPU-sized."""

from gptforge.commands import add_parser


def register(sub) -> None:
    p = add_parser(sub, "quickstart", "run the whole journey on the default data (about 10 minutes on 2 CPU cores)",
                   "GPTFORGE_DATA_DIR=/path/to/data gptforge quickstart", accepts_overrides=True)
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--fresh", action="store_true", help="delete earlier outputs and start over")
    p.add_argument("--smoke", action="store_true", help="a seconds-long variant with tiny sizes (for tests)")
    p.epilog += ("\n\nany field of the quickstart config can be overridden, e.g. --pretrain_steps=1500 "
                 "--preset=small --hellaswag_items=1000")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import asdict

    from gptforge.config import from_dict, parse_overrides
    from gptforge.quickstart import QuickstartConfig, run_quickstart, smoke_config

    base = smoke_config(args.out) if args.smoke else QuickstartConfig(out=args.out)
    cfg = from_dict(QuickstartConfig, {**asdict(base), **parse_overrides(args.overrides)}, where="quickstart")
    run_quickstart(cfg, fresh=args.fresh)
    return 0
