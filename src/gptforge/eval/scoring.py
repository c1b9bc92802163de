"""Log-likelihood scoring shared by every evaluation: ``log p(continuation | context)`` for many pairs at once.

Semantics follow lm-evaluation-harness' Hugging Face backend, so our numbers and lm-eval's agree:
context and continuation are encoded together and split at the context's token length (a trailing space of
the context moves onto the continuation), an empty context becomes the end-of-text token, and sequences longer
than the model's context are cut from the left. Requests are sorted by length (so batches need little padding)
and left-padded, which puts every continuation at the end of its row: the model computes logits for those
last positions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptforge.tokenizer import Tokenizer

# Cap on the logits tensor of one batch (elements); keeps memory bounded for 50k vocabularies and long prompts.
MAX_LOGITS_PER_BATCH = 2**27
# Cap on the tokens of one forward pass (bounds activation memory).
MAX_TOKENS_PER_BATCH = 2**15


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
def score_requests(model, requests: list[Request], batch_size: int = 32, progress=None,
                   share_context: bool = True) -> list[Score]:
    """Score every request; results come back in the order of ``requests``.

    With ``share_context``, requests with the same context (the choices of one question) run the context once
    and continue from its KV cache, which saves most of the work for multiple-choice tasks; the numbers are the
    same as scoring each request on its own. ``progress`` (optional) is called with the number of requests
    finished after each batch.
    """
    from gptforge.checkpoint import unwrap

    bare = unwrap(model)
    block = bare.config.block_size
    was_training = bare.training
    bare.eval()
    results: list[Score | None] = [None] * len(requests)
    plain: list[int] = []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        if not r.context:
            raise ValueError(f"request {i} has an empty context; condition on the end-of-text token instead")
        if not r.continuation:
            results[i] = Score(0.0, True, 0)
        elif share_context and r.context and len(r.context) + len(r.continuation) - 1 <= block:
            groups.setdefault(tuple(r.context), []).append(i)
        else:
            plain.append(i)
    for ctx in [c for c, idxs in groups.items() if len(idxs) == 1]:
        plain.extend(groups.pop(ctx))
    if progress is not None and len(requests) - len(plain) - sum(map(len, groups.values())):
        progress(len(requests) - len(plain) - sum(map(len, groups.values())))
    try:
        _score_shared(bare, requests, list(groups.items()), batch_size, results, progress)
        _score_plain(bare, requests, plain, batch_size, results, progress)
    finally:
        if was_training:
            bare.train()
    return results  # type: ignore[return-value]


def _score_plain(model, requests, indices, batch_size, results, progress) -> None:
    """Each request as its own row: (context + continuation) cut to the context window from the left."""
    block, vocab = model.config.block_size, model.config.vocab_size
    device = model_device(model)
    prepared = {}
    for i in indices:
        r = requests[i]
        whole = (r.context + r.continuation)[-(block + 1):]
        prepared[i] = (whole[:-1], len(r.continuation))
    order = sorted(indices, key=lambda i: -len(prepared[i][0]))
    start = 0
    while start < len(order):
        longest = len(prepared[order[start]][0])
        rows = max(1, min(batch_size, MAX_TOKENS_PER_BATCH // longest))
        chunk = order[start : start + rows]
        while len(chunk) > 1 and len(chunk) * max(prepared[i][1] for i in chunk) * vocab > MAX_LOGITS_PER_BATCH:
            chunk = chunk[: len(chunk) // 2]
        start += len(chunk)
        _score_batch(model, [prepared[i] for i in chunk], [requests[i].continuation for i in chunk], device,
                     results, chunk)
        if progress is not None:
            progress(len(chunk))


def _forward_hidden(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Hidden states ``(B, T, d)`` after the last block, from the model's own forward pass.

    The forward runs with ``logits_to_keep=1`` so the LM head is not applied to every position; the caller
    applies it (:func:`_head`) to exactly the positions it scores.
    """
    captured = {}
    handle = model.transformer.h[-1].register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", out))
    try:
        model(ids, logits_to_keep=1, **kwargs)
    finally:
        handle.remove()
    return captured["h"]


