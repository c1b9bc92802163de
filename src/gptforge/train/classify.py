"""Text classification by fine-tuning a GPT: the LM head is replaced by an N-class head on the last real token.

:func:`run_classify` reads labelled texts (TSV/CSV/JSONL columns), optionally balances the classes by
downsampling, splits train/val/test deterministically (default 70/10/20 as in Raschka's chapter 6), freezes
what the config says (``all`` trainable, the ``last_blocks`` k blocks + final LayerNorm + head, or the ``head``
only), trains through the shared core (:mod:`gptforge.train.core`: precision, optimizer step, metrics, atomic
hashed checkpoints, resume) with an evaluation on the validation split each epoch, keeps the weights with the
best validation accuracy, and reports accuracy and a confusion matrix per split plus the shared chart.
:func:`load_classifier` and :func:`predict` serve ``gptforge classify predict``.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``loss.png`` (loss and accuracy), ``results.json``,
``ckpt/step_NNNNNNN/`` (``classifier.safetensors``, ``model_config.json`` with the labels, ``tokenizer/``,
optimizer and trainer state, ``files.json``), ``ckpt/best`` and ``ckpt/latest`` pointers; with LoRA
(``lora.r``: adapters + the head train) merged weights and ``adapter/`` (:mod:`gptforge.train.lora`).
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from gptforge.checkpoint import model_config, read_model_config, read_safetensors, verify_files
from gptforge.data.batching import split_indices
from gptforge.data.labelled import ClassifyDataConfig, balance_classes, class_order, read_labelled
from gptforge.errors import GptforgeError
from gptforge.io import write_json
from gptforge.model import GPT, GPTConfig
from gptforge.model_modern import build_model
from gptforge.tokenizer import load_tokenizer
from gptforge.train import lora as L
from gptforge.train.core import (
    BestKeeper,
    CheckpointConfig,
    FineTuneRun,
    LogConfig,
    OptimConfig,
    RunDir,
    Runtime,
    StopFlag,
    TrainCommon,
    build_optimizer,
    finish_with_best,
    finished_message,
    load_base_model,
    optimizer_step,
    restore_checkpoint,
    save_training_checkpoint,
    setup_runtime,
    start_checkpointing,
    teardown_runtime,
)
from gptforge.train.lora import LoraSection
from gptforge.train.nonfinite import NonFiniteGuard

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
class ClassifyTrainConfig(TrainCommon):
    """Classify's ``train`` keys; precision, seed, device and grad_clip are the shared ones."""

    seed: int = 123
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 8
    trainable: Literal["all", "last_blocks", "head"] = "last_blocks"
    last_k: int = 1  # with trainable=last_blocks: how many final transformer blocks train
    dropout: float | None = None  # override the checkpoint's dropout (seed 004 uses 0.0)
    eval_every: int | None = None  # optimizer steps between evaluations; default: each epoch
    eval_batch_size: int = 32


@dataclass
class ClassifyConfig(FineTuneRun):
    STAGE: ClassVar[str] = "classify"
    name: str = "classify"
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, schedule="constant", min_lr_ratio=0.0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(keep_last=1))
    log: LogConfig = field(default_factory=LogConfig)
    lora: LoraSection = field(default_factory=LoraSection)  # r > 0: LoRA adapters + the head (train.trainable unused)

    def validate(self) -> ClassifyConfig:
        self.check_run("a base checkpoint: --checkpoint DIR (step dir, run dir or HF directory)", bool(self.data.path),
                       "labelled data: --data FILE (TSV, CSV or JSONL)",
                       ("epochs", "batch_size", "eval_batch_size", "last_k"), ("max_steps", "eval_every"), ("limit",))
        self.check_sections()
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


# ---- checkpoints -------------------------------------------------------------------------------------------


