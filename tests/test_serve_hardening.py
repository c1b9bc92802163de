"""The server under hostile input: lone surrogates, 1 MB bodies, slow templates, timeouts, cancellation, escaping,
API keys, and a mixed load of good and bad requests (no 5xx, /health stays fast)."""

import json
import threading
import time

import httpx
import pytest

from gptforge.engine import Engine
from gptforge.serve.app import ServerSettings, create_app

MODEL = "tiny-chat"
CHAT = "/v1/chat/completions"
SURROGATE_CHAT = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 4'
SURROGATE_COMPLETION = b'{"prompt": "hi \\ud800", "max_tokens": 4, "echo": true'


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    model, tok = make_tiny_model(block_size=96)
    return Engine(model, tok)


@pytest.fixture
def serve(engine, live_server):
    """``serve(engine=None, **settings) -> LiveServer``, closed after the test."""
    servers = []

    def start(eng=None, **settings):
        settings = {"model_name": MODEL, **settings}
        servers.append(live_server(create_app(eng or engine, ServerSettings(**settings))))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def live(engine, live_server):
    server = live_server(create_app(engine, ServerSettings(model_name=MODEL)))
    yield server
    server.close()


@pytest.fixture
def slow_engine(make_tiny_model):
    """An engine whose every forward pass takes 30 ms, so a request can outlive a short timeout mid-stream."""
    model, tok = make_tiny_model(block_size=96)
    model.register_forward_hook(lambda *_: time.sleep(0.03))
    return Engine(model, tok)


def sse_events(response) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path,body", [(CHAT, SURROGATE_CHAT), ("/v1/completions", SURROGATE_COMPLETION)],
                         ids=["chat", "completions"])
def test_lone_surrogates_are_replaced_and_counted(live, path, body, stream):
    content = body + (b', "stream": true}' if stream else b"}")
    with httpx.Client(base_url=live.url, timeout=30) as c:
        before = c.get("/health").json()["replaced_surrogates"]
        r = c.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert r.headers["x-replaced-surrogates"] == "1"
        if stream:
            events = [e for e in (json.loads(line[6:]) for line in r.text.splitlines()
                                  if line.startswith("data: {"))]
            assert not any("error" in e for e in events) and any(e["choices"][0]["finish_reason"] for e in events)
        elif path != CHAT:
            assert r.json()["choices"][0]["text"].startswith("hi \ufffd")  # echo: the sanitised prompt
        assert c.get("/health").json()["replaced_surrogates"] == before + 1


def test_stream_cut_by_the_timeout_ends_with_a_timeout_error(serve, slow_engine):
    openai = pytest.importorskip("openai")
    server = serve(slow_engine, timeout_s=1.0)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 80, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", CHAT, json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    chunks = [e for e in events[:-2] if "choices" in e]
    assert len(chunks) > 2 and not any(e["choices"][0]["finish_reason"] for e in chunks)  # not "length"/"stop"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError, match="timeout"):
        for _ in client.completions.create(model=MODEL, prompt="Once", max_tokens=80, stream=True):
            pass
    assert server.app.state.api.scheduler.pending == 0


def test_cancelled_stream_says_cancelled(serve, slow_engine):
    server = serve(slow_engine)
    api = server.app.state.api
    body = {"prompt": "Once", "max_tokens": 80, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")  # generating
        api.scheduler.stop()  # the server stops: running requests are cancelled
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert events[-1]["error"]["code"] == "cancelled"
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-1])


def test_page_values_are_escaped(serve):
    name = "</script><script>alert(1)</script><!--"
    server = serve(model_name=name)
    html = httpx.get(server.url + "/").text
    assert "</script><script>" not in html and "<!--" not in html.split("<script>")[1]
    config = html.split("const CONFIG = ")[1].split(";\n")[0]
    assert json.loads(config)["model"] == name and json.loads(config)["defaults"]["temperature"] == 0.8


