"""Log-likelihood scoring shared by every evaluation: ``log p(continuation | context)`` for many pairs at once.

Semantics follow lm-evaluation-harness' Hugging Face backend, so our numbers and lm-eval's agree:
context and continuation are encoded together and split at the context's token length (a trailing space of
the context moves onto the continuation), an empty context becomes the end-of-text token, and sequences longer
than the model's context are cut from the left. Requests are sorted by length and batched with right padding,
which a causal model never attends to, so no attention mask is needed and the fast attention path is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptforge.tokenizer import Tokenizer

# Cap on the logits tensor of one batch (elements); keeps memory bounded for 50k vocabularies and long prompts.
MAX_LOGITS_PER_BATCH = 2**27


@dataclass
class Request:
    """One scoring request: token ids of the context and of the continuation to score."""

    context: list[int]
    continuation: list[int]


@dataclass
class Score:
    """Sum of the continuation's token log-probabilities, and whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool
    num_tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """Tokenize a (context, continuation) pair exactly as lm-eval's HF model does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return Request([tokenizer.eot_id], tokenizer.encode(continuation))
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return Request(whole[: len(context_ids)], whole[len(context_ids):])


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_requests(model, requests: list[Request], batch_size: int = 32, progress=None) -> list[Score]:
    """Score every request; results come back in the order of ``requests``.

    ``progress`` (optional) is called with the number of requests finished after each batch.
    """
    from gptforge.checkpoint import unwrap

    bare = unwrap(model)
    block = bare.config.block_size
    vocab = bare.config.vocab_size
    device = model_device(bare)
    was_training = bare.training
    bare.eval()

    # (input ids, number of continuation tokens) per request, truncated from the left like lm-eval.
    prepared = []
    for r in requests:
        if not r.continuation:
            prepared.append(([], 0))
            continue
        whole = (r.context + r.continuation)[-(block + 1):]
        prepared.append((whole[:-1], len(r.continuation)))
    order = sorted(range(len(requests)), key=lambda i: -len(prepared[i][0]))
    results: list[Score | None] = [None] * len(requests)

    start = 0
    while start < len(order):
        longest = max(1, len(prepared[order[start]][0]))
        rows = max(1, min(batch_size, MAX_LOGITS_PER_BATCH // (longest * vocab)))
        chunk = order[start : start + rows]
        start += len(chunk)
        todo = [i for i in chunk if prepared[i][1] > 0]
        for i in chunk:
            if prepared[i][1] == 0:
                results[i] = Score(0.0, True, 0)
        if todo:
            _score_batch(bare, [prepared[i] for i in todo], [requests[i].continuation for i in todo],
                         device, results, todo)
        if progress is not None:
            progress(len(chunk))
    if was_training:
        bare.train()
    return results  # type: ignore[return-value]


def _score_batch(model, prepared, continuations, device, results, indices) -> None:
    width = max(len(ids) for ids, _ in prepared)
    batch = torch.zeros((len(prepared), width), dtype=torch.long)
    for row, (ids, _) in enumerate(prepared):
        batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    logits, _ = model(batch.to(device))
    for row, ((ids, n_cont), cont) in enumerate(zip(prepared, continuations)):
        # The last n_cont inputs predict the continuation tokens.
        span = logits[row, len(ids) - n_cont : len(ids)].float()
        logprobs = F.log_softmax(span, dim=-1)
        target = torch.tensor(cont[-n_cont:], dtype=torch.long, device=span.device)
        token_lp = logprobs.gather(1, target[:, None]).squeeze(1)
        greedy = bool((span.argmax(dim=-1) == target).all())
        results[indices[row]] = Score(float(token_lp.double().sum()), greedy, n_cont)


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[Request]:
    """Disjoint windows that score every token of ``tokens`` exactly once (lm-eval's rolling log-likelihood).

    The first window is conditioned on ``prefix_token`` (end-of-text); later windows use as much preceding
    text as fits in ``max_len`` as context.
    """
    requests: list[Request] = []
    for done in range(0, len(tokens), max_len):
        # The scorer keeps the last max_len inputs, so passing up to max_len preceding tokens is enough.
        context = ([prefix_token] + tokens[:done])[-max_len:]
        requests.append(Request(context, tokens[done : done + max_len]))
    return requests


def stderr_of_mean(values: list[float]) -> float:
    """Standard error of a mean (sample standard deviation / sqrt(n)); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)
