"""The sampling defaults: the one place they are set, read by ``generate``, ``chat``, ``serve`` (fields a request
omits) and the web page (the server writes them into it). No torch import, so ``--help`` can show them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingDefaults:
    """What users get when they give no sampling setting. Seeds 000-002 sample with top-p 0.95 and a repetition
    penalty of 1.1, because greedy decoding of a small base model loops.

    Temperature 0 is plain argmax (what Hugging Face's ``generate(do_sample=False)`` computes): the default
    penalties do not apply to it, only penalties the user gives explicitly.
    """

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def params(self, **given):
        """A :class:`gptforge.engine.SamplingParams` from the values a user gave (``None`` = not given) over
        these defaults; other ``SamplingParams`` fields (``max_new_tokens``, ``seed``, ...) pass through."""
        from gptforge.engine import SamplingParams

        chosen = {k: v for k, v in given.items() if v is not None}
        values = {**self.as_dict(), **chosen}
        if values["temperature"] == 0:  # greedy = argmax of the model's logits, unless a penalty is asked for
            neutral = SamplingParams()
            for k in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
                if k not in chosen:
                    values[k] = getattr(neutral, k)
        return SamplingParams(**values)


SAMPLING_DEFAULTS = SamplingDefaults()
