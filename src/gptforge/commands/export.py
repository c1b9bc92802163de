"""``gptforge export``: a checkpoint → a Hugging Face directory (+ model card), optionally pushed to the Hub: GPT-2
models as ``GPT2LMHeadModel``, the modern family as ``LlamaForCausalLM`` (or ``Qwen3ForCausalLM`` with QK-norm)."""

import json

from gptforge.commands import add_parser


def register(sub) -> None:
    p = add_parser(sub, "export", "export a checkpoint as a Hugging Face directory with a model card (GPT2LMHeadModel; "
                   "LlamaForCausalLM or Qwen3ForCausalLM for the modern family)",
                   "gptforge export --checkpoint runs/quickstart/sft --out hf/my-model --push-to-hub me/my-model")
    p.add_argument("--checkpoint", required=True, help="checkpoint step dir, run dir or HF directory")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing same-named files")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="upload the exported folder to this Hub model repo (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--license", default="apache-2.0", help="license id for the model card")
    p.add_argument("--dataset", action="append", default=None, help="Hub dataset id used for training (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from gptforge.publish import export_with_card, push_to_hub

    out = export_with_card(args.checkpoint, args.out, repo_id=args.push_to_hub, license=args.license,
                           datasets=args.dataset, overwrite=args.overwrite)
    arch = json.loads((out / "config.json").read_text(encoding="utf-8")).get("architectures", ["?"])[0]
    print(f"exported {args.checkpoint} → {out} as {arch} (weights, config, tokenizer, generation config, README.md "
          "model card)")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"uploaded to {url}")
    return 0
