"""The ``gptforge`` command line: one subcommand per stage, each defined in ``gptforge/commands/<stage>.py``.

A command module exposes ``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
Heavy imports happen inside the handlers so ``gptforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gptforge.errors import GptforgeError

# Order is the order of the user's journey; --help lists them this way.
COMMAND_MODULES = [
    "quickstart", "model", "tokenizer", "data", "pretrain", "sft", "classify",
    "generate", "chat", "serve", "eval", "export", "import_",
]

EPILOG = """examples:
  gptforge quickstart                              the whole journey on CPU-sized defaults
  gptforge model info --preset gpt2                parameters, FLOPs/token, memory estimates
  gptforge <command> --help                        options and an example for each stage
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptforge", description="Train, fine-tune, evaluate, serve and publish GPT-2-class models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        # Every command module must import: a failure here is a bug and surfaces with its traceback.
        importlib.import_module(f"gptforge.commands.{name}").register(sub)
    return parser


def _version() -> str:
    from gptforge import __version__

    return f"gptforge {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except GptforgeError as e:
        print(f"gptforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
