"""An OpenAI-compatible HTTP API over the engine, plus a one-page web chat at ``/``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` → server-sent events),
``GET /v1/models``, ``GET /health``. Every user mistake is a 4xx with an OpenAI-style error object
(``{"error": {"message", "type", "param", "code"}}``); a full queue is 429; a request past its timeout is 408.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from gptforge.engine import Completion, Engine, SamplingParams
from gptforge.errors import GptforgeError
from gptforge.serve.scheduler import Job, Scheduler

ROLES = ("system", "user", "assistant")


@dataclass
class ServerSettings:
    model_name: str = "gptforge"
    api_key: str | None = None
    max_pending: int = 64  # requests waiting or running; more → 429
    max_batch_rows: int = 16  # sequences decoded together
    max_tokens_limit: int | None = None  # cap on max_tokens (default: the model's context)
    max_n: int = 8
    timeout_s: float = 120.0  # per request, queueing included
    max_body_bytes: int = 1_000_000


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---- request validation ------------------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)[:60]}", name, "invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)[:60]}", name, "invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(value)[:60]}", name, "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop",
                       "invalid_type")
    return stops


class Api:
    """Request handling shared by the routes (validation → job → response)."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.context = engine.block_size
        self.max_tokens_limit = settings.max_tokens_limit or self.context
        self.scheduler = Scheduler(engine, settings.max_pending, settings.max_batch_rows)

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model", "invalid_type")
        if model not in (None, "", self.settings.model_name):
            raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.settings.model_name}' (see GET /v1/models)", "model", "model_not_found")

    def sampling(self, body: dict, default_max_tokens: int, prompt_len: int) -> tuple[SamplingParams, int]:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _integer({name: max_tokens}, name, None, 1, self.max_tokens_limit)
        if prompt_len >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the prompt has "
                                f"{prompt_len} tokens; shorten it", "messages" if "messages" in body else "prompt",
                           "context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, self.context - prompt_len)
        n = _integer(body, "n", 1, 1, self.settings.max_n)
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        logprobs = body.get("logprobs")
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
            top_k=_integer(body, "top_k", 0, 0, self.engine.model.config.vocab_size) or 0,
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            stop_strings=_stop(body),
            seed=seed,
            logprobs=bool(logprobs) and not isinstance(logprobs, str),
        )
        return params, n

    def per_row(self, params: SamplingParams, n: int) -> list[SamplingParams]:
        """``n`` choices differ from each other but are reproducible under a seed."""
        import dataclasses

        return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + k) for k in range(n)]

    async def run(self, request: Request, prompts: list[list[int]], params: list[SamplingParams]) -> Job:
        job = Job(prompts=prompts, params=params, deadline=time.monotonic() + self.settings.timeout_s,
                  loop=asyncio.get_running_loop())
        if not self.scheduler.submit(job):
            raise ApiError(429, f"The server is busy ({self.settings.max_pending} requests queued or running); "
                                "retry shortly", None, "server_busy", type="rate_limit_error")
        return job

    async def wait(self, request: Request, job: Job) -> list[Completion]:
        """Collect a job's result, cancelling it if the client disconnects."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.scheduler.cancel(job)
                        raise ApiError(499, "client closed the request", code="client_closed")
                    continue
                if event[0] == "done":
                    if event[1] is None or job.timed_out:
                        raise self.timeout_error()
                    return event[1]
                if event[0] == "error":
                    raise ApiError(500, f"generation failed: {event[1]}", type="server_error", code="engine_error")
        finally:
            self.scheduler.release(job)

    def timeout_error(self) -> ApiError:
        return ApiError(408, f"The request took longer than the server's timeout of {self.settings.timeout_s:g}s; "
                             "ask for fewer tokens or retry later", None, "timeout")


def _logprobs_completions(engine: Engine, c: Completion) -> dict | None:
    if c.logprobs is None:
        return None
    tokens = [engine.tokenizer.decode([t]) for t in c.token_ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": c.logprobs, "top_logprobs": None, "text_offset": offsets}


def _logprobs_chat(engine: Engine, c: Completion) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for t, lp in zip(c.token_ids, c.logprobs):
        piece = engine.tokenizer.decode([t])
        content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")), "top_logprobs": []})
    return {"content": content}


def _finish(c: Completion) -> str:
    return "stop" if c.finish_reason == "stop" else "length"


def _usage(completions: list[Completion]) -> dict:
    prompt = len(completions[0].prompt_ids) if completions else 0
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


class _Guard:
    """Pure ASGI middleware (keeps streaming and disconnect detection intact): API key and body-size checks."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            error = None
            if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
                error = ApiError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", type="authentication_error")
            length = headers.get("content-length")
            if error is None and length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                error = ApiError(413, f"Request body too large (limit {self.max_body_bytes} bytes)",
                                 code="body_too_large")
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``engine``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServerSettings()
    api = Api(engine, settings)
    app = FastAPI(title="gptforge", version="1", docs_url=None, redoc_url=None)
    app.state.api = api

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc):
        return ApiError(400, f"invalid request: {exc.errors()[:1]}", code="invalid_request").response()

    @app.exception_handler(Exception)
    async def _bug(_request, exc):  # a bug: say so in OpenAI's shape rather than crash the connection
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    app.add_middleware(_Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)

    async def read_json(request: Request) -> dict:
        body = b""
        async for chunk in request.stream():  # also bounds bodies sent without Content-Length
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise ApiError(413, f"Request body too large (limit {settings.max_body_bytes} bytes)",
                               code="body_too_large")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(400, f"We could not parse the JSON body of your request ({e})", code="invalid_json") \
                from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
        api.check_model(data)
        return data

    def encode(text: str) -> list[int]:
        return engine.tokenizer.encode(text, allow_special=True)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "pending": api.scheduler.pending,
                "max_pending": settings.max_pending, "context_length": api.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "gptforge",
             "context_length": api.context}]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str):
        api.check_model({"model": model_id})
        return {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "gptforge"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [prompt]
        else:
            raise ApiError(400, "'prompt' must be a non-empty string, list of strings, or list of token ids",
                           "prompt", "invalid_type")
        ids = [encode(p) if isinstance(p, str) else p for p in prompts]
        vocab = engine.model.config.vocab_size
        for row in ids:
            if not row:
                raise ApiError(400, "'prompt' must not be empty", "prompt", "invalid_value")
            if any(t < 0 or t >= vocab for t in row):
                raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt", "invalid_value")
        params, n = api.sampling(body, 16, max(map(len, ids)))
        echo, stream = _flag(body, "echo"), _flag(body, "stream")
        if len(ids) * n > settings.max_batch_rows * 4:
            raise ApiError(400, f"too many completions in one request ({len(ids)} prompts × n={n})", "n")
        rows = [r for r in ids for _ in range(n)]
        row_params = [p for _ in ids for p in api.per_row(params, n)]
        job = await api.run(request, rows, row_params)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                    "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return sse(request, job, chunk, None, body)
        results = await api.wait(request, job)
        choices = []
        for i, c in enumerate(results):
            text = (prompts[i // n] if echo and isinstance(prompts[i // n], str) else "") + c.text
            choices.append({"text": text, "index": i, "logprobs": _logprobs_completions(engine, c),
                            "finish_reason": _finish(c)})
        return {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                "choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                           "invalid_value" if isinstance(messages, list) else "invalid_type")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ApiError(400, f"messages[{i}] must be an object with 'role' in {list(ROLES)}",
                               f"messages[{i}].role", "invalid_value")
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}",
                                   f"messages[{i}].content", "invalid_type")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content",
                               "invalid_type")
            clean.append({"role": m["role"], "content": content})
        try:
            prompt_ids = encode(engine.render_chat(clean))
        except GptforgeError as e:
            raise ApiError(400, f"cannot render the chat template: {e}", "messages") from None
        params, n = api.sampling(body, 512, len(prompt_ids))
        params = engine.chat_params(params)
        stream = _flag(body, "stream")
        job = await api.run(request, [prompt_ids] * n, api.per_row(params, n))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(index: int, text: str | None, finish: str | None) -> dict:
            delta = {} if text is None else ({"role": "assistant", "content": ""} if text == "" else {"content": text})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return sse(request, job, chunk, n, body)
        results = await api.wait(request, job)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _logprobs_chat(engine, c), "finish_reason": _finish(c)} for i, c in enumerate(results)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": choices, "usage": _usage(results)}

    def sse(request: Request, job: Job, chunk, chat_n: int | None, body: dict) -> StreamingResponse:
        """Stream a job as server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        async def events():
            def line(obj) -> str:
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

            try:
                if chat_n:  # chat streams open each choice with the assistant role
                    for k in range(chat_n):
                        yield line(chunk(k, "", None))
                while True:
                    try:
                        event = await asyncio.wait_for(job.events.get(), timeout=api.settings.timeout_s + 5)
                    except asyncio.TimeoutError:
                        api.scheduler.cancel(job)
                        yield line({"error": api.timeout_error().response().body.decode()})
                        break
                    if event[0] == "delta":
                        yield line(chunk(event[1], event[2], None))
                    elif event[0] == "error":
                        yield line({"error": {"message": f"generation failed: {event[1]}", "type": "server_error"}})
                        break
                    else:
                        results = event[1] or []
                        for k, c in enumerate(results):
                            yield line(chunk(k, None if chat_n else "", _finish(c)))
                        if event[1] is None:  # timed out before starting
                            yield line({"error": {"message": api.timeout_error().message, "type": "timeout"}})
                        if include_usage and results:
                            usage = {**chunk(0, None, None), "choices": [], "usage": _usage(results)}
                            yield line(usage)
                        break
                yield "data: [DONE]\n\n"
            finally:  # normal end, or the client went away (the generator is closed): free the slot
                job.cancelled.set()
                api.scheduler.release(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", response_class=HTMLResponse)
    async def index():
        html = resources.files("gptforge.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        config = {"model": settings.model_name, "context": api.context, "needsKey": bool(settings.api_key)}
        return html.replace("/*GPTFORGE_CONFIG*/{}", json.dumps(config))

    return app


def default_model_name(checkpoint: str) -> str:
    """A readable model id: the run name for run/step directories, else the directory name."""
    from pathlib import Path

    path = Path(checkpoint).resolve()
    if path.name.startswith("step_") and path.parent.name == "ckpt":
        return path.parent.parent.name
    if path.name == "ckpt":
        return path.parent.name
    return path.name or "gptforge"


def api_key_from_env(explicit: str | None) -> str | None:
    return explicit or os.environ.get("GPTFORGE_API_KEY") or None
