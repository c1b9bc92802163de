"""An OpenAI-compatible HTTP API over the engine, plus a one-page web chat at ``/``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` → server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text: queue depth, running rows, generated
tokens, request latencies, requests by status; like ``/health`` it needs no API key). Every user mistake is a
4xx with an OpenAI-style error object (``{"error": {"message", "type", "param", "code"}}``); a full queue is 429;
a request past its timeout is 408.
A stream that cannot finish (past its timeout, or cancelled because the server stops) ends, as OpenAI's streams
do on a mid-stream error, with an event ``data: {"error": {..., "code": "timeout" | "cancelled"}}`` before
``data: [DONE]``; its cut choices get no ``finish_reason`` chunk (``stop``/``length`` always mean finished).

Request text is sanitised once, at the boundary: lone surrogates (JSON ``"\\ud800"``) become U+FFFD and are
counted (header ``X-Replaced-Surrogates``, ``/health``). Parsing, tokenizing and chat-template rendering run on
preparation threads, never on the event loop, after admission (the ``max_pending`` and byte budgets).

Beside it: :mod:`gptforge.serve.protocol` (the wire format: errors, field checks, response pieces),
:mod:`gptforge.serve.scheduler` (admission and the engine's worker thread, static or continuous batching) and
:mod:`gptforge.serve.metrics` (``/metrics``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse

from gptforge.chat_template import content_text, render_time_limit
from gptforge.engine import (
    MAX_TOP_LOGPROBS,
    SAMPLING_DEFAULTS,
    Completion,
    Engine,
    SamplingParams,
    token_bytes,
)
from gptforge.errors import GptforgeError
from gptforge.serve.protocol import (
    ApiError,
    authorized,
    chat_logprobs,
    chat_logprobs_of,
    completion_logprobs,
    completion_logprobs_of,
    cut_short,
    flag_field,
    integer_field,
    number_field,
    parse_body,
    reply_finish,
    reply_usage,
    stop_field,
)
from gptforge.serve.scheduler import Job, Scheduler
from gptforge.tools import ToolCallMissing, ToolError, message_tool_fields, parse_tool_request

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ServerSettings:
    model_name: str = "gptforge"
    api_key: str | None = None
    max_pending: int = 64  # requests waiting or running; more → 429
    max_batch_rows: int = 16  # sequences decoded together
    batching: str = "continuous"  # or "static" (see gptforge.serve.scheduler)
    prefill_chunk: int = 128  # continuous: prompt tokens read between two decode steps
    max_tokens_limit: int | None = None  # cap on max_tokens (default: the model's context)
    max_n: int = 8
    timeout_s: float = 120.0  # per request, queueing included
    max_body_bytes: int = 1_000_000
    max_prepare_bytes: int = 32_000_000  # bodies admitted but not yet tokenized; more → 429
    prepare_workers: int = 2  # threads that parse, tokenize and render requests (off the event loop)
    template_timeout_s: float = 3.0  # chat-template rendering budget per request
    max_messages: int = 256  # a conversation is rendered once per message


class Api:
    """Request handling shared by the routes (validation → job → response)."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.context = engine.block_size
        self.max_tokens_limit = settings.max_tokens_limit or self.context
        self.scheduler = Scheduler(engine, settings.max_pending, settings.max_batch_rows, settings.max_prepare_bytes,
                                   settings.batching, settings.prefill_chunk)
        self.metrics = self.scheduler.metrics
        self.executor = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="gptforge-prepare")
        self.replaced_surrogates = 0  # lone surrogates replaced in request bodies since start
        self._max_token_bytes: int | None = None

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
        max_tokens = integer_field({name: max_tokens}, name, None, 1, self.max_tokens_limit)
        if prompt_len >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the prompt has "
                                f"{prompt_len} tokens; shorten it", "messages" if "messages" in body else "prompt",
                           "context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, self.context - prompt_len)
        n = integer_field(body, "n", 1, 1, self.settings.max_n)
        seed = integer_field(body, "seed", None, -(2**63), 2**63 - 1)
        if "messages" in body:  # chat: logprobs true/false, top_logprobs 0..20 alternatives per token
            logprobs = flag_field(body, "logprobs")
            top = integer_field(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
            if top and not logprobs:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        else:  # legacy completions: logprobs = how many alternatives (0..5), null = none
            top = integer_field(body, "logprobs", None, 0, 5)
            logprobs = top is not None
            if logprobs and flag_field(body, "echo"):
                raise ApiError(400, "'echo' with 'logprobs' (scoring the prompt) is not supported; use "
                                    "'gptforge eval' to score text", "logprobs", "invalid_value")
        top_p = number_field(body, "top_p", None, 0.0, 1.0)
        # Fields the request omits take the one set of defaults (gptforge.sampling_defaults), as the CLI and the
        # web page do; temperature 0 is plain argmax unless a penalty is given.
        params = SAMPLING_DEFAULTS.params(
            max_new_tokens=max_tokens,
            temperature=number_field(body, "temperature", None, 0.0, 2.0),
            top_p=1e-9 if top_p == 0 else top_p,
            top_k=integer_field(body, "top_k", None, 0, self.engine.model.config.vocab_size),
            min_p=number_field(body, "min_p", None, 0.0, 1.0),
            repetition_penalty=number_field(body, "repetition_penalty", None, 0.01, 10.0),
            presence_penalty=number_field(body, "presence_penalty", None, -2.0, 2.0),
            frequency_penalty=number_field(body, "frequency_penalty", None, -2.0, 2.0),
            stop_strings=stop_field(body),
            seed=None if seed is None else seed % 2**63,  # OpenAI takes any int64; generators take [0, 2^63)
            logprobs=logprobs,
            top_logprobs=top or 0,
        )
        try:
            params.validate()
        except GptforgeError as e:
            raise ApiError(400, str(e), None, "invalid_value") from None
        return params, n

    def per_row(self, params: SamplingParams, n: int) -> list[SamplingParams]:
        """``n`` choices differ from each other but are reproducible under a seed."""
        import dataclasses

        return [dataclasses.replace(params, seed=None if params.seed is None else (params.seed + k) % 2**63)
                for k in range(n)]

    def busy_error(self) -> ApiError:
        return ApiError(429, f"The server is busy ({self.settings.max_pending} requests queued or running, or "
                             f"{self.settings.max_prepare_bytes:,} bytes of requests being read); retry shortly",
                        None, "server_busy", type="rate_limit_error")

    def admit(self, request: Request, cost: int) -> Job:
        """Count a request against the limits before any work is spent on it (429 when full); the job is
        queued by :meth:`run`, or freed by the middleware when the request ends without one."""
        job = Job(deadline=time.monotonic() + self.settings.timeout_s, loop=asyncio.get_running_loop())
        if not self.scheduler.admit(job, cost):
            raise self.busy_error()
        request.state.job = job
        return job

    async def offload(self, fn, *args):
        """Run CPU work (parsing, tokenizing, rendering) on a preparation thread, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    async def render(self, messages: list, fn):
        """Run ``fn()`` (chat-template rendering and tokenizing of ``messages``) off the event loop, within the
        per-request template budget (a template that loops is stopped: 400 naming it)."""
        if len(messages) > self.settings.max_messages:
            raise ApiError(400, f"'messages' has {len(messages)} messages; this server takes at most "
                                f"{self.settings.max_messages}", "messages", "invalid_value")

        def timed():
            self.check_size([m["content"] for m in messages if isinstance(m.get("content"), str)], "messages")
            with render_time_limit(self.settings.template_timeout_s):
                return fn()
        return await self.offload(timed)

    def check_size(self, texts: list[str], param: str) -> None:
        """Refuse, before tokenizing, text whose size alone proves it exceeds the context (no token is longer
        than the vocabulary's longest): a 1 MB prompt for a 1,024-token model costs no tokenizer time."""
        if self._max_token_bytes is None:
            tok = self.engine.tokenizer
            self._max_token_bytes = max(len(token_bytes(tok, i)) for i in range(tok.vocab_size)) or 1
        size = sum(len(t.encode("utf-8")) for t in texts)
        if size // self._max_token_bytes >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the prompt has "
                                f"at least {size // self._max_token_bytes} tokens ({size:,} bytes); shorten it",
                           param, "context_length_exceeded")

    async def run(self, request: Request, prompts: list[list[int]], params: list[SamplingParams]) -> Job:
        job = getattr(request.state, "job", None)
        if job is None:  # not admitted yet (a route that read no body)
            job = self.admit(request, 0)
        job.prompts, job.params = prompts, params
        if job.should_stop():
            raise self.timeout_error() if job.timed_out else self.cancelled_error()
        if not self.scheduler.enqueue(job):
            raise self.cancelled_error()
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
                    if cut_short(event[1]):
                        raise self.timeout_error() if job.timed_out else self.cancelled_error()
                    return event[1]
                if event[0] == "error":
                    raise ApiError(500, f"generation failed: {event[1]}", type="server_error", code="engine_error")
        finally:
            self.scheduler.release(job)

    def timeout_error(self) -> ApiError:
        return ApiError(408, f"The request took longer than the server's timeout of {self.settings.timeout_s:g}s; "
                             "ask for fewer tokens or retry later", None, "timeout", type="timeout_error")

    def cancelled_error(self) -> ApiError:
        return ApiError(503, "The request was cancelled before it finished (the server is stopping); retry",
                        None, "cancelled", type="server_error")


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")


class _Guard:
    """Pure ASGI middleware (keeps streaming and disconnect detection intact): API key and body-size checks;
    frees the admission of a request that ended before its job was queued; reports replaced surrogates."""

    def __init__(self, app, api: Api):
        self.app, self.api = app, api
        self.api_key, self.max_body_bytes = api.settings.api_key, api.settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), []
        path = scope["path"]
        if path.startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            error = None
            if self.api_key and not authorized(headers.get("authorization"), self.api_key):
                error = ApiError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", type="authentication_error")
            length = headers.get("content-length")
            if error is None and length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                error = ApiError(413, f"Request body too large (limit {self.max_body_bytes} bytes)",
                                 code="body_too_large")
            if error is not None:
                await error.response()(scope, receive, send)
                self._count(path, error.status, None)
                return
        state = scope.setdefault("state", {})  # the request's own: the routes put its admitted job here

        async def reply(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                if state.get("replaced_surrogates"):
                    header = (b"x-replaced-surrogates", str(state["replaced_surrogates"]).encode())
                    message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, reply)
        finally:  # finished, failed or abandoned: a job that is still counted is freed (idempotent)
            if state.get("job") is not None:
                self.api.scheduler.cancel(state["job"])
            if path.startswith("/v1/"):
                self._count(path, status[0] if status else None, time.perf_counter() - started)

    def _count(self, path: str, status: int | None, seconds: float | None) -> None:
        """Requests by route and status (``disconnected``: the client left before any answer) for /metrics;
        the latency of generation requests answered 200 (streams until their end)."""
        route = path if path in _ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        generation = route.endswith("completions") and status == 200
        self.api.metrics.request(route, str(status) if status else "disconnected", seconds if generation else None)


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

    app.add_middleware(_Guard, api=api)

    async def read_json(request: Request) -> dict:
        """The request's JSON object, after admission (429 when full), parsed and sanitised off the event loop."""
        body = bytearray()
        async for chunk in request.stream():  # also bounds bodies sent without Content-Length
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise ApiError(413, f"Request body too large (limit {settings.max_body_bytes} bytes)",
                               code="body_too_large")
        api.admit(request, len(body))
        data, replaced = await api.offload(parse_body, bytes(body))
        if replaced:
            request.state.replaced_surrogates = replaced
            api.replaced_surrogates += replaced
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
        api.check_model(data)
        return data

    def encode(text: str) -> list[int]:
        return engine.tokenizer.encode(text, allow_special=True)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "pending": api.scheduler.pending,
                "max_pending": settings.max_pending, "context_length": api.context,
                "replaced_surrogates": api.replaced_surrogates, "batching": settings.batching}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(api.metrics.render(api.scheduler), media_type="text/plain; version=0.0.4")

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

        def tokenize() -> tuple[list, list[list[int]]]:  # on a preparation thread: prompts can be 1 MB
            if isinstance(prompt, str):
                prompts = [prompt]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                prompts = prompt
            elif isinstance(prompt, list) and prompt and \
                    all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                prompts = [prompt]
            else:
                raise ApiError(400, "'prompt' must be a non-empty string, list of strings, or list of token ids",
                               "prompt", "invalid_type")
            if len(prompts) > settings.max_batch_rows * 4:
                raise ApiError(400, f"too many prompts in one request ({len(prompts)})", "prompt")
            for p in prompts:
                if isinstance(p, str):
                    api.check_size([p], "prompt")
            ids = [encode(p) if isinstance(p, str) else p for p in prompts]
            vocab = engine.model.config.vocab_size
            for row in ids:
                if not row:
                    raise ApiError(400, "'prompt' must not be empty", "prompt", "invalid_value")
                if any(t < 0 or t >= vocab for t in row):
                    raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt", "invalid_value")
            return prompts, ids

        prompts, ids = await api.offload(tokenize)
        params, n = api.sampling(body, 16, max(map(len, ids)))
        echo, stream = flag_field(body, "echo"), flag_field(body, "stream")
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
            choices.append({"text": text, "index": i, "logprobs": completion_logprobs_of(engine, c),
                            "finish_reason": reply_finish(c)})
        return {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                "choices": choices, "usage": reply_usage(results)}

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
            try:
                calls_only = m.get("content") is None and (m.get("tool_calls") or m["role"] == "tool")
                content = "" if calls_only else content_text(m.get("content"), f"messages[{i}].content")
                extra = message_tool_fields(m, f"messages[{i}]")  # assistant tool_calls, tool_call_id
            except ToolError as e:
                raise ApiError(400, str(e), e.param or f"messages[{i}]", "invalid_value") from None
            except GptforgeError as e:
                raise ApiError(400, str(e), f"messages[{i}].content", "invalid_type") from None
            clean.append({"role": m["role"], "content": content, **extra})
        try:
            tool_req = parse_tool_request(body)  # None without tools; see gptforge.tools.ToolRequest
        except ToolError as e:
            raise ApiError(400, str(e), e.param, "invalid_value") from None
        try:
            prompt_ids = await api.render(clean, lambda: engine.encode_chat(clean) if tool_req is None
                                          else tool_req.prompt_ids(clean, engine.tokenizer))
        except GptforgeError as e:
            raise ApiError(400, f"cannot render the chat template: {e}", "messages") from None
        params, n = api.sampling(body, 512, len(prompt_ids))
        params = engine.chat_params(params)
        stream = flag_field(body, "stream")
        job = await api.run(request, [prompt_ids] * n, api.per_row(params, n))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        tool_streams = [tool_req.stream() for _ in range(n)] if tool_req and tool_req.parses else None

        def chunk(index: int, text: str | None, finish: str | None) -> dict:
            delta = {} if text is None else ({"role": "assistant", "content": ""} if text == "" else {"content": text})
            if tool_streams and text:  # content before a <tool_call> streams; calls come whole at the end
                delta = tool_streams[index].delta(text)
            elif tool_streams and finish:
                try:
                    delta, finish = tool_streams[index].final_delta(finish)
                except ToolCallMissing as e:
                    return {"error": {"message": str(e), "type": "model_error", "param": e.param,
                                      "code": "tool_call_not_produced"}}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return sse(request, job, chunk, n, body)
        results = await api.wait(request, job)
        try:  # (message, finish_reason): tool calls parsed out of the text when the request has tools
            replies = [tool_req.reply(c.text, reply_finish(c)) if tool_req else
                       ({"role": "assistant", "content": c.text}, reply_finish(c)) for c in results]
        except ToolCallMissing as e:
            raise ApiError(422, str(e), e.param, "tool_call_not_produced", type="model_error") from None
        choices = [{"index": i, "message": replies[i][0],
                    "logprobs": chat_logprobs_of(engine, c), "finish_reason": replies[i][1]} for i, c in enumerate(results)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": choices, "usage": reply_usage(results)}

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
                        yield line(api.timeout_error().body())
                        break
                    if event[0] == "delta":
                        obj = chunk(event[1], event[2], None)
                        if event[3] is not None and obj.get("choices"):  # this piece of text's tokens
                            obj["choices"][0]["logprobs"] = (chat_logprobs if chat_n else completion_logprobs)(
                                engine, event[3])
                        yield line(obj)
                    elif event[0] == "error":
                        yield line(ApiError(500, f"generation failed: {event[1]}", type="server_error",
                                            code="engine_error").body())
                        break
                    else:
                        results = event[1] or []
                        for k, c in enumerate(results):  # cut choices get no finish_reason: the error says why
                            if c.finish_reason != "cancelled":
                                yield line(chunk(k, None if chat_n else "", reply_finish(c)))
                        if cut_short(event[1]):  # past the timeout, or cancelled (server stopping)
                            yield line((api.timeout_error() if job.timed_out else api.cancelled_error()).body())
                        elif include_usage and results:
                            usage = {**chunk(0, None, None), "choices": [], "usage": reply_usage(results)}
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
        config = {"model": settings.model_name, "context": api.context, "needsKey": bool(settings.api_key),
                  "defaults": SAMPLING_DEFAULTS.as_dict()}
        # Inside <script>: "</script>", "<!--" and U+2028/9 in a value (e.g. --model-name) must stay data.
        safe = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return html.replace("/*GPTFORGE_CONFIG*/{}", safe)

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
