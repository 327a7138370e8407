"""Core subcommands: serve, check-config, demo, model-server, status, canary, switch,
rollback, events (stub: filled in by the CLI work)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=check_config)


def check_config(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"modelgate: {args.file}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK ({len(config.routes)} routes)")
    return 0
