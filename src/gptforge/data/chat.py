"""Instruction data for SFT: records in four formats → conversations → token ids with a loss mask.

Pipeline: :func:`load_records` (local json/jsonl/parquet, or a hub dataset name) → :func:`to_conversations`
(format auto-detected or forced; malformed records raise with their index, or are skipped and counted) →
:func:`encode_conversation` (render with a prompt style, tokenize, label only assistant tokens) →
batches by padding or packing (:mod:`gptforge.data.batching`).

Formats: ``alpaca`` (instruction, input, output), ``dolly`` (instruction, context, response), ``sharegpt``
(conversations: [{from, value}]) and ``messages`` (OpenAI style: messages: [{role, content}]).

Tool calling (format and template layout: :mod:`gptforge.tools`): ``sharegpt`` records as LLaMA-Factory writes them
(roles ``human``/``gpt``/``function_call``/``observation``; a ``function_call`` value is the JSON of
``{"name", "arguments"}`` or a list of them; optional top-level ``system`` and ``tools``, the latter a JSON string or
a list of function schemas), and ``messages`` records as OpenAI writes them (assistant ``tool_calls: [{id, type,
function: {name, arguments}}]`` with arguments a JSON string or an object, ``{"role": "tool", "tool_call_id",
"content"}`` results, a top-level ``tools`` list). A conversation's messages are then ``{"role": "system" | "user" |
"assistant" | "tool", "content": str}``, an assistant's calls under ``tool_calls`` (arguments as canonical JSON
text), and :attr:`Conversation.tools` holds the schemas in OpenAI's form.

Prompt styles, both Jinja templates so the checkpoint can carry them: ``chat`` (the ChatML template of
:mod:`gptforge.chat_template`, end of turn ``<|im_end|>``, needs the chat tokens in the vocabulary) and
``alpaca`` (the text template of Raschka's book for GPT-2 without new tokens; end of turn ``<|endoftext|>``).

Masking: a conversation is rendered message by message (the template must render a prefix of the messages
as a prefix of the text). The tokens of an assistant turn after its header, up to and including the
end-of-turn token, are supervised (its ``<tool_call>`` blocks included); all others get -100 (tool results
included). Message contents, tool-call names and arguments and tool schemas are tokenized with special tokens
disabled, so a user (or a tool) who types ``<|im_end|>`` cannot forge a turn boundary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gptforge.chat_template import content_text, default_template, render_chat
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
from gptforge.data.records import load_records  # noqa: F401  (re-exported: SFT and DPO read records here)
from gptforge.errors import GptforgeError
from gptforge.model import IGNORE_INDEX
from gptforge.tokenizer import EOT, IM_END, IM_START, Tokenizer
from gptforge.tools import (
    dumps,
    format_tool_calls,
    message_tool_fields,
    normalize_tool_calls,
    normalize_tools,
    supports_tools,
)

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
                   "system": "system", "observation": "tool", "tool": "tool", "function": "tool"}
_ROLES = ("system", "user", "assistant", "tool")


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
    reference: str = ""  # the last assistant answer (its text, then its tool calls as the template writes them)
    tools: list[dict] = field(default_factory=list)  # tool schemas, OpenAI form (gptforge.tools.normalize_tools)


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
    tools = normalize_tools(record.get("tools"), f"record {index}: tools")
    messages = []
    system = record.get("system")  # LLaMA-Factory's optional system column
    if isinstance(system, str) and system.strip() and fmt == "sharegpt":
        messages.append({"role": "system", "content": system.strip()})
    for t, turn in enumerate(turns):
        where = f"record {index}, turn {t}"
        rk, ck = role_key, content_key
        if isinstance(turn, dict) and rk not in turn and ("role" if rk == "from" else "from") in turn:
            rk, ck = ("role", "content") if rk == "from" else ("from", "value")  # the other layout's turn keys
        calls_only = isinstance(turn, dict) and turn.get(ck) is None and (
            turn.get("tool_calls") or turn.get("function_call"))
        if not isinstance(turn, dict) or rk not in turn or (ck not in turn and not calls_only):
            raise GptforgeError(f"{where}: expected {{{role_key!r}, {content_key!r}}}, got {turn!r}")
        raw_role = str(turn[rk]).lower()
        if raw_role == "function_call":  # LLaMA-Factory: the value is the call (or a list of calls) as JSON
            calls = normalize_tool_calls(turn[ck], f"{where}: function_call")
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and "tool_calls" not in previous:
                previous["tool_calls"] = calls  # text, then the call: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        role = _SHAREGPT_ROLES.get(raw_role)
        if role not in _ROLES:
            expected = ("human, gpt, system, function_call or observation" if fmt == "sharegpt"
                        else "system, user, assistant or tool")
            raise GptforgeError(f"{where}: unknown role {turn[rk]!r} (expected {expected})")
        raw_content = turn.get(ck)
        if raw_content is None:
            content = ""
        elif role == "tool":
            content = _tool_result_text(raw_content, f"{where}: {ck}")
        else:
            content = content_text(raw_content, f"{where}: {ck}")
        message = {"role": role, "content": content.strip()}
        if role == "assistant" and isinstance(turn.get("function_call"), dict) and not turn.get("tool_calls"):
            turn = {**turn, "tool_calls": [turn["function_call"]]}  # OpenAI's deprecated single call
        message.update(message_tool_fields({**turn, "role": role}, where))
        messages.append(message)
    _check_turns(messages, index)
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    last_user = max((i for i, m in enumerate(messages[:last_answer]) if m["role"] == "user"), default=None)
    instruction = messages[last_user]["content"] if last_user is not None else ""
    return Conversation(messages, index, instruction, "", _answer_text(messages[last_answer]), tools)


def _tool_result_text(content, where: str) -> str:
    """A tool result as text: a string or text parts as usual; a structured result (an object, a number) as JSON."""
    try:
        return content_text(content, where)
    except GptforgeError:
        return dumps(content)


def _answer_text(message: dict) -> str:
    """An assistant turn as the template writes it: its text, then its calls."""
    calls = format_tool_calls(message["tool_calls"]) if message.get("tool_calls") else ""
    return "\n".join(part for part in (message["content"], calls) if part)


def _check_turns(messages: list[dict], index: int) -> None:
    body = [m for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[1:]):
        raise GptforgeError(f"record {index}: a system message may only come first")
    if not body or body[0]["role"] != "user":
        raise GptforgeError(f"record {index}: the conversation must start with a user turn (after an optional "
                            "system message)")
    if not any(m["role"] == "assistant" for m in body):
        raise GptforgeError(f"record {index}: no assistant turn, so nothing to learn from")
    if any(m["role"] == "assistant" and not m["content"] and not m.get("tool_calls") for m in body):
        raise GptforgeError(f"record {index}: an assistant turn is empty")
    for k, m in enumerate(body):
        if m["role"] == "tool" and (k == 0 or not (body[k - 1]["role"] == "tool" or body[k - 1].get("tool_calls"))):
            raise GptforgeError(f"record {index}: a tool result (observation) must follow an assistant tool call "
                                "(function_call) or another tool result")


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

# \x00 <message or tool index> <kind> [<call index>] \x00; kinds: c content, i input, n call name, a call arguments,
# t tool schema
_PLACEHOLDER = re.compile("\x00(\\d+)([cinat])(\\d*)\x00")


def _placeholders(messages: list[dict]) -> list[dict]:
    """Messages whose texts are replaced by markers, so rendered template text and content can be told apart.

    An empty content stays empty (templates test it: ``{% if message['content'] %}``); tool calls keep their
    structure with markers for the name and the arguments (JSON text, which the template writes as it is)."""
    out = []
    for i, m in enumerate(messages):
        ph = {"role": m["role"], "content": f"\x00{i}c\x00" if m["content"] else ""}
        if m.get("input"):
            ph["input"] = f"\x00{i}i\x00"
        if m.get("tool_calls"):
            ph["tool_calls"] = [{"type": "function", "function": {"name": f"\x00{i}n{j}\x00",
                                                                  "arguments": f"\x00{i}a{j}\x00"}}
                                for j in range(len(m["tool_calls"]))]
        out.append(ph)
    return out


def _tool_texts(tools) -> list[str]:
    """Tool schemas (any form :func:`gptforge.tools.normalize_tools` takes) as the JSON texts the template lists;
    a list of strings is taken as such texts already."""
    if not tools:
        return []
    if isinstance(tools, (list, tuple)) and all(isinstance(t, str) for t in tools):
        return list(tools)
    return [dumps(t) for t in normalize_tools(tools)]


def _tool_placeholders(tools: list[str]) -> list[str]:
    return [f"\x00{j}t\x00" for j in range(len(tools))]


def _check_tool_support(messages: list[dict], tools: list[str], style: PromptStyle) -> None:
    if (tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)) \
            and not supports_tools(style.template):
        raise GptforgeError(f"the {style.name!r} prompt style's template cannot render tools, tool calls or tool "
                            "results; use the chat style (gptforge's ChatML template renders them)")


def _render_regions(messages: list[dict], style: PromptStyle, add_generation_prompt: bool,
                    tools: list[str] = ()) -> list[tuple[str, bool, int]]:
    """The rendered conversation as ``(text_with_markers, supervised, message_index)`` regions.

    A message's region is what rendering it adds to the text of the messages before it. An assistant region is
    split into its header (what the generation prompt adds), the supervised answer up to and including the
    end-of-turn token, and any trailing text.
    """
    ph, tph = _placeholders(messages), _tool_placeholders(tools)
    regions: list[tuple[str, bool, int]] = []
    previous = ""
    for k in range(len(ph)):
        text = render_chat(ph[: k + 1], style.template, tools=tph)
        if not text.startswith(previous):
            raise GptforgeError(f"the {style.name} template does not render conversations incrementally "
                                f"(message {k} changes earlier text); masks cannot be computed")
        delta = text[len(previous):]
        if ph[k]["role"] == "assistant":
            prompt = render_chat(ph[:k], style.template, add_generation_prompt=True, tools=tph) if k else ""
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
        text = render_chat(ph, style.template, add_generation_prompt=True, tools=tph)
        regions.append((text[len(previous):], False, len(ph)))
    return [r for r in regions if r[0]]


def _encode_region(text: str, messages: list[dict], tokenizer: Tokenizer, tools: list[str] = ()) -> list[int]:
    """Template text with special tokens enabled; message texts, tool calls and tool schemas (the markers) with
    special tokens disabled."""
    ids: list[int] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        if match.start() > pos:
            ids += tokenizer.encode(text[pos:match.start()], allow_special=True)
        n, kind = int(match.group(1)), match.group(2)
        if kind == "t":
            value = tools[n]
        elif kind in "na":
            fn = messages[n]["tool_calls"][int(match.group(3))]["function"]
            value = fn["name"] if kind == "n" else fn["arguments"]
        else:
            value = messages[n]["content"] if kind == "c" else messages[n]["input"]
        ids += tokenizer.encode(value, allow_special=False)
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
                        train_on: str = "all", index: int = -1, tools: list | None = None) -> Example:
    """Token ids of the whole conversation and labels: assistant answers (all, or only the ``last``; text and tool
    calls) plus their end-of-turn token are supervised; everything else (tool results too) is -100. ``tools``: the
    conversation's tool schemas (:attr:`Conversation.tools`)."""
    if train_on not in ("all", "last"):
        raise GptforgeError(f"train_on must be 'all' or 'last', got {train_on!r}")
    messages = style.messages_for(messages)
    tools = _tool_texts(tools)
    _check_tool_support(messages, tools, style)
    regions = _render_regions(messages, style, add_generation_prompt=False, tools=tools)
    last_answer = max((k for _, sup, k in regions if sup), default=-1)
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised, k in regions:
        piece = _encode_region(text, messages, tokenizer, tools)
        ids += piece
        keep = supervised and (train_on == "all" or k == last_answer)
        labels += piece if keep else [IGNORE_INDEX] * len(piece)
    return Example(ids, labels, index)


