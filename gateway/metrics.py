"""Per-backend request statistics: one cheap object per (route, backend), bound at config time.

The hot path calls `BackendStats.observe()`: a few integer increments into the current
one-second slot and into cumulative totals. Everything else reads from these at its own pace:
the Prometheus collector (cumulative totals, at scrape time), the rollout gates and alarms
(sliding windows over the slots), the dashboard (per-second series). prometheus-client's own
Counter/Histogram objects would cost ~6-11 µs a request with locks; this costs ~1 µs. With the
Redis store, decisions read the sum of every process's slots instead (gateway.cluster.metrics
publishes the completed ones off the hot path); Prometheus reads this process's.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import add

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gateway.histogram import (
    FINE_BOUNDS,
    N_BUCKETS,
    PROM_BOUNDS,
    dense,
    prom_buckets,
    quantile,
)
from gateway.shadow.stats import ShadowStats
from gateway.streaming import StreamStats
from gateway.streaming import families as stream_families

__all__ = ["FINE_BOUNDS", "N_BUCKETS", "PROM_BOUNDS", "dense", "prom_buckets", "quantile"]

WINDOW_SLOTS = 900  # one slot a second: 15 minutes, the dashboard's span
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
ERROR_KINDS = ("refused", "reset", "timeout", "error")


class Slot:
    """One second of one backend's traffic."""

    __slots__ = ("second", "requests", "errors", "latency_sum", "hist", "counters")

    def __init__(self, second: int) -> None:
        self.second = second
        self.requests = 0
        self.errors = 0
        self.latency_sum = 0.0
        self.hist = [0] * N_BUCKETS
        self.counters: dict[str, float] = {}


@dataclass(slots=True)
class WindowSummary:
    """Aggregate of a backend's slots over a window, what gates and alarms judge."""

    seconds: float
    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)
    counters: dict[str, float] = field(default_factory=dict)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def quantile(self, q: float) -> float | None:
        """Latency quantile in seconds (upper bound of the bucket it falls in)."""
        return quantile(self.hist, q)

    def counter(self, name: str) -> float:
        return self.counters.get(name, 0.0)


@dataclass(frozen=True, slots=True)
class Totals:
    """A backend's cumulative numbers (this process's since it started; the cluster's since
    this process began reading them): what the rollout gates difference into windows."""

    requests: int
    errors: int
    latency_sum: float
    hist: tuple[int, ...]
    counters: tuple[tuple[str, float], ...]

    def minus(self, base: Totals, seconds: float) -> WindowSummary:
        counters = dict(self.counters)
        for name, value in base.counters:
            counters[name] = counters.get(name, 0.0) - value
        return WindowSummary(
            seconds=seconds,
            requests=self.requests - base.requests,
            errors=self.errors - base.errors,
            latency_sum=self.latency_sum - base.latency_sum,
            hist=[a - b for a, b in zip(self.hist, base.hist, strict=True)],
            counters=counters,
        )

    def plus(self, other: Totals) -> Totals:
        counters = dict(self.counters)
        for name, value in other.counters:
            counters[name] = counters.get(name, 0.0) + value
        return Totals(self.requests + other.requests, self.errors + other.errors,
                      self.latency_sum + other.latency_sum,
                      tuple(a + b for a, b in zip(self.hist, other.hist, strict=True)),
                      tuple(counters.items()))

    def went_back(self, before: Totals) -> bool:
        """Whether any number is lower than in `before`: the counters were reset, as
        Prometheus' rate() would conclude."""
        if (self.requests < before.requests or self.errors < before.errors
                or self.latency_sum < before.latency_sum):
            return True
        if any(a < b for a, b in zip(self.hist, before.hist, strict=True)):
            return True
        now = dict(self.counters)
        return any(now.get(name, 0.0) < value for name, value in before.counters)


EMPTY = Totals(0, 0, 0.0, (0,) * N_BUCKETS, ())


