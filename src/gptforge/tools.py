"""Tool calling: tool schemas, the tool-call text format, and reading calls back out of a model's output.

The format is the one Hermes 2 Pro and Qwen2.5 use; ``templates/chatml.jinja`` renders it (SFT, inference and the
Hugging Face export share that template):

* **Tools** go in the system turn: the conversation's own system message (if any) and a blank line, then
  :data:`TOOLS_PREAMBLE`, one JSON schema per line (OpenAI's ``{"type": "function", "function": {...}}``), and
  ``</tools>``::

      <|im_start|>system
      You are helpful.

      # Tools

      You may call these functions:
      <tools>
      {"type": "function", "function": {"name": "get_weather", "description": ..., "parameters": {...}}}
      </tools><|im_end|>

* **Calls** are part of the assistant turn (so SFT supervises them), after any text and a newline, one block each::

      <|im_start|>assistant
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call><|im_end|>

* **Results** are a turn of their own with role ``tool`` (one per result; never supervised)::

      <|im_start|>tool
      <tool_response>
      {"temp_c": 18}
      </tool_response><|im_end|>

  (Qwen2.5 puts results inside a ``user`` turn and merges consecutive ones; a turn per result keeps the template
  incremental, which the SFT loss mask needs.)

JSON is written as ``json.dumps(value, ensure_ascii=False)`` (what Hugging Face's ``tojson`` filter writes), so the
export renders a conversation with ``apply_chat_template(messages, tools=...)`` exactly as gptforge does.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from gptforge.errors import GptforgeError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
CALL_PREFIX = '<tool_call>\n{"name": "'  # what the template writes before a call's name
ARGUMENTS_PREFIX = '", "arguments": '  # ... between the name and the arguments
# Shorter than Qwen's ~100-token instructions: a GPT-2-class model learns the call format from its SFT data, and
# its context is 1,024 tokens (a tiny test model's, 256).
TOOLS_PREAMBLE = "# Tools\n\nYou may call these functions:\n<tools>"
CHOICES = ("auto", "none", "required")


class ToolError(GptforgeError):
    """A malformed tool schema, call or ``tool_choice``; ``param`` names the request field (for HTTP errors)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ToolCallMissing(ToolError):
    """``tool_choice`` required a call (``required`` or a named function) and the model's reply has none that
    parses; the message quotes the reply."""


def dumps(value) -> str:
    """JSON as the template writes it (Hugging Face's ``tojson``: no ASCII escaping, keys in their order)."""
    return json.dumps(value, ensure_ascii=False)


# ---- schemas -----------------------------------------------------------------------------------------------


def normalize_tools(raw, where: str = "tools") -> list[dict]:
    """Tool definitions as OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters"}}]``.

    Accepts that form, bare function definitions (``[{"name", "description", "parameters"}]``, as LLaMA-Factory's
    ShareGPT ``tools`` field holds), one definition, or any of these as a JSON string. ``None``/empty → ``[]``.
    """
    if raw is None or raw == "" or raw == []:
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ToolError(f"{where} is not valid JSON ({e})", "tools") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise ToolError(f"{where} must be a list of function definitions, got {type(raw).__name__}", "tools")
    tools, names = [], set()
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise ToolError(f"{where}[{i}] must be an object, got {type(tool).__name__}", "tools")
        if "function" in tool or tool.get("type") == "function":
            if tool.get("type", "function") != "function":
                raise ToolError(f"{where}[{i}]: only 'function' tools are supported, got type {tool.get('type')!r}",
                                "tools")
            fn = tool.get("function")
        else:
            fn = tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ToolError(f"{where}[{i}] needs a function with a non-empty 'name' ({{'type': 'function', "
                            "'function': {'name': ..., 'description': ..., 'parameters': {...}}}})", "tools")
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], dict):
            raise ToolError(f"{where}[{i}]: 'parameters' must be a JSON schema object", "tools")
        if fn["name"] in names:
            raise ToolError(f"{where}[{i}]: the function name {fn['name']!r} is defined twice", "tools")
        names.add(fn["name"])
        tools.append({"type": "function", "function": fn})
    return tools


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


