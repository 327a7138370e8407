"""The live dashboard on the admin port: a static page plus one JSON data endpoint.

``GET /dashboard`` serves a single page (HTML, JS, CSS and the vendored uPlot chart library,
all inside the package: no CDN, no build step). The page is static and needs no token; it asks
for the admin token, keeps it in the browser's sessionStorage and sends it as a bearer token
to ``GET /admin/dashboard/data``, which the admin auth middleware guards like every /admin/
path.

The data endpoint reads what already exists: per-second slots of each backend's
`BackendStats` (throughput, latency, errors and the probes' named counters; through
`gateway.metrics`, so with the Redis store the sum over every process), the route states,
the monitoring component's alarms and the audit log. Routing state and shadow agreement have no
history of their own, so `StateSampler` keeps a bounded ring of samples per route (one every
`SAMPLE_SECONDS`), owned by the admin app: started on startup, cancelled and awaited on cleanup.
All of this runs on the event loop the proxy uses, so a response is built at most once per
`CACHE_SECONDS` however many screens poll it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import TypeAdapter
from pydantic import model_validator as model_check
from pydantic.dataclasses import dataclass as model

from gateway.admin.endpoint import Call, Endpoint
from gateway.admin.http import read_query
from gateway.admin.models import RouteName, whole
from gateway.admin.views import route_view
from gateway.component import Host
from gateway.metrics import WINDOW_SLOTS, WindowSummary
from gateway.rules import HIT_PREFIX
from gateway.schema import MODEL, problem
from gateway.state import RouteState, Rule
from gateway.streaming import stream_summary

log = logging.getLogger("modelgate.dashboard")

STATIC_DIR = Path(__file__).with_name("static")
SAMPLE_SECONDS = 2.0  # how often route state and shadow agreement are sampled
HISTORY_SECONDS = WINDOW_SLOTS  # as far back as the per-second slots go (15 minutes)
CACHE_SECONDS = 1.0
MIN_SPAN_SECONDS = 120  # charts of a gateway started a moment ago still span two minutes
MAX_MINUTES = WINDOW_SLOTS // 60
MAX_STEP = 60
# Each point costs a pass over a bucket's latency histogram, on the proxy's event loop.
MAX_POINTS = 300
SUMMARY_SECONDS = 60  # the header's "now" figures: the last minute (or since start)
EVENT_LIMIT = 50
# Strict: the page runs no inline script and talks only to its own origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# -- parameters ------------------------------------------------------------------------------
@model(frozen=True, slots=True, config=MODEL)
class Params:
    """``minutes`` of history (1-15) in buckets of ``step`` seconds (1-60, at most
    `MAX_POINTS` per series), of one ``route`` or all."""

    minutes: Annotated[int, whole(1, MAX_MINUTES)] = 15
    step: Annotated[int, whole(1, MAX_STEP)] = 5
    route: RouteName | None = None

    @model_check(mode="after")
    def _points(self) -> Params:
        span = self.minutes * 60
        if self.step > span:
            raise problem(f"must not exceed the span ({span} s)", "step")
        if span // self.step > MAX_POINTS:
            least = -(-span // MAX_POINTS)
            raise problem(f"at least {least} s for {self.minutes} minutes (at most "
                          f"{MAX_POINTS} points)", "step")
        return self


PARAMS = TypeAdapter(Params)


def parse_params(query: Mapping[str, str]) -> Params:
    """The dashboard's query string as `Params`; `InvalidRequest` naming the parameter."""
    return read_query(query, PARAMS)


# -- per-backend series (pure) ---------------------------------------------------------------
def _ratio(num: float, den: float, digits: int = 4) -> float | None:
    return round(num / den, digits) if den > 0 else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def backend_series(buckets: Sequence[WindowSummary], blank: int = 0) -> dict[str, list[Any]]:
    """Chart columns from per-step summaries: one value per bucket, None where undefined
    (no requests → no latency or error rate; no probed outputs → no non-null fraction) and
    for the first `blank` buckets (before the gateway started: not "0 req/s", but nothing)."""
    out: dict[str, list[Any]] = {
        "rps": [], "p50_ms": [], "p99_ms": [], "error_rate": [], "non_null": [],
        "input_missing": [], "requests": [], "ttft_p50_ms": [], "ttft_p99_ms": [],
    }
    for values in out.values():
        values.extend([None] * min(blank, len(buckets)))
    for b in buckets[blank:]:  # each bucket is a `step`-second window: the same figures
        row = backend_summary(b)
        for name, values in out.items():
            values.append(row[name])
    return out


