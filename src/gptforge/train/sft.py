"""Instruction fine-tuning (SFT): a base checkpoint + chat data → an instruct model in ``runs/<name>/``.

:func:`run_sft` loads the checkpoint, prepares the vocabulary for the prompt style (the chat style adds
``<|im_start|>``/``<|im_end|>`` and grows the embedding and head rows, new rows set to the mean of the old ones),
splits the data deterministically (default 85/5/10), trains with a warmup + cosine schedule for some epochs
(optional NEFTune noise on the input embeddings, only while training), evaluates on the validation split each
epoch, keeps the best weights (early stopping with patience restores them), and finally writes greedy responses
for the test split to ``test_responses.json`` (instruction, input, reference, response, model) for judging.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``loss.png``, ``ckpt/step_NNNNNNN/`` (model + tokenizer with
its chat template), ``ckpt/best`` and ``ckpt/latest`` pointers, ``test_responses.json``, ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
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
from gptforge.model import GPT, IGNORE_INDEX

__all__ = [
    "SFTConfig",
    "SFTDataConfig",
    "SFTGenerateConfig",
    "SFTResult",
    "SFTTrainConfig",
    "neftune_hook",
    "prepare_chat_model",
    "resize_vocab",
    "run_sft",
    "set_dropout",
]


@dataclass
class SFTDataConfig:
    sources: list[str] = field(default_factory=list)  # local .json/.jsonl/.parquet files or hub dataset names
    format: Literal["auto", "alpaca", "dolly", "sharegpt", "messages"] = "auto"
    hub_split: str = "train"
    skip_bad: bool = False  # skip (and count) malformed records instead of failing on the first
    limit: int | None = None  # use only this many conversations (after a seeded shuffle)
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])  # train / val / test
    split_seed: int = 0
    style: Literal["chat", "alpaca"] = "chat"  # chat = ChatML + new tokens; alpaca = text template, GPT-2 as is
    train_on: Literal["all", "last"] = "all"  # supervise all assistant turns or only the last one
    max_len: int | None = None  # tokens per example; default: the model's context
    overlength: Literal["drop", "truncate"] = "drop"
    batching: Literal["pad", "group", "pack"] = "pad"  # pad to longest / length-grouped / packed windows


@dataclass
class SFTTrainConfig:
    epochs: int = 2
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when reached)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    neftune_alpha: float = 0.0  # NEFTune noise scale (5 in seed 000); 0 = off
    patience: int | None = None  # early stopping: evaluations without improvement before stopping
    eval_every: int | None = None  # optimizer steps between evaluations; default: once per epoch
    eval_batch_size: int = 16
    dropout: float | None = None  # override the checkpoint's dropout
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 autocast on capable GPUs
    log_every: int = 10


@dataclass
class SFTGenerateConfig:
    enabled: bool = True  # greedy responses for the test split at the end
    max_new_tokens: int = 256
    limit: int | None = None  # only the first N test conversations
    batch_size: int = 16


@dataclass
class SFTConfig:
    checkpoint: str = ""  # step dir, run dir or Hugging Face GPT-2 directory
    name: str = "sft"
    out_dir: str = "runs"
    tokenizer: str | None = None  # only when the checkpoint carries none
    device: str = "auto"
    seed: int = 1337
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    generate: SFTGenerateConfig = field(default_factory=SFTGenerateConfig)

    def validate(self) -> SFTConfig:
        if not self.checkpoint:
            raise GptforgeError("sft needs a base checkpoint: --checkpoint DIR (step dir, run dir or HF directory)")
        if not self.data.sources:
            raise GptforgeError("sft needs data: --data FILE_OR_HUB_NAME (repeat for several sources)")
        if len(self.data.split) != 3:
            raise GptforgeError(f"data.split takes train/val/test fractions, got {self.data.split}")
        t = self.train
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every"):
            if getattr(t, name) < 1:
                raise GptforgeError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.lr <= 0 or t.neftune_alpha < 0 or not 0 <= t.min_lr_ratio <= 1:
            raise GptforgeError("train.lr must be > 0, train.neftune_alpha >= 0 and train.min_lr_ratio in [0, 1]")
        if t.patience is not None and t.patience < 1:
            raise GptforgeError(f"train.patience must be >= 1 (or unset), got {t.patience}")
        if t.patience is not None and self.data.split[1] <= 0:
            raise GptforgeError("early stopping (train.patience) needs a validation split: data.split[1] > 0")
        return self


@dataclass
class SFTResult:
    run_dir: Path
    checkpoint: Path  # the final (best when validated) model directory
    steps: int
    epochs_completed: float
    initial_val_loss: float | None
    best_val_loss: float | None
    val_losses: list[float]
    stopped_early: bool
    data: dict  # split sizes and encoding statistics
    test_responses: Path | None = None
    stop_rate: float | None = None  # fraction of test responses that ended with the end-of-turn token


# ---- model surgery -----------------------------------------------------------------------------------------


@torch.no_grad()
def resize_vocab(model: GPT, new_size: int, init_rows: list[int] | None = None, mean_of: int | None = None
                 ) -> list[int]:
    """Grow the token embedding (and an untied head) to ``new_size`` rows; new rows and ``init_rows`` are set to
    the mean of the pre-existing rows (of the first ``mean_of`` rows: the real vocabulary when the model's is
    padded). Updates ``model.config.vocab_size``. Returns the initialised row ids."""
    old_size = model.config.vocab_size
    wte = model.transformer.wte
    init_rows = sorted({*range(old_size, new_size), *(init_rows or [])})
    base_rows = [i for i in range(min(mean_of or old_size, old_size)) if i not in set(init_rows)]
    if new_size > old_size:
        new_wte = nn.Embedding(new_size, wte.embedding_dim, device=wte.weight.device, dtype=wte.weight.dtype)
        new_wte.weight[:old_size] = wte.weight
        model.transformer.wte = new_wte
        if model.config.tie_embeddings:
            model.lm_head.weight = new_wte.weight
        else:
            head = model.lm_head
            new_head = nn.Linear(head.in_features, new_size, bias=False, device=head.weight.device,
                                 dtype=head.weight.dtype)
            new_head.weight[:old_size] = head.weight
            model.lm_head = new_head
        model.config.vocab_size = new_size
    if init_rows:
        model.transformer.wte.weight[init_rows] = model.transformer.wte.weight[base_rows].mean(0)
        if not model.config.tie_embeddings:
            model.lm_head.weight[init_rows] = model.lm_head.weight[base_rows].mean(0)
    return init_rows


def prepare_chat_model(model: GPT, tokenizer, style) -> list[str]:
    """Make ``tokenizer`` and ``model`` ready for ``style``: add its special tokens, grow the rows, set the
    tokenizer's chat template (so checkpoints carry it). Returns the tokens that were added."""
    real_vocab = tokenizer.vocab_size
    added = tokenizer.add_special_tokens(list(style.special_tokens)) if style.special_tokens else []
    fresh = [tokenizer.special_tokens[t] for t in added]
    if tokenizer.vocab_size > model.config.vocab_size:
        resize_vocab(model, tokenizer.vocab_size, [i for i in fresh if i < model.config.vocab_size], real_vocab)
    elif added:  # the model already has spare rows (a padded vocabulary): they were never trained as tokens
        resize_vocab(model, model.config.vocab_size, fresh, real_vocab)
    tokenizer.chat_template = style.template
    return added