def encode_prompt(messages: list[dict], tokenizer: Tokenizer, style: PromptStyle,
                  tools: list | None = None) -> list[int]:
    """Token ids of ``messages`` (and ``tools``) plus the assistant header: exactly the prefix the model saw in
    training."""
    messages = style.messages_for(messages)
    tools = _tool_texts(tools)
    _check_tool_support(messages, tools, style)
    regions = _render_regions(messages, style, add_generation_prompt=True, tools=tools)
    return [t for text, _, _ in regions for t in _encode_region(text, messages, tokenizer, tools)]


def style_for(tokenizer: Tokenizer) -> PromptStyle:
    """The prompt style a checkpoint was fine-tuned with, from its tokenizer's template (default: ChatML)."""
    template = tokenizer.chat_template or default_template()
    if IM_END in template:
        return PromptStyle("chat", template, IM_END, (IM_START, IM_END))
    return PromptStyle("custom", template, EOT, (), merge_input=False)  # e.g. alpaca: turns end with EOT


def encode_chat_prompt(messages: list[dict], tokenizer: Tokenizer, style: PromptStyle | None = None,
                       tools: list | None = None) -> list[int]:
    """The one way inference turns messages into a prompt: exactly SFT's encoding (:func:`encode_prompt`).

    The template renders the structure (role markers become special tokens); message contents are encoded with
    special tokens disabled, so text such as ``<|im_end|>\\n<|im_start|>assistant`` inside a message stays text
    and cannot forge a turn. A template that does not render incrementally is rendered once, with the same rule.
    Messages may carry OpenAI tool calls (assistant ``tool_calls``, ``tool`` results); ``tools`` are the schemas
    offered to the model (:mod:`gptforge.tools`).
    """
    style = style or style_for(tokenizer)
    if not messages:
        raise GptforgeError("messages is empty; give at least one {'role': 'user', 'content': ...} message")
    messages = [_prompt_message(m, i) if isinstance(m, dict) else m for i, m in enumerate(messages)]
    tools = _tool_texts(tools)
    _check_tool_support([m for m in messages if isinstance(m, dict)], tools, style)
    try:
        return encode_prompt(messages, tokenizer, style, tools)
    except GptforgeError:
        messages = style.messages_for(messages)
        text = render_chat(_placeholders(messages), style.template, add_generation_prompt=True,
                           tools=_tool_placeholders(tools))
        return _encode_region(text, messages, tokenizer, tools)


def _prompt_message(m: dict, i: int) -> dict:
    """One inference message: content as text (None is allowed beside tool calls), tool calls normalized."""
    where = f"messages[{i}]"
    if m.get("content") is None and (m.get("tool_calls") or m.get("role") == "tool"):
        content = ""
    else:
        content = content_text(m.get("content"), f"{where}.content")
    return {**m, "content": content, **message_tool_fields(m, where)}


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
        ex = encode_conversation(conv.messages, tokenizer, style, train_on, conv.index, conv.tools)
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
