"""Multiple-choice tasks as lists of :class:`Item`: HellaSwag, MMLU (0–5 shot) and any jsonl with a field map.

Prompts reproduce lm-evaluation-harness' task definitions (``hellaswag``, ``mmlu`` default template), so scores
are comparable with published lm-eval numbers. Every loader accepts a local file in the dataset's own format
or, where it exists, the Hugging Face Hub name (needs network and the ``data`` extra).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.io import iter_jsonl

HELLASWAG_HUB = "Rowan/hellaswag"
MMLU_HUB = "cais/mmlu"

# lm-eval's grouping of the 57 MMLU subjects.
MMLU_CATEGORIES = {
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
    "professional_law world_religions",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
    "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning",
}
SUBJECT_CATEGORY = {s: cat for cat, subjects in MMLU_CATEGORIES.items() for s in subjects.split()}


@dataclass
class Item:
    """One question: a context, the candidate continuations, the index of the right one."""

    id: str
    context: str
    choices: list[str]
    gold: int
    group: str | None = None  # e.g. the MMLU subject
    delimiter: str = " "  # put between context and each choice (lm-eval's target_delimiter)
    meta: dict = field(default_factory=dict)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line; a malformed line is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise GptforgeError(f"data file not found: {path}")
    records = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise GptforgeError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((lineno, rec))
    return records


def _hub_records(name: str, split: str, config: str | None = None) -> list[tuple[int, dict]]:
    try:
        import datasets
    except ImportError:
        raise GptforgeError(f"loading {name!r} from the Hub needs the data extra: pip install 'gptforge[data]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise GptforgeError(f"cannot load {name} ({config or 'default'}, {split}) from the Hub: {e}; "
                            "pass a local jsonl file instead") from None
    return [(i, dict(r)) for i, r in enumerate(ds)]


def default_data_file(name: str) -> Path | None:
    """``$GPTFORGE_DATA_DIR/eval/<name>`` when it exists."""
    root = os.environ.get("GPTFORGE_DATA_DIR")
    if root and (Path(root) / "eval" / name).is_file():
        return Path(root) / "eval" / name
    return None


# ---- HellaSwag ---------------------------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, WikiHow ``[title]`` → '. ', drop other bracket tags, fix double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(source: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """HellaSwag validation items from a rowanz-format jsonl (default: the data dir's copy) or ``Rowan/hellaswag``."""
    if source is None:
        source = default_data_file("hellaswag_val.jsonl") or HELLASWAG_HUB
    where = str(source)
    records = _hub_records(HELLASWAG_HUB, "validation") if where == HELLASWAG_HUB else read_jsonl(source)
    items = []
    for lineno, rec in records:
        try:
            ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
            endings = list(rec["endings"])
            gold = int(rec["label"])
            query = hellaswag_preprocess(rec["activity_label"] + ": " + ctx)
        except (KeyError, TypeError, ValueError) as e:
            raise GptforgeError(f"{where}:{lineno}: not a HellaSwag record ({type(e).__name__}: {e}); expected "
                                "fields ctx_a, ctx_b, activity_label, endings, label") from None
        if not 0 <= gold < len(endings):
            raise GptforgeError(f"{where}:{lineno}: label {gold} outside 0..{len(endings) - 1}")
        items.append(Item(id=str(rec.get("ind", lineno)), context=query,
                          choices=[hellaswag_preprocess(e) for e in endings], gold=gold,
                          group=rec.get("activity_label")))
        if limit and len(items) >= limit:
            break
    return items


# ---- MMLU --------------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def _mmlu_question(rec: dict) -> str:
    lines = [rec["question"].strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(rec["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_records(source: str | Path | None, split: str) -> tuple[str, list[tuple[int, dict]]]:
    """Records of ``split`` from a jsonl path, a directory holding ``mmlu_<split>.jsonl``, or the Hub."""
    if source is None:
        found = default_data_file(f"mmlu_{split}.jsonl")
        source = found if found else MMLU_HUB
    if str(source) == MMLU_HUB:
        return MMLU_HUB, _hub_records(MMLU_HUB, split, "all")
    path = Path(source)
    if path.is_dir():
        path = path / f"mmlu_{split}.jsonl"
    return str(path), read_jsonl(path)


def load_mmlu(source: str | Path | None = None, split: str = "test", num_fewshot: int = 0,
              fewshot_source: str | Path | None = None, subjects: list[str] | None = None,
              limit: int | None = None) -> list[Item]:
    """MMLU items with lm-eval's default prompt and ``num_fewshot`` (0–5) examples from the dev split.

    ``source``: an ``mmlu_<split>.jsonl`` file, a directory with such files, or ``cais/mmlu``.
    ``fewshot_source`` defaults to ``mmlu_dev.jsonl`` beside ``source``. ``limit`` applies per subject, so a
    small limit still covers every subject.
    """
    if not 0 <= num_fewshot <= 5:
        raise GptforgeError(f"MMLU few-shot count must be 0..5 (the dev split has 5 per subject), got {num_fewshot}")
    where, records = _mmlu_records(source, split)
    dev: dict[str, list[dict]] = {}
    if num_fewshot:
        if fewshot_source is None and source is not None and str(source) != MMLU_HUB:
            p = Path(source)
            fewshot_source = p if p.is_dir() else p.with_name("mmlu_dev.jsonl")
        _, dev_records = _mmlu_records(fewshot_source, "dev")
        for _, rec in dev_records:
            dev.setdefault(rec["subject"], []).append(rec)
    per_subject: dict[str, int] = {}
    items = []
    for lineno, rec in records:
        try:
            subject = rec["subject"]
            choices = list(rec["choices"])
            gold = int(rec["answer"])
            question = _mmlu_question(rec)
        except (KeyError, TypeError, ValueError) as e:
            raise GptforgeError(f"{where}:{lineno}: not an MMLU record ({type(e).__name__}: {e}); expected "
                                "fields question, subject, choices, answer") from None
        if subjects and subject not in subjects:
            continue
        if limit and per_subject.get(subject, 0) >= limit:
            continue
        if not 0 <= gold < len(choices):
            raise GptforgeError(f"{where}:{lineno}: answer {gold} outside 0..{len(choices) - 1}")
        shots = dev.get(subject, [])[:num_fewshot]
        if num_fewshot and len(shots) < num_fewshot:
            raise GptforgeError(f"{where}:{lineno}: only {len(shots)} dev examples for {subject!r}, "
                                f"{num_fewshot} requested; check the dev split file")
        prompt = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for shot in shots:
            prompt += _mmlu_question(shot) + " " + LETTERS[int(shot["answer"])] + "\n\n"
        prompt += question
        per_subject[subject] = per_subject.get(subject, 0) + 1
        items.append(Item(id=f"{subject}/{per_subject[subject] - 1}", context=prompt,
                          choices=list(LETTERS[: len(choices)]), gold=gold, group=subject))
    if subjects:
        missing = sorted(set(subjects) - set(per_subject))
        if missing:
            raise GptforgeError(f"{where}: no items for subject(s) {', '.join(missing)}")
    return items


# ---- any jsonl with a field mapping ------------------------------------------------------------------------


def load_jsonl_task(path: str | Path, context_field: str = "context", choices_field: str = "choices",
                    gold_field: str = "gold", template: str | None = None, delimiter: str = " ",
                    limit: int | None = None) -> list[Item]:
    """Items from a jsonl file whose records hold a context, a list of choices and the right answer.

    ``gold`` may be an index, the text of the right choice, or a letter (A, B, …). ``template`` (optional) is a
    Python format string over the record's fields that builds the context, e.g. ``"Q: {question}\\nA:"``.
    """
    items = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            context = template.format(**rec) if template else rec[context_field]
        except KeyError as e:
            raise GptforgeError(f"{where}: record has no field {e}; fields are {', '.join(rec)} "
                                "(map them with --field context=NAME or --template)") from None
        if choices_field not in rec or not isinstance(rec[choices_field], list) or len(rec[choices_field]) < 2:
            raise GptforgeError(f"{where}: field {choices_field!r} must be a list of at least two choices "
                                f"(fields: {', '.join(rec)}; map with --field choices=NAME)")
        if gold_field not in rec:
            raise GptforgeError(f"{where}: record has no gold field {gold_field!r}; map it with --field gold=NAME")
        choices = [str(c) for c in rec[choices_field]]
        gold = _gold_index(rec[gold_field], choices, where)
        items.append(Item(id=str(rec.get("id", lineno)), context=str(context), choices=choices, gold=gold,
                          group=rec.get("group") or rec.get("subject"), delimiter=delimiter))
        if limit and len(items) >= limit:
            break
    if not items:
        raise GptforgeError(f"{path}: no records")
    return items


def _gold_index(value, choices: list[str], where: str) -> int:
    if isinstance(value, bool):
        raise GptforgeError(f"{where}: gold value {value!r} is a boolean, expected an index, letter or choice text")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
    elif isinstance(value, str) and value in choices:
        index = choices.index(value)
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    else:
        raise GptforgeError(f"{where}: gold value {value!r} is neither an index, a letter, nor one of the choices")
    if not 0 <= index < len(choices):
        raise GptforgeError(f"{where}: gold index {index} outside 0..{len(choices) - 1}")
    return index