class BackendStats:
    """Everything measured about one backend of one route, in this process."""

    __slots__ = (
        "route", "backend", "clock", "status_totals", "hist_totals", "latency_sum_total",
        "error_totals", "counter_totals", "upstream_hist_totals", "upstream_sum_total",
        "stream", "_slots", "_current",
    )

    def __init__(self, route: str, backend: str, clock: Callable[[], float] = time.time) -> None:
        self.route = route
        self.backend = backend
        self.clock = clock
        self.status_totals = [0] * 6  # index = status // 100
        self.hist_totals = [0] * N_BUCKETS
        self.latency_sum_total = 0.0
        self.error_totals = dict.fromkeys(ERROR_KINDS, 0)
        self.counter_totals: dict[str, float] = {}
        # Time to the backend's response headers (cumulative only: Prometheus, not windows).
        self.upstream_hist_totals = [0] * N_BUCKETS
        self.upstream_sum_total = 0.0
        # Streamed answers (cumulative; their window numbers are slot counters): streaming.py
        self.stream = StreamStats()
        self._slots: list[Slot | None] = [None] * WINDOW_SLOTS
        self._current = Slot(-1)

    def _slot(self) -> Slot:
        second = int(self.clock())
        slot = self._current
        if slot.second != second:
            slot = Slot(second)
            self._slots[second % WINDOW_SLOTS] = slot
            self._current = slot
        return slot

    def observe(self, status: int, latency: float) -> None:
        """A request answered by the backend (any status) or by the gateway on its behalf."""
        slot = self._slot()
        i = bisect.bisect_left(FINE_BOUNDS, latency)
        slot.requests += 1
        slot.latency_sum += latency
        slot.hist[i] += 1
        self.hist_totals[i] += 1
        self.latency_sum_total += latency
        cls = status // 100
        self.status_totals[cls if 1 <= cls <= 5 else 5] += 1
        if status >= 500:
            slot.errors += 1

    def upstream_error(self, kind: str) -> None:
        self.error_totals[kind] = self.error_totals.get(kind, 0) + 1

    def upstream_time(self, seconds: float) -> None:
        """Time from sending to the backend until its response headers arrived."""
        self.upstream_hist_totals[bisect.bisect_left(FINE_BOUNDS, seconds)] += 1
        self.upstream_sum_total += seconds

    def add(self, name: str, value: float = 1.0) -> None:
        """A named counter (probes: ``output_null``, ``input_missing``, ``label:setosa``...)."""
        counters = self._slot().counters
        counters[name] = counters.get(name, 0.0) + value
        self.counter_totals[name] = self.counter_totals.get(name, 0.0) + value

    def add_many(self, items: Iterable[tuple[str, float]]) -> None:
        """Several named counters at once (one probe run): the slot is looked up once."""
        counters = self._slot().counters
        totals = self.counter_totals
        for name, value in items:
            counters[name] = counters.get(name, 0.0) + value
            totals[name] = totals.get(name, 0.0) + value

    def totals(self) -> Totals:
        """The cumulative numbers now (5xx and anything the gateway answered for the backend
        count as errors)."""
        status = self.status_totals
        return Totals(sum(status), status[5], self.latency_sum_total, tuple(self.hist_totals),
                      tuple(self.counter_totals.items()))

    def recent_requests(self, seconds: int) -> int:
        """Requests observed over the last `seconds` seconds, the current one included (the
        retry budget's denominator: read per retry, not per request)."""
        now_s = int(self.clock())
        slots = self._slots
        total = 0
        for second in range(now_s - seconds + 1, now_s + 1):
            slot = slots[second % WINDOW_SLOTS]
            if slot is not None and slot.second == second:
                total += slot.requests
        return total

    def slot_at(self, second: int) -> Slot | None:
        """The slot of one second, if it is still in the ring and saw anything."""
        slot = self._slots[second % WINDOW_SLOTS]
        return slot if slot is not None and slot.second == second else None

    def put_slot(self, slot: Slot) -> None:
        """Install a whole slot (a mirror of the cluster's sums; never the hot path's own)."""
        self._slots[slot.second % WINDOW_SLOTS] = slot

    def slots(self, seconds: float, now: float | None = None) -> Iterator[Slot]:
        """Slots of the last `seconds` (the current, partial second included)."""
        now_s = int(self.clock() if now is None else now)
        oldest = now_s - max(1, math.ceil(seconds)) + 1
        for slot in self._slots:
            if slot is not None and oldest <= slot.second <= now_s:
                yield slot

    def window(self, seconds: float, now: float | None = None) -> WindowSummary:
        summary = WindowSummary(seconds=seconds)
        hist = summary.hist
        for slot in self.slots(seconds, now):
            summary.requests += slot.requests
            summary.errors += slot.errors
            summary.latency_sum += slot.latency_sum
            if slot.requests:
                hist[:] = map(add, hist, slot.hist)
            for name, value in slot.counters.items():
                summary.counters[name] = summary.counters.get(name, 0.0) + value
        return summary

    def series(self, seconds: int, step: int, now: float | None = None) -> list[WindowSummary]:
        """Per-`step`-second summaries over the last `seconds`, oldest first (dashboard)."""
        now_s = int(self.clock() if now is None else now)
        n = max(1, seconds // step)
        buckets = [WindowSummary(seconds=step) for _ in range(n)]
        start = now_s - n * step + 1
        for slot in self.slots(n * step, now_s):
            b = buckets[(slot.second - start) // step]
            b.requests += slot.requests
            b.errors += slot.errors
            b.latency_sum += slot.latency_sum
            if slot.requests:
                b.hist[:] = map(add, b.hist, slot.hist)
            for name, value in slot.counters.items():
                b.counters[name] = b.counters.get(name, 0.0) + value
        return buckets


class Recorder:
    """Owns every metric of one gateway process and its Prometheus registry.

    It enumerates every number the process measures: the `BackendStats` of each (route,
    backend) and the `ShadowStats` of each (route, shadow backend). The cluster metrics
    publisher reads them from here."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self._stats: dict[tuple[str, str], BackendStats] = {}
        self._shadow: dict[tuple[str, str], ShadowStats] = {}
        self.in_flight: dict[str, int] = {}
        # By route: clients that left before their answer began (not the backend's errors).
        self.client_aborts: dict[str, int] = {}
        # By (route, backend): requests answered 503 upstream_busy because no connection to
        # the backend came free within the connect timeout (not the backend's errors).
        self.pool_timeouts: dict[tuple[str, str], int] = {}
        self.gauges: dict[str, Callable[[], Iterable[Metric]]] = {}
        self.registry.register(_Collector(self))
        ProcessCollector(namespace="modelgate", registry=self.registry)

    def pool_timeout(self, route: str, backend: str) -> None:
        key = (route, backend)
        self.pool_timeouts[key] = self.pool_timeouts.get(key, 0) + 1

    def stats(self, route: str, backend: str) -> BackendStats:
        key = (route, backend)
        found = self._stats.get(key)
        if found is None:
            found = self._stats[key] = BackendStats(route, backend, self.clock)
        return found

    def all_stats(self) -> list[BackendStats]:
        return list(self._stats.values())

    def shadow_stats(self, route: str, backend: str, window: float) -> ShadowStats:
        """The shadow comparison tallies of (route, shadow backend), created on first use
        with a ring of `window` seconds."""
        key = (route, backend)
        found = self._shadow.get(key)
        if found is None:
            found = self._shadow[key] = ShadowStats(route, backend, window, self.clock)
        return found

    def find_shadow_stats(self, route: str, backend: str) -> ShadowStats | None:
        return self._shadow.get((route, backend))

    def all_shadow_stats(self) -> list[ShadowStats]:
        return list(self._shadow.values())

    def add_collector(self, name: str, collect: Callable[[], Iterable[Metric]]) -> None:
        """Extra metric families computed at scrape time (shadow, rollout, probes, loop lag)."""
        self.gauges[name] = collect


# Probe counters (BackendStats.add names) exposed as Prometheus counters by route and backend.
# Alert rules are written against these names: keep them stable.
PROBE_COUNTERS = (
    ("input_total", "modelgate_input_requests", "Requests whose input was probed."),
    ("input_values", "modelgate_input_values", "Input values checked for being missing."),
    ("input_missing", "modelgate_input_missing_values",
     "Input values that were null, NaN or absent."),
    ("input_schema_errors", "modelgate_input_schema_errors",
     "Probed requests whose body was not JSON or lacked a required path."),
    ("output_total", "modelgate_output_responses", "Successful responses whose output was probed."),
    ("output_null", "modelgate_output_null",
     "Probed responses whose prediction was null, empty or absent."),
    ("output_error", "modelgate_output_error_bodies",
     "Probed responses that carried an error (status >= 400 or an error field)."),
)
LABEL_PREFIX = "label:"


class _Collector:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        rec = self.recorder
        requests = CounterMetricFamily(
            "modelgate_requests", "Requests answered, by route, backend and status class.",
            labels=["route", "backend", "status_class"],
        )
        duration = HistogramMetricFamily(
            "modelgate_request_duration_seconds",
            "Time from request received to response sent (gateway total).",
            labels=["route", "backend"],
        )
        upstream = HistogramMetricFamily(
            "modelgate_upstream_duration_seconds",
            "Time from sending to the backend until its response headers arrived.",
            labels=["route", "backend"],
        )
        errors = CounterMetricFamily(
            "modelgate_upstream_errors", "Backend calls that failed, by kind.",
            labels=["route", "backend", "kind"],
        )
        probes = [
            (key, CounterMetricFamily(name, doc, labels=["route", "backend"]))
            for key, name, doc in PROBE_COUNTERS
        ]
        labels_family = CounterMetricFamily(
            "modelgate_output_labels", "Predicted labels seen by the output probes.",
            labels=["route", "backend", "label"],
        )
        for stats in rec.all_stats():
            labels = [stats.route, stats.backend]
            for cls, label in enumerate(STATUS_CLASSES, start=1):
                n = stats.status_totals[cls]
                if n:
                    requests.add_metric([*labels, label], n)
            duration.add_metric(labels, prom_buckets(stats.hist_totals), stats.latency_sum_total)
            if any(stats.upstream_hist_totals):
                upstream.add_metric(labels, prom_buckets(stats.upstream_hist_totals),
                                    stats.upstream_sum_total)
            for kind, n in stats.error_totals.items():
                errors.add_metric([*labels, kind], n)
            totals = stats.counter_totals
            if totals:
                for key, family in probes:
                    if key in totals:
                        family.add_metric(labels, totals[key])
                for key, value in list(totals.items()):
                    if key.startswith(LABEL_PREFIX):
                        labels_family.add_metric([*labels, key[len(LABEL_PREFIX):]], value)
        in_flight = GaugeMetricFamily(
            "modelgate_in_flight_requests", "Requests being proxied now.", labels=["route"]
        )
        for route, n in rec.in_flight.items():
            in_flight.add_metric([route], n)
        aborts = CounterMetricFamily(
            "modelgate_client_aborts",
            "Clients that left before their answer began (mid-upload, typically), by route.",
            labels=["route"],
        )
        for route, n in rec.client_aborts.items():
            aborts.add_metric([route], n)
        pool_timeouts = CounterMetricFamily(
            "modelgate_upstream_pool_timeouts",
            "Requests answered 503 upstream_busy: no connection to the backend came free "
            "within the connect timeout (the gateway's queue, not a backend error).",
            labels=["route", "backend"],
        )
        for (route, backend), n in rec.pool_timeouts.items():
            pool_timeouts.add_metric([route, backend], n)
        yield requests
        yield duration
        yield upstream
        yield errors
        yield in_flight
        yield aborts
        yield pool_timeouts
        for _, family in probes:
            yield family
        yield labels_family
        yield from stream_families(rec.all_stats())
        for collect in list(rec.gauges.values()):
            yield from collect()
