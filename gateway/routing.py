"""Which backend serves a request: an immutable snapshot, swapped whole on every state change.

`RoutingTable` is built from the config (static: prefixes, backends, pools, metric objects)
and the routes' `RouteState` (dynamic: live, canary weight, shadow). Readers never lock: the
proxy reads `proxy.table` once per request and keeps that snapshot to the end, so a request
in flight finishes on the backend it started on while the next one sees the new table.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import RouteConfig, StickyKey, Timeouts
from gateway.metrics import BackendStats
from gateway.resilience.budget import RetryBudget
from gateway.resilience.limits import Gate
from gateway.resilience.outlier import Outliers
from gateway.rules import CompiledRules, compile_rules
from gateway.state import BUCKETS, WEIGHT_SCALE, RouteState
from gateway.upstream import Headers, Upstream

log = logging.getLogger("modelgate.proxy")


def bucket_of(salt: bytes, key: str) -> int:
    """Stable bucket 0..9,999 of a user key; the same on every process, host and restart."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8, key=salt)
    return int.from_bytes(digest.digest(), "big") % BUCKETS


def threshold(weight_percent: float) -> int:
    """Buckets below this go to the canary: weight 10 → 1,000 of 10,000."""
    return max(0, min(BUCKETS, round(weight_percent * WEIGHT_SCALE)))


# Buckets of recent (salt, key) pairs: user keys repeat, and a dict lookup costs a tenth of
# the hash. Bounded: short keys only, and the whole cache is dropped when it is full.
_BUCKET_CACHE: dict[tuple[bytes, str], int] = {}
BUCKET_CACHE_MAX = 16384
BUCKET_CACHE_KEY_MAX = 64


def in_sample(t: int, salt: bytes, key: str | None) -> bool:
    """Whether a request with user `key` falls in the first `t` of 10,000 buckets: the canary
    split and the shadow sample. Sticky per key; no key → a random draw per request."""
    if t == 0:
        return False
    if t >= BUCKETS:
        return True
    if key is None:
        return random.randrange(BUCKETS) < t
    if len(key) > BUCKET_CACHE_KEY_MAX:
        return bucket_of(salt, key) < t
    cache_key = (salt, key)
    b = _BUCKET_CACHE.get(cache_key)
    if b is None:
        if len(_BUCKET_CACHE) >= BUCKET_CACHE_MAX:
            _BUCKET_CACHE.clear()
        b = _BUCKET_CACHE[cache_key] = bucket_of(salt, key)
    return b < t


class Backend:
    """A named version of the model (of one route); its URLs are balanced round-robin,
    skipping those ejected as outliers (gateway/resilience/outlier.py)."""

    __slots__ = ("name", "upstreams", "stats", "_next", "outliers", "_index", "gate", "budget")

    def __init__(self, name: str, upstreams: list[Upstream], stats: BackendStats,
                 outliers: Outliers | None = None, gate: Gate | None = None,
                 budget: RetryBudget | None = None) -> None:
        self.name = name
        self.upstreams = upstreams
        self.stats = stats  # bound once: the proxy records every answer here
        self._next = 0
        # One URL is never ejected: no outlier state to keep then.
        self.outliers = outliers if len(upstreams) > 1 else None
        self._index = {id(u): i for i, u in enumerate(upstreams)}
        self.gate = gate  # concurrency limit, None: none
        self.budget = budget  # retries sent to this backend, None: never retried to

    def upstream(self) -> Upstream:
        ups = self.upstreams
        if len(ups) == 1:
            return ups[0]
        self._next = i = (self._next + 1) % len(ups)
        outliers = self.outliers
        if outliers is not None and outliers.ejected:
            i = outliers.pick(i, time.monotonic())
        return ups[i]

    def other_upstream(self, failed: Upstream) -> Upstream | None:
        """Another URL than `failed` not ejected (a connect retry), or None."""
        outliers = self.outliers
        if outliers is None:
            return None
        i = outliers.other(self._index.get(id(failed), 0), time.monotonic())
        return None if i is None else self.upstreams[i]

    def report(self, upstream: Upstream, status: int) -> None:
        """`upstream` (one of ours) answered `status`: outlier bookkeeping."""
        outliers = self.outliers
        if outliers is not None:
            i = self._index.get(id(upstream))
            if i is not None:
                if status < 500:
                    outliers.success(i)
                elif outliers.status(i, status, time.monotonic()):
                    log.warning("backend %s: URL %s ejected after %s", self.name,
                                upstream.origin, status)

    def report_failure(self, upstream: Upstream, kind: str) -> None:
        """Calling `upstream` failed before its status line (refused, reset, timeout)."""
        outliers = self.outliers
        if outliers is not None:
            i = self._index.get(id(upstream))
            if i is not None and outliers.failure(i, kind, time.monotonic()):
                log.warning("backend %s: URL %s ejected after %s", self.name,
                            upstream.origin, kind)


class Exchange:
    """One finished request/response pair, handed to taps (shadow, probes) after the client
    has its answer. Bodies are present only when a tap asked for them."""

    __slots__ = (
        "route", "backend", "request_id", "method", "target", "request_headers",
        "request_body", "sticky_key", "status", "response_headers", "response_body",
        "latency", "started", "sampled",
    )
    route: str
    backend: str
    request_id: str
    method: str
    target: str
    request_headers: Headers
    status: int
    latency: float
    started: float

    def __init__(self) -> None:
        self.request_body: bytes | None = None
        self.response_body: bytes | None = None
        self.response_headers: Headers = []
        self.sticky_key: str | None = None
        # The route's body sample as decided when the request was planned (`CompiledRoute.
        # sampled`): False means no body was kept; None means no such decision was made.
        self.sampled: bool | None = None


