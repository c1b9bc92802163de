"""SFT batches: tokenized examples → padded, length-grouped or packed batches; the deterministic split."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from gptforge.errors import GptforgeError
from gptforge.model import IGNORE_INDEX


@dataclass
class Example:
    """A tokenized conversation; ``labels[i]`` is ``ids[i]`` where supervised, else -100 (not yet shifted)."""

    ids: list[int]
    labels: list[int]
    index: int = -1

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.ids)


def split_indices(n: int, fractions: tuple[float, ...] | list[float], seed: int = 0) -> list[list[int]]:
    """Deterministic shuffled split of ``range(n)`` by ``fractions`` (e.g. 0.85/0.05/0.10)."""
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise GptforgeError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cuts, acc = [], 0.0
    for f in fractions[:-1]:
        acc += f
        cuts.append(round(acc * n))
    bounds = [0, *cuts, n]
    return [sorted(order[bounds[i]: bounds[i + 1]]) for i in range(len(fractions))]


@dataclass
class Batch:
    """Model inputs: ``input_ids``/``targets`` (B, T); packing adds a (B, 1, T, T) mask and position ids."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    example_ids: torch.Tensor | None = None  # which example each position belongs to (-1 = padding)

    @property
    def num_supervised(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(move(self.input_ids), move(self.targets), move(self.attention_mask), move(self.position_ids),
                     move(self.example_ids))


def pad_batch(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example. No attention mask is needed: with right padding and causal
    attention no real token ever sees a pad, and pad positions carry target -100."""
    T = max(len(e) - 1 for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    example_ids = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e) - 1
        input_ids[b, :n] = torch.tensor(e.ids[:-1])
        targets[b, :n] = torch.tensor(e.labels[1:])
        example_ids[b, :n] = b
    return Batch(input_ids, targets, example_ids=example_ids)


def pack_examples(examples: list[Example], window: int) -> list[list[int]]:
    """Best-fit packing of example indices into windows of ``window`` input tokens, in O(n log n):
    each example goes to the open window with the least room that still fits it."""
    import bisect

    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i, e in enumerate(examples):
        n = len(e) - 1
        if n > window:
            raise GptforgeError(f"example {e.index} has {n} tokens, more than the packing window {window}")
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, b = rooms.pop(k)
            bins[b].append(i)
        else:
            room, b = window, len(bins)
            bins.append([i])
        if room - n > 0:
            bisect.insort(rooms, (room - n, b))
    return bins


def pack_batch(rows: list[list[Example]], pad_id: int, window: int | None = None) -> Batch:
    """Several examples per row; attention is blocked across example boundaries and positions restart at 0
    for each example, so every example computes exactly what it would alone."""
    T = window or max(sum(len(e) - 1 for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    example_ids = torch.full((B, T), -1, dtype=torch.long)
    next_id = 0
    for b, row in enumerate(rows):
        pos = 0
        for s, e in enumerate(row):
            n = len(e) - 1
            input_ids[b, pos:pos + n] = torch.tensor(e.ids[:-1])
            targets[b, pos:pos + n] = torch.tensor(e.labels[1:])
            position_ids[b, pos:pos + n] = torch.arange(n)
            segment[b, pos:pos + n] = s
            example_ids[b, pos:pos + n] = next_id
            next_id += 1
            pos += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)  # (B, T, T)
    mask = (same & causal & (segment.unsqueeze(2) >= 0)) | torch.eye(T, dtype=torch.bool)  # pads see themselves
    return Batch(input_ids, targets, mask.unsqueeze(1), position_ids, example_ids)


def length_grouped_order(lengths: list[int], batch_size: int, rng: random.Random, group: int = 64) -> list[list[int]]:
    """Batches of similar length (less padding): shuffle, sort within chunks of ``group`` batches, shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * group
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_batches(examples: list[Example], mode: str, batch_size: int, pad_id: int, window: int, seed: int,
                  shuffle: bool = True) -> list[Batch]:
    """All batches of one epoch (deterministic in ``seed``)."""
    rng = random.Random(seed)
    if mode == "group":
        groups = length_grouped_order([len(e) for e in examples], batch_size, rng)
        return [pad_batch([examples[i] for i in g], pad_id) for g in groups]
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    if mode == "pad":
        return [pad_batch([examples[i] for i in order[s:s + batch_size]], pad_id)
                for s in range(0, len(order), batch_size)]
    if mode == "pack":
        shuffled = [examples[i] for i in order]
        bins = pack_examples(shuffled, window)
        rows = [[shuffled[i] for i in b] for b in bins]
        return [pack_batch(rows[s:s + batch_size], pad_id, window) for s in range(0, len(rows), batch_size)]
    raise GptforgeError(f"unknown batching {mode!r}; use pad, group or pack")
