"""Evaluation: held-out loss/perplexity/bits-per-byte, multiple-choice benchmarks, LLM-as-a-judge, lm-eval.

- :func:`evaluate_loss` / :func:`evaluate_checkpoints` (``loss.py``): loss on a prepared split or raw text.
- :func:`evaluate_choice`, :func:`hellaswag_hook` (``choice.py``): HellaSwag, MMLU, jsonl tasks as lm-eval scores them.
- ``judge.py``: LLM-as-a-judge over responses files; ``harness.py``: the ``gptforge`` model type for lm-eval.
"""

from gptforge.eval.choice import evaluate_choice, hellaswag_hook, load_task
from gptforge.eval.loss import evaluate_checkpoints, evaluate_loss
from gptforge.eval.tasks import load_hellaswag, load_mmlu

__all__ = ["evaluate_checkpoints", "evaluate_choice", "evaluate_loss", "hellaswag_hook", "load_hellaswag",
           "load_mmlu", "load_task"]