@pytest.mark.parametrize("limits", [{"max_pending": 1}, {"max_prepare_bytes": 80}], ids=["pending", "bytes"])
def test_slow_chat_template_is_stopped_with_a_400_naming_it(make_tiny_model, serve, limits):
    model, tok = make_tiny_model(block_size=96)
    tok.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                         "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    server = serve(Engine(model, tok), template_timeout_s=0.5, **limits)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        holder = {}
        slow = threading.Thread(target=lambda: holder.update(r=c.post(CHAT, json={"messages": [
            {"role": "user", "content": "Hi"}]})))
        started = time.perf_counter()
        slow.start()
        while server.app.state.api.scheduler.pending == 0:
            time.sleep(0.01)
        # Rendering holds its admission: the request count, or its bytes in the preparation budget.
        busy = c.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}]})
        health = c.get("/health")
        slow.join()
    assert busy.status_code == 429 and health.status_code == 200
    r = holder["r"]
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    assert "sha256" in r.json()["error"]["message"] and "0.5 s" in r.json()["error"]["message"]
    assert time.perf_counter() - started < 5


def test_too_many_messages_are_refused_before_rendering(serve):
    server = serve(max_messages=8)
    r = httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": "hi"}] * 9})
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]


def test_api_key_scheme_any_case_and_wrong_keys_refused(serve):
    server = serve(api_key="k3y")
    with httpx.Client(base_url=server.url) as c:
        for header, status in [("Bearer k3y", 200), ("bearer k3y", 200), ("BEARER  k3y", 200), ("Bearer k3", 401),
                               ("Token k3y", 401), ("k3y", 401), ("Bearer", 401)]:
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == status, header


# ---- load: good and bad requests together -----------------------------------------------------------------

ONE_MB = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 17_400  # ~0.99 MB


def mixed_requests() -> list[tuple[str, object, bool]]:
    """(path, body, stream): 1 MB bodies, lone surrogates, bad JSON, unknown model, huge max_tokens, good ones."""
    ok = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 6}
    return [
        (CHAT, {"messages": [{"role": "user", "content": ONE_MB}]}, False),
        ("/v1/completions", {"prompt": ONE_MB}, False),
        ("/v1/completions", {"prompt": "x" * 990_000}, False),  # one long run: the tokenizer's slowest case
        (CHAT, SURROGATE_CHAT + b"}", False),
        (CHAT, SURROGATE_CHAT + b', "stream": true}', True),
        ("/v1/completions", SURROGATE_COMPLETION + b', "stream": true}', True),
        ("/v1/completions", b'{"prompt": "x", ', False),
        ("/v1/completions", b"\xff\xfe not utf-8", False),
        (CHAT, {**ok, "model": "gpt-4o"}, False),
        (CHAT, {**ok, "max_tokens": 10**12}, False),
        (CHAT, {**ok, "logprobs": True, "top_logprobs": 5}, False),
        (CHAT, {**ok, "stream": True, "logprobs": True}, True),
        ("/v1/completions", {"prompt": "The verdict was", "max_tokens": 6, "n": 2, "logprobs": 3}, False),
    ]


def test_mixed_load_gives_no_5xx_and_health_stays_fast(serve):
    server = serve(max_pending=24)
    statuses, health = [], []
    stop = threading.Event()

    def probe():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                started = time.perf_counter()
                assert c.get("/health").status_code == 200
                health.append(time.perf_counter() - started)
                time.sleep(0.02)

    def send(path, body, stream, hang_up):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            with c.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
                statuses.append(r.status_code)
                if stream and hang_up:
                    next(r.iter_lines())  # a client that disconnects mid-stream
                else:
                    r.read()

    requests = [(p, b, s, k % 2 == 1) for k in range(2) for p, b, s in mixed_requests()]
    requests += [(CHAT, {"messages": [{"role": "user", "content": ONE_MB}]}, False, False)] * 14  # 20 × 1 MB
    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.2)
    senders = [threading.Thread(target=send, args=r) for r in requests]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    stop.set()
    prober.join()
    assert len(statuses) == len(requests) and not [s for s in statuses if s >= 500], statuses
    assert {200, 400, 404} <= set(statuses) and set(statuses) <= {200, 400, 404, 429}
    assert max(health) < 1.0, f"/health took up to {max(health):.2f} s under load"
    deadline = time.time() + 10
    while server.app.state.api.scheduler.pending and time.time() < deadline:
        time.sleep(0.05)
    assert server.app.state.api.scheduler.pending == 0  # every admitted request was freed
