"""Preference losses on pair batches: summed answer log-probs, the DPO / IPO / SimPO losses, and their metrics.

A pair batch holds ``2B`` rows, the ``B`` chosen sequences then the ``B`` rejected ones, right-padded; targets are
-100 everywhere but on the answer tokens (:mod:`gptforge.data.preferences`). With ``π`` the policy's and ``ρ`` the
reference's summed answer log-probs, ``|y|`` the answer's token count, ``w``/``l`` chosen/rejected, ``σ`` the
logistic function and ``ε`` the label smoothing:

- ``sigmoid`` — DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7), with the conservative-DPO
  label smoothing of Mitchell (2023) as TRL writes it:
  ``h = (π_w − ρ_w) − (π_l − ρ_l)``, ``loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)``;
- ``ipo`` — IPO (Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", Eq. 17; ``β`` is the paper's τ), on per-token log-ratios as TRL computes it (the form the
  authors' results use): ``h = (π_w − ρ_w)/|y_w| − (π_l − ρ_l)/|y_l|``, ``loss = (h − 1/(2β))²``;
- ``simpo`` — SimPO, reference-free (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
  Reference-Free Reward", Eq. 6): ``h = β·π_w/|y_w| − β·π_l/|y_l| − γ``,
  ``loss = −(1−ε)·log σ(h) − ε·log σ(−h)`` (ε = 0 is the paper's loss; TRL's CPO trainer smooths it the same way).

Rewards (logged as TRL logs them): ``β·(π − ρ)`` for sigmoid and IPO, ``β·π/|y|`` for SimPO; a pair is
"accurate" when the chosen reward is strictly higher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from gptforge.data.batching import pad_batch
from gptforge.data.preferences import EncodedPair
from gptforge.errors import GptforgeError
from gptforge.model import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "simpo")

# the per-pair quantities summed into a step's (or an evaluation's) metrics, in this order
_SUMS = ("loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies", "logps_chosen",
         "logps_rejected", "logps_accuracy")


@dataclass
class DPOLossConfig:
    """Section ``dpo``: the preference loss."""

    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    beta: float = 0.1  # DPO's β (IPO: τ; SimPO: β, 2.0-2.5 in the paper)
    label_smoothing: float = 0.0  # sigmoid and simpo: probability that a label is flipped (cDPO), in [0, 0.5)
    simpo_gamma: float = 0.5  # SimPO's target reward margin γ
    precompute_ref: bool = False  # reference log-probs computed once before training: no second model in memory

    def validate(self) -> DPOLossConfig:
        if self.loss_type not in LOSS_TYPES:
            raise GptforgeError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0 and self.beta < float("inf")):
            raise GptforgeError(f"dpo.beta must be a finite number > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise GptforgeError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type == "ipo":
            raise GptforgeError("dpo.label_smoothing applies to the sigmoid and simpo losses, not to ipo")
        if self.simpo_gamma < 0:
            raise GptforgeError(f"dpo.simpo_gamma must be >= 0, got {self.simpo_gamma}")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"


@dataclass
class PairBatch:
    """``B`` pairs as one ``(2B, T)`` batch: chosen rows first, then rejected; optional reference log-probs
    ``(2B,)`` in the same order."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    ref_logps: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device) -> PairBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return PairBatch(move(self.input_ids), move(self.targets), move(self.ref_logps))


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> PairBatch:
    """Pad the chosen and rejected sides of ``pairs`` together (right padding, targets -100 on pads)."""
    b = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    ref = None
    if pairs and pairs[0].ref_chosen is not None:
        ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32)
    return PairBatch(b.input_ids, b.targets, ref)


