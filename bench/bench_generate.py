"""Generation speed: gptforge's engine vs ``GPT2LMHeadModel.generate`` on the same weights, in one run.

Greedy decoding, the same real-text prompts, the same number of new tokens (end-of-text never stops either
side), batch 1 and batch 16. Prints a Markdown table (tokens/s = generated tokens / wall time, prefill
included) and checks that both produce the same tokens.

    python bench/bench_generate.py                       # presets mini and gpt2 (124M), random weights
    python bench/bench_generate.py --presets mini --threads 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def real_prompts(n: int, tokens: int, tokenizer) -> list[list[int]]:
    """``n`` prompts of varied length (≤ ``tokens``) cut from "The Verdict" (offline data)."""
    data = Path(os.environ.get("GPTFORGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ids = tokenizer.encode((data / "pretrain" / "the-verdict.txt").read_text(encoding="utf-8"))
    prompts = []
    for i in range(n):
        length = tokens - (i * 7) % (tokens // 2)  # mixed lengths exercise left padding
        start = (i * 131) % (len(ids) - tokens)
        prompts.append(ids[start : start + length])
    return prompts


def build_models(preset: str):
    from transformers import GPT2LMHeadModel

    from gptforge.hf import hf_config, to_hf_state_dict
    from gptforge.model import GPT
    from gptforge.model import preset as make_preset

    torch.manual_seed(0)
    config = make_preset(preset, vocab_size=50257, block_size=1024)
    ours = GPT(config).eval()
    hf = GPT2LMHeadModel(hf_config(config, None)).eval()  # no eos: both sides generate every token
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    hf.tie_weights()
    return ours, hf


def time_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Warm each function up once, then time ``repeats`` interleaved rounds (A B, B A, ...): seconds per round."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up
    times: dict = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            outs[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="mini,gpt2", help="model shapes (gptforge.model.PRESETS), vocab 50257")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from gptforge.engine import Engine, SamplingParams
    from gptforge.tokenizer import TiktokenTokenizer

    tok = TiktokenTokenizer()
    n = args.new_tokens
    print(f"# generation benchmark: {args.prompt_tokens}-token prompts (mixed lengths), {n} new tokens, greedy, "
          f"fp32, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print("| model | batch | gptforge tok/s | HF generate tok/s | speed-up | identical tokens |")
    print("|---|---:|---:|---:|---:|:---:|")
    results = {"threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens, "new_tokens": n,
               "repeats": args.repeats, "runs": []}
    for preset in args.presets.split(","):
        ours, hf = build_models(preset)
        engine = Engine(ours, tok)
        engine.base_stop_ids = set()  # never stop early: both sides produce exactly new_tokens tokens
        label = f"{preset} ({ours.num_params() / 1e6:.0f}M)"
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = real_prompts(batch, args.prompt_tokens, tok)
            width = max(map(len, prompts))
            input_ids = torch.tensor([[tok.eot_id] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

            def run_ours():
                return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))]

            def run_hf():
                with torch.inference_mode():
                    out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=tok.eot_id)
                return out[:, width:].tolist()

            times, outs = time_interleaved({"gptforge": run_ours, "transformers": run_hf}, args.repeats)
            ids_ours, ids_hf = outs["gptforge"], outs["transformers"]
            same = sum(a == b for a, b in zip(ids_ours, ids_hf))
            rates = {k: [batch * n / t for t in v] for k, v in times.items()}
            tps_ours, tps_hf = statistics.median(rates["gptforge"]), statistics.median(rates["transformers"])
            results["runs"].append({"preset": preset, "params_m": ours.num_params() / 1e6, "batch": batch,
                                    "tokens_per_s": {"gptforge": tps_ours, "transformers": tps_hf},
                                    "rounds": rates, "speedup": tps_ours / tps_hf, "identical": same})
            print(f"| {label} | {batch} | {tps_ours:,.0f} | {tps_hf:,.0f} | {tps_ours / tps_hf:.2f}× | {same}/{batch} |",
                  flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
