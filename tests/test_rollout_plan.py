"""Rollout plans: config section and API body parsing, errors naming the key path."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.rollout.plan import DEFAULT_GATES, RolloutPlan, parse_plan

BACKENDS = {"blue", "green"}


def plan(**data: Any) -> RolloutPlan:
    return parse_plan(data, BACKENDS)


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_plan(data, BACKENDS)
    return str(info.value)


def test_issue_body_parses() -> None:
    p = plan(backend="green", steps=[10, 50, 100], interval="30s", check_interval="5s",
             gates={"max_error_rate": 0.01, "max_error_rate_ratio": 2, "max_p99_ms": 500,
                    "max_p99_ratio": 1.5, "min_requests": 100}, failure_threshold=2)
    assert p.backend == "green"
    assert p.steps == (10, 50, 100)
    assert (p.interval, p.check_interval, p.failure_threshold) == (30, 5, 2)
    assert p.gates.max_error_rate == 0.01 and p.gates.max_p99_ratio == 1.5
    assert p.gates.min_requests == 100
    assert p.analysis_window == 30


def test_durations_and_window() -> None:
    p = plan(interval="500ms", check_interval="100ms", window="2m")
    assert (p.interval, p.check_interval, p.window) == (0.5, 0.1, 120)
    assert p.analysis_window == 120


def test_linear_form() -> None:
    assert plan(step=10).steps == tuple(float(w) for w in range(10, 101, 10))
    assert plan(step=30, max_weight=80).steps == (30, 60, 80)
    assert plan(step=25, max_weight=50).steps == (25, 50)


def test_defaults() -> None:
    p = plan()
    assert p.backend is None
    assert p.steps == (10, 50, 100)
    assert p.gates == DEFAULT_GATES
    assert p.health_path == "/v2/health/ready"


def test_every_plan_keeps_an_error_ceiling() -> None:
    # Only a traffic minimum (e.g. `rollout start --min-requests 10`) must not promote a
    # candidate that returns nothing but errors; nor may latency or ratio gates alone (ratio
    # gates are skipped while live has no traffic, latency gates pass fast errors).
    for gates in ({"min_requests": 10}, {"max_p99_ms": 300}, {"max_error_rate_ratio": 2}):
        assert plan(gates=gates).gates.max_error_rate == DEFAULT_GATES.max_error_rate
    assert plan(gates={"min_requests": 10}).gates.min_requests == 10
    # A ceiling the operator gives is kept; 1 opts out.
    assert plan(gates={"max_error_rate": 0.2}).gates.max_error_rate == 0.2
    assert plan(gates={"max_error_rate": 1}).gates.max_error_rate == 1


@pytest.mark.parametrize(("data", "where"), [
    ({"backend": "red"}, "backend: unknown backend 'red'"),
    ({"steps": [10, 5]}, "steps[1]: steps must increase"),
    ({"steps": [0, 50]}, "steps[0]: must be a number from 0.01 to 100"),
    ({"steps": [10, 101]}, "steps[1]: must be a number from 0.01 to 100"),
    ({"steps": [1e-9, 100]}, "steps[0]: must be a number from 0.01 to 100"),
    ({"step": 1e-320}, "step: must be a number from 0.01 to 100"),
    ({"steps": [10.001]}, "steps[0]: resolution is 0.01"),
    ({"steps": []}, "steps: needs at least one weight"),
    ({"steps": "10,50"}, "steps: expected a list"),
    ({"steps": [10], "step": 5}, "steps: give either"),
    ({"step": 50, "max_weight": 20}, "max_weight: must be >= step"),
    ({"interval": "soon"}, "interval: expected a duration"),
    ({"check_interval": "1ms"}, "check_interval: must be at least 10ms"),
    ({"failure_threshold": 0}, "failure_threshold: must be between 1"),
    ({"gates": {"max_error_rate": 2}}, "gates.max_error_rate: must be between 0 and 1"),
    ({"gates": {"max_p99_ratio": 0}}, "gates.max_p99_ratio: must be > 0"),
    ({"gates": {"min_requests": 0}}, "gates.min_requests: must be between 1"),
    ({"gates": {"max_errors": 1}}, "gates.max_errors: unknown key"),
    ({"gates": {"no_firing_alarms": "yes"}}, "gates.no_firing_alarms: expected true or false"),
    ({"health_path": "health"}, "health_path: must start with '/'"),
    ({"smoke": {"path": "/x", "method": "FETCH"}}, "smoke.method: not an HTTP method"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_errors_name_the_key(data: dict[str, Any], where: str) -> None:
    assert where in error(data)


def test_round_trip_through_json() -> None:
    p = plan(backend="green", step=20, interval="2s", check_interval="250ms", window="1s",
             gates={"max_p99_ms": 300, "no_firing_alarms": True, "min_requests": 5},
             smoke={"method": "post", "path": "/v2/models/m/infer", "body": {"a": 1}})
    assert parse_plan(p.to_json(), BACKENDS) == p


def test_config_section_errors_name_the_route_key() -> None:
    config = {"routes": [{
        "name": "r", "match": {"path_prefix": "/r"},
        "backends": {"blue": {"url": "http://127.0.0.1:1"}, "green": {"url": "http://127.0.0.1:2"}},
        "live": "blue", "rollout": {"backend": "green", "steps": [50, 10]},
    }]}
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    assert str(info.value).startswith("routes[0].rollout.steps[1]:")
    config["routes"][0]["rollout"] = {"backend": "green", "gates": {"max_p99_ms": 250}}
    route = parse_config(config).routes[0]
    assert route.rollout is not None and route.rollout.gates.max_p99_ms == 250
