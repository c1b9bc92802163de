"""``gptforge import``: a Hugging Face GPT-2 (or Llama / Qwen3: the modern family) directory → a gptforge checkpoint."""

from gptforge.commands import add_parser


def register(sub) -> None:
    p = add_parser(sub, "import", "import a Hugging Face GPT-2, Llama or Qwen3 directory or Hub model as a gptforge "
                   "checkpoint",
                   "gptforge import openai-community/gpt2 --out ckpt/gpt2")
    p.add_argument("hf_dir", metavar="HF_DIR|HUB_ID",
                   help="directory with config.json and model.safetensors (or pytorch_model.bin), or a Hub model "
                        "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, OWNER/NAME), downloaded once into the HF cache")
    p.add_argument("--out", required=True, help="output checkpoint directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing same-named files")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from gptforge.checkpoint import save_model
    from gptforge.hf import import_hf
    from gptforge.hub_models import download, hub_repo
    from gptforge.io import output_directory

    output_directory(args.out, "--out", args.overwrite)
    repo = hub_repo(args.hf_dir)
    model, tokenizer = import_hf(download(repo) if repo else Path(args.hf_dir))
    out = save_model(args.out, model, tokenizer, extra={"source": str(args.hf_dir)})
    family = getattr(model.config, "family", "gpt2")
    print(f"imported {args.hf_dir} ({model.num_params():,} parameters, {family} family) → {out}")
    return 0
