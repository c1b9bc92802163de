"""Instruction data for SFT: records in four formats → conversations → token ids with a loss mask.

Pipeline: :func:`load_records` (local json/jsonl/parquet, or a hub dataset name) → :func:`to_conversations`
(format auto-detected or forced; malformed records raise with their index, or are skipped and counted) →
:func:`encode_conversation` (render with a prompt style, tokenize, label only assistant tokens) →
batches by padding or packing (:mod:`gptforge.data.batching`).

Formats: ``alpaca`` (instruction, input, output), ``dolly`` (instruction, context, response), ``sharegpt``
(conversations: [{from, value}]) and ``messages`` (OpenAI style: messages: [{role, content}]).

Prompt styles, both Jinja templates so the checkpoint can carry them: ``chat`` (the ChatML template of
:mod:`gptforge.chat_template`, end of turn ``<|im_end|>``, needs the chat tokens in the vocabulary) and
``alpaca`` (the text template of Raschka's book for GPT-2 without new tokens; end of turn ``<|endoftext|>``).

Masking: a conversation is rendered message by message (the template must render a prefix of the messages
as a prefix of the text). The tokens of an assistant turn after its header, up to and including the
end-of-turn token, are supervised; all others get -100. Message contents are tokenized with special tokens
disabled, so a user who types ``<|im_end|>`` cannot forge a turn boundary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gptforge.chat_template import default_template, render_chat
from gptforge.data.batching import (  # noqa: F401  (re-exported: SFT batches are part of this module's API)
    Batch,
    Example,
    epoch_batches,
    length_grouped_order,
    pack_batch,
    pack_examples,
    pad_batch,
    split_indices,
)
from gptforge.errors import GptforgeError
from gptforge.io import iter_jsonl
from gptforge.model import IGNORE_INDEX
from gptforge.tokenizer import EOT, IM_END, IM_START, Tokenizer

FORMATS = ("alpaca", "dolly", "sharegpt", "messages")
STYLES = ("chat", "alpaca")

# Our wording of the Alpaca prompt (Taori et al. 2023; Raschka, "Build a Large Language Model", ch. 7).
# Whitespace sits at the start of each turn so that rendering turn by turn tokenizes like the whole text.
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
    "{%- else -%}" + ALPACA_PREAMBLE + "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '\\n\\n### Instruction:\\n' + message['content'] }}"
    "{%- if message['input'] is defined and message['input'] -%}{{ '\\n\\n### Input:\\n' + message['input'] }}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '\\n\\n### Response:\\n' + message['content'] + '<|endoftext|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\n### Response:\\n' }}{%- endif -%}"
)

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                   "system": "system"}
_ROLES = ("system", "user", "assistant")


@dataclass
class PromptStyle:
    """How conversations become text: the Jinja template and the token that ends an assistant turn."""

    name: str
    template: str
    end_of_turn: str
    special_tokens: tuple[str, ...] = ()  # tokens the vocabulary must have
    merge_input: bool = True  # fold an Alpaca/Dolly ``input`` into the user content (templates without a slot)

    def messages_for(self, messages: list[dict]) -> list[dict]:
        """``messages`` as this style's template expects them."""
        if not self.merge_input or not any(m.get("input") for m in messages):
            return messages
        return [{"role": m["role"], "content": f"{m['content']}\n\n{m['input']}"} if m.get("input") else m
                for m in messages]


def prompt_style(name: str, template: str | None = None) -> PromptStyle:
    """The ``chat`` (ChatML, ``<|im_end|>``) or ``alpaca`` (text, ``<|endoftext|>``) prompt style."""
    if name == "chat":
        return PromptStyle("chat", template or default_template(), IM_END, (IM_START, IM_END))
    if name == "alpaca":
        return PromptStyle("alpaca", template or ALPACA_TEMPLATE, EOT, (), merge_input=False)
    raise GptforgeError(f"unknown prompt style {name!r}; use one of: {', '.join(STYLES)}")


@dataclass
class Conversation:
    """One training example: the messages plus the fields the test-response file reports."""

    messages: list[dict]
    index: int  # record index in its source (for error messages)
    instruction: str = ""
    input: str = ""
    reference: str = ""  # the last assistant answer


# ---- loading records ---------------------------------------------------------------------------------------


