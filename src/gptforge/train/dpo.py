"""Preference tuning (DPO, IPO, SimPO): an SFT checkpoint + preference pairs → a better instruct model in ``runs/<name>/``.

:func:`run_dpo` reads pairs (:mod:`gptforge.data.preferences`: the book's instruction/chosen/rejected records, TRL's
standard and conversational layouts, whole conversations with a shared beginning, Anthropic HH), renders them with
the checkpoint's own chat template through the one chat encoding path, splits them deterministically (default
85/5/10) and trains through the shared core (:func:`gptforge.train.core.optimizer_step` with a loss over a pair
batch, ``count_fn`` = pairs: accumulation and processes weigh pairs equally). The loss (:mod:`gptforge.train.dpo_loss`)
compares the policy's summed answer log-probs with a frozen reference — a copy of the starting model, or, with
``dpo.precompute_ref``, its log-probs computed once before training and kept in ``ref_logps.json`` (no second model
in memory; a resumed run reads them back). SimPO needs no reference. Dropout is off by default (``train.dropout``
0.0, as TRL does), so the policy and the reference agree exactly at step 0.

Validation (each epoch or every ``train.eval_every`` steps) logs the loss and reward metrics, checkpoints, keeps the
best (``train.best_by``: the validation loss, or reward accuracy with the loss breaking ties), stops early after
``train.patience`` evaluations without improvement and ends on the best weights; ``checkpoint.resume`` continues a
killed run to the same weights. The test split is scored before and after training (``summary.json``).

Metrics (``metrics.jsonl``, the shared schema; TRL's names with ``/`` flattened to ``_``): per step ``loss``, ``lr``,
``grad_norm``, …, ``rewards_chosen``, ``rewards_rejected``, ``rewards_margins``, ``rewards_accuracies``,
``logps_chosen``, ``logps_rejected`` (summed answer log-probs), ``logps_accuracy`` (the policy alone prefers the
chosen answer), ``pairs``; the same with a ``val_`` prefix at evaluations. The reward accuracies are also written
as ``train_accuracy``/``val_accuracy`` so the shared chart draws them.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``loss.png``, ``ckpt/step_NNNNNNN/``, ``ckpt/best``,
``ckpt/latest``, ``ref_logps.json`` (with ``precompute_ref``), ``summary.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from tqdm.auto import tqdm

from gptforge.data.batching import split_indices
from gptforge.data.chat import prompt_style, style_for
from gptforge.data.preferences import EncodedPair, encode_pairs, load_pairs
from gptforge.errors import GptforgeError
from gptforge.io import read_json, write_json
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
    setup_runtime,
    start_checkpointing,
    teardown_runtime,
)
from gptforge.train.dpo_loss import (
    DPOLossConfig,
    compute_reference_logps,
    evaluate_pairs,
    pair_batch,
    pair_forward,
    summarize,
)
from gptforge.train.lora import LoraSection
from gptforge.train.nonfinite import NonFiniteGuard
from gptforge.train.sft import prepare_chat_model

__all__ = ["DPOConfig", "DPODataConfig", "DPOLossConfig", "DPOResult", "DPOTrainConfig", "run_dpo"]

REF_LOGPS = "ref_logps.json"


@dataclass
class DPODataConfig:
    sources: list[str] = field(default_factory=list)  # local .json/.jsonl/.parquet files or hub dataset names
    hub_split: str = "train"
    skip_bad: bool = False  # skip (and count) malformed records instead of failing on the first
    limit: int | None = None  # use only this many pairs (after a seeded shuffle)
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])  # train / val / test
    split_seed: int = 0
    style: Literal["chat", "alpaca"] = "chat"  # only for a checkpoint without a chat template (not an SFT model)
    max_len: int | None = None  # tokens per side; default: the model's context
    overlength: Literal["drop", "truncate"] = "drop"


@dataclass
class DPOTrainConfig(TrainCommon):
    """DPO's ``train`` keys; precision, seed, device and grad_clip are the shared ones."""

    epochs: int = 1
    max_steps: int | None = None  # train exactly this many optimizer steps (overrides epochs)
    batch_size: int = 8  # pairs per micro-batch (2 × batch_size sequences)
    grad_accum: int = 1
    patience: int | None = None  # early stopping: evaluations without improvement before stopping
    eval_every: int | None = None  # optimizer steps between evaluations; default: once per epoch
    eval_batch_size: int = 16  # pairs
    dropout: float | None = 0.0  # off, as in TRL (policy and reference then agree at the start); null: keep
    best_by: Literal["loss", "reward_accuracy"] = "loss"  # validation loss, or reward accuracy (ties: loss)


