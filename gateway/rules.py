"""Match rules: per route, an ordered list of conditions that send a request to a named
backend before the weighted split is even looked at.

    rules:
      - name: acme                # required, unique in the route: the metric's `rule` label
        header: x-tenant          # exactly one of header, cookie, query, body (a JSON path)
        exact: acme               # exactly one of exact, prefix, regex, one_of
        backend: green            # one of the route's backends
      - {name: beta, cookie: beta, exact: "1", backend: green}
      - {name: variant, query: model-variant, one_of: [c, canary-c], backend: purple}
      - {name: big, body: "parameters.tier", regex: "^(gold|platinum)$", backend: green}

The first rule that matches decides; a request no rule matches takes the weighted split as
before. The rules live in the route's state (`gateway.state.Rule`), so they change at run
time like the rest of it (``PUT /admin/routes/{route}/rules``: compare-and-set, audited,
applied by every process). `RuleConfig` is the document form (config file and admin body);
`compile_rules` turns a state's rules into `CompiledRules` once per routing snapshot:
regexes compiled, header names lower-case bytes, one-of sets frozen, JSON paths compiled,
each rule's hit counter bound to its target backend's `BackendStats`.

Per request (`CompiledRules.pick`) only what the rules name is looked at: the headers they
name, the Cookie header only if a cookie rule is reached, the query string parsed once only if
a query rule is reached, the body parsed (JSON) once only if a body rule is reached. Values are
compared as text (UTF-8); a JSON body field compares as its text when it is a string, a number
(``1``, ``2.5``) or a boolean (``true``); absent, null, objects and lists never match. A route
with a body rule buffers its request bodies whole (up to ``max_body_bytes``, as probes and
shadow copies do); until the body is read (`NOT_READ`) `pick` stops at the first body rule and
says where to go on from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, Final, Generic, Protocol, TypeVar
from urllib.parse import unquote_plus

import orjson
from prometheus_client.core import CounterMetricFamily
from pydantic import AfterValidator, Field, ValidationInfo
from pydantic import model_validator as model_check
from pydantic.dataclasses import dataclass

from gateway.errors import ConfigError
from gateway.jsonpath import MISSING, compile_path
from gateway.metrics import BackendStats
from gateway.schema import MODEL, LowerText, Name, Text, problem, typed, unknown_backend
from gateway.state import RULE_OPS, RULE_SOURCES, Rule

# Requests a rule routed, and of them errors (>= 500): slot counters of the target's
# `BackendStats`, so the sequential test can leave rule-routed traffic out (a segment picked
# by a rule is no random sample: gateway.rollout.analysis.sequential_check).
RULED_REQUESTS = "ruled:requests"
RULED_ERRORS = "ruled:errors"

MAX_RULES = 64  # per route: every request of the route may walk them all
MAX_ONE_OF = 1000
MAX_VALUE = 1024  # characters of a value or a pattern
HIT_PREFIX = "rule:"  # BackendStats counter of a rule's hits: "rule:<name>"
NOT_READ: Final[Any] = object()  # `pick`'s body before the body is read
_HEADER, _COOKIE, _QUERY, _BODY = range(4)
_SOURCE_CODE = dict(zip(RULE_SOURCES, range(4), strict=True))


# -- the document form ---------------------------------------------------------------------------
def _match_text(raw: Any) -> str:
    """A value to compare with: text, or a number or flag as its JSON text (``exact: 1`` in
    YAML is the cookie value "1", and a body field holding 1)."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float) and math.isfinite(raw):
        return orjson.dumps(raw).decode()
    if not isinstance(raw, str) or not raw:
        raise problem(f"expected a non-empty string, got {raw!r}")
    if len(raw) > MAX_VALUE:
        raise problem(f"at most {MAX_VALUE} characters, got {len(raw)}")
    return raw


def _pattern(raw: Any) -> str:
    value = _match_text(raw)
    try:
        re.compile(value)
    except re.error as exc:
        raise problem(f"not a valid regular expression: {exc}") from None
    return value


def _body_path(raw: Any) -> str:
    try:
        path = compile_path(raw)
    except ConfigError as exc:
        raise problem(exc.problem) from None
    if path.has_wildcard:
        raise problem(f"a rule's JSON path names one value: no [*] in {raw!r}")
    return str(raw)


MatchText = Annotated[str, typed(_match_text, {"anyOf": [
    {"type": "string", "minLength": 1, "maxLength": MAX_VALUE}, {"type": "number"},
    {"type": "boolean"}]}, env=False)]
Pattern = Annotated[str, typed(_pattern, {"type": "string", "minLength": 1,
                                          "maxLength": MAX_VALUE}, env=False)]
