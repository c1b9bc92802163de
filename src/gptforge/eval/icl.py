"""In-context-learning tasks in the llm-foundry / Eval Gauntlet formats, scored as nanochat's ``core_eval.py``.

Three task types, one JSON object per line:

- ``multiple_choice`` ``{"query", "choices", "gold"}``: one prompt per choice (``query + delimiter + choice``);
  the scored tokens are those after the longest token prefix all the prompts share; the choice with the lowest
  mean loss per scored token wins.
- ``schema`` ``{"context_options", "continuation", "gold"}`` (WinoGrande, WSC): one prompt per context option
  (``option + delimiter + continuation``); the scored tokens are the longest token suffix all the prompts share
  (the shared continuation); lowest mean loss wins.
- ``language_modeling`` ``{"context", "continuation"}`` (LAMBADA, Jeopardy, BIG-bench): correct iff greedy
  decoding reproduces every token of the continuation after ``context.strip() + delimiter``.

Prompts, token boundaries, few-shot sampling and truncation are copied from nanochat
(https://github.com/karpathy/nanochat/blob/3a5e0bc50b123f37220f1ace6813f080455d19f3/nanochat/core_eval.py,
unchanged up to commit 92d63d4e8bb4df75c3b71618f31ddde2378b2bcd): every prompt starts with the
end-of-text token as BOS; ``k`` shots are ``random.Random(1234 + index).sample`` of the other items, each rendered
as the item's gold answer and followed by a blank line (``"\\n\\n"``); a sequence longer than the model's context
keeps its last ``block_size`` tokens (nanochat crops each prompt separately, as its HF wrapper does for GPT-2).
Log-likelihoods come from the shared scorer (:mod:`gptforge.eval.scoring`), which runs the choices of an item
that share a context once (KV cache) and batches across items.
"""

from __future__ import annotations

import math
import random
import sys
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.eval.scoring import Request, score_requests

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
EXAMPLE_DELIMITER = "\n\n"  # fixed in nanochat's templates: a blank line after every shot
FEWSHOT_SEED = 1234  # nanochat: random.Random(1234 + idx)
FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


# ---- data ----------------------------------------------------------------------------------------------------


def check_type(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise GptforgeError(f"unknown ICL task type {task_type!r}; choose one of: {', '.join(TASK_TYPES)}")
    return task_type


def validate_item(rec, task_type: str, where: str) -> dict:
    """``rec`` checked against ``task_type``'s fields; an error names ``where`` (file:line) and what is wrong."""
    if not isinstance(rec, dict):
        raise GptforgeError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [f for f in FIELDS[task_type] if f not in rec]
    if missing:
        hint = {"schema": "WinoGrande/WSC style", "language_modeling": "LAMBADA style",
                "multiple_choice": "ARC/PIQA style"}[task_type]
        raise GptforgeError(f"{where}: a {task_type} item ({hint}) needs fields {', '.join(FIELDS[task_type])}; "
                            f"missing {', '.join(missing)} (fields: {', '.join(map(str, rec)) or 'none'})")
    options = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    if options:
        values = rec[options]
        if not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, str) for v in values):
            raise GptforgeError(f"{where}: {options!r} must be a list of at least two strings")
        gold = rec["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(values):
            raise GptforgeError(f"{where}: gold must be an index 0..{len(values) - 1}, got {gold!r}")
    text_fields = [f for f in FIELDS[task_type] if f not in ("choices", "context_options", "gold")]
    for f in text_fields:
        if not isinstance(rec[f], str):
            raise GptforgeError(f"{where}: field {f!r} must be a string, got {type(rec[f]).__name__}")
    return rec


def read_icl_jsonl(path: str | Path, task_type: str) -> list[dict]:
    """The items of an llm-foundry-format jsonl file, each checked against ``task_type``."""
    from gptforge.io import iter_jsonl

    check_type(task_type)
    path = Path(path)
    if not path.is_file():
        raise GptforgeError(f"data file not found: {path}")
    items = [validate_item(rec, task_type, f"{path}:{lineno}") for lineno, rec in iter_jsonl(path)]
    if not items:
        raise GptforgeError(f"{path}: no items")
    return items


class _AllBut(Sequence):
    """``[i for i in range(n) if i != skip]`` without building it: ``random.sample`` only takes len() and
    indexes, so it draws exactly what it would draw from the list (nanochat's few-shot pool), in O(k)."""

    def __init__(self, n: int, skip: int):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n - 1

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if not 0 <= j < self.n - 1:
            raise IndexError(j)
        return j + (j >= self.skip)


def fewshot_indices(index: int, n: int, k: int) -> list[int]:
    """nanochat's shots for item ``index`` of ``n``: ``Random(1234 + index).sample(<all but index>, k)``."""
    if k <= 0:
        return []
    if k > n - 1:
        raise GptforgeError(f"{k}-shot prompts need at least {k + 1} items, the task has {n}")
    return random.Random(FEWSHOT_SEED + index).sample(_AllBut(n, index), k)


# ---- prompt rendering (nanochat's Jinja templates, in plain Python) ------------------------------------------


def _shot(task_type: str, ex: dict, delimiter: str) -> str:
    if task_type == "multiple_choice":
        return f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}"
    if task_type == "schema":
        return f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}"
    return f"{ex['context'].strip()}{delimiter}{ex['continuation']}"


