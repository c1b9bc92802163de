"""Preference data for DPO: records in the common layouts → (prompt, chosen, rejected) → token ids with answer labels.

Layouts, recognised per record from its keys:

- ``instruction`` (+ ``input`` or ``context``), ``chosen``, ``rejected`` — Raschka's
  ``instruction-data-with-preference.json`` (other keys such as ``output`` are ignored);
- ``prompt`` (or ``question``), ``chosen``, ``rejected`` — TRL's standard format (all strings) and its
  conversational format (``prompt`` a list of messages, ``chosen``/``rejected`` lists of assistant messages);
  an optional top-level ``system`` string (Intel/orca_dpo_pairs) becomes the system message;
- ``chosen`` and ``rejected`` as two whole conversations that share their beginning (implicit prompt: TRL's
  implicit-prompt format, HuggingFaceH4/ultrafeedback_binarized — whose ``prompt`` string is then ignored — and
  Anthropic HH in messages), or as Anthropic HH text (``"\\n\\nHuman: …\\n\\nAssistant: …"``).

Each side is normalised by SFT's own record reader (:func:`gptforge.data.chat.to_conversation`: roles, content
parts, tool calls); the prompt is the longest run of messages both sides share, and both continuations must start
with an assistant turn. A pair whose two sides are identical carries no preference: it is dropped and counted.

Encoding goes through the one chat path (:func:`encode_prompt`, :func:`encode_conversation` with the checkpoint's
template): the prompt ids are exactly the ids inference would feed the model, ``prompt + chosen`` and
``prompt + rejected`` both start with them (checked), and only the answer tokens after them (assistant turns and
their end-of-turn token) carry labels; everything else is -100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.data.batching import Example
from gptforge.data.chat import (
    PromptStyle,
    check_style_tokens,
    encode_conversation,
    encode_prompt,
    load_records,
    to_conversation,
)
from gptforge.errors import GptforgeError
from gptforge.model import IGNORE_INDEX
from gptforge.tokenizer import Tokenizer

LAYOUTS = ("instruction", "prompt", "implicit", "hh")


@dataclass
class PreferencePair:
    """One preference: the shared prompt messages and the two continuations (assistant turns first)."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    index: int  # record index in its source
    source: str = ""
    tools: list[dict] = field(default_factory=list)


@dataclass
class EncodedPair:
    """Token ids of ``prompt + chosen`` and ``prompt + rejected`` (labels on the answers only), and the reference
    model's summed answer log-probs once they are computed."""

    chosen: Example
    rejected: Example
    prompt_len: int
    index: int
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


class IdenticalPair(GptforgeError):
    """A record whose chosen and rejected sides are the same: no preference to learn (dropped, counted)."""


# ---- records → pairs ---------------------------------------------------------------------------------------


def detect_layout(record) -> str:
    """The layout of one record, from its keys (see the module docstring)."""
    if not isinstance(record, dict):
        raise GptforgeError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise GptforgeError(f"missing field(s) {missing}: a preference record needs chosen and rejected "
                            f"(keys found: {sorted(record)})")
    chosen = record["chosen"]
    first = chosen[0] if isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) else {}
    if str(first.get("role", first.get("from"))).lower() in ("user", "human", "system"):
        return "implicit"  # whole conversations (a prompt string beside them, as in UltraFeedback, is redundant)
    if "prompt" in record or "question" in record:
        return "prompt"
    if "instruction" in record:
        return "instruction"
    if isinstance(chosen, str) and "\n\nAssistant:" in chosen:
        return "hh"
    if isinstance(chosen, list):
        return "implicit"
    raise GptforgeError(f"cannot tell the layout of a record with keys {sorted(record)}: expected a prompt "
                        "(prompt, question, or instruction + input) beside chosen and rejected, or chosen and "
                        "rejected as whole conversations (lists of messages, or Anthropic HH text)")


