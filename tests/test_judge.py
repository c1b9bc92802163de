"""LLM-as-a-judge: score parsing, inputs, and full runs against real HTTP servers on loopback.

A scripted OpenAI-compatible server (``http.server``) checks retries, rate limiting, resuming and the batched
mode's shuffling; ``gptforge serve`` with a tiny random model checks that junk replies are recorded, not lost.
"""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.eval.judge import JudgeClient, load_responses, parse_batched, parse_score, run_judge

# ---- parsing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply,score", [
    ("The answer is correct and complete.\nScore: 85", 85.0),
    ("Score: 40. Later I reconsidered.\nScore: 55", 55.0),
    ("**Score:** 90/100", 90.0),
    ("I would rate this 72 out of 100 because it misses a detail.", 72.0),
    ("67", 67.0),
    ('{"score": 30, "comment": "mostly wrong"}', 30.0),
    ("The response gets 3 of the 4 facts right, so 75.", None),  # two numbers, no marker: ambiguous
    ("Not a valid answer at all.", None),
    ("Score: 250", None),  # out of range
    ("", None),
])
def test_parse_score_tolerates_prose(reply, score):
    assert parse_score(reply)[0] == score


def test_parse_score_keeps_comment_without_score_line():
    score, comment = parse_score("Accurate but terse.\nScore: 80")
    assert score == 80 and comment == "Accurate but terse."


def test_parse_batched_lines_and_json():
    lines = "Here are my grades:\nA: 80 - good answer\n**B**: 35 – misses the point\nC: none"
    got = parse_batched(lines, ["A", "B", "C"])
    assert got["A"] == (80.0, "good answer") and got["B"][0] == 35.0 and got["C"][0] is None
    js = 'Sure! {"A": {"score": 10, "comment": "wrong"}, "B": 95}'
    got = parse_batched(js, ["A", "B"])
    assert got == {"A": (10.0, "wrong"), "B": (95.0, "")}


# ---- inputs ------------------------------------------------------------------------------------------------


def write_responses(path, model, items, suffix=""):
    recs = [{"instruction": q, "input": "", "reference": ref, "response": f"{model} says {ref}{suffix}",
             "model": model} for q, ref in items]
    path.write_text(json.dumps(recs, indent=1))
    return path


@pytest.fixture(scope="module")
def items(data_dir):
    data = json.loads((data_dir / "instruct" / "instruction-data.json").read_text())
    return [(d["instruction"] + (" " + d["input"] if d["input"] else ""), d["output"]) for d in data[:4]]


def test_load_responses_reports_bad_record(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "reference": "y", "response": "z"}, {"instruction": "x"}]))
    with pytest.raises(GptforgeError, match=r"bad\.json record 1: a responses record needs"):
        load_responses([bad])


def test_same_model_name_in_two_files_is_refused(tmp_path, items):
    a = write_responses(tmp_path / "a.json", "m", items)
    b = write_responses(tmp_path / "b.json", "m", items)
    with pytest.raises(GptforgeError, match="--names"):
        load_responses([a, b])
    assert set(load_responses([a, b], ["m1", "m2"])) == {"m1", "m2"}


# ---- a scripted OpenAI-compatible server -------------------------------------------------------------------


class ScriptedServer:
    """Real HTTP on 127.0.0.1; ``script(prompt, attempt) -> (status, reply_text)`` decides each answer."""

    def __init__(self, script):
        self.script = script
        self.requests: list[str] = []
        self.times: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                outer.requests.append(prompt)
                outer.times.append(time.monotonic())
                status, text = outer.script(prompt, outer.requests.count(prompt))
                payload = (json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                           if status == 200 else json.dumps({"error": {"message": text}})).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def score_from_answer(prompt: str) -> str:
    """Per-model judge: model 'good' gets 90, 'bad' 20; a response containing JUNK gets a reply with no score."""
    answer = prompt.split("### Answer to grade\n")[1]
    if "JUNK" in answer:
        return "I cannot tell."
    return f"Seems {'fine' if answer.startswith('good') else 'poor'}.\nScore: {90 if answer.startswith('good') else 20}"


def client(url, **kw):
    return JudgeClient(url, "judge-test", backoff=0.01, **kw)


