"""A rollout plan: which backend to ramp, how, and which gates judge it.

The same keys come from a route's ``rollout:`` config section and from the body of
``POST /admin/routes/{route}/rollout``; both are parsed by `parse_plan` with a `Node`, so a bad
value names its key path (``routes[0].rollout.steps[1]: ...`` / ``steps[1]: ...``)::

    rollout:
      backend: green            # the candidate (may be left to the start call)
      steps: [10, 50, 100]      # canary weights in percent; or `step: 10` + `max_weight: 100`
      interval: 30s             # bake time of each step
      check_interval: 5s        # how often the gates are evaluated
      window: 1m                # analysis window (default: interval), bounded by time in step
      failure_threshold: 2      # consecutive failed checks that roll back
      gates: {max_error_rate: 0.01, max_p99_ms: 500, min_requests: 100}
      health_path: /v2/health/ready   # readiness check before a switch or a start
      smoke: {method: POST, path: /v2/models/m/infer, body: {...}, status: 200}

At the end of the last step the candidate is promoted (it becomes live and the old live
backend stays warm as `previous`, the rollback target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.errors import ConfigError
from gateway.schema import Node
from gateway.state import weight_problem

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


@dataclass(frozen=True, slots=True)
class Gates:
    """Thresholds a candidate must meet at each check; None means the gate is off.

    When a plan gives no `gates` at all, `DEFAULT_GATES` applies (an error-rate ceiling), so a
    plan can never pass on no evidence but traffic volume.
    """

    max_error_rate: float | None = None
    max_error_rate_ratio: float | None = None
    max_p99_ms: float | None = None
    max_p99_ratio: float | None = None
    max_null_rate: float | None = None
    min_shadow_agreement: float | None = None
    no_firing_alarms: bool = False
    min_requests: int = DEFAULT_MIN_REQUESTS

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("max_error_rate", "max_error_rate_ratio", "max_p99_ms", "max_p99_ratio",
                     "max_null_rate", "min_shadow_agreement"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.no_firing_alarms:
            out["no_firing_alarms"] = True
        out["min_requests"] = self.min_requests
        return out


DEFAULT_GATES = Gates(max_error_rate=0.05)


@dataclass(frozen=True, slots=True)
class SmokeRequest:
    """A request sent straight to each URL of a backend; the expected status means ready."""

    path: str
    method: str = "GET"
    body: Any = None
    status: int = 200

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "path": self.path, "status": self.status}
        if self.body is not None:
            out["body"] = self.body
        return out


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    backend: str | None = None
    steps: tuple[float, ...] = DEFAULT_STEPS
    interval: float = DEFAULT_INTERVAL
    check_interval: float = DEFAULT_CHECK_INTERVAL
    window: float | None = None
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    gates: Gates = field(default_factory=lambda: DEFAULT_GATES)
    health_path: str = DEFAULT_HEALTH_PATH
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT
    smoke: SmokeRequest | None = None

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
        if self.smoke is not None:
            out["smoke"] = self.smoke.to_json()
        return out


PLAN_KEYS = frozenset({
    "backend", "steps", "step", "max_weight", "interval", "check_interval", "window",
    "failure_threshold", "gates", "health_path", "health_timeout", "smoke",
})


def parse_plan(node: Node, backends: set[str]) -> RolloutPlan:
    """A plan from a config section or an API body; raises `ConfigError` naming the key."""
    backend = node.str("backend", None)
    if backend is not None and backend not in backends:
        known = ", ".join(sorted(backends))
        raise ConfigError(node.key_path("backend"), f"unknown backend {backend!r} (have {known})")
    steps = _parse_steps(node)
    interval = node.duration("interval", DEFAULT_INTERVAL)
    check_interval = node.duration("check_interval", min(DEFAULT_CHECK_INTERVAL, interval)
                                   if interval > 0 else DEFAULT_CHECK_INTERVAL)
    if check_interval < MIN_CHECK_INTERVAL:
        raise ConfigError(node.key_path("check_interval"),
                          f"must be at least {MIN_CHECK_INTERVAL * 1000:g}ms")
    window = node.duration("window", None)
    if window is not None and window <= 0:
        raise ConfigError(node.key_path("window"), "must be > 0")
    threshold = node.int("failure_threshold", DEFAULT_FAILURE_THRESHOLD, lo=1, hi=1000)
    gates_node = node.child("gates", None)
    gates = _parse_gates(gates_node) if gates_node is not None else DEFAULT_GATES
    health_path = node.str("health_path", DEFAULT_HEALTH_PATH)
    if not health_path.startswith("/"):
        raise ConfigError(node.key_path("health_path"), "must start with '/'")
    health_timeout = node.duration("health_timeout", DEFAULT_HEALTH_TIMEOUT)
    if health_timeout <= 0:
        raise ConfigError(node.key_path("health_timeout"), "must be > 0")
    smoke_node = node.child("smoke", None)
    smoke = _parse_smoke(smoke_node) if smoke_node is not None else None
    node.done()
    return RolloutPlan(
        backend=backend, steps=steps, interval=interval, check_interval=check_interval,
        window=window, failure_threshold=threshold, gates=gates, health_path=health_path,
        health_timeout=health_timeout, smoke=smoke,
    )


def _check_weight(value: Any, path: str) -> float:
    """A step's weight: a traffic share of at least 0.01 % (0 would be no step at all)."""
    problem = weight_problem(value, minimum=0.01)
    if problem is not None:
        raise ConfigError(path, problem)
    return float(value)


