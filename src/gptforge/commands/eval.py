"""``gptforge eval loss|choice|judge|harness``: held-out loss, multiple-choice benchmarks, LLM-as-a-judge, lm-eval."""

from __future__ import annotations

import sys
from pathlib import Path

from gptforge.commands import add_parser, nonneg_float, nonneg_int, positive_float, positive_int, seed_int


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints: loss/ppl/bpb, HellaSwag/MMLU, LLM judge, lm-eval")
    esub = p.add_subparsers(dest="eval_command", metavar="<action>", required=True)
    _register_loss(esub)
    _register_choice(esub)
    _register_judge(esub)
    _register_harness(esub)


# ---- loss ----------------------------------------------------------------------------------------------------


def _register_loss(esub) -> None:
    p = add_parser(esub, "loss", "held-out loss, perplexity and bits-per-byte for one or more checkpoints",
                   "gptforge eval loss --checkpoints runs/mini/ckpt/* --data data/mini --tokens 1000000")
    p.add_argument("--checkpoints", "--checkpoint", nargs="+", required=True, metavar="CKPT",
                   help="checkpoint step dirs, run dirs, ckpt/latest|best pointers or HF dirs (globs welcome)")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="a prepared dataset directory (uses its --split shards) or raw .txt/.jsonl files")
    p.add_argument("--split", default="val", help="shard split to evaluate (default: val)")
    p.add_argument("--start", type=nonneg_int, default=0, help="first token of the evaluated range (default: 0)")
    p.add_argument("--tokens", type=positive_int, default=None, help="number of tokens in the range (default: all)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--tokenizer", default=None, help="tokenizer for raw text when the checkpoint has none")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--separator", default=None,
                   help="raw .txt documents: file | blank | line | a literal (default: auto, as data prepare)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps … (default: auto = CUDA, else MPS, else CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (auto: the one precision rule, bf16 where the CPU/GPU computes it natively, else float32, or float16 on older GPUs)")
    p.add_argument("--out", default=None,
                   help="directory for loss.json, loss.md and loss.png (default: <run>/eval when the "
                        "checkpoints share a run directory)")
    p.set_defaults(func=run_loss)


def _common_run_dir(checkpoints: list[Path]) -> Path | None:
    runs = {c.parent.parent for c in checkpoints if c.parent.name == "ckpt"}
    return runs.pop() if len(runs) == 1 else None


def run_loss(args) -> int:
    from gptforge.eval.loss import (
        evaluate_checkpoints,
        expand_checkpoints,
        format_table,
        plot_losses,
    )
    from gptforge.io import atomic_write_text, write_json
    from gptforge.precision import pick_device
    from gptforge.tokenizer import load_tokenizer

    checkpoints = expand_checkpoints(args.checkpoints)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    data = args.data[0] if len(args.data) == 1 else args.data
    report = evaluate_checkpoints(checkpoints, data, tokenizer=tokenizer, split=args.split, start=args.start,
                                  max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                                  device=pick_device(args.device), dtype=args.dtype,
                                  text_field=args.text_field, separator=args.separator)
    results = report["results"]
    table = format_table(results)
    print(table)
    best = results[report["best"]]
    r0 = results[0]
    se = best.get("loss_se")
    print(f"evaluated {len(results)} checkpoint(s) on {r0['tokens']:,} tokens [{r0['start']:,}, {r0['stop']:,}) "
          f"of {r0['data']} in {r0['windows']:,} windows of {r0['seq_len']}; best: {best['name']} "
          f"(loss {best['loss']:.4f}" + (f" ± {1.96 * se:.4f} (1.96·SE over windows)" if se is not None else "")
          + f", ppl {best['perplexity']:.2f}"
          + (f", bpb {best['bits_per_byte']:.4f})" if "bits_per_byte" in best else ")"))
    out = Path(args.out) if args.out else _common_run_dir(checkpoints)
    if out is not None:
        out = out / "eval" if not args.out else out
        write_json(out / "loss.json", report)
        atomic_write_text(out / "loss.md", table + "\n")
        if len(results) > 1:
            plot_losses(results, out / "loss.png")
        print(f"wrote {out / 'loss.json'}, {out / 'loss.md'}" + (f", {out / 'loss.png'}" if len(results) > 1 else ""))
    return 0