def load_records(source: str | Path, hub_split: str = "train") -> list[dict]:
    """Records from a local ``.json`` (a list, or a dict holding one), ``.jsonl`` or ``.parquet`` file,
    or from a Hugging Face hub dataset name (``tatsu-lab/alpaca``) via ``datasets``."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        return _read_json(path)
    if path.exists():
        raise GptforgeError(f"{path} is not a file; pass a .json/.jsonl/.parquet file or a hub dataset name")
    looks_like_file = path.suffix.lower() in (".json", ".jsonl", ".parquet") or str(source).startswith((".", "/"))
    if looks_like_file or str(source).count("/") != 1:
        raise GptforgeError(f"data file not found: {source} (pass a .json/.jsonl/.parquet file or a hub "
                            "dataset name like tatsu-lab/alpaca)")
    try:
        import datasets
    except ImportError:
        raise GptforgeError(f"{source} is not a local file; loading hub datasets needs: pip install "
                            "'gptforge[data]'") from None
    try:
        ds = datasets.load_dataset(str(source), split=hub_split)
    except Exception as e:  # noqa: BLE001 -- network, unknown name, missing split: one line for the user
        raise GptforgeError(f"cannot load hub dataset {source!r} (split {hub_split!r}): {e}; "
                            "check the name and your network, or pass a local file") from None
    return [dict(r) for r in ds]


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:
            return _read_jsonl(path)  # JSON lines saved as .json
        raise GptforgeError(f"invalid JSON in {path}:{e.lineno}: {e.msg}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise GptforgeError(f"{path}: expected a list of records (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise GptforgeError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


# ---- records → conversations -------------------------------------------------------------------------------


def detect_format(record: dict) -> str:
    """The format of one record, from its keys."""
    if not isinstance(record, dict):
        raise GptforgeError(f"expected a JSON object per record, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise GptforgeError(
        f"cannot tell the format of a record with keys {sorted(keys)}: expected alpaca (instruction, input, "
        "output), dolly (instruction, context, response), sharegpt (conversations) or messages (messages); "
        "set the format explicitly with --format")


def detect_dataset_format(records: list[dict], sample: int = 32) -> str:
    """The most common format among the first ``sample`` well-formed records."""
    counts: dict[str, int] = {}
    for r in records[:sample]:
        try:
            fmt = detect_format(r)
        except GptforgeError:
            continue
        counts[fmt] = counts.get(fmt, 0) + 1
    if not counts:
        detect_format(records[0] if records else {})  # raises the explanatory error
    return max(counts, key=counts.get)


def _text(record: dict, key: str, index: int, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise GptforgeError(f"record {index}: missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise GptforgeError(f"record {index}: field {key!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise GptforgeError(f"record {index}: field {key!r} is empty")
    return value


def to_conversation(record: dict, fmt: str, index: int) -> Conversation:
    """One record of format ``fmt`` as a :class:`Conversation`; malformed → GptforgeError naming the index."""
    if not isinstance(record, dict):
        raise GptforgeError(f"record {index}: expected a JSON object, got {type(record).__name__}")
    if fmt in ("alpaca", "dolly"):
        answer_key, context_key = ("output", "input") if fmt == "alpaca" else ("response", "context")
        instruction = _text(record, "instruction", index, True)
        context = _text(record, context_key, index, False)
        answer = _text(record, answer_key, index, True)
        user = {"role": "user", "content": instruction}
        if context:
            user["input"] = context
        return Conversation([user, {"role": "assistant", "content": answer}], index, instruction, context, answer)
    if fmt == "sharegpt":
        turns = record.get("conversations")
        role_key, content_key = "from", "value"
    elif fmt == "messages":
        turns = record.get("messages")
        role_key, content_key = "role", "content"
    else:
        raise GptforgeError(f"unknown data format {fmt!r}; use one of: auto, {', '.join(FORMATS)}")
    if not isinstance(turns, list) or not turns:
        raise GptforgeError(f"record {index}: expected a non-empty list under "
                            f"{'conversations' if fmt == 'sharegpt' else 'messages'}")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise GptforgeError(f"record {index}, turn {t}: expected {{{role_key!r}, {content_key!r}}}, got {turn!r}")
        raw_role = str(turn[role_key]).lower()
        role = _SHAREGPT_ROLES.get(raw_role) if fmt == "sharegpt" else raw_role
        if role not in _ROLES:
            raise GptforgeError(f"record {index}, turn {t}: unknown role {turn[role_key]!r} "
                                f"(expected system, user or assistant)")
        content = turn[content_key]
        if not isinstance(content, str):
            raise GptforgeError(f"record {index}, turn {t}: content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content.strip()})
    _check_turns(messages, index)
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    last_user = max((i for i, m in enumerate(messages[:last_answer]) if m["role"] == "user"), default=None)
    instruction = messages[last_user]["content"] if last_user is not None else ""
    return Conversation(messages, index, instruction, "", messages[last_answer]["content"])


def _check_turns(messages: list[dict], index: int) -> None:
    body = [m for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[1:]):
        raise GptforgeError(f"record {index}: a system message may only come first")
    if not body or body[0]["role"] != "user":
        raise GptforgeError(f"record {index}: the conversation must start with a user turn (after an optional "
                            "system message)")
    if not any(m["role"] == "assistant" for m in body):
        raise GptforgeError(f"record {index}: no assistant turn, so nothing to learn from")
    if any(m["role"] == "assistant" and not m["content"] for m in body):
        raise GptforgeError(f"record {index}: an assistant turn is empty")


def to_conversations(records: Iterable[dict], fmt: str = "auto", skip_bad: bool = False,
                     source: str = "data") -> tuple[list[Conversation], int]:
    """Convert records; returns ``(conversations, n_skipped)``. Without ``skip_bad`` the first bad record raises."""
    records = list(records)
    if not records:
        raise GptforgeError(f"{source}: no records")
    if fmt == "auto":
        fmt = detect_dataset_format(records)
    elif fmt not in FORMATS:
        raise GptforgeError(f"unknown data format {fmt!r}; use one of: auto, {', '.join(FORMATS)}")
    out, skipped = [], 0
    for i, record in enumerate(records):
        try:
            out.append(to_conversation(record, fmt, i))
        except GptforgeError as e:
            if not skip_bad:
                raise GptforgeError(f"{source}: {e} (format {fmt}); fix the record or pass --skip-bad") from None
            skipped += 1
    if not out:
        raise GptforgeError(f"{source}: all {len(records)} records are malformed for format {fmt!r}")
    return out, skipped


# ---- conversations → ids + labels --------------------------------------------------------------------------

_PLACEHOLDER = re.compile("\x00(\\d+)([ci])\x00")


def _placeholders(messages: list[dict]) -> list[dict]:
    """Messages whose texts are replaced by markers, so rendered template text and content can be told apart."""
    out = []
    for i, m in enumerate(messages):
        ph = {"role": m["role"], "content": f"\x00{i}c\x00"}
        if m.get("input"):
            ph["input"] = f"\x00{i}i\x00"
        out.append(ph)
    return out


def _render_regions(messages: list[dict], style: PromptStyle, add_generation_prompt: bool
                    ) -> list[tuple[str, bool, int]]:
    """The rendered conversation as ``(text_with_markers, supervised, message_index)`` regions.

    A message's region is what rendering it adds to the text of the messages before it. An assistant region is
    split into its header (what the generation prompt adds), the supervised answer up to and including the
    end-of-turn token, and any trailing text.
    """
    ph = _placeholders(messages)
    regions: list[tuple[str, bool, int]] = []
    previous = ""
    for k in range(len(ph)):
        text = render_chat(ph[: k + 1], style.template)
        if not text.startswith(previous):
            raise GptforgeError(f"the {style.name} template does not render conversations incrementally "
                                f"(message {k} changes earlier text); masks cannot be computed")
        delta = text[len(previous):]
        if ph[k]["role"] == "assistant":
            prompt = render_chat(ph[:k], style.template, add_generation_prompt=True) if k else ""
            header = prompt[len(previous):]
            if not delta.startswith(header):
                raise GptforgeError(f"the {style.name} template's generation prompt {header!r} does not start "
                                    "the assistant turn it renders")
            body = delta[len(header):]
            end = body.rfind(style.end_of_turn)
            if end < 0:
                raise GptforgeError(f"the {style.name} template does not end assistant turns with "
                                    f"{style.end_of_turn!r}")
            end += len(style.end_of_turn)
            regions += [(header, False, k), (body[:end], True, k), (body[end:], False, k)]
        else:
            regions.append((delta, False, k))
        previous = text
    if add_generation_prompt:
        text = render_chat(ph, style.template, add_generation_prompt=True)
        regions.append((text[len(previous):], False, len(ph)))
    return [r for r in regions if r[0]]


def _encode_region(text: str, messages: list[dict], tokenizer: Tokenizer) -> list[int]:
    """Template text with special tokens enabled; message texts (the markers) with special tokens disabled."""
    ids: list[int] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        if match.start() > pos:
            ids += tokenizer.encode(text[pos:match.start()], allow_special=True)
        m = messages[int(match.group(1))]
        ids += tokenizer.encode(m["content"] if match.group(2) == "c" else m["input"], allow_special=False)
        pos = match.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:], allow_special=True)
    return ids


def check_style_tokens(tokenizer: Tokenizer, style: PromptStyle) -> None:
    """The vocabulary must hold the style's special tokens (added by ``prepare_chat_model`` in SFT)."""
    missing = [t for t in (*style.special_tokens, style.end_of_turn) if t not in tokenizer.special_tokens]
    if missing:
        raise GptforgeError(f"the tokenizer lacks the special tokens {missing} that the {style.name!r} prompt style "
                            "needs; add them with tokenizer.add_special_tokens (gptforge sft does this)")


