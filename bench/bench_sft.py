"""SFT batching benchmark: padded vs length-grouped vs packed batches on the real instruction data.

For each batching mode, trains a fresh model for a fixed number of optimizer steps and reports the padding
fraction (input positions that are padding), supervised (answer) tokens per second and the time per step.
Packing and grouping should waste far fewer positions than plain padding.

    python bench/bench_sft.py --preset mini --steps 20               # CPU-sized
    python bench/bench_sft.py --preset gpt2 --device cuda --steps 50 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="instruction data (default $GPTFORGE_DATA_DIR/instruct/instruction-data.json)")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--modes", default="pad,group,pack")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from gptforge.data.chat import encode_dataset, epoch_batches, load_records, prompt_style, to_conversations
    from gptforge.model import GPT, preset
    from gptforge.tokenizer import load_tokenizer
    from gptforge.train.sft import prepare_chat_model

    data = args.data or str(Path(os.environ.get("GPTFORGE_DATA_DIR", "../shared/data")) / "instruct" /
                            "instruction-data.json")
    style = prompt_style("chat")
    convs, _ = to_conversations(load_records(data))
    device = torch.device(args.device)
    results = []
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        tok = load_tokenizer("gpt2")
        model = GPT(preset(args.preset, vocab_size=50257, block_size=max(args.max_len, 64)))
        prepare_chat_model(model, tok, style)
        examples, _ = encode_dataset(convs, tok, style, args.max_len, progress=False)
        batches = epoch_batches(examples, mode, args.batch_size, tok.eot_id, args.max_len, seed=0)[: args.steps + 2]
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        positions = padding = supervised = 0
        for i, b in enumerate(batches):
            if i == 2:  # warm-up steps excluded from timing
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            b = b.to(device)
            _, loss = model(b.input_ids, targets=b.targets, attention_mask=b.attention_mask, position_ids=b.position_ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                positions += b.input_ids.numel()
                padding += int((b.example_ids < 0).sum())
                supervised += b.num_supervised
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        steps = max(len(batches) - 2, 1)
        row = {"mode": mode, "steps": steps, "padding_fraction": round(padding / max(positions, 1), 3),
               "supervised_tokens_per_s": round(supervised / elapsed, 1), "s_per_step": round(elapsed / steps, 4),
               "examples_per_step": round(len(examples) / len(epoch_batches(examples, mode, args.batch_size,
                                                                             tok.eot_id, args.max_len, 0)), 2)}
        results.append(row)
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