# ---- choice --------------------------------------------------------------------------------------------------


def _register_choice(esub) -> None:
    p = add_parser(esub, "choice", "multiple-choice benchmarks scored like lm-eval: HellaSwag, MMLU, your jsonl",
                   "gptforge eval choice --checkpoint runs/mini --task hellaswag --limit 500")
    p.add_argument("--checkpoint", required=True, help="checkpoint step dir, run dir or HF directory")
    p.add_argument("--task", required=True, choices=["hellaswag", "mmlu", "jsonl"])
    p.add_argument("--data", default=None,
                   help="local file (hellaswag: rowanz jsonl; mmlu: mmlu_test.jsonl or a folder of "
                        "mmlu_<split>.jsonl; jsonl: your file) or a hub name (Rowan/hellaswag, cais/mmlu); "
                        "default: $GPTFORGE_DATA_DIR/eval/… when present, else the hub")
    p.add_argument("--limit", type=positive_int, default=None, help="first N items (MMLU: N per subject)")
    p.add_argument("--num-fewshot", type=nonneg_int, default=0, help="MMLU: examples from the dev split (0..5)")
    p.add_argument("--subjects", nargs="*", default=None, help="MMLU: only these subjects")
    p.add_argument("--field", action="append", default=[], metavar="ROLE=NAME",
                   help="jsonl: map a role (context, choices, gold) to a record field, e.g. --field context=question")
    p.add_argument("--template", default=None,
                   help="jsonl: build the context from fields, e.g. 'Question: {question}\\nAnswer:'")
    p.add_argument("--delimiter", default=" ", help="jsonl: text between context and choice (default: space)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--tokenizer", default=None, help="tokenizer when the checkpoint has none")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps … (default: auto = CUDA, else MPS, else CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: the one precision rule, bf16 where the CPU/GPU computes it natively)")
    p.add_argument("--out", default=None, help="results JSON path (default: <run>/eval/<task>.json for run "
                                               "checkpoints, else ./eval_<task>.json)")
    p.set_defaults(func=run_choice)


def run_choice(args) -> int:
    from gptforge.checkpoint import load_model
    from gptforge.errors import GptforgeError
    from gptforge.eval.choice import evaluate_choice, format_summary
    from gptforge.io import write_json
    from gptforge.precision import pick_device, resolve_precision
    from gptforge.tokenizer import load_tokenizer

    options: dict = {"subjects": args.subjects}
    if args.task == "jsonl":
        mapping = {"context": "context_field", "choices": "choices_field", "gold": "gold_field"}
        for item in args.field:
            role, _, name = item.partition("=")
            if role not in mapping or not name:
                raise GptforgeError(f"--field expects ROLE=NAME with ROLE in context, choices, gold; got {item!r}")
            options[mapping[role]] = name
        options.update(template=args.template.replace("\\n", "\n") if args.template else None,
                       delimiter=args.delimiter)
    device = pick_device(args.device)
    names = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    precision = resolve_precision(names[args.dtype], device)
    model, tokenizer, meta = load_model(args.checkpoint, device=device, dtype=precision.dtype)
    print(f"gptforge: {device} {precision.describe}", file=sys.stderr)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    result = evaluate_choice(model, tokenizer, args.task, data=args.data, limit=args.limit,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size, **options)
    result["checkpoint"] = meta["path"]
    result["precision"] = precision.describe
    print(format_summary(result))
    if args.out:
        out = Path(args.out)
    else:
        ckpt = Path(meta["path"])
        run = ckpt.parent.parent if ckpt.parent.name == "ckpt" else None
        out = (run / "eval" if run else Path(".")) / (f"{args.task}.json" if run else f"eval_{args.task}.json")
    write_json(out, result)
    print(f"wrote {out} ({len(result['predictions'])} per-item predictions)")
    return 0


# ---- judge ---------------------------------------------------------------------------------------------------


