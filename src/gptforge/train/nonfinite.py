"""The divergence policy every training stage shares: warn when steps start being skipped, stop when too many
in a row are.

A step is skipped when its gradients are not finite (fp32/bf16) or when the fp16 loss scaler backs off; skipped
steps leave weights and optimizer state untouched, so the state at that moment is the last good one. After
``train.max_nonfinite`` skipped steps in a row the stage writes a checkpoint of it and stops with
:class:`Diverged` (a one-line ``gptforge: error:``), instead of running to the end on a broken model.
"""

from __future__ import annotations

from gptforge.errors import GptforgeError


class Diverged(GptforgeError):
    """Training stopped because too many consecutive steps were skipped."""


class NonFiniteGuard:
    """Counts consecutive skipped steps; ``update`` returns True when the run must stop.

    It also keeps the exploding-gradient diagnostics of the current checkpoint period (clipped steps, norm
    overflows with finite gradients, non-finite steps): :meth:`period` returns and resets them.
    """

    @classmethod
    def for_train(cls, train, log, fp16_scaler: bool = False) -> NonFiniteGuard:
        """From a stage's ``train`` section: ``nonfinite: raise`` stops at the first skipped step."""
        return cls(1 if train.nonfinite == "raise" else train.max_nonfinite, log, fp16_scaler)

    def __init__(self, limit: int, log, fp16_scaler: bool = False):
        self.limit = limit  # 0: never stop
        self.log = log
        self.fp16_scaler = fp16_scaler
        self.streak = 0
        self.first_step: int | None = None
        self.total = 0
        self.counts = {"clipped": 0, "norm_overflow": 0, "nonfinite": 0}

    def period(self) -> dict:
        """``{"period_clipped": n, "period_norm_overflow": n, "period_nonfinite": n}`` since the last call."""
        out = {f"period_{k}": v for k, v in self.counts.items()}
        self.counts = dict.fromkeys(self.counts, 0)
        return out

    def update(self, step: int, stats) -> bool:
        """Record step ``step`` (1-based, as in metrics.jsonl) with its :class:`StepStats`."""
        for key, value in stats.fields().items():
            if key in self.counts:
                self.counts[key] += int(bool(value))
        if not stats.skipped:
            self.streak, self.first_step = 0, None
            return False
        self.streak += 1
        self.total += 1
        if self.streak == 1:
            self.first_step = step
            self.log(f"gptforge: warning: step {step} skipped: {self._why(stats)} (lr {stats.lr:.3g}); "
                     f"{self.total} skipped so far" + (f", stopping after {self.limit} in a row" if self.limit else ""))
        return bool(self.limit) and self.streak >= self.limit

    def _why(self, stats) -> str:
        if stats.norm_overflow:
            return "the gradient norm overflowed although every gradient is finite (exploding gradients)"
        if stats.nonfinite:
            return "non-finite gradients (loss or gradient norm is inf/nan)"
        return "the fp16 loss scaler found inf/nan gradients and lowered its scale"

    def error(self, checkpoint) -> Diverged:
        """The error to raise after the stopping checkpoint ``checkpoint`` was written."""
        return Diverged(
            f"training diverged: {self.streak} steps in a row were skipped (steps {self.first_step}-"
            f"{self.first_step + self.streak - 1}, non-finite gradients); stopped with a checkpoint of the last "
            f"good weights in {checkpoint}. Lower optim.lr, keep train.grad_clip on, try "
            "train.precision=bf16 or fp32 instead of fp16, and check the data; train.max_nonfinite=0 never stops")