def test_per_model_run_scores_records_unparsed_and_writes_outputs(tmp_path, server_factory, items):
    srv = server_factory(lambda p, n: (200, score_from_answer(p)))
    good = write_responses(tmp_path / "good.json", "good", items)
    bad = write_responses(tmp_path / "bad.json", "bad", items)
    recs = json.loads(bad.read_text())
    recs[2]["response"] = "JUNK"
    bad.write_text(json.dumps(recs))
    summary = run_judge(load_responses([good, bad]), client(srv.url), tmp_path / "out", mode="per-model",
                        chart=True, show_progress=False)
    rows = {r["model"]: r for r in summary["models"]}
    assert rows["good"]["mean"] == 90 and rows["good"]["scored"] == 4 and rows["good"]["stderr"] == 0
    assert rows["bad"]["mean"] == 20 and rows["bad"]["scored"] == 3 and rows["bad"]["unparsed"] == 1
    annotated = json.loads((tmp_path / "out" / "bad.annotated.json").read_text())
    assert len(annotated) == 4  # nothing dropped
    assert annotated[2]["judge_status"] == "unparsed" and annotated[2]["judge_reply"] == "I cannot tell."
    assert annotated[0]["judge_score"] == 20 and annotated[0]["judge_comment"] == "Seems poor."
    assert (tmp_path / "out" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "| good | 90.00 | 0.00 | 4/4 | 0 | 0 |" in (tmp_path / "out" / "summary.md").read_text()
    assert len(srv.requests) == 8


def test_transient_errors_are_retried_with_backoff(tmp_path, server_factory, items):
    def script(prompt, attempt):
        return {1: (503, "overloaded"), 2: (429, "slow down")}.get(attempt, (200, "Score: 70"))

    srv = server_factory(script)
    path = write_responses(tmp_path / "m.json", "m", items[:2])
    summary = run_judge(load_responses([path]), client(srv.url), tmp_path / "out", mode="per-model",
                        show_progress=False)
    assert summary["models"][0]["scored"] == 2 and summary["models"][0]["mean"] == 70
    assert len(srv.requests) == 6  # two failures then success, per item


def test_failed_items_are_recorded_and_a_rerun_only_asks_for_them(tmp_path, server_factory, items):
    broken = {"on": True}

    def script(prompt, attempt):
        if broken["on"] and items[1][1] in prompt:
            return 500, "internal error"
        return 200, "Score: 60"

    srv = server_factory(script)
    path = write_responses(tmp_path / "m.json", "m", items)
    out = tmp_path / "out"
    first = run_judge(load_responses([path]), client(srv.url, max_retries=1), out, mode="per-model",
                      show_progress=False)
    assert first["models"][0]["errors"] == 1 and first["models"][0]["scored"] == 3
    annotated = json.loads((out / "m.annotated.json").read_text())
    assert annotated[1]["judge_status"] == "error" and "HTTP 500" in annotated[1]["judge_error"]
    asked_before = len(srv.requests)
    broken["on"] = False
    second = run_judge(load_responses([path]), client(srv.url), out, mode="per-model", show_progress=False)
    assert len(srv.requests) == asked_before + 1  # only the failed item
    assert second["skipped_from_cache"] == 3 and second["models"][0]["scored"] == 4
    third = run_judge(load_responses([path]), client(srv.url), out, mode="per-model", show_progress=False)
    assert third["asked"] == 0 and len(srv.requests) == asked_before + 1


def test_batched_mode_shuffles_and_records_the_mapping(tmp_path, server_factory, data_dir):
    data = json.loads((data_dir / "instruct" / "instruction-data.json").read_text())[:12]
    many = [(d["instruction"], d["output"]) for d in data]
    orders = []

    def script(prompt, attempt):
        answers = re.findall(r"### Answer ([A-Z])\n(\w+) says", prompt)
        orders.append(tuple(m for _, m in answers))
        value = {"alpha": 10, "beta": 50, "gamma": 90}
        return 200, "\n".join(f"{label}: {value[m]} - ok" for label, m in answers)

    srv = server_factory(script)
    files = [write_responses(tmp_path / f"{m}.json", m, many) for m in ("alpha", "beta", "gamma")]
    summary = run_judge(load_responses(files), client(srv.url), tmp_path / "out", mode="batched", seed=3,
                        show_progress=False)
    assert len(srv.requests) == 12  # one query per item, all models in it
    assert {r["model"]: r["mean"] for r in summary["models"]} == {"alpha": 10, "beta": 50, "gamma": 90}
    assert len(set(orders)) > 1  # the order really varies between items
    annotated = json.loads((tmp_path / "out" / "beta.annotated.json").read_text())
    for rec, order in zip(annotated, orders):
        assert rec["judge_mapping"] == {label: m for label, m in zip("ABC", order)}
        assert rec["judge_mapping"][rec["judge_label"]] == "beta"
    # same seed → same order on a fresh run
    orders.clear()
    run_judge(load_responses(files), client(srv.url), tmp_path / "out2", mode="batched", seed=3, show_progress=False)
    assert [tuple(r["judge_mapping"].values()) for r in annotated] == orders


def test_rate_limit_spaces_requests(tmp_path, server_factory, items):
    srv = server_factory(lambda p, n: (200, "Score: 50"))
    path = write_responses(tmp_path / "m.json", "m", items)
    run_judge(load_responses([path]), client(srv.url, rpm=300), tmp_path / "out", mode="per-model",
              concurrency=2, show_progress=False)
    gaps = [b - a for a, b in zip(srv.times, srv.times[1:])]
    assert len(gaps) == 3 and min(gaps) >= 0.18  # 300 per minute = one per 0.2 s


# ---- end to end against gptforge serve ---------------------------------------------------------------------


def test_cli_judges_with_gptforge_serve_and_reports_junk_honestly(tmp_path, items, data_dir, capsys):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    import socket

    import torch

    from gptforge.engine import Engine
    from gptforge.model import GPT, GPTConfig
    from gptforge.serve.app import ServerSettings, create_app
    from gptforge.tokenizer import TiktokenTokenizer

    torch.manual_seed(0)
    tok = TiktokenTokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=1, n_head=2, n_embd=32)).eval()
    app = create_app(Engine(model, tok), ServerSettings(model_name="tiny-judge"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        a = write_responses(tmp_path / "a.json", "model-a", items[:3])
        b = write_responses(tmp_path / "b.json", "model-b", items[:3])
        rc = main(["eval", "judge", str(a), str(b), "--base-url", f"http://127.0.0.1:{port}/v1",
                   "--model", "tiny-judge", "--mode", "batched", "--max-tokens", "12", "--out", str(tmp_path / "j")])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.api.scheduler.stop()
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "j" / "summary.json").read_text())
    for row in summary["models"]:
        assert row["errors"] == 0 and row["scored"] + row["unparsed"] == row["total"] == 3
    annotated = json.loads((tmp_path / "j" / "model-a.annotated.json").read_text())
    assert len(annotated) == 3
    assert all(isinstance(r["judge_reply"], str) and r["judge_status"] in ("ok", "unparsed") for r in annotated)
    unparsed = sum(r["unparsed"] for r in summary["models"])
    assert unparsed >= 1  # a random model's replies are junk
    assert f"{unparsed} answer(s) without a parseable score" in out
