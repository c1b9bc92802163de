"""Functions the task configs beside this file name as ``!function utils.<name>``.

lm-eval imports this file by its path (a copy sits next to the generated configs), so it imports nothing
relative. Each function rebuilds what lm-eval's stock task produces from the hub's copy of the data.
"""

from __future__ import annotations

from gptforge.eval.tasks import SUBJECT_CATEGORY

try:  # lm-eval's own HellaSwag preprocessing, so the local task cannot drift from the stock one
    from lm_eval.tasks.hellaswag.utils import process_docs as process_hellaswag
except ImportError:  # pragma: no cover - a future lm-eval that moved it: the same logic, kept by gptforge
    from gptforge.eval.tasks import hellaswag_preprocess as _preprocess

    def process_hellaswag(dataset):
        def _process_doc(doc):
            ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
            return {"query": _preprocess(doc["activity_label"] + ": " + ctx),
                    "choices": [_preprocess(ending) for ending in doc["endings"]], "gold": int(doc["label"])}

        return dataset.map(_process_doc)

_COPA_CONNECTORS = ("therefore", "because")


def copa_doc_to_text(doc: dict) -> str:
    """Stock: ``premise.strip()[:-1] + " therefore|because"``; llm-foundry wrote ``", therefore|because"``."""
    query = doc["query"]
    for connector in _COPA_CONNECTORS:
        if query.endswith(", " + connector):
            return query[: -len(connector) - 2] + " " + connector
    return query


def copa_doc_to_choice(doc: dict) -> list[str]:
    """Stock: ``" " + choice`` with its first letter lower-cased (llm-foundry already lower-cased it)."""
    return [" " + c[:1].lower() + c[1:] for c in doc["choices"]]


def boolq_doc_to_text(doc: dict) -> str:
    """Stock: ``"{passage}\\nQuestion: {question}?\\nAnswer:"``; llm-foundry's query is ``"Passage: "`` followed
    by that text up to ``"\\nAnswer:"``."""
    return doc["query"].removeprefix("Passage: ") + "\nAnswer:"


def _subject_docs(subject: str):
    def process_docs(dataset):
        return dataset.filter(lambda s: s == subject, input_columns="subject")

    process_docs.__name__ = f"mmlu_{subject}"
    return process_docs


# One process_docs per MMLU subject (``!function utils.mmlu_<subject>``): the local files hold all subjects in
# one file per split, where the hub has one configuration per subject.
for _subject in SUBJECT_CATEGORY:
    globals()[f"mmlu_{_subject}"] = _subject_docs(_subject)
