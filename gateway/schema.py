"""Typed fields for the config file and the documents inside it (pydantic v2).

The models (`gateway.config`, `gateway.rollout.plan`, `gateway.shadow.config`,
`gateway.monitoring.config`) are frozen pydantic dataclasses built from the field types here.
Each type checks a value *and* describes it in the JSON Schema (``modelgate config-schema``)
from the same parameters, so the schema and the checks cannot drift apart. A value that came
from a whole-string ``${VAR}`` substitution is a string; the number, flag, duration and size
types read it (``access_log_sample: ${SAMPLE}`` with ``SAMPLE=0.5`` is 0.5), and the schema
lets a ``${VAR}`` placeholder stand for any of them.

`validate()` is the one place where a pydantic `ValidationError` becomes our
`ConfigError(key_path, problem)`: ``routes[0].backends.green.url: not an http(s) URL``. A
check that spans fields raises `problem(message, *key)`, naming the sub-key it is about.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from annotated_types import GroupedMetadata
from pydantic import (
    AfterValidator,
    ConfigDict,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from gateway.errors import ConfigError
from gateway.state import weight_problem

T = TypeVar("T")
S = TypeVar("S", bound=Sized)

# Every model: unknown keys are errors (a typo must not silently fall back to a default).
MODEL = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
    "gb": 1000**3, "gib": 1024**3,
}
# The same sizes for JSON Schema, whose patterns have no case-insensitive flag.
_SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([bB]|[kKmMgG][iI]?[bB])?\s*$"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ENV_PLACEHOLDER = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"}


# -- errors ---------------------------------------------------------------------------------------
def problem(message: str, *key: str | int) -> PydanticCustomError:
    """A validation problem; `key` names the sub-key it is about (``problem(m, "live")``)."""
    return PydanticCustomError("config", "{problem}", {"problem": message, "key": key})


def key_path(base: str, parts: tuple[Any, ...]) -> str:
    path = base
    for part in parts:
        if isinstance(part, int):
            path = f"{path}[{part}]"
        elif part != "[key]":  # pydantic's marker for "the key of this entry"
            path = f"{path}.{part}" if path else str(part)
    return path


def unknown_backend(backend: str | None, backends: set[str]) -> str | None:
    """Why `backend` is not one of a route's `backends`, or None when it is (or is None)."""
    if backend is None or backend in backends:
        return None
    return f"unknown backend {backend!r} (have {', '.join(sorted(backends))})"


def known_backend(backend: str | None, info: ValidationInfo) -> str | None:
    """A `backend` field's check: one of the route's backends when the validation context
    names them (a section validated inside its route), else anything (checked later)."""
    known = (info.context or {}).get("backends")
    if known is not None and (why := unknown_backend(backend, known)):
        raise problem(why)
    return backend


def type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def _message(error: Any) -> tuple[tuple[Any, ...], str]:
    """(extra key parts, problem) for one pydantic error, in the words we use everywhere."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "config":
        return tuple(ctx.get("key", ())), str(ctx["problem"])
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        return (), "required"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return (), "unknown key"
    if kind in ("dataclass_type", "dict_type", "model_type", "dataclass_exact_type"):
        return (), f"expected a mapping, got {type_name(value)}"
    if kind in ("list_type", "tuple_type", "set_type", "frozen_set_type", "iterable_type"):
        return (), f"expected a list, got {type_name(value)}"
    if kind == "literal_error":
        return (), f"expected one of {ctx.get('expected')}, got {value!r}"
    if kind == "too_long":
        return (), f"at most {ctx.get('max_length')} entries"
    if kind == "string_type":
        return (), "expected a string"
    return (), str(error["msg"])


def without_nulls(data: Any) -> Any:
    """`key:` with nothing after it (YAML null) means the key is absent, as it always has:
    `timeouts:` left empty keeps the defaults instead of failing."""
    if isinstance(data, dict):  # keys as text too: YAML reads `1:` as a number
        return {k if isinstance(k, str) else str(k): without_nulls(v)
                for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [without_nulls(v) for v in data]
    return data


def validate(adapter: TypeAdapter[T], data: Any, path: str = "",
             context: dict[str, Any] | None = None) -> T:
    """`data` checked and typed by `adapter`; the first problem as a `ConfigError` whose key
    path starts at `path` (e.g. ``routes[0].shadow``)."""
    try:
        return adapter.validate_python(without_nulls(data), context=context)
    except ValidationError as exc:
        raise config_error(exc, path) from None


def config_error(exc: ValidationError, path: str = "") -> ConfigError:
    """The first problem of `exc` as ``ConfigError(key path, problem)`` in our words (the
    admin API words its request bodies and query strings with it too)."""
    error = exc.errors(include_url=False)[0]
    extra, text = _message(error)
    where = key_path(path, (*error["loc"], *extra))
    return ConfigError(where or "(top)", text)


# -- field types ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: `schema` is a dict
class Typed(GroupedMetadata):
    """A field type's metadata (``Annotated[float, Typed(...)]``): `check` turns the document's
    value into the field's type or raises `problem`; `schema` is its JSON Schema, which also
    admits a ``${VAR}`` placeholder when `env`."""

    check: Callable[[Any], Any]
    schema: dict[str, Any]
    env: bool = True

    def __iter__(self) -> Iterator[object]:
        yield PlainValidator(self.check)
        yield WithJsonSchema({"anyOf": [self.schema, ENV_PLACEHOLDER]} if self.env
                             else self.schema)


typed = Typed


def _from_text(value: Any, kind: Callable[[str], Any]) -> Any:
    """A whole-string ``${VAR}`` substitution typed as a number (or left as it is)."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return value
    return value


