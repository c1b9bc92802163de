"""One worker thread that owns the engine: requests queue up, and whatever is waiting is decoded as one batch.

Requests with different sampling settings share a batch (settings are per row). Admission is bounded: at most
``max_pending`` requests may wait or run; more are refused (the API answers 429). A request that is cancelled
(client gone) or past its deadline stops decoding at the next token and frees its place at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from gptforge.engine import Completion, Engine, SamplingParams


@dataclass
class Job:
    """One API request: ``len(prompts)`` rows (a prompt repeated ``n`` times, or several prompts)."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    released: bool = False

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
    """Bounded admission + a worker thread batching up to ``max_batch_rows`` rows per engine call."""

    def __init__(self, engine: Engine, max_pending: int = 64, max_batch_rows: int = 16):
        self.engine = engine
        self.max_pending = max_pending
        self.max_batch_rows = max_batch_rows
        self._waiting: list[Job] = []
        self._pending = 0
        self._cond = threading.Condition()
        self._stopped = False
        self.batches = 0
        self.thread = threading.Thread(target=self._work, name="gptforge-engine", daemon=True)
        self.thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the server is full."""
        with self._cond:
            if self._pending >= self.max_pending:
                return False
            self._pending += 1
            self._waiting.append(job)
            self._cond.notify()
            return True

    def release(self, job: Job) -> None:
        """Free ``job``'s place (idempotent): called when it finished, failed, or its client left."""
        with self._cond:
            if not job.released:
                job.released = True
                self._pending -= 1

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        self.release(job)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while not self._waiting and not self._stopped:
                self._cond.wait()
            batch, rows = [], 0
            while self._waiting:
                job = self._waiting[0]
                if job.should_stop():  # gave up while waiting
                    self._waiting.pop(0)
                    job.emit("done", None)
                    continue
                if batch and rows + len(job.prompts) > self.max_batch_rows:
                    break
                batch.append(self._waiting.pop(0))
                rows += len(job.prompts)
            return batch

    def _work(self) -> None:
        while not self._stopped:
            jobs = self._next_batch()
            if not jobs:
                continue
            owners = [(job, k) for job in jobs for k in range(len(job.prompts))]
            results: dict[int, list] = {id(job): [None] * len(job.prompts) for job in jobs}

            def on_token(row: int, _token: int, delta: str) -> bool:
                job, choice = owners[row]
                if delta:
                    job.emit("delta", choice, delta)
                return not job.should_stop()

            def on_finish(row: int, completion: Completion) -> None:
                job, choice = owners[row]
                mine = results[id(job)]
                mine[choice] = completion
                if all(c is not None for c in mine):  # answer this request now, not when the batch ends
                    job.emit("done", mine)
                    self.release(job)

            try:
                self.engine.generate([p for job in jobs for p in job.prompts],
                                     [p for job in jobs for p in job.params], on_token=on_token, on_finish=on_finish)
            except Exception as e:  # a bug or an engine-side user error: fail these requests, keep serving
                for job in jobs:
                    if not job.released:
                        job.emit("error", f"{type(e).__name__}: {e}")
                        self.release(job)
                continue
            self.batches += 1