@dataclass
class DPOConfig(FineTuneRun):
    STAGE: ClassVar[str] = "dpo"
    name: str = "dpo"  # base: the model to tune, an SFT checkpoint
    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_ratio=0.1, weight_decay=0.0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(keep_last=1))
    log: LogConfig = field(default_factory=LogConfig)
    lora: LoraSection = field(default_factory=LoraSection)  # r > 0: train LoRA adapters (gptforge.train.lora)

    def validate(self) -> DPOConfig:
        self.check_run("a starting model: --checkpoint DIR (an SFT run or checkpoint)", bool(self.data.sources),
                       "preference data: --data FILE_OR_HUB_NAME (repeat for several sources)",
                       ("epochs", "batch_size", "grad_accum", "eval_batch_size"),
                       ("max_steps", "eval_every", "patience"), ("limit", "max_len"))
        if self.train.best_by not in ("loss", "reward_accuracy"):
            raise GptforgeError(f"train.best_by must be loss or reward_accuracy, got {self.train.best_by!r}")
        self.dpo.validate()
        self.check_sections()
        return self


@dataclass
class DPOResult:
    run_dir: Path
    checkpoint: Path  # the final (best when validated) model directory
    steps: int
    epochs_completed: float
    initial_val: dict | None  # validation metrics of the starting model
    val_history: list[dict]  # validation metrics at each evaluation
    best_val: dict | None  # the evaluation the final weights come from
    stopped_early: bool
    data: dict  # split sizes and encoding statistics
    initial_test: dict | None = None  # test-split metrics of the starting model
    test: dict | None = None  # test-split metrics of the final model
    interrupted: bool = False  # stopped by SIGTERM/SIGINT after a checkpoint (continue with --resume)


def run_dpo(config: DPOConfig, log=print, progress: bool = True) -> DPOResult:
    """Tune ``config.base`` on the preference pairs of ``config.data``; see the module docstring.

    Under ``torchrun`` every process takes every world_size-th batch; the loss stays a mean over the pairs of the
    global batch; only rank 0 writes files and prints.
    """
    config.validate()
    rt = setup_runtime(config.train, log)
    try:
        with StopFlag() as stop:
            return _run(config, rt, stop, progress and config.log.progress and rt.is_main)
    finally:
        teardown_runtime()


def _fingerprint(config: DPOConfig, rt: Runtime, splits: dict[str, list[EncodedPair]]) -> str:
    """What the reference log-probs depend on: the starting model, the precision and every pair's tokens."""
    h = hashlib.sha256(json.dumps([config.base, rt.precision.name, config.data.max_len]).encode())
    for name, pairs in splits.items():
        h.update(name.encode())
        for p in pairs:
            h.update(json.dumps([p.chosen.ids, p.chosen.labels, p.rejected.ids, p.rejected.labels]).encode())
    return h.hexdigest()


def _reference_logps(config: DPOConfig, rt: Runtime, model, splits: dict, pad_id: int, run_dir: Path,
                     resuming: bool) -> None:
    """Attach the reference log-probs to every pair: read back from ``ref_logps.json`` when a resumed run has
    them for these exact pairs, else computed with ``model`` (the starting weights) and written there."""
    path = run_dir / REF_LOGPS
    fingerprint = _fingerprint(config, rt, splits)
    stored = read_json(path) if resuming and path.is_file() else None
    if stored is not None and stored.get("fingerprint") == fingerprint:
        values = {k: torch.tensor(v, dtype=torch.float64) for k, v in stored["splits"].items()}
        rt.log(f"reference log-probs read back from {path}")
    else:
        if resuming:
            rt.log(f"{path} is missing or was made for other pairs: recomputing the reference log-probs from "
                   f"{config.base}")
        t0 = time.time()
        values = {name: compute_reference_logps(model, pairs, config.train.eval_batch_size, pad_id, rt.device,
                                                rt.precision.autocast(), rt.dist)
                  for name, pairs in splits.items()}
        if rt.is_main:
            write_json(path, {"fingerprint": fingerprint, "base": config.base,
                              "splits": {k: v.tolist() for k, v in values.items()}}, indent=None)
        rt.log(f"reference log-probs of {sum(len(p) for p in splits.values())} pairs computed in "
               f"{time.time() - t0:.1f}s → {path}")
    for name, pairs in splits.items():
        for p, (c, r) in zip(pairs, values[name].tolist()):
            p.ref_chosen, p.ref_rejected = c, r


