"""Structured logs: one JSON object a line (or readable text), never bodies or secrets.

`setup_logging()` installs one handler on the root logger. The JSON formatter writes
``time``, ``level``, ``logger``, ``message`` and the fields passed with ``extra=`` (request
id, route, backend, status, latency, event, ...). Fields that could carry a request/response
body are dropped, and fields named like credentials are redacted, whatever the caller passed:
a log line must be safe to ship anywhere.

The access log (logger ``modelgate.access``) is written by the proxy only when the config's
``access_log_sample`` is above 0 (default 0: off), so it never costs the hot path at full rate.

    setup_logging("info", "json")
    log.info("gateway ready", extra={"event": "ready", "route": "classifier"})
    # {"time":"2025-01-01T12:00:00.000Z","level":"info","logger":"modelgate",
    #  "message":"gateway ready","event":"ready","route":"classifier"}
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from typing import IO, Any

import orjson

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "text")
# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName",
}
# Extras that could hold a payload are never written; credential-like ones are redacted.
_DROP = re.compile(r"(^|_)(body|payload|content|data|headers?|cookies?|query)$",
                   re.IGNORECASE)
_REDACT = re.compile(r"token|secret|password|passwd|authori[sz]ation|api[_-]?key|credential",
                     re.IGNORECASE)
REDACTED = "[redacted]"
_MARK = "_modelgate_handler"


def utc_text(created: float) -> str:
    """``2026-01-01T12:00:00.000Z`` for an epoch time (logs and audit events)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + (
        f".{int(created % 1 * 1000):03d}Z"
    )


def safe_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra=` fields, without payloads and with credentials redacted."""
    out: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _STANDARD or key.startswith("_"):
            continue
        if _DROP.search(key):
            continue
        out[key] = REDACTED if _REDACT.search(key) else value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object a line; extras are flattened next to the standard fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": utc_text(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(safe_extras(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [utc_text(record.created), record.levelname.lower(), f"{record.name}:",
                 record.getMessage()]
        parts += [f"{k}={v}" for k, v in safe_extras(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Route every log record to `stream` (stderr) as JSON or text at `level`; idempotent."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be json or text, got {fmt!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _MARK, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Noisy at info and not ours: aiohttp logs every access at info unless told otherwise.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def add_log_arguments(parser: argparse.ArgumentParser, default_format: str) -> None:
    """``--log-level`` and ``--log-format`` (``modelgate serve`` and ``modelgate demo``)."""
    parser.add_argument("--log-level", choices=LEVELS, default="info",
                        help="log level (default %(default)s)")
    parser.add_argument("--log-format", choices=FORMATS, default=default_format,
                        help="log lines as JSON objects or text (default %(default)s)")
