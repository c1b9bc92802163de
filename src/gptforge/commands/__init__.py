"""CLI subcommands, one module per stage; each exposes ``register(subparsers)``."""

import argparse


def add_parser(sub, name: str, help: str, example: str, accepts_overrides: bool = False) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` ends with a copy-pasteable example."""
    p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(accepts_overrides=accepts_overrides)
    return p


def flag_overrides(args, fields: dict[str, str]) -> dict:
    """Nested config overrides from the flags the user gave: ``{"data.format": "format"}`` maps
    ``args.format`` to ``{"data": {"format": ...}}``; flags left at ``None`` are skipped."""
    from gptforge.config import set_dotted

    out: dict = {}
    for dotted, attr in fields.items():
        value = getattr(args, attr)
        if value is not None:
            set_dotted(out, dotted, value)
    return out


def parse_fractions(text: str, flag: str, example: str) -> list[float]:
    """``"0.85,0.05,0.10"`` → ``[0.85, 0.05, 0.1]``; a clear error otherwise."""
    from gptforge.errors import GptforgeError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise GptforgeError(f"{flag} expects three comma-separated fractions like {example}, "
                            f"got {text!r}") from None
