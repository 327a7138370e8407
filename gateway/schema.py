"""Reading untrusted config trees (YAML files, admin API bodies) into typed values.

Every accessor knows the key path it reads, so an error says exactly where it is:
``routes[0].backends.green.url: not an http(s) URL``. Unknown keys are errors too (a typo
must not silently fall back to a default). Feature modules (shadow, rollout, probes) parse
their own sections with the same `Node`.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import ConfigError

_MISSING: Any = object()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
    "gb": 1000**3, "gib": 1024**3,
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def parse_duration(value: Any, path: str) -> float:
    """Seconds from ``"500ms"``, ``"30s"``, ``"2m"``, ``"1h"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration like '500ms', '30s' or '2m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(path, f"expected a duration like '500ms', '30s' or '2m', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(path, f"duration must be >= 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def parse_size(value: Any, path: str) -> int:
    """Bytes from ``10485760``, ``"10MiB"``, ``"64kb"``."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a size like '10MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(path, f"expected a size like '10MiB', got {value!r}")
    if size < 0:
        raise ConfigError(path, "size must be >= 0")
    return size


def check_http_url(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"not an http(s) URL: {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, f"not an http(s) URL: {value!r}")
    if parts.username is not None or parts.password is not None:
        # Never used for auth by the proxy, and they would leak into the Host header.
        raise ConfigError(path, "credentials in a backend URL are not supported")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(path, f"bad port in URL: {value!r}") from None
    return value.rstrip("/")


def parse_address(value: Any, path: str) -> tuple[str, int]:
    """``"127.0.0.1:8000"``, ``"[::1]:8000"``, ``":8000"`` (all interfaces) → (host, port)."""
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = "127.0.0.1", str(value)
    elif isinstance(value, str) and ":" in value:
        host, _, port_text = value.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
    else:
        raise ConfigError(path, f"expected 'host:port', got {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(path, f"bad port in {value!r}")
    return host, int(port_text)


class Node:
    """A mapping being read, with its key path; `done()` rejects keys nobody asked for."""

    __slots__ = ("path", "data", "_seen")

    def __init__(self, data: Any, path: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(path or "(top)", f"expected a mapping, got {type_name(data)}")
        self.path = path
        self.data: dict[str, Any] = data
        self._seen: set[str] = set()

    def key_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise ConfigError(self.key_path(key), "required")
            return default
        return self.data[key]

    def str(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key_path(key), f"expected a non-empty string, got {value!r}")
        return value

    def name(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self.str(key, default)
        if value is not default and not NAME_RE.match(value):
            raise ConfigError(self.key_path(key), f"not a valid name: {value!r}")
        return value

    def bool(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key_path(key), f"expected true or false, got {value!r}")
        return value

    def number(
        self, key: builtins.str, default: Any = _MISSING, *, lo: float | None = None,
        hi: float | None = None,
    ) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            raise ConfigError(self.key_path(key), f"expected a number, got {value!r}")
        if lo is not None and value < lo or hi is not None and value > hi:
            raise ConfigError(self.key_path(key),
                              f"must be between {lo:g} and {hi:g}, got {value!r}")
        return float(value)

    def int(self, key: builtins.str, default: Any = _MISSING, *, lo: int | None = None,
            hi: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key_path(key), f"expected a whole number, got {value!r}")
        if lo is not None and value < lo or hi is not None and value > hi:
            raise ConfigError(self.key_path(key), f"must be between {lo} and {hi}, got {value!r}")
        return value

    def duration(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        return parse_duration(value, self.key_path(key))

    def size(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        return parse_size(value, self.key_path(key))

    def child(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        return Node(value, self.key_path(key))

    def list(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise ConfigError(self.key_path(key), f"expected a list, got {type_name(value)}")
        return value

    def items(self, key: builtins.str) -> Iterator[tuple[builtins.str, Any, builtins.str]]:
        """(name, value, path) for each entry of a mapping-valued key."""
        value = self.raw(key, {})
        if not isinstance(value, dict):
            raise ConfigError(self.key_path(key), f"expected a mapping, got {type_name(value)}")
        base = self.key_path(key)
        for name, item in value.items():
            yield str(name), item, f"{base}.{name}"

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self._seen]
        if unknown:
            raise ConfigError(self.key_path(str(unknown[0])), "unknown key")


def type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
