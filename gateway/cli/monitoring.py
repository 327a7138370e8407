"""`modelgate` subcommands of the monitoring feature."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this feature's subcommands to the top-level parser's subparsers."""
    _ = argparse
