"""Batches of ``(B, T)`` inputs and shifted targets from memory-mapped token shards.

The loader thinks in *global batches*: for optimizer step ``k`` it chooses ``global_batch`` windows of ``T + 1``
tokens, and rank ``r`` of ``world_size`` takes its contiguous slice, consumed as ``grad_accum`` micro-batches.
So the sequences of a step do not depend on how many processes share it (a 2-process run sees the same data
as a 1-process run with the same global batch), ranks never share a window, and the position is just two
integers, which makes resuming exact.

- ``random``: window starts drawn uniformly from every shard, from a generator seeded by ``(seed, step)``.
- ``sequential``: non-overlapping windows in order (shuffled per epoch when ``shuffle``), wrapping into the
  next epoch; ``epoch`` and ``windows_per_epoch`` tell where it is.

Integrity: every shard is checked (header and size, the manifest's sha256 when the manifest lists shards, and
with ``vocab_size`` its largest token id) by :func:`gptforge.data.shards.verify_shard` just before the first
read of it, so only shards a process actually uses are read in full, once per process. Headers are checked
when the loader is built. In ``random`` mode the first batch draws from nearly every shard, so a run fails at
its first step; in ``sequential`` mode a shard is checked when the order first reaches it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptforge.data.shards import list_shards, read_shard, shard_checksums, verify_shard
from gptforge.errors import GptforgeError

__all__ = ["TokenLoader", "validation_windows"]


class TokenLoader:
    """Micro-batches ``(x, y)`` for one rank; see the module docstring for the data order."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, micro_batch: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0, mode: str = "random", shuffle: bool = True,
                 device: str | torch.device = "cpu", vocab_size: int | None = None):
        if mode not in ("random", "sequential"):
            raise GptforgeError(f"data.sampling must be 'random' or 'sequential', got {mode!r}")
        if not 0 <= rank < world_size:
            raise GptforgeError(f"rank {rank} outside world size {world_size}")
        self.paths = list_shards(data_dir, split)
        self.shards = [read_shard(p) for p in self.paths]
        self.vocab_size = vocab_size  # token ids must be < vocab_size (None: not checked)
        self._checksums = shard_checksums(data_dir, split, self.paths)
        self._verified = [False] * len(self.paths)
        self.seq_len, self.micro_batch, self.grad_accum = seq_len, micro_batch, grad_accum
        self.rank, self.world_size, self.seed, self.mode, self.shuffle = rank, world_size, seed, mode, shuffle
        self.device = torch.device(device)
        self.global_batch = micro_batch * grad_accum * world_size
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.num_tokens = int(lengths.sum())
        # random mode: window starts 0 .. len-T-1 in each shard
        self._starts = np.maximum(lengths - seq_len, 0)
        self._starts_cum = np.cumsum(self._starts)
        # sequential mode: non-overlapping windows, (len-1)//T per shard
        self._windows = (np.maximum(lengths - 1, 0)) // seq_len
        self._windows_cum = np.cumsum(self._windows)
        usable = self._starts_cum[-1] if mode == "random" else self._windows_cum[-1]
        if usable <= 0 or (mode == "sequential" and self._windows_cum[-1] < self.global_batch):
            raise GptforgeError(
                f"{split} split of {data_dir} has {self.num_tokens:,} tokens, too few for windows of {seq_len + 1} "
                f"tokens × global batch {self.global_batch}; prepare more data or lower data.seq_len / the batch")
        self.step = 0  # global batches fully consumed
        self.micro = 0  # micro-batches of the current global batch already returned
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    # -- positions ---------------------------------------------------------------------------------
    @property
    def windows_per_epoch(self) -> int:
        """Non-overlapping windows in the split (what one epoch means)."""
        return int(self._windows_cum[-1])

    @property
    def epoch(self) -> float:
        """Fraction of epochs consumed (global windows / windows per epoch)."""
        return (self.step * self.global_batch) / max(1, self.windows_per_epoch)

    def _global_starts(self, step: int) -> list[tuple[int, int]]:
        """(shard, offset) of every window of global batch ``step``."""
        G = self.global_batch
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step])
            flat = rng.integers(0, self._starts_cum[-1], size=G)
            shard = np.searchsorted(self._starts_cum, flat, side="right")
            offset = flat - np.concatenate(([0], self._starts_cum))[shard]
            return list(zip(shard.tolist(), offset.tolist()))
        per_epoch = (self.windows_per_epoch // G) * G  # drop the ragged tail of each epoch
        batches_per_epoch = per_epoch // G
        epoch, in_epoch = divmod(step, batches_per_epoch)
        if epoch != self._order_epoch:
            n = self.windows_per_epoch
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        windows = self._order[in_epoch * G:(in_epoch + 1) * G]
        shard = np.searchsorted(self._windows_cum, windows, side="right")
        offset = (windows - np.concatenate(([0], self._windows_cum))[shard]) * self.seq_len
        return list(zip(shard.tolist(), offset.tolist()))

    # -- batches -------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch for this rank: ``x`` and ``y = x`` shifted by one, both ``(B, T)`` int64."""
        starts = self._global_starts(self.step)
        per_rank = self.micro_batch * self.grad_accum
        lo = self.rank * per_rank + self.micro * self.micro_batch
        mine = starts[lo:lo + self.micro_batch]
        for s, _ in mine:
            if not self._verified[s]:
                verify_shard(self.paths[s], self._checksums.get(self.paths[s].name), self.vocab_size)
                self._verified[s] = True
        chunk = np.stack([self.shards[s][o:o + self.seq_len + 1] for s, o in mine])
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.step = 0, self.step + 1
        return self._to_device(chunk)

    def _to_device(self, chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(chunk.astype(np.int64))
        x, y = t[:, :-1], t[:, 1:]
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x.contiguous(), y.contiguous()

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "seed": self.seed, "mode": self.mode,
                "global_batch": self.global_batch, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken; refuses a state from a different batch layout."""
        for key in ("seed", "mode", "global_batch", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise GptforgeError(
                    f"cannot resume the data loader: checkpoint has {key}={state[key]!r}, this run has "
                    f"{getattr(self, key)!r}; resume with the same data/batch settings as the original run")
        self.step, self.micro = int(state["step"]), int(state["micro"])


def validation_windows(data_dir: str | Path, seq_len: int, max_tokens: int, split: str = "val",
                       vocab_size: int | None = None) -> np.ndarray:
    """A fixed held-out slice: the first ``max_tokens`` tokens of ``split`` cut into ``(N, T + 1)`` windows.

    The same tokens every time (seed 004's test-loss method), so losses are comparable across steps and runs.
    Returns an empty array when the split does not exist. Each shard read is verified first, as in
    :class:`TokenLoader` (``vocab_size``: ids must be below it).
    """
    try:
        paths = list_shards(data_dir, split)
    except GptforgeError:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    checksums = shard_checksums(data_dir, split, paths)
    pieces, have = [], 0
    for p in paths:
        verify_shard(p, checksums.get(p.name), vocab_size)
        shard = read_shard(p)
        take = min(len(shard), max_tokens - have)
        pieces.append(np.asarray(shard[:take], dtype=np.int64))
        have += take
        if have >= max_tokens:
            break
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = (len(tokens) - 1) // seq_len
    if n <= 0:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    # windows overlap by one token so every token after the first is a target exactly once
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx]
