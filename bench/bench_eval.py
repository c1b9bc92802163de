"""Evaluation throughput: HellaSwag items/s with gptforge's scorer vs a per-item transformers loop.

The same random-weight model (a CPU-sized preset over the GPT-2 vocabulary) is scored on the first N HellaSwag
validation items (offline copy) by ``gptforge.eval.evaluate_choice`` at several batch sizes and by the common
reference loop (nanoGPT's ``hellaswag.py`` style: one forward per item over its 4 padded endings, with
``GPT2LMHeadModel``). Prints a Markdown table, checks that all runs predict the same answers, and writes JSON.

    python bench/bench_eval.py                                  # preset tiny, 200 items, 2 threads
    python bench/bench_eval.py --preset mini --items 500 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str):
    from transformers import GPT2LMHeadModel

    from gptforge.hf import hf_config, to_hf_state_dict
    from gptforge.model import GPT
    from gptforge.model import preset as make_preset

    torch.manual_seed(0)
    config = make_preset(preset, vocab_size=50257, block_size=max(256, make_preset(preset).block_size))
    ours = GPT(config).eval()
    with torch.no_grad():  # sharper than init so predictions are decisive (ties would make the check moot)
        ours.lm_head.weight.mul_(8)
    hf = GPT2LMHeadModel(hf_config(config, None)).eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    hf.tie_weights()
    return ours, hf


@torch.no_grad()
def reference_loop(hf, tokenizer, items) -> list[int]:
    """Per item: the 4 (context + ending) rows right-padded in one batch, sum of ending log-probs."""
    preds = []
    for item in items:
        ctx = tokenizer.encode(item.context)
        rows = [ctx + tokenizer.encode(" " + c) for c in item.choices]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        logp = torch.log_softmax(hf(ids).logits.float(), -1)
        scores = []
        for i, r in enumerate(rows):
            targets = torch.tensor(r[len(ctx):])
            scores.append(logp[i, len(ctx) - 1 : len(r) - 1].gather(1, targets[:, None]).sum().item())
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "eval_hellaswag.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GPTFORGE_DATA_DIR", str(ROOT.parent / "shared" / "data"))

    from gptforge.eval import evaluate_choice, load_hellaswag
    from gptforge.tokenizer import TiktokenTokenizer

    tokenizer = TiktokenTokenizer()
    items = load_hellaswag(limit=args.items)
    ours, hf = build(args.preset)
    rows, preds = [], {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        evaluate_choice(ours, tokenizer, "hellaswag", items=items[:8], batch_size=bs, show_progress=False)  # warm-up
        t0 = time.perf_counter()
        res = evaluate_choice(ours, tokenizer, "hellaswag", items=items, batch_size=bs, show_progress=False)
        dt = time.perf_counter() - t0
        preds[f"gptforge bs={bs}"] = [p["pred"] for p in res["predictions"]]
        rows.append({"impl": f"gptforge eval choice (batch {bs})", "items": len(items), "seconds": dt,
                     "items_per_s": len(items) / dt, "acc": res["metrics"]["acc"]})
    reference_loop(hf, tokenizer, items[:8])
    t0 = time.perf_counter()
    ref = reference_loop(hf, tokenizer, items)
    dt = time.perf_counter() - t0
    preds["reference"] = ref
    rows.append({"impl": "transformers per-item loop", "items": len(items), "seconds": dt,
                 "items_per_s": len(items) / dt, "acc": sum(p == i.gold for p, i in zip(ref, items)) / len(items)})
    agree = {k: sum(a == b for a, b in zip(v, ref)) / len(ref) for k, v in preds.items()}

    print(f"HellaSwag, first {len(items)} validation items, preset {args.preset} (random weights, vocab 50257), "
          f"{args.threads} CPU threads, torch {torch.__version__}")
    print("| implementation | items/s | seconds | acc | same predictions as reference |")
    print("|---|---:|---:|---:|---:|")
    for r, (name, a) in zip(rows, agree.items()):
        print(f"| {r['impl']} | {r['items_per_s']:.1f} | {r['seconds']:.2f} | {r['acc']:.3f} | {a:.1%} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "threads": args.threads, "items": len(items),
                               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "torch": torch.__version__, "results": rows, "agreement": agree}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
