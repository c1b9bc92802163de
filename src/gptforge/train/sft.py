"""Instruction fine-tuning (SFT): a base checkpoint + chat data → an instruct model in ``runs/<name>/``.

:func:`run_sft` loads the base model, prepares the vocabulary for the prompt style (the chat style adds
``<|im_start|>``/``<|im_end|>`` and grows the embedding and head rows, new rows set to the mean of the old ones),
splits the data deterministically (default 85/5/10), trains through the shared core
(:func:`gptforge.train.core.optimizer_step`: loss averaged over every supervised token of the global batch),
with optional NEFTune noise (a forward hook on the token embedding, only while training), evaluates on the
validation split (each epoch, or every ``train.eval_every`` steps) and checkpoints there (resumable with
``checkpoint.resume``), stops early after ``train.patience`` evaluations without improvement, ends with the best
weights, and writes greedy responses for the test split to ``test_responses.json`` for judging.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``loss.png``, ``ckpt/step_NNNNNNN/`` (model + tokenizer with its
chat template, optimizer and trainer state), ``ckpt/best`` and ``ckpt/latest`` (the run's final model),
``test_responses.json``, ``summary.json``. With LoRA (``lora.r``, :mod:`gptforge.train.lora`) the checkpoints hold
the merged weights (+ ``lora/`` for resume) and ``adapter/`` is the adapter alone, in peft's format.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from gptforge.data.batching import epoch_batches, pad_batch, split_indices
from gptforge.data.chat import (
    encode_dataset,
    encode_prompt,
    load_records,
    prompt_messages,
    prompt_style,
    to_conversations,
)
from gptforge.engine import Engine, SamplingParams
from gptforge.errors import GptforgeError
from gptforge.eval.loss import mean_lm_loss
from gptforge.io import write_json
from gptforge.model import GPT
from gptforge.train import checkpoint as C
from gptforge.train import distributed as D
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
    set_dropout,
    setup_runtime,
    start_checkpointing,
    teardown_runtime,
)
from gptforge.train.lora import LoraSection
from gptforge.train.nonfinite import NonFiniteGuard

__all__ = [
    "SFTConfig",
    "SFTDataConfig",
    "SFTGenerateConfig",
    "SFTResult",
    "SFTTrainConfig",
    "add_neftune",
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
class SFTTrainConfig(TrainCommon):
    """SFT's ``train`` keys; precision, seed, device and grad_clip are the shared ones."""

    epochs: int = 2
    max_steps: int | None = None  # train exactly this many optimizer steps (overrides epochs, as in HF Trainer)
    batch_size: int = 8
    grad_accum: int = 1
    neftune_alpha: float = 0.0  # NEFTune noise scale (5 in seed 000); 0 = off
    patience: int | None = None  # early stopping: evaluations without improvement before stopping
    eval_every: int | None = None  # optimizer steps between evaluations; default: once per epoch
    eval_batch_size: int = 16
    dropout: float | None = None  # override the checkpoint's dropout


@dataclass
class SFTGenerateConfig:
    enabled: bool = True  # greedy responses for the test split at the end
    max_new_tokens: int = 256
    limit: int | None = None  # only the first N test conversations
    batch_size: int = 16


@dataclass
class SFTConfig(FineTuneRun):
    STAGE: ClassVar[str] = "sft"
    name: str = "sft"
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_ratio=0.03))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(keep_last=1))
    log: LogConfig = field(default_factory=LogConfig)
    generate: SFTGenerateConfig = field(default_factory=SFTGenerateConfig)
    lora: LoraSection = field(default_factory=LoraSection)  # r > 0: train LoRA adapters (gptforge.train.lora)

    def validate(self) -> SFTConfig:
        self.check_run("a base checkpoint: --checkpoint DIR (step dir, run dir or HF directory)",
                       bool(self.data.sources), "data: --data FILE_OR_HUB_NAME (repeat for several sources)",
                       ("epochs", "batch_size", "grad_accum", "eval_batch_size"),
                       ("max_steps", "eval_every", "patience"), ("limit",))
        if self.train.neftune_alpha < 0:
            raise GptforgeError(f"train.neftune_alpha must be >= 0, got {self.train.neftune_alpha}")
        self.check_sections()
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
    interrupted: bool = False  # stopped by SIGTERM/SIGINT after a checkpoint (continue with --resume)


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


