"""The config sections every training stage shares: :class:`OptimConfig` (optimizer and LR schedule),
:class:`TrainCommon` (the common ``train`` keys), :class:`CheckpointConfig`, :class:`LogConfig`, :class:`FineTuneRun`
(the top of every fine-tuning config), the migration of old key spellings and small validation helpers.
:mod:`gptforge.train.core` re-exports them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from gptforge.errors import GptforgeError
from gptforge.precision import PRECISIONS
from gptforge.train.optim import LRSchedule


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for hidden matrices + AdamW for the rest) and the learning-rate schedule
    (section ``optim`` in every stage)."""

    name: str = "adamw"  # adamw | muon (Muon for the 2-D matrices in the blocks, AdamW at lr for the rest)
    lr: float = 6e-4
    min_lr: float | None = None  # default: min_lr_ratio × lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_embeddings: bool = False  # decay embedding tables (and a tied head) too
    decay: str = "matrices"  # matrices: linear weights only | all: every parameter (torch's AdamW default use)
    schedule: str = "cosine"  # cosine | constant | wsd
    warmup_steps: int | None = None  # default: warmup_ratio × total steps
    warmup_ratio: float = 0.0
    decay_ratio: float = 0.2  # wsd: the final fraction of steps spent decaying
    muon_lr: float = 0.02  # Muon's peak LR (the schedule scales it like lr)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton–Schulz iterations
    muon_weight_decay: float = 0.0  # decoupled, times the Muon LR

    def validate(self) -> OptimConfig:
        def bad(key: str, why: str):
            raise GptforgeError(f"optim.{key}={getattr(self, key)!r}: {why}")

        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "must be a finite number > 0")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            bad("min_lr", f"must be in [0, optim.lr={self.lr:g}]")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                bad(key, "must be in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be > 0")
        if self.schedule not in ("cosine", "constant", "wsd"):
            bad("schedule", "must be cosine, constant or wsd")
        if self.decay not in ("matrices", "all"):
            bad("decay", "must be matrices (linear weights only) or all (every parameter)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if not 0 <= self.warmup_ratio <= 1:
            bad("warmup_ratio", "must be in [0, 1]")
        if not 0 <= self.decay_ratio <= 1:
            bad("decay_ratio", "must be in [0, 1]")
        if self.name not in ("adamw", "muon"):
            bad("name", "must be adamw or muon")
        if not (math.isfinite(self.muon_lr) and self.muon_lr > 0):
            bad("muon_lr", "must be a finite number > 0")
        if not 0 <= self.muon_momentum < 1:
            bad("muon_momentum", "must be in [0, 1)")
        if not 1 <= self.muon_ns_steps <= 50:
            bad("muon_ns_steps", "must be in [1, 50]")
        if not (math.isfinite(self.muon_weight_decay) and self.muon_weight_decay >= 0):
            bad("muon_weight_decay", "must be >= 0")
        return self

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr * self.min_lr_ratio

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * total_steps)

    def schedule_for(self, total_steps: int) -> LRSchedule:
        return LRSchedule(self.schedule, self.lr, self.final_lr, self.warmup_for(total_steps), total_steps,
                          self.decay_ratio)


@dataclass
class TrainCommon:
    """The ``train`` keys every stage has; a stage's own ``train`` section extends this."""

    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: see gptforge.precision)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    grad_clip: float | None = 1.0  # max gradient norm; null or 0 = no clipping
    max_nonfinite: int = 10  # stop (with a checkpoint) after this many skipped steps in a row; 0 = never
    nonfinite: str = "skip"  # skip: skip non-finite steps (up to max_nonfinite in a row) | raise: stop at the first

    def validate_common(self) -> None:
        if self.precision not in PRECISIONS:
            raise GptforgeError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise GptforgeError(f"train.grad_clip={self.grad_clip}: must be >= 0 (0 or null: no clipping)")
        if not 0 <= self.seed < 2**63:
            raise GptforgeError(f"train.seed={self.seed}: must be in [0, 2^63)")
        if self.max_nonfinite < 0:
            raise GptforgeError(f"train.max_nonfinite={self.max_nonfinite}: must be >= 0 (0: never stop)")
        if self.nonfinite not in ("skip", "raise"):
            raise GptforgeError(f"train.nonfinite must be skip or raise, got {self.nonfinite!r}")


@dataclass
class CheckpointConfig:
    interval: int = 0  # checkpoint every N steps (0: only at evaluations/the end)
    keep_last: int = 3  # newest checkpoints kept (the best one is always kept)
    resume: bool | str = False  # true: continue the run; "auto": continue when it has a checkpoint
    fallback: bool = False  # resume from the newest *valid* checkpoint when the newest is corrupt
    best_by: str = "val_loss"  # pretrain: val_loss | train_loss_mean (mean training loss since the last checkpoint)

    def validate(self) -> None:
        if self.interval < 0:
            raise GptforgeError(f"checkpoint.interval must be >= 0 (0: only at the end), got {self.interval}")
        if self.keep_last < 1:
            raise GptforgeError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.resume not in (False, True, "auto"):
            raise GptforgeError(f"checkpoint.resume must be true, false or auto, got {self.resume!r}")
        if self.best_by not in ("val_loss", "train_loss_mean"):
            raise GptforgeError(f"checkpoint.best_by must be val_loss or train_loss_mean, got {self.best_by!r}")