def set_dropout(model: GPT, p: float) -> None:
    """Set every dropout rate in ``model`` (modules and the attention's functional dropout) to ``p``."""
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = p


def neftune_hook(alpha: float):
    """NEFTune (Jain et al. 2023): add uniform noise of scale alpha/sqrt(L·d) to the input embeddings."""
    def hook(x: torch.Tensor) -> torch.Tensor:
        scale = alpha / math.sqrt(x.shape[1] * x.shape[2])
        return x + torch.empty_like(x).uniform_(-1.0, 1.0) * scale
    return hook


# ---- helpers -----------------------------------------------------------------------------------------------


def _pick_device(name: str) -> torch.device:
    try:
        from gptforge.train.distributed import pick_device

        return pick_device(name)
    except ImportError:  # pragma: no cover
        return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                            ("cpu" if name == "auto" else name))


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return nullcontext(), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _save_model_dir(ckpt_root: Path, step: int, model: GPT, tokenizer, extra: dict) -> str:
    """Save to ``ckpt/.tmp-step_N`` and rename into place; returns the step directory name."""
    from gptforge.checkpoint import save_model

    name = f"step_{step:07d}"
    tmp, final = ckpt_root / f".tmp-{name}", ckpt_root / name
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(tmp, model, tokenizer, extra={**extra, "step": step})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return name


