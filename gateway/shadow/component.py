"""Shadow mode: mirror a sample of a route's requests to another backend and compare.

How a copy travels, and why the client never notices:

1. The proxy hands each finished exchange to `ShadowTap` *after* the client has its response.
   The tap decides (sticky by the route's user key, like the canary split) whether to mirror,
   and puts the exchange on the route's bounded queue with `put_nowait`: it never awaits.
   A full queue (copies or body bytes) means the copy is dropped and counted.
2. A fixed pool of sender tasks per route takes copies off the queue and sends them through
   the shadow backend's own `Upstream` pool, marked ``X-Modelgate-Shadow: 1``, with the same
   ``X-Request-ID`` and the shadow's own read timeout (``shadow.timeout``).
3. The sender extracts both predictions, compares them (gateway.shadow.compare), records the
   outcome in the per-second tallies (gateway.shadow.stats) and, when configured, queues a
   JSON line for the comparison log (gateway.shadow.log).

Each route has its own queue and senders, so a slow shadow on one route cannot cause drops on
another. A shadow that refuses connections BREAKER_FAILURES times in a row is not dialled for
BREAKER_COOLDOWN seconds (copies are dropped, counted as ``shadow_down``): a failed connect costs
the gateway about as much CPU as a proxied request. Changing the shadow drops the copies still
queued for the old one.

Reports: ``GET /admin/routes/{route}/shadow``, Prometheus ``modelgate_shadow_*``,
``modelgate shadow-report ROUTE``, and `agreement()` for the rollout gates. The tallies belong
to the `Recorder`; reports and agreement read them through `gateway.metrics` (with the Redis
store: the sum over every process), Prometheus reads this process's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gateway.component import Host
from gateway.config import RouteConfig, Timeouts
from gateway.errors import (
    ConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.jsonpath import MISSING
from gateway.metrics import dense, prom_buckets
from gateway.routing import Backend, Exchange, Tap, in_sample, threshold
from gateway.shadow.compare import Comparator, judge
from gateway.shadow.config import ShadowConfig
from gateway.shadow.log import ComparisonLog
from gateway.shadow.stats import OUTCOMES, ShadowStats
from gateway.state import RouteState
from gateway.upstream import Headers

if TYPE_CHECKING:
    from gateway.cluster.metrics import ShadowView

log = logging.getLogger("modelgate.shadow")

SHADOW_HEADER = "X-Modelgate-Shadow"
_SKIP_HEADERS = frozenset({SHADOW_HEADER.lower().encode(), b"expect"})
DROP_WARNING_EVERY = 60.0
# A shadow refusing connections is skipped for a while instead of being dialled per copy:
# a failed connect costs about as much CPU as proxying a request.
BREAKER_FAILURES = 5
BREAKER_COOLDOWN = 1.0


class _Lane:
    """One route's bounded queue of copies and the senders draining it."""

    __slots__ = ("route", "config", "queue", "queued_bytes", "tasks", "timeouts",
                 "comparator", "log", "last_warning", "target", "failures", "down_until")

    def __init__(self, route: RouteConfig, config: ShadowConfig) -> None:
        self.route = route.name
        self.config = config
        self.queue: asyncio.Queue[tuple[ShadowTap, Exchange, int]] = asyncio.Queue(config.queue)
        self.queued_bytes = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.timeouts = Timeouts(connect=min(route.timeouts.connect, config.timeout),
                                 read=config.timeout)
        self.comparator = Comparator(config.compare)
        self.log: ComparisonLog | None = None
        self.last_warning = 0.0
        self.target: str | None = None  # the shadow backend copies are queued for
        self.failures = 0  # refused connections in a row
        self.down_until = 0.0  # monotonic time until which copies are not sent

    def shadow_down(self) -> bool:
        return self.down_until > 0 and time.monotonic() < self.down_until

    def retarget(self, target: str | None) -> None:
        """The shadow changed: copies queued for another backend are dropped (and counted),
        so a slow former shadow cannot keep the queue full for the new one."""
        if target == self.target:
            return
        self.target = target
        self.failures = 0
        self.down_until = 0.0
        kept = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item[0].backend.name == target:
                kept.append(item)
            else:
                item[0].stats.drop()
                self.queued_bytes -= item[2]
        for item in kept:
            self.queue.put_nowait(item)


class ShadowTap:
    """Decides per exchange whether to mirror it; bound to one routing state."""

    __slots__ = ("needs_request_body", "needs_response_body", "owner", "lane", "backend",
                 "threshold", "salt", "stats")

    def __init__(self, owner: Shadowing, lane: _Lane, backend: Backend, sample: float,
                 salt: bytes, stats: ShadowStats) -> None:
        self.needs_request_body = True
        self.needs_response_body = True
        self.owner = owner
        self.lane = lane
        self.backend = backend
        self.threshold = threshold(sample)
        self.salt = salt
        self.stats = stats

    def __call__(self, exchange: Exchange) -> None:
        if exchange.backend == self.backend.name:
            return  # the shadow served this request itself (override header, canary)
        if in_sample(self.threshold, self.salt, exchange.sticky_key):
            self.owner.offer(self, exchange)


