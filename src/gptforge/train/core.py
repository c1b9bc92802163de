"""The training core shared by pretrain, SFT and classify: functions, not a trainer class.

A stage module builds its model and batches, then calls into this module for everything that is the same in every
stage: the shared config sections (:class:`OptimConfig`, :class:`CheckpointConfig`, :class:`LogConfig` and the
common ``train`` keys), the runtime (distributed init, device, the one precision rule, seeding, rank-0 logging),
the base model with its dropout, the optimizer and schedule, one :func:`optimizer_step`, the run directory
(config, ``metrics.jsonl``, trackers, ``loss.png``), checkpoints (:func:`save_training_checkpoint`) and the
best-checkpoint keeper with patience (:class:`BestKeeper`).

The one normalisation rule (:func:`optimizer_step`): a step's loss is the mean over every valid target (token,
or example for a classifier) in the global batch, whatever the split into micro-batches and processes.
"""

from __future__ import annotations

import base64
import math
import random
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptforge.checkpoint import load_model
from gptforge.config import save_config
from gptforge.errors import GptforgeError
from gptforge.precision import Precision, resolve_precision
from gptforge.tokenizer import load_tokenizer
from gptforge.train import checkpoint as C
from gptforge.train import distributed as D
from gptforge.train.metrics import MetricsLog, plot_metrics
from gptforge.train.optim import configure_muon, configure_optimizer, set_lr
from gptforge.train.sections import (  # noqa: F401  (re-exported: the stages import them from here)
    CheckpointConfig,
    FineTuneRun,
    LogConfig,
    OptimConfig,
    TrainCommon,
    migrate_base_key,
    migrate_legacy_keys,
    require_at_least_one,
)
from gptforge.train.trackers import make_trackers

# ---- runtime: processes, device, precision, seeds ------------------------------------------------------------


@dataclass
class Runtime:
    """Where and how this process trains: its rank, device, precision, and a rank-0 ``log``."""

    dist: D.DistInfo
    precision: Precision
    log: Callable[..., None]

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size


def setup_runtime(train: TrainCommon, log=print, tf32: bool = True) -> Runtime:
    """Join the process group (under ``torchrun``), pick the device and precision, seed every RNG."""
    train.validate_common()
    info = D.setup(train.device)
    precision = resolve_precision(train.precision, info.device)
    if info.device.type == "cuda" and tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(train.seed)
    say = log if info.is_main else (lambda *a, **k: None)
    say(f"device {info.device} × {info.world_size}; precision {precision.describe}")
    return Runtime(info, precision, say)


