"""Pretraining: from one CPU to many GPUs under ``torchrun``, resumable to the bit.

``run_pretrain(PretrainConfig(...))`` (or ``gptforge pretrain --config recipe.yaml``) builds the model (a preset,
or ``--model.init_from`` weights), the shard loader, and then loops over :func:`gptforge.train.core.optimizer_step`
(gradient accumulation, clipping, non-finite skipping, fp16 loss scaling live there), with periodic validation
loss, samples (through the :class:`~gptforge.engine.Engine`), HellaSwag and checkpoints. What is particular to
pretraining stays here: the plan and ``--dry-run`` (:mod:`gptforge.train.pretrain_config`), the loader and its
resume position, SIGTERM handling, FSDP, and the micro-batch finder.
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gptforge.checkpoint import load_model
from gptforge.data.loader import TokenLoader, validation_windows
from gptforge.engine import Engine, SamplingParams
from gptforge.errors import GptforgeError
from gptforge.eval.loss import mean_lm_loss
from gptforge.io import write_json
from gptforge.memory import human_bytes, training_memory
from gptforge.model import GPT
from gptforge.model_modern import build_model
from gptforge.precision import Precision
from gptforge.train import checkpoint as C
from gptforge.train import distributed as D
from gptforge.train.core import (
    BestKeeper,
    RunDir,
    Runtime,
    StopFlag,
    build_optimizer,
    finished_message,
    optimizer_step,
    restore_checkpoint,
    save_training_checkpoint,
    set_dropout,
    setup_runtime,
    start_checkpointing,
    teardown_runtime,
)
from gptforge.train.metrics import device_peak_flops, summary_text
from gptforge.train.nonfinite import NonFiniteGuard
from gptforge.train.optim import configure_optimizer
from gptforge.train.pretrain_config import (  # noqa: F401  (re-exported: the public names of this stage)
    CheckpointSection,
    DataSection,
    EvalSection,
    LogSection,
    ModelSection,
    OptimSection,
    Plan,
    PretrainConfig,
    TrainSection,
    _check_vocab,
    _data_train_tokens,
    _global_batch_seqs,
    build_model_config,
    compute_plan,
    dry_run,
    resolve_tokenizer,
)


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int  # optimizer steps completed (global)
    tokens: int
    final_loss: float
    final_val_loss: float | None
    best_val_loss: float | None
    checkpoint: Path | None
    interrupted: bool
    summary: dict


# ---- building blocks -----------------------------------------------------------------------------------------


def find_micro_batch(model: GPT, per_rank_batch: int, seq_len: int, precision: Precision, device: torch.device,
                     log=print) -> int:
    """The largest divisor of ``per_rank_batch`` that trains without running out of memory.

    On CUDA: binary search over the divisors, each trial two full forward/backward/AdamW steps (with LR 0 on a
    throwaway optimizer, so the weights do not change). Elsewhere: the largest divisor whose estimated training
    memory fits in half of the free RAM.
    """
    divisors = [d for d in range(1, per_rank_batch + 1) if per_rank_batch % d == 0]
    if device.type != "cuda":
        avail = _available_ram()
        fitting = [d for d in divisors if training_memory(model.config, d, seq_len, precision.name).total <= avail / 2]
        chosen = fitting[-1] if fitting else 1
        log(f"micro-batch auto (no CUDA, memory estimate vs {human_bytes(avail)} free RAM): {chosen}")
        return chosen
    trial_opt = configure_optimizer(model, lr=0.0, weight_decay=0.0)  # LR 0: allocates state, moves nothing
    gen = torch.Generator(device=device).manual_seed(0)  # private: the training RNG stays untouched

    def runs(mb: int) -> bool:
        try:
            for _ in range(2):
                x = torch.randint(0, model.config.vocab_size, (mb, seq_len), device=device, generator=gen)
                with precision.autocast():
                    _, loss = model(x, x)
                loss.backward()
                trial_opt.step()
                trial_opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            trial_opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    lo, hi = 0, len(divisors) - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if runs(divisors[mid]):
            best, lo = divisors[mid], mid + 1
        else:
            hi = mid - 1
    trial_opt.state.clear()
    torch.cuda.empty_cache()
    if best is None:
        raise GptforgeError(f"out of GPU memory even at micro-batch 1 × {seq_len} tokens; use a smaller model, "
                            "a shorter data.seq_len, bf16, or FSDP (--train.distributed=fsdp)")
    log(f"micro-batch auto: {best} (largest of {divisors} that fits on {torch.cuda.get_device_name(device)})")
    return best


def _available_ram() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def validation_loss(model, windows: np.ndarray, micro_batch: int, rt: Runtime) -> float:
    """Mean next-token loss over the fixed validation windows, split across ranks (the shared evaluator)."""
    mine = windows[rt.dist.rank::rt.world_size]
    batches = []
    for i in range(0, len(mine), micro_batch):
        chunk = torch.from_numpy(mine[i:i + micro_batch])
        batches.append((chunk[:, :-1], chunk[:, 1:], {}))
    return mean_lm_loss(model, batches, rt.precision.autocast(), rt.dist)


def _lm_loss(model, batch) -> torch.Tensor:
    x, y = batch
    _, loss = model(x, y)
    return loss


def run_pretrain(cfg: PretrainConfig, log=None) -> PretrainResult:
    """Train according to ``cfg``; see the module docstring. Returns what was done and where it went."""
    cfg.validate()
    rt = setup_runtime(cfg.train, log or print, tf32=cfg.train.tf32)
    try:
        with StopFlag() as stop:
            return _train(cfg, rt, stop)
    finally:
        teardown_runtime()


def _train(cfg: PretrainConfig, rt: Runtime, stop: StopFlag) -> PretrainResult:
    device, say, precision = rt.device, rt.log, rt.precision
    if not cfg.data.path or not Path(cfg.data.path).is_dir():
        raise GptforgeError(f"data.path {cfg.data.path!r} is not a directory of prepared shards; run "
                            "`gptforge data prepare FILES --tokenizer gpt2 --out DIR` and pass --data.path=DIR")
    run_dir = cfg.run_dir
    resume_dir = start_checkpointing(run_dir, cfg.checkpoint, cfg.overwrite, rt)

    # -- model and tokenizer --------------------------------------------------------------------------------
    if cfg.model.init_from:
        with D.per_node_first(rt.dist):  # a Hub model (or the GPT-2 vocabulary): downloaded once per node
            model, tokenizer, meta = load_model(cfg.model.init_from, device="cpu")
            if tokenizer is None:
                tokenizer = resolve_tokenizer(cfg)
        if cfg.model.dropout is not None:
            set_dropout(model, cfg.model.dropout)
        say(f"initialised from {meta['path']} ({model.num_params():,} parameters; tokenizer from the weights)")
    else:
        with D.per_node_first(rt.dist):  # tiktoken fetches the GPT-2 vocabulary into this machine's cache
            tokenizer = resolve_tokenizer(cfg)
        model = build_model(build_model_config(cfg, tokenizer.vocab_size), init=cfg.model.init)
    _check_vocab(cfg, model.config, tokenizer)
    model.to(device)
    model.train()

    if cfg.train.micro_batch == "auto":
        G0 = _global_batch_seqs(cfg, model.config)
        per_rank = max(1, G0 // rt.world_size) if G0 else 64
        micro_batch = find_micro_batch(model, per_rank, cfg.data.seq_len or model.config.block_size,
                                       precision, device, log=say)
    elif isinstance(cfg.train.micro_batch, int):
        micro_batch = cfg.train.micro_batch
    else:
        raise GptforgeError(f"train.micro_batch must be an integer or 'auto', got {cfg.train.micro_batch!r}")
    epoch_tokens = _data_train_tokens(cfg.data.path, cfg.data.seq_len or model.config.block_size,
                                      cfg.data.start_token)
    plan = compute_plan(cfg, model.config, rt.world_size, micro_batch, epoch_tokens)

    loader = TokenLoader(cfg.data.path, "train", plan.seq_len, plan.micro_batch, plan.grad_accum, rt.dist.rank,
                         rt.world_size, seed=cfg.train.seed, mode=cfg.data.sampling, device=device,
                         vocab_size=model.config.vocab_size,  # each shard's sha256 and largest id, before use
                         start_token=cfg.data.start_token)
    val = validation_windows(cfg.data.path, plan.seq_len, cfg.data.val_tokens, vocab_size=model.config.vocab_size)
    schedule = cfg.optim.schedule_for(plan.total_steps)
    bare = model
    strategy = cfg.train.distributed
    if strategy not in ("ddp", "fsdp"):
        raise GptforgeError(f"train.distributed must be ddp or fsdp, got {strategy!r}")
    model = D.wrap_model(model, rt.dist, strategy)
    optimizer = build_optimizer(model if strategy == "fsdp" else bare, cfg.optim)
    scaler = precision.grad_scaler()
    sharded = strategy == "fsdp" and rt.dist.enabled

    state: dict = {"step": 0, "tokens": 0, "best_val_loss": None, "best_train_loss_mean": None, "nonfinite_steps": 0,
                   "scaler_skips": 0, "skipped_steps": 0, "elapsed": 0.0, "loss": float("nan"), "val_loss": None,
                   "train_seconds": 0.0, "eval_seconds": 0.0, "checkpoint_seconds": 0.0}
    keeper = BestKeeper(mode="min")
    state["schedule_shift"] = 0  # LR-schedule step − optimizer step (nonzero after a resume with another batch)
    if resume_dir is not None:
        def load_weights(directory: Path) -> None:
            if not sharded:
                return C.load_gpt_weights(bare, directory)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, C.load_weights(directory, bare.config.tie_embeddings),
                                 options=StateDictOptions(full_state_dict=True))

        trainer_state = restore_checkpoint(resume_dir, rt, load_weights=load_weights, scaler=scaler,
                                           load_optimizer=lambda s: D.load_optimizer(model, optimizer, s, strategy))
        batch_change = loader.load_state_dict(trainer_state["loader"])
        state.update({k: trainer_state[k] for k in state if k in trainer_state})
        if trainer_state.get("keeper"):
            keeper.load_state_dict(trainer_state["keeper"])
        say(f"resumed from {resume_dir} at step {state['step']} ({state['tokens']:,} tokens)")
        if batch_change:  # another global batch: same token, and the configured schedule at that token's step
            state["schedule_shift"] = batch_change["tokens"] // plan.tokens_per_step - state["step"]
            say(_batch_change_message(batch_change, state, plan, schedule))

    train_model = torch.compile(model) if cfg.train.compile else model
    peak, peak_source = device_peak_flops(device, precision.name)

    # -- run directory, logs, trackers (rank 0) --------------------------------------------------------------
    run = RunDir(run_dir, cfg, rt, cfg.log, resume_step=state["step"] if resume_dir else None,
                 grad_clip=cfg.train.grad_clip)
    if rt.is_main and resume_dir is None and (run_dir / "samples.md").exists():
        (run_dir / "samples.md").unlink()
    say(f"training {bare.num_params():,} parameters on {device} × {rt.world_size} ({precision.describe}"
        f"{', compiled' if cfg.train.compile else ''}): {plan.total_steps:,} steps × {plan.tokens_per_step:,} "
        f"tokens (micro-batch {plan.micro_batch} × {plan.seq_len}, accumulation {plan.grad_accum})")

    period_losses: list[float] = []  # training losses since the last checkpoint (checkpoint.best_by)

    def save(step: int, val_loss: float | None) -> Path | None:
        metric = val_loss
        if cfg.checkpoint.best_by == "train_loss_mean":  # seed 004: keep the best mean training loss
            finite = [x for x in period_losses if math.isfinite(x)]
            metric = sum(finite) / len(finite) if finite else None
            period_losses.clear()
            state["best_train_loss_mean"] = keeper.best if metric is None else min(metric, keeper.best or metric)
        is_best = metric is not None and keeper.update(metric, step)
        if cfg.checkpoint.best_by == "val_loss":
            state["best_val_loss"] = keeper.best
        model_state, opt_state = D.full_state_dicts(model, optimizer, strategy)
        trainer_state = {**state, "loader": loader.state_dict(), "config": asdict(cfg), "plan": asdict(plan),
                         "keeper": keeper.state_dict()}
        return save_training_checkpoint(
            rt, run, step, write_model=C.gpt_writer(bare, tokenizer, model_state,
                                                    {"step": step, "tokens": state["tokens"]}),
            optimizer_state={"optimizer": opt_state, "scaler": scaler.state_dict() if scaler else None},
            trainer_state=trainer_state, keep_last=cfg.checkpoint.keep_last, is_best=is_best)

    hellaswag_items = None  # rank 0 scores a fixed subset; skipped under FSDP (the weights are sharded)
    if cfg.eval.hellaswag_interval and rt.is_main and not sharded:
        from gptforge.eval.tasks import load_hellaswag

        hellaswag_items = load_hellaswag(cfg.eval.hellaswag_data, limit=cfg.eval.hellaswag_items)
    core_subset = None  # the same for CORE: a seeded sample of every entry, loaded once
    if cfg.eval.core_interval and rt.is_main and not sharded:
        from gptforge.eval.core import load_subset

        core_subset = load_subset(cfg.eval.core_tasks, cfg.eval.core_items)

    def write_samples(step: int) -> None:
        if not rt.is_main or sharded:
            return
        engine = Engine(bare, tokenizer, device=device, context_policy="slide")
        params = SamplingParams(max_new_tokens=cfg.eval.sample_tokens, temperature=cfg.eval.temperature,
                                top_k=cfg.eval.top_k, seed=cfg.train.seed)
        prompts = [tokenizer.encode(p) or [tokenizer.eot_id] for p in cfg.eval.sample_prompts]
        lines = [f"## step {step}\n"]
        for prompt, completion in zip(cfg.eval.sample_prompts, engine.generate(prompts, params)):
            lines.append(f"**prompt:** `{prompt!r}`\n\n```\n{prompt}{completion.text}\n```\n")
        with open(run_dir / "samples.md", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    # -- the loop -------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    start_step = state["step"]
    last_step = plan.total_steps - state["schedule_shift"]
    end_step = last_step if cfg.train.stop_at is None else min(last_step, cfg.train.stop_at)
    bar = tqdm(total=last_step, initial=start_step, disable=not (rt.is_main and cfg.log.progress),
               unit="step", dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard.for_train(cfg.train, say, fp16_scaler=scaler is not None)
    spent = {k: state.get(f"{k}_seconds", 0.0) for k in ("train", "eval", "checkpoint")}  # run accounting
    last_ckpt = None
    run_t0 = time.perf_counter()
    interrupted = False
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        batches = [loader.next_batch() for _ in range(plan.grad_accum)]
        stats = optimizer_step(train_model, optimizer, batches, schedule.lr_at(step + state["schedule_shift"]),
                               loss_fn=_lm_loss, count_fn=lambda b: b[1].numel(), rt=rt, scaler=scaler,
                               grad_clip=cfg.train.grad_clip, params=params)
        state["nonfinite_steps"] += stats.nonfinite
        state["skipped_steps"] += stats.skipped
        state["scaler_skips"] += int(stats.skipped and scaler is not None)
        state["loss"] = stats.loss
        period_losses.append(stats.loss)
        dt = time.perf_counter() - t0
        spent["train"] += dt
        state["step"] = step + 1
        state["tokens"] += plan.tokens_per_step
        tok_s = plan.tokens_per_step / dt
        mfu = plan.flops_per_token * tok_s / peak if peak else None
        record = {"step": state["step"], **stats.fields(), "tokens": state["tokens"], "dt": dt, "tokens_per_s": tok_s}
        if mfu is not None:
            record["mfu"] = mfu
        if device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

        done = state["step"] == end_step
        stop_now = stop.any_rank(rt)
        t_eval = time.perf_counter()
        if len(val) and ((cfg.eval.interval and state["step"] % cfg.eval.interval == 0) or done or stop_now):
            # no activations are kept for backward, so evaluation can take bigger batches than training
            eval_batch = plan.micro_batch * min(4, plan.grad_accum * 2)
            state["val_loss"] = validation_loss(train_model if sharded else bare, val, eval_batch, rt)
            record["val_loss"] = state["val_loss"]
        if hellaswag_items and (state["step"] % cfg.eval.hellaswag_interval == 0 or done):
            from gptforge.eval.choice import hellaswag_hook

            record.update(hellaswag_hook(bare, tokenizer, hellaswag_items))
        if core_subset and (state["step"] % cfg.eval.core_interval == 0 or done):
            from gptforge.eval.core import core_hook

            record.update(core_hook(bare, tokenizer, core_subset))
        diverged = guard.update(state["step"], stats)
        checkpoint_now = bool((cfg.checkpoint.interval and state["step"] % cfg.checkpoint.interval == 0) or done
                              or stop_now or diverged)
        if checkpoint_now:  # exploding-gradient counts of the period this checkpoint closes
            record.update(guard.period())
        run.log(record)
        if diverged:  # keep the last good state, then stop loudly
            bar.close()
            state["elapsed"] += time.perf_counter() - run_t0
            last_ckpt = save(state["step"], None)
            run.close()
            raise guard.error(last_ckpt)
        if (cfg.eval.sample_interval and state["step"] % cfg.eval.sample_interval == 0) or done:
            write_samples(state["step"])
        spent["eval"] += time.perf_counter() - t_eval
        bar.set_postfix_str(f"loss {stats.loss:.4f} lr {stats.lr:.2e} gnorm {stats.grad_norm:.2f} tok/s {tok_s:,.0f}"
                            + (f" MFU {100 * mfu:.1f}%" if mfu is not None else ""), refresh=False)
        bar.update(1)
        if checkpoint_now:
            t_ckpt = time.perf_counter()
            state["elapsed"] += t_ckpt - run_t0
            run_t0 = t_ckpt
            state.update({f"{k}_seconds": v for k, v in spent.items()})
            last_ckpt = save(state["step"], record.get("val_loss"))
            spent["checkpoint"] += time.perf_counter() - t_ckpt
        if stop_now:
            interrupted = True
            say(f"\nstopped by {stop.name} after step {state['step']}; checkpoint {last_ckpt}; continue with --resume")
            break
    bar.close()
    if start_step >= end_step:
        say(finished_message(start_step, end_step, "train.max_steps (or max_tokens, epochs, stop_at)"))
        last_ckpt = resume_dir
    state["elapsed"] += time.perf_counter() - run_t0

    # -- summary --------------------------------------------------------------------------------------------
    elapsed = max(1e-9, state["elapsed"])
    tok_s = state["tokens"] / elapsed
    summary = {"run_dir": str(run_dir), "steps": state["step"], "tokens": state["tokens"], "seconds": elapsed,
               "tokens_per_s": tok_s, "tokens_per_second": tok_s,
               "mfu": plan.flops_per_token * tok_s / peak if peak else None, "mfu_peak_source": peak_source,
               "peak_memory": _peak_memory(device), "final_loss": state["loss"], "final_val_loss": state["val_loss"],
               "best_val_loss": state["best_val_loss"], "skipped_steps": state["skipped_steps"],
               "nonfinite_steps": state["nonfinite_steps"], "scaler_skips": state["scaler_skips"],
               "params": bare.num_params(), "precision": precision.name, "precision_reason": precision.reason,
               "world_size": rt.world_size, "train_seconds": spent["train"], "eval_seconds": spent["eval"],
               "checkpoint_seconds": spent["checkpoint"]}
    coverage = loader.coverage()  # all ranks together; exact for sequential/in_order, expected for random
    summary.update(sampling=coverage["sampling"], distinct_tokens=coverage["distinct_tokens"],
                   distinct_tokens_exact=coverage["exact"], data_next_token=coverage["next_token"])
    say(summary_text(summary))
    say(_coverage_message(coverage))
    say(f"time: {spent['train']:.1f} s training steps, {spent['eval']:.1f} s evaluation and samples, "
        f"{spent['checkpoint']:.1f} s checkpoints")
    if rt.is_main:
        write_json(run_dir / "summary.json", summary, default=str)
    run.close()
    return PretrainResult(run_dir=run_dir, steps=state["step"], tokens=state["tokens"], final_loss=state["loss"],
                          final_val_loss=state["val_loss"], best_val_loss=state["best_val_loss"],
                          checkpoint=last_ckpt, interrupted=interrupted, summary=summary)


def _batch_change_message(change: dict, state: dict, plan: Plan, schedule) -> str:
    """The one line that says how a resume with another global batch was mapped."""
    s, shift = state["step"], state["schedule_shift"]
    rest = change["tokens"] - (s + shift) * plan.tokens_per_step
    return (f"resumed with another global batch ({change['from_global_batch']} → {change['to_global_batch']} "
            f"sequences of {plan.seq_len} tokens): the checkpoint's {s:,} steps consumed {change['tokens']:,} "
            f"tokens, so the data continues at token {change['tokens']:,} (window {change['windows']:,}) and the "
            f"{schedule.kind} LR schedule of {plan.total_steps:,} steps × {plan.tokens_per_step:,} tokens "
            f"continues at its step {s + shift:,} (lr {schedule.lr_at(s + shift):.3g}"
            + (f"; {rest:,} tokens into it" if rest else "") + f"); optimizer steps keep counting from {s:,}, "
            f"so the run ends at step {plan.total_steps - shift:,}")


def _coverage_message(c: dict) -> str:
    """What the run's data covered: distinct tokens seen, and where to continue on unseen ones."""
    share = f"{100 * c['distinct_tokens'] / max(1, c['available_tokens']):.1f}%"
    if c["sampling"] == "random":
        return (f"data: random windows with replacement, {c['tokens']:,} tokens drawn ({c['epochs']:.2f} epochs' "
                f"worth): about {c['distinct_tokens']:,} distinct tokens of {c['available_tokens']:,} ({share}; "
                "expected value; data.sampling=sequential sees every window once per epoch)")
    line = (f"data: {c['sampling']} sampling, {c['epochs']:.2f} epochs: {c['distinct_tokens']:,} distinct tokens "
            f"of {c['available_tokens']:,} ({share}, exact)")
    if c["next_token"] is not None:
        line += f"; continue on the unseen tokens with --data.start_token={c['next_token']}"
    return line


def _peak_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    except (ValueError, OSError):
        return None