def _messages(value, role: str, where: str) -> list[dict]:
    """A side (or a prompt) as messages: a string is one ``role`` message, a message dict a list of one."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value:
        return value
    raise GptforgeError(f"{where} must be a string or a non-empty list of messages, got "
                        f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(text, where: str) -> list[dict]:
    """Anthropic HH text (``\\n\\nHuman: …\\n\\nAssistant: …``) as user/assistant messages."""
    if not isinstance(text, str):
        raise GptforgeError(f"{where} must be HH text like the other side, got {type(text).__name__}")
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise GptforgeError(f"{where}: text before the first 'Human:' turn")
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def _conversation(record: dict, layout: str, side: str, index: int) -> tuple[list[dict], list[dict]]:
    """(normalised messages of prompt + ``side``, tool schemas), through SFT's record reader."""
    if layout == "instruction":
        answer = record[side]
        fmt, key = ("dolly", "response") if "context" in record and "input" not in record else ("alpaca", "output")
        fields = {k: record.get(k) for k in ("instruction", "input", "context") if record.get(k) is not None}
        try:
            conv = to_conversation({**fields, key: answer}, fmt, index)
        except GptforgeError as e:  # name the record's own key, not the SFT format's
            raise GptforgeError(str(e).replace(f"{key!r}", f"{side!r}")) from None
        return conv.messages, conv.tools
    if layout == "hh":
        messages = parse_hh(record[side], f"record {index}: {side}")
    elif layout == "implicit":
        messages = _messages(record[side], "assistant", f"record {index}: {side}")
    else:
        key = "prompt" if "prompt" in record else "question"
        messages = (_messages(record[key], "user", f"record {index}: {key}")
                    + _messages(record[side], "assistant", f"record {index}: {side}"))
        system = record.get("system")
        first = messages[0] if isinstance(messages[0], dict) else {}
        if isinstance(system, str) and system.strip() and first.get("role") != "system":
            messages = [{"role": "system", "content": system}, *messages]
    conv = to_conversation({"messages": messages, "tools": record.get("tools")}, "messages", index)
    return conv.messages, conv.tools


def to_pair(record, index: int, source: str = "") -> PreferencePair:
    """One record as a :class:`PreferencePair`; a malformed one raises a GptforgeError naming its index."""
    try:
        layout = detect_layout(record)
    except GptforgeError as e:
        raise GptforgeError(f"record {index}: {e}") from None
    sides = {}
    for side in ("chosen", "rejected"):
        try:
            sides[side] = _conversation(record, layout, side, index)
        except GptforgeError as e:
            text = str(e)
            prefix = f"record {index}"
            text = text.replace(prefix, f"{prefix} ({side})", 1) if text.startswith(prefix) else f"{prefix} ({side}): {text}"
            raise GptforgeError(text) from None
    (chosen, tools), (rejected, _) = sides["chosen"], sides["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise IdenticalPair(f"record {index}: chosen and rejected are identical")
    if shared in (len(chosen), len(rejected)):
        short = "chosen" if shared == len(chosen) else "rejected"
        raise GptforgeError(f"record {index}: the {short} conversation is the beginning of the other one; both must "
                            "continue the shared prompt with their own assistant answer")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[shared]["role"] != "assistant":
            raise GptforgeError(f"record {index}: chosen and rejected part at a {messages[shared]['role']} turn "
                                f"(message {shared} of {side}); they must share the prompt and differ in the "
                                "assistant's answer")
    return PreferencePair(chosen[:shared], chosen[shared:], rejected[shared:], index, source, tools)


@dataclass
class PairStats:
    total: int = 0  # records read
    kept: int = 0
    skipped_bad: int = 0  # malformed (only with skip_bad)
    identical: int = 0  # chosen == rejected: no preference
    dropped_too_long: int = 0
    truncated: int = 0
    no_answer_tokens: int = 0  # no supervised token left on a side (only with skip_bad)
    tokens: int = 0
    answer_tokens: int = 0
    longest: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.total} pairs", f"{self.tokens:,} tokens", f"{self.answer_tokens:,} answer tokens"]
        for key, what in (("skipped_bad", "malformed skipped"), ("identical", "identical (no preference) dropped"),
                          ("dropped_too_long", "dropped as too long"), ("truncated", "truncated"),
                          ("no_answer_tokens", "without answer tokens skipped")):
            if getattr(self, key):
                parts.append(f"{getattr(self, key)} {what}")
        return ", ".join(parts)


def to_pairs(records: list, skip_bad: bool = False, source: str = "data") -> tuple[list[PreferencePair], PairStats]:
    """Convert records; without ``skip_bad`` the first malformed record raises (identical pairs are only counted)."""
    records = list(records)
    if not records:
        raise GptforgeError(f"{source}: no records")
    stats = PairStats(total=len(records))
    pairs = []
    for i, record in enumerate(records):
        try:
            pairs.append(to_pair(record, i, source))
        except IdenticalPair:
            stats.identical += 1
        except GptforgeError as e:
            if not skip_bad:
                raise GptforgeError(f"{source}: {e}; fix the record or pass --skip-bad") from None
            stats.skipped_bad += 1
    if not pairs:
        raise GptforgeError(f"{source}: none of its {len(records)} records is a usable preference pair "
                            f"({stats.summary()})")
    return pairs, stats