def _adapters_off(model):
    """The reference of a LoRA policy: the same model with its adapters switched off, in evaluation mode."""
    def forward(input_ids):
        was_training = model.training
        model.eval()
        try:
            with L.lora_disabled(model):
                return model(input_ids)
        finally:
            model.train(was_training)
    return forward


def _run(config: DPOConfig, rt: Runtime, stop: StopFlag, progress: bool) -> DPOResult:
    dc, tc, lc = config.data, config.train, config.dpo
    log, device = rt.log, rt.device
    with D.per_node_first(rt.dist):  # hub data and a Hub base model: downloaded once per node, into its cache
        pairs, read_stats = load_pairs(dc.sources, dc.hub_split, dc.skip_bad, log)  # data errors before heavy work
        model, tokenizer, meta = load_base_model(config.base, config.tokenizer, tc.dropout)
    added = []
    if tokenizer.chat_template:
        style = style_for(tokenizer)  # the template the checkpoint was fine-tuned with
    else:
        style = prompt_style(dc.style)
        added = prepare_chat_model(model, tokenizer, style)
        log(f"gptforge: warning: {config.base} carries no chat template (not an SFT model?): using the "
            f"{style.name} style" + (f", added special tokens {added}" if added else "") + "; DPO usually starts "
            "from an SFT model (gptforge sft)")
    max_len = dc.max_len or model.config.block_size
    if max_len > model.config.block_size:
        raise GptforgeError(f"data.max_len {max_len} exceeds the model's context {model.config.block_size}")
    if config.lora.r:  # chat tokens added here train too (their rows); the reference is the model, adapters off
        model = L.apply_lora(model, config.lora, new_tokens=[tokenizer.special_tokens[t] for t in added],
                             frozen_dtype=rt.precision.dtype)
        log(L.describe(model) + "; " + L.memory_line(model, 2 * tc.batch_size, max_len, rt.precision.name))

    if dc.limit:
        random.Random(dc.split_seed).shuffle(pairs)
        pairs = pairs[: dc.limit]
    parts = split_indices(len(pairs), dc.split, dc.split_seed)
    splits, stats = {}, {}
    for name, idx in zip(("train", "val", "test"), parts):
        if idx:
            splits[name], stats[name] = encode_pairs([pairs[i] for i in idx], tokenizer, style, max_len,
                                                     dc.overlength, dc.skip_bad, progress=progress,
                                                     desc=f"tokenize {name}")
    train_set, val_set, test_set = splits.get("train"), splits.get("val", []), splits.get("test", [])
    if not train_set:
        raise GptforgeError(f"the training split is empty ({len(pairs)} pairs, split {dc.split})")
    data_info = {"pairs": len(pairs), "records": read_stats.total, "skipped_bad": read_stats.skipped_bad,
                 "identical": read_stats.identical, "style": style.name,
                 **{name: s.__dict__ for name, s in stats.items()}}
    log("data: " + "; ".join(f"{name} {s.summary()}" for name, s in stats.items()))

    run_dir = Path(config.out_dir) / config.name
    resume_dir = start_checkpointing(run_dir, config.checkpoint, config.overwrite, rt)
    pad_id = tokenizer.pad_id if tokenizer.pad_id < model.config.vocab_size else tokenizer.eot_id
    model.to(device).train()

    # the reference: the starting weights (a frozen copy, or with LoRA the model with its adapters off), or their
    # log-probs computed now, before any resumed weights load
    ref_model = None
    if lc.needs_reference and lc.precompute_ref:
        if rt.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        with L.lora_disabled(model):
            _reference_logps(config, rt, model, splits, pad_id, run_dir, resume_dir is not None)
    elif lc.needs_reference:
        ref_model = _adapters_off(model) if L.has_lora(model) else copy.deepcopy(model).eval().requires_grad_(False)

    ddp = D.wrap_model(model, rt.dist)
    optimizer = build_optimizer(model, config.optim)
    scaler = rt.precision.grad_scaler()
    world = rt.world_size

    def rank_batches(epoch: int) -> list:
        order = list(range(len(train_set)))
        random.Random(tc.seed + epoch).shuffle(order)
        chunks = [order[s:s + tc.batch_size] for s in range(0, len(order), tc.batch_size)]
        per_rank = len(chunks) // world
        return [[train_set[i] for i in c] for c in chunks[rt.dist.rank: per_rank * world: world]]

    first = rank_batches(0)
    if not first:
        raise GptforgeError(f"{len(train_set)} training pairs make fewer batches than the {world} processes")
    steps_per_epoch = max(1, len(first) // tc.grad_accum)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    epoch_limit = math.ceil(total_steps / steps_per_epoch)
    log(f"{lc.loss_type} loss, beta {lc.beta:g}; reference: "
        + ("none (reference-free)" if not lc.needs_reference else
           "precomputed log-probs" if lc.precompute_ref else
           "the model with its LoRA adapters off" if L.has_lora(model) else "a frozen copy of the starting model")
        + f"; training for {total_steps} steps = {total_steps / steps_per_epoch:.2f} epoch(s) of {steps_per_epoch} "
        + ("(train.max_steps; it overrides train.epochs)" if tc.max_steps else f"(train.epochs={tc.epochs})"))
    schedule = config.optim.schedule_for(total_steps)
    extra = {"dpo": {"loss_type": lc.loss_type, "beta": lc.beta, "base": meta.get("path"), "style": style.name,
                     "end_of_turn": style.end_of_turn}}

    state = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "pairs": 0, "initial_val": None,
             "initial_test": None, "val_history": [], "stopped_early": False, "nonfinite_steps": 0,
             "skipped_steps": 0}
    keeper = BestKeeper(mode="min" if tc.best_by == "loss" else "max", patience=tc.patience)

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

    def evaluate(pairs_: list[EncodedPair], prefix: str) -> dict:
        return evaluate_pairs(model, pairs_, lc, tc.eval_batch_size, pad_id, device, rt.precision.autocast(),
                              ref_model, rt.dist, prefix)

    def keep_value(metrics: dict):
        if tc.best_by == "loss":
            return metrics["val_loss"]
        return [metrics["val_rewards_accuracies"], -metrics["val_loss"]]

    def save(step: int, val: dict | None = None, is_best: bool = False) -> Path | None:
        run.log({"step": step, **guard.period()})
        trainer_state = {**state, "keeper": keeper.state_dict(), "config": asdict(config)}
        return save_training_checkpoint(
            rt, run, step,
            write_model=L.gpt_writer(model, tokenizer, {**extra, "step": step, "val": val}),
            optimizer_state={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
            trainer_state=trainer_state, keep_last=config.checkpoint.keep_last, is_best=is_best)

    def evaluate_and_keep(step: int, epoch: float) -> bool:
        """Validation + checkpoint (marked best when it improved); returns True when early stopping triggers."""
        val = evaluate(val_set, "val_")
        state["val_history"].append({"step": step, **val})
        improved = keeper.update(keep_value(val), step)
        run.log({"step": step, "epoch": round(epoch, 3), **val, "val_accuracy": val["val_rewards_accuracies"],
                 "best": improved})
        save(step, val, improved)
        log(f"epoch {epoch:.2f} step {step}: val loss {val['val_loss']:.4f}, reward accuracy "
            f"{val['val_rewards_accuracies']:.1%}, margin {val['val_rewards_margins']:.3f}"
            + ("" if improved else f"; {keeper.bad_evals} evaluation(s) without improvement"))
        return keeper.should_stop

    if resume_dir is None:
        if val_set:
            state["initial_val"] = evaluate(val_set, "val_")
            log(f"before tuning: val loss {state['initial_val']['val_loss']:.4f}, the policy prefers the chosen "
                f"answer in {state['initial_val']['val_logps_accuracy']:.1%} of validation pairs")
            run.log({"step": 0, "epoch": 0, **state["initial_val"],
                     "val_accuracy": state["initial_val"]["val_rewards_accuracies"]})
        if test_set:
            state["initial_test"] = evaluate(test_set, "test_")

    bar = tqdm(total=total_steps, initial=state["step"], desc=f"dpo ({lc.loss_type})", unit="step",
               disable=not progress, dynamic_ncols=True)
    t0, interrupted = time.time(), False
    guard = NonFiniteGuard.for_train(tc, log, fp16_scaler=scaler is not None)
    rows: list[torch.Tensor] = []

    def loss_fn(m, batch) -> torch.Tensor:
        losses, r = pair_forward(m, batch, lc, ref_model)
        rows.append(r)
        return losses.mean()

    batches, batches_epoch = None, None
    while state["step"] < total_steps and state["epoch"] < epoch_limit and not state["stopped_early"]:
        if batches_epoch != state["epoch"]:
            batches, batches_epoch = rank_batches(state["epoch"]), state["epoch"]
        epoch_steps = max(1, len(batches) // tc.grad_accum)
        group = [pair_batch(b, pad_id).to(device) for b in batches[state["position"] * tc.grad_accum:
                                                                   (state["position"] + 1) * tc.grad_accum]]
        rows.clear()
        stats = optimizer_step(ddp, optimizer, group, schedule.lr_at(state["step"]), loss_fn=loss_fn,
                               count_fn=lambda b: b.n_pairs, rt=rt, scaler=scaler, grad_clip=tc.grad_clip)
        metrics = summarize(rows, rt.dist, device=device)
        metrics.pop("loss")  # the step's loss is the core's (the same mean)
        state["step"] += 1
        state["position"] += 1
        state["tokens"] += sum(b.num_tokens for b in group) * world
        state["pairs"] += stats.targets
        state["nonfinite_steps"] += stats.nonfinite
        state["skipped_steps"] += stats.skipped
        step = state["step"]
        epoch = state["epoch"] + state["position"] / epoch_steps
        end_of_epoch = state["position"] >= epoch_steps
        if end_of_epoch:
            state["epoch"], state["position"] = state["epoch"] + 1, 0
        run.log({"step": step, "epoch": round(epoch, 3), **stats.fields(), **metrics,
                 "train_accuracy": metrics["rewards_accuracies"], "tokens": state["tokens"], "pairs": state["pairs"],
                 "elapsed_s": round(time.time() - t0, 2)})
        bar.update(1)
        bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{stats.loss:.3f}", acc=f"{metrics['rewards_accuracies']:.2f}",
                        margin=f"{metrics['rewards_margins']:.3f}")
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
        if stop_now:
            interrupted = True
            log(f"\nstopped by {stop.name} after step {step}; continue with --resume")
            break
    bar.close()
    if state["stopped_early"]:
        log(f"early stopping: {tc.patience} evaluation(s) without improvement")

    final = finish_with_best(rt, run, keeper, load_weights, interrupted, model=model)
    run.plot()
    best_val = next((v for v in state["val_history"] if v["step"] == keeper.best_step), None)
    test = evaluate(test_set, "test_") if test_set and not interrupted else None  # (LoRA: before the merge)
    if L.has_lora(model) and not interrupted:  # adapter/ for peft, and the merged model from here on
        model = L.finish_lora(model, run_dir, config.base, tokenizer, rt.is_main, log)
    result = DPOResult(run_dir=run_dir, checkpoint=final, steps=state["step"],
                       epochs_completed=round(state["step"] / steps_per_epoch, 3), initial_val=state["initial_val"],
                       val_history=list(state["val_history"]), best_val=best_val,
                       stopped_early=state["stopped_early"], data=data_info, initial_test=state["initial_test"],
                       test=test, interrupted=interrupted)
    if rt.is_main:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        summary.update(precision=rt.precision.name, precision_reason=rt.precision.reason,
                       loss_type=lc.loss_type, beta=lc.beta, nonfinite_steps=state["nonfinite_steps"],
                       skipped_steps=state["skipped_steps"])
        write_json(run_dir / "summary.json", summary)
    run.close()
    D.barrier(rt.dist)
    log(f"DPO done: {state['step']} steps in {time.time() - t0:.0f}s ({rt.precision.name})"
        + (f", test reward accuracy {test['test_rewards_accuracies']:.1%} (margin {test['test_rewards_margins']:.3f})"
           if test else "")
        + f"; model in {result.checkpoint}, metrics in {run_dir / 'metrics.jsonl'}, chart {run_dir / 'loss.png'}")
    return result
