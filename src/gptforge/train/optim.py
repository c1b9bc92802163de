"""AdamW with sensible parameter groups, Muon for hidden matrices, and learning-rate schedules.

Weight decay is applied to matrices of linear layers only: biases, LayerNorm weights and embeddings
(token/position tables, and a head tied to the token table) are not decayed unless ``decay_embeddings``.

:class:`MuonAdamW` (``optim.name: muon``) updates the 2-D matrices inside the transformer blocks with Muon
(momentum, then Newton–Schulz orthogonalisation: Keller Jordan's optimizer, as in modded-nanogpt and
``torch.optim.Muon``) and everything else — embeddings, the LM head, norm gains, biases — with AdamW, in one
``torch.optim.Optimizer``: one ``state_dict`` for checkpoints, one ``param_groups`` list for :func:`set_lr` (the Muon
group carries ``lr_scale = muon_lr / lr``, so the schedule moves both), one object for the fp16 grad scaler and
FSDP's state-dict helpers.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from gptforge.errors import GptforgeError

__all__ = ["LRSchedule", "MuonAdamW", "configure_muon", "configure_optimizer", "is_hidden_matrix", "param_groups",
           "set_lr", "zeropower_via_newtonschulz"]


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


# ---- Muon -----------------------------------------------------------------------------------------------------

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero that still converges
_HIDDEN = re.compile(r"(^|\.)transformer\.h\.\d+\.")


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (attention and MLP projections): what Muon updates."""
    return p.ndim == 2 and _HIDDEN.search(name) is not None


def zeropower_via_newtonschulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                               eps: float = 1e-7) -> torch.Tensor:
    """Approximately U·Vᵀ for ``g = U·S·Vᵀ`` (every singular value pushed towards 1) by ``steps`` quintic
    Newton–Schulz iterations in ``dtype``; the same operations as ``torch.optim.Muon``, so in bf16 the same bits."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide orientation: X·Xᵀ is the smaller Gram matrix
        x = x.T
    x = x.div(x.norm().clamp(min=eps))  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the param groups with ``kind="muon"`` (2-D hidden matrices), AdamW for ``kind="adamw"`` groups.

    Muon, per matrix W (shape out × in) with gradient G and momentum buffer B (as ``torch.optim.Muon``):
    ``B ← μ·B + (1−μ)·G``; ``U = (1−μ)·G + μ·B`` with Nesterov, else ``B``; ``O = NS(U)``;
    ``W ← W·(1 − lr·wd) − lr·sqrt(max(1, out/in))·O``. AdamW as ``torch.optim.AdamW`` (decoupled decay, bias
    correction). ``ns_dtype``: the Newton–Schulz precision (bf16 on GPUs, as everyone; fp32 where given, e.g. on CPUs
    so that 1 and N processes agree to the last bit, which bf16 rounding of slightly different sums would not).

    Under FSDP2 a sharded matrix is gathered for the orthogonalisation (NS needs the whole matrix) and each rank
    keeps its own shard of the result; with DDP every rank orthogonalises the same all-reduced gradient.
    """

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.bfloat16):
        for g in groups:
            if g.get("kind") not in ("muon", "adamw"):
                raise ValueError(f"every MuonAdamW param group needs kind muon or adamw, got {g.get('kind')!r}")
            if g["kind"] == "muon" and any(p.ndim != 2 for p in g["params"]):
                raise ValueError("Muon updates 2-D matrices only")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0.0, "momentum": momentum,
                    "nesterov": nesterov, "ns_steps": ns_steps}
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer``'s, refusing state saved by another optimizer (another ``optim.name``)."""
        saved = [g.get("kind") for g in state_dict.get("param_groups", [])]
        if saved != [g["kind"] for g in self.param_groups]:
            raise GptforgeError(f"the checkpoint's optimizer state has groups {saved}, not this Muon optimizer's "
                                f"{[g['kind'] for g in self.param_groups]}: the run was saved with another optim.name "
                                "or other trainable parameters; resume with the settings the run started with "
                                "(its config.yaml)")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            update = self._orthogonalise(update, group["ns_steps"])
            rows, cols = p.shape[:2]
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def _orthogonalise(self, update: torch.Tensor, steps: int) -> torch.Tensor:
        if hasattr(update, "full_tensor"):  # an FSDP2 shard (DTensor): orthogonalise the whole matrix
            from torch.distributed.tensor import distribute_tensor

            full = zeropower_via_newtonschulz(update.full_tensor(), steps, self.ns_dtype)
            return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
        return zeropower_via_newtonschulz(update, steps, self.ns_dtype)

    def _adamw_group(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = float(state["step"])
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def configure_muon(
    model: nn.Module,
    *,
    lr: float,
    muon_lr: float = 0.02,
    weight_decay: float = 0.1,
    muon_weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    decay_embeddings: bool = False,
    decay: str = "matrices",
    ns_dtype: torch.dtype | None = None,
) -> MuonAdamW:
    """:class:`MuonAdamW` over ``model``: Muon (at ``muon_lr``) for the 2-D matrices inside transformer blocks, AdamW
    (at ``lr``, with :func:`param_groups`' decay split) for the rest. ``ns_dtype=None``: bf16 when every parameter is
    on a GPU, else fp32."""
    hidden = {id(p): p for name, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(name, p)}
    adamw = []
    for g in param_groups(model, weight_decay, decay_embeddings, decay):
        rest = [p for p in g["params"] if id(p) not in hidden]
        if rest:
            adamw.append({**g, "params": rest, "kind": "adamw"})
    if not hidden and not adamw:
        raise GptforgeError("configure_optimizer: the model has no trainable parameters (all requires_grad=False); "
                            "unfreeze some parameters before training")
    groups = adamw + ([{"params": list(hidden.values()), "kind": "muon", "lr": muon_lr, "lr_scale": muon_lr / lr,
                        "weight_decay": muon_weight_decay}] if hidden else [])
    if ns_dtype is None:
        on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
        ns_dtype = torch.bfloat16 if on_cuda else torch.float32
    return MuonAdamW(groups, lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                     ns_dtype=ns_dtype)


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
