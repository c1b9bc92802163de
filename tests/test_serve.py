"""The OpenAI-compatible server: shapes, streaming, validation, auth, queueing, timeouts, the openai client."""

import json
import threading
import time

import httpx
import pytest

from gptforge.engine import Engine, SamplingParams
from gptforge.serve.app import ServerSettings, create_app

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    model, tok = make_tiny_model(block_size=96)
    return Engine(model, tok)


@pytest.fixture(scope="module")
def live(engine, live_server):
    server = live_server(create_app(engine, ServerSettings(model_name=MODEL, max_tokens_limit=64)))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


def chat_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8, **kw}


# ---- shapes ---------------------------------------------------------------------------------------------


def test_health_and_models(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]


def test_completion_shape_n_and_seed(client):
    body = {"model": MODEL, "prompt": "The verdict was", "max_tokens": 6, "n": 3, "seed": 7, "temperature": 1.0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == MODEL
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" for c in data["choices"])
    assert len({c["text"] for c in data["choices"]}) == 3  # n samples differ
    assert data["usage"]["completion_tokens"] == 18 and data["usage"]["prompt_tokens"] == 3
    assert client.post("/v1/completions", json=body).json()["choices"] == data["choices"]  # seed reproduces


def test_chat_completion_shape_and_stop(client, engine):
    r = client.post("/v1/chat/completions", json=chat_body(temperature=0))
    assert r.status_code == 200, r.text
    data = r.json()
    msg = data["choices"][0]["message"]
    assert data["object"] == "chat.completion" and msg["role"] == "assistant" and msg["content"]
    stop = msg["content"][3:6]
    stopped = client.post("/v1/chat/completions", json=chat_body(temperature=0, stop=[stop])).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] == msg["content"][: msg["content"].find(stop)]


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def test_chat_stream_matches_non_streamed_reply(client):
    full = client.post("/v1/chat/completions", json=chat_body(temperature=0, max_tokens=12)).json()
    with client.stream("POST", "/v1/chat/completions", json=chat_body(temperature=0, max_tokens=12, stream=True,
                                                                    stream_options={"include_usage": True})) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) > 3 and text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 12


def test_completion_stream_with_n(client):
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Yes", "max_tokens": 5, "n": 2,
                                                        "stream": True, "seed": 1}) as r:
        events = sse_events(r)
    finals = [e["choices"][0] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1]


# ---- validation -----------------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", [1, 2], 400, "invalid_json"),
    ("/v1/completions", b"[" * 200_000, 400, "invalid_json"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "invalid_type"),
    ("/v1/completions", {"prompt": 5}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": []}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": [999999]}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": True}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("/v1/completions", {"prompt": "word " * 200}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_type"),
    ("/v1/chat/completions", {}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 300}]}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400,
     "invalid_value"),
    ("/v1/chat/completions", b"x" * 2_000_000, 413, "body_too_large"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1, "echo": True}, 400, "invalid_value"),
]


@pytest.mark.parametrize("path,body,status,code", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_style_4xx(client, path, body, status, code):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and "type" in error


def test_unknown_route_and_method_are_4xx(client):
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/completions").status_code == 405
    assert client.get("/health").status_code == 200  # still alive after all the bad requests


# ---- auth, queueing, timeouts, disconnects ----------------------------------------------------------------


def test_api_key_required_when_set(engine, live_server):
    server = live_server(create_app(engine, ServerSettings(model_name=MODEL, api_key="s3cret")))
    try:
        with httpx.Client(base_url=server.url) as c:
            r = c.post("/v1/chat/completions", json=chat_body())
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200
            assert c.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200  # any case
            assert c.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret2"}).status_code == 401
            assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
    finally:
        server.close()


def test_concurrent_requests_are_batched_and_full_queue_answers_429(engine, live_server):
    server = live_server(create_app(engine, ServerSettings(model_name=MODEL, max_pending=6, max_batch_rows=16)))
    api = server.app.state.api
    results = {}

    def ask(i):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            results[i] = c.post("/v1/completions", json={"prompt": f"Number {i} is", "max_tokens": 5,
                                                         "temperature": 0})
    try:
        with engine.lock:  # the engine is busy: requests pile up in the queue
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            while api.scheduler.pending < 6 or api.scheduler.preparing:  # all six tokenized and queued
                time.sleep(0.02)
            with httpx.Client(base_url=server.url) as c:
                busy = c.post("/v1/completions", json={"prompt": "one more", "max_tokens": 2})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in results.values())
        assert api.scheduler.batches <= 2  # the waiting requests were decoded together
        alone = engine.generate(["Number 3 is"], SamplingParams(max_new_tokens=5, temperature=0))[0]
        assert results[3].json()["choices"][0]["text"] == alone.text  # batching did not change the answer
        assert api.scheduler.pending == 0
    finally:
        server.close()


def test_request_past_its_timeout_gets_408_and_frees_its_slot(engine, live_server):
    server = live_server(create_app(engine, ServerSettings(model_name=MODEL, timeout_s=0.3, max_pending=1)))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            with engine.lock:
                holder = {}
                t = threading.Thread(target=lambda: holder.update(r=c.post("/v1/chat/completions", json=chat_body())))
                t.start()
                time.sleep(0.8)
            t.join()
            assert holder["r"].status_code == 408 and holder["r"].json()["error"]["code"] == "timeout"
            assert server.app.state.api.scheduler.pending == 0
    finally:
        server.close()


