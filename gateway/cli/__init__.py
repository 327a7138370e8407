"""The ``modelgate`` command: run the gateway, the demo, a model server, and steer routes.

Each feature registers its subcommands from its own module (``core``, ``shadow``,
``rollout``, ``monitoring``): `register(subparsers)` adds parsers whose ``func`` attribute
returns the exit code. Errors print one line to stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import __version__


def build_parser() -> argparse.ArgumentParser:
    from gateway.cli import core, monitoring, record, rollout, rules, shadow

    parser = argparse.ArgumentParser(
        prog="modelgate",
        description="A gateway for ML model servers: shadow mode, canary, blue-green, "
        "monitoring.",
    )
    parser.add_argument("--version", action="version", version=f"modelgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (core, shadow, rollout, monitoring, record, rules):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.cli.client import CliError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"modelgate: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code
