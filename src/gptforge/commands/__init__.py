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


# ---- argument types: a bad value is an argparse error (one ``gptforge: error:`` line), never a traceback ----


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _float_in(low: float, high: float | None = None, low_open: bool = False):
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bound = f"> {low}" if low_open else f">= {low}"
            allowed = f"a finite number {bound}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


positive_int = _int_at_least(1)  # counts, sizes, lengths
nonneg_int = _int_at_least(0)  # offsets, "0 = off" knobs
seed_int = _int_at_least(0, 2**63 - 1)  # what torch.manual_seed and every generator accept
port_number = _int_at_least(0, 65535)
positive_float = _float_in(0.0, low_open=True)  # rates, timeouts, sizes in MB
nonneg_float = _float_in(0.0)
