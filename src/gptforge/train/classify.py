"""Text classification by fine-tuning a GPT: the LM head is replaced by an N-class head on the last real token.

:func:`run_classify` reads labelled texts (TSV/CSV/JSONL columns), optionally balances the classes by
downsampling, splits train/val/test deterministically (default 70/10/20 as in Raschka's chapter 6), freezes
what the config says (``all`` trainable, the ``last_blocks`` k blocks + final LayerNorm + head, or the ``head``
only), trains for some epochs with an evaluation on the validation split each epoch, keeps the weights with the
best validation accuracy, and reports accuracy and a confusion matrix per split plus a loss/accuracy chart.
:func:`load_classifier` and :func:`predict` serve ``gptforge classify predict``.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``loss.png`` (loss and accuracy), ``results.json``,
``ckpt/step_NNNNNNN/`` (``classifier.safetensors``, ``model_config.json`` with the labels, ``tokenizer/``),
``ckpt/best`` and ``ckpt/latest`` pointers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.charts import save_figure
from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig

__all__ = [
    "Classifier",
    "ClassifyConfig",
    "ClassifyDataConfig",
    "ClassifyResult",
    "ClassifyTrainConfig",
    "freeze",
    "load_classifier",
    "predict",
    "read_labelled",
    "run_classify",
]

WEIGHTS = "classifier.safetensors"
META = "model_config.json"


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


@dataclass
class ClassifyTrainConfig:
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_ratio: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    trainable: Literal["all", "last_blocks", "head"] = "last_blocks"
    last_k: int = 1  # with trainable=last_blocks: how many final transformer blocks train
    dropout: float | None = None  # override the checkpoint's dropout (seed 004 uses 0.0)
    grad_clip: float = 1.0
    eval_every: int | None = None  # optimizer steps between evaluations; default: each epoch
    eval_batch_size: int = 32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = 10


@dataclass
class ClassifyConfig:
    checkpoint: str = ""  # base model: step dir, run dir or Hugging Face GPT-2 directory
    name: str = "classify"
    out_dir: str = "runs"
    tokenizer: str | None = None  # only when the checkpoint carries none
    device: str = "auto"
    seed: int = 123
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)

    def validate(self) -> ClassifyConfig:
        if not self.checkpoint:
            raise GptforgeError("classify needs a base checkpoint: --checkpoint DIR (step dir, run dir or HF directory)")
        if not self.data.path:
            raise GptforgeError("classify needs labelled data: --data FILE (TSV, CSV or JSONL)")
        if len(self.data.split) != 3:
            raise GptforgeError(f"data.split takes train/val/test fractions, got {self.data.split}")
        t = self.train
        for name in ("epochs", "batch_size", "eval_batch_size", "last_k", "log_every"):
            if getattr(t, name) < 1:
                raise GptforgeError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.lr <= 0:
            raise GptforgeError(f"train.lr must be > 0, got {t.lr}")
        return self


@dataclass
class SplitMetrics:
    loss: float
    accuracy: float
    confusion: list[list[int]]  # rows = true class, columns = predicted class
    size: int


@dataclass
class ClassifyResult:
    run_dir: Path
    checkpoint: Path
    labels: list[str]
    steps: int
    majority_rate: float  # accuracy of always predicting the most frequent training class, on validation
    best_val_accuracy: float | None
    metrics: dict[str, SplitMetrics]  # train / val / test with the final (best) weights
    data: dict


# ---- data --------------------------------------------------------------------------------------------------


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


# ---- model -------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A GPT body (LM head removed) and a linear N-class head reading the hidden state of the last real token."""

    def __init__(self, gpt: GPT, num_classes: int):
        super().__init__()
        gpt.lm_head = nn.Identity()  # the body now returns final-LayerNorm hidden states (B, T, d)
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, N)``; rows are right-padded and ``lengths`` counts their real tokens."""
        hidden, _ = self.gpt(input_ids)  # causal attention: right padding never reaches a real token
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.head(last)


def freeze(model: Classifier, trainable: str, last_k: int = 1) -> int:
    """Set ``requires_grad``: ``all``, the ``last_blocks`` (k blocks + final LayerNorm + head) or the ``head``.
    Returns the number of trainable parameters."""
    if trainable not in ("all", "last_blocks", "head"):
        raise GptforgeError(f"train.trainable must be all, last_blocks or head, got {trainable!r}")
    for p in model.parameters():
        p.requires_grad = trainable == "all"
    if trainable != "all":
        for p in model.head.parameters():
            p.requires_grad = True
    if trainable == "last_blocks":
        blocks = model.gpt.transformer.h
        if last_k > len(blocks):
            raise GptforgeError(f"train.last_k={last_k} but the model has only {len(blocks)} blocks")
        for module in [*blocks[len(blocks) - last_k:], model.gpt.transformer.ln_f]:
            for p in module.parameters():
                p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def encode_texts(texts: list[str], tokenizer, max_len: int) -> tuple[list[list[int]], int]:
    """Token ids per text, truncated to ``max_len``; returns ``(ids, n_truncated)``."""
    encoded = tokenizer.encode_batch(texts)
    truncated = sum(len(e) > max_len for e in encoded)
    out = [e[:max_len] for e in encoded]
    for i, e in enumerate(out):
        if not e:
            raise GptforgeError(f"text {i} encodes to no tokens: {texts[i]!r}")
    return out, truncated


def collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` ids and their lengths."""
    lengths = torch.tensor([len(x) for x in ids])
    batch = torch.full((len(ids), int(lengths.max())), pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
    return batch, lengths


@torch.no_grad()
def evaluate(model: Classifier, ids: list[list[int]], targets: list[int], num_classes: int, batch_size: int,
             pad_id: int, device, autocast=None) -> SplitMetrics:
    """Mean loss, accuracy and confusion matrix (rows true, columns predicted) on one split."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total_loss = 0.0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        x, lengths = collate([ids[i] for i in chunk], pad_id)
        y = torch.tensor([targets[i] for i in chunk])
        with autocast or nullcontext():
            logits = model(x.to(device), lengths.to(device)).float()
        total_loss += F.cross_entropy(logits, y.to(device), reduction="sum").item()
        pred = logits.argmax(-1).cpu()
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    model.train(was_training)
    n = max(len(ids), 1)
    return SplitMetrics(loss=total_loss / n, accuracy=confusion.diag().sum().item() / n,
                        confusion=confusion.tolist(), size=len(ids))


def plot_classification(path: Path, train_points, val_points, title: str) -> None:
    """Loss (left) and accuracy (right) for training steps and validation evaluations, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train_points:
        steps, losses, accs = zip(*train_points)
        ax_loss.plot(steps, losses, label="train", alpha=0.7)
        ax_acc.plot(steps, accs, label="train (running)", alpha=0.7)
    if val_points:
        steps, losses, accs = zip(*val_points)
        ax_loss.plot(steps, losses, "o-", label="validation")
        ax_acc.plot(steps, accs, "o-", label="validation")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# ---- checkpoints -------------------------------------------------------------------------------------------


def save_classifier(directory: Path, model: Classifier, tokenizer, info: dict) -> None:
    """Weights, config (model shape + labels) and tokenizer, written to a temporary directory then renamed."""
    from safetensors.torch import save_file

    tmp = directory.with_name(f".tmp-{directory.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    meta = {"model": model.config.to_dict(), "classifier": info}
    (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def resolve_classifier(path: str | Path) -> Path:
    """A classifier step directory from itself, a run directory, a ``ckpt`` directory or a pointer file."""
    path = Path(path)
    if path.is_file() and path.name in ("best", "latest"):
        return path.parent / path.read_text(encoding="utf-8").strip()
    if (path / WEIGHTS).is_file():
        return path
    for root in (path / "ckpt", path):
        for pointer in ("best", "latest"):
            if (root / pointer).is_file():
                target = root / (root / pointer).read_text(encoding="utf-8").strip()
                if (target / WEIGHTS).is_file():
                    return target
    raise GptforgeError(f"{path} holds no classifier (expected {WEIGHTS}, or a run directory with ckpt/best); "
                        "train one with gptforge classify")


def load_classifier(path: str | Path, device="cpu") -> tuple[Classifier, object, dict]:
    """``(classifier, tokenizer, info)`` where ``info`` holds ``labels`` and ``max_len``."""
    from safetensors.torch import load_file

    from gptforge.tokenizer import load_tokenizer

    directory = resolve_classifier(path)
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
    info = meta["classifier"]
    model = Classifier(GPT(GPTConfig(**meta["model"])), len(info["labels"]))
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=True)
    except RuntimeError as e:
        raise GptforgeError(f"{directory / WEIGHTS} does not match its {META}: {e}") from None
    tokenizer = load_tokenizer(directory / "tokenizer") if (directory / "tokenizer").is_dir() else None
    if tokenizer is None:
        raise GptforgeError(f"{directory} has no tokenizer/ directory")
    info["path"] = str(directory)
    return model.to(device).eval(), tokenizer, info


@torch.no_grad()
def predict(model: Classifier, tokenizer, info: dict, texts: list[str], device="cpu", batch_size: int = 32
            ) -> list[dict]:
    """Class probabilities for each text: ``[{text, label, probabilities: {label: p}}]``."""
    labels = info["labels"]
    ids, _ = encode_texts(texts, tokenizer, info["max_len"])
    out = []
    for s in range(0, len(ids), batch_size):
        x, lengths = collate(ids[s:s + batch_size], info["pad_id"])
        probs = model(x.to(device), lengths.to(device)).float().softmax(-1).cpu()
        for text, p in zip(texts[s:s + batch_size], probs):
            out.append({"text": text, "label": labels[int(p.argmax())],
                        "probabilities": {lab: round(float(v), 6) for lab, v in zip(labels, p)}})
    return out


# ---- the run -----------------------------------------------------------------------------------------------


def run_classify(config: ClassifyConfig, log=print, progress: bool = True) -> ClassifyResult:
    """Fine-tune ``config.checkpoint`` as a classifier on ``config.data``; see the module docstring."""
    from tqdm.auto import tqdm

    from gptforge.checkpoint import load_model
    from gptforge.config import save_config
    from gptforge.data.chat import split_indices
    from gptforge.tokenizer import load_tokenizer
    from gptforge.train.optim import LRSchedule, configure_optimizer, set_lr
    from gptforge.train.sft import _autocast, _pick_device, _write_json, _write_pointer, set_dropout

    config.validate()
    dc, tc = config.data, config.train
    texts, raw_labels, skipped = read_labelled(dc, log)
    labels = class_order(raw_labels, dc.labels)
    label_id = {lab: i for i, lab in enumerate(labels)}
    targets = [label_id[lab] for lab in raw_labels]
    counts = {lab: raw_labels.count(lab) for lab in labels}
    indices = list(range(len(texts)))
    if dc.balance:
        indices = balance_classes(indices, targets, dc.split_seed)
    if dc.limit:
        rng = random.Random(dc.split_seed)
        indices = sorted(indices) if not dc.balance else indices
        rng.shuffle(indices)
        indices = indices[: dc.limit]
    parts = split_indices(len(indices), dc.split, dc.split_seed)
    split_of = {name: [indices[i] for i in part] for name, part in zip(("train", "val", "test"), parts)}
    if not split_of["train"]:
        raise GptforgeError(f"the training split is empty ({len(indices)} examples, split {dc.split})")
    log(f"data: {len(texts)} texts, classes {counts}" + (f", {skipped} bad rows skipped" if skipped else "")
        + (f"; balanced to {len(indices)}" if dc.balance else "")
        + f"; train/val/test {[len(v) for v in split_of.values()]}")

    torch.manual_seed(config.seed)
    device = _pick_device(config.device)
    gpt, tokenizer, meta = load_model(config.checkpoint, device="cpu")
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer is None:
        raise GptforgeError(f"{config.checkpoint} carries no tokenizer; pass --tokenizer gpt2 or a tokenizer dir")
    if tc.dropout is not None:
        set_dropout(gpt, tc.dropout)
    max_len = min(dc.max_len or gpt.config.block_size, gpt.config.block_size)
    pad_id = tokenizer.pad_id if tokenizer.pad_id < gpt.config.vocab_size else tokenizer.eot_id
    model = Classifier(gpt, len(labels))
    n_trainable = freeze(model, tc.trainable, tc.last_k)
    model.to(device).train()
    log(f"classifier: {len(labels)} classes {labels}; {n_trainable:,} of "
        f"{sum(p.numel() for p in model.parameters()):,} parameters trainable ({tc.trainable})")

    encoded: dict[str, tuple[list[list[int]], list[int]]] = {}
    truncated = 0
    for name, idx in split_of.items():
        ids, n_trunc = encode_texts([texts[i] for i in idx], tokenizer, max_len)
        encoded[name] = (ids, [targets[i] for i in idx])
        truncated += n_trunc
    if truncated:
        log(f"{truncated} text(s) longer than {max_len} tokens were truncated")

    run_dir = Path(config.out_dir) / config.name
    ckpt_root = run_dir / "ckpt"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("", encoding="utf-8")

    def record(entry: dict) -> None:
        with metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    autocast, scaler = _autocast(device, tc.precision)
    optimizer = configure_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay)
    train_ids, train_y = encoded["train"]
    steps_per_epoch = max(1, len(train_ids) // tc.batch_size)  # the last partial batch is dropped (equal weights)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    schedule = LRSchedule(kind=tc.schedule, max_lr=tc.lr, min_lr=0.0, warmup_steps=round(tc.warmup_ratio * total_steps),
                          total_steps=total_steps)
    info = {"labels": labels, "max_len": max_len, "pad_id": pad_id, "base": meta.get("path"),
            "trainable": tc.trainable, "last_k": tc.last_k}
    majority = max(range(len(labels)), key=lambda c: train_y.count(c))
    val_ids, val_y = encoded["val"]
    majority_rate = (sum(y == majority for y in val_y) / len(val_y)) if val_y else float("nan")

    train_points, val_points = [], []
    best_key, best_name, best_state = None, None, None
    step, t0 = 0, time.time()
    window_correct, window_seen = 0, 0

    def evaluate_and_keep() -> None:
        nonlocal best_key, best_name, best_state
        if not val_ids:
            return
        m = evaluate(model, val_ids, val_y, len(labels), tc.eval_batch_size, pad_id, device, autocast)
        val_points.append((step, m.loss, m.accuracy))
        key = (m.accuracy, -m.loss)
        improved = best_key is None or key > best_key
        record({"step": step, "epoch": round(step / steps_per_epoch, 3), "val_loss": m.loss,
                "val_accuracy": m.accuracy, "best": improved})
        log(f"step {step} (epoch {step / steps_per_epoch:.2f}): val loss {m.loss:.4f}, accuracy {m.accuracy:.2%}")
        if improved:
            best_key = key
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            old, best_name = best_name, f"step_{step:07d}"
            save_classifier(ckpt_root / best_name, model, tokenizer, {**info, "step": step, "val_accuracy": m.accuracy})
            _write_pointer(ckpt_root, "best", best_name)
            _write_pointer(ckpt_root, "latest", best_name)
            if old and old != best_name:
                shutil.rmtree(ckpt_root / old, ignore_errors=True)

    bar = tqdm(total=total_steps, desc="classify", unit="step", disable=not progress, dynamic_ncols=True)
    rng = random.Random(config.seed)
    for epoch in range(tc.epochs):
        if step >= total_steps:
            break
        order = list(range(len(train_ids)))
        rng.shuffle(order)
        for s in range(0, steps_per_epoch * tc.batch_size, tc.batch_size):
            chunk = order[s:s + tc.batch_size]
            x, lengths = collate([train_ids[i] for i in chunk], pad_id)
            y = torch.tensor([train_y[i] for i in chunk], device=device)
            lr = schedule.lr_at(step)
            set_lr(optimizer, lr)
            with autocast:
                logits = model(x.to(device), lengths.to(device))
            loss = F.cross_entropy(logits.float(), y)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_correct += int((logits.argmax(-1) == y).sum())
            window_seen += len(chunk)
            train_points.append((step, loss.item(), window_correct / window_seen))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", acc=f"{window_correct / window_seen:.2%}")
            if step % tc.log_every == 0:
                record({"step": step, "epoch": round(step / steps_per_epoch, 3), "train_loss": loss.item(),
                        "train_accuracy": window_correct / window_seen, "lr": lr,
                        "elapsed_s": round(time.time() - t0, 2)})
                window_correct, window_seen = 0, 0
            if tc.eval_every and step % tc.eval_every == 0:
                evaluate_and_keep()
            if step >= total_steps:
                break
        if not tc.eval_every:
            evaluate_and_keep()
    bar.close()
    if tc.eval_every and val_ids and (not val_points or val_points[-1][0] != step):
        evaluate_and_keep()

    if best_state is not None:
        model.load_state_dict(best_state)
        final_name = best_name
        log(f"kept the weights with the best validation accuracy ({best_name})")
    else:  # no validation split: the last weights
        final_name = f"step_{step:07d}"
        save_classifier(ckpt_root / final_name, model, tokenizer, {**info, "step": step})
        _write_pointer(ckpt_root, "best", final_name)
    _write_pointer(ckpt_root, "latest", final_name)

    metrics = {name: evaluate(model, ids, ys, len(labels), tc.eval_batch_size, pad_id, device, autocast)
               for name, (ids, ys) in encoded.items() if ids}
    plot_classification(run_dir / "loss.png", train_points, val_points, f"classify {config.name}")
    result = ClassifyResult(run_dir=run_dir, checkpoint=ckpt_root / final_name, labels=labels, steps=step,
                            majority_rate=majority_rate,
                            best_val_accuracy=best_key[0] if best_key else None, metrics=metrics,
                            data={"rows": len(texts), "skipped_bad": skipped, "class_counts": counts,
                                  "balanced": dc.balance, "truncated": truncated,
                                  "splits": {k: len(v) for k, v in split_of.items()}})
    _write_json(run_dir / "results.json", {
        "labels": labels, "steps": step, "majority_rate_val": majority_rate, "checkpoint": str(result.checkpoint),
        "metrics": {k: v.__dict__ for k, v in metrics.items()}, "data": result.data,
        "elapsed_s": round(time.time() - t0, 2)})
    for name, m in metrics.items():
        log(f"{name:5s} accuracy {m.accuracy:.2%} (n={m.size}), loss {m.loss:.4f}, confusion {m.confusion}")
    log(f"classify done: {step} steps in {time.time() - t0:.0f}s; model in {result.checkpoint}, results in "
        f"{run_dir / 'results.json'}, chart {run_dir / 'loss.png'}")
    if not math.isnan(majority_rate):
        log(f"majority-class rate on validation: {majority_rate:.2%}")
    return result
