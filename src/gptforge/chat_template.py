"""The chat template: written once in Jinja (``templates/chatml.jinja``), used for SFT, generation and export.

Messages are ``{"role": "system"|"user"|"assistant", "content": str}``. The rendered text uses the special
tokens ``<|im_start|>`` and ``<|im_end|>``; an assistant turn ends with ``<|im_end|>`` (the end-of-turn token).
"""

from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources

from gptforge.errors import GptforgeError

RENDER_TIME_LIMIT_S = 5.0  # per render; a checkpoint's template that loops is stopped (see render_time_limit)
_budget = threading.local()


def default_template() -> str:
    return resources.files("gptforge").joinpath("templates/chatml.jinja").read_text(encoding="utf-8")


@contextmanager
def render_time_limit(seconds: float):
    """Every render inside shares one budget of ``seconds`` (a conversation is rendered once per message); past
    it, rendering stops with a :class:`GptforgeError` naming the template. The server sets one per request."""
    outer = getattr(_budget, "limit", None)
    deadline = time.monotonic() + seconds
    if outer is None or deadline < outer[0]:
        _budget.limit = (deadline, seconds)
    try:
        yield
    finally:
        _budget.limit = outer


class _TooSlow(Exception):
    pass


def _check_time() -> None:
    limit = getattr(_budget, "limit", None)
    if limit is not None and time.monotonic() > limit[0]:
        raise _TooSlow(limit[1])


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Timed(ImmutableSandboxedEnvironment):
        """Checks the time at every call, attribute or item access and ``*``/``**`` (loops do one of them), and
        refuses ``*``/``**`` results too large to build (one C call that no check could interrupt)."""

        intercepted_binops = frozenset(["*", "**"])

        def call(self, context, obj, /, *args, **kwargs):
            _check_time()
            return super().call(context, obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            _check_time()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _check_time()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator, left, right):
            _check_time()
            sizes = [len(x) for x in (left, right) if isinstance(x, (str, list, tuple))]
            counts = [x for x in (left, right) if isinstance(x, int)]
            if (operator == "*" and sizes and counts and sizes[0] * counts[0] > 1_000_000) or \
                    (operator == "**" and isinstance(right, int) and abs(right) > 10_000):
                raise GptforgeError(f"{name}: '{operator}' would build a value too large to render")
            return super().call_binop(context, operator, left, right)

    class TimedTemplate(Template):
        def render(self, *args, **kwargs):
            with render_time_limit(RENDER_TIME_LIMIT_S):  # an enclosing, shorter budget still applies
                try:
                    return super().render(*args, **kwargs)
                except _TooSlow as e:
                    raise GptforgeError(f"{name} took longer than {e.args[0]:g} s to render and was stopped; "
                                        "fix the template's loops") from None

    name = ("the default ChatML chat template" if template == default_template() else
            f"the checkpoint's chat template (tokenizer 'chat_template', sha256 "
            f"{hashlib.sha256(template.encode('utf-8', 'surrogatepass')).hexdigest()[:12]})")
    env = Timed(trim_blocks=False, lstrip_blocks=False)
    env.template_class = TimedTemplate

    def raise_exception(message):  # what Hugging Face templates call to refuse a conversation
        raise GptforgeError(f"{name} refuses these messages: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def content_text(content, where: str = "content") -> str:
    """A message's content as text: a string, or a list of text parts joined by newlines (as vLLM does).

    Parts may be OpenAI's ``{"type": "text", "text": ...}``, the ``{"type": "text", "value": ...}`` variant some
    datasets use, or plain strings. Any other part (an image, audio) is an error naming it: these models read text.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if kind != "text" or not isinstance(text, str):
                raise GptforgeError(f"{where}[{i}] is a {kind!r} part; only text parts ({{'type': 'text', 'text': "
                                    "...}) are supported by a text-only model")
            texts.append(text)
        return "\n".join(texts)
    raise GptforgeError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def render_chat(messages: list[dict], template: str | None = None, add_generation_prompt: bool = False,
                tools: list | None = None) -> str:
    """Render ``messages`` with ``template`` (default ChatML) as Hugging Face's ``apply_chat_template`` would.

    ``tools`` (function schemas, see :mod:`gptforge.tools`) is a top-level template variable, as in HF; a schema
    given as a dict is written as HF's ``tojson`` writes it, one given as a string is used as it is."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise GptforgeError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
    if tools:
        import json

        tools = [t if isinstance(t, str) else json.dumps(t, ensure_ascii=False) for t in tools]
    from jinja2 import TemplateError

    try:
        return _compile(template or default_template()).render(messages=messages,
                                                                add_generation_prompt=add_generation_prompt,
                                                                tools=tools or None)
    except TemplateError as e:  # a broken checkpoint template, or one that refuses these messages
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise GptforgeError(f"the chat template cannot render these messages{where}: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from None