def neftune_hook(alpha: float):
    """NEFTune (Jain et al. 2023): add uniform noise of scale alpha/sqrt(L·d) to the input embeddings."""
    def hook(x: torch.Tensor) -> torch.Tensor:
        scale = alpha / math.sqrt(x.shape[1] * x.shape[2])
        return x + torch.empty_like(x).uniform_(-1.0, 1.0) * scale
    return hook


def add_neftune(model: GPT, alpha: float):
    """Register NEFTune on the token embedding; active only in training mode. Returns the hook handle."""
    noise = neftune_hook(alpha)

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return noise(output) if module.training else output

    return model.transformer.wte.register_forward_hook(hook)


# ---- data --------------------------------------------------------------------------------------------------


def load_conversations(cfg: SFTDataConfig, log=print):
    """All sources → conversations (each source's format detected separately); returns (convs, skipped)."""
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
    """Fine-tune ``config.base`` on ``config.data`` and write the run directory; see the module docstring.

    Under ``torchrun`` every process takes every world_size-th batch (DDP averages the gradients, the loss stays
    a token-weighted mean over the global batch); only rank 0 writes files, prints and generates.
    """
    config.validate()
    rt = setup_runtime(config.train, log)
    try:
        with StopFlag() as stop:
            return _run(config, rt, stop, progress and config.log.progress and rt.is_main)
    finally:
        teardown_runtime()


