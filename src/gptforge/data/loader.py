"""Batches of ``(B, T)`` inputs and shifted targets from memory-mapped token shards.

The loader thinks in *global batches*: for optimizer step ``k`` it chooses ``global_batch`` windows of ``T + 1``
tokens, and rank ``r`` of ``world_size`` takes its contiguous slice, consumed as ``grad_accum`` micro-batches.
So the sequences of a step do not depend on how many processes share it (a 2-process run sees the same data
as a 1-process run with the same global batch), ranks never share a window, and the position is a couple of
integers, which makes resuming exact.

``data.sampling`` (``mode``):

- ``random``: window starts drawn uniformly, *with replacement*, from every position of every shard, from a
  generator seeded by ``(seed, step)`` (the nanoGPT / speedrun loader). Windows overlap and repeat: after drawing
  as many tokens as the split holds ("one epoch"), about ``1 - 1/e`` ≈ 63% of its tokens have been trained on and
  ~37% never; after ``k`` nominal epochs ``1 - e^-k`` (86% at 2, 95% at 3).
- ``sequential``: the split cut into non-overlapping windows (``(len - 1) // T`` per shard; each shard's ragged
  tail of fewer than ``T`` tokens is never read), walked *without replacement* in an order reshuffled every
  epoch from ``(seed, epoch)``: every window exactly once per epoch, over all ranks together.
- ``in_order``: the same windows in file order (shard by shard), every epoch the same.

For ``sequential`` and ``in_order`` the data is one endless stream (epoch 0's order, then epoch 1's, …) and
global batch ``k`` is its windows ``[k·G, (k+1)·G)``, so a batch may straddle two epochs (and then, rarely, hold
a window from each end of the two orders twice); within an epoch no window repeats, on any rank.

``start_token``: only tokens from this offset of the split (shards concatenated in order) on are used, by every
mode; windows are aligned to it. A run in ``in_order`` mode reports where it stopped (``coverage()["next_token"]``),
so another run can continue on the next unseen tokens with ``data.start_token`` set to it.

Position and resume: the loader counts *windows* consumed (``windows_done``; ``step`` = global batches). A state
from a run with another global batch (batch size, micro-batch or world size changed) is continued at the same
window, i.e. at the same token: :meth:`TokenLoader.load_state_dict` says that it mapped it. (``random`` then
draws from new generator keys, so no earlier draw is replayed.)

Integrity: every shard is checked (header and size, the manifest's sha256 when the manifest lists shards, and
with ``vocab_size`` its largest token id) by :func:`gptforge.data.shards.verify_shard` just before the first
read of it, so only shards a process actually uses are read in full, once per process. Headers are checked
when the loader is built. In ``random`` mode the first batch draws from nearly every shard, so a run fails at
its first step; in ``sequential``/``in_order`` mode a shard is checked when the order first reaches it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptforge.data.shards import list_shards, read_header, read_shard, shard_checksums, verify_shard
from gptforge.errors import GptforgeError

__all__ = ["SAMPLING_MODES", "TokenLoader", "epoch_tokens", "validation_windows"]

SAMPLING_MODES = ("random", "sequential", "in_order")


class _Geometry:
    """Where windows of ``T + 1`` tokens can start, per shard, once the first ``start_token`` tokens are cut."""

    def __init__(self, lengths: np.ndarray, seq_len: int, start_token: int, where: str):
        total = int(lengths.sum())
        if not 0 <= start_token < total:
            raise GptforgeError(f"data.start_token={start_token:,} is outside {where}, which has {total:,} tokens; "
                                f"use an offset in 0..{max(0, total - 1):,}")
        begin = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        self.begin = begin  # offset of each shard in the concatenated split
        self.lo = np.clip(start_token - begin, 0, lengths).astype(np.int64)  # first usable token per shard
        self.avail = (lengths - self.lo).astype(np.int64)
        # random: starts 0 .. avail-T-1 of each shard; sequential/in_order: (avail-1)//T non-overlapping windows
        self.starts = np.maximum(self.avail - seq_len, 0)
        self.starts_cum = np.cumsum(self.starts)
        self.windows = np.maximum(self.avail - 1, 0) // seq_len
        self.windows_cum = np.cumsum(self.windows)


def epoch_tokens(data_dir: str | Path, split: str, seq_len: int, start_token: int = 0) -> int:
    """Tokens one epoch of ``sequential``/``in_order`` sampling trains on: whole windows × ``seq_len``.

    From the shard headers only (nothing is read in full); what ``train.epochs`` is counted in.
    """
    lengths = np.array([read_header(p)[1] for p in list_shards(data_dir, split)], dtype=np.int64)
    geo = _Geometry(lengths, seq_len, start_token, f"the {split} split of {data_dir}")
    return int(geo.windows_cum[-1]) * seq_len


class TokenLoader:
    """Micro-batches ``(x, y)`` for one rank; see the module docstring for the data order.

    ``mode="sequential", shuffle=False`` is the older spelling of ``mode="in_order"``.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, micro_batch: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0, mode: str = "random", shuffle: bool = True,
                 device: str | torch.device = "cpu", vocab_size: int | None = None, start_token: int = 0):
        if mode == "sequential" and not shuffle:
            mode = "in_order"
        if mode not in SAMPLING_MODES:
            raise GptforgeError(f"data.sampling must be one of {', '.join(SAMPLING_MODES)}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise GptforgeError(f"rank {rank} outside world size {world_size}")
        self.paths = list_shards(data_dir, split)
        self.shards = [read_shard(p) for p in self.paths]
        self.vocab_size = vocab_size  # token ids must be < vocab_size (None: not checked)
        self._checksums = shard_checksums(data_dir, split, self.paths)
        self._verified = [False] * len(self.paths)
        self.seq_len, self.micro_batch, self.grad_accum = seq_len, micro_batch, grad_accum
        self.rank, self.world_size, self.seed, self.mode = rank, world_size, seed, mode
        self.shuffle = mode == "sequential"
        self.start_token = int(start_token)
        self.device = torch.device(device)
        self.global_batch = micro_batch * grad_accum * world_size
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.num_tokens = int(lengths.sum())
        self._geo = _Geometry(lengths, seq_len, self.start_token, f"the {split} split of {data_dir}")
        usable = self._geo.starts_cum[-1] if mode == "random" else self._geo.windows_cum[-1]
        if usable <= 0 or (mode != "random" and self._geo.windows_cum[-1] < self.global_batch):
            after = f" after data.start_token={self.start_token:,}" if self.start_token else ""
            raise GptforgeError(
                f"{split} split of {data_dir} has {int(self._geo.avail.sum()):,} tokens{after}, too few for windows "
                f"of {seq_len + 1} tokens × global batch {self.global_batch}; prepare more data or lower "
                "data.seq_len / the batch")
        self.windows_done = 0  # windows of the stream consumed by completed global batches (all ranks)
        self.micro = 0  # micro-batches of the current global batch already returned
        # where the current global batch size took over (a resume with another batch); 0, 0 for a fresh run
        self._origin, self._origin_step = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    # -- positions ---------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Global batches fully consumed."""
        return self._origin_step + (self.windows_done - self._origin) // self.global_batch

    @step.setter
    def step(self, value: int) -> None:
        self.windows_done = self._origin + (int(value) - self._origin_step) * self.global_batch

    @property
    def windows_per_epoch(self) -> int:
        """Non-overlapping windows in the split from ``start_token`` on (what one epoch means)."""
        return int(self._geo.windows_cum[-1])

    @property
    def epoch(self) -> float:
        """Fraction of epochs consumed (global windows / windows per epoch)."""
        return self.windows_done / max(1, self.windows_per_epoch)

    @property
    def tokens_consumed(self) -> int:
        """Target tokens of every completed global batch, over all ranks (``windows_done × T``)."""
        return self.windows_done * self.seq_len

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)
        return self._orders[epoch]

    def _stream(self, position: int, count: int) -> np.ndarray:
        """Window ids at ``position .. position + count`` of the endless epoch-after-epoch stream."""
        epoch, index = np.divmod(np.arange(position, position + count, dtype=np.int64), self.windows_per_epoch)
        if self.mode == "in_order":
            return index
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epoch).tolist():
            mask = epoch == e
            out[mask] = self._order(e)[index[mask]]
        return out

    def _locate(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset within the shard) of non-overlapping window ids."""
        g = self._geo
        shard = np.searchsorted(g.windows_cum, windows, side="right")
        offset = g.lo[shard] + (windows - np.concatenate(([0], g.windows_cum))[shard]) * self.seq_len
        return shard, offset

    def _random_starts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset) of every window of global batch ``step`` in ``random`` mode."""
        g = self._geo
        # a fresh run keys by (seed, step) as it always has; after a change of batch size the keys also carry the
        # window where the new size took over, so no earlier draw is replayed
        key = [self.seed, step] if self._origin == 0 else [self.seed, step, self._origin]
        flat = np.random.default_rng(key).integers(0, g.starts_cum[-1], size=self.global_batch)
        shard = np.searchsorted(g.starts_cum, flat, side="right")
        offset = g.lo[shard] + flat - np.concatenate(([0], g.starts_cum))[shard]
        return shard, offset

    # -- batches -------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch for this rank: ``x`` and ``y = x`` shifted by one, both ``(B, T)`` int64."""
        per_rank = self.micro_batch * self.grad_accum
        lo = self.rank * per_rank + self.micro * self.micro_batch
        if self.mode == "random":
            shard, offset = self._random_starts(self.step)
            shard, offset = shard[lo:lo + self.micro_batch], offset[lo:lo + self.micro_batch]
        else:
            shard, offset = self._locate(self._stream(self.windows_done + lo, self.micro_batch))
        mine = list(zip(shard.tolist(), offset.tolist()))
        for s, _ in mine:
            if not self._verified[s]:
                verify_shard(self.paths[s], self._checksums.get(self.paths[s].name), self.vocab_size)
                self._verified[s] = True
        chunk = np.stack([self.shards[s][o:o + self.seq_len + 1] for s, o in mine])
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.windows_done = 0, self.windows_done + self.global_batch
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

    # -- coverage ------------------------------------------------------------------------------------
    def coverage(self) -> dict:
        """How much of the data the completed global batches trained on (all ranks together).

        ``distinct_tokens`` counts target tokens (``T`` per window, as ``tokens`` does). Exact for ``sequential``
        and ``in_order`` (each epoch is a permutation of the same windows: ``min(windows, per epoch) × T``); for
        ``random`` the expected value over the draws (``exact`` false), computed per shard from how many window
        starts cover each position: after ``N`` draws among ``S`` starts a position covered by ``c`` of them is
        unseen with probability ``(1 - c/S)^N``. ``next_token`` (``in_order`` within its first epoch): the split
        offset of the next unseen window, for ``data.start_token``.
        """
        g, T, n = self._geo, self.seq_len, self.windows_done
        info = {"sampling": self.mode, "start_token": self.start_token, "tokens": n * T,
                "epochs": n / max(1, self.windows_per_epoch), "next_token": None}
        if self.mode != "random":
            info.update(distinct_tokens=min(n, self.windows_per_epoch) * T, exact=True,
                        available_tokens=self.windows_per_epoch * T)
            if self.mode == "in_order" and n < self.windows_per_epoch:
                shard, offset = self._locate(np.array([n]))
                info["next_token"] = int(g.begin[shard[0]] + offset[0])
            return info
        S = int(g.starts_cum[-1])
        expected, available = 0.0, 0
        for avail, starts in zip(g.avail.tolist(), g.starts.tolist()):
            if starts <= 0:
                continue
            available += avail - 1  # targets: every token of the shard but its first
            # position t (1..avail-1) is a target of min(t, T, starts, avail - t) starts; count positions per value
            K = min(T, starts)
            k = np.arange(1, K + 1, dtype=np.float64)
            at_least = np.maximum(0.0, avail - 2 * k + 1)  # positions with min(t, avail - t) >= k
            count = at_least - np.append(at_least[1:], 0.0)  # positions covered by exactly k starts (k = K: ≥)
            if n:
                with np.errstate(divide="ignore"):  # k = S (a tiny split): log1p(-1) = -inf, unseen 0
                    unseen = np.exp(n * np.log1p(-k / S))
                expected += float((count * (1.0 - unseen)).sum())
        info.update(distinct_tokens=round(min(expected, n * T)), exact=False, available_tokens=available)
        return info

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "windows": self.windows_done, "seed": self.seed,
                "mode": self.mode, "global_batch": self.global_batch, "seq_len": self.seq_len,
                "start_token": self.start_token, "origin": self._origin, "origin_step": self._origin_step}

    def load_state_dict(self, state: dict) -> dict | None:
        """Continue exactly where ``state`` was taken. Returns ``None``, or when ``state`` came from another global
        batch size, what was mapped: ``{"step", "windows", "tokens", "from_global_batch", "to_global_batch"}``
        (the position is kept in windows, so the run continues at the same token). Other changes (seed,
        sampling, sequence length, start token) are refused."""
        defaults = {"start_token": 0}
        for key in ("seed", "mode", "seq_len", "start_token"):
            have = state.get(key, defaults.get(key, getattr(self, key)))
            if have != getattr(self, key):
                raise GptforgeError(
                    f"cannot resume the data loader: checkpoint has {key}={have!r}, this run has "
                    f"{getattr(self, key)!r}; resume with the same data settings as the original run "
                    "(data.sampling, data.seq_len, data.start_token, train.seed)")
        old_batch = int(state.get("global_batch", self.global_batch))
        step, micro = int(state["step"]), int(state["micro"])
        windows = int(state.get("windows", step * old_batch))  # older checkpoints: position = step × batch
        if old_batch == self.global_batch:
            self._origin, self._origin_step = int(state.get("origin", 0)), int(state.get("origin_step", 0))
            self.windows_done, self.micro = windows, micro
            return None
        if micro:
            raise GptforgeError(f"cannot resume the data loader with another global batch ({old_batch} → "
                                f"{self.global_batch} sequences) from the middle of a step; resume with "
                                f"the original batch until the next checkpoint")
        self.windows_done, self.micro = windows, 0
        self._origin, self._origin_step = windows, step
        return {"step": step, "windows": windows, "tokens": windows * self.seq_len,
                "from_global_batch": old_batch, "to_global_batch": self.global_batch}


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
