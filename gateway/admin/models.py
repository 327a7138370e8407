"""Every admin request body, query string and main response, as typed models.

The handlers read bodies and query strings only through these models (`gateway.admin.http`)
and the OpenAPI document is generated from them (`gateway.admin.openapi`), so the bounds a
handler enforces and the bounds the document states are the same objects. Field types come
from `gateway.schema` (the config file's: `weight()`, durations, `Flag`, non-empty `Text`),
so a weight or a duration means the same thing in a config file and in an API call. A check
that needs the route (its backends, its shadow window) reads it from the validation context.

Request models refuse unknown keys. Response models describe what the handlers build; they
allow extra keys (components add theirs to a route's view) and serve the document and the
schema-driven fuzz test, not the handlers.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, create_model
from pydantic import model_validator as model_check
from pydantic.dataclasses import dataclass

from gateway.record.component import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REQUESTS,
    MAX_BYTES,
    MAX_DURATION,
)
from gateway.rollout.plan import MIN_CHECK_INTERVAL, RolloutPlan
from gateway.rules import RuleList
from gateway.schema import (
    MODEL,
    Text,
    duration,
    number,
    problem,
    size,
    text,
    typed,
    unknown_backend,
    weight,
)

MAX_REASON = 1024  # characters of an operator's reason kept in the audit event
MAX_EVENTS = 10_000
MAX_WINDOW = 900.0  # monitoring windows: the 15 minutes of per-second slots
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

Reason = Annotated[str, Field(max_length=MAX_REASON,
                              description="why (kept in the audit event)")]


def whole(lo: int | None = None, hi: int | None = None) -> Any:
    """A whole number, from JSON or a query string's text, within [lo, hi]."""
    def check(raw: Any) -> int:
        value = raw
        if isinstance(raw, str):
            try:
                value = int(raw.strip())
            except ValueError:
                raise problem(f"must be a whole number, got {raw!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise problem(f"must be a whole number, got {raw!r}")
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise problem(f"must be from {lo} to {hi}, got {value}")
        if lo is not None and value < lo:
            raise problem(f"must be {lo} or more, got {value}")
        if hi is not None and value > hi:
            raise problem(f"must be {hi} or less, got {value}")
        return value

    schema: dict[str, Any] = {"type": "integer"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return typed(check, schema, env=False)


def _route_name(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise problem("must be a route name")
    return raw


RouteName = Annotated[str, typed(_route_name, {"type": "string", "minLength": 1}, env=False)]


def _yes_no(raw: Any) -> bool:
    if raw is None:  # as if absent
        return False
    if not isinstance(raw, bool):
        raise problem(f"must be true or false, got {raw!r}")
    return raw


# A JSON true or false (the config file's `Flag` also reads the strings an env var gives).
YesNo = Annotated[bool, typed(_yes_no, {"type": "boolean"}, env=False)]
Weight = Annotated[float, weight()]


def _known(info: ValidationInfo, backend: str | None) -> None:
    """`backend` is one of the route's (context ``backends``), when both are known."""
    known = (info.context or {}).get("backends")
    if known is not None and (why := unknown_backend(backend, known)):
        raise problem(why, "backend")


# -- request bodies
@dataclass(frozen=True, slots=True, config=MODEL)
class CanaryChange:
    """``PUT /admin/routes/{route}/canary``: the canary backend (default: the current one)
    at `weight` percent, in 0.01 steps; pauses a running rollout."""

    weight: Weight
    backend: Text | None = None
    reason: Reason | None = None


@dataclass(frozen=True, slots=True, config=MODEL)
class Switch:
    """``POST /admin/routes/{route}/switch``: all traffic to `to` at once."""

    to: Text
    force: Annotated[YesNo, Field(description="skip the readiness check")] = False
    bake: Annotated[float, duration(lo=MIN_CHECK_INTERVAL), Field(
        description="watch the gates this long after the switch and switch back on "
                    "failure, e.g. '30s'")] | None = None
    reason: Reason | None = None


@dataclass(frozen=True, slots=True, config=MODEL)
class Because:
    """A body with only a reason (rollback, rollout pause/resume/promote/abort)."""

    reason: Reason | None = None


@dataclass(frozen=True, slots=True, config=MODEL)
class ShadowChange:
    """``PUT /admin/routes/{route}/shadow``: mirror `sample` percent of requests to
    `backend`."""

    backend: Text
    sample: Weight = 100.0
    reason: Reason | None = None


@dataclass(frozen=True, slots=True, config=MODEL)
class RulesChange:
    """``PUT /admin/routes/{route}/rules``: the route's match rules, in order, replacing the
    current ones (``[]`` clears them). Each rule: `name`, one of header/cookie/query/body, one
    of exact/prefix/regex/one_of, and the `backend` (one of the route's) it sends to."""

    rules: RuleList
    reason: Reason | None = None


@dataclass(frozen=True, slots=True, config=MODEL)
class Threshold:
    """``PUT /admin/alarms/{name}``: the alarm's threshold at run time; null: the config's."""

    threshold: Annotated[float, number()] | None
    reason: Reason | None = None


MonitoringWindow = Annotated[float, duration(1, MAX_WINDOW)]


@dataclass(frozen=True, slots=True, config=MODEL)
class Baseline:
    """``POST /admin/routes/{route}/drift/baseline``: freeze the last `window` (default the
    route's drift window) as the drift reference."""

    window: MonitoringWindow | None = None
    reason: Reason | None = None


class StartOptions(BaseModel):
    """``POST /admin/routes/{route}/rollout``: the route's config plan, the given plan keys
    on top (`gates` replaces whole); ``{}`` starts the config plan."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    force: Annotated[YesNo, Field(description="skip the readiness check")] = False
    reason: Reason | None = None

    def overrides(self) -> dict[str, Any]:
        """The given plan keys, as a plan document (what `Rollouts.start_rollout` takes)."""
        given = self.model_fields_set - {"force", "reason"}
        out: dict[str, Any] = self.model_dump(include=given, exclude_none=True)
        return out


def _plan_fields() -> dict[str, Any]:
    """Every `RolloutPlan` key as an optional field of the same type: a start body gives
    only the keys it overrides in the route's config plan."""
    plan_fields = RolloutPlan.__pydantic_fields__  # type: ignore[attr-defined]
    return {name: (info.rebuild_annotation() | None, None) for name, info in plan_fields.items()}


RolloutStart: type[StartOptions] = create_model("RolloutStart", __base__=StartOptions,
                                                 **_plan_fields())


MAX_REDACTIONS = 100
HeaderName = Annotated[str, text(
    lambda v: None if _TOKEN.fullmatch(v) else f"not a header name: {v!r}",
    pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
JsonField = Annotated[str, Field(min_length=1, max_length=256)]


@dataclass(frozen=True, slots=True, config=MODEL)
class RecordingStart:
    """``POST /admin/routes/{route}/recordings``: capture `sample_percent` of the route's
    exchanges for `duration_s` (or until `max_requests` or `max_bytes` of JSON lines).
    Credential and client-address headers (Authorization, Cookie, X-Api-Key, X-Forwarded-For
    …) and credential query parameters are always redacted."""

    duration_s: Annotated[float, duration(1, MAX_DURATION), Field(
        description="how long, e.g. '10m' (1s to 24h)")]
    sample_percent: Annotated[float, weight(0.01)] = 100.0
    max_requests: Annotated[int, whole(1, 10_000_000)] = DEFAULT_MAX_REQUESTS
    max_bytes: Annotated[int, size(1024, "1KiB"), Field(
        description=f"JSON-lines bytes before gzip (at most {MAX_BYTES // 2**20}MiB)")] \
        = DEFAULT_MAX_BYTES
    redact_headers: Annotated[tuple[HeaderName, ...], Field(max_length=MAX_REDACTIONS)] = ()
    redact_json_fields: Annotated[tuple[JsonField, ...], Field(
        max_length=MAX_REDACTIONS,
        description="JSON object keys blanked at any depth of request and response bodies")] \
        = ()
    redact_query_params: Annotated[tuple[JsonField, ...], Field(
        max_length=MAX_REDACTIONS,
        description="query parameters whose values are blanked in the target, beyond the "
                    "defaults (api_key, key, token, access_token, password, signature …)")] \
        = ()

    @model_check(mode="after")
    def _bounded(self) -> RecordingStart:
        if self.max_bytes > MAX_BYTES:
            raise problem(f"must be at most {MAX_BYTES // 2**20}MiB, got {self.max_bytes}",
                          "max_bytes")
        return self


# -- query strings
@dataclass(frozen=True, slots=True, config=MODEL)
class EventsQuery:
    """``GET /admin/events``: the newest `limit` events, or with `since` (an event id, a
    cursor) the first `limit` after it; of one `route` or all."""

    limit: Annotated[int, whole(1, MAX_EVENTS)] = 100
    since: Annotated[int, whole(0)] | None = None
    route: RouteName | None = None


@dataclass(frozen=True, slots=True, config=MODEL)
class WindowQuery:
    """A monitoring report's window, e.g. ``30s`` or ``5m`` (at most 15 minutes)."""

    window: MonitoringWindow | None = None


@dataclass(frozen=True, slots=True, config=MODEL)
class ShadowQuery:
    """``GET /admin/routes/{route}/shadow``: over the last `window` (at most the route's
    ``shadow.window``), of `backend` (a past shadow; default the current or last one)."""

    window: Annotated[float, duration(positive=True)] | None = None
    backend: Text | None = None

    @model_check(mode="after")
    def _within_route(self, info: ValidationInfo) -> ShadowQuery:
        _known(info, self.backend)
        longest = (info.context or {}).get("max_window")
        if self.window is not None and longest is not None and self.window > longest:
            raise problem(f"must be more than 0 and at most the configured {longest:g}s",
                          "window")
        return self


# -- responses
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Error(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: str = Field(examples=["invalid_request"])
    message: str = Field(examples=["weight: must be a number from 0 to 100, got 101"])


class Health(_Open):
    status: Literal["ok", "degraded"]
    version: str
    store: dict[str, Any]


class Ready(_Open):
    ready: bool
    reason: str | None = None


class Split(_Open):
    backend: str
    weight: float | None = None
    sample: float | None = None


class RouteView(_Open):
    """One route: routing state, backends and their URLs; each component adds its keys
    (``rollout``, ``shadow_report``, ``monitoring``)."""

    name: str
    match: dict[str, str | None]
    live: str
    previous: str | None
    canary: Split | None
    shadow: Split | None
    traffic: dict[str, float]
    version: int
    backends: dict[str, dict[str, Any]]
    sticky: dict[str, str] | None
    override_header: str | None
    timeouts: dict[str, float]
    max_body_bytes: int
    rules: list[dict[str, Any]] = Field(default_factory=list,
                                        description="match rules, in order (see /rules)")


class RuleView(_Open):
    name: str
    backend: str
    hits: dict[str, float] = Field(description="hits in the last minute ('1m') and 15 "
                                   "minutes ('15m'); with the Redis store: of every process")


class RulesView(_Open):
    """``GET /admin/routes/{route}/rules``."""

    route: str
    version: int
    rules: list[RuleView]


class RouteList(_Open):
    routes: list[RouteView]


class Event(_Open):
    id: int
    time: float
    timestamp: str
    route: str | None
    actor: str
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None
    role: str | None = Field(default=None, description="the admin token's role; null for "
                             "the controllers' events and events stored before roles")


class EventList(_Open):
    events: list[Event]


class ClusterView(_Open):
    self_: str = Field(alias="self")
    store: dict[str, Any]
    lease: dict[str, Any]
    members: list[dict[str, Any]]
    error: str | None = None


class RolloutView(_Open):
    route: str
    kind: str
    backend: str
    baseline: str
    phase: Literal["progressing", "paused", "promoted", "rolled_back", "aborted"]
    step: int
    steps: list[float]
    weight: float
    failures: int
    reason: str | None
    time_in_step: float
    interval: float
    check_interval: float
    failure_threshold: int
    started: float
    started_by: str | None
    step_started: float
    paused_at: float | None
    finished: float | None
    checks: int
    last_verdict: str | None
    last_check_time: float | None
    last_check: dict[str, Any] | None
    plan: dict[str, Any]
    version: int


class Alarm(_Open):
    name: str
    route: str
    backend: str
    metric: str
    window: float
    comparison: str
    threshold: float
    for_: float = Field(alias="for")
    state: str
    value: float | None
    since: float | None


class RecordingView(_Open):
    id: str
    route: str
    state: Literal["recording", "done"]
    stop_reason: str | None
    process: str
    started: float
    ends_at: float
    ended: float | None
    captured: int
    dropped: int
    bytes: int
    compressed_bytes: int


class RecordingList(_Open):
    recordings: list[RecordingView]


class AlarmList(_Open):
    alarms: list[Alarm]


# -- adapters: built once, used by the handlers and the document
CANARY = TypeAdapter(CanaryChange)
SWITCH = TypeAdapter(Switch)
BECAUSE = TypeAdapter(Because)
SHADOW = TypeAdapter(ShadowChange)
RULES = TypeAdapter(RulesChange)
THRESHOLD = TypeAdapter(Threshold)
BASELINE = TypeAdapter(Baseline)
ROLLOUT_START = TypeAdapter(RolloutStart)
EVENTS_QUERY = TypeAdapter(EventsQuery)
WINDOW_QUERY = TypeAdapter(WindowQuery)
SHADOW_QUERY = TypeAdapter(ShadowQuery)
RECORDING_START = TypeAdapter(RecordingStart)
