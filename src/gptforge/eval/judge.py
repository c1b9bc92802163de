"""LLM-as-a-judge: score instruction answers 0–100 against a reference with any OpenAI-compatible endpoint.

Two modes (seed 004):

- ``per-model``: one query per (model, item). Simple, but a judge grades inconsistently from query to query,
  so differences between models drown in judge noise.
- ``batched``: one query per item holding every model's answer, labelled A, B, … in an order shuffled per item
  (seeded, so reruns are identical); the label → model mapping is recorded with the scores.

Robustness: transient failures (connection errors, timeouts, HTTP 429/5xx) are retried with exponential
backoff (honouring ``Retry-After``); requests are spaced to a requests-per-minute limit; scores are parsed out
of surrounding prose; replies without a usable score are kept and counted as *unparsed*, never dropped. Every
finished query is appended to ``judge_cache.jsonl`` in the output directory, so an interrupted or partly failed
run resumes where it stopped: items already scored are skipped, failed ones are asked again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.charts import save_figure
from gptforge.errors import GptforgeError
from gptforge.io import iter_jsonl, write_json

CACHE_FILE = "judge_cache.jsonl"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

SYSTEM_PROMPT = "You are a strict, fair grader of answers to instructions. You compare answers with a reference."

PER_MODEL_PROMPT = """Grade the answer to the instruction below, comparing it with the reference answer.

{task}
### Answer to grade
{response}

Score the answer from 0 (wrong, irrelevant or empty) to 100 (as correct and useful as the reference).
Reply with one short sentence of justification, then a last line of the form "Score: <0-100>"."""

BATCHED_PROMPT = """Grade each of the {n} answers to the instruction below, comparing each with the reference answer.
The answers come from different systems in random order; grade each on its own merits.

{task}
{answers}
Score each answer from 0 (wrong, irrelevant or empty) to 100 (as correct and useful as the reference).
Reply with exactly one line per answer, in the form "<label>: <score> - <short comment>", for labels {labels}."""


# ---- inputs ------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One model's answer to one test item."""

    model: str
    index: int  # position in its file
    instruction: str
    input: str
    reference: str
    response: str
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def item_key(self) -> str:
        """Identity of the test item (same instruction, input and reference across models)."""
        h = hashlib.sha1(json.dumps([self.instruction, self.input, self.reference]).encode("utf-8"))
        return h.hexdigest()[:16]


_REFERENCE_KEYS = ("reference", "output", "expected", "answer")
_RESPONSE_KEYS = ("response", "model_response", "generated", "completion", "prediction")


