"""A rollout plan: which backend to ramp, how, and which gates judge it.

The same model reads a route's ``rollout:`` config section and the body of
``POST /admin/routes/{route}/rollout`` (`parse_plan`), so a bad value names its key path
(``routes[0].rollout.steps[1]: ...`` / ``steps[1]: ...``) and the admin OpenAPI document can
use `RolloutPlan`'s JSON Schema as it is. ``step``/``max_weight`` are read into `steps`::

    rollout:
      backend: green            # the candidate (may be left to the start call)
      steps: [10, 50, 100]      # canary weights in percent; or `step: 10` + `max_weight: 100`
      interval: 30s             # bake time of each step
      check_interval: 5s        # how often the gates are evaluated
      window: 1m                # analysis window (default: interval), bounded by time in step
      failure_threshold: 2      # consecutive failed checks that roll back
      gates: {max_error_rate: 0.01, max_p99_ms: 500, min_requests: 100}
                                # streamed answers: max_ttft_p99_ms, max_ttft_p99_ratio
      analysis: {mode: sequential, alpha: 0.05, margin: 0.01, min_samples: 100}
      health_path: /v2/health/ready   # readiness check before a switch or a start
      smoke: {method: POST, path: /v2/models/m/infer, body: {...}, status: 200}

At the end of the last step the candidate is promoted (it becomes live and the old live
backend stays warm as `previous`, the rollback target).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator
from pydantic import model_validator as model_check
from pydantic.dataclasses import dataclass

from gateway.schema import (
    MODEL,
    Flag,
    Text,
    UrlPath,
    _duration,
    duration,
    integer,
    known_backend,
    nonempty,
    number,
    problem,
    typed,
    validate,
    weight,
)

DEFAULT_STEPS = (10.0, 50.0, 100.0)
DEFAULT_INTERVAL = 60.0
DEFAULT_CHECK_INTERVAL = 10.0
DEFAULT_FAILURE_THRESHOLD = 2
DEFAULT_MIN_REQUESTS = 20
DEFAULT_HEALTH_PATH = "/v2/health/ready"
DEFAULT_HEALTH_TIMEOUT = 2.0
MIN_CHECK_INTERVAL = 0.01
MAX_STEPS = 100
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Rate = Annotated[float, number(0, 1)] | None
Positive = Annotated[float, number(above=0)] | None
StepWeight = Annotated[float, weight(minimum=0.01)]


def _method(value: Any) -> str:
    method = value.upper() if isinstance(value, str) else value
    if method not in HTTP_METHODS:
        raise problem(f"not an HTTP method: {method!r}")
    return str(method)


HttpMethod = Annotated[str, typed(_method, {"type": "string", "enum": sorted(
    HTTP_METHODS | {m.lower() for m in HTTP_METHODS})})]


@dataclass(frozen=True, slots=True, config=MODEL)
class Gates:
    """Thresholds a candidate must meet at each check; None means the gate is off.

    When a plan gives no `gates` at all, `DEFAULT_GATES` applies (an error-rate ceiling), so a
    plan can never pass on no evidence but traffic volume.
    """

    max_error_rate: Rate = None
    max_error_rate_ratio: Positive = None
    max_p99_ms: Positive = None
    max_p99_ratio: Positive = None
    max_null_rate: Rate = None
    min_shadow_agreement: Rate = None
    # Streamed (server-sent-event) answers: time to the first event, gateway/streaming.py.
    max_ttft_p99_ms: Positive = None
    max_ttft_p99_ratio: Positive = None
    no_firing_alarms: Flag = False
    min_requests: Annotated[int, integer(1, 10_000_000)] = DEFAULT_MIN_REQUESTS

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("max_error_rate", "max_error_rate_ratio", "max_p99_ms", "max_p99_ratio",
                     "max_null_rate", "min_shadow_agreement", "max_ttft_p99_ms",
                     "max_ttft_p99_ratio"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.no_firing_alarms:
            out["no_firing_alarms"] = True
        out["min_requests"] = self.min_requests
        return out


DEFAULT_GATES = Gates(max_error_rate=0.05)
FIXED: Literal["fixed"] = "fixed"
SEQUENTIAL: Literal["sequential"] = "sequential"
SEQUENTIAL_KEYS = ("alpha", "margin", "min_samples", "latency_ms", "latency_margin")


@dataclass(frozen=True, slots=True, config=MODEL)
class AnalysisConfig:
    """How checks compare the candidate with live (gateway.rollout.sequential).

    ``fixed`` (the default): the gates alone, over each check's window; a step advances when
    its bake time is over. ``sequential``: an always-valid test on the error rate (and, with
    `latency_ms`, on the share of requests slower than that) over the whole rollout's traffic
    rolls back as soon as the candidate is significantly worse than live, and advances a step
    as soon as it is significantly not worse by `margin` (and the step has seen `min_samples`
    candidate requests); false rollbacks of a candidate as good as live stay below `alpha`
    however often it checks. The gates still apply as hard limits.
    """

    mode: Literal["fixed", "sequential"] = FIXED
    alpha: Annotated[float, number(None, 0.5, above=0)] = 0.05
    margin: Annotated[float, number(None, 0.5, above=0)] = 0.01
    min_samples: Annotated[int, integer(1, 10_000_000)] = 100
    latency_ms: Positive = None
    latency_margin: Annotated[float, number(None, 0.5, above=0)] | None = None

    @model_check(mode="before")
    @classmethod
    def _sequential_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode", FIXED) == FIXED:
            for key in SEQUENTIAL_KEYS:
                if data.get(key) is not None:
                    raise problem("only used with mode: sequential", key)
        return data

    @property
    def sequential(self) -> bool:
        return self.mode == SEQUENTIAL

    @property
    def slow_margin(self) -> float:
        return self.latency_margin if self.latency_margin is not None else self.margin

    def to_json(self) -> dict[str, Any]:
        if not self.sequential:
            return {"mode": self.mode}
        out: dict[str, Any] = {"mode": self.mode, "alpha": self.alpha, "margin": self.margin,
                               "min_samples": self.min_samples}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        if self.latency_margin is not None:
            out["latency_margin"] = self.latency_margin
        return out


FIXED_ANALYSIS = AnalysisConfig()


@dataclass(frozen=True, slots=True, config=MODEL)
class SmokeRequest:
    """A request sent straight to each URL of a backend; the expected status means ready."""

    path: UrlPath
    method: HttpMethod = "GET"
    body: Any = None
    status: Annotated[int, integer(100, 599)] = 200

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "path": self.path, "status": self.status}
        if self.body is not None:
            out["body"] = self.body
        return out


def _increasing(steps: tuple[float, ...]) -> tuple[float, ...]:
    # Weights only go up: raising the weight only moves users from live to candidate, so a
    # sticky user never flips back during a ramp.
    for i in range(1, len(steps)):
        if steps[i] <= steps[i - 1]:
            raise problem(f"steps must increase, {steps[i]:g} follows {steps[i - 1]:g}", i)
    return steps


@dataclass(frozen=True, slots=True, config=MODEL)
class RolloutPlan:
    backend: Text | None = None
    steps: Annotated[tuple[StepWeight, ...], nonempty("needs at least one weight"),
                     Field(max_length=MAX_STEPS)] = DEFAULT_STEPS
    interval: Annotated[float, duration()] = DEFAULT_INTERVAL
    check_interval: Annotated[float, duration(lo=MIN_CHECK_INTERVAL)] = DEFAULT_CHECK_INTERVAL
    window: Annotated[float, duration(positive=True)] | None = None
    failure_threshold: Annotated[int, integer(1, 1000)] = DEFAULT_FAILURE_THRESHOLD
    gates: Gates = DEFAULT_GATES
    analysis: AnalysisConfig = FIXED_ANALYSIS
    health_path: UrlPath = DEFAULT_HEALTH_PATH
    health_timeout: Annotated[float, duration(positive=True)] = DEFAULT_HEALTH_TIMEOUT
    smoke: SmokeRequest | None = None
    # The linear form of `steps`: weights step, 2*step, ... up to max_weight (default 100).
    # Read into `steps` and then cleared, so a plan has one canonical form.
    step: StepWeight | None = None
    max_weight: StepWeight | None = None

    @model_check(mode="before")
    @classmethod
    def _document_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("steps") is not None and (data.get("step") is not None
                                              or data.get("max_weight") is not None):
            raise problem("give either 'steps' or 'step'/'max_weight'", "steps")
        data = dict(data)
        if data.get("check_interval") is None:
            try:
                interval = _duration(data.get("interval", DEFAULT_INTERVAL))
            except ValueError:
                interval = DEFAULT_INTERVAL  # the field check reports it
            data["check_interval"] = (min(DEFAULT_CHECK_INTERVAL, interval) if interval > 0
                                      else DEFAULT_CHECK_INTERVAL)
        gates = data.get("gates")
        if isinstance(gates, dict) and gates.get("max_error_rate") is None:
            # Every plan keeps an absolute error ceiling: ratio gates are skipped while live
            # has too little traffic (at 100 %, in a bake), and latency gates pass a candidate
            # that fails fast, so without it a candidate answering only errors could be
            # promoted. Set it to 1 to opt out.
            data["gates"] = {**gates, "max_error_rate": DEFAULT_GATES.max_error_rate}
        return data

    @field_validator("steps", mode="after")
    @classmethod
    def _steps_increase(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        return _increasing(steps)

    @field_validator("backend", mode="after")
    @classmethod
    def _known_backend(cls, backend: str | None, info: ValidationInfo) -> str | None:
        return known_backend(backend, info)

    @model_check(mode="after")
    def _linear_steps(self) -> RolloutPlan:
        if self.step is None and self.max_weight is None:
            return self
        if self.step is None:
            raise problem("required", "step")
        step = self.step
        top = self.max_weight if self.max_weight is not None else 100.0
        if top < step:
            raise problem(f"must be >= step ({step:g})", "max_weight")
        count = math.floor(top / step + 1e-9)
        if count > MAX_STEPS:
            raise problem(f"makes more than {MAX_STEPS} steps", "step")
        weights = [round(step * i, 2) for i in range(1, count + 1)]
        if weights[-1] < top:
            weights.append(top)
        for name, value in (("steps", tuple(weights)), ("step", None), ("max_weight", None)):
            object.__setattr__(self, name, value)
        return self

    @property
    def analysis_window(self) -> float:
        """Seconds of traffic each check looks at (before bounding by time in step)."""
        return self.window if self.window is not None else max(self.interval,
                                                                 self.check_interval)

    def to_json(self) -> dict[str, Any]:
        """Canonical form; `parse_plan` reads it back (durations as seconds)."""
        out: dict[str, Any] = {
            "backend": self.backend,
            "steps": list(self.steps),
            "interval": self.interval,
            "check_interval": self.check_interval,
            "failure_threshold": self.failure_threshold,
            "gates": self.gates.to_json(),
            "health_path": self.health_path,
            "health_timeout": self.health_timeout,
        }
        if self.window is not None:
            out["window"] = self.window
        if self.analysis.sequential:
            out["analysis"] = self.analysis.to_json()
        if self.smoke is not None:
            out["smoke"] = self.smoke.to_json()
        return out


PLAN = TypeAdapter(RolloutPlan)
PLAN_KEYS = frozenset(field for field in RolloutPlan.__dataclass_fields__)


def parse_plan(data: Any, backends: set[str], path: str = "") -> RolloutPlan:
    """A plan from a config section or an API body; raises `ConfigError` naming the key."""
    return validate(PLAN, data, path, context={"backends": backends})
