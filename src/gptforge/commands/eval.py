"""``gptforge eval loss|choice|icl|core|judge|harness``: held-out loss, multiple-choice benchmarks, in-context-learning
tasks (llm-foundry formats), the CORE score, LLM-as-a-judge, lm-eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptforge.commands import add_parser, nonneg_float, nonneg_int, positive_float, positive_int, seed_int


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints: loss/ppl/bpb, HellaSwag/MMLU, ICL tasks, CORE, LLM judge, "
                                    "lm-eval")
    esub = p.add_subparsers(dest="eval_command", metavar="<action>", required=True)
    _register_loss(esub)
    _register_choice(esub)
    _register_icl(esub)
    _register_core(esub)
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
    from gptforge.errors import GptforgeError
    from gptforge.eval.choice import evaluate_choice, format_summary
    from gptforge.io import write_json

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
    model, tokenizer, meta, precision = _load_for_eval(args)
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


# ---- icl and core ---------------------------------------------------------------------------------------------


def _add_model_args(p) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint step dir, run dir or HF directory")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per forward pass (default: 32)")
    p.add_argument("--tokenizer", default=None, help="tokenizer when the checkpoint has none")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps … (default: auto = CUDA, else MPS, else CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: the one precision rule, bf16 where the CPU/GPU computes it natively)")


def _load_for_eval(args):
    from gptforge.checkpoint import load_model
    from gptforge.precision import pick_device, resolve_precision
    from gptforge.tokenizer import load_tokenizer

    device = pick_device(args.device)
    names = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    precision = resolve_precision(names[args.dtype], device)
    model, tokenizer, meta = load_model(args.checkpoint, device=device, dtype=precision.dtype)
    print(f"gptforge: {device} {precision.describe}", file=sys.stderr)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    return model, tokenizer, meta, precision


def _run_eval_dir(meta: dict) -> Path | None:
    ckpt = Path(meta["path"])
    return ckpt.parent.parent / "eval" if ckpt.parent.name == "ckpt" else None


def _register_icl(esub) -> None:
    p = add_parser(esub, "icl", "one in-context-learning task in llm-foundry's jsonl formats: multiple_choice "
                                "(query/choices/gold), schema (context_options/continuation/gold, e.g. WinoGrande), "
                                "language_modeling (context/continuation, greedy exact match, e.g. LAMBADA)",
                   "gptforge eval icl --checkpoint runs/mini --data winogrande.jsonl --type schema")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="jsonl file, one item per line in the --type's format")
    p.add_argument("--type", required=True, choices=["multiple_choice", "schema", "language_modeling"])
    p.add_argument("--num-fewshot", type=nonneg_int, default=0,
                   help="examples before each item, drawn from the other items as nanochat does (default: 0)")
    p.add_argument("--delimiter", default=" ",
                   help="continuation delimiter between context and answer, e.g. '\\nAnswer: ' (default: space)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N items (they are also the few-shot pool)")
    p.add_argument("--out", default=None, help="results JSON (default: <run>/eval/icl_<file>.json for run "
                                               "checkpoints, else ./eval_icl_<file>.json)")
    p.set_defaults(func=run_icl)


def run_icl(args) -> int:
    from gptforge.eval.icl import evaluate_icl, format_icl_summary, read_icl_jsonl
    from gptforge.io import write_json

    items = read_icl_jsonl(args.data, args.type)[: args.limit]
    model, tokenizer, meta, precision = _load_for_eval(args)
    delimiter = args.delimiter.replace("\\n", "\n")
    result = evaluate_icl(model, tokenizer, items, args.type, args.num_fewshot, delimiter, batch_size=args.batch_size)
    result = {"data": args.data, "checkpoint": meta["path"], "precision": precision.describe, **result}
    print(format_icl_summary(result))
    run = _run_eval_dir(meta)
    stem = Path(args.data).stem
    out = Path(args.out) if args.out else (run / f"icl_{stem}.json" if run else Path(f"eval_icl_{stem}.json"))
    write_json(out, result)
    print(f"wrote {out} ({len(result['predictions'])} per-item predictions)")
    return 0


def _register_core(esub) -> None:
    p = add_parser(esub, "core", "the CORE score (DCLM, as nanochat reports it): centered accuracy on 22 ICL task "
                                 "entries and their mean; offline without SQuAD/CoQA it is labelled partial",
                   "gptforge eval core --checkpoint runs/mini --max-per-task 200")
    _add_model_args(p)
    p.add_argument("--max-per-task", type=positive_int, default=None,
                   help="a quick estimate: the first N items of each task after nanochat's seeded shuffle")
    p.add_argument("--tasks", nargs="+", default=None, metavar="LABEL", help="only these entries (e.g. arc_easy copa)")
    p.add_argument("--data", default=None,
                   help="a folder with the task files (e.g. an unpacked eval_bundle); searched before the "
                        "downloaded bundle and $GPTFORGE_DATA_DIR/eval/core")
    p.add_argument("--download-bundle", action="store_true",
                   help="fetch nanochat's eval bundle (all 22 entries incl. SQuAD and CoQA, ~160 MB) into the "
                        "gptforge cache first; needs network")
    p.add_argument("--crop", choices=["prompt", "item"], default="prompt",
                   help="prompts longer than the model's context keep their last tokens: 'prompt' cuts each choice's "
                        "prompt on its own (nanochat, default); 'item' cuts an item's choices at one place so they "
                        "share a forward pass (about 2x faster for 10-shot tasks on short-context models; differs "
                        "from nanochat on cropped items, and the label says so)")
    p.add_argument("--out", default=None, help="output folder for core.json, core.md, core.png, core_items.jsonl "
                                               "(default: <run>/eval/core for run checkpoints, else ./eval_core)")
    p.set_defaults(func=run_core)


def run_core(args) -> int:
    from gptforge.eval.core import download_bundle, evaluate_core, format_table, plan, plot_core
    from gptforge.io import atomic_write_text, write_json

    if args.download_bundle:
        download_bundle()
    plan(args.tasks, args.max_per_task, args.data)  # data and option errors before loading the model
    model, tokenizer, meta, precision = _load_for_eval(args)
    if tokenizer is None:
        from gptforge.errors import GptforgeError

        raise GptforgeError("the checkpoint has no tokenizer; pass one with --tokenizer")
    result = evaluate_core(model, tokenizer, max_per_task=args.max_per_task, data_dir=args.data, tasks=args.tasks,
                           batch_size=args.batch_size, crop=args.crop)
    predictions = result.pop("predictions")
    result = {"checkpoint": meta["path"], "precision": precision.describe, **result}
    table = format_table(result)
    print(table)
    print(f"{result['metric']}: {result['score']:.4f}  ({result['items']:,} items in {result['seconds']:.0f}s, "
          f"{result['items_per_second']:.0f} items/s; prompts longer than the model's {result['block_size']} "
          "tokens keep their last tokens" + (", as nanochat crops them)" if args.crop == "prompt" else
                                             ", cut at one place per item)"))
    run = _run_eval_dir(meta)
    out = Path(args.out) if args.out else (run / "core" if run else Path("eval_core"))
    write_json(out / "core.json", result)
    atomic_write_text(out / "core.md", table + "\n")
    plot_core(result, out / "core.png", title=f"{result['metric']} = {result['score']:.4f}\n{meta['path']}")
    lines = [json.dumps({"task": task, **p}) for task, preds in predictions.items() for p in preds]
    atomic_write_text(out / "core_items.jsonl", "\n".join(lines) + "\n")
    print(f"wrote {out}/core.json, core.md, core.png and core_items.jsonl ({len(lines):,} per-item predictions)")
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
                                    "all further arguments go to lm_eval; hellaswag, mmlu, arc_*, piqa, copa, "
                                    "winogrande, lambada_openai, openbookqa, boolq read $GPTFORGE_DATA_DIR",
                   "gptforge eval harness --model_args checkpoint=runs/mini --tasks hellaswag,arc_easy --limit 100")
    p.add_argument("--stock-tasks", action="store_true",
                   help="use lm-eval's stock task configs (data from the Hugging Face Hub) instead of the "
                        "local copies in $GPTFORGE_DATA_DIR")
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
    return cli_main(argv, stock_tasks=args.stock_tasks)