@dataclass
class LogConfig:
    progress: bool = True  # progress bar with rate and ETA
    trackers: list[str] = field(default_factory=list)  # tensorboard, mlflow, wandb
    plot: bool = True  # redraw loss.png at checkpoints and at the end


# Old spellings (SFT/classify before the shared sections), kept working for one release.
_LEGACY_TRAIN_TO_OPTIM = ("lr", "weight_decay", "min_lr_ratio", "schedule", "warmup_ratio")


def migrate_legacy_keys(data: dict, stage: str) -> dict:
    """Move SFT/classify's old key spellings to the shared sections, with a deprecation warning each."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    train = data.setdefault("train", {}) if isinstance(data.get("train", {}), dict) else None
    optim = data.setdefault("optim", {}) if isinstance(data.get("optim", {}), dict) else None
    moved = []
    if train is not None:
        for key in ("seed", "device"):
            if key in data and key not in train:
                train[key] = data.pop(key)
                moved.append((key, f"train.{key}"))
        if optim is not None:
            for key in _LEGACY_TRAIN_TO_OPTIM:
                if key in train and key not in optim:
                    optim[key] = train.pop(key)
                    moved.append((f"train.{key}", f"optim.{key}"))
            if "betas" in train:
                betas = train.pop("betas")
                if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
                    raise GptforgeError(f"train.betas must be two numbers like [0.9, 0.95], got {betas!r}")
                optim.setdefault("beta1", betas[0])
                optim.setdefault("beta2", betas[1])
                moved.append(("train.betas", "optim.beta1/optim.beta2"))
        if "log_every" in train:
            train.pop("log_every")
            moved.append(("train.log_every", "nothing (every step is logged)"))
    for old, new in moved:
        warnings.warn(f"{stage}: {old} is deprecated and will be removed in 0.3; use {new}",
                      DeprecationWarning, stacklevel=3)
        print(f"gptforge: warning: {stage}: {old} is deprecated; use {new}")
    return {k: v for k, v in data.items() if v != {} or k not in ("train", "optim")}


def require_at_least_one(section, where: str, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """``where.name >= 1`` for each of ``names``, and for each of ``optional`` unless it is unset (None)."""
    for name in (*names, *optional):
        value = getattr(section, name)
        if (value is not None or name in names) and (value is None or value < 1):
            raise GptforgeError(f"{where}.{name} must be >= 1" + (" (or unset)" if name in optional else "")
                                + f", got {value}")


def migrate_base_key(data: dict, stage: str) -> dict:
    """The base model used to be the top-level ``checkpoint`` key (now the checkpointing section): → ``base``."""
    if isinstance(data.get("checkpoint"), str):
        data = {**data, "base": data["checkpoint"]}
        del data["checkpoint"]
        print(f"gptforge: warning: {stage}: the top-level key checkpoint (the base model) is deprecated; use base")
    return migrate_legacy_keys(data, stage)


@dataclass
class FineTuneRun:
    """The top of every fine-tuning config (``sft``, ``dpo``, ``classify``): the starting model and the run
    directory, the migration of old spellings and the checks they share. A stage subclasses it, sets
    :attr:`STAGE` and adds its sections (``data``, ``train``, ``optim``, ``checkpoint``, ``log``, ``lora``, ...)."""

    STAGE: ClassVar[str] = ""
    base: str = ""  # the model to fine-tune: step dir, run dir or Hugging Face GPT-2 directory (--checkpoint)
    name: str = ""
    out_dir: str = "runs"
    overwrite: bool = False  # start over in a run directory that already has checkpoints
    tokenizer: str | None = None  # only when the checkpoint carries none

    @classmethod
    def migrate(cls, data: dict) -> dict:
        """Old spellings → shared sections (``checkpoint: PATH`` is now ``base``)."""
        return migrate_base_key(data, cls.STAGE)

    def check_run(self, base_needed: str, data_given: bool, data_needed: str, train_keys: tuple[str, ...],
                  train_optional: tuple[str, ...], data_optional: tuple[str, ...]) -> None:
        """The checks before a stage's own: a base model, data, a train/val/test split, positive sizes."""
        if not self.base:
            raise GptforgeError(f"{self.STAGE} needs {base_needed}")
        if not data_given:
            raise GptforgeError(f"{self.STAGE} needs {data_needed}")
        if len(self.data.split) != 3:
            raise GptforgeError(f"data.split takes train/val/test fractions, got {self.data.split}")
        require_at_least_one(self.train, "train", train_keys, train_optional)
        require_at_least_one(self.data, "data", (), data_optional)
        if getattr(self.train, "patience", None) is not None and self.data.split[1] <= 0:
            raise GptforgeError("early stopping (train.patience) needs a validation split: data.split[1] > 0")

    def check_sections(self) -> None:
        """The shared sections' own checks, after the stage's."""
        self.train.validate_common()
        self.optim.validate()
        self.checkpoint.validate()
        self.lora.validate()