def encode_conversation(messages: list[dict], tokenizer: Tokenizer, style: PromptStyle,
                        train_on: str = "all", index: int = -1) -> Example:
    """Token ids of the whole conversation and labels: assistant answers (all, or only the ``last``) plus their
    end-of-turn token are supervised; everything else is -100."""
    if train_on not in ("all", "last"):
        raise GptforgeError(f"train_on must be 'all' or 'last', got {train_on!r}")
    messages = style.messages_for(messages)
    regions = _render_regions(messages, style, add_generation_prompt=False)
    last_answer = max((k for _, sup, k in regions if sup), default=-1)
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised, k in regions:
        piece = _encode_region(text, messages, tokenizer)
        ids += piece
        keep = supervised and (train_on == "all" or k == last_answer)
        labels += piece if keep else [IGNORE_INDEX] * len(piece)
    return Example(ids, labels, index)


def encode_prompt(messages: list[dict], tokenizer: Tokenizer, style: PromptStyle) -> list[int]:
    """Token ids of ``messages`` plus the assistant header: exactly the prefix the model saw in training."""
    messages = style.messages_for(messages)
    regions = _render_regions(messages, style, add_generation_prompt=True)
    return [t for text, _, _ in regions for t in _encode_region(text, messages, tokenizer)]