# ---- calls -------------------------------------------------------------------------------------------------


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def canonical_arguments(args, where: str) -> str:
    """A call's arguments (an object, or a JSON string of one) as canonical JSON text; ``""`` means ``{}``."""
    if args is None or (isinstance(args, str) and not args.strip()):
        return "{}"
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as e:
            raise ToolError(f"{where}: arguments are not valid JSON ({e}): {args[:80]!r}") from None
    if not isinstance(args, dict):
        raise ToolError(f"{where}: arguments must be a JSON object, got {type(args).__name__}")
    return dumps(args)


def normalize_tool_call(raw, where: str, index: int = 0) -> dict:
    """One call, OpenAI-style (``{id, type, function: {name, arguments}}``) or plain (``{name, arguments}``, as
    LLaMA-Factory's ``function_call`` turns hold), as ``{"id", "type": "function", "function": {"name",
    "arguments": canonical JSON string}}``."""
    if not isinstance(raw, dict):
        raise ToolError(f"{where} must be an object, got {type(raw).__name__}")
    fn = raw.get("function", raw)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise ToolError(f"{where} needs a function 'name' ({{'name': ..., 'arguments': {{...}}}})")
    call_id_ = raw.get("id")
    return {"id": call_id_ if isinstance(call_id_, str) and call_id_ else f"call_{index}", "type": "function",
            "function": {"name": fn["name"], "arguments": canonical_arguments(fn.get("arguments"), where)}}


def normalize_tool_calls(raw, where: str) -> list[dict]:
    """A list of calls (or one call, or a JSON string of either) → normalized calls (:func:`normalize_tool_call`)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ToolError(f"{where}: not valid JSON ({e}): {raw[:80]!r}") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ToolError(f"{where} must be a non-empty list of calls")
    return [normalize_tool_call(c, f"{where}[{k}]", k) for k, c in enumerate(raw)]


def format_tool_calls(calls: list[dict]) -> str:
    """The text the template renders for ``calls`` (normalized) in an assistant turn without content."""
    return "\n".join(CALL_PREFIX + c["function"]["name"] + ARGUMENTS_PREFIX + c["function"]["arguments"]
                     + "}\n" + TOOL_CALL_CLOSE for c in calls)


@dataclass
class ParsedReply:
    """A model's reply read for tool calls: ``calls`` empty when there was none (then ``error`` says why, if a
    ``<tool_call>`` block was there but unusable); ``content`` is the text before the first call (None if blank)."""

    content: str | None
    calls: list[dict] = field(default_factory=list)
    error: str | None = None


_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)


def parse_tool_calls(text: str, names: list[str] | None = None) -> ParsedReply:
    """Read ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks out of ``text``.

    All blocks must parse (a JSON object with a string ``name`` — one of ``names`` when given — and object
    ``arguments``, or a JSON string of one), else the reply counts as having no call and ``error`` says why. A last
    block cut off in or before its ``</tool_call>`` still counts if its JSON is complete. Text after the last call
    is dropped, as vLLM's Hermes parser does.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParsedReply(text, [], None)
    calls, decoder = [], json.JSONDecoder()
    for k, match in enumerate(_BLOCK.finditer(text, start)):
        body = match.group(1).strip()
        try:
            obj, end = decoder.raw_decode(body)
            rest = body[end:].strip()
            if rest and not (match.end() == len(text) and TOOL_CALL_CLOSE.startswith(rest)):
                raise ValueError(f"text after the JSON object: {rest[:40]!r}")
        except ValueError as e:
            return ParsedReply(text, [], f"tool call {k} is not valid JSON ({e})")
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return ParsedReply(text, [], f"tool call {k} is not an object with a string 'name'")
        if names is not None and obj["name"] not in names:
            return ParsedReply(text, [], f"tool call {k} names {obj['name']!r}, which is not one of the tools "
                                         f"{names}")
        try:
            arguments = canonical_arguments(obj.get("arguments", obj.get("parameters")), f"tool call {k}")
        except ToolError as e:
            return ParsedReply(text, [], str(e))
        calls.append({"id": call_id(), "type": "function", "function": {"name": obj["name"], "arguments": arguments}})
    content = text[:start].rstrip()
    return ParsedReply(content or None, calls, None)


