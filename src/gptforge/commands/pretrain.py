"""``gptforge pretrain``: train a GPT from scratch (or continue from weights) on prepared shards."""

from gptforge.commands import add_parser


def register(sub) -> None:
    p = add_parser(sub, "pretrain",
                   "pretrain a GPT on prepared token shards (single process, or under torchrun for DDP/FSDP)",
                   "gptforge pretrain --config recipes/cpu-tinyshakespeare.yaml --data.path=data/shakespeare "
                   "--train.max_steps=200", accepts_overrides=True)
    p.add_argument("--config", action="append", default=[],
                   help="recipe YAML (sections model/data/train/optim/eval/checkpoint/log); repeat to layer "
                        "override files, e.g. an intervention on top of a baseline")
    p.add_argument("--name", default=None, help="run name: outputs go to <out_dir>/<name> (default from the recipe)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest valid checkpoint")
    p.add_argument("--fallback", action="store_true",
                   help="with --resume: skip a corrupt/partial latest checkpoint and use the previous good one")
    p.add_argument("--dry-run", action="store_true",
                   help="build on the meta device and print steps, tokens, accumulation and memory; train nothing")
    p.add_argument("--init-from", default=None, metavar="CKPT|HF_DIR",
                   help="start from these weights (gptforge checkpoint or HF GPT-2 dir); tokenizer comes with them")
    p.add_argument("--micro-batch", default=None, metavar="N|auto",
                   help="sequences per forward pass per process; 'auto' finds the largest that fits")
    p.epilog += ("\n\noverrides: any --section.key=value, e.g. --train.precision=bf16 --train.compile=true "
                 "--optim.lr=3e-4\nmulti-GPU: torchrun --nproc_per_node=8 -m gptforge pretrain --config RECIPE")
    p.set_defaults(func=run)


def build_config(args):
    """The resolved :class:`PretrainConfig` from the recipe, the dedicated flags and dotted overrides."""
    from gptforge.config import deep_merge, from_dict, parse_overrides, read_yaml
    from gptforge.train.pretrain import PretrainConfig

    data: dict = {}
    for path in args.config:
        data = deep_merge(data, read_yaml(path))
    data = deep_merge(data, parse_overrides(list(args.overrides or [])))
    flags: dict = {}
    if args.name:
        flags["name"] = args.name
    if args.resume:
        flags.setdefault("checkpoint", {})["resume"] = True
    if args.fallback:
        flags.setdefault("checkpoint", {})["fallback"] = True
    if args.init_from:
        flags.setdefault("model", {})["init_from"] = args.init_from
    if args.micro_batch is not None:
        mb = args.micro_batch
        flags.setdefault("train", {})["micro_batch"] = int(mb) if mb.isdigit() else mb
    return from_dict(PretrainConfig, deep_merge(data, flags))


def run(args) -> int:
    from gptforge.train.pretrain import dry_run, run_pretrain

    cfg = build_config(args)
    if args.dry_run:
        dry_run(cfg)
        return 0
    run_pretrain(cfg)  # a SIGTERM/SIGINT stop also ends normally, after its checkpoint
    return 0
