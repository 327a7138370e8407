"""The ``shadow`` section of a route: what to mirror, how to compare, where to log.

Everything here is parsed and compiled once when the config loads (JSON paths included), so
the senders do no per-copy setup. A section without ``backend`` is valid: it configures the
comparison and the log for a shadow that an operator turns on at run time
(``PUT /admin/routes/{route}/shadow`` or ``modelgate shadow ROUTE --backend B``).

    shadow:
      backend: green            # optional: mirror from start-up
      sample: 100               # percent of requests, sticky by the route's user key
      timeout: 5s               # the copies' read timeout
      window: 5m                # the report's sliding window (1s .. 1h)
      queue: 1000               # copies waiting for a sender; more are dropped and counted
      queue_bytes: 64MiB        # ... and at most this many body bytes waiting
      senders: 16               # copies in flight at once
      compare:
        preset: kserve_v2       # auto (default), kserve_v2, tf_serving, openai_chat,
                                # or path: "outputs[0].data" (a JSON path; "$": whole body)
        strings: auto           # label (exact, confusion counts), text (exact/similarity),
                                # auto: text for chat replies, else label
        agree_on: auto          # labels decide if there are any, else all (or: all, labels)
        numbers: {abs_tol: 1e-6, rel_tol: 0}
        text: {mode: exact, min_similarity: 0.9}
      log:
        path: .state/shadow.jsonl
        max_bytes: 10MiB
        backups: 3
        redact_bodies: false
        body_limit: 64KiB
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gateway.errors import ConfigError
from gateway.jsonpath import JsonPath, compile_path
from gateway.schema import Node

PRESETS: dict[str, str] = {
    "kserve_v2": "outputs[*].data",
    "tf_serving": "predictions",
    "openai_chat": "choices[0].message.content",
}
AUTO = "auto"  # pick the preset by the body's top-level key: outputs / predictions / choices
MAX_WINDOW = 3600.0


@dataclass(frozen=True, slots=True)
class NumberTolerance:
    """Two numbers agree when ``|a - b| <= max(abs_tol, rel_tol * max(|a|, |b|))``."""

    abs_tol: float = 1e-6
    rel_tol: float = 0.0


@dataclass(frozen=True, slots=True)
class TextCompare:
    """``exact``: identical strings; ``similarity``: normalized difflib ratio >= threshold."""

    mode: Literal["exact", "similarity"] = "exact"
    min_similarity: float = 0.9


@dataclass(frozen=True, slots=True)
class CompareConfig:
    """`preset` None means `path` was given; `auto` detects the preset per response and
    compares strings as text only for chat replies (unless `strings` says otherwise)."""

    preset: str | None = AUTO
    path: JsonPath | None = None
    strings: Literal["label", "text", "auto"] = "auto"
    agree_on: Literal["auto", "all", "labels"] = "auto"
    numbers: NumberTolerance = field(default_factory=NumberTolerance)
    text: TextCompare = field(default_factory=TextCompare)

    def describe(self) -> dict[str, object]:
        return {
            "preset": self.preset,
            "path": self.path.text if self.path is not None else None,
            "strings": self.strings,
            "agree_on": self.agree_on,
            "numbers": {"abs_tol": self.numbers.abs_tol, "rel_tol": self.numbers.rel_tol},
            "text": {"mode": self.text.mode, "min_similarity": self.text.min_similarity},
        }


@dataclass(frozen=True, slots=True)
class LogConfig:
    path: str
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 3
    redact_bodies: bool = False
    body_limit: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    backend: str | None = None
    sample: float = 0.0
    timeout: float = 5.0
    window: float = 300.0
    queue: int = 1000
    queue_bytes: int = 64 * 1024 * 1024
    senders: int = 16
    compare: CompareConfig = field(default_factory=CompareConfig)
    log: LogConfig | None = None


def parse_shadow(node: Node, backends: set[str]) -> ShadowConfig:
    backend = node.str("backend", None)
    if backend is not None and backend not in backends:
        known = ", ".join(sorted(backends))
        raise ConfigError(node.key_path("backend"), f"unknown backend {backend!r} (have {known})")
    timeout = node.duration("timeout", 5.0)
    if timeout <= 0:
        raise ConfigError(node.key_path("timeout"), "must be > 0")
    window = node.duration("window", 300.0)
    if not 1 <= window <= MAX_WINDOW:
        raise ConfigError(node.key_path("window"), "must be from 1s to 1h")
    compare_node = node.child("compare", None)
    log_node = node.child("log", None)
    config = ShadowConfig(
        backend=backend,
        sample=node.number("sample", 100.0 if backend else 0.0, lo=0, hi=100),
        timeout=timeout,
        window=window,
        queue=node.int("queue", 1000, lo=1, hi=1_000_000),
        queue_bytes=node.size("queue_bytes", 64 * 1024 * 1024),
        senders=node.int("senders", 16, lo=1, hi=1024),
        compare=parse_compare(compare_node) if compare_node is not None else CompareConfig(),
        log=parse_log(log_node) if log_node is not None else None,
    )
    if config.queue_bytes <= 0:
        raise ConfigError(node.key_path("queue_bytes"), "must be > 0")
    node.done()
    return config


def parse_compare(node: Node) -> CompareConfig:
    if node.has("preset") and node.has("path"):
        raise ConfigError(node.path, "give either 'preset' or 'path', not both")
    path: JsonPath | None = None
    if node.has("path"):
        preset = None
        path = compile_path(node.str("path"), node.key_path("path"))
    else:
        preset = node.str("preset", AUTO)
        if preset != AUTO:
            if preset not in PRESETS:
                raise ConfigError(node.key_path("preset"), f"unknown preset {preset!r} "
                                  f"(have {AUTO}, {', '.join(PRESETS)})")
            path = compile_path(PRESETS[preset], node.key_path("preset"))
    default_strings = {None: "label", AUTO: "auto", "openai_chat": "text"}.get(preset, "label")
    strings = node.str("strings", default_strings)
    if strings not in ("label", "text", "auto"):
        raise ConfigError(node.key_path("strings"),
                          f"expected label, text or auto, got {strings!r}")
    agree_on = node.str("agree_on", "auto")
    if agree_on not in ("auto", "all", "labels"):
        raise ConfigError(node.key_path("agree_on"),
                          f"expected auto, all or labels, got {agree_on!r}")

    numbers = NumberTolerance()
    numbers_node = node.child("numbers", None)
    if numbers_node is not None:
        numbers = NumberTolerance(
            abs_tol=numbers_node.number("abs_tol", numbers.abs_tol, lo=0, hi=1e300),
            rel_tol=numbers_node.number("rel_tol", numbers.rel_tol, lo=0, hi=1),
        )
        numbers_node.done()

    text = TextCompare()
    text_node = node.child("text", None)
    if text_node is not None:
        mode = text_node.str("mode", text.mode)
        if mode not in ("exact", "similarity"):
            raise ConfigError(text_node.key_path("mode"),
                              f"expected exact or similarity, got {mode!r}")
        text = TextCompare(
            mode=mode,
            min_similarity=text_node.number("min_similarity", text.min_similarity, lo=0, hi=1),
        )
        text_node.done()
    node.done()
    return CompareConfig(preset=preset, path=path, strings=strings, agree_on=agree_on,
                         numbers=numbers, text=text)


def parse_log(node: Node) -> LogConfig:
    path = node.str("path")
    config = LogConfig(
        path=path,
        max_bytes=node.size("max_bytes", 10 * 1024 * 1024),
        backups=node.int("backups", 3, lo=0, hi=100),
        redact_bodies=node.bool("redact_bodies", False),
        body_limit=node.size("body_limit", 64 * 1024),
    )
    if config.max_bytes < 1024:
        raise ConfigError(node.key_path("max_bytes"), "must be at least 1KiB")
    node.done()
    return config
