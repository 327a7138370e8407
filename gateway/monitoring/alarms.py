"""Alarm rules judged in-process over the per-backend windows.

Each rule is a small state machine: ``ok`` → ``pending`` (the condition holds) → ``firing``
(it held for ``for``) → ``ok`` again once it stops holding (a *resolved* event). No data (too
few samples in the window) never breaches: an idle backend is not alarming, and a firing
alarm resolves when its traffic stops. `advance()` and `metric_value()` are pure so they are
tested tick by tick.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

from gateway.metrics import WindowSummary
from gateway.monitoring.config import AlarmRule

OK, PENDING, FIRING = "ok", "pending", "firing"
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}


@dataclass(slots=True)
class AlarmStatus:
    """The run-time side of a rule: its (maybe overridden) threshold and where it stands."""

    rule: AlarmRule
    threshold: float
    since: float
    state: str = OK
    value: float | None = None
    backend: str | None = None  # the backend the value came from
    samples: float = 0.0
    last_value: float | None = None  # the previous evaluation's (events show the change)
    last_backend: str | None = None

    def to_json(self) -> dict[str, object]:
        rule = self.rule
        return {
            "name": rule.name, "route": rule.route, "backend": rule.backend,
            "metric": rule.metric, "window": rule.window, "comparison": rule.op,
            "threshold": self.threshold, "for": rule.for_, "state": self.state,
            "value": self.value, "since": self.since,
            "value_backend": self.backend, "samples": self.samples,
            "config_threshold": rule.threshold, "min_samples": rule.min_samples,
            "against": rule.against if rule.metric.startswith("psi_") else None,
            "description": rule.description,
        }


def breaches(op: str, value: float | None, threshold: float) -> bool:
    return value is not None and _OPS[op](value, threshold)


def advance(status: AlarmStatus, breaching: bool, now: float) -> str | None:
    """Move the state machine one tick; returns "firing" or "resolved" when that happened."""
    if breaching:
        if status.state == OK:
            status.state, status.since = PENDING, now
        if status.state == PENDING and now - status.since >= status.rule.for_:
            status.state, status.since = FIRING, now
            return "firing"
        return None
    if status.state == FIRING:
        status.state, status.since = OK, now
        return "resolved"
    if status.state == PENDING:
        status.state, status.since = OK, now
    return None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def metric_value(metric: str, w: WindowSummary) -> tuple[float | None, float]:
    """(value, samples behind it) of a non-PSI metric over one backend's window."""
    c = w.counters
    if metric == "error_rate":
        return _ratio(w.errors, w.requests), w.requests
    if metric == "rps":
        return w.rate, w.requests  # defined even with no requests: min_samples does not apply
    if metric in ("p50_ms", "p90_ms", "p99_ms"):
        q = w.quantile(int(metric[1:3]) / 100)
        return (None if q is None else round(q * 1000, 3)), w.requests
    if metric == "null_rate":
        n = c.get("output_total", 0.0)
        return _ratio(c.get("output_null", 0.0), n), n
    if metric == "error_body_rate":
        n = c.get("output_responses", 0.0)
        return _ratio(c.get("output_error", 0.0), n), n
    if metric == "missing_rate":
        n = c.get("input_values", 0.0)
        return _ratio(c.get("input_missing", 0.0), n), n
    if metric == "schema_error_rate":
        n = c.get("input_total", 0.0)
        return _ratio(c.get("input_schema_errors", 0.0), n), n
    raise ValueError(f"not a window metric: {metric}")


def worst(op: str, candidates: list[tuple[str, float | None, float]]
          ) -> tuple[str | None, float | None, float]:
    """Of (backend, value, samples) pick the one closest to breaching: max for >, min for <."""
    found = [c for c in candidates if c[1] is not None]
    if not found:
        return None, None, max((c[2] for c in candidates), default=0.0)
    pick = max if op.startswith(">") else min
    return pick(found, key=lambda c: c[1])  # type: ignore[arg-type, return-value]
