"""The monitoring component: probes tap, drift, alarms, loop-lag monitor, extra metrics.

Hot path: a route with a ``probes:`` section gets one `RouteProbes` tap (built once, reused
across routing-state changes); a route without gets no tap and pays nothing. Everything else
runs off the hot path: an evaluation task every `interval` seconds judges the alarm rules over
the per-backend windows (and takes the automatic drift baselines), a second task measures
event-loop lag, and the Prometheus families are computed at scrape time. Alarms, drift and the
probe summaries read `gateway.metrics` (with the Redis store: the sum over every process);
the Prometheus families stay this process's own.

Run-time alarm thresholds live in the store (``alarm/<name>``, compare-and-set) so every
replica applies the same one; each change is an audit event. So do the drift baselines
(``baseline/<route>``). Only the controller lease holder evaluates alarms and takes the
automatic baselines; it writes where every alarm stands (``alarm-state``) after each tick that
changed anything, and every other process shows that (dashboard, API, CLI).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from gateway.cluster.metrics import LocalMetrics, MetricsSource
from gateway.component import Host
from gateway.config import RouteConfig
from gateway.errors import (
    Conflict,
    LeaseLost,
    NotFound,
    StoreError,
    VersionConflict,
)
from gateway.metrics import WindowSummary
from gateway.monitoring.alarms import (
    FIRING,
    AlarmStatus,
    advance,
    breaches,
    metric_value,
    worst,
)
from gateway.monitoring.drift import FEATURE, LABEL, SCORE, Baseline, compare, families
from gateway.monitoring.probes import RouteProbes, cumulative_buckets
from gateway.routing import Tap
from gateway.schema import format_duration
from gateway.state import RouteState
from gateway.tasks import cancel_and_wait

log = logging.getLogger("modelgate.monitoring")
ALARM_KEY = "alarm/"
ALARM_STATE_KEY = "alarm-state"
BASELINE_KEY = "baseline/"
_STATUS_FIELDS = ("state", "since", "value", "backend", "samples", "last_value", "last_backend")


class _StoredThreshold(BaseModel):
    """``alarm/<name>``: a run-time threshold (null: back to the config's)."""

    model_config = ConfigDict(strict=True)
    threshold: float | None = None


class _StoredStatus(BaseModel):
    """One alarm in ``alarm-state``: where the lease holder's evaluation left it."""

    model_config = ConfigDict(strict=True)
    state: str = "ok"
    since: float = 0.0
    value: float | None = None
    backend: str | None = None
    samples: float = 0.0
    last_value: float | None = None
    last_backend: str | None = None


_THRESHOLD_DOC = TypeAdapter(_StoredThreshold)
_STATES_DOC = TypeAdapter(dict[str, _StoredStatus])
CAS_ATTEMPTS = 20
LAG_HISTORY = 120  # samples kept for the recent maximum (a minute at the default interval)


class _Windows:
    """Window summaries computed at most once per (route, backend, seconds) in one tick.

    Windows end `metrics.lag` before `now`: the cluster's current second is not published
    before it is over, so its windows end at the last completed one."""

    __slots__ = ("metrics", "now", "_cache")

    def __init__(self, metrics: MetricsSource, now: float) -> None:
        self.metrics = metrics
        self.now = now - metrics.lag
        self._cache: dict[tuple[str, str, float], WindowSummary] = {}

    def get(self, route: str, backend: str, seconds: float) -> WindowSummary:
        key = (route, backend, seconds)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self.metrics.backend(route, backend).window(
                seconds, self.now
            )
        return found


class Monitoring:
    name = "monitoring"

    def __init__(self, gateway: Host, *, interval: float = 1.0,
                 lag_interval: float = 0.5) -> None:
        self.gateway = gateway
        self.recorder = gateway.recorder
        # Prometheus stays per process (it sums across pods); decisions read gateway.metrics.
        self._local = LocalMetrics(gateway.recorder)
        self.clock = gateway.clock
        self.interval = interval
        self.lag_interval = lag_interval
        now = self.clock()
        self._started = now
        self._probes: dict[str, RouteProbes] = {}
        self._alarms: dict[str, AlarmStatus] = {
            rule.name: AlarmStatus(rule, rule.threshold, since=now)
            for rule in gateway.config.alarms
        }
        self._baselines: dict[str, Baseline] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.loop_lag = 0.0
        self._lag_recent: deque[float] = deque(maxlen=LAG_HISTORY)
        self.recorder.add_collector("monitoring", self._collect)
        self._published: dict[str, Any] | None = None  # the alarm-state doc last written
        # Another holder may have written since: a new term starts by writing it again.
        gateway.lease.on_change(lambda held: setattr(self, "_published", None))
        gateway.store.watch(self._on_store_change)
        gateway.store.on_reset(self._reseed)
        gateway.hooks.firing_alarms = self.firing_alarms
        gateway.hooks.alarms = self.alarms_view
        gateway.hooks.route_details.append(self.describe_route)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = self.clock()
        store = self.gateway.store
        for prefix in (ALARM_KEY, BASELINE_KEY, ALARM_STATE_KEY):
            for key, (doc, version) in (await store.read_all(prefix)).items():
                self._on_store_change(key, doc, version)
        self._tasks = [
            asyncio.create_task(self._evaluate_loop(), name="modelgate-monitoring-alarms"),
            asyncio.create_task(self._lag_loop(), name="modelgate-monitoring-loop-lag"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)

    async def _evaluate_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.gateway.lease.held:
                continue  # another process evaluates; its results arrive as alarm-state
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except StoreError as exc:
                log.warning("alarm evaluation held: %s", exc, extra={"event": "alarm_error"})
            except Exception:
                log.exception("alarm evaluation failed", extra={"event": "alarm_error"})

    async def _lag_loop(self) -> None:
        """How late the loop wakes a sleeper: the delay every request sees on top of its own."""
        loop = asyncio.get_running_loop()
        interval = self.lag_interval
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - started - interval)
            self.loop_lag = lag
            self._lag_recent.append(lag)

    @property
    def loop_lag_max(self) -> float:
        return max(self._lag_recent, default=0.0)

    # -- the tap -------------------------------------------------------------------------------
    def tap(self, route: RouteConfig, state: RouteState) -> Tap | None:
        return self._route_probes(route)

    def _route_probes(self, route: RouteConfig) -> RouteProbes | None:
        if route.probes is None:
            return None
        found = self._probes.get(route.name)
        if found is None:
            found = self._probes[route.name] = RouteProbes(route, route.probes, self.recorder)
        return found

    def probes(self, route: str) -> RouteProbes | None:
        """The route's probes (None if it has none); `NotFound` for an unknown route."""
        return self._route_probes(self.gateway.control.route_config(route))

    # -- alarms --------------------------------------------------------------------------------
    async def tick(self, now: float | None = None) -> None:
        """One evaluation: automatic baselines, then every alarm rule."""
        now = self.clock() if now is None else now
        await self._auto_baselines(now)
        windows = _Windows(self.gateway.metrics, now)
        for status in list(self._alarms.values()):
            before = status.state
            change = self._evaluate(status, windows, now)
            if change is not None:
                await self._announce(status, change, before)
        await self._publish_states()

    async def _publish_states(self) -> None:
        """Tell the other processes where every alarm stands (only when something moved)."""
        doc = {name: {f: getattr(s, f) for f in _STATUS_FIELDS}
               for name, s in self._alarms.items()}
        if doc == self._published or not self._alarms:
            return
        store = self.gateway.store
        found = await store.read(ALARM_STATE_KEY)
        try:
            await store.write(ALARM_STATE_KEY, doc, found[1] if found else 0,
                              fence=self.gateway.lease.fence)
        except (VersionConflict, LeaseLost):
            return  # another controller wrote meanwhile; the next tick tries again
        self._published = doc

    def _evaluate(self, status: AlarmStatus, windows: _Windows, now: float) -> str | None:
        rule = status.rule
        state = self.gateway.control.find_state(rule.route)
        if state is None:
            return None
        candidates: list[tuple[str, float | None, float]] = []
        for backend in self._backends(rule.backend, rule.route, state):
            if rule.metric.startswith("psi_"):
                value, samples = self._psi_metric(rule.route, backend, rule.metric,
                                                  rule.against, rule.window, windows, state)
            else:
                value, samples = metric_value(rule.metric,
                                              windows.get(rule.route, backend, rule.window))
            if rule.metric != "rps" and samples < rule.min_samples:
                value = None
            candidates.append((backend, None if value is None else round(value, 6), samples))
        status.last_backend, status.last_value = status.backend, status.value
        status.backend, status.value, status.samples = worst(rule.op, candidates)
        return advance(status, breaches(rule.op, status.value, status.threshold), now)

    def _backends(self, selector: str, route: str, state: RouteState) -> list[str]:
        if selector == "live":
            return [state.live]
        if selector == "canary":
            return [state.canary] if state.canary else []
        if selector == "any":
            return list(self.gateway.control.route_config(route).backends)
        return [selector]

    async def _announce(self, status: AlarmStatus, change: str, before: str) -> None:
        rule = status.rule
        value = "no data" if status.value is None else f"{status.value:.6g}"
        on = f" on {status.backend}" if status.backend else ""
        window = format_duration(rule.window)
        if change == "firing":
            reason = (f"{rule.name}: {rule.metric}{on} = {value} {rule.op} "
                      f"{status.threshold:g} over {window}")
        else:
            reason = (f"{rule.name}: {rule.metric}{on} = {value}, no longer {rule.op} "
                      f"{status.threshold:g} over {window}")
        action = "alarm_firing" if change == "firing" else "alarm_resolved"
        log.log(logging.WARNING if change == "firing" else logging.INFO, reason,
                extra={"event": action, "route": rule.route, "backend": status.backend,
                       "alarm": rule.name, "value": status.value})
        # Same keys on both sides, so a diff of the event shows what changed: state and value.
        common = {"alarm": rule.name, "metric": rule.metric, "threshold": status.threshold,
                  "window": rule.window}
        if not self.gateway.lease.held:
            return  # the lease moved on during this tick: the new holder announces it
        await self.gateway.control.record(
            rule.route, "monitoring", action,
            {**common, "state": before, "backend": status.last_backend,
             "value": status.last_value},
            {**common, "state": status.state, "backend": status.backend,
             "value": status.value},
            reason,
        )

    def firing_alarms(self, route: str, backend: str | None = None) -> list[str]:
        """Names of the alarms firing for `route` now (a rollout gate may refuse on these).

        With `backend`, only alarms about that backend: its value came from it, or the rule
        names it. An alarm on the live backend or on client input is no verdict on a canary."""
        return [s.rule.name for s in self._alarms.values()
                if s.rule.route == route and s.state == FIRING
                and (backend is None or s.backend == backend or s.rule.backend == backend)]

    def alarms_view(self) -> list[dict[str, Any]]:
        """Every rule with its threshold, state, last value and since when (dashboard, CLI)."""
        return [s.to_json() for s in self._alarms.values()]

    def alarm(self, name: str) -> AlarmStatus:
        found = self._alarms.get(name)
        if found is None:
            known = ", ".join(sorted(self._alarms)) or "none configured"
            raise NotFound(f"no alarm named {name!r} ({known})")
        return found

    async def set_threshold(self, name: str, threshold: float | None, *, actor: str,
                            reason: str | None = None) -> AlarmStatus:
        """Change an alarm's threshold at run time (None: back to the config's value)."""
        status = self.alarm(name)
        store = self.gateway.store
        key = ALARM_KEY + name
        before = status.threshold
        for _ in range(CAS_ATTEMPTS):
            found = await store.read(key)
            try:
                if threshold is None:
                    if found is not None:
                        await store.delete(key, found[1])
                else:
                    await store.write(key, {"threshold": float(threshold)},
                                      found[1] if found else 0)
                break
            except VersionConflict:
                await asyncio.sleep(0)
        else:
            raise Conflict(f"alarm {name!r} threshold is changing too fast; try again")
        self._apply_threshold(name, None if threshold is None else float(threshold))
        await self.gateway.control.record(
            status.rule.route, actor, "alarm_threshold",
            {"alarm": name, "threshold": before},
            {"alarm": name, "threshold": status.threshold}, reason,
        )
        return status

    def _on_store_change(self, key: str, doc: dict[str, Any] | None, version: int) -> None:
        if key == ALARM_STATE_KEY:
            if doc is not None and not self.gateway.lease.held:
                self._apply_states(doc)
            return
        if key.startswith(BASELINE_KEY):
            route = key[len(BASELINE_KEY):]
            if doc is None:
                self._baselines.pop(route, None)
                return
            try:
                self._baselines[route] = Baseline.from_doc(doc)
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("ignoring unreadable stored drift baseline for route %s", route)
            return
        if not key.startswith(ALARM_KEY):
            return
        try:
            stored = _THRESHOLD_DOC.validate_python(doc or {})
        except ValidationError:
            log.warning("ignoring bad stored threshold for %s: %r", key, doc)
            return
        self._apply_threshold(key[len(ALARM_KEY):], stored.threshold)

    def _apply_states(self, doc: dict[str, Any]) -> None:
        """The lease holder's view of every alarm, on a process that does not evaluate."""
        try:
            states = _STATES_DOC.validate_python(doc)
        except ValidationError:
            log.warning("ignoring an unreadable alarm-state document")
            return
        for name, fields in states.items():
            status = self._alarms.get(name)
            if status is not None:
                for f in fields.model_fields_set:
                    setattr(status, f, getattr(fields, f))

    async def _reseed(self) -> None:
        """The store lost its data: write back thresholds and baselines this process knows."""
        docs = {BASELINE_KEY + route: b.to_doc() for route, b in self._baselines.items()}
        docs.update({ALARM_KEY + name: {"threshold": s.threshold}
                     for name, s in self._alarms.items() if s.threshold != s.rule.threshold})
        self._published = None
        for key, doc in docs.items():
            try:
                await self.gateway.store.write(key, doc, 0)
            except VersionConflict:
                pass  # another process wrote it back first

    def _apply_threshold(self, name: str, threshold: float | None) -> None:
        status = self._alarms.get(name)
        if status is not None:
            status.threshold = status.rule.threshold if threshold is None else threshold

    # -- drift ---------------------------------------------------------------------------------
    def _feature_names(self, route: str) -> tuple[str, ...]:
        probes = self.probes(route)
        return probes.feature_names if probes is not None else ()

    def _psi_values(self, route: str, backend: str, against: str, window: float,
                    windows: _Windows, state: RouteState) -> dict[str, float | None]:
        """PSI per family (labels, scores, feature:<name>) of `backend`'s last `window`."""
        probes = self.probes(route)
        if probes is None:
            return {}
        min_samples = probes.config.drift.min_samples
        features = probes.feature_names
        current = families(windows.get(route, backend, window).counters, features)
        out: dict[str, float | None] = {}
        if against == "live":
            if backend == state.live:
                return dict.fromkeys(current)
            reference = families(windows.get(route, state.live, window).counters, features)
            for fam, counts in current.items():
                out[fam] = compare(reference[fam], counts, min_samples)
            return out
        baseline = self._baselines.get(route)
        for fam, counts in current.items():
            ref = baseline.reference(backend, fam, min_samples) if baseline else None
            out[fam] = compare(ref, counts, min_samples) if ref is not None else None
        return out

    def _psi_metric(self, route: str, backend: str, metric: str, against: str, window: float,
                    windows: _Windows, state: RouteState) -> tuple[float | None, float]:
        values = self._psi_values(route, backend, against, window, windows, state)
        counters = windows.get(route, backend, window).counters
        if metric == "psi_labels":
            return values.get("labels"), _total(counters, LABEL)
        if metric == "psi_scores":
            return values.get("scores"), _total(counters, SCORE)
        found = [v for k, v in values.items() if k.startswith(FEATURE) and v is not None]
        return (max(found) if found else None), _total(counters, FEATURE)

    async def _auto_baselines(self, now: float) -> None:
        for route in self.gateway.config.routes:
            probes = self._route_probes(route)
            if probes is None or route.name in self._baselines:
                continue
            period = probes.config.drift.baseline
            if period <= 0 or now - self._started < period:
                continue
            baseline = self._snapshot(route.name, period, "auto", now)
            if _enough(baseline, probes.config.drift.min_samples):
                try:  # only if none is stored: an earlier controller's stays the reference
                    await self.gateway.store.write(BASELINE_KEY + route.name,
                                                   baseline.to_doc(), 0)
                except VersionConflict:
                    found = await self.gateway.store.read(BASELINE_KEY + route.name)
                    if found is not None:
                        self._on_store_change(BASELINE_KEY + route.name, *found)
                    continue
                self._baselines[route.name] = baseline
                log.info("drift baseline for route %s taken", route.name,
                         extra={"event": "drift_baseline", "route": route.name})

    def _snapshot(self, route: str, window: float, source: str, now: float) -> Baseline:
        state = self.gateway.control.state(route)
        windows = _Windows(self.gateway.metrics, now)
        features = self._feature_names(route)
        baseline = Baseline(taken_at=now, source=source, window=window, live=state.live)
        for backend in self.gateway.control.route_config(route).backends:
            fams = families(windows.get(route, backend, window).counters, features)
            fams = {k: v for k, v in fams.items() if v}
            if fams:
                baseline.counts[backend] = fams
        return baseline

    async def take_baseline(self, route: str, window: float, *, actor: str,
                            reason: str | None = None) -> Baseline:
        """Freeze the last `window` of each backend's distributions as the drift reference."""
        probes = self.probes(route)
        if probes is None:
            raise Conflict(f"route {route!r} has no probes: nothing to take a baseline of")
        baseline = self._snapshot(route, window, actor, self.clock())
        if not baseline.counts:
            raise Conflict(f"no probed traffic on route {route!r} in the last "
                           f"{format_duration(window)}: nothing to take a baseline of")
        before = self._baselines.get(route)
        key = BASELINE_KEY + route
        for _ in range(CAS_ATTEMPTS):
            found = await self.gateway.store.read(key)
            try:
                await self.gateway.store.write(key, baseline.to_doc(), found[1] if found else 0)
                break
            except VersionConflict:
                await asyncio.sleep(0)
        else:
            raise Conflict(f"drift baseline of route {route!r} is changing too fast; try again")
        self._baselines[route] = baseline
        await self.gateway.control.record(
            route, actor, "drift_baseline", before.to_json() if before else None,
            baseline.to_json(), reason,
        )
        return baseline

    def drift(self, route: str, window: float | None = None) -> dict[str, Any]:
        """PSI per backend against the live backend and against the baseline, per family."""
        probes = self.probes(route)
        state = self.gateway.control.state(route)
        if probes is None:
            return {"route": route, "probes": False, "live": state.live, "window": window,
                    "baseline": None, "backends": {}}
        window = probes.config.drift.window if window is None else window
        windows = _Windows(self.gateway.metrics, self.clock())
        features = probes.feature_names
        baseline = self._baselines.get(route)
        backends: dict[str, Any] = {}
        for backend in self.gateway.control.route_config(route).backends:
            current = families(windows.get(route, backend, window).counters, features)
            vs_live = self._psi_values(route, backend, "live", window, windows, state)
            vs_base = self._psi_values(route, backend, "baseline", window, windows, state)
            labels = current["labels"]
            n_labels = sum(labels.values())
            backends[backend] = {
                "live": backend == state.live,
                "samples": {k: sum(v.values()) for k, v in current.items()},
                "labels": {k: round(v / n_labels, 6) for k, v in sorted(labels.items())}
                if n_labels else {},
                "vs_live": None if backend == state.live else _grouped(vs_live),
                "vs_baseline": _grouped(vs_base),
            }
        return {
            "route": route, "probes": True, "live": state.live, "window": window,
            "min_samples": probes.config.drift.min_samples,
            "baseline": baseline.to_json() if baseline else None,
            "backends": backends,
        }

    # -- probe summaries -----------------------------------------------------------------------
    def probe_summary(self, route: str, window: float = 60.0) -> dict[str, Any]:
        """Per backend over the last `window`: the rates the probes measure."""
        probes = self.probes(route)
        windows = _Windows(self.gateway.metrics, self.clock())
        out: dict[str, Any] = {}
        for backend in self.gateway.control.route_config(route).backends:
            w = windows.get(route, backend, window)
            c = w.counters
            row: dict[str, Any] = {"requests": w.requests, "error_rate": _r(w.error_rate)}
            if probes is not None:
                for metric in ("null_rate", "missing_rate", "schema_error_rate",
                               "error_body_rate"):
                    row[metric] = _r(metric_value(metric, w)[0])
                n_in = c.get("input_total", 0.0)
                row["input_probed"] = n_in
                row["output_probed"] = c.get("output_total", 0.0)
                row["mean_input_length"] = _r(c.get("input_length_sum", 0.0) / n_in
                                              if n_in else None)
                row["mean_request_bytes"] = _r(c.get("request_bytes_sum", 0.0) / n_in
                                               if n_in else None)
            out[backend] = row
        return {"route": route, "window": window, "probes": probes is not None,
                "backends": out}

    def describe_route(self, name: str) -> dict[str, Any]:
        alarms = [{"name": s.rule.name, "state": s.state} for s in self._alarms.values()
                  if s.rule.route == name]
        probes = self.probes(name)
        return {"monitoring": {
            "probes": None if probes is None else {
                "sample": probes.sample, "input": probes.input is not None,
                "output": probes.output is not None, "features": list(probes.feature_names),
            },
            "alarms": alarms,
            "firing": self.firing_alarms(name),
        }}

    # -- Prometheus ----------------------------------------------------------------------------
    def _collect(self) -> Iterator[Metric]:
        control = self.gateway.control
        weight = GaugeMetricFamily("modelgate_canary_weight",
                                   "Percent of the route's traffic sent to the canary.",
                                   labels=["route"])
        live = GaugeMetricFamily("modelgate_live_backend",
                                 "1 for the route's live backend, 0 for the others.",
                                 labels=["route", "backend"])
        for name, state in control.states().items():
            weight.add_metric([name], state.canary_weight if state.canary else 0.0)
            for backend in control.route_config(name).backends:
                live.add_metric([name, backend], 1.0 if backend == state.live else 0.0)
        yield weight
        yield live
        lag = GaugeMetricFamily("modelgate_event_loop_lag_seconds",
                                "How late the event loop last woke a timer.")
        lag.add_metric([], self.loop_lag)
        yield lag
        lag_max = GaugeMetricFamily("modelgate_event_loop_lag_max_seconds",
                                    "The largest event-loop lag of the last minute.")
        lag_max.add_metric([], self.loop_lag_max)
        yield lag_max
        firing = GaugeMetricFamily("modelgate_alarm_firing", "1 while the alarm is firing.",
                                   labels=["alarm", "route"])
        value = GaugeMetricFamily("modelgate_alarm_value",
                                  "The alarm metric's last evaluated value.",
                                  labels=["alarm", "route"])
        for status in self._alarms.values():
            labels = [status.rule.name, status.rule.route]
            firing.add_metric(labels, 1.0 if status.state == FIRING else 0.0)
            if status.value is not None:
                value.add_metric(labels, status.value)
        yield firing
        yield value
        yield from self._collect_probes()

    def _collect_probes(self) -> Iterator[Metric]:
        length = HistogramMetricFamily("modelgate_input_length",
                                       "Length of the probed input array or string.",
                                       labels=["route", "backend"])
        size = HistogramMetricFamily("modelgate_request_body_bytes",
                                     "Size of probed request bodies.",
                                     labels=["route", "backend"])
        score = HistogramMetricFamily("modelgate_output_score",
                                      "Probed output scores (confidence).",
                                      labels=["route", "backend"])
        feature = HistogramMetricFamily("modelgate_input_feature",
                                        "Probed numeric input feature values.",
                                        labels=["route", "backend", "feature"])
        psi = GaugeMetricFamily("modelgate_drift_psi",
                                "Population stability index over the drift window.",
                                labels=["route", "backend", "family", "against"])
        now = self.clock()
        for route, probes in list(self._probes.items()):
            state = self.gateway.control.find_state(route)
            windows = _Windows(self._local, now)
            for backend, totals in probes.totals.items():
                labels = [route, backend]
                if probes.input is not None and any(totals.request_bytes.counts):
                    size.add_metric(labels, totals.request_bytes.buckets(),
                                    totals.request_bytes.sum)
                    if probes.input.has_length:
                        length.add_metric(labels, totals.length.buckets(), totals.length.sum)
                counters = probes.stats[backend].counter_totals
                if probes.output is not None and probes.output.score is not None:
                    names = probes.output.score_names
                    if any(n in counters for n in names):
                        score.add_metric(labels, cumulative_buckets(
                            probes.output.score_edges, [counters.get(n, 0.0) for n in names]),
                            totals.score_sum)
                if probes.input is not None:
                    for bins in probes.input.features:
                        if bins.edges is not None and any(n in counters for n in bins.names):
                            feature.add_metric([*labels, bins.probe.name], cumulative_buckets(
                                bins.edges, [counters.get(n, 0.0) for n in bins.names]),
                                None)
                if state is None:
                    continue
                for against in ("live", "baseline"):
                    values = self._psi_values(route, backend, against,
                                              probes.config.drift.window, windows, state)
                    for fam, v in values.items():
                        if v is not None:
                            psi.add_metric([route, backend, fam, against], v)
        yield length
        yield size
        yield score
        yield feature
        yield psi


def _grouped(values: dict[str, float | None]) -> dict[str, Any]:
    return {
        "labels": values.get("labels"),
        "scores": values.get("scores"),
        "features": {k[len(FEATURE):]: v for k, v in values.items() if k.startswith(FEATURE)},
    }


def _total(counters: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in counters.items() if k.startswith(prefix))


def _enough(baseline: Baseline, min_samples: int) -> bool:
    return any(sum(c.values()) >= min_samples
               for fams in baseline.counts.values() for c in fams.values())


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