def backend_summary(w: WindowSummary) -> dict[str, Any]:
    """The header's figures for one backend over the last minute."""
    probed = w.counter("output_total")
    return {
        "requests": w.requests,
        "rps": round(w.rate, 3),
        "p50_ms": _ms(w.quantile(0.5)),
        "p99_ms": _ms(w.quantile(0.99)),
        "error_rate": _ratio(w.errors, w.requests),
        "non_null": None if probed <= 0 else round(1.0 - w.counter("output_null") / probed, 4),
        "input_missing": _ratio(w.counter("input_missing"), w.counter("input_values")),
        # Streamed answers: TTFT p50/p99, events/s within a stream, tokens (streaming.py).
        **stream_summary(w.counters, w.seconds),
    }


def rule_rows(rules: Sequence[Rule], buckets: Mapping[str, Sequence[WindowSummary]],
              recent: Mapping[str, WindowSummary], blank: int = 0) -> list[dict[str, Any]]:
    """Each current rule of a route with its hits: over the header's recent window
    (``hits``) and per chart bucket (``series``, None for the first `blank` buckets), summed
    over the route's backends (a rule may have changed target)."""
    rows = []
    for rule in rules:
        key = HIT_PREFIX + rule.name
        n = max((len(b) for b in buckets.values()), default=0)
        per_bucket: list[float | None] = [None] * min(blank, n)
        per_bucket += [sum(b[i].counter(key) for b in buckets.values() if i < len(b))
                       for i in range(len(per_bucket), n)]
        rows.append({**rule.to_json(), "hits": sum(w.counter(key) for w in recent.values()),
                     "series": per_bucket})
    return rows


# -- routing state and shadow agreement over time --------------------------------------------
@dataclass(frozen=True, slots=True)
class StateSample:
    time: float
    live: str
    canary: str | None
    weight: float
    shadow: str | None
    pairs: int  # shadow pairs compared in the `SAMPLE_SECONDS` before `time`
    agreement: float | None

    @classmethod
    def of(cls, when: float, state: RouteState, pairs: int = 0,
           agreement: float | None = None) -> StateSample:
        weight = state.canary_weight if state.canary else 0.0
        return cls(when, state.live, state.canary, weight, state.shadow, pairs, agreement)


def state_series(samples: Sequence[StateSample], times: Sequence[float], step: int,
                 backends: Iterable[str]) -> dict[str, Any]:
    """Per bucket (ending at each of `times`): the live and canary backend and weight at the
    bucket's end, each backend's traffic share (%), and the shadow agreement of the pairs
    compared within the bucket (pair-weighted). None before the first sample."""
    live: list[str | None] = []
    canary: list[str | None] = []
    weight: list[float | None] = []
    share: dict[str, list[float | None]] = {b: [] for b in backends}
    agreement: list[float | None] = []
    pairs: list[int] = []
    i = 0
    n = len(samples)
    for t in times:  # both in time order: each sample is looked at once
        lo = t - step
        agreeing = 0.0
        counted = 0
        while i < n and samples[i].time <= t:
            s = samples[i]
            if s.time > lo and s.agreement is not None and s.pairs > 0:
                agreeing += s.agreement * s.pairs
                counted += s.pairs
            i += 1
        current = samples[i - 1] if i > 0 else None
        if current is None:
            live.append(None)
            canary.append(None)
            weight.append(None)
            for values in share.values():
                values.append(None)
        else:
            live.append(current.live)
            canary.append(current.canary)
            weight.append(current.weight)
            for name, values in share.items():
                if name == current.live:
                    values.append(round(100.0 - current.weight, 2))
                elif name == current.canary:
                    values.append(round(current.weight, 2))
                else:
                    values.append(0.0)
        pairs.append(counted)
        agreement.append(round(agreeing / counted, 4) if counted else None)
    return {"live": live, "canary": canary, "canary_weight": weight, "traffic": share,
            "shadow_pairs": pairs, "shadow_agreement": agreement}


