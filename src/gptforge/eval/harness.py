"""lm-evaluation-harness adapter: the model type ``gptforge`` for native checkpoints (needs the ``eval`` extra).

Importing this module registers the type. lm-eval (0.4.x) has no plugin discovery for model types, so run it
through gptforge, which imports this module first::

    gptforge eval harness --model_args checkpoint=runs/mini --tasks hellaswag,arc_easy --limit 200
    python -m gptforge.eval.harness --model gptforge --model_args checkpoint=runs/mini --tasks hellaswag

or from Python: ``import gptforge.eval.harness`` and then ``lm_eval.simple_evaluate(model="gptforge", ...)``.
``--model_args``: ``checkpoint`` (required; step dir, run dir, ``ckpt/best`` or HF dir), ``dtype``
(float32 | bfloat16), ``max_gen_toks`` (default 256); batch size and device come from lm-eval's own
``--batch_size`` / ``--device`` (``gptforge eval harness`` defaults them to 16 and CUDA, else MPS, else CPU).

The three request types use the same scorer as ``gptforge eval choice`` (:mod:`gptforge.eval.scoring`), so
numbers agree with our own evaluation, and ``generate_until`` uses :class:`gptforge.engine.Engine` greedily.
"""

from __future__ import annotations

import sys

import torch

from gptforge.errors import GptforgeError
from gptforge.precision import pick_device

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise GptforgeError("the lm-eval adapter needs lm-evaluation-harness: pip install 'gptforge[eval]'") from e

from gptforge.eval.scoring import Request, encode_pair, rolling_windows, score_requests


@register_model("gptforge")
class GptforgeLM(LM):
    """lm-eval ``LM`` over a gptforge checkpoint (or an in-memory model and tokenizer)."""

    def __init__(self, checkpoint: str | None = None, device: str | None = None, batch_size: int | str = 16,
                 dtype: str = "float32", max_gen_toks: int = 256, model=None, tokenizer=None, **_ignored):
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"  # lm-eval's CLI defaults to cuda: fall back to what this machine has
        device = pick_device(device)
        if model is None:
            if not checkpoint:
                raise GptforgeError("model_args needs checkpoint=PATH (a step dir, run dir or HF directory)")
            from gptforge.checkpoint import load_model

            model, ckpt_tok, _ = load_model(checkpoint, device=device, dtype=getattr(torch, dtype))
            tokenizer = tokenizer or ckpt_tok
        if tokenizer is None:
            raise GptforgeError(f"{checkpoint}: the checkpoint has no tokenizer/ directory")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = model.config.block_size
        self._engine = None

    @property
    def tokenizer_name(self) -> str:
        return f"gptforge-{self.tokenizer.name}-{self.tokenizer.content_hash()}"

    # ---- log-likelihoods -------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for each ``(context, continuation)`` request."""
        pairs = [encode_pair(self.tokenizer, *req.args[:2]) for req in requests]
        scores = score_requests(self.model, pairs, batch_size=self.batch_size)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string, conditioned on end-of-text, in context-sized disjoint windows."""
        out = []
        for req in requests:
            tokens = self.tokenizer.encode(req.args[0])
            windows = rolling_windows(tokens, self.tokenizer.eot_id, self.max_length)
            out.append(sum(s.logprob for s in score_requests(self.model, windows, batch_size=self.batch_size)))
        return out

    # ---- generation ------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's ``until`` strings (default: end-of-text)."""
        from gptforge.engine import Engine, SamplingParams

        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, device=next(self.model.parameters()).device,
                                  dtype=next(self.model.parameters()).dtype)
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or [self.tokenizer.decode([self.tokenizer.eot_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.max_length - 1))
            ids = self.tokenizer.encode(context) or [self.tokenizer.eot_id]
            ids = ids[-(self.max_length - max_new):]
            params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_strings=until)
            [completion] = self._engine.generate([ids], params)
            text = completion.text
            for stop in until:  # the engine already stops there; cut defensively for decoders that overshoot
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def score_pairs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Our own scorer on string pairs (for comparing with lm-eval's requests)."""
    return [s.logprob for s in score_requests(model, [encode_pair(tokenizer, c, x) for c, x in pairs], batch_size)]


def cli_main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line with the ``gptforge`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm_eval"] + argv
    try:
        cli_evaluate()
    except SystemExit as e:  # lm-eval's argparse exits on bad arguments and after --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


__all__ = ["GptforgeLM", "Request", "cli_main", "score_pairs"]


if __name__ == "__main__":
    sys.exit(cli_main())
