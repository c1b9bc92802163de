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
    "quickstart", "model", "tokenizer", "data", "pretrain", "sft", "classify", "dpo",
    "generate", "chat", "serve", "eval", "compare", "export", "import_",
]

EPILOG = """examples:
  gptforge quickstart                              the whole journey on CPU-sized defaults
  gptforge model info --preset gpt2                parameters, FLOPs/token, memory estimates
  gptforge <command> --help                        options and an example for each stage
"""


class Parser(argparse.ArgumentParser):
    """argparse with gptforge's error format: one ``gptforge: error:`` line (naming the command), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"gptforge: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only`` (a module of COMMAND_MODULES) just that command, so running a
    stage imports and builds no other command's parser."""
    parser = Parser(
        prog="gptforge", description="Train, fine-tune, evaluate, serve and publish GPT-2-class models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        if only is None or name == only:
            # Every command module must import: a failure here is a bug and surfaces with its traceback.
            importlib.import_module(f"gptforge.commands.{name}").register(sub)
    return parser


def _command_module(argv: list[str]) -> str | None:
    """The module of the command ``argv`` starts with; None for no command, an option or an unknown name
    (the full parser then lists every command)."""
    if argv and argv[0].rstrip("_") == argv[0]:  # "import_" is a module name, not a command
        name = "import_" if argv[0] == "import" else argv[0]
        if name in COMMAND_MODULES:
            return name
    return None


def _version() -> str:
    from gptforge import __version__

    return f"gptforge {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_module(argv))
    try:
        args, extra = parser.parse_known_args(argv)
    except GptforgeError as e:  # raised by an argument type
        return _error(str(e))
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except GptforgeError as e:
        return _error(str(e))
    except OSError as e:  # the environment, not a bug: a full disk, a permission, a path that is a file
        return _error(str(e))
    except KeyboardInterrupt:
        print("gptforge: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> int:
    """One line on stderr (a multi-line message is folded) and exit status 2."""
    print("gptforge: error: " + " ".join(message.split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