def _register_judge(esub) -> None:
    p = add_parser(esub, "judge", "score instruction answers 0-100 against references with an LLM judge "
                                  "(any OpenAI-compatible endpoint)",
                   "OPENAI_API_KEY=... gptforge eval judge runs/sft-a/test_responses.json "
                   "runs/sft-b/test_responses.json --model gpt-4o-mini --mode batched --out judged/")
    p.add_argument("responses", nargs="+", help="responses JSON files (records: instruction, input, reference, "
                                                 "response, model), e.g. from gptforge sft")
    p.add_argument("--names", nargs="*", default=None, help="a model name per file (default: the records' "
                                                            "model field, else the file name)")
    p.add_argument("--base-url", default="https://api.openai.com/v1",
                   help="OpenAI-compatible API root: OpenAI, Ollama (http://localhost:11434/v1), vLLM, "
                        "gptforge serve (http://127.0.0.1:8000/v1)")
    p.add_argument("--model", required=True, help="judge model name as the endpoint knows it")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default: OPENAI_API_KEY; unset = no key)")
    p.add_argument("--mode", choices=["batched", "per-model"], default="batched",
                   help="batched: one query per item with all models' answers in shuffled order (consistent); "
                        "per-model: one query per answer")
    p.add_argument("--out", required=True, help="output directory (annotated JSON, summary, cache for resuming)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N records of each file")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the answer order in batched mode")
    p.add_argument("--rpm", type=positive_float, default=None, help="at most this many requests per minute")
    p.add_argument("--concurrency", type=positive_int, default=1, help="parallel requests (default: 1)")
    p.add_argument("--max-retries", type=nonneg_int, default=5)
    p.add_argument("--backoff", type=nonneg_float, default=2.0, help="seconds before the first retry (doubles each time)")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="reply length limit")
    p.add_argument("--retry-unparsed", action="store_true", help="ask again for items whose reply had no score")
    p.add_argument("--chart", action="store_true", help="also write a bar chart scores.png")
    p.set_defaults(func=run_judge_cmd)


def run_judge_cmd(args) -> int:
    import os

    from gptforge.eval.judge import JudgeClient, format_summary, load_responses, run_judge

    responses = load_responses(args.responses, args.names)
    if args.limit:
        responses = {m: recs[: args.limit] for m, recs in responses.items()}
    client = JudgeClient(args.base_url, args.model, api_key=os.environ.get(args.api_key_env), timeout=args.timeout,
                         max_retries=args.max_retries, backoff=args.backoff, rpm=args.rpm,
                         max_tokens=args.max_tokens)
    try:
        summary = run_judge(responses, client, args.out, mode=args.mode, seed=args.seed,
                            concurrency=args.concurrency, retry_unparsed=args.retry_unparsed, chart=args.chart)
    finally:
        client.close()
    print(format_summary(summary))
    unparsed = sum(r["unparsed"] for r in summary["models"])
    errors = sum(r["errors"] for r in summary["models"])
    print(f"{summary['asked']} queries sent, {summary['skipped_from_cache']} already judged (resumed); "
          f"{unparsed} answer(s) without a parseable score, {errors} failed request(s)"
          + (" - rerun the same command to retry the failures" if errors else "")
          + f"; outputs in {args.out}")
    return 1 if errors else 0


# ---- lm-evaluation-harness -----------------------------------------------------------------------------------


def _register_harness(esub) -> None:
    p = add_parser(esub, "harness", "run lm-evaluation-harness on a native checkpoint (model type 'gptforge'); "
                                    "all further arguments go to lm_eval",
                   "gptforge eval harness --model_args checkpoint=runs/mini --tasks hellaswag --limit 100")
    p.set_defaults(func=run_harness, accepts_overrides=True)


def run_harness(args) -> int:
    from gptforge.eval.harness import cli_main

    argv = list(args.overrides)
    if "--model" not in argv:
        argv = ["--model", "gptforge"] + argv
    if "--batch_size" not in argv:
        argv += ["--batch_size", "16"]
    if "--device" not in argv:
        from gptforge.precision import pick_device

        argv += ["--device", str(pick_device("auto"))]
    return cli_main(argv)
