"""The CORE score (DCLM): mean centered accuracy over 22 in-context-learning task entries, as nanochat reports it.

Task list, shots, task types and continuation delimiters are DCLM's "Core" set: the ``low_variance_datasets``
of https://github.com/mlfoundations/dclm/blob/361714bdd60bb9b7f4b2d8354cebbf0dec0c329e/eval/additional_aggregation.json
with their ``icl_tasks`` settings from ``eval/heavy.yaml`` at the same commit (DCLM is MIT-licensed). nanochat
evaluates the same 22 entries, in this order, from ``core.yaml`` in its eval bundle
(https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip, which is not on GitHub; its task order and
shot counts are visible in nanochat's logs). The random baselines (percent) are DCLM's ``eval/eval_meta_data.csv``
as first published (commit c7ed275feacc8dc7c6244473b22aa86af109ef15, kept at HEAD as ``eval_meta_data_v1.csv``),
which is what nanochat's numbers use (e.g. commonsense_qa 0.2662 → centered 0.0827 = (0.2662 − 0.20) / 0.80 in
nanochat's d24 logs); DCLM corrected three of them in Sep 2025 (``eval_meta_data.csv``, "v2"), reported alongside.

centered = (accuracy − 0.01·baseline) / (1 − 0.01·baseline), as nanochat's ``scripts/base_eval.py``; the score is
the plain mean over the entries. Data: ``$GPTFORGE_DATA_DIR/eval/core/`` (llm-foundry's ``local_data`` files, the
same ones DCLM's ``download_eval_data.sh`` copies) and HellaSwag from ``eval/hellaswag_val.jsonl`` (rowanz format,
converted with lm-eval's preprocessing into llm-foundry's ``{"query", "choices", "gold"}``; its first record then
equals the first record of llm-foundry's ``hellaswag.jsonl``), or an unpacked eval bundle (``--data`` or
``--download-bundle``). SQuAD and CoQA are not in the offline data: without them the result is labelled
"partial CORE (20 of 22 entries; missing: squad, coqa)", never CORE.

Every task's items are shuffled with ``random.Random(1337)`` before ``--max-per-task`` cuts them (nanochat shuffles
even when nothing is cut: the few-shot draws depend on the order).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.eval.icl import evaluate_icl, read_icl_jsonl

SHUFFLE_SEED = 1337  # nanochat: random.Random(1337).shuffle(data) for every task
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat base_eval.py


@dataclass(frozen=True)
class CoreEntry:
    """One CORE task entry: DCLM label, llm-foundry data file, task type, shots, delimiter, random baselines (%)."""

    label: str
    dataset: str  # path under llm-foundry's scripts/eval/local_data (DCLM heavy.yaml dataset_uri)
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # DCLM eval_meta_data v1, as nanochat uses
    baseline_v2: float  # DCLM eval_meta_data after the Sep 2025 fix


MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
ANSWER = "\nAnswer: "
CORE_ENTRIES: tuple[CoreEntry, ...] = (
    CoreEntry("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", MC, 0, " ", 25, 25),
    CoreEntry("jeopardy", "world_knowledge/jeopardy_all.jsonl", LM, 10, ANSWER, 0, 0),
    CoreEntry("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", LM, 10, " ", 0, 0),
    CoreEntry("arc_easy", "world_knowledge/arc_easy.jsonl", MC, 10, ANSWER, 25, 25),
    CoreEntry("arc_challenge", "world_knowledge/arc_challenge.jsonl", MC, 10, ANSWER, 25, 25),
    CoreEntry("copa", "commonsense_reasoning/copa.jsonl", MC, 0, " ", 50, 50),
    CoreEntry("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", MC, 10, " ", 20, 40.3),
    CoreEntry("piqa", "commonsense_reasoning/piqa.jsonl", MC, 10, ANSWER, 50, 50),
    CoreEntry("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", MC, 0, " ", 25, 25),
    CoreEntry("lambada_openai", "language_understanding/lambada_openai.jsonl", LM, 0, " ", 0, 0),
    CoreEntry("hellaswag", "language_understanding/hellaswag.jsonl", MC, 10, " ", 25, 25),
    CoreEntry("winograd", "language_understanding/winograd_wsc.jsonl", SCHEMA, 0, " ", 50, 50),
    CoreEntry("winogrande", "language_understanding/winogrande.jsonl", SCHEMA, 0, " ", 50, 50),
    CoreEntry("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", LM, 10, " ", 0, 0),
    CoreEntry("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", MC, 3, " ", 20, 25),
    CoreEntry("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", LM, 10, " ", 0, 0),
    CoreEntry("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", LM, 10, " ", 0, 0),
    CoreEntry("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", LM, 10, " ",
              0, 0),
    CoreEntry("squad", "reading_comprehension/squad.jsonl", LM, 10, " ", 0, 0),
    CoreEntry("coqa", "reading_comprehension/coqa.jsonl", LM, 0, " ", 0, 0),
    CoreEntry("boolq", "reading_comprehension/boolq.jsonl", MC, 10, ANSWER, 62, 62),
    CoreEntry("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl",
              MC, 10, " ", 9.1, 25),
)
LABELS = tuple(e.label for e in CORE_ENTRIES)


def centered_accuracy(accuracy: float, baseline_percent: float) -> float:
    """nanochat/DCLM centering: 0 at the random baseline, 1 at perfect accuracy (negative below chance)."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def select_entries(labels: list[str] | None = None) -> list[CoreEntry]:
    if not labels:
        return list(CORE_ENTRIES)
    unknown = [x for x in labels if x not in LABELS]
    if unknown:
        raise GptforgeError(f"unknown CORE task(s) {', '.join(unknown)}; choose from: {', '.join(LABELS)}")
    return [e for e in CORE_ENTRIES if e.label in labels]


