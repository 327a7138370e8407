"""Prometheus families of the fault handling, computed at scrape time from the state the
hot path keeps (ejections, retries, budget refusals, overload refusals)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.resilience.budget import RetryBudget
from gateway.resilience.limits import Gate
from gateway.resilience.outlier import Outliers


class _Backend(Protocol):
    name: str
    outliers: Outliers | None
    gate: Gate | None
    budget: RetryBudget | None


class _Route(Protocol):
    @property
    def backends(self) -> Mapping[str, _Backend]: ...

    @property
    def gate(self) -> Gate | None: ...


def collect(routes: Mapping[str, _Route], overload_backend_labels: bool = True
            ) -> Iterator[Metric]:
    ejections = CounterMetricFamily(
        "modelgate_outlier_ejections", "URLs ejected from a backend as outliers.",
        labels=["route", "backend", "url"])
    ejected = GaugeMetricFamily(
        "modelgate_outlier_ejected_urls", "URLs of a backend ejected right now.",
        labels=["route", "backend"])
    retries = CounterMetricFamily(
        "modelgate_retries", "Retries sent to a backend (another URL, or a canary's fallback "
        "onto live).", labels=["route", "backend"])
    exhausted = CounterMetricFamily(
        "modelgate_retry_budget_exhausted", "Retries not sent: the backend's budget was spent.",
        labels=["route", "backend"])
    overload = CounterMetricFamily(
        "modelgate_overload_rejections", "Requests refused with 503 over a concurrency limit.",
        labels=["route", "scope", "backend"])
    now = time.monotonic()
    for route_name, route in routes.items():
        gate = route.gate
        if gate is not None:
            overload.add_metric([route_name, "route", ""], gate.rejected)
        for backend in _unique(route.backends.values()):
            labels = [route_name, backend.name]
            outliers = backend.outliers
            if outliers is not None:
                for health in outliers.urls:
                    ejections.add_metric([*labels, health.url], health.total_ejections)
                ejected.add_metric(labels, outliers.ejected_now(now))
            if backend.budget is not None:
                retries.add_metric(labels, backend.budget.retried)
                exhausted.add_metric(labels, backend.budget.exhausted)
            if backend.gate is not None:
                overload.add_metric([route_name, "backend", backend.name], backend.gate.rejected)
    yield ejections
    yield ejected
    yield retries
    yield exhausted
    yield overload


def _unique(backends: Iterable[_Backend]) -> list[_Backend]:
    return list({id(b): b for b in backends}.values())


__all__ = ["collect"]
