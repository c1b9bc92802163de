"""Process-group setup for ``torchrun`` (DDP by default, FSDP2 as an option) and small collective helpers.

Launched plainly, everything runs as rank 0 of 1. Under ``torchrun`` the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
variables select the process group: NCCL on CUDA, gloo on CPU. Across nodes two ranks matter: the global rank
(``RANK``) and the rank on this machine (``LOCAL_RANK``). Global rank 0 alone prints and writes run files
(checkpoints, metrics, charts); on every node, local rank 0 fills that machine's caches (downloads of data,
tokenizers and Hub models) while the node's other ranks wait (:func:`per_node_first`), because no node can
rely on another node's disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from gptforge.precision import pick_device


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Rank 0 of this machine: the process that fills the machine's caches."""
        return self.local_rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(requested_device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by ``torchrun``; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """DDP (or FSDP2 ``fully_shard`` per block) around ``model`` when running on more than one process."""
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def no_sync(model: nn.Module, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not last_micro_step and hasattr(model, "no_sync"):
        return model.no_sync()
    if not last_micro_step and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(True)
    return nullcontext()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is set on any rank (used so all ranks stop on the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` (picklable, small: a name, a dict of numbers) on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``model`` in place (ranks on other machines need not
    see rank 0's files)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in model.state_dict().values():
            if torch.is_tensor(t):
                dist.broadcast(t, src=0)


@contextmanager
def per_node_first(info: DistInfo) -> Iterator[None]:
    """Run the block on each node's local rank 0 first, then on that node's other ranks.

    For work whose result lands in a machine-local cache (downloading a hub dataset, a Hub model or a tokenizer):
    every node does it once, on its own disk, instead of every process racing to download the same files, and
    the other ranks then read what their local rank 0 left. All ranks pass one barrier, so every process must
    enter the block; a failure on local rank 0 still releases the others (which then try, and report, themselves).
    """
    if not info.enabled:
        yield
        return
    if not info.is_local_main:
        dist.barrier()  # released once every node's local rank 0 has finished the block
    try:
        yield
    finally:
        if info.is_local_main:
            dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> tuple[dict | None, dict]:
    """Model and optimizer state for a checkpoint: plain for one process/DDP, gathered to full tensors for FSDP.

    Returns ``(model_state or None, optimizer_state)``; ``None`` means "save the bare model as is".
    """
    if strategy != "fsdp" or not (dist.is_available() and dist.is_initialized()):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, strategy: str) -> None:
    if strategy != "fsdp" or not (dist.is_available() and dist.is_initialized()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
