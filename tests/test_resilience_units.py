"""The fault-handling state machines directly: outlier ejection, the retry budget, the
concurrency gates, and their config sections."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import (
    ConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResetError,
    UpstreamTimeout,
)
from gateway.metrics import BackendStats
from gateway.resilience.budget import WINDOW, RetryBudget
from gateway.resilience.config import HealthCheck, Limits, OutlierDetection
from gateway.resilience.config import RetryBudget as RetryBudgetConfig
from gateway.resilience.health import UrlCheck
from gateway.resilience.limits import Gate, admit, full, leave
from gateway.resilience.outlier import Outliers
from gateway.resilience.retry import may_fall_back

URLS = ["http://a", "http://b", "http://c", "http://d"]


def outliers(n: int = 2, **settings: Any) -> Outliers:
    return Outliers(URLS[:n], OutlierDetection(**settings))


# -- outlier ejection -----------------------------------------------------------------------


def test_consecutive_gateway_failures_eject_and_the_url_returns_after_base_time() -> None:
    o = outliers(consecutive_gateway_failure=3, base_ejection_time=10)
    assert [o.failure(0, "refused", now=t) for t in (0.0, 0.1, 0.2)] == [False, False, True]
    assert o.is_ejected(0, now=0.3) and o.ejected_now(0.3) == 1
    assert o.pick(0, now=5.0) == 1  # round-robin skips it
    assert o.other(1, now=5.0) is None  # no other URL in for a retry
    assert o.other(0, now=5.0) == 1
    assert not o.is_ejected(0, now=10.2)  # base_ejection_time × 1 after the ejection
    assert o.pick(0, now=10.2) == 0 and o.ejected_now(10.2) == 0


def test_a_success_resets_the_count() -> None:
    o = outliers(consecutive_gateway_failure=3)
    o.failure(0, "reset", now=0)
    o.failure(0, "reset", now=0)
    o.status(0, 200, now=0)
    assert not o.failure(0, "reset", now=0) and not o.failure(0, "reset", now=0)
    assert o.failure(0, "reset", now=0)


def test_plain_5xx_count_for_consecutive_5xx_only() -> None:
    o = outliers(consecutive_5xx=4, consecutive_gateway_failure=2)
    # 500s are not gateway failures: they break the gateway streak, not the 5xx one.
    assert not o.status(0, 502, now=0)
    assert not o.status(0, 500, now=0)
    assert not o.status(0, 503, now=0)  # gateway streak 1 again (the 500 reset it)
    assert o.status(0, 500, now=0)  # the fourth 5xx in a row
    assert o.urls[0].total_ejections == 1


def test_ejection_time_grows_with_ejections_up_to_the_max_and_decays() -> None:
    o = outliers(consecutive_gateway_failure=1, base_ejection_time=10, max_ejection_time=25)
    assert o.failure(0, "refused", now=0)
    assert o.urls[0].ejected_until == 10
    assert o.failure(0, "refused", now=10)  # back at 10, out again at once: 2 × 10
    assert o.urls[0].ejected_until == 30
    assert o.failure(0, "refused", now=30)  # 3 × 10 capped at 25
    assert o.urls[0].ejected_until == 55
    # Healthy for 2 base times after returning at 55: the multiplier drops from 3 to 1,
    # so this ejection is the second: 20 s.
    assert o.failure(0, "refused", now=75)
    assert o.urls[0].ejected_until == 95


def test_never_the_last_url_and_at_most_the_percentage() -> None:
    two = outliers(consecutive_gateway_failure=1, max_ejection_percent=100)
    assert two.failure(0, "refused", now=0)
    assert not two.failure(1, "refused", now=0)  # the last one in stays in
    assert two.pick(1, now=1) == 1 and two.ejected_now(1) == 1
    single = outliers(1, consecutive_gateway_failure=1)
    assert not single.failure(0, "refused", now=0)
    four = outliers(4, consecutive_gateway_failure=1, max_ejection_percent=50)
    assert four.failure(0, "refused", now=0) and four.failure(1, "refused", now=0)
    assert not four.failure(2, "refused", now=0)  # 2 of 4 out is the 50 % cap
    tiny = outliers(4, consecutive_gateway_failure=1, max_ejection_percent=1)
    assert tiny.failure(0, "refused", now=0)  # at least one may always go
    assert not tiny.failure(1, "refused", now=0)


def test_triggers_can_be_turned_off() -> None:
    o = outliers(consecutive_gateway_failure=0, consecutive_5xx=0)
    assert not any(o.failure(0, "refused", now=0) for _ in range(100))


# -- retry budget ---------------------------------------------------------------------------


def test_budget_allows_the_floor_then_the_percentage() -> None:
    b = RetryBudget(RetryBudgetConfig(percent=10, min_retries=2))
    assert [b.try_retry(0.0, requests=0) for _ in range(3)] == [True, True, False]
    # 10 % of 50 requests in the window = 5 retries in all
    assert [b.try_retry(0.6, requests=50) for _ in range(4)] == [True, True, True, False]
    assert (b.retried, b.exhausted) == (5, 2)


def test_budget_window_slides() -> None:
    b = RetryBudget(RetryBudgetConfig(percent=0, min_retries=1))
    assert b.try_retry(100.0, requests=0)
    assert not b.try_retry(100.0 + WINDOW - 1, requests=0)  # the retry at 100 is still in
    assert b.try_retry(100.0 + WINDOW, requests=0)  # it has slid out
    assert b.try_retry(1000.0, requests=0)  # a long pause clears every slot


def test_budget_zero_never_retries() -> None:
    b = RetryBudget(RetryBudgetConfig(percent=0, min_retries=0))
    assert not b.try_retry(1.0, requests=100)


def test_budget_counts_the_requests_the_backend_answered_in_its_window() -> None:
    """The budget's denominator is the backend's own per-second metrics: the requests
    observed over the last WINDOW seconds, not older ones."""
    clock = [1000.5]
    stats = BackendStats("r", "b", clock=lambda: clock[0])
    for _ in range(30):
        stats.observe(200, 0.001)
    clock[0] = 1000.5 + WINDOW - 1  # still in the window
    for _ in range(20):
        stats.observe(503, 0.001)
    assert stats.recent_requests(WINDOW) == 50
    clock[0] = 1000.5 + WINDOW  # the first second has slid out
    assert stats.recent_requests(WINDOW) == 20
    clock[0] = 1000.5 + 10 * WINDOW
    assert stats.recent_requests(WINDOW) == 0


# -- gates ------------------------------------------------------------------------------------


def test_gates_admit_up_to_the_limit_and_count_refusals_where_they_happen() -> None:
    route, backend = Gate(Limits(max_concurrency=3)), Gate(Limits(max_concurrency=2))
    assert admit(route, backend) is None and admit(route, backend) is None
    assert full(route, backend)
    assert admit(route, backend) is backend  # the backend's limit is reached first
    assert (route.count, backend.count, route.rejected, backend.rejected) == (2, 2, 0, 1)
    assert admit(route, None) is None  # another backend of the route
    assert admit(route, None) is route and route.rejected == 1
    leave(route, backend)
    assert not full(route, backend) and admit(route, backend) is None
    assert route.retry_after_header == b"1"


# -- config -----------------------------------------------------------------------------------


def _route(**extra: Any) -> dict[str, Any]:
    route = {"name": "r", "match": {"path_prefix": "/x"}, "live": "a",
             "backends": {"a": {"urls": ["http://127.0.0.1:1", "http://127.0.0.1:2"]},
                          "b": {"url": "http://127.0.0.1:3"}}}
    route.update(extra)
    return {"routes": [route]}


def test_config_defaults_and_fallback_follows_side_effect_free() -> None:
    route = parse_config(_route()).routes[0]
    assert not route.fallback and route.limits is None
    assert route.backends["a"].outlier_detection == OutlierDetection()
    assert route.retry_budget == RetryBudgetConfig(percent=25, min_retries=10)
    assert parse_config(_route(side_effect_free=True)).routes[0].fallback
    assert not parse_config(_route(side_effect_free=True, fallback=False)).routes[0].fallback
    assert parse_config(_route(fallback="${F}"), env={"F": "true"}).routes[0].fallback
    limited = parse_config(_route(limits={"max_concurrency": 8, "retry_after": 2})).routes[0]
    assert limited.limits == Limits(max_concurrency=8, retry_after=2)


@pytest.mark.parametrize(("extra", "path"), [
    ({"limits": {"max_concurrency": 0}}, "routes[0].limits.max_concurrency"),
    ({"limits": {}}, "routes[0].limits.max_concurrency"),
    ({"retry_budget": {"percent": 101}}, "routes[0].retry_budget.percent"),
    ({"fallback": "maybe"}, "routes[0].fallback"),
    ({"backends": {"a": {"url": "http://h", "outlier_detection": {"consecutive_5xx": -1}}}},
     "routes[0].backends.a.outlier_detection.consecutive_5xx"),
    ({"backends": {"a": {"url": "http://h", "outlier_detection": {
        "base_ejection_time": "10s", "max_ejection_time": "5s"}}}},
     "routes[0].backends.a.outlier_detection.max_ejection_time"),
    ({"backends": {"a": {"url": "http://h", "limits": {"max_concurrency": "x"}}}},
     "routes[0].backends.a.limits.max_concurrency"),
    ({"backends": {"a": {"url": "http://h", "health_check": {"path": "healthz"}}}},
     "routes[0].backends.a.health_check.path"),
    ({"backends": {"a": {"url": "http://h", "health_check": {"path": "/h", "interval": 0}}}},
     "routes[0].backends.a.health_check.interval"),
])
def test_config_errors_name_the_key(extra: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_route(**extra))
    assert err.value.path == path, err.value


# -- active health checks -----------------------------------------------------------------------


def test_health_verdicts_take_a_url_out_and_back_never_the_last() -> None:
    o = outliers(2, consecutive_gateway_failure=1)
    assert o.set_healthy(0, False, now=0) and o.pick(0, now=1) == 1
    assert not o.set_healthy(1, False, now=1)  # the last one in stays in
    assert not o.failure(1, "refused", now=1)  # nor is it ejected passively
    assert o.is_ejected(0, now=10_000)  # no ejection time: out until healthy
    assert o.set_healthy(0, True, now=2) and o.pick(0, now=2) == 0
    assert o.ejected_now(2) == 0
    # A passively ejected URL marked unhealthy stays out past its ejection time.
    assert o.failure(0, "refused", now=3) and o.set_healthy(0, False, now=3)
    assert o.is_ejected(0, now=3 + 10_000)


def test_health_thresholds() -> None:
    settings = HealthCheck(path="/h", healthy_threshold=2, unhealthy_threshold=3)
    check = UrlCheck()
    assert [check.record(False, settings) for _ in range(3)] == [None, None, False]
    assert check.record(True, settings) is None
    assert check.record(False, settings) is None  # the streak starts again
    assert [check.record(True, settings) for _ in range(2)] == [None, True]


# -- when a canary's failure may go to live --------------------------------------------------


class _Route:
    def __init__(self, retry_safe: bool) -> None:
        self.retry_safe = retry_safe


class _Plan:
    def __init__(self, retry_safe: bool) -> None:
        self.route = _Route(retry_safe)


@pytest.mark.parametrize(("exc", "method", "retry_safe", "expected"), [
    (UpstreamConnectError("refused"), "POST", False, True),  # nothing was sent
    (UpstreamResetError("reset"), "POST", False, False),  # the canary may have run it
    (UpstreamTimeout("timeout"), "POST", False, False),
    (UpstreamResetError("reset"), "POST", True, True),  # side_effect_free
    (UpstreamTimeout("timeout"), "GET", False, True),  # idempotent
    (UpstreamResetError("reset"), "PUT", False, True),
])
def test_a_canary_failure_falls_back_only_when_resending_is_safe(
        exc: UpstreamError, method: str, retry_safe: bool, expected: bool) -> None:
    assert may_fall_back(_Plan(retry_safe), method, exc) is expected  # type: ignore[arg-type]
