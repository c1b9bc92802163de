"""``gptforge export``: a checkpoint → a Hugging Face GPT-2 directory."""

from gptforge.commands import add_parser


def register(sub) -> None:
    p = add_parser(sub, "export", "export a checkpoint as a Hugging Face GPT2LMHeadModel directory",
                   "gptforge export --checkpoint runs/mini --out hf/mini")
    p.add_argument("--checkpoint", required=True, help="checkpoint step dir, run dir or HF directory")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from gptforge.hf import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} → {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0