def _parse_steps(node: Node) -> tuple[float, ...]:
    if node.has("steps") and (node.has("step") or node.has("max_weight")):
        raise ConfigError(node.key_path("steps"), "give either 'steps' or 'step'/'max_weight'")
    if node.has("step") or node.has("max_weight"):
        step = _check_weight(node.raw("step"), node.key_path("step"))
        top = _check_weight(node.raw("max_weight", 100.0), node.key_path("max_weight"))
        if top < step:
            raise ConfigError(node.key_path("max_weight"), f"must be >= step ({step:g})")
        count = math.floor(top / step + 1e-9)
        if count > MAX_STEPS:
            raise ConfigError(node.key_path("step"), f"makes more than {MAX_STEPS} steps")
        weights = [round(step * i, 2) for i in range(1, count + 1)]
        if weights[-1] < top:
            weights.append(top)
        return tuple(weights)
    raw = node.list("steps", None)
    if raw is None:
        return DEFAULT_STEPS
    if not raw:
        raise ConfigError(node.key_path("steps"), "needs at least one weight")
    if len(raw) > MAX_STEPS:
        raise ConfigError(node.key_path("steps"), f"at most {MAX_STEPS} steps")
    steps: list[float] = []
    for i, value in enumerate(raw):
        path = f"{node.key_path('steps')}[{i}]"
        weight = _check_weight(value, path)
        # Weights only go up: raising the weight only moves users from live to candidate, so a
        # sticky user never flips back during a ramp.
        if steps and weight <= steps[-1]:
            raise ConfigError(path, f"steps must increase, {weight:g} follows {steps[-1]:g}")
        steps.append(weight)
    return tuple(steps)


def _parse_gates(node: Node) -> Gates:
    def positive(key: str) -> float | None:
        value = node.number(key, None)
        if value is not None and value <= 0:
            raise ConfigError(node.key_path(key), f"must be > 0, got {value!r}")
        return value  # type: ignore[no-any-return]

    gates = Gates(
        max_error_rate=node.number("max_error_rate", None, lo=0, hi=1),
        max_error_rate_ratio=positive("max_error_rate_ratio"),
        max_p99_ms=positive("max_p99_ms"),
        max_p99_ratio=positive("max_p99_ratio"),
        max_null_rate=node.number("max_null_rate", None, lo=0, hi=1),
        min_shadow_agreement=node.number("min_shadow_agreement", None, lo=0, hi=1),
        no_firing_alarms=node.bool("no_firing_alarms", False),
        min_requests=node.int("min_requests", DEFAULT_MIN_REQUESTS, lo=1, hi=10_000_000),
    )
    node.done()
    if gates.max_error_rate is None:
        # Every plan keeps an absolute error ceiling: ratio gates are skipped while live has
        # too little traffic (at 100 %, in a bake), and latency gates pass a candidate that
        # fails fast, so without it a candidate answering only errors could be promoted.
        # Set it to 1 to opt out.
        gates = replace(gates, max_error_rate=DEFAULT_GATES.max_error_rate)
    return gates


def _parse_smoke(node: Node) -> SmokeRequest:
    path = node.str("path")
    if not path.startswith("/"):
        raise ConfigError(node.key_path("path"), "must start with '/'")
    method = node.str("method", "GET").upper()
    if method not in HTTP_METHODS:
        raise ConfigError(node.key_path("method"), f"not an HTTP method: {method!r}")
    body = node.raw("body", None)
    status = node.int("status", 200, lo=100, hi=599)
    node.done()
    return SmokeRequest(path=path, method=method, body=body, status=status)
