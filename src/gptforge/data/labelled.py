"""Labelled texts for classification: TSV/CSV/JSONL columns → texts and labels, class order, balancing."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gptforge.errors import GptforgeError


@dataclass
class ClassifyDataConfig:
    path: str = ""  # a TSV, CSV or JSONL file
    format: Literal["auto", "tsv", "csv", "jsonl"] = "auto"
    text_column: str = "text"  # a column name, or a 0-based index for files without a header
    label_column: str = "label"  # headerless 2-column files default to label=0, text=1 (SMS Spam Collection)
    header: bool | None = None  # None = detect (first row holds both column names)
    labels: list[str] = field(default_factory=list)  # class order; default: sorted distinct labels
    balance: bool = False  # downsample every class to the size of the smallest
    limit: int | None = None  # use only N examples (seeded sample, after balancing)
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train / val / test
    split_seed: int = 0
    max_len: int | None = None  # tokens per text (longer ones are truncated); default: model context
    skip_bad: bool = False  # skip malformed rows (counted) instead of failing on the first



def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if first.lstrip().startswith("{"):
        return "jsonl"
    return "tsv" if "\t" in first else "csv"


def _column_index(spec: str, names: list[str] | None, what: str, path: Path) -> int:
    if names is not None:
        lowered = [n.strip().lower() for n in names]
        if spec.strip().lower() in lowered:
            return lowered.index(spec.strip().lower())
    if spec.isdigit():
        return int(spec)
    raise GptforgeError(f"{path}: no {what} column {spec!r}" + (f" in header {names}" if names else "")
                        + f"; set data.{what}_column to a column name or a 0-based index")


def read_labelled(cfg: ClassifyDataConfig, log=print) -> tuple[list[str], list[str], int]:
    """``(texts, labels, skipped)`` from a TSV/CSV/JSONL file; bad rows raise with ``file:line`` unless skipped."""
    path = Path(cfg.path)
    if not path.is_file():
        raise GptforgeError(f"data file not found: {path}")
    fmt = _detect_format(path) if cfg.format == "auto" else cfg.format
    texts, labels, skipped = [], [], 0

    def bad(lineno: int, why: str) -> None:
        nonlocal skipped
        if not cfg.skip_bad:
            raise GptforgeError(f"{path}:{lineno}: {why}; fix the row or pass --skip-bad")
        skipped += 1

    if fmt == "jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(lineno, f"invalid JSON ({e.msg})")
                    continue
                if not isinstance(row, dict) or cfg.text_column not in row or cfg.label_column not in row:
                    bad(lineno, f"expected an object with {cfg.text_column!r} and {cfg.label_column!r}")
                    continue
                text, label = row[cfg.text_column], row[cfg.label_column]
                if not isinstance(text, str) or not text.strip():
                    bad(lineno, f"{cfg.text_column!r} must be a non-empty string")
                    continue
                texts.append(text)
                labels.append(str(label))
        return texts, labels, skipped

    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "tsv":
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        else:
            rows = list(csv.reader(f))
    if not rows:
        raise GptforgeError(f"{path}: the file is empty")
    first = rows[0]
    lowered = [c.strip().lower() for c in first]
    header = cfg.header
    if header is None:
        header = cfg.text_column.lower() in lowered and cfg.label_column.lower() in lowered
    names = first if header else None
    defaults = (cfg.text_column, cfg.label_column) == ("text", "label")
    if not header and defaults and len(first) == 2:
        text_idx, label_idx = 1, 0  # "label<TAB>text", as in the SMS Spam Collection
    else:
        text_idx = _column_index(cfg.text_column, names, "text", path)
        label_idx = _column_index(cfg.label_column, names, "label", path)
    for lineno, row in enumerate(rows[1:] if header else rows, 2 if header else 1):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) <= max(text_idx, label_idx):
            bad(lineno, f"expected at least {max(text_idx, label_idx) + 1} columns, found {len(row)}")
            continue
        text, label = row[text_idx], row[label_idx].strip()
        if not text.strip() or not label:
            bad(lineno, "empty text or label")
            continue
        texts.append(text)
        labels.append(label)
    if not texts:
        raise GptforgeError(f"{path}: no usable rows")
    return texts, labels, skipped


def class_order(labels: list[str], given: list[str]) -> list[str]:
    """The class list: as configured, else sorted (numerically when every label is an integer)."""
    if given:
        unknown = sorted(set(labels) - set(given))
        if unknown:
            raise GptforgeError(f"labels {unknown[:5]} are not in data.labels {given}; add them or fix the data")
        return list(given)
    distinct = set(labels)
    if len(distinct) < 2:
        raise GptforgeError(f"classification needs at least two classes; the data has only {sorted(distinct)}")
    if all(lab.lstrip("-").isdigit() for lab in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def balance_classes(indices: list[int], targets: list[int], seed: int) -> list[int]:
    """Downsample every class to the size of the smallest (seeded); returns shuffled indices."""
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(targets[i], []).append(i)
    smallest = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    kept = [i for c in sorted(by_class) for i in rng.sample(by_class[c], smallest)]
    rng.shuffle(kept)
    return kept


