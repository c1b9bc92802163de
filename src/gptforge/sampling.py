"""Logits processing and sampling, one row per sequence, with Hugging Face semantics.

Order (as in ``transformers``' ``generate``): repetition penalty → presence/frequency penalty → temperature →
top-k → top-p → min-p → sample (or argmax when temperature is 0). Every knob is a per-row tensor, so one batch
can mix requests with different settings (the server batches unrelated requests together).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class RowSettings:
    """Per-row sampling knobs as ``(B, 1)`` tensors (built once per batch by :func:`row_settings`)."""

    temperature: torch.Tensor
    greedy: torch.Tensor  # (B,) bool: temperature == 0
    top_k: torch.Tensor  # (B, 1) long, 0 = off
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_repetition: bool
    any_presence_frequency: bool
    # a Python flag, so that a decoding step skips the division without reading a tensor (on a GPU, a sync)
    all_temperature_one: bool = False

    def select(self, index: torch.Tensor) -> RowSettings:
        """The settings of the rows in ``index`` (after finished rows leave the batch). The ``any_*`` flags stay
        as they were (a flag left on only costs a pass that changes nothing); ``all_temperature_one`` is recomputed."""
        fields = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        fields["all_temperature_one"] = bool((fields["temperature"] == 1).all())
        return RowSettings(**fields)


def row_settings(params_list, device) -> RowSettings:
    """Stack per-row :class:`gptforge.engine.SamplingParams` into tensors."""
    col = lambda name, dtype=torch.float32: torch.tensor(
        [[float(getattr(p, name))] for p in params_list], dtype=dtype, device=device)
    temperature = col("temperature")
    greedy = temperature[:, 0] <= 0
    return RowSettings(
        temperature=torch.where(greedy[:, None], torch.ones_like(temperature), temperature),
        greedy=greedy,
        top_k=torch.tensor([[int(p.top_k)] for p in params_list], dtype=torch.long, device=device),
        # HF compares cumulative probabilities with (1 - top_p) computed in double, then cast to float32.
        top_p=torch.tensor([[1.0 - float(p.top_p)] for p in params_list], dtype=torch.float32, device=device),
        min_p=col("min_p"),
        repetition_penalty=col("repetition_penalty"),
        presence_penalty=col("presence_penalty"),
        frequency_penalty=col("frequency_penalty"),
        any_top_k=any(p.top_k > 0 and p.temperature > 0 for p in params_list),
        any_top_p=any(p.top_p < 1.0 and p.temperature > 0 for p in params_list),
        any_min_p=any(p.min_p > 0.0 and p.temperature > 0 for p in params_list),
        any_repetition=any(p.repetition_penalty != 1.0 for p in params_list),
        any_presence_frequency=any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params_list),
        all_temperature_one=all(p.temperature <= 0 or p.temperature == 1 for p in params_list),
    )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF/CTRL repetition penalty: seen tokens' logits divided by ``penalty`` if positive, multiplied if negative.
    Only the seen tokens (a few hundred of a 50k vocabulary) are computed, not every logit."""
    rows, cols = seen.nonzero(as_tuple=True)
    values, factor = logits[rows, cols], penalty[rows, 0]
    return logits.index_put((rows, cols), torch.where(values < 0, values * factor, values / factor))


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI penalties over generated tokens: ``- presence·[count>0] - frequency·count``."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep tokens scoring at least the k-th best (HF keeps ties); rows with k = 0 are untouched."""
    k_max = int(top_k.max().clamp(max=logits.size(-1)))
    top_values = torch.topk(logits, k_max, dim=-1).values
    kth = top_values.gather(-1, (top_k.clamp(min=1, max=k_max) - 1))
    remove = (logits < kth) & (top_k > 0)
    return logits.masked_fill(remove, NEG_INF)


