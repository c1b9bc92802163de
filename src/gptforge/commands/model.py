"""``gptforge model info``: parameters, FLOPs per token and memory estimates for a preset or checkpoint."""

from __future__ import annotations

import json

from gptforge.commands import add_parser, nonneg_int, positive_int


def register(sub) -> None:
    p = sub.add_parser("model", help="inspect model shapes, sizes and memory needs")
    msub = p.add_subparsers(dest="model_command", metavar="<action>", required=True)
    info = add_parser(msub, "info", "parameters, FLOPs/token and training/inference memory estimates",
                      "gptforge model info --preset gpt2 --micro-batch 16 --seq-len 1024 --precision bf16")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="named preset (gpt2, gpt2-medium, ..., tiny, mini; the modern "
                                                    "family: modern-124m, modern-355m, ..., modern-tiny, modern-mini)")
    src.add_argument("--checkpoint", default=None, help="checkpoint, run directory or HF GPT-2 directory")
    info.add_argument("--micro-batch", type=positive_int, default=8)
    info.add_argument("--seq-len", type=positive_int, default=None, help="default: the model's context length")
    info.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    info.add_argument("--no-flash", action="store_true", help="attention without fused kernels (stores scores)")
    info.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                      help="optimizer state in the training estimate (muon: one buffer for the blocks' matrices)")
    info.add_argument("--dpo-pairs", type=nonneg_int, default=0, metavar="N",
                      help="also estimate DPO at N preference pairs per micro-batch (2N sequences) with a frozen "
                           "reference copy, and with --precompute-ref")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    info.add_argument("--lora-r", type=nonneg_int, default=0,
                      help="also estimate LoRA training at rank r (frozen weights in --precision, fp32 adapters)")
    info.add_argument("--lora-target", action="append", default=None, metavar="MODULE",
                      help="LoRA target layer (repeat; default: the attention and MLP projections)")
    info.set_defaults(func=run_info)


def _config_from_args(args):
    from gptforge.config import from_dict, parse_scalar
    from gptforge.errors import GptforgeError
    from gptforge.model import GPTConfig
    from gptforge.model_modern import config_from_dict

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise GptforgeError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = parse_scalar(v)
    if args.checkpoint:
        from gptforge.checkpoint import is_hf_directory, read_model_config, resolve_checkpoint

        d = resolve_checkpoint(args.checkpoint)
        if is_hf_directory(d):
            from gptforge.hf import config_from_hf
            from gptforge.io import read_json

            return config_from_hf(read_json(d / "config.json", "Hugging Face config"), str(d))
        meta = read_model_config(d)
        return config_from_dict({"family": meta.get("family", "gpt2"), **meta["model"], **overrides})
    from gptforge.model import PRESETS
    from gptforge.model_modern import PRESETS as MODERN_PRESETS

    name = args.preset or "gpt2"
    if name in MODERN_PRESETS:
        return config_from_dict({**MODERN_PRESETS[name], **overrides, "family": "modern"})
    if name not in PRESETS:
        raise GptforgeError(f"unknown model preset {name!r}; choose one of: {', '.join([*PRESETS, *MODERN_PRESETS])}")
    return from_dict(GPTConfig, {**PRESETS[name], **overrides}, where="model")


def _lora_estimate(config, args, seq_len: int, params: int) -> dict:
    """LoRA training memory for ``--lora-r``: frozen weights, fp32 adapters with gradients and AdamW, activations."""
    from gptforge.memory import default_lora_targets, lora_param_count, lora_training_memory

    targets = args.lora_target or list(default_lora_targets(config))
    a = lora_param_count(config, args.lora_r, targets)
    m = lora_training_memory(config, args.micro_batch, seq_len, args.precision, args.lora_r, targets,
                             flash=not args.no_flash)
    memory = {f"frozen weights ({args.precision})": m.weights - 4 * a, "adapters (fp32)": 4 * a,
              "adapter gradients": m.gradients, "adapter AdamW": m.optimizer, "activations": m.activations,
              "logits + loss": m.logits, "total": m.total}
    return {"r": args.lora_r, "targets": list(targets), "trainable": a, "trainable_share": a / (params + a),
            "memory": memory}


