"""Load test for ``gptforge serve`` (loopback only): N requests, C concurrent, valid and invalid mixed.

Starts a server in a subprocess (on a checkpoint you give, or on a small random model it builds), fires the
requests with httpx, and prints a Markdown summary: status codes, p50/p99 latency, generated tokens/s.
Exits 1 if any response is a 5xx or a connection fails.

    python bench/load_test.py                                   # 200 requests, 16 concurrent
    python bench/load_test.py --checkpoint runs/mini-sft --requests 400 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


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


def request_mix(n: int, seed: int = 0) -> list[tuple[str, str, object, bool]]:
    """``(kind, path, body, valid)``: about 3 valid requests for each invalid one."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "boxing"]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
        max_tokens = rng.randint(8, 48)
        r = rng.random()
        if r < 0.30:
            out.append(("completion", "/v1/completions", {"model": "loadtest", "prompt": text, "max_tokens": max_tokens,
                                                          "temperature": 0.8, "top_p": 0.95, "seed": i}, True))
        elif r < 0.55:
            out.append(("chat", "/v1/chat/completions", {"model": "loadtest", "max_tokens": max_tokens,
                                                         "messages": [{"role": "user", "content": text}]}, True))
        elif r < 0.75:
            out.append(("chat-stream", "/v1/chat/completions", {
                "model": "loadtest", "max_tokens": max_tokens, "stream": True,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}, True))
        else:
            bad = rng.choice([
                b"{not json", {"prompt": text, "max_tokens": 0}, {"prompt": text, "model": "gpt-4"},
                {"messages": []}, {"messages": [{"role": "user", "content": 5}]}, {"prompt": text, "temperature": "x"},
                {"prompt": "word " * 400}, {"prompt": text, "max_tokens": 10**6}, {"prompt": text, "n": 0},
            ])
            out.append(("invalid", rng.choice(["/v1/completions", "/v1/chat/completions"]), bad, False))
    return out


async def one(client, kind, path, body, valid):
    t0 = time.perf_counter()
    tokens = 0
    try:
        if kind == "chat-stream":
            async with client.stream("POST", path, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                            tokens += 1  # one chunk per token delta (close enough for throughput)
                status = r.status_code
        else:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = await client.post(path, content=content, headers={"content-type": "application/json"})
            status = r.status_code
            if status == 200:
                tokens = r.json()["usage"]["completion_tokens"]
            elif "error" not in r.json():
                status = -status  # an error without an OpenAI error object
    except Exception as e:  # connection failures count as failures
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: a random 'mini' model with GPT-2 vocabulary")
    parser.add_argument("--preset", default="mini", help="shape of the random model when no --checkpoint")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the server (0 = default)")
    parser.add_argument("--out", default=None, help="also write the summary as JSON here")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    checkpoint = args.checkpoint or build_model(Path(tmp.name), args.preset)
    port = free_port()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "gptforge", "serve", "--checkpoint", checkpoint, "--port", str(port),
           "--model-name", "loadtest", "--max-pending", str(max(64, args.concurrency * 2))]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                print(server.stderr.read() if server.stderr else "", file=sys.stderr)
                raise SystemExit("server did not start")
            time.sleep(0.3)
        requests = request_mix(args.requests)
        results, wall = asyncio.run(run_load(url, requests, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()

    codes = Counter(str(status) for _, status, _, _, _ in results)
    failures = sum(n for code, n in codes.items() if not code.lstrip("-").isdigit() or code.startswith(("5", "-")))
    ok = [r for r in results if r[4] and r[1] == 200]
    latencies = [r[2] for r in ok]
    tokens = sum(r[3] for r in ok)
    wrong = [r for r in results if r[4] != (r[1] == 200)]
    print(f"# load test: {args.requests} requests, {args.concurrency} concurrent, model {checkpoint if args.checkpoint else args.preset + ' (random)'}\n")
    print("| requests | valid | status codes | 5xx / failed | p50 latency | p99 latency | generated tokens/s | wall |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    print(f"| {len(results)} | {sum(r[4] for r in results)} | {', '.join(f'{k}: {v}' for k, v in sorted(codes.items()))} "
          f"| {failures} | {percentile(latencies, 50):.2f} s | {percentile(latencies, 99):.2f} s "
          f"| {tokens / wall:,.0f} | {wall:.1f} s |")
    by_kind = Counter(r[0] for r in results)
    if args.out:
        summary = {"requests": len(results), "valid": sum(r[4] for r in results), "concurrency": args.concurrency,
                   "model": checkpoint if args.checkpoint else f"{args.preset} (random)", "threads": args.threads,
                   "status_codes": dict(codes), "failures": failures, "unexpected": len(wrong),
                   "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
                   "generated_tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall,
                   "by_kind": dict(by_kind)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print("\nper kind: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    if wrong:
        print(f"\n{len(wrong)} request(s) got an unexpected status (valid↔non-200): "
              + ", ".join(f"{r[0]}→{r[1]}" for r in wrong[:10]))
    return 1 if failures or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