class Shadowing:
    name = "shadow"

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        self._lanes: dict[str, _Lane] = {
            route.name: _Lane(route, route.shadow or ShadowConfig())
            for route in gateway.config.routes
        }
        self._last_backend: dict[str, str] = {}
        self._logs: dict[str, ComparisonLog] = {}
        for route in gateway.config.routes:
            cfg = route.shadow
            if cfg is not None and cfg.log is not None:
                key = str(cfg.log.path)
                found = self._logs.get(key)
                if found is None:  # routes naming the same file share one writer
                    found = self._logs[key] = ComparisonLog(cfg.log)
                self._lanes[route.name].log = found
        gateway.recorder.add_collector("shadow", self._collect)
        gateway.hooks.shadow_agreement = self.agreement
        gateway.hooks.route_details.append(self.describe_route)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        for path, writer in self._logs.items():
            try:
                await writer.start()
            except OSError as exc:
                await self.stop()
                raise ConfigError("shadow.log.path", f"cannot use {path}: {exc}") from None
        loop = asyncio.get_running_loop()
        for lane in self._lanes.values():
            for i in range(lane.config.senders):
                lane.tasks.append(loop.create_task(self._sender(lane),
                                                   name=f"shadow-sender:{lane.route}:{i}"))

    async def stop(self) -> None:
        tasks = [t for lane in self._lanes.values() for t in lane.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes.values():
            lane.tasks.clear()
            while not lane.queue.empty():  # copies not sent by now never will be
                tap, _, _ = lane.queue.get_nowait()
                tap.stats.drop()
            lane.queued_bytes = 0
        for writer in self._logs.values():
            await writer.stop()

    # -- the hot path --------------------------------------------------------------------------
    def tap(self, route: RouteConfig, state: RouteState) -> Tap | None:
        lane = self._lanes.get(route.name)
        static = self.gateway.static.get(route.name)
        if lane is None or static is None:
            return None
        backend = static.backends.get(state.shadow) if state.shadow else None
        if backend is None or state.shadow_sample <= 0:
            lane.retarget(None)
            return None
        lane.retarget(backend.name)
        self._last_backend[route.name] = backend.name
        stats = self._stats_for(route.name, backend.name)
        return ShadowTap(self, lane, backend, state.shadow_sample, static.shadow_salt, stats)

    def offer(self, tap: ShadowTap, exchange: Exchange) -> None:
        """Queue a copy, or drop and count it; never waits."""
        lane = tap.lane
        size = len(exchange.request_body or b"") + len(exchange.response_body or b"")
        if tap.backend.name != lane.target:  # began before the shadow changed: not wanted
            tap.stats.drop()
            return
        if lane.down_until and lane.shadow_down():
            tap.stats.drop(shadow_down=True)
            return
        if lane.queued_bytes + size > lane.config.queue_bytes or lane.queue.full():
            tap.stats.drop()
            self._warn(lane, f"shadow queue of route {lane.route} is full: dropping copies "
                             f"(shadow {tap.backend.name} is slow)")
            return
        lane.queue.put_nowait((tap, exchange, size))
        lane.queued_bytes += size

    @staticmethod
    def _warn(lane: _Lane, message: str) -> None:
        """At most one warning a minute per route: drops come in floods."""
        now = time.monotonic()
        if now - lane.last_warning > DROP_WARNING_EVERY:
            lane.last_warning = now
            log.warning(message)

    # -- sending and comparing -----------------------------------------------------------------
    async def _sender(self, lane: _Lane) -> None:
        queue = lane.queue
        while True:
            tap, exchange, size = await queue.get()
            lane.queued_bytes -= size
            try:
                await self._mirror(lane, tap, exchange)
            except Exception:  # CancelledError is not an Exception: stop() still works
                log.exception("shadow copy on route %s failed", lane.route)

    async def _mirror(self, lane: _Lane, tap: ShadowTap, ex: Exchange) -> None:
        if lane.down_until and lane.shadow_down():
            tap.stats.drop(shadow_down=True)
            return
        headers: Headers = [(k, v) for k, v in ex.request_headers
                            if k.lower() not in _SKIP_HEADERS]
        headers.append((SHADOW_HEADER.encode(), b"1"))
        status: int | None = None
        body: bytes | None = None
        shadow_headers: Headers = []
        error: str | None = None
        started = time.perf_counter()
        try:
            resp = await tap.backend.upstream().send(
                ex.method, ex.target, headers, ex.request_body, lane.timeouts)
            try:
                body = await resp.read()
            finally:
                if body is None:
                    resp.close()
            status = resp.status
            shadow_headers = resp.headers
            lane.failures = 0
            lane.down_until = 0.0
        except UpstreamTimeout:
            error = "timeout"
        except UpstreamConnectError as exc:
            error = exc.kind
            lane.failures += 1
            if lane.failures >= BREAKER_FAILURES:
                lane.down_until = time.monotonic() + BREAKER_COOLDOWN
                self._warn(lane, f"shadow {tap.backend.name} of route {lane.route} refuses "
                                 f"connections ({exc}): copies are dropped, retrying every "
                                 f"{BREAKER_COOLDOWN:g}s")
        except UpstreamError as exc:
            error = exc.kind
        shadow_latency = time.perf_counter() - started

        outcome, comparison, live_pred, shadow_pred = await judge(
            lane.comparator, ex.status, ex.response_body, _content_type(ex.response_headers),
            status, body, _content_type(shadow_headers), error)
        answered = error is None
        tap.stats.record(outcome, ex.latency if answered else None,
                         shadow_latency if answered else None, comparison)

        if lane.log is not None:
            cfg = lane.config.log
            assert cfg is not None
            line: dict[str, Any] = {
                "time": time.time(),
                "request_id": ex.request_id,
                "route": lane.route,
                "live_backend": ex.backend,
                "shadow_backend": tap.backend.name,
                "method": ex.method,
                "target": ex.target,
                "live_status": ex.status,
                "shadow_status": status,
                "shadow_error": error,
                "live_latency_ms": round(ex.latency * 1000, 3),
                "shadow_latency_ms": round(shadow_latency * 1000, 3),
                "outcome": outcome,
                "agree": comparison.agree if comparison is not None else None,
                "live_prediction": None if live_pred is MISSING else live_pred,
                "shadow_prediction": None if shadow_pred is MISSING else shadow_pred,
            }
            if not cfg.redact_bodies:
                limit = cfg.body_limit
                line["request_body"] = _body_text(ex.request_body, limit)
                line["live_body"] = _body_text(ex.response_body, limit)
                line["shadow_body"] = _body_text(body, limit)
            try:
                encoded = orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
            except TypeError:  # a prediction orjson cannot encode (e.g. a huge integer)
                line["live_prediction"] = repr(line["live_prediction"])
                line["shadow_prediction"] = repr(line["shadow_prediction"])
                encoded = orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
            lane.log.write(encoded)

    # -- reading -------------------------------------------------------------------------------
    def _stats_for(self, route: str, backend: str) -> ShadowStats:
        """This process's tallies (the recorder owns them, so the cluster publisher sees
        them too)."""
        return self.gateway.recorder.shadow_stats(route, backend,
                                                  self._lanes[route].config.window)

    def _stats_of(self, route: str, backend: str | None) -> ShadowView | None:
        """What reports and gates read (with the Redis store: the sum over every process):
        `backend`'s, else the current shadow's, else the last one used."""
        if backend is None:
            state = self.gateway.control.state(route)
            backend = state.shadow or self._last_backend.get(route)
        if backend is None:
            return None
        return self.gateway.metrics.shadow(route, backend)

    def agreement(self, route: str, seconds: float) -> tuple[int, float | None]:
        """(pairs compared, agreement rate or None) over the last `seconds` of the route's
        current (else last) shadow; the rate is per compared element (per row of a batch).
        For the rollout gates."""
        stats = self._stats_of(route, None)
        if stats is None:
            return 0, None
        return stats.agreement(seconds)

    def report(self, route: str, seconds: float | None = None,
               backend: str | None = None) -> dict[str, Any]:
        """The report behind ``GET /admin/routes/{route}/shadow``: over the last `seconds`
        (at most the route's ``shadow.window``; default all of it), of `backend` (one of the
        route's; default the current or last shadow)."""
        state = self.gateway.control.state(route)
        lane = self._lanes[route]
        shadow_cfg = lane.config
        stats = self._stats_of(route, backend)
        with_text = shadow_cfg.compare.text.mode == "similarity"
        span = shadow_cfg.window if seconds is None else seconds
        window = total = None
        if stats is not None:
            window = {"seconds": span, **stats.window_tally(span).summary(with_text)}
            total = {"since": stats.since, **stats.total.summary(with_text)}
        writer = lane.log
        return {
            "route": route,
            "live": state.live,
            "shadow": ({"backend": state.shadow, "sample": state.shadow_sample}
                       if state.shadow else None),
            "backend": stats.backend if stats is not None else (backend or state.shadow),
            "timeout": shadow_cfg.timeout,
            "compare": shadow_cfg.compare.describe(),
            "queue": {"depth": lane.queue.qsize(), "capacity": shadow_cfg.queue,
                      "bytes": lane.queued_bytes, "max_bytes": shadow_cfg.queue_bytes,
                      "senders": shadow_cfg.senders},
            "log": ({"path": str(writer.path), "written": writer.written,
                     "dropped": writer.dropped, "queued": writer.queued,
                     "redact_bodies": writer.config.redact_bodies}
                    if writer is not None else None),
            "window": window,
            "total": total,
        }

    def window(self, route: str) -> float:
        """The longest window the route's shadow reports cover (``shadow.window``)."""
        return self._lanes[route].config.window

    def describe_route(self, name: str) -> dict[str, Any]:
        stats = self._stats_of(name, None)
        if stats is None:
            return {}
        tally = stats.window_tally()
        o = tally.outcomes
        return {"shadow_report": {
            "backend": stats.backend, "window_seconds": stats.window,
            "compared": tally.compared, "agreement_rate": tally.agreement_rate,
            "dropped": tally.dropped, "shadow_errors": o["shadow_error"],
            "shadow_timeouts": o["shadow_timeout"],
        }}

    # -- Prometheus ----------------------------------------------------------------------------
    def _collect(self) -> list[Metric]:
        requests = CounterMetricFamily(
            "modelgate_shadow_requests", "Mirrored requests by outcome (agree, disagree, "
            "live_error, shadow_error, shadow_timeout, unparsed).",
            labels=["route", "backend", "outcome"])
        dropped = CounterMetricFamily(
            "modelgate_shadow_dropped", "Copies not sent: reason=queue (full, shadow changed, "
            "shutdown) or shadow_down (refusing connections, in back-off).",
            labels=["route", "backend", "reason"])
        elements = CounterMetricFamily(
            "modelgate_shadow_elements", "Compared prediction elements (rows, labels, values).",
            labels=["route", "backend", "result"])
        confusion = CounterMetricFamily(
            "modelgate_shadow_confusion", "Label pairs: live label x shadow label.",
            labels=["route", "backend", "live", "shadow"])
        agreement = GaugeMetricFamily(
            "modelgate_shadow_agreement_ratio",
            "Share of compared elements that agree, over the route's shadow window.",
            labels=["route", "backend"])
        delta = GaugeMetricFamily(
            "modelgate_shadow_numeric_delta_max",
            "Largest absolute numeric difference over the route's shadow window.",
            labels=["route", "backend"])
        latency = HistogramMetricFamily(
            "modelgate_shadow_latency_seconds",
            "Latency of mirrored pairs: the live request (gateway total) and the shadow call.",
            labels=["route", "backend", "side"])
        depth = GaugeMetricFamily("modelgate_shadow_queue_depth", "Copies waiting for a sender.",
                                  labels=["route"])
        log_lines = CounterMetricFamily(
            "modelgate_shadow_log_lines", "Comparison log lines, written or dropped.",
            labels=["file", "result"])
        for stats in self.gateway.recorder.all_shadow_stats():  # this process's: Prometheus
            total = stats.total
            labels = [stats.route, stats.backend]
            for outcome in OUTCOMES:
                requests.add_metric([*labels, outcome], total.outcomes[outcome])
            dropped.add_metric([*labels, "queue"], total.dropped - total.dropped_down)
            dropped.add_metric([*labels, "shadow_down"], total.dropped_down)
            elements.add_metric([*labels, "agree"], total.elements_agree)
            elements.add_metric([*labels, "disagree"], total.elements - total.elements_agree)
            for (live, shadow), n in total.confusion.items():
                confusion.add_metric([*labels, live, shadow], n)
            window = stats.window_tally()
            rate = window.agreement_rate
            if rate is not None:
                agreement.add_metric(labels, rate)
            if window.numbers:
                delta.add_metric(labels, window.delta_max)
            for side, hist, total_sum in (("live", total.live_hist, total.live_sum),
                                          ("shadow", total.shadow_hist, total.shadow_sum)):
                latency.add_metric([*labels, side], prom_buckets(dense(hist)), total_sum)
        for name, lane in self._lanes.items():
            depth.add_metric([name], lane.queue.qsize())
        for path, writer in self._logs.items():
            log_lines.add_metric([path, "written"], writer.written)
            log_lines.add_metric([path, "dropped"], writer.dropped)
        return [requests, dropped, elements, confusion, agreement, delta, latency, depth,
                log_lines]


def _content_type(headers: Headers) -> str | None:
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            return value.decode("latin-1")
    return None


def _body_text(body: bytes | None, limit: int) -> str | None:
    if body is None:
        return None
    if len(body) > limit:
        return body[:limit].decode("utf-8", "replace") + "…(truncated)"
    return body.decode("utf-8", "replace")
