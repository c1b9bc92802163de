"""Training throughput: gptforge's GPT vs ``transformers.GPT2LMHeadModel`` on the same config, same process.

Both models get identical shapes (default L4 D256 H4 V4096 T256 B16, no dropout, tied embeddings), identical
token batches and the same step: forward with loss, backward, gradient clipping at 1.0, AdamW step, zero grads.
Each side uses its natural setup: gptforge ``configure_optimizer`` (foreach/fused AdamW, parameter groups) and
SDPA attention; HF ``GPT2LMHeadModel`` (SDPA attention in transformers ≥ 4.36) with ``torch.optim.AdamW`` at
its defaults. Measurements are interleaved (ours, theirs, ours, ...) so machine load affects both alike; the
reported figure is the median tokens/s over rounds. ``--full-loop`` also times ``run_pretrain`` end to end
(loader, logging, metrics.jsonl) on real tokens (tinyshakespeare, 4k BPE) with the same model shape.

    python bench/bench_train.py                      # fp32 + bf16 autocast, prints a table, writes bench/out/
    python bench/bench_train.py --compile --full-loop
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_models(L, D, H, V, T):
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptforge.model import GPT, GPTConfig

    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=D, dropout=0.0))
    hf_cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    hf_cfg._attn_implementation = "sdpa"
    theirs = GPT2LMHeadModel(hf_cfg)
    return ours, theirs


def make_step(model, optimizer, precision: str, is_hf: bool, compiled: bool):
    ctx_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(model) if compiled else model

    def step(x, y):
        with torch.autocast("cpu" if x.device.type == "cpu" else x.device.type, dtype=ctx_dtype,
                            enabled=ctx_dtype is not None):
            if is_hf:
                loss = fwd(input_ids=x, labels=x).loss  # HF shifts labels internally
            else:
                loss = fwd(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def bench_pair(args, precision: str, compiled: bool) -> dict:
    from gptforge.train.optim import configure_optimizer

    L, D, H, V, T, B = args.layers, args.dim, args.heads, args.vocab, args.seq_len, args.batch
    ours, theirs = build_models(L, D, H, V, T)
    device = torch.device(args.device)
    ours.to(device).train()
    theirs.to(device).train()
    opt_ours = configure_optimizer(ours, lr=3e-4, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    steps = {"gptforge": make_step(ours, opt_ours, precision, False, compiled),
             "transformers": make_step(theirs, opt_theirs, precision, True, compiled)}
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (args.rounds * args.steps + args.warmup + 1, B, T + 1), generator=g)

    def run(name, idx):
        chunk = data[idx].to(device)
        x = chunk[:, :-1]
        y = chunk[:, 1:]
        steps[name](x, x if name == "transformers" else y)

    for name in steps:  # warm-up (and compilation)
        for i in range(args.warmup):
            run(name, i)
    rates: dict[str, list[float]] = {n: [] for n in steps}
    k = args.warmup
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.steps):
                run(name, k + i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(args.steps * B * T / (time.perf_counter() - t0))
        k += args.steps
    med = {n: statistics.median(v) for n, v in rates.items()}
    return {"precision": precision, "compile": compiled, "tokens_per_s": med, "rounds": rates,
            "speedup": med["gptforge"] / med["transformers"]}


def full_loop(args) -> dict:
    """``run_pretrain`` end to end on tinyshakespeare (4k BPE shards), same model shape, fp32."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _helpers import train_small_bpe, write_dataset

    from gptforge.train.pretrain import PretrainConfig, run_pretrain

    data_dir = Path(os.environ.get("GPTFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))
    text = (data_dir / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_small_bpe(text, args.vocab)
        shards = write_dataset(Path(tmp) / "shards", tok, text)
        cfg = PretrainConfig(name="bench", out_dir=tmp)
        cfg.model.preset = "tiny"
        cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size = (
            args.layers, args.dim, args.heads, args.seq_len)
        cfg.model.vocab_size = args.vocab
        cfg.data.path, cfg.data.seq_len = str(shards), args.seq_len
        cfg.train.micro_batch, cfg.train.max_steps, cfg.train.precision = args.batch, args.full_loop_steps, "fp32"
        cfg.train.device = args.device
        cfg.eval.sample_tokens = 16
        cfg.log.progress = False
        r = run_pretrain(cfg, log=lambda *a: None)
        recs = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [x["tokens_per_s"] for x in recs[3:]] or [x["tokens_per_s"] for x in recs]
    return {"steps": r.steps, "tokens_per_s_overall": r.summary["tokens_per_s"],
            "tokens_per_s_median_step": statistics.median(steady), "mfu": r.summary["mfu"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--compile", action="store_true", help="also measure both under torch.compile")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full-loop", action="store_true", help="also time run_pretrain end to end")
    p.add_argument("--full-loop-steps", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "train.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    results = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "device": args.device,
                           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
               "config": {k: getattr(args, k) for k in ("layers", "dim", "heads", "vocab", "seq_len", "batch",
                                                          "steps", "rounds", "warmup")},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    variants = [(prec, False) for prec in args.precision.split(",")]
    if args.compile:
        variants += [(prec, True) for prec in args.precision.split(",")]
    print(f"L{args.layers} D{args.dim} H{args.heads} V{args.vocab} T{args.seq_len} B{args.batch} on {args.device} "
          f"({torch.get_num_threads()} threads); median tokens/s over {args.rounds} interleaved rounds")
    print(f"{'precision':<10}{'compile':<9}{'gptforge':>12}{'transformers':>14}{'ratio':>8}")
    for prec, comp in variants:
        r = bench_pair(args, prec, comp)
        results["runs"].append(r)
        t = r["tokens_per_s"]
        print(f"{prec:<10}{comp!s:<9}{t['gptforge']:>12,.0f}{t['transformers']:>14,.0f}{r['speedup']:>7.2f}×")
    if args.full_loop:
        fl = full_loop(args)
        results["full_loop"] = fl
        print(f"full loop (run_pretrain, fp32, {fl['steps']} steps): {fl['tokens_per_s_median_step']:,.0f} tokens/s "
              f"per step (median), {fl['tokens_per_s_overall']:,.0f} overall incl. eval/checkpoint")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