def teardown_runtime() -> None:
    D.teardown()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as JSON-safe values (exact resume)."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    np_state = np.random.get_state()
    py = random.getstate()
    state = {"torch": b64(torch.get_rng_state()), "python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    def unb64(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(unb64(state["torch"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])


def gathered_rng_states(rt: Runtime) -> list:
    """Every rank's RNG state (rank order), for the checkpoint rank 0 writes."""
    if not rt.dist.enabled:
        return [rng_state()]
    import torch.distributed as dist

    states: list = [None] * rt.world_size
    dist.all_gather_object(states, rng_state())
    return states


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, writes a checkpoint and returns."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_rank(self, rt: Runtime) -> bool:
        return D.any_rank(self.signal is not None, rt.dist)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "another rank's signal"


# ---- model and optimizer -------------------------------------------------------------------------------------


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout rate in ``model`` (modules and the attention's functional dropout) to ``p``."""
    if not 0 <= p < 1:
        raise GptforgeError(f"dropout must be in [0, 1), got {p}")
    if hasattr(model, "config"):
        model.config.dropout = p
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = p


def load_base_model(checkpoint: str, tokenizer: str | None = None, dropout: float | None = None):
    """``(model, tokenizer, meta)`` from any checkpoint form, on the CPU, dropout set everywhere when given.

    ``tokenizer`` overrides (or supplies) the checkpoint's own; a model without either is an error.
    """
    model, tok, meta = load_model(checkpoint, device="cpu")
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    if tok is None:
        raise GptforgeError(f"{checkpoint} carries no tokenizer; pass --tokenizer gpt2 or a tokenizer directory")
    if dropout is not None:
        set_dropout(model, dropout)
    return model, tok, meta


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with the section's decay groups, betas and eps; with ``name: muon``,
    one :class:`~gptforge.train.optim.MuonAdamW` (Muon for the blocks' matrices, that AdamW for the rest)."""
    optim.validate()
    if optim.name == "muon":
        return configure_muon(model, lr=optim.lr, muon_lr=optim.muon_lr, weight_decay=optim.weight_decay,
                              muon_weight_decay=optim.muon_weight_decay, betas=(optim.beta1, optim.beta2),
                              eps=optim.eps, momentum=optim.muon_momentum, nesterov=optim.muon_nesterov,
                              ns_steps=optim.muon_ns_steps, decay_embeddings=optim.decay_embeddings,
                              decay=optim.decay)
    return configure_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=(optim.beta1, optim.beta2),
                               eps=optim.eps, decay_embeddings=optim.decay_embeddings, decay=optim.decay)


# ---- one optimizer step --------------------------------------------------------------------------------------


@dataclass
class StepStats:
    loss: float  # mean over the global batch's valid targets
    grad_norm: float  # before clipping
    lr: float
    targets: int  # valid targets in the global batch
    skipped: bool  # the update was not applied (non-finite gradients, or fp16 scaler backoff)
    nonfinite: bool  # some gradient is inf/nan, or their norm overflowed
    clipped: bool = False  # a finite norm above train.grad_clip was scaled down
    norm_overflow: bool = False  # every gradient finite, but the norm overflowed (huge, not broken)

    def fields(self) -> dict:
        """The per-step keys of the shared metrics schema this step contributes."""
        return {"loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm, "skipped": self.skipped,
                "clipped": self.clipped, "nonfinite": self.nonfinite and not self.norm_overflow,
                "norm_overflow": self.norm_overflow}


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, lr: float, *,
                   loss_fn: Callable[[nn.Module, Any], torch.Tensor], count_fn: Callable[[Any], int], rt: Runtime,
                   scaler=None, grad_clip: float | None = None, params: list | None = None) -> StepStats:
    """Accumulate gradients over ``micro_batches`` and apply one update at ``lr``.

    ``loss_fn(model, batch)`` returns the batch's *mean* loss over its ``count_fn(batch)`` valid targets; each is
    weighted by its share of the valid targets across all micro-batches and processes, so the step minimises the
    mean over the whole global batch (pretrain's accumulation and SFT's masked tokens follow the same rule).
    Gradients are clipped (``grad_clip``), and a step whose gradients are not finite is skipped and counted.
    """
    counts = [int(count_fn(b)) for b in micro_batches]
    total = int(D.all_reduce_sum(torch.tensor([float(sum(counts))], dtype=torch.float64, device=rt.device),
                                 rt.dist).item())
    if total == 0:
        raise GptforgeError("a training batch has no valid targets: every label is masked (check the data's "
                            "assistant turns and max_len); training on it would be a silent zero loss")
    set_lr(optimizer, lr)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    for i, (batch, n) in enumerate(zip(micro_batches, counts)):
        with D.no_sync(model, i == len(micro_batches) - 1):
            with rt.precision.autocast():
                loss = loss_fn(model, batch)
            weight = n / total
            scaled = loss * (weight * rt.world_size)  # DDP/FSDP average gradients over the processes
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().double() * weight
    D.all_reduce_sum(loss_sum, rt.dist)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    grad_norm = clip_grad_norm(params, grad_clip)
    finite = math.isfinite(grad_norm)
    skipped = not finite
    overflow = not finite and all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself when it finds inf/nan
        scaler.update()
        skipped = skipped or scaler.get_scale() < scale_before
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=float(loss_sum.item()), grad_norm=grad_norm, lr=lr, targets=total, skipped=skipped,
                     nonfinite=not finite, clipped=bool(grad_clip) and finite and grad_norm > grad_clip,
                     norm_overflow=overflow)