class StateSampler:
    """A bounded ring of `StateSample`s per route, one every `interval` seconds."""

    def __init__(self, gateway: Host, interval: float = SAMPLE_SECONDS,
                 history: float = HISTORY_SECONDS) -> None:
        self.gateway = gateway
        self.interval = interval
        maxlen = int(history / interval) + 2
        self.rings: dict[str, deque[StateSample]] = {
            r.name: deque(maxlen=maxlen) for r in gateway.config.routes
        }
        self._task: asyncio.Task[None] | None = None
        self.started: float | None = None  # when sampling began, about the gateway's start

    def sample(self) -> None:
        now = self.gateway.clock()
        agreement = self.gateway.hooks.shadow_agreement
        for name, ring in self.rings.items():
            pairs, rate = 0, None
            if agreement is not None:
                try:
                    pairs, rate = agreement(name, self.interval)
                except KeyError:
                    pass  # no shadow configured or seen for this route
            ring.append(StateSample.of(now, self.gateway.control.state(name), int(pairs), rate))

    async def run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a failing component must not stop the history
                log.exception("dashboard state sample failed")
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        if self._task is None:
            self.started = self.gateway.clock()
            self._task = asyncio.create_task(self.run(), name="dashboard-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() does not re-raise the task's cancellation, but does raise our own
            await asyncio.wait([task])


SAMPLER_KEY: web.AppKey[StateSampler] = web.AppKey("dashboard_sampler")


# -- the data document -----------------------------------------------------------------------
class DashboardData:
    """Builds ``GET /admin/dashboard/data`` documents, caching the last one briefly."""

    def __init__(self, gateway: Host, sampler: StateSampler) -> None:
        self.gateway = gateway
        self.sampler = sampler
        self._cached: tuple[Params, float, bytes] | None = None

    async def render(self, params: Params) -> bytes:
        now = time.monotonic()
        cached = self._cached
        if cached is not None and cached[0] == params and now - cached[1] < CACHE_SECONDS:
            return cached[2]
        body = orjson.dumps(await self.build(params), option=orjson.OPT_NON_STR_KEYS)
        self._cached = (params, now, body)
        return body

    async def build(self, params: Params) -> dict[str, Any]:
        gateway = self.gateway
        if params.route is not None:
            gateway.control.route_config(params.route)  # NotFound → 404
        names = [r.name for r in gateway.config.routes
                 if params.route is None or r.name == params.route]
        # whole seconds only: the current second is still filling and would read low
        end = int(gateway.clock()) - 1
        seconds = params.minutes * 60
        n = max(1, seconds // params.step)
        start = end - n * params.step + 1
        times = [float(start + (i + 1) * params.step) for i in range(n)]
        # The cluster's numbers go back before this process started; its own do not.
        began = None if gateway.metrics.cluster else self.sampler.started
        # Drop the buckets from before the gateway started (keeping a short minimum span),
        # so a fresh gateway's charts are not a flat line squeezed against the right edge.
        blank = 0 if began is None else bisect.bisect_right(times, began)
        first = min(blank, max(0, n - math.ceil(MIN_SPAN_SECONDS / params.step)))
        times = times[first:]
        recent = SUMMARY_SECONDS if began is None else (
            max(1, min(SUMMARY_SECONDS, end + 1 - int(began))))
        routes = []
        metrics = gateway.metrics  # with the Redis store: the sum over every process
        for name in names:
            static = gateway.static[name]
            views = {b: metrics.backend(name, b) for b in static.stats}
            buckets = {b: view.series(seconds, params.step, now=end)[first:]
                       for b, view in views.items()}
            series = {b: backend_series(bk, blank - first) for b, bk in buckets.items()}
            windows = {b: view.window(recent, now=end) for b, view in views.items()}
            summary = {b: backend_summary(w) for b, w in windows.items()}
            state = gateway.control.state(name)
            samples = list(self.sampler.rings.get(name, ()))
            history = state_series(samples, times, params.step, static.stats)
            routes.append({"name": name, "state": route_view(gateway, name), "time": times,
                           "backends": series, "summary": summary, **history,
                           "rules": rule_rows(state.rules, buckets, windows, blank - first)})
        events = await gateway.control.events(EVENT_LIMIT)
        return {
            "time": gateway.clock(),
            "minutes": params.minutes,
            "step": params.step,
            "summary_seconds": recent,
            "routes": routes,
            "shadow_available": gateway.hooks.shadow_agreement is not None,
            "alarms": None if gateway.hooks.alarms is None else list(gateway.hooks.alarms()),
            "events": [e.to_json() for e in events],
        }


# -- wiring ----------------------------------------------------------------------------------
def install(app: web.Application, gateway: Host) -> list[Endpoint]:
    """The page (``GET /dashboard``, no token) and the token-guarded data endpoint, plus the
    static files and the state sampler, which lives as long as the admin app."""
    sampler = StateSampler(gateway)
    data = DashboardData(gateway, sampler)
    app[SAMPLER_KEY] = sampler

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await sampler.start()
        yield
        await sampler.stop()

    async def dashboard_data(call: Call) -> web.StreamResponse:
        params: Params = call.query
        return web.Response(body=await data.render(params), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def page(call: Call) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "dashboard.html", headers=PAGE_HEADERS)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard")

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/dashboard/", redirect)
    app.router.add_static("/dashboard/static/", STATIC_DIR, append_version=False)
    return [
        Endpoint("GET", "/dashboard", "The live monitoring dashboard (HTML; asks for the "
                 "token)", page, auth=False, content="text/html"),
        Endpoint("GET", "/admin/dashboard/data", "Dashboard series, route states, alarms and "
                 "events", dashboard_data, query=PARAMS, errors=(404, 503)),
    ]