def apply_top_p(logits: torch.Tensor, one_minus_top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering as HF's ``TopPLogitsWarper``: drop the least likely tokens whose ascending cumulative
    probability is ≤ 1 - top_p (the most likely token always stays; rows with top_p = 1 are untouched).

    HF sorts the whole vocabulary, which on a CPU costs ~3 ms per 50k-token row per step, more than a small
    model's forward pass. Here no row is sorted. The probabilities are bucketed by their float32 bit pattern
    (the exponent and 7 mantissa bits: buckets 1/128 wide, in probability order) and each bucket's mass is
    summed, so the cumulative mass per bucket finds the one bucket where the cut falls. Tokens in buckets
    below it are dropped, above it kept, and only the few tokens inside it are ranked. The cumulative sums
    are float64 then rounded to float32 before the comparison, as HF's float32 ``cumsum`` is; HF's
    probabilities come from a softmax over the sorted row, whose normalizer is summed in another order, so a
    token whose cumulative probability lies within float32 rounding (~1e-7) of 1 - top_p can land on the
    other side. Ties are ranked in an arbitrary order, as in HF's (unstable) sort.
    """
    shift = 16  # keep the sign, exponent and 7 mantissa bits of a probability
    probs = torch.softmax(logits, dim=-1)  # (B, V), ≥ 0: its int32 bit patterns sort as the floats do
    top = probs.amax(dim=-1, keepdim=True)
    lowest = probs.amin(dim=-1, keepdim=True).view(torch.int32) >> shift
    buckets = int(((top.view(torch.int32) >> shift) - lowest).max()) + 1
    bucket = ((probs.view(torch.int32) >> shift) - lowest).long()  # (B, V) in [0, buckets)
    mass = torch.zeros(len(probs), buckets, device=probs.device).scatter_add_(1, bucket, probs)
    mass = mass.double().cumsum_(dim=-1)  # (B, buckets): mass of every token up to the end of each bucket
    q = one_minus_top_p.float()
    edge = torch.searchsorted(mass.float(), q, right=True).clamp_(max=buckets - 1)  # (B, 1): first mass > q
    below = torch.where(edge > 0, mass.gather(1, (edge - 1).clamp(min=0)), 0.0)  # (B, 1) mass below the edge
    edge_start = ((edge + lowest) << shift).int().view(torch.float32)  # the edge bucket's smallest probability
    edge_end = ((edge + lowest + 1) << shift).int().view(torch.float32)
    remove = probs < edge_start
    # the edge bucket's tokens, ranked row by row: the key 2·row + probability orders by row, then probability
    rows, cols = ((probs < edge_end) & ~remove).nonzero(as_tuple=True)
    values = probs[rows, cols].double()
    order = torch.argsort(values + 2 * rows)
    rows, cols, values = rows[order], cols[order], values[order]
    running = values.cumsum(dim=0)
    per_row = torch.bincount(rows, minlength=len(probs))
    first = (per_row.cumsum(dim=0) - per_row)[rows]  # each entry's row's first entry
    cumulative = running - (running[first] - values[first]) + below[rows, 0]
    remove[rows, cols] = cumulative.float() <= q[rows, 0]
    most_likely = argmax_rows(probs)[:, None]  # stays when nothing else does
    remove.scatter_(1, most_likely, remove.gather(1, most_likely) & ~remove.all(dim=-1, keepdim=True))
    remove &= one_minus_top_p > 0
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's (HF ``MinPLogitsWarper``)."""
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits a sampler can always draw from: NaN → -inf, +inf → the largest float, and a row with nothing
    finite left (a diverged model) becomes uniform. Finite logits pass through unchanged (and uncopied).

    The check is one vectorized sum: a sum is finite only if every term is (NaN and ±inf propagate). Only when
    it is not (or it overflowed) are the elements checked one by one, which costs ~30× more per step."""
    if bool(torch.isfinite(logits.sum())) or bool(torch.isfinite(logits).all()):
        return logits
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return torch.where(dead, torch.zeros_like(logits), logits)


def process_logits(logits: torch.Tensor, s: RowSettings, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """The processed scores (float32) the next token is drawn from; greedy rows skip the warpers' effect."""
    logits = finite_logits(logits.float())
    if s.any_repetition and seen is not None:
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.any_presence_frequency and counts is not None:
        logits = apply_presence_frequency(logits, counts, s.presence_penalty, s.frequency_penalty)
    if not s.all_temperature_one:
        logits = logits / s.temperature
    if s.any_top_k:
        logits = apply_top_k(logits, torch.where(s.greedy[:, None], torch.zeros_like(s.top_k), s.top_k))
    if s.any_top_p:  # only the rows that use it: ranking the vocabulary is the costliest step
        one_minus = torch.where(s.greedy[:, None], torch.zeros_like(s.top_p), s.top_p)
        rows = torch.nonzero(one_minus[:, 0] > 0).flatten()
        if len(rows) == len(logits):
            logits = apply_top_p(logits, one_minus)
        else:
            logits = logits.index_copy(0, rows, apply_top_p(logits[rows], one_minus[rows]))
    if s.any_min_p:
        logits = apply_min_p(logits, torch.where(s.greedy[:, None], torch.zeros_like(s.min_p), s.min_p))
    return logits


def argmax_rows(scores: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``scores.argmax(-1)`` of ``(B, V)`` scores: the same indices (the first maximum; NaN counts as the
    maximum), found in two passes because on CPU torch's argmax is a scalar loop (~0.5 ns per element, ~4 ms
    for 16 rows of bf16 GPT-2 logits) while ``amax`` is vectorized: each chunk's maximum, then argmax only
    within the first chunk that holds the row's maximum."""
    B, V = scores.shape
    if V < 4 * chunk or scores.device.type != "cpu":
        return scores.argmax(dim=-1)
    full = V // chunk * chunk
    maxima = scores[:, :full].reshape(B, full // chunk, chunk).amax(dim=-1)  # (B, n)
    if full < V:
        maxima = torch.cat([maxima, scores[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    start = maxima.argmax(dim=-1) * chunk  # (B,) the first chunk holding the maximum
    window = (start[:, None] + torch.arange(chunk, device=scores.device)).clamp_(max=V - 1)  # (B, chunk)
    # a shorter last chunk repeats the last column after its own columns: never before a first maximum
    return start + scores.gather(1, window).argmax(dim=-1)


def choose_tokens(scores: torch.Tensor, greedy: torch.Tensor, generators: list[torch.Generator | None]
                  ) -> torch.Tensor:
    """Argmax for greedy rows; a draw from ``softmax(scores)`` with the row's own generator otherwise.

    Sampling inverts the CDF with one uniform number per row (:func:`draw`; ``torch.multinomial`` over a 50k
    vocabulary is far slower on CPU).
    """
    rows = torch.nonzero(~greedy).flatten()
    if len(rows) == 0:
        return argmax_rows(scores)
    # argmax only where a row is greedy: over a 50k vocabulary it costs as much as the rest of sampling
    chosen = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
    if len(rows) < len(scores):
        greedy_rows = torch.nonzero(greedy).flatten()
        chosen[greedy_rows] = argmax_rows(scores[greedy_rows])
    u = torch.cat([torch.rand(1, generator=generators[r], dtype=torch.float64, device=scores.device)
                   for r in rows.tolist()])
    chosen[rows] = draw(scores[rows], u)
    return chosen


def draw(scores: torch.Tensor, u: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The token each ``(R, V)`` row of ``scores`` gives its uniform number ``u`` (R,) by inverting the CDF
    of ``softmax(scores)``: the first token whose cumulative probability exceeds ``u`` of the total.

    Two levels, so no float64 pass over the vocabulary: float32 probabilities are summed in float64 per
    chunk of ``chunk`` tokens, ``u`` picks the chunk, and only that chunk is accumulated token by token.
    Every sum is float64, so tail probabilities count exactly; the strict comparison never picks a
    zero-probability (filtered) token.
    """
    R, V = scores.shape
    n = -(-V // chunk)
    probs = torch.nn.functional.pad(torch.softmax(scores.float(), dim=-1), (0, n * chunk - V)).view(R, n, chunk)
    mass = probs.sum(dim=-1, dtype=torch.float64).cumsum_(dim=-1)  # (R, n) cumulative, chunk by chunk
    target = u.double() * mass[:, -1]  # (R,)
    c = torch.searchsorted(mass, target[:, None], right=True)  # (R, 1) the chunk
    c = torch.minimum(c, (mass < mass[:, -1:]).sum(dim=-1, keepdim=True))  # ≤ the last chunk with mass > 0
    before = torch.where(c > 0, mass.gather(1, (c - 1).clamp(min=0)), 0.0)  # (R, 1)
    inner = probs[torch.arange(R, device=scores.device), c[:, 0]].double().cumsum_(dim=-1)  # (R, chunk)
    j = torch.searchsorted(inner, target[:, None] - before, right=True)
    last = (inner < inner[:, -1:]).sum(dim=-1, keepdim=True)  # the chunk's last token with probability > 0
    return (c * chunk + torch.minimum(j, last)).squeeze(1)