# ---- a request's tools and tool_choice (the server) --------------------------------------------------------


@dataclass
class ToolRequest:
    """``tools`` and ``tool_choice`` of a chat request.

    ``auto``: the tools go in the prompt and the reply is parsed; no parseable call → the raw text.
    ``none``: the tools stay out of the prompt and the reply is plain text.
    ``required`` / a named function: as ``auto``, and the assistant turn is started with the call's opening
    (``<tool_call>\\n{"name": "`` and, for a named function, its name and ``", "arguments": ``) so the model can
    only continue a call; a reply that still does not parse is an error (:attr:`ParsedReply.error`), since the
    caller was promised a call.
    """

    tools: list[dict]
    choice: str = "auto"  # auto | none | required | function
    function: str | None = None  # the forced function's name (choice == "function")
    parallel: bool = True  # parallel_tool_calls: False keeps only the first call

    @property
    def prompt_tools(self) -> list[dict] | None:
        return None if self.choice == "none" or not self.tools else self.tools

    @property
    def parses(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def prefill(self) -> list[tuple[str, bool]]:
        """Text the assistant turn starts with, as ``(text, is_template_text)`` pieces: template text is encoded
        with special tokens allowed, a function name without (exactly as SFT encodes the turn)."""
        if self.choice == "required":
            return [(CALL_PREFIX, True)]
        if self.choice == "function":
            return [(CALL_PREFIX, True), (self.function, False), (ARGUMENTS_PREFIX, True)]
        return []

    def prefill_text(self) -> str:
        return "".join(text for text, _ in self.prefill())

    def prefill_ids(self, tokenizer) -> list[int]:
        return [t for text, special in self.prefill() for t in tokenizer.encode(text, allow_special=special)]

    def prompt_ids(self, messages: list[dict], tokenizer) -> list[int]:
        """The prompt: ``messages`` and the offered tools encoded as SFT encodes them (special tokens only where the
        template puts them), then the prefill of a forced call."""
        from gptforge.data.chat import encode_chat_prompt  # data.chat imports this module

        return encode_chat_prompt(messages, tokenizer, tools=self.prompt_tools) + self.prefill_ids(tokenizer)

    def parse(self, generated: str) -> ParsedReply:
        """The model's output (after the prefill) read for calls."""
        text = self.prefill_text() + generated
        reply = parse_tool_calls(text, tool_names(self.tools))
        if self.forced and not reply.calls and reply.error is None:
            reply.error = "the reply has no <tool_call> block"
        if self.choice == "function" and reply.calls and any(c["function"]["name"] != self.function
                                                              for c in reply.calls):
            reply.calls, reply.error = [], f"the reply calls a function other than {self.function!r}"
        if not self.parallel:
            reply.calls = reply.calls[:1]
        return reply

    def reply(self, generated: str, finish: str) -> tuple[dict, str]:
        """``(message, finish_reason)`` of one choice: ``tool_calls`` and ``"tool_calls"`` when the output has
        parseable calls, else the raw text and ``finish`` (or :class:`ToolCallMissing` when a call was forced)."""
        if not self.parses:
            return {"role": "assistant", "content": generated}, finish
        reply = self.parse(generated)
        if reply.calls:
            return {"role": "assistant", "content": reply.content, "tool_calls": reply.calls}, "tool_calls"
        if self.forced:
            raise self.missing(generated, reply)
        return {"role": "assistant", "content": generated}, finish

    def missing(self, generated: str, reply: ParsedReply) -> ToolCallMissing:
        forced = "'required'" if self.choice == "required" else f"the function {self.function!r}"
        text = self.prefill_text() + generated
        return ToolCallMissing(f"tool_choice asked for a call of {forced}, but the model produced no valid tool call "
                               f"({reply.error}); its output was: {text[:2000]!r}", "tool_choice")

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


def parse_tool_request(body: dict) -> ToolRequest | None:
    """``tools`` / ``tool_choice`` of an OpenAI chat request; None when the request has no tools."""
    tools = normalize_tools(body.get("tools"), "tools")
    raw = body.get("tool_choice")
    if raw is None:
        choice, name = ("auto" if tools else "none"), None
    elif isinstance(raw, str):
        if raw not in CHOICES:
            raise ToolError(f"'tool_choice' must be one of {list(CHOICES)} or {{'type': 'function', 'function': "
                            f"{{'name': ...}}}}, got {raw!r}", "tool_choice")
        choice, name = raw, None
    elif isinstance(raw, dict) and isinstance(raw.get("function"), dict) and isinstance(raw["function"].get("name"),
                                                                                        str):
        choice, name = "function", raw["function"]["name"]
        if tools and name not in tool_names(tools):
            raise ToolError(f"'tool_choice' names the function {name!r}, which is not in 'tools' "
                            f"({tool_names(tools)})", "tool_choice")
    else:
        raise ToolError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                        "{'name': ...}}", "tool_choice")
    if not tools:
        if choice in ("required", "function"):
            raise ToolError(f"'tool_choice' {json.dumps(raw)} needs 'tools'", "tool_choice")
        return None
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    return ToolRequest(tools, choice, name, parallel is not False)


