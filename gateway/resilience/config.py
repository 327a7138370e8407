"""Config sections of the fault handling (a leaf: only `gateway.schema`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import model_validator as model_check
from pydantic.dataclasses import dataclass

from gateway.schema import MODEL, UrlPath, duration, integer, number, problem


@dataclass(frozen=True, slots=True, config=MODEL)
class OutlierDetection:
    """Passive outlier ejection of the URLs of one backend (Envoy's semantics).

    A URL is ejected after `consecutive_5xx` answers in a row with a 5xx status (a failed
    connection, reset or timeout counts as one), or after `consecutive_gateway_failure` in
    a row that were gateway failures (refused, reset, timeout, or a 502/503/504 status).
    It is out for `base_ejection_time` × the number of times it was ejected (at most
    `max_ejection_time`), then comes back. At most `max_ejection_percent` of the URLs are
    out at once, and never the last one. 0 turns a trigger off."""

    consecutive_5xx: Annotated[int, integer(0, 1000)] = 5
    consecutive_gateway_failure: Annotated[int, integer(0, 1000)] = 3
    base_ejection_time: Annotated[float, duration(positive=True)] = 30.0
    max_ejection_time: Annotated[float, duration(positive=True)] = 300.0
    max_ejection_percent: Annotated[float, number(0, 100)] = 50.0

    @model_check(mode="after")
    def _times(self) -> OutlierDetection:
        if self.max_ejection_time < self.base_ejection_time:
            raise problem("must be at least base_ejection_time", "max_ejection_time")
        return self


@dataclass(frozen=True, slots=True, config=MODEL)
class HealthCheck:
    """Active health checks of a backend's URLs: ``GET path`` every `interval`; a URL that
    fails `unhealthy_threshold` checks in a row (no answer within `timeout`, or a status
    other than 2xx) gets no traffic until it passes `healthy_threshold` in a row. Never all
    URLs: the last one in stays in. Each gateway process checks on its own."""

    path: UrlPath
    interval: Annotated[float, duration(positive=True)] = 5.0
    timeout: Annotated[float, duration(positive=True)] = 1.0
    healthy_threshold: Annotated[int, integer(1, 100)] = 2
    unhealthy_threshold: Annotated[int, integer(1, 100)] = 3


@dataclass(frozen=True, slots=True, config=MODEL)
class RetryBudget:
    """Retries (to another URL of the backend, or a canary's fallback onto live) sent to a
    backend over the last 10 s may be at most `percent` of the requests it answered in
    that time, or `min_retries`, whichever is more."""

    percent: Annotated[float, number(0, 100)] = 25.0
    min_retries: Annotated[int, integer(0, 1_000_000)] = 10


@dataclass(frozen=True, slots=True, config=MODEL)
class Limits:
    """At most `max_concurrency` requests in flight (this process); beyond it the gateway
    answers 503 with Retry-After at once, nothing waits in a queue."""

    max_concurrency: Annotated[int, integer(1, 1_000_000)]
    retry_after: Annotated[int, integer(0, 3600)] = 1  # seconds, the Retry-After header


__all__ = ["HealthCheck", "Limits", "OutlierDetection", "RetryBudget"]