def _bounds(lo: float | None, hi: float | None, fmt: Callable[[float], str]) -> str:
    if lo is not None and hi is not None:
        return f"must be between {fmt(lo)} and {fmt(hi)}"
    return f"must be >= {fmt(lo)}" if lo is not None else f"must be <= {fmt(hi)}"  # type: ignore[arg-type]


def number(lo: float | None = None, hi: float | None = None, *,
           above: float | None = None) -> Typed:
    """A finite number in [lo, hi] (and > `above`), as a float."""
    def check(raw: Any) -> float:
        value = _from_text(raw, float)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise problem(f"expected a number, got {raw!r}")
        if lo is not None and value < lo or hi is not None and value > hi:
            raise problem(f"{_bounds(lo, hi, lambda v: f'{v:g}')}, got {value!r}")
        if above is not None and value <= above:
            raise problem(f"must be > {above:g}, got {value!r}")
        return float(value)

    schema: dict[str, Any] = {"type": "number"}
    for key, bound in (("minimum", lo), ("maximum", hi), ("exclusiveMinimum", above)):
        if bound is not None:
            schema[key] = bound
    return typed(check, schema)


def integer(lo: int | None = None, hi: int | None = None) -> Typed:
    def check(raw: Any) -> int:
        value = _from_text(raw, int)
        if isinstance(value, bool) or not isinstance(value, int):
            raise problem(f"expected a whole number, got {raw!r}")
        if lo is not None and value < lo or hi is not None and value > hi:
            raise problem(f"{_bounds(lo, hi, str)}, got {value!r}")
        return value

    schema: dict[str, Any] = {"type": "integer"}
    for key, bound in (("minimum", lo), ("maximum", hi)):
        if bound is not None:
            schema[key] = bound
    return typed(check, schema)


def _flag(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise problem(f"expected true or false, got {raw!r}")


Flag = Annotated[bool, typed(_flag, {"type": "boolean"})]


def text(check: Callable[[str], str | None] | None = None, *, lower: bool = False,
         pattern: str | None = None) -> Typed:
    """A non-empty string; `check` returns a problem or None; `lower` folds the case."""
    def validate_text(raw: Any) -> str:
        if not isinstance(raw, str) or not raw:
            raise problem(f"expected a non-empty string, got {raw!r}")
        if check is not None and (found := check(raw)) is not None:
            raise problem(found)
        return raw.lower() if lower else raw

    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern is not None:
        schema["pattern"] = pattern
    return typed(validate_text, schema, env=pattern is not None)


Text = Annotated[str, text()]
LowerText = Annotated[str, text(lower=True)]
Name = Annotated[str, text(lambda v: None if NAME_RE.match(v) else f"not a valid name: {v!r}",
                           pattern=NAME_RE.pattern)]
MAX_URL_PATH = 1024  # an admin body's paths (a rollout plan's health_path, smoke.path) are stored


def _url_path(value: str) -> str | None:
    if not value.startswith("/"):
        return "must start with '/'"
    if len(value) > MAX_URL_PATH:
        return f"at most {MAX_URL_PATH} characters, got {len(value)}"
    return None


UrlPath = Annotated[str, text(_url_path, pattern="^/")]


def parse_duration(value: Any, path: str) -> float:
    """Seconds from ``"500ms"``, ``"30s"``, ``"2m"``, ``"1h"`` or a plain number of seconds
    (admin query parameters and bodies use it too)."""
    try:
        return _duration(value)
    except PydanticCustomError as exc:
        raise ConfigError(path, exc.message()) from None


def _duration(value: Any) -> float:
    if isinstance(value, bool):
        raise problem(f"expected a duration like '500ms', '30s' or '2m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise problem(f"expected a duration like '500ms', '30s' or '2m', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise problem(f"duration must be >= 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def duration(lo: float | None = None, hi: float | None = None, *,
             positive: bool = False) -> Typed:
    """Seconds from ``500ms``/``30s``/``2m``/``1h`` or a number, within [lo, hi]."""
    def check(raw: Any) -> float:
        seconds = _duration(raw)
        if positive and seconds <= 0:
            raise problem("must be > 0")
        if lo is not None and seconds < lo or hi is not None and seconds > hi:
            if hi is None:
                raise problem(f"must be at least {format_duration(lo)}")  # type: ignore[arg-type]
            if lo is None:
                raise problem(f"must be at most {format_duration(hi)}")
            raise problem(f"must be between {format_duration(lo)} and {format_duration(hi)}")
        return seconds

    return typed(check, {"anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": _DURATION.pattern},
    ]})