def message_tool_fields(message: dict, where: str) -> dict:
    """The tool keys of an OpenAI chat message, normalized: an assistant's ``tool_calls``, a tool result's
    ``tool_call_id`` (and ``name``). Other keys are not kept."""
    out = {}
    role = message.get("role")
    if message.get("tool_calls") not in (None, []):  # some clients send an empty list for "no calls"
        if role != "assistant":
            raise ToolError(f"{where}: only assistant messages carry tool_calls", f"{where}.tool_calls")
        out["tool_calls"] = normalize_tool_calls(message["tool_calls"], f"{where}.tool_calls")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
    return out


def supports_tools(template: str) -> bool:
    """Whether a chat template renders tool schemas and calls (ours does; an older checkpoint's may not)."""
    return "tools" in template and "tool_calls" in template


class ToolCallStream:
    """Streaming side of :meth:`ToolRequest.parse`: :meth:`feed` returns the text that can go out as content now;
    :meth:`finish` returns the rest of the reply.

    Text before a ``<tool_call>`` streams as it comes (trailing whitespace and a partial ``<tool_call`` are held
    back); from the first ``<tool_call>`` on (from the start, when the call was forced) everything is held until the
    end, then sent as ``tool_calls`` — or as content, if it did not parse. The content sent is exactly the
    non-streamed reply's content.
    """

    def __init__(self, request: ToolRequest):
        self.request = request
        self.text = ""
        self.sent = 0
        self.holding = request.forced

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.holding:
            return ""
        start = self.text.find(TOOL_CALL_OPEN)
        if start >= 0:
            self.holding = True
            limit = start
        else:
            limit = len(self.text)
            for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.text)), 0, -1):
                if TOOL_CALL_OPEN.startswith(self.text[-k:]):
                    limit -= k
                    break
        limit = len(self.text[:limit].rstrip())
        if limit <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:limit], limit
        return out

    def finish(self) -> tuple[str, ParsedReply]:
        """``(content still to send, parsed reply)``."""
        reply = self.request.parse(self.text)
        if reply.calls:
            return "", reply
        return ("" if self.request.forced else self.text[self.sent:]), reply

    def delta(self, text: str) -> dict:
        """The chunk ``delta`` for a piece of generated text."""
        content = self.feed(text)
        return {"content": content} if content else {}

    def final_delta(self, finish: str) -> tuple[dict, str]:
        """The last chunk's ``(delta, finish_reason)``: the calls (OpenAI's ``delta.tool_calls``, each complete)
        and ``"tool_calls"``, or the held-back text and ``finish``; :class:`ToolCallMissing` when a call was forced."""
        tail, reply = self.finish()
        if reply.calls:
            return {"tool_calls": [{"index": k, **c} for k, c in enumerate(reply.calls)]}, "tool_calls"
        if self.request.forced:
            raise self.request.missing(self.text, reply)
        return ({"content": tail} if tail else {}), finish