class Tap(Protocol):
    """Something that looks at finished exchanges; must return at once (queue, don't await).

    A tap that wants bodies only for a sample of requests may have a `body_sample` attribute
    (its `in_sample` threshold and salt; optional, read with getattr): when it is the
    route's only tap that needs bodies, the proxy decides the sample when it plans the
    request and buffers bodies for those alone (`Exchange.sampled`)."""

    needs_request_body: bool
    needs_response_body: bool

    def __call__(self, exchange: Exchange) -> None: ...




@dataclass(frozen=True, slots=True)
class StaticRoute:
    """The parts of a route fixed by the config file: built once at start."""

    config: RouteConfig
    backends: dict[str, Backend]
    stats: dict[str, BackendStats]
    salt: bytes
    shadow_salt: bytes
    gate: Gate | None = None  # the route's concurrency limit (shared by its snapshots)


class CompiledRoute:
    """Everything the hot path needs for one route under one `RouteState`."""

    __slots__ = (
        "name", "prefix", "host", "static", "state", "live", "canary", "canary_threshold",
        "sticky", "sticky_name", "override_header", "override_name", "timeouts", "max_body",
        "taps", "needs_request_body", "needs_response_body", "rules", "fallback", "gate",
        "retry_safe", "body_sample",
    )

    def __init__(self, static: StaticRoute, state: RouteState, taps: tuple[Tap, ...]) -> None:
        cfg = static.config
        self.name = cfg.name
        self.prefix = cfg.path_prefix
        self.host = cfg.host
        self.static = static
        self.state = state
        self.live = static.backends[state.live]
        self.canary = static.backends[state.canary] if state.canary else None
        self.canary_threshold = threshold(state.canary_weight) if self.canary else 0
        self.sticky = cfg.sticky
        self.override_header = cfg.override_header
        # Header names as the proxy compares them (lower-case bytes), once per route state.
        self.sticky_name = cfg.sticky.name.lower().encode("latin-1") if cfg.sticky else b""
        self.override_name = (cfg.override_header.lower().encode("latin-1")
                              if cfg.override_header else None)
        self.timeouts: Timeouts = cfg.timeouts
        self.max_body = cfg.max_body_bytes
        self.taps = taps
        # Match rules, compiled for this snapshot; None (no rules) costs one check a request.
        self.rules: CompiledRules[Backend] | None = compile_rules(state.rules, static.backends)
        self.needs_request_body = (any(t.needs_request_body for t in taps)
                                   or (self.rules is not None and self.rules.needs_body))
        self.needs_response_body = any(t.needs_response_body for t in taps)
        # One sampling tap alone needs bodies (a recording at 5 %): decided per request.
        body_taps = [t for t in taps if t.needs_request_body or t.needs_response_body]
        body_rules = self.rules is not None and self.rules.needs_body
        self.body_sample: tuple[int, bytes] | None = (
            getattr(body_taps[0], "body_sample", None)
            if len(body_taps) == 1 and not body_rules else None)
        # A failed canary request may be retried on live (and a canary is there to fail).
        self.fallback = cfg.fallback and self.canary is not None
        self.gate = static.gate
        self.retry_safe = cfg.side_effect_free  # a reset request may go to another URL

    def sampled(self, key: str | None) -> bool | None:
        """Whether to keep this request's bodies for the route's sampling tap (None: the
        route has no such decision to make; bodies are kept whenever a tap needs them)."""
        sample = self.body_sample
        return None if sample is None else in_sample(sample[0], sample[1], key)

    def matches(self, host: str | None, path: str) -> bool:
        if self.host is not None and (host or "").split(":", 1)[0].lower() != self.host:
            return False
        prefix = self.prefix
        if not path.startswith(prefix):
            return False
        return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] in "/?"

    def pick(self, key: str | None, override: str | None = None) -> Backend:
        """The backend for a request with user `key` (None: a random draw per request)."""
        if override is not None:
            forced = self.static.backends.get(override)
            if forced is not None:
                return forced
        canary = self.canary
        if canary is not None and in_sample(self.canary_threshold, self.static.salt, key):
            return canary
        return self.live


def sticky_key_of(sticky: StickyKey | None, headers: Any, query: Any) -> str | None:
    """The user key from a request's headers (case-insensitive mapping) or query."""
    if sticky is None:
        return None
    if sticky.source == "header":
        value = headers.get(sticky.name)
        return value if value else None
    if sticky.source == "query":
        value = query.get(sticky.name)
        return value if value else None
    return cookie_value(headers.get("cookie"), sticky.name)


def cookie_value(header: str | None, name: str) -> str | None:
    """One cookie's value from a Cookie header, by a linear split.

    Not `http.cookies.SimpleCookie`: it is quadratic on some inputs (a few hundred ms for one
    crafted 8 KiB header on Python 3.11) and drops every cookie after a malformed one."""
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


class RoutingTable:
    """An immutable set of compiled routes; longest prefix wins, host-specific first."""

    __slots__ = ("routes", "by_name")

    def __init__(self, routes: list[CompiledRoute]) -> None:
        ordered = sorted(routes, key=lambda r: (r.host is None, -len(r.prefix)))
        self.routes = tuple(ordered)
        self.by_name = {r.name: r for r in ordered}

    def match(self, host: str | None, path: str) -> CompiledRoute | None:
        for route in self.routes:
            if route.matches(host, path):
                return route
        return None

    def replace(self, route: CompiledRoute) -> RoutingTable:
        return RoutingTable([route if r.name == route.name else r for r in self.routes])