def classifier_writer(model: Classifier, tokenizer, info: dict):
    """A ``write_model`` for the shared checkpoint writer: weights, config (model shape + labels), tokenizer."""
    def write(directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in L.merged_state(model).items()}  # LoRA: merged
        save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
        L.write_lora_state(model, directory)  # LoRA: the adapters' exact state, for resume
        meta = {"model": model.config.to_dict(), "classifier": info}
        (directory / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(directory / "tokenizer")
    return write


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(Path(directory) / WEIGHTS)


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
    directory = resolve_classifier(path)
    verify_files(directory)
    meta = read_model_config(directory, META)
    info = meta.get("classifier")
    if not isinstance(info, dict) or not isinstance(info.get("labels"), list) or not info["labels"]:
        raise GptforgeError(f"{directory / META}: no \"classifier\" section with a list of labels; the file is "
                            "damaged or not a gptforge classifier")
    model = Classifier(build_model(model_config(meta, directory, META)), len(info["labels"]))
    try:
        model.load_state_dict(_load_weights(directory), strict=True)
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
    """Fine-tune ``config.base`` as a classifier on ``config.data``; see the module docstring."""
    config.validate()
    rt = setup_runtime(config.train, log)
    try:
        if rt.world_size > 1:
            raise GptforgeError("classify trains in one process; launch it without torchrun")
        with StopFlag() as stop:
            return _run(config, rt, stop, progress and config.log.progress)
    finally:
        teardown_runtime()


def _run(config: ClassifyConfig, rt: Runtime, stop: StopFlag, progress: bool) -> ClassifyResult:
    dc, tc = config.data, config.train
    log, device = rt.log, rt.device
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

    gpt, tokenizer, meta = load_base_model(config.base, config.tokenizer, tc.dropout)
    max_len = min(dc.max_len or gpt.config.block_size, gpt.config.block_size)
    pad_id = tokenizer.pad_id if tokenizer.pad_id < gpt.config.vocab_size else tokenizer.eot_id
    model = Classifier(gpt, len(labels))
    n_trainable = freeze(model, tc.trainable, tc.last_k)
    if config.lora.r:  # adapters, and the head in full (train.trainable does not apply)
        model = L.apply_lora(model, L.with_head(config.lora), frozen_dtype=rt.precision.dtype)
    model.to(device).train()
    log(f"classifier: {len(labels)} classes {labels}; " + (
        f"{L.describe(model)}; {L.memory_line(model, tc.batch_size, max_len, rt.precision.name)}"
        if L.has_lora(model) else
        f"{n_trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters trainable ({tc.trainable})"))

    encoded: dict[str, tuple[list[list[int]], list[int]]] = {}
    truncated = 0
    for name, idx in split_of.items():
        ids, n_trunc = encode_texts([texts[i] for i in idx], tokenizer, max_len)
        encoded[name] = (ids, [targets[i] for i in idx])
        truncated += n_trunc
    if truncated:
        log(f"{truncated} text(s) longer than {max_len} tokens were truncated")

    run_dir = Path(config.out_dir) / config.name
    resume_dir = start_checkpointing(run_dir, config.checkpoint, config.overwrite, rt)
    optimizer = build_optimizer(model, config.optim)
    scaler = rt.precision.grad_scaler()
    autocast = rt.precision.autocast
    train_ids, train_y = encoded["train"]
    steps_per_epoch = max(1, len(train_ids) // tc.batch_size)  # the last partial batch is dropped (equal weights)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch  # max_steps overrides epochs (as in HF Trainer)
    log(f"training for {total_steps} steps = {total_steps / steps_per_epoch:.2f} epoch(s) of {steps_per_epoch} "
        + ("(train.max_steps; it overrides train.epochs)" if tc.max_steps else f"(train.epochs={tc.epochs})"))
    schedule = config.optim.schedule_for(total_steps)
    info = {"labels": labels, "max_len": max_len, "pad_id": pad_id, "base": meta.get("path"),
            "trainable": tc.trainable, "last_k": tc.last_k}
    majority = max(range(len(labels)), key=lambda c: train_y.count(c))
    val_ids, val_y = encoded["val"]
    majority_rate = (sum(y == majority for y in val_y) / len(val_y)) if val_y else float("nan")

    state = {"step": 0, "nonfinite_steps": 0, "skipped_steps": 0}
    keeper = BestKeeper(mode="max")  # (accuracy, -loss)
    if resume_dir is not None:
        trainer_state = restore_checkpoint(resume_dir, rt, load_weights=lambda d: L.load_weights(model, d, _load_weights(d)),
                                           load_optimizer=optimizer.load_state_dict, scaler=scaler)
        state.update({k: trainer_state[k] for k in state if k in trainer_state})
        keeper.load_state_dict(trainer_state["keeper"])
        log(f"resumed from {resume_dir} at step {state['step']}")
        if state["step"] >= total_steps:
            log(finished_message(state["step"], total_steps, "--max-steps or --epochs"))
    run = RunDir(run_dir, config, rt, config.log, resume_step=state["step"] if resume_dir else None,
                 grad_clip=tc.grad_clip)

    def save(step: int, is_best: bool = False, val_accuracy: float | None = None) -> Path | None:
        run.log({"step": step, **guard.period()})  # exploding-gradient counts of the checkpoint period
        return save_training_checkpoint(
            rt, run, step, write_model=classifier_writer(model, tokenizer, {**info, "step": step,
                                                                            "val_accuracy": val_accuracy}),
            optimizer_state={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
            trainer_state={**state, "keeper": keeper.state_dict(), "config": asdict(config)},
            keep_last=config.checkpoint.keep_last, is_best=is_best)

    def evaluate_and_keep(step: int) -> None:
        m = evaluate(model, val_ids, val_y, len(labels), tc.eval_batch_size, pad_id, device, autocast())
        improved = keeper.update((m.accuracy, -m.loss), step)
        run.log({"step": step, "epoch": round(step / steps_per_epoch, 3), "val_loss": m.loss,
                 "val_accuracy": m.accuracy, "best": improved})
        log(f"step {step} (epoch {step / steps_per_epoch:.2f}): val loss {m.loss:.4f}, accuracy {m.accuracy:.2%}")
        save(step, improved, m.accuracy)

    correct = [0]

    def loss_fn(model, batch) -> torch.Tensor:
        x, lengths, y = batch
        logits = model(x, lengths).float()
        correct[0] += int((logits.argmax(-1) == y).sum())
        return F.cross_entropy(logits, y)

    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=state["step"], desc="classify", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0, interrupted = time.time(), False
    guard = NonFiniteGuard.for_train(tc, log, fp16_scaler=scaler is not None)
    order, order_epoch = None, None
    while state["step"] < total_steps:
        epoch, position = divmod(state["step"], steps_per_epoch)
        if order_epoch != epoch:  # a seeded shuffle per epoch: resuming mid-epoch sees the same order
            order, order_epoch = list(range(len(train_ids))), epoch
            random.Random(tc.seed + epoch).shuffle(order)
        chunk = order[position * tc.batch_size:(position + 1) * tc.batch_size]
        x, lengths = collate([train_ids[i] for i in chunk], pad_id)
        y = torch.tensor([train_y[i] for i in chunk], device=device)
        correct[0] = 0
        stats = optimizer_step(model, optimizer, [(x.to(device), lengths.to(device), y)],
                               schedule.lr_at(state["step"]), loss_fn=loss_fn, count_fn=lambda b: len(b[2]), rt=rt,
                               scaler=scaler, grad_clip=tc.grad_clip, params=params)
        state["step"] += 1
        state["nonfinite_steps"] += stats.nonfinite
        state["skipped_steps"] += stats.skipped
        step = state["step"]
        run.log({"step": step, "epoch": round(step / steps_per_epoch, 3), **stats.fields(),
                 "train_accuracy": correct[0] / len(chunk), "elapsed_s": round(time.time() - t0, 2)})
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{stats.loss:.3f}")
        if guard.update(step, stats):  # diverged: keep the last good state, then stop loudly
            bar.close()
            path = save(step)
            run.close()
            raise guard.error(path)
        last = step >= total_steps
        stop_now = stop.any_rank(rt)
        if val_ids and ((tc.eval_every and step % tc.eval_every == 0)
                        or (not tc.eval_every and step % steps_per_epoch == 0) or last):
            evaluate_and_keep(step)
        elif (config.checkpoint.interval and step % config.checkpoint.interval == 0) or last or stop_now:
            save(step)
        if stop_now:
            interrupted = True
            log(f"\nstopped by {stop.name} after step {step}; continue with --resume")
            break
    bar.close()

    final = finish_with_best(rt, run, keeper, lambda d: L.load_weights(model, d, _load_weights(d)), interrupted,
                             model=model)
    if L.has_lora(model) and not interrupted:  # adapter/ (peft layout, our names), and the merged model from here
        model = L.finish_lora(model, run_dir, config.base, tokenizer, rt.is_main, log)

    metrics = {name: evaluate(model, ids, ys, len(labels), tc.eval_batch_size, pad_id, device, autocast())
               for name, (ids, ys) in encoded.items() if ids}
    run.plot()
    run.close()
    result = ClassifyResult(run_dir=run_dir, checkpoint=final, labels=labels, steps=state["step"],
                            majority_rate=majority_rate,
                            best_val_accuracy=keeper.best[0] if keeper.best else None, metrics=metrics,
                            data={"rows": len(texts), "skipped_bad": skipped, "class_counts": counts,
                                  "balanced": dc.balance, "truncated": truncated,
                                  "splits": {k: len(v) for k, v in split_of.items()}})
    write_json(run_dir / "results.json", {
        "labels": labels, "steps": state["step"], "majority_rate_val": majority_rate,
        "checkpoint": str(result.checkpoint), "metrics": {k: v.__dict__ for k, v in metrics.items()},
        "data": result.data, "precision": rt.precision.describe, "elapsed_s": round(time.time() - t0, 2)})
    for name, m in metrics.items():
        log(f"{name:5s} accuracy {m.accuracy:.2%} (n={m.size}), loss {m.loss:.4f}, confusion {m.confusion}")
    log(f"classify done: {state['step']} steps in {time.time() - t0:.0f}s ({rt.precision.name}); model in "
        f"{result.checkpoint}, results in {run_dir / 'results.json'}, chart {run_dir / 'loss.png'}")
    if not math.isnan(majority_rate):
        log(f"majority-class rate on validation: {majority_rate:.2%}")
    return result
