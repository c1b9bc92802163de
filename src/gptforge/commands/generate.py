"""``gptforge generate``: continue prompts (from arguments or a file) with a checkpoint, batched."""

from __future__ import annotations

import argparse
import json
import sys

from gptforge.commands import add_parser, nonneg_float, nonneg_int, positive_float, positive_int, seed_int
from gptforge.sampling_defaults import SAMPLING_DEFAULTS


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint step dir, run dir (its latest) or HF GPT-2 dir")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default auto: the one precision rule, bf16 where the CPU/GPU computes it natively, else float32 on CPU, float16 on older GPUs)")
    p.add_argument("--context-policy", default="error", choices=["error", "slide"],
                   help="a prompt longer than the context: fail, or keep its last tokens (default: error)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd static-shape step, with CUDA graphs on CUDA (untested "
                        "here); compiles first (seconds to a minute); on CPU measured no faster than the default; "
                        "tokens may differ in near-ties (serve: --batching static only)")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    d = SAMPLING_DEFAULTS  # the one set of defaults, shared with `gptforge serve` and its web page
    g = p.add_argument_group(
        "sampling", f"defaults (shared by generate, chat, serve and the web page): temperature {d.temperature}, "
                    f"top-p {d.top_p}, repetition penalty {d.repetition_penalty}. --greedy / --temperature 0 is "
                    "plain argmax, as Hugging Face's generate(do_sample=False): no penalty unless you give one.")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help=f"(default: {max_new_tokens})")
    # None = not given: the shared defaults apply (and greedy keeps its penalties off)
    g.add_argument("--temperature", type=nonneg_float, default=None, help=f"0 = greedy (default: {d.temperature})")
    g.add_argument("--greedy", action="store_true", help="same as --temperature 0 (deterministic; small models loop)")
    g.add_argument("--top-k", type=nonneg_int, default=None, help=f"keep the k most likely tokens (default: {d.top_k} = off)")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass, 1 = off (default: {d.top_p})")
    g.add_argument("--min-p", type=float, default=None,
                   help=f"drop tokens below min_p × the top probability (default: {d.min_p})")
    g.add_argument("--repetition-penalty", type=positive_float, default=None,
                   help=f"HF semantics, 1 = off (default: {d.repetition_penalty}; off under --greedy unless given)")
    g.add_argument("--presence-penalty", type=float, default=None,
                   help=f"OpenAI semantics, -2..2 (default: {d.presence_penalty})")
    g.add_argument("--frequency-penalty", type=float, default=None,
                   help=f"OpenAI semantics, -2..2 (default: {d.frequency_penalty})")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--seed", type=seed_int, default=None, help="makes sampling reproducible")


def unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line or in a one-prompt-per-line file mean newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def sampling_from_args(args):
    """The flags the user gave over :data:`gptforge.sampling_defaults.SAMPLING_DEFAULTS`."""
    return SAMPLING_DEFAULTS.params(
        max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop_strings=[clean_text(unescape(s), "--stop") for s in args.stop], seed=args.seed,
        logprobs=getattr(args, "logprobs", False),
    ).validate()


def clean_text(text: str, where: str) -> str:
    """``text`` with lone surrogates (from JSON escapes or undecodable arguments) replaced by U+FFFD, said once
    on stderr: the same rule as ``data prepare`` and the server."""
    from gptforge.tokenizer import replace_surrogates

    fixed = replace_surrogates(text)
    if fixed is not text:
        count = sum(1 for ch in text if "\ud800" <= ch <= "\udfff")
        print(f"gptforge: {where}: replaced {count} lone surrogate(s) with U+FFFD", file=sys.stderr)
    return fixed


def load_engine(args):
    import torch

    from gptforge.engine import Engine
    from gptforge.precision import pick_device

    dtype = getattr(torch, args.dtype) if args.dtype not in (None, "auto") else None
    engine = Engine.from_checkpoint(args.checkpoint, device=pick_device(args.device), dtype=dtype,
                                    context_policy=args.context_policy, compile=getattr(args, "compile", False))
    print(f"gptforge: {engine.device} {engine.precision.describe}", file=sys.stderr)
    return engine


def register(sub) -> None:
    p = add_parser(sub, "generate", "continue prompts with a trained model (batched, KV cache)",
                   'gptforge generate --checkpoint runs/mini --prompt "Once upon a time" --max-new-tokens 50')
    add_model_args(p)
    src = p.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    src.add_argument("--prompts-file", default=None, metavar="FILE",
                     help="one prompt per line (.txt), or JSON lines with a 'prompt' field (.jsonl); '-' = stdin")
    src.add_argument("--num-samples", type=positive_int, default=1, help="completions per prompt")
    src.add_argument("--batch-size", type=positive_int, default=16, help="prompts decoded together")
    add_sampling_args(p)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON object per completion (JSON lines)")
    out.add_argument("--logprobs", action="store_true", help="include chosen-token log-probabilities (--json)")
    out.add_argument("--no-stream", action="store_true", help="print a single prompt's completion at the end")
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (``{"prompt": ...}`` per line)."""
    from pathlib import Path

    from gptforge.errors import GptforgeError
    from gptforge.io import iter_jsonl, read_text

    file = None if path == "-" else Path(path)
    if file is not None and not file.is_file():
        raise GptforgeError(f"prompts file not found: {path}")
    if file is not None and file.suffix == ".jsonl":
        prompts = []
        for lineno, record in iter_jsonl(file):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise GptforgeError(f"{path}:{lineno}: expected an object with a string 'prompt' field")
            prompts.append(record["prompt"])
    else:
        text = sys.stdin.read() if file is None else read_text(file, "prompts file")
        prompts = [unescape(line) for line in text.splitlines() if line.strip()]
    name = "<stdin>" if file is None else path
    if not prompts:
        raise GptforgeError(f"{name} holds no prompts")
    return prompts


def run(args) -> int:
    from tqdm import tqdm

    from gptforge.errors import GptforgeError

    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    prompts = [clean_text(p, f"prompt {i}") for i, p in enumerate(prompts)]
    if not prompts:
        raise GptforgeError("no prompt given: use --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.batch_size < 1 or args.num_samples < 1:
        raise GptforgeError("--batch-size and --num-samples must be ≥ 1")
    params = sampling_from_args(args)
    engine = load_engine(args)
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(args.num_samples)]

    if len(jobs) == 1 and not args.json and not args.no_stream:  # one prompt: stream it to the terminal
        sys.stdout.write(prompts[0])
        for delta in engine.stream(prompts[0], params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    bar = tqdm(total=len(jobs), unit="completion", disable=len(jobs) <= args.batch_size, file=sys.stderr)
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        seeded = params if params.seed is None else _offset_seed(params, start)
        completions = engine.generate([p for _, p in chunk], seeded)
        for (i, prompt), c in zip(chunk, completions):
            if args.json:
                record = {"index": i, "prompt": prompt, "completion": c.text, "finish_reason": c.finish_reason,
                          "prompt_tokens": len(c.prompt_ids), "completion_tokens": len(c.token_ids)}
                if args.logprobs:
                    record["token_ids"], record["logprobs"] = c.token_ids, c.logprobs
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(f"=== [{i}] finish={c.finish_reason} tokens={len(c.token_ids)}\n{prompt}{c.text}\n")
        bar.update(len(chunk))
    bar.close()
    return 0


def _offset_seed(params, offset: int):
    import dataclasses

    return dataclasses.replace(params, seed=params.seed + offset)