BodyPath = Annotated[str, typed(_body_path, {"type": "string", "minLength": 1}, env=False)]


@dataclass(frozen=True, slots=True, config=MODEL)
class RuleConfig:
    """One rule as the config file and ``PUT /admin/routes/{route}/rules`` give it."""

    name: Name
    backend: Text
    header: LowerText | None = None
    cookie: Text | None = None
    query: Text | None = None
    body: BodyPath | None = Field(default=None, description="a JSON path into the request "
                                  "body, e.g. parameters.tier (the route then buffers bodies)")
    exact: MatchText | None = None
    prefix: MatchText | None = None
    regex: Pattern | None = Field(default=None, description="Python syntax, found anywhere "
                                  "in the value unless anchored (^...$)")
    one_of: Annotated[tuple[MatchText, ...], Field(min_length=1, max_length=MAX_ONE_OF)
                      ] | None = None

    @model_check(mode="after")
    def _one_each(self, info: ValidationInfo) -> RuleConfig:
        sources = [s for s in RULE_SOURCES if getattr(self, s) is not None]
        if len(sources) != 1:
            raise problem("give exactly one of 'header', 'cookie', 'query', 'body'")
        ops = [o for o in RULE_OPS if getattr(self, o) is not None]
        if len(ops) != 1:
            raise problem("give exactly one of 'exact', 'prefix', 'regex', 'one_of'")
        known = (info.context or {}).get("backends")
        if known is not None and (why := unknown_backend(self.backend, known)):
            raise problem(why, "backend")
        return self

    def spec(self) -> Rule:
        """The form a route's state stores."""
        source = next(s for s in RULE_SOURCES if getattr(self, s) is not None)
        op = next(o for o in RULE_OPS if getattr(self, o) is not None)
        value = getattr(self, op)
        return Rule(self.name, self.backend, source, getattr(self, source), op,
                    tuple(value) if op == "one_of" else value)


def _unique_names(rules: tuple[RuleConfig, ...]) -> tuple[RuleConfig, ...]:
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise problem(f"duplicate rule name {rule.name!r}", i, "name")
        seen.add(rule.name)
    return rules


RuleList = Annotated[tuple[RuleConfig, ...], Field(max_length=MAX_RULES),
                     AfterValidator(_unique_names)]


def check_rules(rules: Sequence[Rule], backends: set[str]) -> str | None:
    """Why `rules` cannot be a route's (a target that is not one of its `backends`), naming
    the key (``rules[1].backend: unknown backend 'purple' (have blue, green)``)."""
    for i, rule in enumerate(rules):
        if why := unknown_backend(rule.backend, backends):
            return f"rules[{i}].backend: {why}"
    return None


