"""One worker thread that owns the engine, in one of two batching modes.

``continuous`` (the default): the engine keeps a running batch (:class:`gptforge.batching.ContinuousBatch`);
between two decode steps, queued requests join it (their prompts prefilled in chunks) and finished rows leave,
so a short request never waits for a long one to end. ``static``: whatever is waiting is decoded as one batch
and a request arriving meanwhile waits until that batch is finished.

Requests with different sampling settings share a batch (settings are per row); at most ``max_batch_rows`` rows
decode together (a request with more rows runs alone). Admission is bounded: at most ``max_pending`` requests may
be prepared (parsed, tokenized, rendered), wait or run, and the bodies still being prepared may hold at most
``max_prepare_bytes``; more are refused (the API answers 429). A request that is cancelled (client gone, server
stopping) or past its deadline stops decoding at the next token (or before its prefill) and frees its place at
once. :class:`gptforge.serve.metrics.Metrics` counts what ``/metrics`` reports.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from gptforge.batching import ContinuousBatch
from gptforge.engine import Completion, Engine, SamplingParams, token_bytes
from gptforge.errors import GptforgeError
from gptforge.serve.metrics import Metrics

BATCHING = ("continuous", "static")


class TextTokens:
    """Which generated tokens the text handed out so far holds, with their log-probabilities.

    A token belongs to the text once the text reaches its first byte; a stop token (the text never includes it)
    never does, nor do tokens past a stop string. Streamed chunks and whole responses use this one rule, so
    both list the same tokens.
    """

    def __init__(self, engine: Engine, stop_ids: set[int]):
        self.engine, self.stop_ids = engine, stop_ids
        self.tokens: list[tuple[int, float, list[tuple[int, float]], int]] = []  # id, logprob, top, first byte
        self.end = 0  # bytes of all tokens so far
        self.text = ""
        self.taken = 0

    @classmethod
    def of(cls, engine: Engine, completion: Completion, stop_ids: set[int] | None = None) -> TextTokens:
        """The tokens of a finished completion (non-streamed responses)."""
        tokens = cls(engine, engine.base_stop_ids | (stop_ids or set()))
        for t, lp, top in zip(completion.token_ids, completion.logprobs or [], completion.top_logprobs or []):
            tokens.add(t, lp, top)
        return tokens

    def add(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> None:
        self.tokens.append((token_id, logprob, top, self.end))
        self.end += len(token_bytes(self.engine.tokenizer, token_id))

    def take(self, delta: str) -> list[tuple[int, float, list[tuple[int, float]], int]]:
        """The tokens that ``delta`` (the next piece of text) brings into the text, as ``(id, logprob, top,
        offset)`` with ``offset`` the character in the text where the token starts."""
        self.text += delta
        raw = self.text.encode("utf-8", "replace")
        out = []
        while self.taken < len(self.tokens):
            token_id, logprob, top, start = self.tokens[self.taken]
            if token_id in self.stop_ids or start >= len(raw):
                break
            out.append((token_id, logprob, top, len(raw[:start].decode("utf-8", "ignore"))))
            self.taken += 1
        return out


@dataclass
class Job:
    """One API request: ``len(prompts)`` rows (a prompt repeated ``n`` times, or several prompts).

    A job is admitted (counted against the limits) before its request is prepared; ``prompts`` and ``params``
    are filled in when it is queued.
    """

    deadline: float
    loop: asyncio.AbstractEventLoop
    prompts: list[list[int]] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    released: bool = False
    queued: bool = False
    cost: int = 0  # bytes held in the preparation budget until queued or released
    tokens: list[TextTokens] | None = None  # per row, when the request asked for logprobs
    keys: list[int] = field(default_factory=list)  # its rows' keys in a continuous batch

    def emit(self, *event) -> None:
        """Hand an event to the request's coroutine (thread-safe; a closed loop means the client is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            self.cancelled.set()

    def should_stop(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out = True
        return self.timed_out or self.cancelled.is_set()


class Scheduler:
    """Bounded admission + a worker thread decoding up to ``max_batch_rows`` rows at a time, continuously or in
    static batches (``batching``)."""

    def __init__(self, engine: Engine, max_pending: int = 64, max_batch_rows: int = 16,
                 max_prepare_bytes: int = 32_000_000, batching: str = "continuous", prefill_chunk: int = 128):
        if batching not in BATCHING:
            raise GptforgeError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.engine = engine
        self.max_pending = max_pending
        self.max_batch_rows = max_batch_rows
        self.max_prepare_bytes = max_prepare_bytes
        self.batching = batching
        self.metrics = Metrics()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._pending = 0
        self._preparing = 0
        self._preparing_bytes = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._batch = ContinuousBatch(engine, prefill_chunk, max_batch_rows) if batching == "continuous" else None
        self._static_rows = 0
        self._next_key = 0
        self.batches = 0  # static: engine calls; continuous: rounds in which queued requests joined the batch
        self.thread = threading.Thread(target=self._work if self._batch is None else self._work_continuous,
                                       name="gptforge-engine", daemon=True)
        self.thread.start()

    @property
    def pending(self) -> int:
        """Requests admitted and not yet finished: being prepared, queued or decoded."""
        return self._pending

    @property
    def preparing(self) -> int:
        """Requests admitted but not yet queued (being parsed, tokenized, rendered)."""
        return self._preparing

    @property
    def queued(self) -> int:
        """Requests queued for the engine and not yet in a batch."""
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        """Sequences decoding now."""
        return len(self._batch.running) if self._batch is not None else self._static_rows

    @property
    def prefilling_rows(self) -> int:
        """Sequences in the running batch whose prompts are still being read (continuous batching)."""
        return self._batch.prefilling if self._batch is not None else 0

    @property
    def steps(self) -> int:
        return self._batch.steps if self._batch is not None else self.batches

    def admit(self, job: Job, cost: int = 0) -> bool:
        """Count ``job`` (a request about to be prepared, ``cost`` bytes of body); False when the server is full."""
        with self._cond:
            if self._stopped or self._pending >= self.max_pending or \
                    (self._preparing_bytes and self._preparing_bytes + cost > self.max_prepare_bytes):
                return False
            self._pending += 1
            self._preparing += 1
            self._preparing_bytes += cost
            job.cost = cost
            return True

    def enqueue(self, job: Job) -> bool:
        """Queue an admitted ``job`` for decoding; False when it was released meanwhile."""
        with self._cond:
            if job.released or self._stopped:
                return False
            self._preparing -= 1
            self._preparing_bytes -= job.cost
            job.cost = 0
            job.queued = True
            self._waiting.append(job)
            self._cond.notify()
            return True

    def submit(self, job: Job) -> bool:
        """Admit and queue ``job`` at once; False when the server is full."""
        return self.admit(job) and self.enqueue(job)

    def release(self, job: Job) -> None:
        """Free ``job``'s place (idempotent): called when it finished, failed, or its client left."""
        with self._cond:
            if not job.released:
                job.released = True
                self._pending -= 1
                self._preparing -= 0 if job.queued else 1
                self._preparing_bytes -= job.cost
                job.cost = 0

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        self.release(job)

    def stop(self) -> None:
        """Stop serving: waiting and running requests are cancelled (their streams say so)."""
        with self._cond:
            self._stopped = True
            for job in self._waiting + self._running:
                job.cancelled.set()
            self._cond.notify()

    # ---- the job's side of the engine's callbacks ----------------------------------------------------------

    def _callbacks(self, job: Job, first: int):
        """``on_token``, ``on_finish`` and ``on_logprob`` for ``job``, whose rows have keys ``first``, ``first+1``…"""
        results: list[Completion | None] = [None] * len(job.prompts)
        if any(p.logprobs for p in job.params):
            job.tokens = [TextTokens(self.engine, self.engine.base_stop_ids | set(p.stop_token_ids))
                          for p in job.params]

        def on_logprob(key: int, token: int, logprob: float, top) -> None:
            job.tokens[key - first].add(token, logprob, top)

        def on_token(key: int, _token: int, delta: str) -> bool:
            self.metrics.tokens()
            if delta:
                choice = key - first
                job.emit("delta", choice, delta, job.tokens[choice].take(delta) if job.tokens else None)
            return not job.should_stop()

        def on_finish(key: int, completion: Completion) -> None:
            results[key - first] = completion
            if all(c is not None for c in results):  # answer this request now, not when the batch ends
                job.emit("done", results)
                self.release(job)
                with self._cond:
                    if job in self._running:
                        self._running.remove(job)

        return on_token, on_finish, on_logprob if job.tokens is not None else None

    def _first_waiting(self) -> Job | None:
        """The oldest queued request still wanted; those that gave up (or timed out, or the server is stopping)
        while waiting are dropped from the queue on the way. Call holding ``self._cond``."""
        while self._waiting:
            job = self._waiting[0]
            if not job.should_stop():
                return job
            self._waiting.pop(0)
            job.emit("done", None)
        return None

    # ---- static batching -------------------------------------------------------------------------------------

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while not self._waiting and not self._stopped:
                self._cond.wait()
            batch, rows = [], 0
            while (job := self._first_waiting()) is not None:
                if batch and rows + len(job.prompts) > self.max_batch_rows:
                    break
                batch.append(self._waiting.pop(0))
                rows += len(job.prompts)
            self._running = list(batch)
            self._static_rows = rows
            return batch

    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if not jobs:
                if self._stopped:
                    return
                continue
            try:
                self._generate(jobs)
            except Exception as e:  # noqa: BLE001 (a bug or an engine-side user error: fail these, keep serving)
                self._fail(jobs, e)
                continue
            finally:
                with self._cond:
                    self._running = []
                    self._static_rows = 0
            self.batches += 1

    def _generate(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` as one static batch; row ``i`` of the engine call is a row of ``jobs`` in order."""
        owner = []  # row → its job's callbacks
        for job in jobs:
            owner += [self._callbacks(job, len(owner))] * len(job.prompts)

        def on_logprob(row: int, token: int, logprob: float, top) -> None:
            if owner[row][2] is not None:
                owner[row][2](row, token, logprob, top)

        self.engine.generate([p for job in jobs for p in job.prompts], [p for job in jobs for p in job.params],
                             on_token=lambda row, *a: owner[row][0](row, *a),
                             on_finish=lambda row, c: owner[row][1](row, c), on_logprob=on_logprob)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            if not job.released:
                job.emit("error", f"{type(error).__name__}: {error}")
                self.release(job)

    # ---- continuous batching ---------------------------------------------------------------------------------

    def _work_continuous(self) -> None:
        batch = self._batch
        while True:
            with self._cond:
                while not self._waiting and not batch.rows and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._waiting and not batch.rows:
                    return
            with self.engine.lock:  # one step at a time; Engine.generate callers (and tests) can hold it
                self._join(batch)
                for job in list(self._running):
                    if job.should_stop():  # rows not decoding yet are dropped now, the others at their next token
                        for key in job.keys:
                            batch.cancel(key)
                if not batch.rows:
                    continue
                try:
                    batch.step()
                except Exception as e:  # noqa: BLE001 (a bug: fail the requests in the batch, keep serving)
                    with self._cond:
                        jobs, self._running = self._running, []
                    batch.clear()
                    self._fail(jobs, e)

    def _join(self, batch: ContinuousBatch) -> None:
        """Let queued requests into the batch, oldest first, while their rows fit ``max_batch_rows``."""
        with self._cond:
            joined = False
            while (job := self._first_waiting()) is not None:
                if batch.rows and batch.rows + len(job.prompts) > self.max_batch_rows:
                    break
                self._waiting.pop(0)
                first = self._next_key
                self._next_key += len(job.prompts)
                job.keys = list(range(first, first + len(job.prompts)))
                on_token, on_finish, on_logprob = self._callbacks(job, first)
                try:
                    batch.add(job.keys, job.prompts, job.params, on_token, on_finish, on_logprob)
                except GptforgeError as e:  # settings or a prompt the engine refuses: this request only
                    self._fail([job], e)
                    continue
                self._running.append(job)
                joined = True
            if joined:
                self.batches += 1