def _write_pointer(ckpt_root: Path, pointer: str, target: str) -> None:
    tmp = ckpt_root / f".{pointer}.tmp"
    tmp.write_text(target + "\n", encoding="utf-8")
    os.replace(tmp, ckpt_root / pointer)


@torch.no_grad()
def evaluate_loss(model: GPT, examples, batch_size: int, pad_id: int, device, autocast, dist_info=None) -> float:
    """Mean cross-entropy per supervised token over ``examples`` (token-weighted, not batch-weighted).

    Under ``torchrun`` (``dist_info``) each rank scores every world_size-th example and the sums are reduced."""
    from gptforge.data.chat import pad_batch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # similar lengths: less padding
    if dist_info is not None and dist_info.enabled:
        order = order[dist_info.rank::dist_info.world_size]
    for s in range(0, len(order), batch_size):
        batch = pad_batch([examples[i] for i in order[s:s + batch_size]], pad_id).to(device)
        with autocast:
            logits, _ = model(batch.input_ids)
        total += F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += batch.num_supervised
    model.train(was_training)
    if dist_info is not None and dist_info.enabled:
        from gptforge.train.distributed import all_reduce_sum

        sums = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=dist_info.device),
                              dist_info)
        total, count = sums[0].item(), int(sums[1].item())
    return total / max(count, 1)