def load_pairs(sources: list[str | Path], hub_split: str = "train", skip_bad: bool = False, log=print
               ) -> tuple[list[PreferencePair], PairStats]:
    """Every source's records → pairs (counts summed over sources)."""
    pairs, total = [], PairStats()
    for source in sources:
        got, stats = to_pairs(load_records(source, hub_split), skip_bad, str(source))
        if stats.skipped_bad or stats.identical:
            log(f"{source}: {len(got)} pairs from {stats.total} records"
                + (f"; {stats.skipped_bad} malformed skipped" if stats.skipped_bad else "")
                + (f"; {stats.identical} with identical sides (no preference) dropped" if stats.identical else ""))
        pairs += got
        for key in ("total", "skipped_bad", "identical"):
            setattr(total, key, getattr(total, key) + getattr(stats, key))
    return pairs, total


# ---- pairs → ids + labels ----------------------------------------------------------------------------------


def encode_pair(pair: PreferencePair, tokenizer: Tokenizer, style: PromptStyle) -> EncodedPair:
    """Both sides through the one chat path; labels only on the continuation's assistant answers (all -100 in the
    prompt, earlier assistant turns of a multi-turn prompt included)."""
    prompt_ids = encode_prompt(pair.prompt, tokenizer, style, pair.tools)
    n = len(prompt_ids)
    sides = []
    for name, continuation in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ex = encode_conversation(pair.prompt + continuation, tokenizer, style, "all", pair.index, pair.tools)
        if ex.ids[:n] != prompt_ids:
            raise GptforgeError(f"record {pair.index}: the {style.name} template renders prompt + {name} with a "
                                "different beginning than the prompt alone; pairs cannot share their prompt ids")
        sides.append(Example(ex.ids, [IGNORE_INDEX] * n + ex.labels[n:], ex.index))
    return EncodedPair(sides[0], sides[1], n, pair.index)


def answer_tokens(ex: Example) -> int:
    """Supervised target positions (labels shifted by one, as the batches use them)."""
    return sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX)


def encode_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, style: PromptStyle, max_len: int,
                 overlength: str = "drop", skip_bad: bool = False, stats: PairStats | None = None,
                 progress: bool = True, desc: str = "tokenize") -> tuple[list[EncodedPair], PairStats]:
    """Encode pairs; a side longer than ``max_len`` + 1 tokens drops the pair (counted) or, with ``truncate``,
    cuts both sides. A side left without answer tokens (a prompt as long as ``max_len``) is an error naming the
    record (a counted skip with ``skip_bad``); a result without any pair raises."""
    if overlength not in ("drop", "truncate"):
        raise GptforgeError(f"overlength must be 'drop' or 'truncate', got {overlength!r}")
    check_style_tokens(tokenizer, style)
    from tqdm.auto import tqdm

    stats = stats or PairStats(total=len(pairs))
    out: list[EncodedPair] = []
    for pair in tqdm(pairs, desc=desc, unit="pair", disable=not progress, mininterval=1.0):
        enc = encode_pair(pair, tokenizer, style)
        if len(enc) > max_len + 1:  # inputs are ids[:-1], targets ids[1:]
            if overlength == "drop":
                stats.dropped_too_long += 1
                continue
            cut = lambda ex: Example(ex.ids[: max_len + 1], ex.labels[: max_len + 1], ex.index)
            enc = EncodedPair(cut(enc.chosen), cut(enc.rejected), enc.prompt_len, enc.index)
            stats.truncated += 1
        empty = [name for name, ex in (("chosen", enc.chosen), ("rejected", enc.rejected)) if answer_tokens(ex) == 0]
        if empty:
            if not skip_bad:
                raise GptforgeError(f"{pair.source or 'data'}: record {pair.index}: no answer token is supervised in "
                                    f"{' and '.join(empty)} ({len(enc)} tokens, max_len {max_len}); DPO would "
                                    "compare empty answers. Raise max_len, or pass --skip-bad to skip such pairs")
            stats.no_answer_tokens += 1
            continue
        out.append(enc)
        stats.tokens += len(enc.chosen) + len(enc.rejected)
        stats.answer_tokens += answer_tokens(enc.chosen) + answer_tokens(enc.rejected)
        stats.longest = max(stats.longest, len(enc))
    stats.kept = len(out)
    if pairs and not out:
        raise GptforgeError(f"{desc}: no usable pair among {len(pairs)} ({stats.summary()}); raise max_len, use "
                            "overlength=truncate, or check the data")
    return out, stats
