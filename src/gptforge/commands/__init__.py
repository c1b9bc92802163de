"""CLI subcommands, one module per stage; each exposes ``register(subparsers)``."""

import argparse


def add_parser(sub, name: str, help: str, example: str, accepts_overrides: bool = False) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` ends with a copy-pasteable example."""
    p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(accepts_overrides=accepts_overrides)
    return p