def clip_grad_norm(params: list[torch.Tensor], clip: float | None) -> float:
    """Total L2 norm of the gradients before clipping (clipping in place when ``clip`` is set and > 0)."""
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


# ---- the run directory ---------------------------------------------------------------------------------------


class RunDir:
    """``runs/<name>/``: the resolved config, ``metrics.jsonl`` (one schema for every stage), trackers, ``loss.png``.

    Only rank 0 writes; on other ranks every method is a no-op. ``resume_step`` keeps the metrics of steps up to
    it (the checkpoint being resumed) and drops later ones, which are about to be redone.
    """

    def __init__(self, path: Path, config, rt: Runtime, log_cfg: LogConfig, resume_step: int | None = None,
                 grad_clip: float | None = None):
        self.path = Path(path)
        self.enabled = rt.is_main
        self.plot_enabled = log_cfg.plot
        self.grad_clip = grad_clip
        self.metrics = None
        self.trackers: list = []
        if self.enabled:
            self.path.mkdir(parents=True, exist_ok=True)
            save_config(config, self.path / "config.yaml")
            self.metrics = MetricsLog(self.path / "metrics.jsonl", resume_from_step=resume_step)
            self.trackers = make_trackers(log_cfg.trackers, self.path, self.path.name, asdict(config))

    @property
    def ckpt_root(self) -> Path:
        return self.path / "ckpt"

    def log(self, record: dict) -> None:
        """One metrics record (``step`` = optimizer steps completed; see README "Metrics")."""
        if not self.enabled:
            return
        self.metrics.write(record)
        for tracker in self.trackers:
            tracker.log(record, record["step"])

    def plot(self) -> Path | None:
        if not (self.enabled and self.plot_enabled):
            return None
        return plot_metrics(self.path / "metrics.jsonl", self.path / "loss.png", self.grad_clip)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        for tracker in self.trackers:
            tracker.close()


# ---- checkpoints and the best one ----------------------------------------------------------------------------


@dataclass
class BestKeeper:
    """The best evaluation so far and early stopping: ``patience`` evaluations without improvement stop the run.

    ``mode`` is ``min`` (a loss) or ``max`` (an accuracy); values may be tuples compared in order (ties broken by
    later entries). Its state travels in checkpoints so a resumed run keeps counting.
    """

    mode: str = "min"
    patience: int | None = None
    best: Any = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, value, step: int) -> bool:
        """Record an evaluation; returns whether it is the best so far (non-finite values never are)."""
        first = value[0] if isinstance(value, (list, tuple)) else value
        ok = isinstance(first, (int, float)) and math.isfinite(first)
        key = list(value) if isinstance(value, (list, tuple)) else value
        improved = ok and (self.best is None or (key < self.best if self.mode == "min" else key > self.best))
        if improved:
            self.best, self.best_step, self.bad_evals = key, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def start_checkpointing(run_dir: Path, ckpt: CheckpointConfig, overwrite: bool, rt: Runtime) -> Path | None:
    """Where the run starts: the checkpoint to resume from, or ``None`` for a fresh start.

    A fresh start in a directory that already has checkpoints needs ``overwrite`` (which deletes them).
    """
    ckpt.validate()
    root = Path(run_dir) / "ckpt"
    resume_dir = None
    if ckpt.resume:
        resume_dir = C.find_resume_checkpoint(root, fallback=ckpt.fallback, log=rt.log)
        if resume_dir is None and ckpt.resume is True:
            raise GptforgeError(f"--resume: {root} has no checkpoint to resume from; drop --resume to start")
    elif C.list_checkpoints(root) and not overwrite:
        raise GptforgeError(f"{run_dir} already has checkpoints; continue it with --resume, start over with "
                            "--overwrite=true, or pick another --name")
    if rt.is_main and resume_dir is None and root.exists():
        import shutil

        shutil.rmtree(root)
    D.barrier(rt.dist)
    return resume_dir