def prompt_segments(task_type: str, item: dict, delimiter: str, shots: list[dict]) -> list[list[str]]:
    """Each prompt as its pieces; the prompt is ``"\\n\\n".join(pieces)`` (see :func:`render_prompts`).

    multiple_choice: a prompt per choice; schema: a prompt per context option; language_modeling: two prompts,
    without the continuation (stripped, as nanochat strips it) and with it.
    """
    head = [_shot(task_type, ex, delimiter) for ex in shots]
    if task_type == "multiple_choice":
        return [head + [f"{item['query']}{delimiter}{choice}"] for choice in item["choices"]]
    if task_type == "schema":
        return [head + [f"{option}{delimiter}{item['continuation']}"] for option in item["context_options"]]
    context = item["context"].strip()
    without = head + [f"{context}{delimiter}"]
    text = EXAMPLE_DELIMITER.join(without).strip()
    without[-1] = without[-1].rstrip()
    if not head:
        without[-1] = without[-1].lstrip()
    if EXAMPLE_DELIMITER.join(without) != text:  # a shot that strips away: keep the exact string as one piece
        without = [text]
    return [without, head + [f"{context}{delimiter}{item['continuation']}"]]


def render_prompts(task_type: str, item: dict, delimiter: str = " ", shots: list[dict] | None = None) -> list[str]:
    """The exact prompt strings nanochat's ``render_prompts_mc/_schema/_lm`` produce for ``item``."""
    check_type(task_type)
    return [EXAMPLE_DELIMITER.join(p) for p in prompt_segments(task_type, item, delimiter, shots or [])]


# ---- tokenization --------------------------------------------------------------------------------------------


def _splits_at_blank_lines(tokenizer) -> bool:
    """True when the tokenizer pre-splits text with GPT-2's regex, so ``A + "\\n\\n" + B`` encodes as
    ``enc(A) + enc("\\n") + enc("\\n") + enc(B)`` whenever A ends and B starts with a non-space character: the
    regex makes each of the two newlines its own chunk there, and BPE never merges across chunks."""
    from gptforge.tokenizer import BPETokenizer, TiktokenTokenizer

    if isinstance(tokenizer, TiktokenTokenizer):
        return True
    if not isinstance(tokenizer, BPETokenizer):
        return False
    if tokenizer not in _GPT2_STYLE:  # tiktoken_ranks() parses the whole vocabulary: once per tokenizer
        _GPT2_STYLE[tokenizer] = tokenizer.tiktoken_ranks() is not None
    return _GPT2_STYLE[tokenizer]


_GPT2_STYLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _solid(c: str) -> bool:
    return not c.isspace() and c >= " "


