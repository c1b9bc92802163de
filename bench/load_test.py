"""Load test for ``gptforge serve`` (loopback only): N requests, C concurrent, valid and invalid mixed.

Starts a server in a subprocess per batching mode (on a checkpoint you give, or on a small random model it
builds), fires the requests with httpx (C clients, each sending its next request when the last one is answered),
and prints a Markdown summary: status codes, p50/p99 latency, generated tokens/s. Exits 1 if any response is a
5xx or a connection fails.

    python bench/load_test.py                                   # 200 requests, 16 concurrent, continuous
    python bench/load_test.py --checkpoint runs/mini-sft --requests 400 --concurrency 32

Static vs continuous batching, same machine, same run: both servers run side by side (an idle one costs
nothing) and the runs are interleaved in rounds (round 0: static, continuous; round 1: continuous, static; ...)
for each concurrency, on the same request list. ``--long-fraction`` mixes in long requests (a longer prompt
and 96–144 new tokens) among the short ones (8–48 new tokens). Before each run the script waits until the machine
is idle, and it measures how much CPU other processes (not the servers, not itself) took during the run; a run
disturbed by more than ``--max-foreign`` of the cores is kept in the JSON and re-run (up to ``--retries``; the
table takes each round's least disturbed attempt). ``--step-costs`` first times the engine's decode step at 1, 4
and 16 rows on the same model (what a fuller batch saves per token bounds what batching can gain);
``--engine-only`` runs the same requests through the engine alone instead, both modes, with no HTTP in the way::

    python bench/load_test.py --batching static,continuous --concurrency 16,64 --long-fraction 0.25 \\
        --requests 200 --rounds 2 --threads 2 --step-costs --out bench/out/serve.json

The table gives, per mode and concurrency, generated tokens/s (median over rounds, min–max), p50/p99 latency
over the valid requests of all rounds (and over the short ones alone), the server's CPU time per generated token
(a figure other processes disturb less than wall time), the share of the cores other processes took, 5xx
count, and continuous/static ratios; the CPU model and flags are printed with it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import _busy_s, cpu_info, cpu_line, wait_quiet  # the house machine report


def build_model(directory: Path, preset: str) -> str:
    """A random-weight model with the GPT-2 vocabulary and chat tokens (enough to exercise the server)."""
    import torch

    from gptforge.checkpoint import save_model
    from gptforge.model import GPT
    from gptforge.model import preset as make_preset
    from gptforge.tokenizer import IM_END, IM_START, TiktokenTokenizer

    tok = TiktokenTokenizer()
    tok.add_special_tokens([IM_START, IM_END])
    torch.manual_seed(0)
    model = GPT(make_preset(preset, vocab_size=tok.vocab_size, block_size=256))
    return str(save_model(directory / "loadtest-model", model, tok))


def request_mix(n: int, seed: int = 0, long_fraction: float = 0.0,
                temperature: float | None = None) -> list[tuple[str, str, object, bool]]:
    """``(kind, path, body, valid)``: about 3 valid requests for each invalid one; of the valid ones,
    ``long_fraction`` are long (kind ``…-long``: a 40–100 word prompt and 96–144 new tokens), the rest short
    (3–30 words, 8–48 new tokens). The random stream of the short-only mix is the one it always was.
    ``temperature`` (e.g. 0: greedy) replaces the valid requests' sampling settings."""
    rng = random.Random(seed)
    long_rng = random.Random(seed + 1)  # a separate stream: long_fraction=0 keeps the old mix exactly
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "boxing"]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
        max_tokens = rng.randint(8, 48)
        r = rng.random()
        long = r < 0.75 and long_rng.random() < long_fraction
        suffix = "-long" if long else ""
        if long:
            text = " ".join(long_rng.choice(words) for _ in range(long_rng.randint(40, 100)))
            max_tokens = long_rng.randint(96, 144)
        if r < 0.30:
            out.append(("completion" + suffix, "/v1/completions", {
                "model": "loadtest", "prompt": text, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95,
                "seed": i}, True))
        elif r < 0.55:
            out.append(("chat" + suffix, "/v1/chat/completions", {"model": "loadtest", "max_tokens": max_tokens,
                                                                  "messages": [{"role": "user", "content": text}]},
                        True))
        elif r < 0.75:
            out.append(("chat-stream" + suffix, "/v1/chat/completions", {
                "model": "loadtest", "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}, True))
        else:
            bad = rng.choice([
                b"{not json", {"prompt": text, "max_tokens": 0}, {"prompt": text, "model": "gpt-4"},
                {"messages": []}, {"messages": [{"role": "user", "content": 5}]}, {"prompt": text, "temperature": "x"},
                {"prompt": "word " * 400}, {"prompt": text, "max_tokens": 10**6}, {"prompt": text, "n": 0},
            ])
            out.append(("invalid", rng.choice(["/v1/completions", "/v1/chat/completions"]), bad, False))
    if temperature is not None:
        for _, _, body, valid in out:
            if valid:
                body.pop("top_p", None)
                body["temperature"] = temperature
    return out


async def one(client, kind, path, body, valid):
    t0 = time.perf_counter()
    tokens = 0
    try:
        if kind.startswith("chat-stream"):
            async with client.stream("POST", path, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):  # the last chunk (stream_options.include_usage): exact count
                            tokens = chunk["usage"]["completion_tokens"]
                status = r.status_code
        else:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = await client.post(path, content=content, headers={"content-type": "application/json"})
            status = r.status_code
            if status == 200:
                tokens = r.json()["usage"]["completion_tokens"]
            elif "error" not in r.json():
                status = -status  # an error without an OpenAI error object
    except Exception as e:  # noqa: BLE001 (connection failures count as failures)
        return kind, f"{type(e).__name__}", time.perf_counter() - t0, 0, valid
    return kind, status, time.perf_counter() - t0, tokens, valid


async def run_load(url: str, requests, concurrency: int):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def guarded(req):
            async with sem:
                return await one(client, *req)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(r) for r in requests))
        return results, time.perf_counter() - t0


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, batching: str, args, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``gptforge serve`` in a subprocess (stderr to ``log_path``); returns it and its URL once /health answers."""
    import httpx

    port = free_port()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "gptforge", "serve", "--checkpoint", checkpoint, "--port", str(port),
           "--model-name", "loadtest", "--max-pending", str(max(64, 2 * max(args.concurrency_list))),
           "--max-batch", str(args.max_batch), "--batching", batching]
    log = open(log_path, "w")  # noqa: SIM115 (closed with the server)
    server = subprocess.Popen(cmd, env=env, stderr=log, stdout=log, text=True)
    server.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise SystemExit(f"{batching} server did not start:\n{log_path.read_text()}")
        time.sleep(0.3)


def _proc_cpu_s(pid: int) -> float:
    """CPU-seconds (user + system, all threads) used so far by process ``pid``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def summarize(results, wall: float) -> dict:
    """Status codes, failures, latencies and throughput of one run."""
    codes = Counter(str(status) for _, status, _, _, _ in results)
    failures = sum(n for code, n in codes.items() if not code.lstrip("-").isdigit() or code.startswith(("5", "-")))
    ok = [r for r in results if r[4] and r[1] == 200]
    latencies = [r[2] for r in ok]
    short = [r[2] for r in ok if not r[0].endswith("-long")]
    tokens = sum(r[3] for r in ok)
    wrong = [r for r in results if r[4] != (r[1] == 200)]
    return {"requests": len(results), "valid": sum(r[4] for r in results), "status_codes": dict(codes),
            "failures": failures, "unexpected": len(wrong), "unexpected_examples": [f"{r[0]}→{r[1]}" for r in wrong[:10]],
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "short_p50_s": percentile(short, 50), "short_p99_s": percentile(short, 99),
            "latencies_s": latencies, "short_latencies_s": short,
            "generated_tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall,
            "by_kind": dict(Counter(r[0] for r in results))}


def cleanest(runs: list[dict]) -> list[dict]:
    """Per mode, concurrency and round, the attempt other processes disturbed least."""
    best: dict = {}
    for r in runs:
        key = (r["batching"], r["concurrency"], r["round"])
        if key not in best or r["foreign_share"] < best[key]["foreign_share"]:
            best[key] = r
    return list(best.values())


def compare_table(runs: list[dict], modes: list[str], concurrencies: list[int]) -> list[str]:
    """Per mode and concurrency: tokens/s (median over rounds, min–max), pooled latency percentiles, 5xx; of
    each round's re-runs, the cleanest (:func:`cleanest`)."""
    runs = cleanest(runs)
    lines = [("| concurrency | batching | rounds | generated tokens/s | p50 latency | p99 latency | short p50 "
              "| short p99 | server CPU per token | other processes' CPU | 5xx / failed | unexpected "
              "| vs static: tokens/s, p99 |"),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in concurrencies:
        rows = {}
        for mode in modes:
            kept = [r for r in runs if r["batching"] == mode and r["concurrency"] == c]
            if not kept:
                continue
            tps = [r["tokens_per_s"] for r in kept]
            lat = [x for r in kept for x in r["latencies_s"]]
            short = [x for r in kept for x in r["short_latencies_s"]]
            rows[mode] = {"tps": statistics.median(tps), "lo": min(tps), "hi": max(tps), "n": len(kept),
                          "cpu": statistics.median(r["server_cpu_ms_per_token"] for r in kept),
                          "foreign": statistics.median(r["foreign_share"] for r in kept),
                          "p50": percentile(lat, 50), "p99": percentile(lat, 99), "s50": percentile(short, 50),
                          "s99": percentile(short, 99), "fail": sum(r["failures"] for r in kept),
                          "unexpected": sum(r["unexpected"] for r in kept)}
        for mode, m in rows.items():
            base = rows.get("static")
            ratio = (f"{m['tps'] / base['tps']:.2f}×, {m['p99'] / base['p99']:.2f}×" if base and mode != "static"
                     else "—")
            lines.append(f"| {c} | {mode} | {m['n']} | {m['tps']:,.0f} ({m['lo']:,.0f}–{m['hi']:,.0f}) "
                         f"| {m['p50']:.2f} s | {m['p99']:.2f} s | {m['s50']:.2f} s | {m['s99']:.2f} s "
                         f"| {m['cpu']:.1f} ms | {m['foreign']:.0%} | {m['fail']} | {m['unexpected']} | {ratio} |")
    return lines


def step_costs(checkpoint: str, temperature: float | None, threads: int) -> list[dict]:
    """Milliseconds per decode step at 1, 4 and 16 rows (32 new tokens, best of 3), in this process with the
    server's precision and threads: how much a bigger batch saves per token bounds what batching can gain."""
    import torch

    from gptforge.engine import Engine, SamplingParams

    if threads:
        torch.set_num_threads(threads)
    engine = Engine.from_checkpoint(checkpoint)
    sampled = temperature is None or temperature > 0
    params = SamplingParams(max_new_tokens=32, seed=0, temperature=0.8 if temperature is None else temperature,
                            top_p=0.95 if sampled else 1.0, repetition_penalty=1.1 if sampled else 1.0)
    prompt = engine.tokenizer.encode("the quick brown fox jumps over a lazy dog " * 3)
    out = []
    for rows in (1, 4, 16):
        engine.generate([prompt] * rows, params)  # warm-up
        wall, cpu = [], []
        for _ in range(3):
            w, c = time.perf_counter(), time.process_time()
            engine.generate([prompt] * rows, params)
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        out.append({"rows": rows, "wall_ms_per_step": 1000 * min(wall) / 32, "cpu_ms_per_step": 1000 * min(cpu) / 32,
                    "tokens_per_cpu_s": rows * 32 / min(cpu)})
    return out


def engine_loop(checkpoint: str, requests, concurrencies: list[int], max_batch: int, threads: int) -> list[dict]:
    """The two batching modes without HTTP: the valid requests of the mix (their prompts and sampling settings,
    as the server builds them) through the engine in this process, ``c`` clients each sending its next request
    when the last is answered. Static: consecutive batches of up to ``max_batch`` requests (in a closed loop every
    client is waiting when a batch ends); continuous: a :class:`ContinuousBatch` of ``max_batch`` rows fed from the
    queue between steps. What it measures is the scheduler's effect on the engine's work, with no server overhead."""
    import torch

    from gptforge.batching import ContinuousBatch
    from gptforge.engine import SAMPLING_DEFAULTS, Engine

    if threads:
        torch.set_num_threads(threads)
    engine = Engine.from_checkpoint(checkpoint)
    work = []
    for _, _, body, valid in requests:
        if not valid:
            continue
        params = SAMPLING_DEFAULTS.params(max_new_tokens=body["max_tokens"], temperature=body.get("temperature"),
                                          top_p=body.get("top_p"), seed=body.get("seed"))
        if "messages" in body:
            work.append((engine.encode_chat(body["messages"]), engine.chat_params(params)))
        else:
            work.append((engine.tokenizer.encode(body["prompt"]), params))
    out = []
    for c in concurrencies:
        rows = min(c, max_batch)
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = sum(len(x.token_ids) for i in range(0, len(work), rows)
                     for x in engine.generate([p for p, _ in work[i:i + rows]], [q for _, q in work[i:i + rows]]))
        out.append({"mode": "static", "concurrency": c, "tokens": tokens, "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu})
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = _continuous_loop(ContinuousBatch(engine, max_rows=max_batch), work, c, max_batch)
        out.append({"mode": "continuous", "concurrency": c, "tokens": tokens, "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu})
    for r in out:
        r["tokens_per_s"], r["cpu_ms_per_token"] = r["tokens"] / r["wall_s"], 1000 * r["cpu_s"] / r["tokens"]
    return out


def _continuous_loop(batch, work: list, clients: int, max_batch: int) -> int:
    """``clients`` closed-loop clients through a continuous ``batch`` of at most ``max_batch`` rows, the
    queue admitted between steps (as the server does); returns the tokens generated."""
    queue, done = list(range(min(clients, len(work)))), []
    sent = len(queue)

    def finished(_key, completion):
        nonlocal sent
        done.append(completion)
        if sent < len(work):  # this client's next request
            queue.append(sent)
            sent += 1

    while queue or batch.rows:
        while queue and batch.rows < max_batch:
            i = queue.pop(0)
            batch.add([i], [work[i][0]], [work[i][1]], on_finish=finished)
        batch.step()
    return sum(len(c.token_ids) for c in done)


def print_engine_loop(loop: list[dict], args, model: str, cpu: dict, started: str, costs: list[dict]) -> None:
    sampling = "the mix's own sampling" if args.temperature is None else f"temperature {args.temperature:g}"
    print(f"# engine alone: the {args.requests}-request mix's valid requests, model {model}, long fraction "
          f"{args.long_fraction:g}, {sampling}, --max-batch {args.max_batch}, {args.threads or 'default'} torch threads\n")
    print("| concurrency | batching | generated tokens/s | CPU ms per token | vs static |\n|---:|---|---:|---:|---:|")
    for r in loop:
        base = next(x for x in loop if x["concurrency"] == r["concurrency"] and x["mode"] == "static")
        ratio = "—" if r is base else f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×"
        print(f"| {r['concurrency']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {r['cpu_ms_per_token']:.2f} | {ratio} |")
    for c in costs:
        print(f"decode step, {c['rows']} rows: {c['wall_ms_per_step']:.1f} ms wall, {c['cpu_ms_per_step']:.1f} ms CPU")
    print(f"\n{cpu_line(cpu)}\nstarted {started}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": model, "cpu": cpu, "started": started, "engine_loop": loop,
                                              "step_costs": costs, "command": "python " + " ".join(sys.argv)},
                                             indent=2), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: a random 'mini' model with GPT-2 vocabulary")
    parser.add_argument("--preset", default="mini", help="shape of the random model when no --checkpoint")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="16", help="clients at once; a comma list runs each (16,64)")
    parser.add_argument("--batching", default="continuous",
                        help="server batching mode(s): continuous, static, or static,continuous to compare")
    parser.add_argument("--long-fraction", type=float, default=0.0,
                        help="share of the valid requests that are long (default 0: the short-only mix)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="temperature of every valid request (0: greedy; default: the mix's own — completions "
                             "0.8 with top_p 0.95, chat the server's defaults)")
    parser.add_argument("--max-batch", type=int, default=16, help="the servers' --max-batch")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per concurrency")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the server (0 = default)")
    parser.add_argument("--max-foreign", type=float, default=0.10,
                        help="re-run a run when other processes took more than this share of the cores")
    parser.add_argument("--retries", type=int, default=2, help="re-runs allowed per disturbed run")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait at most for an idle machine before each run (0: do not wait)")
    parser.add_argument("--step-costs", action="store_true",
                        help="first measure the engine's decode step at 1, 4 and 16 rows on the same model")
    parser.add_argument("--engine-only", action="store_true",
                        help="run the request mix through the engine alone, both modes, no servers (no HTTP)")
    parser.add_argument("--out", default=None, help="also write the summary as JSON here (and the table as .md)")
    parser.add_argument("--table-from", default=None, help="print the comparison table of a saved --out JSON")
    args = parser.parse_args()
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text(encoding="utf-8"))
        print("\n".join(compare_table(saved["runs"], saved["modes"], saved["concurrency"])))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally) when killed
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    if not modes or any(m not in ("static", "continuous") for m in modes):
        parser.error("--batching takes continuous, static, or both separated by a comma")
    args.concurrency_list = [int(c) for c in str(args.concurrency).split(",") if c.strip()]

    cpu = cpu_info()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tmp = tempfile.TemporaryDirectory()
    checkpoint = args.checkpoint or build_model(Path(tmp.name), args.preset)
    model = checkpoint if args.checkpoint else f"{args.preset} (random)"
    servers = {}
    runs: list[dict] = []
    costs = step_costs(checkpoint, args.temperature, args.threads) if args.step_costs else []
    if args.engine_only:
        loop = engine_loop(checkpoint, request_mix(args.requests, long_fraction=args.long_fraction,
                                                   temperature=args.temperature),
                           args.concurrency_list, args.max_batch, args.threads)
        print_engine_loop(loop, args, model, cpu, started, costs)
        tmp.cleanup()
        return 0
    try:
        for mode in modes:
            servers[mode] = start_server(checkpoint, mode, args, Path(tmp.name) / f"server-{mode}.log")
        requests = request_mix(args.requests, long_fraction=args.long_fraction, temperature=args.temperature)
        for _, url in servers.values():  # warm-up: first requests pay one-off costs
            asyncio.run(run_load(url, [r for r in requests if r[3]][:8], 4))
        for rnd in range(args.rounds):
            for c in args.concurrency_list:
                for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                    server, url = servers[mode]
                    for attempt in range(args.retries + 1):
                        waited = wait_quiet(args.quiet_wait, args.max_foreign) if args.quiet_wait > 0 else 0.0
                        busy0, own0 = _busy_s(), _own_cpu_s()
                        srv0 = sum(_proc_cpu_s(s.pid) for s, _ in servers.values())
                        this0 = _proc_cpu_s(server.pid)
                        results, wall = asyncio.run(run_load(url, requests, c))
                        this = _proc_cpu_s(server.pid) - this0
                        ours = (_own_cpu_s() - own0) + sum(_proc_cpu_s(s.pid) for s, _ in servers.values()) - srv0
                        foreign = max(0.0, _busy_s() - busy0 - ours)
                        run = {"batching": mode, "concurrency": c, "round": rnd, "attempt": attempt,
                               **summarize(results, wall), "foreign_share": round(foreign / (wall * (os.cpu_count() or 1)), 3),
                               "server_cpu_s": round(this, 2), "waited_s": waited}
                        run["server_cpu_ms_per_token"] = 1000 * this / max(run["generated_tokens"], 1)
                        run["disturbed"] = run["foreign_share"] > args.max_foreign
                        runs.append(run)
                        print(f"[round {rnd}] {mode:>10s} c={c:<3d} {run['tokens_per_s']:7.0f} tok/s  p50 {run['p50_s']:.2f} s"
                              f"  p99 {run['p99_s']:.2f} s  wall {wall:5.1f} s  server CPU "
                              f"{run['server_cpu_ms_per_token']:.1f} ms/token  5xx {run['failures']}  "
                              f"other-CPU {run['foreign_share']:.0%}{'  (disturbed: re-run)' if run['disturbed'] else ''}",
                              file=sys.stderr, flush=True)
                        if not run["disturbed"]:
                            break
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=30)
            server.log.close()
        tmp.cleanup()

    failures = sum(r["failures"] for r in runs)
    unexpected = sum(r["unexpected"] for r in runs)
    single = len(modes) == 1 and len(args.concurrency_list) == 1 and args.rounds == 1
    if single:
        r = runs[-1]
        print(f"# load test: {args.requests} requests, {r['concurrency']} concurrent, {r['batching']} batching, "
              f"model {model}\n")
        print("| requests | valid | status codes | 5xx / failed | p50 latency | p99 latency | generated tokens/s | wall |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|")
        print(f"| {r['requests']} | {r['valid']} | {', '.join(f'{k}: {v}' for k, v in sorted(r['status_codes'].items()))} "
              f"| {r['failures']} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} s |")
        print("\nper kind: " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_kind"].items())))
        table = []
    else:
        table = compare_table(runs, modes, args.concurrency_list)
        sampling = "the mix's own sampling" if args.temperature is None else f"temperature {args.temperature:g}"
        print(f"# load test: {args.requests} requests per run, model {model}, long fraction {args.long_fraction:g}, "
              f"{sampling}, server --max-batch {args.max_batch}, {args.threads or 'default'} torch threads\n")
        print("\n".join(table))
    if costs:
        table += ["", "Decode step of the engine alone (same model, precision and threads; 32 new tokens, best of 3):",
                  "", "| rows | ms per step (wall) | CPU ms per step | tokens per CPU-second |", "|---:|---:|---:|---:|"]
        table += [f"| {c['rows']} | {c['wall_ms_per_step']:.1f} | {c['cpu_ms_per_step']:.1f} "
                  f"| {c['tokens_per_cpu_s']:,.0f} |" for c in costs]
        print("\n".join(table[-len(costs) - 4:]))
    print(f"\n{cpu_line(cpu)}\nstarted {started}")
    if unexpected:
        examples = [e for r in runs for e in r["unexpected_examples"]][:10]
        print(f"\n{unexpected} request(s) got an unexpected status (valid↔non-200): " + ", ".join(examples))
    if args.out:
        summary = {"model": model, "threads": args.threads, "cpu": cpu, "started": started,
                   "command": "python " + " ".join(sys.argv), "modes": modes, "concurrency": args.concurrency_list,
                   "long_fraction": args.long_fraction, "temperature": args.temperature, "max_batch": args.max_batch,
                   "rounds": args.rounds,
                   "step_costs": costs,
                   "runs": runs,
                   "table": table}
        if single:  # the keys bench/__main__.py reads
            summary.update({k: runs[-1][k] for k in ("requests", "valid", "status_codes", "failures", "unexpected",
                                                     "p50_s", "p99_s", "generated_tokens", "tokens_per_s",
                                                     "wall_s", "by_kind")})
            summary["concurrency"] = args.concurrency_list[0]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        if table:
            out.with_suffix(".md").write_text("\n".join(table) + f"\n\n{cpu_line(cpu)}\n", encoding="utf-8")
    return 1 if failures or unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