def sequence_logps(model, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-prob of the supervised targets, their count)`` per row, in float32."""
    logits, _ = model(input_ids)
    n, t = targets.shape
    token_logps = -F.cross_entropy(logits.float().reshape(n * t, -1), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none").view(n, t)
    return token_logps.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def preference_loss(cfg: DPOLossConfig, chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_len,
                    rejected_len) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ``(losses, chosen rewards, rejected rewards)``; see the module docstring for the formulas."""
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss_type == "simpo":
        chosen_rewards = beta * chosen_logps / chosen_len
        rejected_rewards = beta * rejected_logps / rejected_len
        h = chosen_rewards - rejected_rewards - cfg.simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        return losses, chosen_rewards.detach(), rejected_rewards.detach()
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen, rejected_logps - ref_rejected
    if cfg.loss_type == "sigmoid":
        h = chosen_ratio - rejected_ratio
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif cfg.loss_type == "ipo":
        h = chosen_ratio / chosen_len - rejected_ratio / rejected_len
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise GptforgeError(f"unknown dpo.loss_type {cfg.loss_type!r}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def pair_forward(model, batch: PairBatch, cfg: DPOLossConfig, ref_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the pair batch: per-pair losses ``(B,)`` and the detached per-pair metric rows
    ``(B, len(_SUMS))``. Reference log-probs come from the batch (precomputed) or from ``ref_model``."""
    logps, lengths = sequence_logps(model, batch.input_ids, batch.targets)
    b = batch.n_pairs
    ref = None
    if cfg.needs_reference:
        if batch.ref_logps is not None:
            ref = batch.ref_logps.to(logps.device, torch.float32)
        elif ref_model is not None:
            with torch.no_grad():
                ref, _ = sequence_logps(ref_model, batch.input_ids, batch.targets)
        else:
            raise GptforgeError(f"the {cfg.loss_type} loss needs reference log-probs: a reference model or "
                                "precomputed values")
    lengths = lengths.to(logps.dtype)
    losses, rc, rr = preference_loss(cfg, logps[:b], logps[b:], None if ref is None else ref[:b],
                                     None if ref is None else ref[b:], lengths[:b], lengths[b:])
    lc, lr = logps[:b].detach(), logps[b:].detach()
    rows = torch.stack([losses.detach(), rc, rr, rc - rr, (rc > rr).to(rc.dtype), lc, lr, (lc > lr).to(lc.dtype)],
                       dim=1)
    return losses, rows.double()


def summarize(rows: list[torch.Tensor], dist_info=None, prefix: str = "", device=None) -> dict:
    """Means over every pair of ``rows`` (all processes summed): ``loss``, ``rewards_chosen``,
    ``rewards_rejected``, ``rewards_margins``, ``rewards_accuracies``, ``logps_chosen``, ``logps_rejected``,
    ``logps_accuracy``, each with ``prefix``."""
    from gptforge.train.distributed import all_reduce_sum

    device = rows[0].device if rows else (device or torch.device("cpu"))
    sums = torch.zeros(len(_SUMS) + 1, dtype=torch.float64, device=device)
    for r in rows:
        sums[:-1] += r.sum(0)
        sums[-1] += r.shape[0]
    if dist_info is not None:
        all_reduce_sum(sums, dist_info)
    n = max(float(sums[-1]), 1.0)
    return {f"{prefix}{k}": float(v) / n for k, v in zip(_SUMS, sums[:-1].tolist())}


@torch.no_grad()
def evaluate_pairs(model, pairs: list[EncodedPair], cfg: DPOLossConfig, batch_size: int, pad_id: int, device,
                   autocast, ref_model=None, dist_info=None, prefix: str = "val_") -> dict:
    """The loss and metrics of :func:`summarize` over ``pairs`` in evaluation mode (this process's share under
    ``torchrun``, reduced over the processes)."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))  # similar lengths: less padding
    if dist_info is not None and dist_info.enabled:
        order = order[dist_info.rank::dist_info.world_size]
    was_training = model.training
    model.eval()
    rows = []
    for s in range(0, len(order), batch_size):
        batch = pair_batch([pairs[i] for i in order[s:s + batch_size]], pad_id).to(device)
        with autocast:
            _, r = pair_forward(model, batch, cfg, ref_model)
        rows.append(r)
    model.train(was_training)
    return summarize(rows, dist_info, prefix, device)


@torch.no_grad()
def compute_reference_logps(model, pairs: list[EncodedPair], batch_size: int, pad_id: int, device, autocast,
                            dist_info=None) -> torch.Tensor:
    """Summed answer log-probs ``(N, 2)`` (chosen, rejected) of ``pairs`` under ``model`` in evaluation mode;
    under ``torchrun`` each process scores a share and the results are summed into every process."""
    from gptforge.train.distributed import all_reduce_sum

    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    if dist_info is not None and dist_info.enabled:
        order = order[dist_info.rank::dist_info.world_size]
    was_training = model.training
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = pair_batch([pairs[i] for i in idx], pad_id).to(device)
        with autocast:
            logps, _ = sequence_logps(model, batch.input_ids, batch.targets)
        logps = logps.float().double()
        out[idx, 0], out[idx, 1] = logps[:len(idx)], logps[len(idx):]
    model.train(was_training)
    if dist_info is not None:
        all_reduce_sum(out, dist_info)
    return out.cpu()
