"""Generation speed: gptforge's engine vs ``GPT2LMHeadModel.generate`` on the same weights, in one run.

Greedy decoding, the same real-text prompts, the same number of new tokens (end-of-text never stops either
side), batch 1 and batch 16, fp32 and/or bf16 (both sides in the same dtype). Prints a Markdown table
(tokens/s = generated tokens / wall time, prefill included; median over interleaved rounds, min–max spread)
and checks that both produce the same tokens.

Optional variants, timed in the same interleaved rounds: ``--compile`` (the engine's compiled static-shape
decoding step, ``Engine(compile=True)``; its compile time is reported apart) and ``--baseline-rev REV``
(the engine as of a git revision, e.g. ``HEAD`` before uncommitted changes, imported as ``gptforge_base``).

    python bench/bench_generate.py                       # presets mini and gpt2 (124M), random weights, fp32
    python bench/bench_generate.py --presets mini --dtypes fp32,bf16 --threads 1 --compile --baseline-rev HEAD
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from bench_loop import cpu_info  # the house machine report

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def real_prompts(n: int, tokens: int, tokenizer) -> list[list[int]]:
    """``n`` prompts of varied length (≤ ``tokens``) cut from "The Verdict" (offline data)."""
    data = Path(os.environ.get("GPTFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))
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


def load_baseline(rev: str):
    """The ``gptforge`` package as of git revision ``rev``, importable beside this one as ``gptforge_base``
    (its own imports renamed); returns its ``engine`` and ``model`` modules."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/gptforge"], check=True,
                             capture_output=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="gptforge_base_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    pkg = tmp / "gptforge_base"
    (tmp / "src" / "gptforge").rename(pkg)
    for py in pkg.rglob("*.py"):
        text = py.read_text(encoding="utf-8")
        for a, b in (("from gptforge.", "from gptforge_base."), ("from gptforge import", "from gptforge_base import"),
                     ("import gptforge.", "import gptforge_base."), ('"gptforge.', '"gptforge_base.')):
            text = text.replace(a, b)
        py.write_text(text, encoding="utf-8")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("gptforge_base.engine"), importlib.import_module("gptforge_base.model")


def time_interleaved(fns: dict, repeats: int, warmup: dict | None = None) -> tuple[dict, dict]:
    """Warm each function up once, then time ``repeats`` interleaved rounds (A B C, C B A, ...): seconds per
    round and the last outputs; ``warmup`` (if given) gets each warm-up's seconds (a compiled step compiles there)."""
    outs, warmup = {}, ({} if warmup is None else warmup)
    for name, fn in fns.items():
        t0 = time.perf_counter()
        outs[name] = fn()
        warmup[name] = time.perf_counter() - t0
    times: dict = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            outs[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times, outs


def cpu_summary() -> str:
    """CPU model and the flags that decide bf16 speed (AVX2, AVX512-BF16, AMX), from the house machine report."""
    info = cpu_info()
    have = [name for name, key in (("AVX2", "avx2"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_tile"))
            if info["flags"][key]]
    return f"{info['model']} ({', '.join(have) or 'flags unknown'}; {info['cores']} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="mini,gpt2", help="model shapes (gptforge.model.PRESETS), vocab 50257")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16 (both sides in that dtype)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time Engine(compile=True)")
    parser.add_argument("--baseline-rev", default=None, help="also time the engine as of this git revision")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from gptforge.engine import Engine, SamplingParams
    from gptforge.tokenizer import TiktokenTokenizer

    base = load_baseline(args.baseline_rev) if args.baseline_rev else None
    tok = TiktokenTokenizer()
    n = args.new_tokens
    print(f"# generation benchmark: {args.prompt_tokens}-token prompts (mixed lengths), {n} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, {cpu_summary()}, torch {torch.__version__}\n")
    sides = ["gptforge"] + (["compiled"] if args.compile else []) + ([f"{args.baseline_rev}"] if base else [])
    print("| model | dtype | batch | " + " | ".join(f"{s} tok/s" for s in sides) + " | HF generate tok/s | "
          + " | ".join(f"{s} / HF" for s in sides) + " | identical to HF |")
    print("|---|---|---:|" + "---:|" * (2 * len(sides) + 1) + ":---:|")
    results = {"threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens, "new_tokens": n,
               "repeats": args.repeats, "cpu": cpu_summary(), "torch": torch.__version__, "runs": []}
    for preset in args.presets.split(","):
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            ours, hf = build_models(preset)
            hf = hf.to(dtype)
            engines = {"gptforge": Engine(ours, tok, dtype=dtype)}
            if args.compile:
                engines["compiled"] = Engine(ours, tok, dtype=dtype, compile=True)
            if base:
                base_engine, base_model = base
                old = base_model.GPT(base_model.GPTConfig(**ours.config.to_dict())).eval()
                old.load_state_dict(ours.state_dict())
                engines[args.baseline_rev] = base_engine.Engine(old, tok, dtype=dtype)
            for e in engines.values():
                e.base_stop_ids = set()  # never stop early: every side produces exactly new_tokens tokens
            label = f"{preset} ({ours.num_params() / 1e6:.0f}M)"
            for batch in [int(b) for b in args.batches.split(",")]:
                prompts = real_prompts(batch, args.prompt_tokens, tok)
                width = max(map(len, prompts))
                input_ids = torch.tensor([[tok.eot_id] * (width - len(p)) + p for p in prompts])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

                def run_engine(engine):
                    params = SamplingParams(max_new_tokens=n, temperature=0)
                    if engine.__module__ != "gptforge.engine":
                        params = sys.modules[engine.__module__].SamplingParams(max_new_tokens=n, temperature=0)
                    return [c.token_ids for c in engine.generate(prompts, params)]

                def run_hf():
                    with torch.inference_mode():
                        out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=tok.eot_id)
                    return out[:, width:].tolist()

                fns = {name: (lambda e=e: run_engine(e)) for name, e in engines.items()}
                fns["transformers"] = run_hf
                warmup: dict = {}
                times, outs = time_interleaved(fns, args.repeats, warmup)
                rates = {k: [batch * n / t for t in v] for k, v in times.items()}
                median = {k: statistics.median(v) for k, v in rates.items()}
                same = {k: sum(a == b for a, b in zip(outs[k], outs["transformers"])) for k in engines}
                same_as_ours = {k: sum(a == b for a, b in zip(outs[k], outs["gptforge"])) for k in engines}
                results["runs"].append({
                    "preset": preset, "dtype": dtype_name, "params_m": ours.num_params() / 1e6, "batch": batch,
                    "tokens_per_s": median, "rounds": rates, "warmup_s": warmup,
                    "speedup": median["gptforge"] / median["transformers"], "identical": same["gptforge"],
                    "speedups": {k: median[k] / median["transformers"] for k in engines},
                    "identical_to_hf": same, "identical_to_gptforge": same_as_ours})
                cells = {k: f"{median[k]:,.0f} ({min(v):,.0f}–{max(v):,.0f})" for k, v in rates.items()}
                print(f"| {label} | {dtype_name} | {batch} | " + " | ".join(cells[s] for s in sides)
                      + f" | {cells['transformers']} | "
                      + " | ".join(f"{median[s] / median['transformers']:.2f}×" for s in sides)
                      + " | " + ", ".join(f"{s} {same[s]}/{batch}" for s in sides) + " |", flush=True)
            if args.compile:
                print(f"<!-- {label} {dtype_name}: compiled warm-up (compile + first run) "
                      f"{warmup['compiled']:.1f} s -->", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