def score_label(done: list[str], max_per_task: int | None = None, crop: str = "prompt") -> str:
    """``CORE`` only when all 22 entries ran on all their items with nanochat's cropping; else says what differs."""
    missing = [x for x in LABELS if x not in done]
    if not missing:
        label = "CORE"
    elif len(missing) <= len(done):
        label = f"partial CORE ({len(done)} of {len(LABELS)} entries; missing: {', '.join(missing)})"
    else:
        label = f"partial CORE ({len(done)} of {len(LABELS)} entries: {', '.join(x for x in LABELS if x in done)})"
    if max_per_task:
        label += f", estimate from at most {max_per_task} items per task"
    if crop != "prompt":
        label += f", {crop}-level cropping"
    return label


# ---- data ----------------------------------------------------------------------------------------------------


def bundle_dir() -> Path:
    """Where ``--download-bundle`` unpacks nanochat's eval bundle: ``<gptforge cache>/eval_bundle``."""
    from gptforge.data.registry import cache_dir

    return cache_dir() / "eval_bundle"


def data_roots(data_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for the task files, in order: ``--data``, the downloaded bundle, the data directory."""
    roots = [Path(data_dir)] if data_dir else []
    roots.append(bundle_dir())
    root = os.environ.get("GPTFORGE_DATA_DIR")
    if root:
        roots += [Path(root) / "eval" / "core", Path(root) / "eval"]
    return roots


def find_data(entry: CoreEntry, roots: list[Path]) -> tuple[Path, str] | None:
    """``(path, format)`` of the entry's data: ``icl`` (llm-foundry jsonl) or ``rowanz`` (HellaSwag original)."""
    name = Path(entry.dataset).name
    for root in roots:
        for rel in (name, entry.dataset, f"eval_data/{entry.dataset}", f"local_data/{entry.dataset}"):
            if (root / rel).is_file():
                return root / rel, "icl"
        if name == "hellaswag.jsonl" and (root / "hellaswag_val.jsonl").is_file():
            return root / "hellaswag_val.jsonl", "rowanz"
    return None


def load_entry(entry: CoreEntry, path: Path, fmt: str) -> list[dict]:
    """The entry's items, in file order."""
    if fmt == "rowanz":
        from gptforge.eval.tasks import load_hellaswag

        return [{"query": i.context, "choices": i.choices, "gold": i.gold} for i in load_hellaswag(path)]
    return read_icl_jsonl(path, entry.task_type)


def sample_items(items: list[dict], max_per_task: int | None = None) -> list[dict]:
    """nanochat's order: ``Random(1337).shuffle``, then the first ``max_per_task`` (all when None)."""
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items[:max_per_task] if max_per_task else items


def download_bundle(url: str = EVAL_BUNDLE_URL) -> Path:
    """Fetch and unpack nanochat's eval bundle (22 tasks incl. SQuAD and CoQA, ~160 MB) into the cache once."""
    import shutil
    import tempfile
    import urllib.request
    import zipfile

    from gptforge.data.registry import is_offline

    target = bundle_dir()
    if target.is_dir() and any(target.iterdir()):
        return target
    hint = (f"download {url} elsewhere, unzip it and pass --data PATH/eval_bundle (or unpack it as {target})")
    if is_offline():
        raise GptforgeError(f"offline (GPTFORGE_OFFLINE/HF_HUB_OFFLINE is set): cannot fetch the eval bundle; {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"gptforge: downloading {url} into {target} ...")
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            archive = Path(tmp) / "eval_bundle.zip"
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
            with zipfile.ZipFile(archive) as z:
                z.extractall(Path(tmp) / "x")
            inner = Path(tmp) / "x" / "eval_bundle"
            (inner if inner.is_dir() else Path(tmp) / "x").rename(target)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise GptforgeError(f"cannot download the CORE eval bundle ({type(e).__name__}: {e}); {hint}") from None
    return target


# ---- evaluation ----------------------------------------------------------------------------------------------


def plan(tasks: list[str] | None = None, max_per_task: int | None = None,
         data_dir: str | Path | None = None) -> list[tuple[CoreEntry, tuple[Path, str] | None]]:
    """The entries to run with their data (None where it is missing); errors before any model work."""
    entries = select_entries(tasks)
    shots = max(e.num_fewshot for e in entries)
    if max_per_task is not None and max_per_task <= shots:
        raise GptforgeError(f"--max-per-task must be at least {shots + 1}: the {shots}-shot examples are drawn from "
                            "the evaluated items, as nanochat draws them")
    roots = data_roots(data_dir)
    found = [(e, find_data(e, roots)) for e in entries]
    if not any(where for _, where in found):
        raise GptforgeError("no CORE data found in " + ", ".join(str(r) for r in roots) + "; set GPTFORGE_DATA_DIR "
                            "to the offline data directory (eval/core/), pass --data DIR, or --download-bundle")
    return found


def evaluate_core(model, tokenizer, max_per_task: int | None = None, data_dir: str | Path | None = None,
                  tasks: list[str] | None = None, batch_size: int = 32, show_progress: bool = True,
                  log=print, crop: str = "prompt") -> dict:
    """Run the CORE entries whose data is found; returns per-entry accuracy/centered, the mean and its label.

    ``result["predictions"][label]`` holds each item's per-choice log-likelihoods (see :func:`evaluate_icl`).
    """
    from gptforge.checkpoint import unwrap

    found = plan(tasks, max_per_task, data_dir)
    start = time.perf_counter()
    rows, predictions, loaded = [], {}, {}
    for e, where in found:
        if where is None:
            continue
        path, fmt = where
        key = (str(path), fmt)
        if key not in loaded:
            loaded[key] = load_entry(e, path, fmt)
        items = sample_items(loaded[key], max_per_task)
        r = evaluate_icl(model, tokenizer, items, e.task_type, e.num_fewshot, e.delimiter, batch_size=batch_size,
                         show_progress=show_progress, desc=e.label, crop=crop)
        row = {**asdict(e), "data": str(path), "n": r["n"], "accuracy": r["accuracy"],
               "centered": centered_accuracy(r["accuracy"], e.baseline),
               "centered_v2": centered_accuracy(r["accuracy"], e.baseline_v2), "cropped": r["cropped"],
               "seconds": r["seconds"], "items_per_second": r["items_per_second"]}
        rows.append(row)
        predictions[e.label] = r["predictions"]
        if log:
            log(f"{e.label:<34} {e.num_fewshot:>2}-shot {e.task_type:<17} n={r['n']:<6} acc={r['accuracy']:.4f} "
                f"centered={row['centered']:+.4f}  {r['items_per_second']:.0f} items/s")
    seconds = time.perf_counter() - start
    done = [r["label"] for r in rows]
    n_items = sum(r["n"] for r in rows)
    return {
        "metric": score_label(done, max_per_task, crop),
        "score": sum(r["centered"] for r in rows) / len(rows),
        "score_dclm_v2": sum(r["centered_v2"] for r in rows) / len(rows),
        "complete": len(done) == len(LABELS) and not max_per_task and crop == "prompt",
        "entries": rows, "missing": [x for x in LABELS if x not in done], "max_per_task": max_per_task, "crop": crop,
        "block_size": unwrap(model).config.block_size, "items": n_items, "seconds": seconds,
        "items_per_second": n_items / max(seconds, 1e-9), "predictions": predictions,
    }


def load_subset(tasks: list[str] | None, max_per_task: int, data_dir: str | Path | None = None
                ) -> list[tuple[CoreEntry, list[dict]]]:
    """The items :func:`core_hook` scores, loaded once: each available entry's seeded sample of ``max_per_task``."""
    found, loaded, subset = plan(tasks, max_per_task, data_dir), {}, []
    for e, where in found:
        if where is None:
            continue
        if where not in loaded:
            loaded[where] = load_entry(e, *where)
        subset.append((e, sample_items(loaded[where], max_per_task)))
    return subset


def core_hook(model, tokenizer, subset: list[tuple[CoreEntry, list[dict]]], batch_size: int = 32) -> dict:
    """CORE on a fixed subset (from :func:`load_subset`), for a training loop to call every N steps.

    Returns ``{"core", "core_n", "core_entries"}``: the mean centered accuracy, the items scored and the number of
    entries (a cheap estimate of the full score, comparable across steps of one run).
    """
    centered, n = [], 0
    for e, items in subset:
        r = evaluate_icl(model, tokenizer, items, e.task_type, e.num_fewshot, e.delimiter, batch_size=batch_size,
                         show_progress=False, desc=e.label)
        centered.append(centered_accuracy(r["accuracy"], e.baseline))
        n += r["n"]
    return {"core": sum(centered) / len(centered), "core_n": n, "core_entries": len(centered)}


def format_table(result: dict) -> str:
    """A markdown table: one row per entry, then the mean with its label."""
    lines = ["| task | type | shots | n | accuracy | baseline % | centered | items/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["entries"]:
        lines.append(f"| {r['label']} | {r['task_type']} | {r['num_fewshot']} | {r['n']} | {r['accuracy']:.4f} | "
                     f"{r['baseline']:g} | {r['centered']:+.4f} | {r['items_per_second']:.0f} |")
    lines.append(f"| **{result['metric']}** | | | {result['items']} | | | **{result['score']:.4f}** | "
                 f"{result['items_per_second']:.0f} |")
    return "\n".join(lines)


def plot_core(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Horizontal bars of centered accuracy per entry, with the mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptforge.charts import save_figure

    rows = result["entries"]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.6))
    values = [r["centered"] for r in rows]
    ax.barh(range(len(rows)), values, color=["#4c72b0" if v >= 0 else "#c44e52" for v in values])
    ax.set_yticks(range(len(rows)), [f"{r['label']} ({r['num_fewshot']}-shot)" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(result["score"], color="#dd8452", linestyle="--", label=f"mean {result['score']:.4f}")
    ax.set_xlabel("centered accuracy (0 = random baseline, 1 = perfect)")
    ax.set_title(title or result["metric"], fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