# -- compiled, per routing snapshot --------------------------------------------------------------
class Target(Protocol):
    """A backend a rule sends to (`gateway.routing.Backend`)."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> BackendStats: ...


T = TypeVar("T", bound=Target)


class CompiledRule(Generic[T]):
    __slots__ = ("name", "source", "key", "test", "target", "counter")

    def __init__(self, rule: Rule, target: T) -> None:
        self.name = rule.name
        self.source = _SOURCE_CODE[rule.source]
        self.key: Any = (rule.key.lower().encode("latin-1") if self.source == _HEADER
                         else compile_path(rule.key) if self.source == _BODY else rule.key)
        self.test = _test(rule.op, rule.value)
        self.target = target
        self.counter = HIT_PREFIX + rule.name  # bound once: no label lookup per hit


def _test(op: str, value: str | tuple[str, ...]) -> Callable[[str], bool]:
    if op == "one_of":
        return frozenset(value).__contains__
    assert isinstance(value, str)
    if op == "exact":
        return value.__eq__
    if op == "prefix":
        return lambda text: text.startswith(value)
    search = re.compile(value).search
    return lambda text: search(text) is not None


class CompiledRules(Generic[T]):
    """A route's rules for one routing snapshot; `pick` is the per-request part."""

    __slots__ = ("rules", "needs_body", "count", "header_names", "header_lengths",
                 "cookie_names")

    def __init__(self, rules: tuple[CompiledRule[T], ...]) -> None:
        self.rules = rules
        self.count = len(rules)
        # The route buffers request bodies when a rule reads them.
        self.needs_body = any(r.source == _BODY for r in rules)
        # The request headers the rules read (lower-case bytes), found in one pass.
        names = {r.key for r in rules if r.source == _HEADER}
        self.cookie_names = frozenset(r.key for r in rules if r.source == _COOKIE)
        if self.cookie_names:
            names.add(b"cookie")
        self.header_names = frozenset(names)
        self.header_lengths = frozenset(len(n) for n in names)

    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def pick(self, headers: Sequence[tuple[bytes, bytes]], target: str, query_at: int,
             body: Any = NOT_READ, start: int = 0) -> T | int | None:
        """The target of the first matching rule from `start` on (its hit counted); None when
        none matches; or, with the body `NOT_READ`, the index of the first body rule reached
        (go on from there with the body, b"" or None when there is none)."""
        found_headers: dict[bytes, bytes] | None = None
        query: dict[str, str] | None = None
        cookies: dict[str, str] | None = None
        doc: Any = NOT_READ
        rules = self.rules
        for i in range(start, self.count):
            rule = rules[i]
            source = rule.source
            value: Any
            if source == _HEADER or source == _COOKIE:
                if found_headers is None:
                    found_headers = self._headers(headers)
                if source == _HEADER:
                    raw = found_headers.get(rule.key)
                    if raw is None:
                        continue
                    value = raw.decode("utf-8", "surrogateescape")
                else:
                    if cookies is None:
                        raw = found_headers.get(b"cookie")
                        cookies = (_cookies(raw.decode("utf-8", "surrogateescape"),
                                            self.cookie_names) if raw else {})
                    value = cookies.get(rule.key)
            elif source == _QUERY:
                if query is None:
                    query = _query(target, query_at)
                value = query.get(rule.key)
            else:
                if body is NOT_READ:
                    return i
                if doc is NOT_READ:
                    doc = _json(body)
                value = _field_text(rule.key.get(doc))
            if value is not None and rule.test(value):
                hit = rule.target
                hit.stats.add(rule.counter)
                return hit
        return None

    def _headers(self, headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
        """The first value of each header the rules name, in one pass."""
        wanted = self.header_names
        lengths = self.header_lengths
        out: dict[bytes, bytes] = {}
        for name, value in headers:
            if len(name) in lengths:
                lower = name.lower()
                if lower in wanted and lower not in out:
                    out[lower] = value
        return out


def compile_rules(rules: Sequence[Rule], backends: dict[str, T]) -> CompiledRules[T] | None:
    """None for no rules: a route without rules pays one attribute check per request."""
    if not rules:
        return None
    return CompiledRules(tuple(CompiledRule(rule, backends[rule.backend]) for rule in rules))


def _cookies(header: str, wanted: frozenset[str]) -> dict[str, str]:
    """The `wanted` cookies of a Cookie header (the first of a repeated name), by a linear
    split (see `gateway.routing.cookie_value` for why not `http.cookies`)."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        key = key.strip()
        if sep and key in wanted and key not in out:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            out[key] = value
    return out


def _query(target: str, query_at: int) -> dict[str, str]:
    """The first value of each query parameter (as `parse_qsl` with blank values reads them,
    which costs ~5x more on the common query without escapes)."""
    out: dict[str, str] = {}
    if query_at < 0:
        return out
    for part in target[query_at + 1:].split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in part or "+" in part:
            name, value = unquote_plus(name), unquote_plus(value)
        if name not in out:
            out[name] = value
    return out


def _json(body: Any) -> Any:
    if not body:
        return MISSING
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return MISSING


def _field_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return orjson.dumps(value).decode()
    return None  # absent, null, an object or a list


def hit_totals(stats: Iterable[BackendStats]) -> dict[str, float]:
    """This process's hits per rule name, summed over a route's backends (a rule may have
    changed target)."""
    out: dict[str, float] = {}
    for s in stats:
        for name, value in list(s.counter_totals.items()):
            if name.startswith(HIT_PREFIX):
                rule = name[len(HIT_PREFIX):]
                out[rule] = out.get(rule, 0.0) + value
    return out


def rule_hits_metric(routes: Iterable[tuple[str, Sequence[str], Iterable[BackendStats]]]
                     ) -> CounterMetricFamily:
    """``modelgate_rule_hits_total{route,rule}`` from (route, current rule names, its
    backends' stats): every current rule (0 before its first hit) and any past one that hit."""
    family = CounterMetricFamily("modelgate_rule_hits",
                                 "Requests a match rule sent to its backend, by route and rule.",
                                 labels=["route", "rule"])
    for route, names, stats in routes:
        totals = hit_totals(stats)
        for name in names:
            totals.setdefault(name, 0.0)
        for name, value in totals.items():
            family.add_metric([route, name], value)
    return family


__all__ = ["NOT_READ", "CompiledRules", "RuleConfig", "RuleList", "check_rules",
           "compile_rules", "hit_totals", "rule_hits_metric"]