def run_info(args) -> int:
    from gptforge.memory import dpo_training_memory, human_bytes, human_count, model_summary, training_memory

    config = _config_from_args(args)
    s = model_summary(config, args.micro_batch, args.seq_len, args.precision)
    flash = not args.no_flash
    train = training_memory(config, args.micro_batch, s["seq_len"], args.precision, flash, args.optimizer)
    lora = _lora_estimate(config, args, s["seq_len"], s["params"]) if args.lora_r else None
    dpo = {ref: dpo_training_memory(config, args.dpo_pairs, s["seq_len"], args.precision, flash, args.optimizer, ref)
           for ref in ("copy", "precomputed")} if args.dpo_pairs else None
    if args.json:
        out = {**s, "training": {k: v for k, v in train.rows()}, **({"lora_training": lora} if lora else {}),
               **({"dpo_training": {ref: dict(m.rows()) for ref, m in dpo.items()}} if dpo else {})}
        print(json.dumps(out, indent=2))
        return 0
    c = config
    if getattr(c, "family", "gpt2") == "modern":
        print(f"model (modern family): {c.n_layer} layers, {c.n_head} heads ({c.n_kv_head} key/value), d={c.n_embd}, "
              f"context {c.block_size}, vocab {c.vocab_size}, tied={c.tie_embeddings}, norm={c.norm}, "
              f"mlp={c.mlp} ({c.mlp_hidden}), pos={c.pos}, qk_norm={c.qk_norm}")
    else:
        print(f"model: {c.n_layer} layers, {c.n_head} heads, d={c.n_embd}, context {c.block_size}, "
              f"vocab {c.vocab_size}, tied={c.tie_embeddings}, bias={c.bias}, qkv_bias={c.qkv_bias}")
    print(f"parameters: {s['params']:,} ({human_count(s['params'])}); non-embedding {s['params_non_embedding']:,}")
    print(f"training FLOPs/token at T={s['seq_len']}: {s['flops_per_token']:.3e} (6N + 12·L·d·T)")
    print(f"training memory, micro-batch {args.micro_batch} × {s['seq_len']} tokens, {args.precision}, "
          f"{train.optimizer_name}:")
    for name, value in train.rows():
        print(f"  {name:<24} {human_bytes(value):>12}")
    if dpo:
        copy, pre = dpo["copy"], dpo["precomputed"]
        print(f"DPO training memory, {args.dpo_pairs} pairs ({2 * args.dpo_pairs} sequences) × {s['seq_len']} "
              f"tokens, {args.precision}, {copy.optimizer_name}; reference copy | --precompute-ref:")
        for (name, value), (_, other) in zip(copy.rows(), [*pre.rows()[:-1], (None, 0.0), pre.rows()[-1]]):
            print(f"  {name:<24} {human_bytes(value):>12} | {human_bytes(other):>12}")
    if lora:
        print(f"LoRA training memory, r={lora['r']} on {', '.join(lora['targets'])} ({lora['trainable']:,} trainable "
              f"parameters, {lora['trainable_share']:.2%}), micro-batch {args.micro_batch} × {s['seq_len']} tokens, "
              f"frozen weights in {args.precision}:")
        for name, value in lora["memory"].items():
            print(f"  {name:<24} {human_bytes(value):>12}")
        for gib in (16, 24, 40, 80):
            if lora["memory"]["total"] <= gib * 2**30 * 0.9:  # headroom: CUDA context, allocator fragmentation
                print(f"  fits a {gib} GB GPU (with 10% to spare)")
                break
    print(f"inference memory, batch 1 × {s['seq_len']} tokens, {args.precision} weights + KV cache:")
    for name, value in s["inference"].items():
        print(f"  {name:<24} {human_bytes(value):>12}")
    return 0