Duration = Annotated[float, duration()]


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise problem(f"expected a size like '10MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        scaled = float(m.group(1)) * _SIZE_UNITS[unit]
        if not math.isfinite(scaled):
            raise problem(f"size too large: {value!r}")
        size = int(scaled)
    else:
        raise problem(f"expected a size like '10MiB', got {value!r}")
    if size < 0:
        raise problem("size must be >= 0")
    return size


def size(least: int = 0, least_text: str = "") -> Typed:
    """Bytes from ``10485760``, ``"10MiB"``, ``"64kb"``; at least `least`."""
    def check(raw: Any) -> int:
        value = _size(raw)
        if value < least:
            raise problem(f"must be at least {least_text}" if least_text else "must be > 0")
        return value

    return typed(check, {"anyOf": [
        {"type": "integer", "minimum": least},
        {"type": "string", "pattern": _SIZE_PATTERN},
    ]})


Size = Annotated[int, size()]


def _http_url(value: Any) -> str:
    if not isinstance(value, str):
        raise problem(f"not an http(s) URL: {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise problem(f"not an http(s) URL: {value!r}")
    if parts.username is not None or parts.password is not None:
        # Never used for auth by the proxy, and they would leak into the Host header.
        raise problem("credentials in a backend URL are not supported")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise problem(f"bad port in URL: {value!r}") from None
    return value.rstrip("/")


HttpUrl = Annotated[str, typed(_http_url, {"type": "string", "pattern": "^https?://"})]


def parse_address(value: Any) -> tuple[str, int]:
    """``"127.0.0.1:8000"``, ``"[::1]:8000"``, ``":8000"`` (all interfaces) → (host, port)."""
    if isinstance(value, tuple):  # already parsed (a config rebuilt with `replace`)
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = "127.0.0.1", str(value)
    elif isinstance(value, str) and ":" in value:
        host, _, port_text = value.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
    else:
        raise problem(f"expected 'host:port', got {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise problem(f"bad port in {value!r}")
    return host, int(port_text)


_ADDRESS_SCHEMA = {"anyOf": [{"type": "string", "pattern": r":\d{1,5}$"},
                             {"type": "integer", "minimum": 0, "maximum": 65535}]}
Address = Annotated[tuple[str, int], typed(parse_address, _ADDRESS_SCHEMA)]


def _addresses(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list | tuple) or isinstance(value, tuple) and value and isinstance(
            value[0], str):
        return (parse_address(value),)
    if not value:
        raise problem("needs at least one address")
    return each(value, parse_address)


def each(items: Iterable[Any], check: Callable[[Any], T]) -> tuple[T, ...]:
    """`check` applied to every item of a list; a problem names the item's index."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(check(item))
        except PydanticCustomError as exc:
            raise problem(exc.message(), i) from None
    return tuple(out)


Addresses = Annotated[tuple[tuple[str, int], ...], typed(_addresses, {"anyOf": [
    _ADDRESS_SCHEMA, {"type": "array", "minItems": 1, "items": _ADDRESS_SCHEMA}]})]


IPNetwork = IPv4Network | IPv6Network


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    """CIDRs (``10.0.0.0/8``, ``::1``; a bare address is one host), parsed once here."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise problem(f"expected a list of CIDRs, got {value!r}")
    out: list[IPNetwork] = []
    for i, item in enumerate(value):
        if isinstance(item, IPv4Network | IPv6Network):  # already parsed (a rebuilt config)
            out.append(item)
            continue
        try:
            out.append(ip_network(item.strip() if isinstance(item, str) else item,
                                  strict=False))
        except (TypeError, ValueError):
            raise problem(f"not an IP network (CIDR): {item!r}", i) from None
    return tuple(out)


Networks = Annotated[tuple[IPNetwork, ...], typed(_networks, {"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}}]})]

def weight(minimum: float = 0.0) -> Typed:
    """A traffic share in percent, in steps of 0.01 (`gateway.state.weight_problem`)."""
    def check(raw: Any) -> float:
        value = _from_text(raw, float)
        if (found := weight_problem(value, minimum)) is not None:
            raise problem(found)
        return float(value)

    return typed(check, {"type": "number", "minimum": minimum, "maximum": 100})


def nonempty(message: str) -> AfterValidator:
    """A list or mapping with at least one entry (``Annotated[tuple[X, ...], nonempty(m)]``)."""
    def check(items: S) -> S:
        if not items:
            raise problem(message)
        return items

    return AfterValidator(check)