def save_training_checkpoint(rt: Runtime, run: RunDir, step: int, *, write_model: Callable[[Path], None],
                             optimizer_state: dict | None, trainer_state: dict, keep_last: int,
                             is_best: bool) -> Path | None:
    """Rank 0 writes checkpoint ``step`` (atomic, hashed, pruned) and redraws the chart; all ranks wait."""
    trainer_state = {**trainer_state, "step": step, "rng": gathered_rng_states(rt)}
    path = None
    if rt.is_main:
        path = C.save_checkpoint(run.ckpt_root, step, write_model=write_model, optimizer_state=optimizer_state,
                                 trainer_state=trainer_state, keep_last=keep_last, is_best=is_best)
        run.plot()
    D.barrier(rt.dist)
    return path


def restore_rng(rt: Runtime, trainer_state: dict) -> None:
    rngs = trainer_state["rng"]
    set_rng_state(rngs[rt.dist.rank] if rt.dist.rank < len(rngs) else rngs[0])


def restore_checkpoint(directory: Path, rt: Runtime, *, load_weights: Callable[[Path], None],
                       load_optimizer: Callable[[dict], None], scaler=None) -> dict:
    """Resume from ``directory`` (from :func:`start_checkpointing`, which verified it): load weights, optimizer
    and scaler state and this rank's RNG state; returns the trainer state (step, the stage's position, keeper)."""
    trainer_state = C.read_trainer_state(directory)
    try:
        load_weights(directory)
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or other shapes
        detail = " ".join(str(e).split())
        raise GptforgeError(f"cannot resume from {directory}: its weights do not fit the model this config builds "
                            f"({detail[:240]}); resume with the model settings the run started with (its "
                            "config.yaml), or start a new run with another --name") from None
    opt_state = C.load_optimizer_state(directory, map_location=rt.device)
    load_optimizer(opt_state["optimizer"])
    if scaler is not None and opt_state.get("scaler"):
        scaler.load_state_dict(opt_state["scaler"])
    restore_rng(rt, trainer_state)
    return trainer_state


def finish_with_best(rt: Runtime, run: RunDir, keeper: BestKeeper, load_weights: Callable[[Path], None],
                     interrupted: bool = False, model: nn.Module | None = None) -> Path:
    """End a fine-tuning run on its best checkpoint (else its newest): load those weights and point ``latest``
    at it, so the run directory resolves to the run's result.

    Under torchrun with ``model`` given, only rank 0 reads the checkpoint (it alone wrote it: other nodes may not
    share its disk) and the weights reach the other ranks by broadcast.
    """
    root = run.ckpt_root
    from_disk = rt.is_main or model is None or not rt.dist.enabled
    name = None
    if from_disk:
        if keeper.best_step is not None:
            name = C.step_dir_name(keeper.best_step)
            C.verify_checkpoint(root / name)
            load_weights(root / name)
            rt.log(f"restored the best weights ({name}, best evaluation {keeper.best})")
        else:
            name = C.find_resume_checkpoint(root).name
    if model is not None and rt.dist.enabled:
        name = D.broadcast_object(name, rt.dist)
        if keeper.best_step is not None:
            D.broadcast_module(model, rt.dist)
    final = root / name
    if rt.is_main and not interrupted:
        C.write_pointer(root, "latest", final.name)
    D.barrier(rt.dist)
    return final


def finished_message(step: int, total: int, knob: str) -> str:
    """What ``--resume`` of a finished run says (it then only re-writes the run's results)."""
    return (f"the run is already finished (step {step} of {total}): nothing left to train; to train longer, raise "
            f"{knob} and --resume again")