def plot_losses(path: Path, train_points: list[tuple[int, float]], val_points: list[tuple[int, float]],
                title: str) -> None:
    """Training loss per step and validation loss per evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        ax.plot(*zip(*train_points), label="train", alpha=0.8)
    if val_points:
        ax.plot(*zip(*val_points), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# ---- data --------------------------------------------------------------------------------------------------


def load_conversations(cfg: SFTDataConfig, log=print):
    """All sources → conversations (each source's format detected separately); returns (convs, skipped)."""
    from gptforge.data.chat import load_records, to_conversations

    conversations, skipped = [], 0
    for source in cfg.sources:
        records = load_records(source, cfg.hub_split)
        convs, bad = to_conversations(records, cfg.format, cfg.skip_bad, source=str(source))
        if bad:
            log(f"{source}: skipped {bad} malformed record(s) of {len(records)}")
        conversations += convs
        skipped += bad
    return conversations, skipped


# ---- the run -----------------------------------------------------------------------------------------------


def run_sft(config: SFTConfig, log=print, progress: bool = True) -> SFTResult:
    """Fine-tune ``config.checkpoint`` on ``config.data`` and write the run directory; see the module docstring.

    Under ``torchrun`` every process takes every world_size-th batch (DDP averages the gradients, the loss stays
    a token-weighted mean over the global batch); only rank 0 writes files, prints and generates.
    """
    from tqdm.auto import tqdm

    from gptforge.checkpoint import load_model
    from gptforge.config import save_config
    from gptforge.data.chat import encode_dataset, epoch_batches, prompt_style, split_indices
    from gptforge.tokenizer import load_tokenizer
    from gptforge.train.distributed import all_reduce_sum, barrier, no_sync, setup, teardown, wrap_model
    from gptforge.train.optim import LRSchedule, configure_optimizer, set_lr

    config.validate()
    dc, tc = config.data, config.train
    torch.manual_seed(config.seed)
    info = setup(config.device)
    device = info.device
    if not info.is_main:
        log, progress = (lambda *a, **k: None), False
    conversations, skipped = load_conversations(dc, log)  # data errors surface before any heavy work

    # model, tokenizer, prompt style
    model, tokenizer, meta = load_model(config.checkpoint, device="cpu")
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer is None:
        raise GptforgeError(f"{config.checkpoint} carries no tokenizer; pass --tokenizer gpt2 or a tokenizer dir")
    style = prompt_style(dc.style)
    added = prepare_chat_model(model, tokenizer, style)
    if added:
        log(f"added special tokens {added}; vocabulary is now {model.config.vocab_size:,}")
    if tc.dropout is not None:
        set_dropout(model, tc.dropout)
    max_len = dc.max_len or model.config.block_size
    if max_len > model.config.block_size:
        raise GptforgeError(f"data.max_len {max_len} exceeds the model's context {model.config.block_size}")

    # data: deterministic split → tokens
    if dc.limit:
        import random

        random.Random(dc.split_seed).shuffle(conversations)
        conversations = conversations[: dc.limit]
    train_idx, val_idx, test_idx = split_indices(len(conversations), dc.split, dc.split_seed)
    train_convs = [conversations[i] for i in train_idx]
    val_convs = [conversations[i] for i in val_idx]
    test_convs = [conversations[i] for i in test_idx]
    if not train_convs:
        raise GptforgeError(f"the training split is empty ({len(conversations)} conversations, split {dc.split})")
    train_set, train_stats = encode_dataset(train_convs, tokenizer, style, max_len, dc.train_on, dc.overlength,
                                            progress, desc="tokenize train")
    val_set, val_stats = [], None
    if val_convs:
        val_set, val_stats = encode_dataset(val_convs, tokenizer, style, max_len, dc.train_on, dc.overlength,
                                            progress, desc="tokenize val")
    data_info = {"conversations": len(conversations), "skipped_bad": skipped, "train": train_stats.__dict__,
                 "val": val_stats.__dict__ if val_stats else None, "test": len(test_convs)}
    log(f"data: train {train_stats.summary()}" + (f"; val {val_stats.summary()}" if val_stats else "")
        + f"; test {len(test_convs)} conversations")

    run_dir = Path(config.out_dir) / config.name
    ckpt_root = run_dir / "ckpt"
    if info.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    # optimisation
    model.to(device).train()
    ddp = wrap_model(model, info)  # the bare model when running as one process
    autocast, scaler = _autocast(device, tc.precision)
    optimizer = configure_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))
    pad_id = tokenizer.pad_id if tokenizer.pad_id < model.config.vocab_size else tokenizer.eot_id
    window = max_len
    world = info.world_size
    batches_per_epoch = len(epoch_batches(train_set, dc.batching, tc.batch_size, pad_id, window, config.seed)) // world
    if batches_per_epoch < 1:
        raise GptforgeError(f"{len(train_set)} training examples make fewer batches than the {world} processes")
    steps_per_epoch = max(1, batches_per_epoch // tc.grad_accum)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    schedule = LRSchedule(kind=tc.schedule, max_lr=tc.lr, min_lr=tc.lr * tc.min_lr_ratio,
                          warmup_steps=round(tc.warmup_ratio * total_steps), total_steps=total_steps)
    hook = neftune_hook(tc.neftune_alpha) if tc.neftune_alpha > 0 else None
    extra = {"sft": {"style": style.name, "end_of_turn": style.end_of_turn, "base": meta.get("path"),
                     "train_on": dc.train_on}}

    metrics_path = run_dir / "metrics.jsonl"
    if info.is_main:
        metrics_path.write_text("", encoding="utf-8")
    train_points: list[tuple[int, float]] = []
    val_points: list[tuple[int, float]] = []

    def record(entry: dict) -> None:
        if not info.is_main:
            return
        with metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    initial_val = evaluate_loss(model, val_set, tc.eval_batch_size, pad_id, device, autocast, info) if val_set else None
    if initial_val is not None:
        log(f"validation loss before fine-tuning: {initial_val:.4f}")
        val_points.append((0, initial_val))
        record({"step": 0, "epoch": 0, "val_loss": initial_val})
    best_val, best_state, best_name = math.inf, None, None
    bad_evals, stopped_early, step = 0, False, 0
    val_losses: list[float] = []
    t0 = time.time()

    def evaluate_and_keep(epoch: float) -> bool:
        """Validation + best-checkpoint bookkeeping; returns True when early stopping triggers."""
        nonlocal best_val, best_state, best_name, bad_evals
        if not val_set:
            return False
        val = evaluate_loss(model, val_set, tc.eval_batch_size, pad_id, device, autocast, info)
        val_losses.append(val)
        val_points.append((step, val))
        improved = val < best_val
        record({"step": step, "epoch": round(epoch, 3), "val_loss": val, "best": improved})
        if improved:
            best_val, bad_evals = val, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            old, best_name = best_name, f"step_{step:07d}"
            if info.is_main:
                _save_model_dir(ckpt_root, step, model, tokenizer, {**extra, "val_loss": val})
                _write_pointer(ckpt_root, "best", best_name)
                _write_pointer(ckpt_root, "latest", best_name)
                if old and old != best_name:
                    shutil.rmtree(ckpt_root / old, ignore_errors=True)
        else:
            bad_evals += 1
        log(f"epoch {epoch:.2f} step {step}: val loss {val:.4f} (best {best_val:.4f})"
            + ("" if improved else f", {bad_evals} evaluation(s) without improvement"))
        return tc.patience is not None and bad_evals >= tc.patience

    bar = tqdm(total=total_steps, desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    running, tokens_seen = None, 0
    for epoch in range(tc.epochs):
        if step >= total_steps or stopped_early:
            break
        batches = epoch_batches(train_set, dc.batching, tc.batch_size, pad_id, window, config.seed + epoch)
        per_rank = len(batches) // world
        batches = batches[info.rank: per_rank * world: world]  # this process's share, equal on every rank
        usable = len(batches) - len(batches) % tc.grad_accum if len(batches) >= tc.grad_accum else len(batches)
        for start in range(0, usable, tc.grad_accum):
            group = [b.to(device) for b in batches[start:start + tc.grad_accum]]
            n_sup = int(all_reduce_sum(torch.tensor([sum(b.num_supervised for b in group)], device=device),
                                       info).item())  # supervised tokens in the global batch
            if n_sup == 0:
                raise GptforgeError(f"a training batch at step {step} has no supervised tokens; this would train on "
                                    "a silent zero loss (check the data's assistant turns and max_len)")
            lr = schedule.lr_at(step)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, b in enumerate(group):
                with no_sync(ddp, i == len(group) - 1):
                    with autocast:
                        _, loss = ddp(b.input_ids, targets=b.targets, attention_mask=b.attention_mask,
                                      position_ids=b.position_ids, inputs_embeds_hook=hook)
                    weight = b.num_supervised / n_sup  # token-weighted mean over the global batch
                    scaled = loss * (weight * world)  # DDP averages gradients over the processes
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach().double() * weight
                tokens_seen += int(b.input_ids.numel()) * world
            loss_sum = all_reduce_sum(loss_sum, info).item()
            if scaler:
                scaler.unscale_(optimizer)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running = loss_sum if running is None else 0.9 * running + 0.1 * loss_sum
            train_points.append((step, loss_sum))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running:.3f}", lr=f"{lr:.2e}")
            if step % tc.log_every == 0 or step == 1:
                record({"step": step, "epoch": round(step / steps_per_epoch, 3), "train_loss": loss_sum,
                        "lr": lr, "tokens": tokens_seen, "elapsed_s": round(time.time() - t0, 2)})
            if tc.eval_every and step % tc.eval_every == 0 and evaluate_and_keep(step / steps_per_epoch):
                stopped_early = True
                break
            if step >= total_steps:
                break
        if not tc.eval_every and not stopped_early and evaluate_and_keep(step / steps_per_epoch):
            stopped_early = True
    bar.close()
    if tc.eval_every and not stopped_early and val_set and val_points[-1][0] != step:
        evaluate_and_keep(step / steps_per_epoch)
    if stopped_early:
        log(f"early stopping: {tc.patience} evaluation(s) without improvement")

    # final model: the best weights when validated, else the last ones
    if best_state is not None:
        model.load_state_dict(best_state)
        final_name = best_name
        log(f"restored the best weights ({best_name}, val loss {best_val:.4f})")
    else:
        final_name = f"step_{step:07d}"
        if info.is_main:
            _save_model_dir(ckpt_root, step, model, tokenizer, extra)
    if info.is_main:
        _write_pointer(ckpt_root, "latest", final_name)
        plot_losses(run_dir / "loss.png", train_points, val_points, f"SFT {config.name}")

    result = SFTResult(run_dir=run_dir, checkpoint=ckpt_root / final_name, steps=step,
                       epochs_completed=round(step / steps_per_epoch, 3), initial_val_loss=initial_val,
                       best_val_loss=best_val if best_state is not None else None, val_losses=val_losses,
                       stopped_early=stopped_early, data=data_info)

    if config.generate.enabled and test_convs and info.is_main:
        result.test_responses, result.stop_rate = write_test_responses(
            model, tokenizer, style, test_convs, run_dir / "test_responses.json", config, device, progress)
        log(f"test responses: {result.test_responses} ({result.stop_rate:.0%} ended with {style.end_of_turn})")

    if info.is_main:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        _write_json(run_dir / "summary.json", summary)
    barrier(info)
    if info.enabled:
        teardown()
    log(f"SFT done: {step} steps in {time.time() - t0:.0f}s, "
        + (f"val loss {initial_val:.4f} → {best_val:.4f}, " if initial_val is not None and best_state else "")
        + f"model in {result.checkpoint}, metrics in {metrics_path}, chart {run_dir / 'loss.png'}")
    return result