def prompt_messages(conversation: Conversation) -> list[dict]:
    """The conversation up to (not including) its last assistant answer."""
    last = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
    return conversation.messages[:last]


@dataclass
class EncodeStats:
    total: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    supervised_tokens: int = 0
    tokens: int = 0
    longest: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.total} examples", f"{self.tokens:,} tokens",
                 f"{self.supervised_tokens:,} supervised"]
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as too long")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        return ", ".join(parts)


def encode_dataset(conversations: list[Conversation], tokenizer: Tokenizer, style: PromptStyle, max_len: int,
                   train_on: str = "all", overlength: str = "drop", progress: bool = True,
                   desc: str = "tokenize") -> tuple[list[Example], EncodeStats]:
    """Encode conversations; examples longer than ``max_len`` + 1 tokens are dropped (counted) or truncated.

    A truncated example that loses all its supervised tokens is dropped too. A result with no supervised
    token at all raises: training on it would report a silent zero loss.
    """
    if overlength not in ("drop", "truncate"):
        raise GptforgeError(f"overlength must be 'drop' or 'truncate', got {overlength!r}")
    check_style_tokens(tokenizer, style)
    from tqdm.auto import tqdm

    stats = EncodeStats(total=len(conversations))
    examples: list[Example] = []
    for conv in tqdm(conversations, desc=desc, unit="ex", disable=not progress, mininterval=1.0):
        ex = encode_conversation(conv.messages, tokenizer, style, train_on, conv.index)
        if len(ex.ids) > max_len + 1:  # inputs are ids[:-1], targets ids[1:]
            if overlength == "drop":
                stats.dropped_too_long += 1
                continue
            ex = Example(ex.ids[: max_len + 1], ex.labels[: max_len + 1], ex.index)
            if ex.num_supervised == 0 or all(t == IGNORE_INDEX for t in ex.labels[1:]):
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
        examples.append(ex)
        stats.tokens += len(ex.ids)
        stats.supervised_tokens += sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX)
        stats.longest = max(stats.longest, len(ex.ids))
    stats.kept = len(examples)
    if stats.supervised_tokens == 0:
        raise GptforgeError(f"{desc}: no supervised (assistant) tokens in {stats.total} conversations "
                            f"({stats.summary()}); raise max_len, use overlength=truncate, or check the data")
    return examples, stats
