"""Continuous batching: rows join a running batch between decode steps and leave when done, prefill in chunks,
the same tokens as static batching and as each prompt alone; the server's two modes and its /metrics."""

import json
import threading
import time

import httpx
import pytest

from gptforge.batching import ContinuousBatch
from gptforge.engine import Engine, SamplingParams
from gptforge.serve.app import ServerSettings, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The verdict was", "It had always been his fate to", "Yes",
           "Mrs. Gisburn said that the picture was " * 4, "Hello there", "In the beginning"]


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    model, tok = make_tiny_model(block_size=96)
    return Engine(model, tok)


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def run(batch: ContinuousBatch, arrivals: dict[int, list], max_steps: int = 500) -> dict:
    """Step ``batch``; at step ``s`` add the ``(key, prompt, params)`` of ``arrivals[s]``. Returns key → Completion."""
    done = {}
    for step in range(max_steps):
        for key, prompt, params in arrivals.get(step, []):
            batch.add([key], [prompt], [params], on_finish=lambda k, c: done.__setitem__(k, c))
        if not batch.rows and step > max(arrivals):
            return done
        if batch.rows:
            batch.step()
    raise AssertionError("the batch did not finish")


# ---- the engine -----------------------------------------------------------------------------------------


def test_staggered_joins_give_each_prompt_its_tokens_alone_and_static(engine):
    params = [greedy(n) for n in (12, 30, 5, 20, 40, 9)]
    alone = [engine.generate([p], q)[0] for p, q in zip(PROMPTS, params)]
    static = engine.generate(PROMPTS, params)
    assert len(engine.encode_prompt(PROMPTS[3])) > 3 * 8  # read in several chunks of 8
    arrivals = {0: [(0, PROMPTS[0], params[0])], 2: [(1, PROMPTS[1], params[1]), (2, PROMPTS[2], params[2])],
                5: [(3, PROMPTS[3], params[3])], 9: [(4, PROMPTS[4], params[4])], 30: [(5, PROMPTS[5], params[5])]}
    done = run(ContinuousBatch(engine, prefill_chunk=8), arrivals)
    for i in range(len(PROMPTS)):
        assert done[i].token_ids == alone[i].token_ids == static[i].token_ids
        assert done[i].text == alone[i].text and done[i].finish_reason == "length"