def write_test_responses(model: GPT, tokenizer, style, conversations, path: Path, config: SFTConfig, device,
                         progress: bool = True) -> tuple[Path, float]:
    """Greedy responses for ``conversations`` → JSON records (instruction, input, reference, response, model)."""
    from gptforge.data.chat import encode_prompt, prompt_messages
    from gptforge.engine import Engine, SamplingParams

    gc = config.generate
    convs = conversations[: gc.limit] if gc.limit else conversations
    engine = Engine(model, tokenizer, device=device, context_policy="slide")
    params = SamplingParams(temperature=0.0, max_new_tokens=gc.max_new_tokens)
    records, stops = [], 0
    from tqdm.auto import tqdm

    for s in tqdm(range(0, len(convs), gc.batch_size), desc="test responses", unit="batch", disable=not progress):
        chunk = convs[s:s + gc.batch_size]
        prompts = [encode_prompt(prompt_messages(c), tokenizer, style) for c in chunk]
        for conv, completion in zip(chunk, engine.generate(prompts, params)):
            stopped = completion.finish_reason == "stop"
            stops += stopped
            records.append({"instruction": conv.instruction, "input": conv.input, "reference": conv.reference,
                            "response": completion.text.strip(), "model": config.name,
                            "finish_reason": completion.finish_reason})
    _write_json(path, records)
    return path, stops / max(len(records), 1)
