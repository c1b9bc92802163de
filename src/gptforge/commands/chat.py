"""``gptforge chat``: a terminal conversation with a model, streamed, rendered with its chat template."""

from __future__ import annotations

import sys

from gptforge.commands import add_parser
from gptforge.commands.generate import (
    add_model_args,
    add_sampling_args,
    clean_text,
    load_engine,
    sampling_from_args,
)

HELP = """commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset),
          /history (show the turns kept), /exit (or Ctrl-D)"""


def register(sub) -> None:
    p = add_parser(sub, "chat", "talk to a model in the terminal (streaming; /reset, /system TEXT, /exit)",
                   "gptforge chat --checkpoint runs/mini-sft --system 'You are a helpful assistant.'")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_new_tokens=256)
    p.set_defaults(func=run)


def run(args) -> int:
    engine = load_engine(args)
    params = sampling_from_args(args)
    system = clean_text(args.system, "--system") if args.system else None
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, not a traceback
        sys.stdin.reconfigure(errors="replace")
    if interactive:
        print(f"chatting with {args.checkpoint} (context {engine.block_size} tokens). {HELP}")
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        if interactive:
            try:
                text = input("\n> ")
            except EOFError:
                print()
                return 0
        else:
            line = sys.stdin.readline()
            if not line:  # end of piped input
                return 0
            text = line.rstrip("\n")
        if not text.strip():
            continue
        text = clean_text(text, "input")
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                history = []
                print("[conversation reset]", flush=True)
            elif command == "/system":
                system, history = (rest.strip() or None), []
                print(f"[system prompt {'set' if system else 'cleared'}; conversation reset]", flush=True)
            elif command == "/history":
                for m in _messages(system, history):
                    print(f"[{m['role']}] {m['content']}")
            else:
                print(f"[unknown command {command}] {HELP}", flush=True)
            continue
        history.append({"role": "user", "content": text})
        messages = engine.fit_messages(_messages(system, history), params.max_new_tokens)
        dropped = len(_messages(system, history)) - len(messages)
        if dropped:  # keep what the model can still see
            history = [m for m in messages if m["role"] != "system"]
            print(f"[{dropped} oldest message(s) dropped to fit the context]", file=sys.stderr)

        def on_token(_i, _token, delta):
            sys.stdout.write(delta)
            sys.stdout.flush()

        if not interactive:
            sys.stdout.write("assistant: ")
        try:
            reply = engine.chat(messages, params, on_token=on_token)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            print("\n[reply interrupted]", flush=True)
            history.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply.text.strip()})


def _messages(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history
