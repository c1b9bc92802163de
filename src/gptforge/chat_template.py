"""The chat template: written once in Jinja (``templates/chatml.jinja``), used for SFT, generation and export.

Messages are ``{"role": "system"|"user"|"assistant", "content": str}``. The rendered text uses the special
tokens ``<|im_start|>`` and ``<|im_end|>``; an assistant turn ends with ``<|im_end|>`` (the end-of-turn token).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from gptforge.errors import GptforgeError


def default_template() -> str:
    return resources.files("gptforge").joinpath("templates/chatml.jinja").read_text(encoding="utf-8")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
    return env.from_string(template)


def render_chat(messages: list[dict], template: str | None = None, add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with ``template`` (default ChatML) as Hugging Face's ``apply_chat_template`` would."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise GptforgeError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
    return _compile(template or default_template()).render(messages=messages,
                                                            add_generation_prompt=add_generation_prompt)
