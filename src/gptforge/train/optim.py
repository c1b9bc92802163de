"""AdamW with sensible parameter groups, and learning-rate schedules.

Weight decay is applied to matrices of linear layers only: biases, LayerNorm weights and embeddings
(token/position tables, and a head tied to the token table) are not decayed unless ``decay_embeddings``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from gptforge.errors import GptforgeError

__all__ = ["LRSchedule", "configure_optimizer", "param_groups", "set_lr"]


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False, decay: str = "matrices"
                 ) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (shared tensors counted once).

    ``decay="all"`` decays every parameter, as ``torch.optim.AdamW(model.parameters(), weight_decay=...)`` does
    (the setup of Raschka's book, and so of seed 004's baseline).
    """
    if decay not in ("matrices", "all"):
        raise GptforgeError(f"optim.decay must be matrices or all, got {decay!r}")
    if decay == "all":
        unique = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        return [{"params": unique, "weight_decay": weight_decay}] if unique else []
    decay: dict[int, nn.Parameter] = {}
    no_decay: dict[int, nn.Parameter] = {}
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, nn.Embedding):
                (decay if decay_embeddings else no_decay)[id(p)] = p
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or pname.endswith("bias") or p.ndim < 2:
                no_decay[id(p)] = p
            else:
                decay[id(p)] = p
    groups = []
    if decay:
        groups.append({"params": list(decay.values()), "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": list(no_decay.values()), "weight_decay": 0.0})
    return groups


def configure_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_embeddings: bool = False,
    decay: str = "matrices",
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters; fused kernel on CUDA, multi-tensor (foreach) otherwise.

    ``fused=None`` picks fused when every parameter lives on a CUDA device.
    """
    groups = param_groups(model, weight_decay, decay_embeddings, decay)
    if not groups:
        raise GptforgeError("configure_optimizer: the model has no trainable parameters (all requires_grad=False); "
                            "unfreeze some parameters before training")
    params = [p for g in groups for p in g["params"]]
    on_cuda = all(p.device.type == "cuda" for p in params)
    if fused is None:
        fused = on_cuda and "fused" in inspect.signature(torch.optim.AdamW).parameters
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


@dataclass
class LRSchedule:
    """Learning rate per optimizer step.

    kind: ``cosine`` (linear warmup, cosine to ``min_lr`` at ``total_steps``), ``constant`` (warmup then flat) or
    ``wsd`` (warmup, stable at ``max_lr``, then linear decay to ``min_lr`` over the last ``decay_ratio`` of the run).
    """

    kind: str = "cosine"
    max_lr: float = 6e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 1
    decay_ratio: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "constant", "wsd"):
            raise GptforgeError(f"unknown LR schedule {self.kind!r}; use one of: cosine, constant, wsd")
        if self.total_steps < 1:
            raise GptforgeError(f"LR schedule total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.decay_ratio <= 1.0:
            raise GptforgeError(f"LR schedule decay_ratio must be in [0, 1], got {self.decay_ratio}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.max_lr
        if step >= self.total_steps:
            return self.min_lr
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.max_lr - self.min_lr)
        # wsd: stable, then linear decay over the final decay_ratio of total_steps
        decay_steps = max(1, round(self.decay_ratio * self.total_steps))
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return self.max_lr
        progress = (step - decay_start + 1) / decay_steps
        return self.max_lr + (self.min_lr - self.max_lr) * min(1.0, progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (groups may carry an ``lr_scale`` multiplier)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
