"""Multiple-choice evaluation scored like lm-evaluation-harness.

Each choice is scored by the summed log-likelihood of ``delimiter + choice`` after the context. ``acc`` takes
the choice with the highest sum; ``acc_norm`` divides by the choice's length in characters (lm-eval's
``acc_norm``) and ``acc_bytes`` by its UTF-8 byte length (lm-eval's ``acc_bytes``). Scoring is deterministic.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.eval.scoring import Request, encode_pair, score_requests, stderr_of_mean
from gptforge.eval.tasks import SUBJECT_CATEGORY, Item, load_hellaswag, load_jsonl_task, load_mmlu

TASKS = ("hellaswag", "mmlu", "jsonl")


def load_task(task: str, data: str | Path | None = None, limit: int | None = None, num_fewshot: int = 0,
              **jsonl_options) -> list[Item]:
    """Items of ``task`` (hellaswag | mmlu | jsonl) from ``data`` (a file, a directory or a hub name)."""
    if task == "hellaswag":
        return load_hellaswag(data, limit=limit)
    if task == "mmlu":
        return load_mmlu(data, num_fewshot=num_fewshot, limit=limit, subjects=jsonl_options.get("subjects"))
    if task == "jsonl":
        if data is None:
            raise GptforgeError("task jsonl needs --data FILE.jsonl")
        opts = {k: v for k, v in jsonl_options.items() if k != "subjects"}
        _refuse_other_icl_types(data, opts)
        return load_jsonl_task(data, limit=limit, **opts)
    raise GptforgeError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def _refuse_other_icl_types(path: str | Path, opts: dict) -> None:
    """Schema (WinoGrande) and language-modelling (LAMBADA) records are not multiple choice: scoring their
    fields as context + choices gives a number for the wrong probability, so point to ``eval icl`` instead."""
    from gptforge.io import iter_jsonl

    if not Path(path).is_file():
        return  # load_jsonl_task reports it
    lineno, rec = next(iter_jsonl(path), (0, None))
    if not isinstance(rec, dict) or opts.get("choices_field", "choices") in rec and "context_options" not in rec:
        return
    if "context_options" in rec:
        kind = "schema items (context_options + one shared continuation, e.g. WinoGrande/WSC)"
    elif "continuation" in rec and "context" in rec:
        kind = "language-modelling items (context + continuation, e.g. LAMBADA)"
    else:
        return
    task_type = "schema" if "context_options" in rec else "language_modeling"
    raise GptforgeError(f"{path}:{lineno}: {kind}, not multiple choice; score them with "
                        f"gptforge eval icl --type {task_type} --data {path}")


def score_items(model, tokenizer, items: list[Item], batch_size: int = 32, show_progress: bool = True) -> list[dict]:
    """Per-item predictions: log-likelihood of every choice, predicted index by acc/acc_norm/acc_bytes."""
    requests: list[Request] = []
    for item in items:
        for choice in item.choices:
            requests.append(encode_pair(tokenizer, item.context, item.delimiter + choice))
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="scoring choices", unit="req", leave=False)
    scores = score_requests(model, requests, batch_size=batch_size, progress=bar.update if bar else None)
    if bar:
        bar.close()
    out, k = [], 0
    for item in items:
        n = len(item.choices)
        lls = [s.logprob for s in scores[k : k + n]]
        greedy = [s.is_greedy for s in scores[k : k + n]]
        k += n
        chars = [float(len(c)) for c in item.choices]
        nbytes = [float(len(c.encode("utf-8"))) for c in item.choices]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / max(c, 1.0) for ll, c in zip(lls, chars)])
        pred_bytes = _argmax([ll / max(b, 1.0) for ll, b in zip(lls, nbytes)])
        out.append({
            "id": item.id, "group": item.group, "gold": item.gold, "pred": pred, "pred_norm": pred_norm,
            "pred_bytes": pred_bytes, "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold),
            "acc_bytes": float(pred_bytes == item.gold), "loglikelihoods": lls, "is_greedy": greedy,
        })
    return out


def _argmax(values: list[float]) -> int:
    # First maximum, as numpy.argmax, so ties resolve the same way as lm-eval.
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def summarize(predictions: list[dict], with_groups: bool = False) -> dict:
    """acc/acc_norm/acc_bytes with standard errors; optionally per group with macro/micro averages."""
    summary: dict = {"n": len(predictions)}
    for metric in ("acc", "acc_norm", "acc_bytes"):
        vals = [p[metric] for p in predictions]
        summary[metric] = sum(vals) / len(vals) if vals else math.nan
        summary[f"{metric}_stderr"] = stderr_of_mean(vals)
    if with_groups:
        groups: dict[str, list[dict]] = {}
        for p in predictions:
            groups.setdefault(p["group"] or "", []).append(p)
        summary["groups"] = {g: summarize(ps) for g, ps in sorted(groups.items())}
        summary["acc_macro"] = sum(g["acc"] for g in summary["groups"].values()) / max(1, len(groups))
        summary["acc_micro"] = summary["acc"]
        categories: dict[str, list[dict]] = {}
        for p in predictions:
            if p["group"] in SUBJECT_CATEGORY:
                categories.setdefault(SUBJECT_CATEGORY[p["group"]], []).append(p)
        if categories:
            summary["categories"] = {c: summarize(ps) for c, ps in sorted(categories.items())}
    return summary


def evaluate_choice(model, tokenizer, task: str = "hellaswag", limit: int | None = None,
                    data: str | Path | None = None, num_fewshot: int = 0, batch_size: int = 32,
                    items: list[Item] | None = None, show_progress: bool = True, **task_options) -> dict:
    """Run a multiple-choice task; returns ``{"task", "metrics", "predictions", ...}`` (JSON-serialisable)."""
    if tokenizer is None:
        raise GptforgeError("the checkpoint has no tokenizer; pass one with --tokenizer")
    if items is None:
        items = load_task(task, data, limit=limit, num_fewshot=num_fewshot, **task_options)
    if not items:
        raise GptforgeError(f"task {task}: no items to evaluate")
    start = time.perf_counter()
    predictions = score_items(model, tokenizer, items, batch_size=batch_size, show_progress=show_progress)
    seconds = time.perf_counter() - start
    with_groups = task == "mmlu" or (task == "jsonl" and any(i.group for i in items))
    metrics = summarize(predictions, with_groups=with_groups)
    return {
        "task": task, "data": str(data) if data is not None else None, "num_fewshot": num_fewshot,
        "limit": limit, "metrics": metrics, "seconds": seconds, "items_per_second": len(items) / max(seconds, 1e-9),
        "predictions": predictions,
    }


def hellaswag_hook(model, tokenizer, items: list[Item], batch_size: int = 32) -> dict:
    """HellaSwag accuracy on a fixed item list, for a training loop to call every K steps.

    Returns ``{"hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n"}``; leaves the model in its previous mode.
    Load the items once with ``load_hellaswag(limit=N)``.
    """
    predictions = score_items(model, tokenizer, items, batch_size=batch_size, show_progress=False)
    m = summarize(predictions)
    return {"hellaswag_acc": m["acc"], "hellaswag_acc_norm": m["acc_norm"], "hellaswag_n": m["n"]}


def format_summary(result: dict) -> str:
    """A readable multi-line summary of an :func:`evaluate_choice` result."""
    m = result["metrics"]
    head = (f"{result['task']}: n={m['n']}  acc={m['acc']:.4f} ± {m['acc_stderr']:.4f}  "
            f"acc_norm={m['acc_norm']:.4f} ± {m['acc_norm_stderr']:.4f}  ({result['items_per_second']:.1f} items/s)")
    lines = [head]
    if "categories" in m:
        lines.append(f"  macro acc (mean over {len(m['groups'])} subjects) = {m['acc_macro']:.4f}, "
                     f"micro acc = {m['acc_micro']:.4f}")
        for cat, cm in m["categories"].items():
            lines.append(f"  {cat:<16} acc={cm['acc']:.4f}  n={cm['n']}")
    return "\n".join(lines)
