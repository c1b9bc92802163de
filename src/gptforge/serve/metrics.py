"""What ``GET /metrics`` reports, as Prometheus text (exposition format 0.0.4).

Gauges read from the scheduler when scraped (queue depth, requests preparing and pending, running and prefilling
rows), and what :class:`Metrics` counts as requests pass: generated tokens (a total and a rate over the last
10 s), requests by route and HTTP status, and a latency histogram of the generation requests answered 200.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gptforge.serve.scheduler import Scheduler


class Metrics:
    """What ``/metrics`` reports beyond the scheduler's gauges: generated tokens, requests by route and status,
    and a latency histogram of the generation requests answered 200 (streams: until their last event)."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    RATE_WINDOW_S = 10.0

    def __init__(self):
        self.lock = threading.Lock()
        self.generated_tokens = 0
        self.requests: Counter = Counter()  # (route, status) → count
        self.latency_counts = [0] * (len(self.BUCKETS) + 1)  # per bucket (not cumulative); the last is +Inf
        self.latency_sum = 0.0
        self._samples: deque = deque()  # (monotonic time, generated_tokens), at most one per 0.25 s

    def tokens(self, n: int = 1) -> None:
        """Count ``n`` generated tokens (called by the engine worker)."""
        with self.lock:
            self.generated_tokens += n
            now = time.monotonic()
            if not self._samples or now - self._samples[-1][0] >= 0.25:
                self._samples.append((now, self.generated_tokens))
            while len(self._samples) > 1 and now - self._samples[0][0] > self.RATE_WINDOW_S:
                self._samples.popleft()

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last :attr:`RATE_WINDOW_S` seconds."""
        with self.lock:
            now = time.monotonic()
            recent = [(t, n) for t, n in self._samples if now - t <= self.RATE_WINDOW_S]
            if not recent:
                return 0.0
            t0, n0 = recent[0]
            return (self.generated_tokens - n0) / max(now - t0, 1.0)

    def request(self, route: str, status: str, seconds: float | None) -> None:
        """Count one request; ``seconds`` (its latency) goes into the histogram when given."""
        with self.lock:
            self.requests[(route, status)] += 1
            if seconds is not None:
                k = next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))
                self.latency_counts[k] += 1
                self.latency_sum += seconds

    def render(self, scheduler: Scheduler) -> str:
        """Prometheus text exposition (format 0.0.4)."""
        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"] + [f"{name}{labels} {_num(v)}"
                                                                         for labels, v in samples]

        rate = self.tokens_per_s()
        with self.lock:
            requests = sorted(self.requests.items())
            counts, total_s, generated = list(self.latency_counts), self.latency_sum, self.generated_tokens
        lines = []
        lines += metric("gptforge_queue_depth", "gauge", "Requests queued for the engine, not yet in a batch.",
                        [("", scheduler.queued)])
        lines += metric("gptforge_requests_preparing", "gauge", "Requests admitted and being parsed or tokenized.",
                        [("", scheduler.preparing)])
        lines += metric("gptforge_requests_pending", "gauge", "Requests admitted and not finished (max_pending "
                        "bounds it).", [("", scheduler.pending)])
        lines += metric("gptforge_running_rows", "gauge", "Sequences decoding in the running batch.",
                        [("", scheduler.running_rows)])
        lines += metric("gptforge_prefilling_rows", "gauge", "Sequences admitted to the batch whose prompts are "
                        "being read (continuous batching).", [("", scheduler.prefilling_rows)])
        lines += metric("gptforge_generated_tokens_total", "counter", "Tokens generated since start.",
                        [("", generated)])
        lines += metric("gptforge_generated_tokens_per_second", "gauge",
                        f"Tokens generated per second over the last {self.RATE_WINDOW_S:g} s.", [("", rate)])
        lines += metric("gptforge_batch_steps_total", "counter", "Engine steps (continuous) or batches (static).",
                        [("", scheduler.steps)])
        buckets, cumulative = [], 0
        for bound, n in zip([*self.BUCKETS, "+Inf"], counts):
            cumulative += n
            buckets.append((f'{{le="{_num(bound) if bound != "+Inf" else bound}"}}', cumulative))
        lines += ["# HELP gptforge_request_duration_seconds Latency of generation requests answered 200.",
                  "# TYPE gptforge_request_duration_seconds histogram"]
        lines += [f"gptforge_request_duration_seconds_bucket{labels} {v}" for labels, v in buckets]
        lines += [f"gptforge_request_duration_seconds_sum {_num(total_s)}",
                  f"gptforge_request_duration_seconds_count {cumulative}"]
        lines += metric("gptforge_requests_total", "counter", "API requests by route and HTTP status.",
                        [(f'{{route="{route}",status="{status}"}}', n) for (route, status), n in requests])
        lines += metric("gptforge_batching_info", "gauge", "The batching mode (label).",
                        [(f'{{mode="{scheduler.batching}"}}', 1)])
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