class PromptEncoder:
    """Token ids of ``[BOS] + prompt`` for many prompts that repeat the same shots.

    With a GPT-2-regex tokenizer the shots and the item's own piece are encoded once each and joined with the
    blank line's two newline tokens (identical to encoding the whole prompt, see
    :func:`_splits_at_blank_lines`); otherwise, or when a piece begins or ends with whitespace, the whole
    prompt is encoded.
    """

    def __init__(self, tokenizer):
        from gptforge.tokenizer import TiktokenTokenizer

        self.tokenizer = tokenizer
        self.bos = tokenizer.eot_id
        self.fast = _splits_at_blank_lines(tokenizer)
        self.newline = tokenizer.encode("\n") * 2
        self.cache: dict[str, list[int]] = {}
        self.solid: dict[str, bool] = {}  # piece -> begins and ends with a non-space character
        # tiktoken's encode_batch pays a thread-pool round trip per text; a plain loop is faster for short pieces
        self.one_by_one = isinstance(tokenizer, TiktokenTokenizer)

    def _joinable(self, pieces: list[str]) -> bool:
        if len(pieces) == 1:
            return True
        if not self.fast:
            return False
        solid = self.solid
        for p in pieces:
            ok = solid.get(p)
            if ok is None:
                ok = solid[p] = bool(p) and _solid(p[0]) and _solid(p[-1])
            if not ok:
                return False
        return True

    def prepare(self, prompts: list[list[str]]) -> None:
        """Encode, in one batch, every piece (or whole prompt) that ``encode`` will need."""
        todo = set()
        for pieces in prompts:
            if self._joinable(pieces):
                todo.update(pieces)
            else:
                todo.add(EXAMPLE_DELIMITER.join(pieces))
        texts = sorted(todo.difference(self.cache))
        encode = self.tokenizer.encode
        ids = [encode(t) for t in texts] if self.one_by_one else self.tokenizer.encode_batch(texts)
        self.cache.update(zip(texts, ids))

    def encode(self, pieces: list[str]) -> list[int]:
        if not self._joinable(pieces):
            text = EXAMPLE_DELIMITER.join(pieces)
            return [self.bos] + (self.cache.get(text) or self.tokenizer.encode(text))
        cache, ids = self.cache, [self.bos]
        for i, piece in enumerate(pieces):
            if i:
                ids += self.newline
            ids += cache[piece] if piece in cache else self.tokenizer.encode(piece)
        return ids

    def encode_group(self, prompts: list[list[str]]) -> tuple[list[list[int]], int]:
        """Ids of prompts that differ only in their last piece, and how many leading ids they surely share
        (BOS and the shots when encoded piecewise, else just BOS)."""
        head = prompts[0][:-1]
        if not all(p[:-1] == head and self._joinable(p) for p in prompts):
            return [self.encode(p) for p in prompts], 1
        cache, ids = self.cache, [self.bos]
        for piece in head:
            ids += cache[piece]
            ids += self.newline
        return [ids + cache[p[-1]] for p in prompts], len(ids)

    def check(self, pieces: list[str]) -> bool:
        """Whether the piecewise ids equal encoding the whole prompt (a guard run on each task's first item)."""
        return self.encode(pieces) == [self.bos] + self.tokenizer.encode(EXAMPLE_DELIMITER.join(pieces))


