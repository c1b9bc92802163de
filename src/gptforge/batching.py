"""Continuous batching: a running batch that new prompts join between decode steps and finished rows leave.

The server's default way to batch (``gptforge serve --batching continuous``). :class:`ContinuousBatch` drives an
:class:`gptforge.engine.Engine`'s model with its own KV-cache layout; row bookkeeping, sampling, stop handling,
text and callbacks are the engine's (:meth:`Engine._sample`), so a prompt gets the same tokens here as from
:meth:`Engine.generate`, alone or in a static batch.
"""

from __future__ import annotations

import copy

import torch

from gptforge.engine import Engine, OnFinish, OnLogprob, OnToken, SamplingParams, _Row
from gptforge.errors import GptforgeError
from gptforge.model import KVCache
from gptforge.sampling import row_settings


class _Prefill:
    """Rows whose prompts are being read into their own KV cache, left-padded to a common width, in chunks."""

    def __init__(self, engine: Engine, rows: list[_Row], budget: int):
        self.rows = rows
        self.width = max(len(r.prompt) for r in rows)
        self.chunk = max(1, budget // len(rows))  # columns per step: about ``budget`` tokens of work per step
        self.done = 0  # columns already in the cache
        idx = torch.full((len(rows), self.width), engine._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), self.width), dtype=torch.long)
        for b, r in enumerate(rows):
            idx[b, self.width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[b, self.width - len(r.prompt):] = 1
        self.idx, self.mask = idx.to(engine.device), mask.to(engine.device)
        self.cache = engine._new_cache(len(rows), self.width)


class ContinuousBatch:
    """A running batch for serving: rows join between decode steps and leave as soon as they finish.

    Layout: the running rows share one KV cache, each *right-aligned*: every row's tokens end at the same column
    (the batch's ``length``), with left padding before them that the attention mask zeroes out. The model needs
    nothing new: its positions count real tokens (the mask's cumulative sum) and its attention skips padding,
    so each row has its own positions and its own length while the cache keeps one write column. The cache is
    preallocated with room for more rows than run (slots); running row ``i`` lives in slot ``i``:

    - a row that finishes leaves at once: the last slot's row moves into its slot (one row copied);
    - a row whose prompt is read joins in the next free slot, its keys/values copied to end at ``length``
      (one row copied) — if its prompt is longer than ``length``, or no slot or column is free, the cache is
      rebuilt instead (re-padded): every row copied to end at the longest row's length, which drops the columns
      that are padding in every row, so the cache never needs more than the model's context.

    New rows wait in :attr:`waiting`, then are prefilled together in a group of about ``prefill_chunk`` padded
    tokens, one chunk of that size per :meth:`step` (between two decode steps of the running rows), so a long
    prompt delays the running rows by one chunk at a time. When its prompt is read, a row's first token is
    sampled and it joins the running batch. Sampling, stop handling, text and callbacks are
    :meth:`Engine._sample`'s, exactly as in :meth:`Engine.generate`, so a row's tokens do not depend on the batch.

    Not thread-safe: one thread adds, cancels and steps (the server's engine worker, holding ``engine.lock``).
    """

    def __init__(self, engine: Engine, prefill_chunk: int = 128, max_rows: int = 16):
        if prefill_chunk < 1:
            raise GptforgeError(f"prefill_chunk must be ≥ 1, got {prefill_chunk}")
        self.engine = engine
        self.prefill_chunk = prefill_chunk
        self.max_rows = max_rows  # slots allocated up front (more when more rows run)
        self.waiting: list[_Row] = []  # added, not yet prefilling
        self.group: _Prefill | None = None  # being prefilled
        self.steps = 0  # calls to step()
        self.groups = 0  # prefill groups completed
        self.rebuilds = 0  # times the cache was re-padded
        self._reset()

    def _reset(self) -> None:
        self.running: list[_Row] = []  # decoding; row i in slot i
        self.length = 0  # the common write column: every running row's cached tokens end here
        self.store: KVCache | None = None  # (n_layer, slots, heads, columns, head_dim)
        self.mask = self.pending = self.seen = self.counts = None  # per slot: (slots, columns), (slots,), (slots, V)
        self.settings = None  # sampling settings of the running rows

    @property
    def rows(self) -> int:
        """Rows added and not finished: waiting, prefilling or decoding."""
        return len(self.waiting) + (len(self.group.rows) if self.group else 0) + len(self.running)

    @property
    def prefilling(self) -> int:
        """Rows added whose prompts are not read yet."""
        return len(self.waiting) + (len(self.group.rows) if self.group else 0)

    def add(self, keys: list, prompts: list[str | list[int]], params: list[SamplingParams],
            on_token: OnToken | None = None, on_finish: OnFinish | None = None,
            on_logprob: OnLogprob | None = None) -> None:
        """Queue prompts to join the batch; callbacks get the prompt's key where ``generate`` passes an index.
        All or nothing: a :class:`GptforgeError` (bad settings, a prompt that does not fit) adds none."""
        rows = []
        for position, (key, prompt, p) in enumerate(zip(keys, prompts, params, strict=True)):
            row = self.engine._new_row(key, prompt, p.validate(), position)
            row.on_token, row.on_finish, row.on_logprob = on_token, on_finish, on_logprob
            row.track_text = on_token is not None or bool(p.stop_strings)
            row.generator = self.engine._generator(p.seed) if p.temperature > 0 else None
            rows.append(row)
        self.waiting.extend(rows)

    def cancel(self, key) -> bool:
        """Finish the row ``key`` as cancelled if it has not started decoding (a decoding row is cancelled by its
        ``on_token`` returning False). Returns whether it was found."""
        for row in self.waiting + (self.group.rows if self.group else []):
            if row.index == key:
                if row in self.waiting:
                    self.waiting.remove(row)
                else:  # a group still reading between two steps is one long prompt (see _start_group); should
                    # it hold more, the others go back to the front of the queue and are read again
                    self.waiting[:0] = [r for r in self.group.rows if r is not row]
                    self.group = None
                row.finish = "cancelled"
                if row.on_finish is not None:
                    row.on_finish(row.index, self.engine._completion(row))
                return True
        return False

    def clear(self) -> None:
        """Forget every row (after a failure); callbacks are not called."""
        self.waiting, self.group = [], None
        self._reset()

    def step(self) -> int:
        """One decode step for the running rows and one prefill chunk for the joining ones; returns the number
        of tokens generated."""
        model = self.engine.model
        with torch.inference_mode():
            if not model.training:  # the usual case: switching modes walks every module, each step
                return self._step()
            model.eval()
            try:
                return self._step()
            finally:
                model.train(True)

    # ---- one step ---------------------------------------------------------------------------------------

    def _step(self) -> int:
        if self.group is None and self.waiting:
            self._start_group()
        produced = 0
        if self.running:
            produced += self._decode()
        if self.group is not None:
            joined = self._prefill()
            if joined is not None:
                group, chosen, keep = joined
                produced += len(group.rows)
                self._join(group, chosen, keep)
        self.steps += 1
        return produced

    def _decode(self) -> int:
        """Feed every running row its pending token, sample the next, let finished rows leave."""
        if self.length >= self.store.max_len:  # out of columns: re-pad (drops the padding common to all rows)
            self._rebuild([], None)
        B, L = len(self.running), self.length
        self.mask[:B, L] = 1
        # The model sees a view: the running rows' slots, from the first column any of them uses (the columns
        # before are padding in every row: leaving them out changes no position and no attention weight).
        first = L - max(self._cached(r) for r in self.running)
        cache = copy.copy(self.store)  # writes through the view land in the store
        cache.k, cache.v, cache.length = self.store.k[:, :B, :, first:], self.store.v[:, :B, :, first:], L - first
        logits = self.engine.model(self.pending[:B, None], attention_mask=self.mask[:B, first : L + 1],
                                   kv_cache=cache)[0][:, -1]
        self.length = L + 1
        seen = self.seen[:B] if self.seen is not None else None
        counts = self.counts[:B] if self.counts is not None else None
        chosen, keep = self.engine._sample(logits, self.running, self.settings, seen, counts)
        self.pending[:B] = chosen
        rows = torch.arange(B, device=chosen.device)
        if seen is not None:
            seen[rows, chosen] = True
        if counts is not None:
            counts[rows, chosen] += 1
        if len(keep) < B:
            kept = set(keep)
            for j in reversed(range(B)):  # from the end, so the last slot's row is always a running one
                if j not in kept:
                    self._move(len(self.running) - 1, j)
                    self.running[j] = self.running[-1]
                    self.running.pop()
            self._settings_changed()
        return B

    def _move(self, src: int, dst: int) -> None:
        """Slot ``src``'s row into slot ``dst`` (its cached tokens, mask, pending token, penalty state)."""
        if src == dst:
            return
        n = self._cached(self.running[src])
        L = self.length
        self.store.k[:, dst, :, L - n:L] = self.store.k[:, src, :, L - n:L]
        self.store.v[:, dst, :, L - n:L] = self.store.v[:, src, :, L - n:L]
        for t in (self.mask, self.pending, self.seen, self.counts):
            if t is not None:
                t[dst] = t[src]

    @staticmethod
    def _cached(row: _Row) -> int:
        return len(row.prompt) + len(row.ids) - 1  # the last id is pending: fed at the next step

    def _start_group(self) -> None:
        """Take waiting rows, oldest first, while their padded prompts fit ``prefill_chunk`` tokens (the first
        row always goes; a prompt longer than that is read in several steps, alone: a group of several rows is
        read in the step that starts it)."""
        rows = [self.waiting.pop(0)]
        width = len(rows[0].prompt)
        while self.waiting and (len(rows) + 1) * max(width, len(self.waiting[0].prompt)) <= self.prefill_chunk:
            width = max(width, len(self.waiting[0].prompt))
            rows.append(self.waiting.pop(0))
        self.group = _Prefill(self.engine, rows, self.prefill_chunk)

    def _prefill(self):
        """Read the group's next chunk; when its prompts are complete, sample the first tokens and return
        ``(group, chosen, keep)`` for the rows to join, else None."""
        g = self.group
        end = min(g.width, g.done + g.chunk)
        logits = self.engine.model(g.idx[:, g.done:end], attention_mask=g.mask[:, :end], kv_cache=g.cache,
                                   logits_to_keep=1)[0][:, -1]
        g.done = end
        if end < g.width:
            return None
        self.group = None
        self.groups += 1
        settings = row_settings([r.params for r in g.rows], self.engine.device)
        seen, counts = self._history(g.rows, settings)
        chosen, keep = self.engine._sample(logits, g.rows, settings, seen, counts)
        return g, chosen, keep

    def _join(self, group: _Prefill, chosen: torch.Tensor, keep: list[int]) -> None:
        """The unfinished rows of a prefilled group take free slots (or the cache is rebuilt with them)."""
        if not keep:
            return
        rows = [group.rows[j] for j in keep]
        B = len(self.running)
        if (self.store is None or B + len(rows) > self.store.k.shape[1] or self.length >= self.store.max_len
                or any(len(r.prompt) > self.length for r in rows)):
            self._rebuild(rows, (group, chosen, keep))
            return
        L, W = self.length, group.width
        for i, (j, row) in enumerate(zip(keep, rows)):
            n, slot = len(row.prompt), B + i
            self.store.k[:, slot, :, L - n:L] = group.cache.k[:, j, :, W - n:W]
            self.store.v[:, slot, :, L - n:L] = group.cache.v[:, j, :, W - n:W]
            self.mask[slot] = 0
            self.mask[slot, L - n:L] = 1
            self.pending[slot] = chosen[j]
        self.running += rows
        self._settings_changed(rows)

    def _rebuild(self, rows: list[_Row], joined) -> None:
        """Re-pad: a new cache with the running rows (and ``rows``, from the prefilled group ``joined``), each
        ending at the longest row's length, with room for the steps the rows may still take."""
        old, old_length = self.store, self.length
        sources = [(old.k, old.v, old_length, slot) for slot in range(len(self.running))]
        pending = [self.pending[: len(self.running)]] if self.running else []
        if joined is not None:
            group, chosen, keep = joined
            sources += [(group.cache.k, group.cache.v, group.width, j) for j in keep]
            pending.append(chosen[torch.tensor(keep, dtype=torch.long, device=chosen.device)])
        everyone = self.running + rows
        lengths = [self._cached(r) for r in everyone]
        L = max(lengths)
        room = max(r.limit - len(r.ids) for r in everyone)  # forward passes the rows may still need
        slots = max(self.max_rows, len(everyone))
        store = self.engine._new_cache(slots, min(self.engine.block_size, L + room))
        mask = torch.zeros((slots, store.max_len), dtype=torch.long, device=self.engine.device)
        for i, ((k, v, end, j), n) in enumerate(zip(sources, lengths)):
            store.k[:, i, :, L - n:L] = k[:, j, :, end - n:end]
            store.v[:, i, :, L - n:L] = v[:, j, :, end - n:end]
            mask[i, L - n:L] = 1
        self.pending = torch.zeros(slots, dtype=torch.long, device=self.engine.device)
        self.pending[: len(everyone)] = torch.cat(pending)
        self.store, self.mask, self.length, self.running = store, mask, L, everyone
        self.seen = self.counts = None  # rebuilt from the rows' tokens
        self.rebuilds += 1
        self._settings_changed(everyone)

    def _settings_changed(self, new_rows: list[_Row] | None = None) -> None:
        """After rows joined or left: the running rows' sampling settings and penalty state (``new_rows``: the
        rows just placed, whose penalty state comes from their tokens)."""
        if not self.running:
            self._reset()
            return
        self.settings = row_settings([r.params for r in self.running], self.engine.device)
        slots, device = self.store.k.shape[1], self.engine.device
        vocab = self.engine.model.config.vocab_size
        for name, needed in (("seen", self.settings.any_repetition), ("counts", self.settings.any_presence_frequency)):
            state = getattr(self, name)
            if not needed:
                setattr(self, name, None)
                continue
            fill = self.running if state is None else (new_rows or [])
            if state is None:
                state = torch.zeros((slots, vocab), dtype=torch.bool if name == "seen" else torch.int32,
                                    device=device)
                setattr(self, name, state)
            first = len(self.running) - len(fill)
            for slot, row in enumerate(fill, start=first):
                state[slot] = False if name == "seen" else 0
                if name == "seen":
                    state[slot, torch.tensor(row.prompt + row.ids, device=device)] = True
                elif row.ids:
                    state[slot] = torch.bincount(torch.tensor(row.ids, device=device), minlength=vocab)

    def _history(self, rows: list[_Row], settings) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The penalties' state of a prefill group: tokens seen (the prompt) and output counts (none yet)."""
        device, vocab = self.engine.device, self.engine.model.config.vocab_size
        seen = counts = None
        if settings.any_repetition:
            seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=device)
            for b, r in enumerate(rows):
                seen[b, torch.tensor(r.prompt + r.ids, device=device)] = True
        if settings.any_presence_frequency:
            counts = torch.zeros((len(rows), vocab), dtype=torch.int32, device=device)
        return seen, counts