def _first(rec: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if isinstance(rec.get(k), str):
            return rec[k]
    return None


def load_responses(paths: list[str | Path], model_names: list[str] | None = None) -> dict[str, list[Record]]:
    """Records per model from responses files (a JSON list, ``{"responses": [...]}`` or jsonl).

    The model name is ``model_names[i]`` when given, else the records' ``model`` field, else the file name.
    """
    if model_names and len(model_names) != len(paths):
        raise GptforgeError(f"--names gives {len(model_names)} names for {len(paths)} responses files")
    out: dict[str, list[Record]] = {}
    source: dict[str, Path] = {}
    for i, path in enumerate(map(Path, paths)):
        rows = _read_records(path)
        for j, (where, rec) in enumerate(rows):
            reference, response = _first(rec, _REFERENCE_KEYS), _first(rec, _RESPONSE_KEYS)
            if not isinstance(rec.get("instruction"), str) or reference is None or response is None:
                raise GptforgeError(
                    f"{where}: a responses record needs string fields instruction, reference (or output) and "
                    f"response; found {', '.join(rec) or 'nothing'}")
            name = str((model_names[i] if model_names else None) or rec.get("model") or path.stem)
            if source.setdefault(name, path) != path:
                raise GptforgeError(f"{path}: model name {name!r} is also used by {source[name]}; "
                                    "give each file its own name with --names")
            out.setdefault(name, [])
            out[name].append(Record(name, j, rec["instruction"], rec.get("input") or "", reference,
                                         response, rec))
    if not out:
        raise GptforgeError("no responses to judge")
    return out


def _read_records(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise GptforgeError(f"responses file not found: {path}")
    if path.suffix == ".jsonl":
        return [(f"{path}:{lineno}", rec) for lineno, rec in iter_jsonl(path)]
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GptforgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected a list of records") from None
    if isinstance(data, dict) and isinstance(data.get("responses"), list):
        data = data["responses"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise GptforgeError(f"{path}: expected a JSON list of records (instruction, input, reference, response)")
    return [(f"{path} record {i}", r) for i, r in enumerate(data)]


def task_text(rec: Record) -> str:
    parts = ["### Instruction", rec.instruction.strip()]
    if rec.input.strip():
        parts += ["", "### Input", rec.input.strip()]
    parts += ["", "### Reference answer", rec.reference.strip(), ""]
    return "\n".join(parts)


# ---- score parsing -----------------------------------------------------------------------------------------

_NUMBER = r"(\d{1,3}(?:\.\d+)?)"


def _in_range(value: str) -> float | None:
    v = float(value)
    return v if 0.0 <= v <= 100.0 else None


def parse_score(text: str) -> tuple[float | None, str]:
    """``(score, comment)`` from a judge reply; score is None when no single 0–100 score can be found.

    Accepted, in order: a JSON object with ``score``; "Score: 85" / "score of 85" (the last one wins);
    "85/100" or "85 out of 100"; a reply that is just a number; exactly one number in 0–100 in the text.
    """
    text = text or ""
    comment = text.strip()
    obj = _json_object(text)
    if isinstance(obj, dict) and isinstance(obj.get("score"), (int, float)) and 0 <= obj["score"] <= 100:
        return float(obj["score"]), str(obj.get("comment") or obj.get("reason") or obj.get("justification") or "")
    found = re.findall(r"score\W{0,3}(?:is|of|=|:)?\W{0,3}" + _NUMBER, text, flags=re.IGNORECASE)
    if found and _in_range(found[-1]) is not None:
        return _in_range(found[-1]), _strip_score_line(comment)
    found = re.findall(_NUMBER + r"\s*(?:/|out of)\s*100\b", text, flags=re.IGNORECASE)
    if found and _in_range(found[-1]) is not None:
        return _in_range(found[-1]), _strip_score_line(comment)
    if re.fullmatch(r"\W*" + _NUMBER + r"\W*", text.strip()):
        return _in_range(re.search(_NUMBER, text).group(1)), ""
    numbers = {n for n in re.findall(r"(?<![\w.])" + _NUMBER + r"(?![\w.]|\.\d)", text)}
    valid = {v for v in (_in_range(n) for n in numbers) if v is not None}
    if len(valid) == 1 and len(numbers) == 1:
        return valid.pop(), comment
    return None, comment


def _strip_score_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not re.match(r"\W*score\b", ln, flags=re.IGNORECASE)]
    return "\n".join(lines).strip()


def _json_object(text: str):
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        return None
    try:
        return json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None


def parse_batched(text: str, labels: list[str]) -> dict[str, tuple[float | None, str]]:
    """Per label ``(score, comment)`` from a batched reply (JSON object or lines like "A: 85 - good")."""
    obj = _json_object(text or "")
    out: dict[str, tuple[float | None, str]] = {}
    for label in labels:
        score, comment = None, ""
        if isinstance(obj, dict) and label in obj:
            v = obj[label]
            if isinstance(v, (int, float)):
                score = float(v)
            elif isinstance(v, dict) and isinstance(v.get("score"), (int, float)):
                score, comment = float(v["score"]), str(v.get("comment") or "")
        else:
            m = re.search(r"^[\W_]*(?:answer|model|system)?\s*\(?\[?" + label + r"\]?\)?\**\s*[:=\-–]\s*\**\s*"
                          + _NUMBER + r"(?:\s*/\s*100)?\**\s*[-–:,.]?\s*(.*)$", text or "", flags=re.MULTILINE)
            if m:
                score, comment = float(m.group(1)), m.group(2).strip()
        if score is not None and not 0 <= score <= 100:
            score = None
        out[label] = (score, comment)
    return out


# ---- the client --------------------------------------------------------------------------------------------


class JudgeError(Exception):
    """A judge request that failed for good (after retries, or a non-retryable HTTP error)."""


class RateLimiter:
    """Spaces request starts at least ``60 / rpm`` seconds apart (shared by all worker threads)."""

    def __init__(self, rpm: float | None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            at = max(now, self.next_at)
            self.next_at = at + self.interval
        if at > now:
            time.sleep(at - now)


@dataclass
class JudgeClient:
    """Chat completions against an OpenAI-compatible ``base_url`` (…/v1), with retries and rate limiting."""

    base_url: str
    model: str
    api_key: str | None = None
    temperature: float = 0.0
    max_tokens: int = 512
    timeout: float = 120.0
    max_retries: int = 5
    backoff: float = 2.0  # seconds before the first retry; doubles each time
    rpm: float | None = None

    def __post_init__(self):
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout)
        self._limiter = RateLimiter(self.rpm)

    def complete(self, prompt: str) -> str:
        """The judge's reply text; raises :class:`JudgeError` when every attempt failed."""
        import httpx

        body = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            delay = self.backoff * (2 ** attempt)
            try:
                resp = self._http.post("/chat/completions", json=body)
            except httpx.HTTPError as e:  # connection refused, reset, timeout
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        raise JudgeError(f"unexpected response shape from {self.base_url}: {e}: "
                                         f"{resp.text[:200]}") from None
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRY_STATUS:
                    raise JudgeError(last)
                retry_after = resp.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            if attempt < self.max_retries:
                time.sleep(delay * (1 + 0.1 * random.random()))
        raise JudgeError(f"gave up after {self.max_retries + 1} attempts: {last}")

    def close(self) -> None:
        self._http.close()


# ---- running a judgement -----------------------------------------------------------------------------------


@dataclass
class Query:
    """One request to the judge: its cache key, prompt, and which records (by label) it grades."""

    key: str
    prompt: str
    records: dict[str, Record]  # label → record ("" for per-model)


def build_queries(responses: dict[str, list[Record]], mode: str, seed: int = 0) -> list[Query]:
    """Per-model: one query per record. Batched: one per item, answers in a seeded shuffled order."""
    queries = []
    if mode == "per-model":
        for model in sorted(responses):
            for rec in responses[model]:
                prompt = PER_MODEL_PROMPT.format(task=task_text(rec), response=rec.response.strip())
                queries.append(Query(_key(mode, rec.item_key, [model], prompt), prompt, {"": rec}))
        return queries
    if mode != "batched":
        raise GptforgeError(f"judge mode must be per-model or batched, got {mode!r}")
    items: dict[str, dict[str, Record]] = {}
    order: list[str] = []
    for model in sorted(responses):
        for rec in responses[model]:
            if rec.item_key not in items:
                items[rec.item_key] = {}
                order.append(rec.item_key)
            items[rec.item_key].setdefault(model, rec)
    for item_key in order:
        models = sorted(items[item_key])
        if len(models) > len(LABELS):
            raise GptforgeError(f"batched judging supports up to {len(LABELS)} models, got {len(models)}")
        random.Random(f"{seed}:{item_key}").shuffle(models)
        labelled = {LABELS[i]: items[item_key][m] for i, m in enumerate(models)}
        answers = "".join(f"### Answer {label}\n{rec.response.strip()}\n\n" for label, rec in labelled.items())
        first = next(iter(labelled.values()))
        prompt = BATCHED_PROMPT.format(n=len(labelled), task=task_text(first), answers=answers,
                                       labels=", ".join(labelled))
        queries.append(Query(_key(mode, item_key, models, prompt), prompt, labelled))
    return queries


def _key(mode: str, item_key: str, models: list[str], prompt: str) -> str:
    raw = json.dumps([mode, item_key, models, hashlib.sha1(prompt.encode("utf-8")).hexdigest()])
    return hashlib.sha1(raw.encode("utf-8")).hexdigest()[:20]


def read_cache(path: Path) -> dict[str, dict]:
    """Cached judgements by key; a torn last line (killed mid-write) is ignored."""
    cache: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "key" in entry:
                cache[entry["key"]] = entry
    return cache


def judge_query(client: JudgeClient, query: Query, judge_model: str) -> dict:
    """Ask the judge once; a cache entry with per-model scores, comments, status and the raw reply."""
    entry = {"key": query.key, "judge": judge_model, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "mapping": {label: rec.model for label, rec in query.records.items()},
             "item": next(iter(query.records.values())).item_key}
    try:
        reply = client.complete(query.prompt)
    except JudgeError as e:
        entry.update(status="error", error=str(e), reply=None, scores={}, comments={})
        return entry
    if "" in query.records:
        score, comment = parse_score(reply)
        parsed = {"": (score, comment)}
    else:
        parsed = parse_batched(reply, list(query.records))
    scores = {query.records[label].model: s for label, (s, _) in parsed.items()}
    comments = {query.records[label].model: c for label, (_, c) in parsed.items()}
    status = "ok" if all(s is not None for s in scores.values()) else "unparsed"
    entry.update(status=status, reply=reply, scores=scores, comments=comments)
    return entry


def run_judge(responses: dict[str, list[Record]], client: JudgeClient, out_dir: str | Path, mode: str = "batched",
              seed: int = 0, concurrency: int = 1, retry_unparsed: bool = False, chart: bool = False,
              show_progress: bool = True) -> dict:
    """Judge every answer (resuming from ``out_dir``'s cache) and write annotated JSON + summary files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / CACHE_FILE
    cache = read_cache(cache_path)
    queries = build_queries(responses, mode, seed)
    done_status = {"ok"} if retry_unparsed else {"ok", "unparsed"}
    todo = [q for q in queries if cache.get(q.key, {}).get("status") not in done_status]
    skipped = len(queries) - len(todo)
    lock = threading.Lock()
    bar = None
    if show_progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"judging ({mode})", unit="query")

    def work(query: Query) -> None:
        entry = judge_query(client, query, client.model)
        with lock:
            cache[query.key] = entry
            with open(cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if bar:
                bar.update(1)

    try:
        if concurrency <= 1:
            for q in todo:
                work(q)
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(work, todo))
    finally:
        if bar:
            bar.close()
    summary = write_outputs(responses, queries, cache, out_dir, mode, client.model, chart)
    summary["queries"] = len(queries)
    summary["asked"] = len(todo)
    summary["skipped_from_cache"] = skipped
    return summary


def write_outputs(responses: dict[str, list[Record]], queries: list[Query], cache: dict[str, dict], out_dir: Path,
                  mode: str, judge_model: str, chart: bool) -> dict:
    """Annotated JSON per model, ``summary.json``/``summary.md`` and optionally ``scores.png``."""
    by_record: dict[tuple[str, int], tuple[dict, str]] = {}
    for q in queries:
        entry = cache.get(q.key)
        for label, rec in q.records.items():
            by_record[(rec.model, rec.index)] = (entry or {}, label)
    rows = []
    for model in sorted(responses):
        annotated, scores, unparsed, errors = [], [], 0, 0
        for rec in responses[model]:
            entry, label = by_record.get((model, rec.index), ({}, ""))
            status = entry.get("status", "missing")
            score = entry.get("scores", {}).get(model)
            if status == "error" or not entry:
                status = "error" if entry else "missing"
                errors += 1
            elif score is None:
                status = "unparsed"
                unparsed += 1
            else:
                status = "ok"
                scores.append(score)
            annotated.append({**rec.raw, "judge_score": score, "judge_comment": entry.get("comments", {}).get(model),
                              "judge_status": status, "judge_reply": entry.get("reply"),
                              "judge_error": entry.get("error"), "judge_label": label or None,
                              "judge_mapping": entry.get("mapping") if mode == "batched" else None})
        write_json(out_dir / f"{_safe(model)}.annotated.json", annotated)
        n = len(scores)
        mean = sum(scores) / n if n else math.nan
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
        rows.append({"model": model, "mean": mean, "stderr": std / math.sqrt(n) if n else math.nan, "scored": n,
                     "unparsed": unparsed, "errors": errors, "total": len(responses[model])})
    summary = {"mode": mode, "judge": judge_model, "models": rows}
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(format_summary(summary) + "\n", encoding="utf-8")
    if chart and any(r["scored"] for r in rows):
        plot_scores(rows, out_dir / "scores.png", f"judge: {judge_model} ({mode})")
    return summary


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def format_summary(summary: dict) -> str:
    """Markdown table: mean score ± standard error, how many were scored, unparsed and failed."""
    lines = [f"judge: {summary['judge']}, mode: {summary['mode']}", "",
             "| model | mean score | stderr | scored | unparsed | errors |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(summary["models"], key=lambda r: -(r["mean"] if r["scored"] else -1)):
        mean = f"{r['mean']:.2f}" if r["scored"] else "–"
        se = f"{r['stderr']:.2f}" if r["scored"] else "–"
        lines.append(f"| {r['model']} | {mean} | {se} | {r['scored']}/{r['total']} | {r['unparsed']} | {r['errors']} |")
    return "\n".join(lines)


def plot_scores(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["scored"]]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 4))
    ax.bar([r["model"] for r in rows], [r["mean"] for r in rows], yerr=[r["stderr"] for r in rows], capsize=4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("mean judge score (0–100)")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    return save_figure(fig, path)