def test_client_disconnect_mid_stream_frees_the_slot(engine, live_server):
    server = live_server(create_app(engine, ServerSettings(model_name=MODEL, max_pending=1)))
    api = server.app.state.api
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 90, "stream": True}) as r:
                next(r.iter_lines())  # first chunk arrived; now hang up
            deadline = time.time() + 10
            while api.scheduler.pending and time.time() < deadline:
                time.sleep(0.05)
            assert api.scheduler.pending == 0
            assert c.post("/v1/completions", json={"prompt": "again", "max_tokens": 2}).status_code == 200
    finally:
        server.close()


# ---- the official client --------------------------------------------------------------------------------


def test_official_openai_client_works(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True)
        if chunk.choices)
    assert streamed == chat.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="The verdict", max_tokens=4, n=2, seed=3)
    assert len(completion.choices) == 2 and completion.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])


def test_client_giving_up_on_a_queued_request_frees_its_slot(engine, live_server):
    server = live_server(create_app(engine, ServerSettings(model_name=MODEL, max_pending=1)))
    api = server.app.state.api
    try:
        with engine.lock:  # the request waits in the queue
            with httpx.Client(base_url=server.url, timeout=0.5) as c, pytest.raises(httpx.TimeoutException):
                c.post("/v1/chat/completions", json=chat_body(max_tokens=60))
            deadline = time.time() + 10
            while api.scheduler.pending and time.time() < deadline:
                time.sleep(0.05)
            assert api.scheduler.pending == 0  # freed before the engine ever got to it
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.post("/v1/chat/completions", json=chat_body()).status_code == 200
    finally:
        server.close()


# ---- greedy equals transformers; logprobs as OpenAI defines them ------------------------------------------


@pytest.fixture(scope="module")
def hf_model(engine, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from gptforge.hf import export_model

    out = tmp_path_factory.mktemp("hf")
    export_model(engine.model, engine.tokenizer, out)
    return transformers.GPT2LMHeadModel.from_pretrained(out).eval()


def hf_greedy(hf_model, engine, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, pad_token_id=engine.tokenizer.eot_id,
                                eos_token_id=sorted(engine.base_stop_ids))[0, len(ids):].tolist()
    stops = [k for k, t in enumerate(out) if t in engine.base_stop_ids]
    return out[: stops[0]] if stops else out  # the text omits the stop token


def test_temperature_0_equals_transformers_generate(client, engine, hf_model):
    ids = engine.tokenizer.encode("It had always been his fate to")
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 30, "temperature": 0})
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(hf_greedy(hf_model, engine, ids, 30))
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 30, "temperature": 0})
    expected = hf_greedy(hf_model, engine, engine.encode_chat(messages), 30)
    assert r.json()["choices"][0]["message"]["content"] == engine.tokenizer.decode(expected)


def test_chat_logprobs_with_the_official_client_streamed_and_not(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "temperature": 0,
           "logprobs": True, "top_logprobs": 3}
    choice = client.chat.completions.create(**ask).choices[0]
    content = choice.logprobs.content
    assert len(content) == 10 and "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the chosen is the top
        assert t.logprob == t.top_logprobs[0].logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[2].logprob
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    streamed = [t for chunk in client.chat.completions.create(stream=True, **ask)
                for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, t.logprob, len(t.top_logprobs)) for t in streamed] == \
        [(t.token, t.logprob, 3) for t in content]
    plain = client.chat.completions.create(**{**ask, "top_logprobs": None}).choices[0].logprobs.content
    assert [t.top_logprobs for t in plain] == [[]] * 10


def test_completion_logprobs_with_the_official_client_streamed_and_not(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    ask = {"model": MODEL, "prompt": "The verdict was", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    choice = client.completions.create(**ask).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and top[token] == logprob == max(top.values())
    streamed = [c.logprobs for chunk in client.completions.create(stream=True, **ask) for c in chunk.choices
                if c.logprobs]
    for field in ("tokens", "text_offset", "token_logprobs"):
        assert [x for piece in streamed for x in getattr(piece, field)] == getattr(lp, field)


@pytest.fixture(scope="module")
def stopping(make_tiny_model, live_server):
    """A server whose model 'ends its text' after a few greedy tokens: the next one becomes an end-of-text id."""
    model, tok = make_tiny_model(block_size=96)
    eng = Engine(model, tok)
    ids = eng.encode_chat([{"role": "user", "content": "Tell me a story."}])
    free = eng.generate([ids], SamplingParams(max_new_tokens=12, temperature=0))[0].token_ids
    k = next(k for k in range(2, 12) if free[k] not in free[:k])
    eng.base_stop_ids = eng.base_stop_ids | {free[k]}
    server = live_server(create_app(eng, ServerSettings(model_name=MODEL)))
    yield server, eng, free[:k]
    server.close()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_logprobs_never_list_the_stop_token_the_text_omits(stopping, stream):
    server, eng, kept = stopping
    text = eng.tokenizer.decode(kept)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        body = chat_body(temperature=0, logprobs=True, top_logprobs=1, stream=stream, max_tokens=10)
        if stream:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                events = [e for e in sse_events(r)[:-1] if e["choices"]]
            choices = [e["choices"][0] for e in events]
            content = "".join(ch["delta"].get("content", "") for ch in choices)
            tokens = [t for ch in choices if ch["logprobs"] for t in ch["logprobs"]["content"]]
            finish = choices[-1]["finish_reason"]
        else:
            choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
            content, tokens, finish = choice["message"]["content"], choice["logprobs"]["content"], \
                choice["finish_reason"]
        assert finish == "stop" and content == text
        assert [bytes(t["bytes"]) for t in tokens] == [eng.tokenizer.decode_bytes([k]) for k in kept]