def test_sampling_penalties_logprobs_and_stops_match_generate_alone(engine):
    free = engine.generate([PROMPTS[0]], greedy(16))[0]
    stop = free.text[5:9]
    params = [SamplingParams(max_new_tokens=14, temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=11),
              SamplingParams(max_new_tokens=10, temperature=1.2, top_k=40, frequency_penalty=0.7,
                             presence_penalty=0.5, seed=12, logprobs=True, top_logprobs=3),
              greedy(16, stop_strings=[stop]),
              greedy(12, repetition_penalty=2.0, logprobs=True)]
    prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[0], PROMPTS[4]]
    alone = [engine.generate([p], q)[0] for p, q in zip(prompts, params)]
    arrivals = {0: [(0, prompts[0], params[0])], 3: [(1, prompts[1], params[1]), (2, prompts[2], params[2])],
                6: [(3, prompts[3], params[3])]}
    done = run(ContinuousBatch(engine, prefill_chunk=16), arrivals)
    assert done[2].finish_reason == "stop" and done[2].text == free.text[: free.text.find(stop)]
    for i, a in enumerate(alone):
        c = done[i]
        assert (c.token_ids, c.text, c.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        if a.logprobs is not None:
            assert c.logprobs == pytest.approx(a.logprobs, abs=1e-4)
            assert [[t for t, _ in top] for top in c.top_logprobs] == [[t for t, _ in top] for top in a.top_logprobs]


def test_a_short_request_joins_and_leaves_while_a_long_one_runs(engine):
    batch = ContinuousBatch(engine)
    events = []
    on_token = lambda k, t, d: events.append(("token", k))
    on_finish = lambda k, c: events.append(("finish", k))
    batch.add(["long"], [PROMPTS[1]], [greedy(40)], on_token, on_finish)
    for _ in range(5):
        batch.step()
    batch.add(["short"], [PROMPTS[2]], [greedy(3)], on_token, on_finish)
    while batch.rows:
        batch.step()
    short_done = events.index(("finish", "short"))
    assert events.index(("token", "short")) > 5  # joined after five steps of the long one
    assert ("token", "long") in events[short_done:]  # left while the long one still ran
    assert events.count(("token", "long")) == 40 and events[-1] == ("finish", "long")


def test_chunked_prefill_does_not_stall_running_rows(engine):
    batch = ContinuousBatch(engine, prefill_chunk=8)
    tokens = []
    batch.add(["running"], [PROMPTS[0]], [greedy(30)], on_token=lambda k, t, d: tokens.append(k))
    batch.step()
    batch.add(["long prompt"], [PROMPTS[3]], [greedy(4)], on_token=lambda k, t, d: tokens.append(k))
    width = len(engine.encode_prompt(PROMPTS[3]))
    for step in range(1, -(-width // 8)):  # every step of the long prompt's prefill also decodes the running row
        batch.step()
        assert tokens.count("running") == step + 1 and "long prompt" not in tokens
        assert batch.prefilling == 1 and len(batch.running) == 1
    batch.step()
    assert tokens[-1] == "long prompt" and len(batch.running) == 2  # read: its first token, and it joined


def test_rows_near_the_context_limit_share_a_cache_no_longer_than_the_context(make_tiny_model):
    model, tok = make_tiny_model(block_size=32)
    eng = Engine(model, tok)
    prompts = [list(range(100, 125)), [100, 101], list(range(200, 215)), [300]]
    alone = [eng.generate([p], greedy(40))[0] for p in prompts]
    batch = ContinuousBatch(eng, prefill_chunk=4)
    lengths = []
    real_step = batch._step

    def step():  # the running cache never holds more columns than the context
        produced = real_step()
        if batch.store is not None:
            lengths.append(batch.store.max_len)
        return produced

    batch._step = step
    done = run(batch, {0: [(0, prompts[0], greedy(40))], 1: [(1, prompts[1], greedy(40))],
                       4: [(2, prompts[2], greedy(40))], 12: [(3, prompts[3], greedy(40))]})
    assert max(lengths) <= 32
    for i, a in enumerate(alone):
        assert done[i].token_ids == a.token_ids and len(a.prompt_ids) + len(a.token_ids) == 32


def test_random_arrivals_through_every_join_and_leave_path_match_generate_alone(make_tiny_model):
    import random

    model, tok = make_tiny_model(block_size=64)
    eng = Engine(model, tok)
    rng = random.Random(0)
    kinds = [lambda n, i: greedy(n), lambda n, i: greedy(n, repetition_penalty=1.5),
             lambda n, i: SamplingParams(max_new_tokens=n, temperature=0.9, top_p=0.9, seed=i,
                                         frequency_penalty=0.5, presence_penalty=0.3),
             lambda n, i: SamplingParams(max_new_tokens=n, temperature=1.0, top_k=50, seed=i)]
    requests, arrivals = [], {}
    for i in range(24):
        prompt = [rng.randrange(100, 5000) for _ in range(rng.choice([1, 3, 9, 20, 40]))]
        params = kinds[i % len(kinds)](rng.randint(1, 30), i)
        requests.append((prompt, params))
        arrivals.setdefault(rng.randint(0, 60), []).append((i, prompt, params))
    batch = ContinuousBatch(eng, prefill_chunk=16, max_rows=4)  # few slots and a short context: every path
    done = run(batch, arrivals)
    assert batch.rebuilds > 1 and batch.groups > batch.rebuilds  # most joins took a free slot
    for i, (prompt, params) in enumerate(requests):
        alone = eng.generate([prompt], params)[0]
        assert (done[i].token_ids, done[i].finish_reason) == (alone.token_ids, alone.finish_reason), i


def test_the_modern_family_with_grouped_kv_heads_gets_its_tokens_alone(modern_chat_model):
    """RoPE positions from the mask and a cache with fewer key/value heads than query heads, through every
    join and leave."""
    model, tok = modern_chat_model(block_size=64)
    eng = Engine(model, tok)
    params = [greedy(n) for n in (20, 6, 30, 12)]
    prompts = PROMPTS[:4]
    alone = [eng.generate([p], q)[0] for p, q in zip(prompts, params)]
    batch = ContinuousBatch(eng, prefill_chunk=8, max_rows=2)
    heads, real_step = set(), batch._step
    batch._step = lambda: (real_step(), heads.add(batch.store.k.shape[2] if batch.store is not None else None))[0]
    done = run(batch, {0: [(0, prompts[0], params[0])], 3: [(1, prompts[1], params[1]), (2, prompts[2], params[2])],
                       10: [(3, prompts[3], params[3])]})
    assert heads - {None} == {2} and batch.rebuilds > 1  # the model's own cache: 2 key/value heads
    for i, a in enumerate(alone):
        assert done[i].token_ids == a.token_ids, i


def test_cancelling_a_row_before_it_decodes(engine):
    batch = ContinuousBatch(engine, prefill_chunk=8)
    done = {}
    on_finish = lambda k, c: done.__setitem__(k, c)
    batch.add([0, 1, 2], [PROMPTS[3], PROMPTS[0], PROMPTS[2]], [greedy(5)] * 3, on_finish=on_finish)
    batch.step()  # row 0 (long) is being prefilled; 1 and 2 wait
    assert batch.cancel(0) and batch.cancel(2) and not batch.cancel(99)
    assert done[0].finish_reason == done[2].finish_reason == "cancelled" and done[0].token_ids == []
    while batch.rows:
        batch.step()
    assert done[1].token_ids == engine.generate([PROMPTS[0]], greedy(5))[0].token_ids


# ---- the server -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(engine, live_server):
    """A static and a continuous server over the same engine."""
    made = {mode: live_server(create_app(engine, ServerSettings(model_name="m", batching=mode, prefill_chunk=16)))
            for mode in ("static", "continuous")}
    yield made
    for server in made.values():
        server.close()


def ask_all(url: str, bodies: list[tuple[str, dict]]) -> list:
    """Send every request at once (one thread each); the JSON answers, or the streamed text, in order."""
    out = [None] * len(bodies)

    def one(i, path, body):
        with httpx.Client(base_url=url, timeout=60) as c:
            if body.get("stream"):
                with c.stream("POST", path, json=body) as r:
                    lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
                out[i] = "".join(e["choices"][0].get("text") or "" for e in lines)
            else:
                out[i] = c.post(path, json=body).json()

    threads = [threading.Thread(target=one, args=(i, *b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_static_and_continuous_servers_answer_the_same_greedy_tokens(servers, engine):
    bodies = [("/v1/completions", {"prompt": p, "max_tokens": n, "temperature": 0})
              for p, n in zip(PROMPTS, (20, 4, 30, 8, 12, 25))]
    bodies += [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}],
                                         "max_tokens": 15, "temperature": 0}),
               ("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stream": True})]
    answers = {mode: ask_all(server.url, bodies) for mode, server in servers.items()}
    for i, (_, body) in enumerate(bodies):
        if "messages" in body:
            expected = engine.chat(body["messages"], greedy(15)).text
            got = [a[i]["choices"][0]["message"]["content"] for a in answers.values()]
        else:
            expected = engine.generate([body["prompt"]], greedy(body["max_tokens"]))[0].text
            got = [a[i] if body.get("stream") else a[i]["choices"][0]["text"] for a in answers.values()]
        assert got == [expected, expected]


def test_continuous_server_answers_a_short_request_while_a_long_stream_runs(make_tiny_model, live_server):
    model, tok = make_tiny_model(block_size=96)
    model.register_forward_hook(lambda *_: time.sleep(0.01))  # about 10 ms a step
    order = {}
    for mode in ("continuous", "static"):
        server = live_server(create_app(Engine(model, tok), ServerSettings(model_name="m", batching=mode)))
        first, times = threading.Event(), {}

        def long_stream(url, first, times):
            with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json={
                    "prompt": "Once", "max_tokens": 80, "temperature": 0, "stream": True}) as r:
                for _ in r.iter_lines():
                    first.set()
            times["long"] = time.perf_counter()

        try:
            reader = threading.Thread(target=long_stream, args=(server.url, first, times))
            reader.start()
            first.wait(30)  # the long request is decoding
            short = httpx.post(server.url + "/v1/completions", json={"prompt": "Yes", "max_tokens": 2,
                                                                     "temperature": 0}, timeout=60)
            times["short"] = time.perf_counter()
            reader.join()
        finally:
            server.close()
        assert short.status_code == 200
        order[mode] = sorted(times, key=times.get)
    assert order == {"continuous": ["short", "long"], "static": ["long", "short"]}


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_client_that_leaves_frees_its_row_while_the_others_run_on(make_tiny_model, live_server, engine):
    model, tok = make_tiny_model(block_size=96)
    model.register_forward_hook(lambda *_: time.sleep(0.01))
    server = live_server(create_app(Engine(model, tok), ServerSettings(model_name="m")))
    scheduler = server.app.state.api.scheduler
    stayer = {}
    body = {"prompt": "Once", "max_tokens": 80, "temperature": 0}
    try:
        t = threading.Thread(target=lambda: stayer.update(
            r=httpx.post(server.url + "/v1/completions", json=body, timeout=60)))
        t.start()
        with httpx.Client(base_url=server.url, timeout=60) as c, \
                c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)  # decoding
            assert wait_for(lambda: scheduler.running_rows == 2)
        # hung up: its row leaves the batch at once, while the other one still decodes
        assert wait_for(lambda: scheduler.running_rows == 1) and "r" not in stayer
        t.join()
        expected = engine.generate(["Once"], greedy(80))[0].text
        assert stayer["r"].status_code == 200 and stayer["r"].json()["choices"][0]["text"] == expected
        assert scheduler.running_rows == 0 and scheduler.pending == 0
    finally:
        server.close()


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_a_request_past_its_timeout_is_cut_and_frees_its_row(make_tiny_model, live_server, mode):
    model, tok = make_tiny_model(block_size=96)
    model.register_forward_hook(lambda *_: time.sleep(0.02))
    server = live_server(create_app(Engine(model, tok), ServerSettings(model_name="m", batching=mode, timeout_s=0.5)))
    scheduler = server.app.state.api.scheduler
    try:
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 90}, timeout=60)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        assert time.perf_counter() - t0 < 0.5 + 1.0  # cut at its next token, not at the end of its 90
        assert wait_for(lambda: scheduler.running_rows == 0 and scheduler.pending == 0)
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Yes", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200
    finally:
        server.close()


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_are_prometheus_text_with_queue_rows_tokens_latency_and_statuses(servers):
    url = servers["continuous"].url
    before = parse_metrics(httpx.get(url + "/metrics").text)
    ok = httpx.post(url + "/v1/completions", json={"prompt": "Yes", "max_tokens": 7, "temperature": 0}, timeout=30)
    bad = httpx.post(url + "/v1/completions", json={"prompt": "Yes", "max_tokens": 0})
    assert ok.status_code == 200 and bad.status_code == 400
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text, after = r.text, parse_metrics(r.text)
    for name in ("gptforge_queue_depth", "gptforge_running_rows", "gptforge_requests_pending",
                 "gptforge_generated_tokens_per_second"):
        assert f"# TYPE {name} gauge" in text and name in after
    assert "# TYPE gptforge_request_duration_seconds histogram" in text
    assert after["gptforge_generated_tokens_total"] - before.get("gptforge_generated_tokens_total", 0) == 7
    assert after["gptforge_generated_tokens_per_second"] > 0
    ok_200 = 'gptforge_requests_total{route="/v1/completions",status="200"}'
    bad_400 = 'gptforge_requests_total{route="/v1/completions",status="400"}'
    assert after[ok_200] - before.get(ok_200, 0) == 1 and after[bad_400] - before.get(bad_400, 0) == 1
    count = "gptforge_request_duration_seconds_count"
    assert after[count] - before.get(count, 0) == 1
    assert after['gptforge_request_duration_seconds_bucket{le="+Inf"}'] == after[count]
    assert after["gptforge_queue_depth"] == after["gptforge_running_rows"] == 0
    assert after['gptforge_batching_info{mode="continuous"}'] == 1


def test_serve_command_takes_the_batching_mode(make_tiny_model, tmp_path, monkeypatch):
    from gptforge.checkpoint import save_model
    from gptforge.cli import main

    model, tok = make_tiny_model(block_size=96)
    ckpt = save_model(tmp_path / "m", model, tok)
    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, **_: apps.append(app))
    assert main(["serve", "--checkpoint", str(ckpt), "--batching", "static", "--dtype", "float32"]) == 0
    assert main(["serve", "--checkpoint", str(ckpt), "--prefill-chunk", "32", "--dtype", "float32"]) == 0
    schedulers = [app.state.api.scheduler for app in apps]
    assert [s.batching for s in schedulers] == ["static", "continuous"]
    assert schedulers[1]._batch.prefill_chunk == 32
    for s in schedulers:
        s.stop()