def common_length(seqs: list[list[int]], direction: str = "left") -> int:
    """nanochat's ``find_common_length``: length of the longest common token prefix (left) or suffix (right)."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        idx = i if direction == "left" else -1 - i
        token = first[idx]
        if any(s[idx] != token for s in seqs[1:]):
            return i
    return n


def _spans(task_type: str, seqs: list[list[int]], shared: int) -> list[tuple[int, int]]:
    """(start, end) of the scored tokens of each sequence, as nanochat's ``batch_sequences_*``.

    ``shared``: how many leading tokens all sequences are known to share (BOS and shots), not compared again.
    """
    tails = [s[shared:] for s in seqs]
    if task_type == "schema":
        suffix = common_length(tails, "right")
        if suffix == min(len(t) for t in tails):  # one tail ends the other: compare the whole sequences
            suffix = common_length(seqs, "right")
        return [(len(s) - suffix, len(s)) for s in seqs]
    # multiple_choice: after the common prefix; language_modeling (without, with): after `without`, which
    # nanochat asserts is a prefix of `with`.
    start = shared + common_length(tails, "left")
    return [(start, len(s)) for s in (seqs if task_type == "multiple_choice" else seqs[1:])]


def _request(ids: list[int], start: int, end: int, crop: int) -> Request:
    """The scorer request for tokens ``[start, end)`` of ``ids`` without its first ``crop`` tokens.

    A continuation so long that nothing of its context survives the crop keeps one token of context (nanochat
    would stop on an assertion there).
    """
    first = max(start, crop + 1)
    return Request(ids[crop:first], ids[first:end])


# ---- scoring -------------------------------------------------------------------------------------------------


CROPS = ("prompt", "item")


def build_requests(tokenizer, items: list[dict], task_type: str, num_fewshot: int = 0, delimiter: str = " ",
                   block_size: int = 1024, crop: str = "prompt") -> tuple[list[Request], list[tuple[int, int]], int]:
    """Every item's scorer requests; returns (requests, (first, count) per item, items that were cropped).

    A prompt longer than ``block_size`` keeps its last ``block_size`` tokens. ``crop="prompt"`` cuts each prompt
    on its own (nanochat). ``crop="item"`` cuts the prompts of a multiple-choice item at the same place, chosen so
    that the longest fits: the choices then share one context and one forward pass (faster when most prompts
    are too long; shorter choices see up to a few tokens less of the far-left context than under nanochat's rule).
    """
    if crop not in CROPS:
        raise GptforgeError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    check_type(task_type)
    encoder = PromptEncoder(tokenizer)
    prompts = []
    for idx, item in enumerate(items):
        shots = [items[j] for j in fewshot_indices(idx, len(items), num_fewshot)]
        prompts.append(prompt_segments(task_type, item, delimiter, shots))
    encoder.prepare([p for group in prompts for p in group])
    if encoder.fast and prompts and not all(encoder.check(p) for p in prompts[0]):
        print("gptforge: warning: piecewise prompt encoding differs from whole-prompt encoding for this "
              "tokenizer; encoding whole prompts (slower)", file=sys.stderr)
        encoder.fast = False
        encoder.prepare([p for group in prompts for p in group])
    requests: list[Request] = []
    owners: list[tuple[int, int]] = []
    cropped = 0
    for group in prompts:
        seqs, shared = encoder.encode_group(group)
        shared = min([shared] + [len(s) for s in seqs])
        spans = _spans(task_type, seqs, shared)
        owners.append((len(requests), len(spans)))
        scored = seqs if task_type != "language_modeling" else seqs[1:]
        longest = max(len(s) for s in scored)
        for s, (start, end) in zip(scored, spans):
            cut = longest if crop == "item" and task_type == "multiple_choice" else len(s)
            requests.append(_request(s, start, end, max(0, cut - block_size)))
        cropped += longest > block_size
    return requests, owners, cropped


def _argmin_like_nanochat(values: list[float]) -> int:
    # nanochat: mean_losses.index(min(mean_losses)) — same tie and NaN behaviour.
    return values.index(min(values))


def evaluate_icl(model, tokenizer, items: list[dict], task_type: str, num_fewshot: int = 0, delimiter: str = " ",
                 batch_size: int = 32, show_progress: bool = True, desc: str | None = None,
                 crop: str = "prompt") -> dict:
    """Score ``items`` of one ICL task; returns accuracy, items/s and per-item details (JSON-serialisable).

    Each prediction holds, per choice / context option, the summed log-probability of the scored tokens, their
    count and the mean loss nanochat compares; for language_modeling the continuation's log-probability and
    whether greedy decoding reproduces it.
    """
    from gptforge.checkpoint import unwrap

    if tokenizer is None:
        raise GptforgeError("the checkpoint has no tokenizer; pass one with --tokenizer")
    if not items:
        raise GptforgeError(f"{desc or task_type}: no items to evaluate")
    start_time = time.perf_counter()
    block = unwrap(model).config.block_size
    requests, owners, cropped = build_requests(tokenizer, items, task_type, num_fewshot, delimiter, block, crop)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=desc or task_type, unit="req", leave=False)
    scores = score_requests(model, requests, batch_size=batch_size, progress=bar.update if bar else None)
    if bar:
        bar.close()
    predictions = []
    for idx, (item, (first, count)) in enumerate(zip(items, owners)):
        got = scores[first : first + count]
        if task_type == "language_modeling":
            s = got[0]
            predictions.append({"index": idx, "correct": bool(s.is_greedy), "logprob": s.logprob,
                                "num_tokens": s.num_tokens})
            continue
        mean_losses = [-s.logprob / s.num_tokens if s.num_tokens else float("nan") for s in got]
        pred = _argmin_like_nanochat(mean_losses)
        predictions.append({"index": idx, "gold": item["gold"], "pred": pred, "correct": pred == item["gold"],
                            "logprobs": [s.logprob for s in got], "num_tokens": [s.num_tokens for s in got],
                            "mean_losses": [None if math.isnan(m) else m for m in mean_losses]})  # JSON has no NaN
    seconds = time.perf_counter() - start_time
    n = len(items)
    return {"type": task_type, "num_fewshot": num_fewshot, "delimiter": delimiter, "n": n,
            "accuracy": sum(p["correct"] for p in predictions) / n, "cropped": cropped, "crop": crop,
            "seconds": seconds, "items_per_second": n / max(seconds, 1e-9), "predictions": predictions}


def format_icl_summary(result: dict) -> str:
    """One line: task, n, accuracy, throughput, cropped prompts."""
    name = result.get("data") or result["type"]
    return (f"{name}: {result['type']} {result['num_fewshot']}-shot  n={result['n']}  "
            f"accuracy={result['accuracy']:.4f}  ({result['items_per_second']:.1f} items/s"
            + (f"; {result['cropped']} item(s) with prompts cropped to the model's context"
               if result["cropped"] else "")
            + ")")
