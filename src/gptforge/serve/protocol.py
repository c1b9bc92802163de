"""The OpenAI wire format of the server: error bodies, request field checks, and the pieces of a response
(finish reasons, usage, logprobs) — shared by the routes in :mod:`gptforge.serve.app`, with no state of its own.
Request bodies are parsed here too, lone surrogates replaced at the boundary.
"""

from __future__ import annotations

import hmac
import json
import math
import re

from fastapi.responses import JSONResponse

from gptforge.engine import Completion, Engine, token_bytes
from gptforge.serve.scheduler import TextTokens
from gptforge.tokenizer import replace_surrogates


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- request fields ------------------------------------------------------------------------------------


def number_field(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)[:60]}", name, "invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return float(value)


def integer_field(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)[:60]}", name, "invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return value


def flag_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(value)[:60]}", name, "invalid_type")
    return value


def stop_field(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop",
                       "invalid_type")
    return stops


# ---- responses ---------------------------------------------------------------------------------------------


def cut_short(results: list[Completion] | None) -> bool:
    """A job that did not finish: never started (timed out or cancelled while queued), or rows cut short."""
    return results is None or any(c.finish_reason == "cancelled" for c in results)


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # OpenAI's stand-in for -inf; JSON has no infinities


def completion_logprobs_of(engine: Engine, c: Completion) -> dict | None:
    """Legacy completions ``logprobs`` for the tokens of ``c.text`` (not the stop token the text omits)."""
    return None if c.logprobs is None else completion_logprobs(engine, TextTokens.of(engine, c).take(c.text))


def completion_logprobs(engine: Engine, tokens: list) -> dict:
    """``tokens``, ``token_logprobs``, ``top_logprobs`` (the alternatives and the chosen token, as OpenAI) and
    ``text_offset`` (characters into the completion text) for ``(id, logprob, top, offset)`` tuples."""
    def piece(t: int) -> str:
        return token_bytes(engine.tokenizer, t).decode("utf-8", "replace")

    tops = []
    for t, lp, top, _ in tokens:
        alternatives = {piece(a): _logprob(alp) for a, alp in top}
        alternatives.setdefault(piece(t), _logprob(lp))
        tops.append(alternatives)
    return {"tokens": [piece(t) for t, *_ in tokens], "token_logprobs": [_logprob(lp) for _, lp, *_ in tokens],
            "top_logprobs": tops, "text_offset": [offset for *_, offset in tokens]}


def chat_logprobs_of(engine: Engine, c: Completion) -> dict | None:
    """Chat ``logprobs`` for the tokens of ``c.text`` (not the stop token the text omits)."""
    return None if c.logprobs is None else chat_logprobs(engine, TextTokens.of(engine, c).take(c.text))


def chat_logprobs(engine: Engine, tokens: list) -> dict:
    """``{"content": [{token, logprob, bytes, top_logprobs}]}`` for ``(id, logprob, top, offset)`` tuples."""
    def entry(t: int, lp: float) -> dict:
        raw = token_bytes(engine.tokenizer, t)
        return {"token": raw.decode("utf-8", "replace"), "logprob": _logprob(lp), "bytes": list(raw)}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                        for t, lp, top, _ in tokens], "refusal": None}


def reply_finish(c: Completion) -> str:
    return "stop" if c.finish_reason == "stop" else "length"  # cut rows never get here (see cut_short)


def reply_usage(completions: list[Completion]) -> dict:
    prompt = len(completions[0].prompt_ids) if completions else 0
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a lone surrogate can enter a JSON body


def parse_body(body: bytes) -> tuple[object, int]:
    """The JSON of a request body with lone surrogates replaced by U+FFFD, and how many were replaced."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"We could not parse the JSON body of your request ({e})", code="invalid_json") from None
    if not _SURROGATE_ESCAPE.search(body):
        return data, 0
    replaced = 0

    def clean(x):
        nonlocal replaced
        if isinstance(x, str):
            fixed = replace_surrogates(x)
            if fixed is not x:
                replaced += sum(1 for ch in x if "\ud800" <= ch <= "\udfff")
            return fixed
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, dict):
            return {clean(k): clean(v) for k, v in x.items()}
        return x

    try:
        return clean(data), replaced
    except RecursionError:
        raise ApiError(400, "The JSON body of your request is nested too deeply", code="invalid_json") from None


def authorized(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer <key>`` (scheme in any case), compared in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    return hmac.compare_digest(f"{scheme.lower()} {token.strip()}".encode(), f"bearer {api_key}".encode())