def evaluate_loss(model: GPT, examples, batch_size: int, pad_id: int, device, autocast, dist_info=None) -> float:
    """Mean cross-entropy per supervised token over ``examples`` (token-weighted, not batch-weighted).

    Under ``torchrun`` (``dist_info``) each rank scores every world_size-th example and the sums are reduced."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # similar lengths: less padding
    if dist_info is not None and dist_info.enabled:
        order = order[dist_info.rank::dist_info.world_size]
    batches = []
    for s in range(0, len(order), batch_size):
        b = pad_batch([examples[i] for i in order[s:s + batch_size]], pad_id)
        batches.append((b.input_ids, b.targets, {}))
    return mean_lm_loss(model, batches, autocast, dist_info)


def _sft_loss(model, batch) -> torch.Tensor:
    _, loss = model(batch.input_ids, targets=batch.targets, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids)
    return loss


def _run(config: SFTConfig, rt: Runtime, stop: StopFlag, progress: bool) -> SFTResult:
    dc, tc = config.data, config.train
    log, device = rt.log, rt.device
    with D.per_node_first(rt.dist):  # hub data and a Hub base model: downloaded once per node, into its cache
        conversations, skipped = load_conversations(dc, log)  # data errors surface before any heavy work
        # model, tokenizer, prompt style
        model, tokenizer, meta = load_base_model(config.base, config.tokenizer, tc.dropout)
    style = prompt_style(dc.style)
    added = prepare_chat_model(model, tokenizer, style)
    if added:
        log(f"added special tokens {added}; vocabulary is now {model.config.vocab_size:,}")
    max_len = dc.max_len or model.config.block_size
    if max_len > model.config.block_size:
        raise GptforgeError(f"data.max_len {max_len} exceeds the model's context {model.config.block_size}")
    if config.lora.r:  # the added chat tokens' rows train too: a frozen copy of the mean would leave them equal
        model = L.apply_lora(model, config.lora, new_tokens=[tokenizer.special_tokens[t] for t in added],
                             frozen_dtype=rt.precision.dtype)
        log(L.describe(model) + "; " + L.memory_line(model, tc.batch_size, max_len, rt.precision.name))

    # data: deterministic split → tokens
    if dc.limit:
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
    resume_dir = start_checkpointing(run_dir, config.checkpoint, config.overwrite, rt)

    # optimisation
    model.to(device).train()
    ddp = D.wrap_model(model, rt.dist)  # the bare model when running as one process
    optimizer = build_optimizer(model, config.optim)
    scaler = rt.precision.grad_scaler()
    pad_id = tokenizer.pad_id if tokenizer.pad_id < model.config.vocab_size else tokenizer.eot_id
    world = rt.world_size
    seed = tc.seed

    def rank_batches(epoch: int) -> list:
        batches = epoch_batches(train_set, dc.batching, tc.batch_size, pad_id, max_len, seed + epoch)
        per_rank = len(batches) // world
        return batches[rt.dist.rank: per_rank * world: world]  # this process's share, equal on every rank

    first = rank_batches(0)
    if not first:
        raise GptforgeError(f"{len(train_set)} training examples make fewer batches than the {world} processes")
    steps_per_epoch = max(1, len(first) // tc.grad_accum)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch  # max_steps overrides epochs (as in HF Trainer)
    epoch_limit = math.ceil(total_steps / steps_per_epoch)
    log(f"training for {total_steps} steps = {total_steps / steps_per_epoch:.2f} epoch(s) of {steps_per_epoch} "
        + ("(train.max_steps; it overrides train.epochs)" if tc.max_steps else f"(train.epochs={tc.epochs})"))
    schedule = config.optim.schedule_for(total_steps)
    if tc.neftune_alpha > 0:
        add_neftune(model, tc.neftune_alpha)
    extra = {"sft": {"style": style.name, "end_of_turn": style.end_of_turn, "base": meta.get("path"),
                     "train_on": dc.train_on}}

    state = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "initial_val_loss": None, "val_losses": [],
             "stopped_early": False, "nonfinite_steps": 0, "skipped_steps": 0, "elapsed": 0.0}
    keeper = BestKeeper(mode="min", patience=tc.patience)

    def load_weights(d: Path) -> None:  # a checkpoint's weights (with LoRA: its adapters' exact state too)
        L.load_weights(model, d, C.load_weights(d, model.config.tie_embeddings))

    if resume_dir is not None:
        trainer_state = restore_checkpoint(resume_dir, rt, load_weights=load_weights,
                                           load_optimizer=optimizer.load_state_dict, scaler=scaler)
        state.update({k: trainer_state[k] for k in state if k in trainer_state})
        keeper.load_state_dict(trainer_state["keeper"])
        log(f"resumed from {resume_dir} at step {state['step']} (epoch {state['epoch'] + 1})")
        if state["step"] >= total_steps or state["epoch"] >= epoch_limit or state["stopped_early"]:
            log(finished_message(state["step"], total_steps, "--max-steps or --epochs"))
    run = RunDir(run_dir, config, rt, config.log, resume_step=state["step"] if resume_dir else None,
                 grad_clip=tc.grad_clip)

    def validation_loss() -> float:
        return evaluate_loss(model, val_set, tc.eval_batch_size, pad_id, device, rt.precision.autocast(), rt.dist)

    def save(step: int, val: float | None = None, is_best: bool = False) -> Path | None:
        run.log({"step": step, **guard.period()})  # exploding-gradient counts of the checkpoint period
        trainer_state = {**state, "keeper": keeper.state_dict(), "config": asdict(config)}
        return save_training_checkpoint(
            rt, run, step, write_model=L.gpt_writer(model, tokenizer, {**extra, "step": step, "val_loss": val}),
            optimizer_state={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
            trainer_state=trainer_state, keep_last=config.checkpoint.keep_last, is_best=is_best)

    def evaluate_and_keep(step: int, epoch: float) -> bool:
        """Validation + checkpoint (marked best when it improved); returns True when early stopping triggers."""
        val = validation_loss()
        state["val_losses"].append(val)
        improved = keeper.update(val, step)
        run.log({"step": step, "epoch": round(epoch, 3), "val_loss": val, "best": improved})
        save(step, val, improved)
        log(f"epoch {epoch:.2f} step {step}: val loss {val:.4f} (best {keeper.best:.4f})"
            + ("" if improved else f", {keeper.bad_evals} evaluation(s) without improvement"))
        return keeper.should_stop

    if val_set and resume_dir is None:
        state["initial_val_loss"] = validation_loss()
        log(f"validation loss before fine-tuning: {state['initial_val_loss']:.4f}")
        run.log({"step": 0, "epoch": 0, "val_loss": state["initial_val_loss"]})

    bar = tqdm(total=total_steps, initial=state["step"], desc="sft", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0, interrupted = time.time(), False
    guard = NonFiniteGuard.for_train(tc, log, fp16_scaler=scaler is not None)
    batches, batches_epoch = None, None
    while state["step"] < total_steps and state["epoch"] < epoch_limit and not state["stopped_early"]:
        if batches_epoch != state["epoch"]:
            batches, batches_epoch = rank_batches(state["epoch"]), state["epoch"]
        epoch_steps = max(1, len(batches) // tc.grad_accum)
        group = [b.to(device) for b in batches[state["position"] * tc.grad_accum:
                                               (state["position"] + 1) * tc.grad_accum]]
        stats = optimizer_step(ddp, optimizer, group, schedule.lr_at(state["step"]), loss_fn=_sft_loss,
                               count_fn=lambda b: b.num_supervised, rt=rt, scaler=scaler, grad_clip=tc.grad_clip)
        state["step"] += 1
        state["position"] += 1
        state["tokens"] += sum(int(b.input_ids.numel()) for b in group) * world
        state["nonfinite_steps"] += stats.nonfinite
        state["skipped_steps"] += stats.skipped
        step = state["step"]
        epoch = state["epoch"] + state["position"] / epoch_steps
        end_of_epoch = state["position"] >= epoch_steps
        if end_of_epoch:
            state["epoch"], state["position"] = state["epoch"] + 1, 0
        run.log({"step": step, "epoch": round(epoch, 3), **stats.fields(), "tokens": state["tokens"],
                 "elapsed_s": round(time.time() - t0, 2)})
        bar.update(1)
        bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{stats.loss:.3f}", lr=f"{stats.lr:.2e}")
        if guard.update(step, stats):  # diverged: keep the last good state, then stop loudly
            bar.close()
            path = save(step)
            run.close()
            raise guard.error(path)
        last = step >= total_steps or state["epoch"] >= epoch_limit
        stop_now = stop.any_rank(rt)
        if val_set and ((tc.eval_every and step % tc.eval_every == 0) or (not tc.eval_every and end_of_epoch)
                        or last):
            state["stopped_early"] = evaluate_and_keep(step, epoch)
        elif (config.checkpoint.interval and step % config.checkpoint.interval == 0) or last or stop_now:
            save(step)
        if stop_now:  # this step was checkpointed just above
            interrupted = True
            log(f"\nstopped by {stop.name} after step {step}; continue with --resume")
            break
    bar.close()
    if state["stopped_early"]:
        log(f"early stopping: {tc.patience} evaluation(s) without improvement")

    # final model: the best weights when validated, else the last ones
    final = finish_with_best(rt, run, keeper, load_weights, interrupted, model=model)
    if L.has_lora(model) and not interrupted:  # adapter/ for peft, and the merged model from here on
        model = L.finish_lora(model, run_dir, config.base, tokenizer, rt.is_main, log)
    run.plot()

    result = SFTResult(run_dir=run_dir, checkpoint=final, steps=state["step"],
                       epochs_completed=round(state["step"] / steps_per_epoch, 3),
                       initial_val_loss=state["initial_val_loss"],
                       best_val_loss=keeper.best, val_losses=list(state["val_losses"]),
                       stopped_early=state["stopped_early"], data=data_info, interrupted=interrupted)

    if config.generate.enabled and test_convs and rt.is_main and not interrupted:
        result.test_responses, result.stop_rate = write_test_responses(
            model, tokenizer, style, test_convs, run_dir / "test_responses.json", config, device, progress)
        log(f"test responses: {result.test_responses} ({result.stop_rate:.0%} ended with {style.end_of_turn})")

    if rt.is_main:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        summary.update(precision=rt.precision.name, precision_reason=rt.precision.reason,
                       nonfinite_steps=state["nonfinite_steps"], skipped_steps=state["skipped_steps"])
        write_json(run_dir / "summary.json", summary)
    run.close()
    D.barrier(rt.dist)
    initial, best = state["initial_val_loss"], keeper.best
    log(f"SFT done: {state['step']} steps in {time.time() - t0:.0f}s ({rt.precision.name}), "
        + (f"val loss {initial:.4f} → {best:.4f}, " if initial is not None and best is not None else "")
        + f"model in {result.checkpoint}, metrics in {run_dir / 'metrics.jsonl'}, chart {run_dir / 'loss.png'}")
    return result


def write_test_responses(model: GPT, tokenizer, style, conversations, path: Path, config: SFTConfig, device,
                         progress: bool = True) -> tuple[Path, float]:
    """Greedy responses for ``conversations`` → JSON records (instruction, input, reference, response, model)."""
    gc = config.generate
    convs = conversations[: gc.limit] if gc.limit else conversations
    engine = Engine(model, tokenizer, device=device, context_policy="slide")
    params = SamplingParams(temperature=0.0, max_new_tokens=gc.max_new_tokens)
    records, stops = [], 0
    for s in tqdm(range(0, len(convs), gc.batch_size), desc="test responses", unit="batch", disable=not progress):
        chunk = convs[s:s + gc.batch_size]
        prompts = [encode_prompt(prompt_messages(c), tokenizer, style, c.tools) for c in chunk]
        for conv, completion in zip(chunk, engine.generate(prompts, params)):
            stopped = completion.finish_reason == "stop"
            stops += stopped
            records.append({"instruction": conv.instruction, "input": conv.input, "reference": conv.reference,
                            "response": completion.text.strip(), "model": config.name,
                            "finish_reason": completion.finish_reason})
    write_json(path, records)
    return path, stops / max(len(records), 1)
