"""``gptforge serve``: an OpenAI-compatible API and a web chat page for a checkpoint."""

from __future__ import annotations

import sys

from gptforge.commands import add_parser, port_number, positive_float, positive_int
from gptforge.commands.generate import add_model_args
from gptforge.sampling_defaults import SAMPLING_DEFAULTS

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    p = add_parser(sub, "serve", "serve a model: OpenAI-compatible /v1 API + web chat page at /",
                   "gptforge serve --checkpoint runs/mini-sft --port 8000   # then open http://127.0.0.1:8000/")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--model-name", default=None, help="model id clients send (default: the run's name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GPTFORGE_API_KEY, else none)")
    p.add_argument("--max-pending", type=positive_int, default=64, help="requests queued or running before 429")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous: requests join the running batch between decode steps and leave when done; "
                        "static: the waiting requests decode as one batch, new ones wait for it to end "
                        "(default: continuous)")
    p.add_argument("--prefill-chunk", type=positive_int, default=128,
                   help="continuous batching: prompt tokens read between two decode steps, so a long prompt "
                        "does not stall the running requests (default: 128)")
    p.add_argument("--max-tokens-limit", type=positive_int, default=None, help="largest max_tokens (default: the context)")
    p.add_argument("--timeout", type=positive_float, default=120.0,
                   help="seconds per request, queueing included; a stream cut by it ends with an error event "
                        "whose code is 'timeout' (default: 120)")
    d = SAMPLING_DEFAULTS
    p.description += (f"\n\nsampling fields a request omits take the defaults shared with generate, chat and the web "
                      f"page: temperature {d.temperature}, top_p {d.top_p}, repetition_penalty {d.repetition_penalty}"
                      "; temperature 0 is plain argmax (no penalty unless the request gives one).")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from gptforge.commands.generate import load_engine
    from gptforge.errors import GptforgeError
    from gptforge.serve.app import ServerSettings, api_key_from_env, create_app, default_model_name

    if args.max_pending < 1 or args.max_batch < 1 or args.timeout <= 0:
        raise GptforgeError("--max-pending and --max-batch must be ≥ 1 and --timeout > 0")
    api_key = api_key_from_env(args.api_key)
    if args.host not in LOOPBACK and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use it "
              "(set --api-key or GPTFORGE_API_KEY)", file=sys.stderr)
    engine = load_engine(args)
    settings = ServerSettings(model_name=args.model_name or default_model_name(args.checkpoint), api_key=api_key,
                              max_pending=args.max_pending, max_batch_rows=args.max_batch,
                              max_tokens_limit=args.max_tokens_limit, timeout_s=args.timeout,
                              batching=args.batching, prefill_chunk=args.prefill_chunk)
    app = create_app(engine, settings)
    print(f"serving '{settings.model_name}' (context {engine.block_size}) on http://{args.host}:{args.port}/ "
          f"— web chat at /, OpenAI API at /v1{' (API key required)' if api_key else ''}, metrics at /metrics; "
          f"{args.batching} batching", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