def _bucket(n: int) -> int:
    """``n`` rounded up to one of about eight sizes per power of two (at most 12.5% more)."""
    step = 1 << max(3, n.bit_length() - 3)
    return -(-n // step) * step


def _padded_width(width: int, ragged: bool, cap: int) -> int:
    """A bucketed width for a batch (see :func:`_head`), at most ``cap``. A batch of equal rows keeps its width
    when it nearly fills the context (prompts cut to the context: few distinct widths, and no mask needed)."""
    if not ragged and 8 * width >= 7 * cap:
        return width
    return max(width, min(_bucket(width), cap))


def _head(model, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and greedy ids for hidden states ``(N, d)`` (final LayerNorm, then the LM head).

    The rows are zero-padded to a bucketed count: on CPU, oneDNN keeps a compiled kernel (with its own copy of
    the weights) for every bf16 matmul shape it meets, and a new row count per batch made memory grow by
    gigabytes over a long evaluation. Padding rows changes no other row's result.
    """
    n = hidden.shape[0]
    padded = _bucket(n)
    if padded != n:
        hidden = torch.cat([hidden, hidden.new_zeros(padded - n, hidden.shape[1])])
    logprobs, argmax = _normalise(model.lm_head(model.transformer.ln_f(hidden)))
    return logprobs[:n], argmax[:n]


def _gather_rows(hidden: torch.Tensor, spans: list[tuple[int, int, int]]):
    """Flatten ``(row, start, length)`` spans of ``hidden`` into ``(N, d)`` and the offset of each span."""
    rows, cols, offsets, n = [], [], [], 0
    for row, start, length in spans:
        rows += [row] * length
        cols += list(range(start, start + length))
        offsets.append(n)
        n += length
    index_r = torch.tensor(rows, dtype=torch.long, device=hidden.device)
    index_c = torch.tensor(cols, dtype=torch.long, device=hidden.device)
    return hidden[index_r, index_c], offsets


def _score_batch(model, prepared, continuations, device, results, indices) -> None:
    # Left padding puts every continuation at the end of its row; the LM head (which over a 50k vocabulary
    # dominates a small model's cost) is applied to the continuation positions only.
    longest = max(len(ids) for ids, _ in prepared)
    width = _padded_width(longest, any(len(ids) != longest for ids, _ in prepared), model.config.block_size)
    ragged = any(len(ids) != width for ids, _ in prepared)
    batch = torch.zeros((len(prepared), width), dtype=torch.long)
    mask = torch.zeros((len(prepared), width), dtype=torch.long)
    for row, (ids, _) in enumerate(prepared):
        batch[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    hidden = _forward_hidden(model, batch.to(device), attention_mask=mask.to(device) if ragged else None)
    spans = [(row, width - n_cont, n_cont) for row, (_, n_cont) in enumerate(prepared)]
    flat, offsets = _gather_rows(hidden, spans)
    logprobs, argmax = _head(model, flat)
    for (row, _, n), off, cont in zip(spans, offsets, continuations):
        _record([(logprobs[off : off + n], argmax[off : off + n])], cont, results, indices[row])


def _normalise(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and the greedy token of a whole batch of logits, in one vectorised pass each."""
    logits = logits.float()
    return F.log_softmax(logits, dim=-1), logits.argmax(dim=-1)


def _record(pieces: list[tuple[torch.Tensor, torch.Tensor]], continuation: list[int], results, index: int) -> None:
    """Store the score of ``continuation``; ``pieces`` hold, in order, (log-probs, greedy ids) of its tokens."""
    logprob, greedy, k = 0.0, True, 0
    for logprobs, argmax in pieces:
        target = torch.tensor(continuation[k : k + logprobs.shape[0]], dtype=torch.long, device=logprobs.device)
        k += logprobs.shape[0]
        logprob += float(logprobs.gather(1, target[:, None]).double().sum())
        greedy = greedy and bool((argmax == target).all())
    results[index] = Score(logprob, greedy, len(continuation))


def _score_shared(model, requests, groups, batch_size, results, progress) -> None:
    """Requests grouped by context: contexts once (left-padded, KV cached), then every continuation."""
    block = model.config.block_size
    groups = sorted(groups, key=lambda g: -len(g[0]))
    start = 0
    while start < len(groups):
        longest = len(groups[start][0])
        batch, rows, cont_max = [], 0, 0
        for ctx, idxs in groups[start:]:
            c = max(len(requests[i].continuation) for i in idxs) - 1
            fits = longest + max(cont_max, c) <= block and (rows + len(idxs)) * (longest + c) <= MAX_TOKENS_PER_BATCH
            if batch and (rows + len(idxs) > batch_size or not fits):
                break
            batch.append((ctx, idxs))
            rows += len(idxs)
            cont_max = max(cont_max, c)
        start += len(batch)
        _score_group_batch(model, requests, batch, cont_max, results)
        if progress is not None:
            progress(rows)


def _score_group_batch(model, requests, batch, cont_max, results) -> None:
    from gptforge.model import KVCache

    device = model_device(model)
    longest = max(len(ctx) for ctx, _ in batch)
    # Bucketed widths (see _head); the continuations are masked anyway.
    block = model.config.block_size
    cont_max = min(_bucket(cont_max), block - longest) if cont_max > 0 else 0
    width = _padded_width(longest, any(len(ctx) != longest for ctx, _ in batch), block - cont_max)
    ragged = any(len(ctx) != width for ctx, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for g, (ctx, _) in enumerate(batch):
        ids[g, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
        mask[g, width - len(ctx):] = 1
    ids, mask = ids.to(device), mask.to(device)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, len(batch), width + cont_max, device, dtype) if cont_max > 0 else None
    last, _ = model(ids, attention_mask=mask if ragged else None, kv_cache=cache, logits_to_keep=1)
    row_group = [g for g, (_, idxs) in enumerate(batch) for _ in idxs]
    row_request = [i for _, idxs in batch for i in idxs]
    if cont_max > 0:
        # Every continuation but its last token is fed after its own copy of the context's cache.
        index = torch.tensor(row_group, device=device)
        cache.reorder(index)
        cont = torch.zeros((len(row_request), cont_max), dtype=torch.long)
        cont_mask = torch.zeros((len(row_request), cont_max), dtype=torch.long)
        for r, i in enumerate(row_request):
            tokens = requests[i].continuation[:-1]
            cont[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            cont_mask[r, : len(tokens)] = 1
        full_mask = torch.cat([mask[index], cont_mask.to(device)], dim=1)
        hidden = _forward_hidden(model, cont.to(device), attention_mask=full_mask, kv_cache=cache)
        spans = [(r, 0, len(requests[i].continuation) - 1) for r, i in enumerate(row_request)]
        flat, offsets = _gather_rows(hidden, spans)
        rest_lp, rest_max = _head(model, flat)
    first_lp, first_max = _normalise(last[:, -1])
    for r, (g, i) in enumerate(zip(row_group, row_request)):
        continuation = requests[i].continuation
        pieces = [(first_lp[g : g + 1], first_max[g : g + 1])]
        if len(continuation) > 1:
            off, n = offsets[r], len(continuation) - 1
            pieces.append((rest_lp[off : off + n], rest_max[off : off + n]))
        _record(pieces, continuation, results, i)


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
