"""The ``differad-rl`` command line: ``differad-rl <command> ...``.

Each command group registers itself from its own module (``differad_rl.data.cli`` and
``differad_rl.eval.cli``); this file only assembles them, so it stays import-light: the heavy
modules load when their command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every command group registered."""
    from differad_rl.data import cli as data_cli
    from differad_rl.eval import cli as eval_cli

    parser = argparse.ArgumentParser(
        prog="differad-rl",
        description="DifferAD-R1 data building and evaluation for dual-image anomaly localization.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    data_cli.register(sub)
    eval_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``differad-rl`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
