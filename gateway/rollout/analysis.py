"""Judging a candidate: gates over sliding windows of its own and the live backend's traffic.

`judge()` is pure: given the two windows (and, when present, the shadow agreement and the
firing alarms) it returns an `Analysis` with each gate's value and verdict. `Meter` builds the
windows: it snapshots the cumulative per-backend totals (`Totals`: this process's
`BackendStats`, or with the Redis store the cluster's sums, gateway.cluster.metrics) at every
check and at every step start, and a window is the difference of two snapshots. That is exact
at check granularity, where `BackendStats.window()`'s one-second slots are not: a 300 ms window
would see 0-1 s of traffic, and a step that began mid-second would be charged with the previous
step's requests. (The cluster's totals trail by up to one publish interval, ~1 s.)

Verdicts: ``pass``, ``fail``, ``no_data`` (too little traffic to judge: the step holds,
neither a pass nor a failure) and ``skipped`` (the gate does not apply now, e.g. a ratio to the
live backend when the live backend has no traffic at 100%, or shadow agreement when no shadow
comparison runs).

With ``analysis: {mode: sequential}`` a ``sequential`` gate joins them: the always-valid test
of gateway.rollout.sequential over the rollout's whole traffic (`Meter.batch` hands it each
check's new requests): ``fail`` when the candidate is significantly worse (the controller rolls
back at once), ``pass`` when significantly not worse by the margin, ``no_data`` while pending.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.histogram import FINE_BOUNDS
from gateway.metrics import EMPTY, Totals, WindowSummary, quantile
from gateway.rollout.plan import AnalysisConfig, Gates
from gateway.rollout.sequential import (
    ERRORS,
    LATENCY,
    NOT_WORSE,
    WORSE,
    Counts,
    Evidence,
    SequentialResult,
    decide,
)
from gateway.rules import RULED_ERRORS, RULED_REQUESTS
from gateway.streaming import ttft_hist

log = logging.getLogger("modelgate.rollout")

PASS = "pass"
FAIL = "fail"
NO_DATA = "no_data"
SKIPPED = "skipped"

NULL_COUNTER = "output_null"
OUTPUT_COUNTER = "output_total"
MAX_SNAPSHOTS = 4096
SNAPSHOTS_PER_WINDOW = 1000


@dataclass(frozen=True, slots=True)
class GateResult:
    name: str
    value: float | None
    limit: float | None
    verdict: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit,
                "verdict": self.verdict, "detail": self.detail}

    def describe(self) -> str:
        if self.detail.startswith(self.name):
            return self.detail
        if self.detail:
            return f"{self.name}: {self.detail}"
        return f"{self.name} {_fmt(self.value)} vs {_fmt(self.limit)}"


@dataclass(frozen=True, slots=True)
class Sample:
    """What a window saw of one backend (numbers reported with every decision)."""

    requests: int
    errors: int
    error_rate: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, window: WindowSummary) -> Sample:
        p99 = window.quantile(0.99)
        return cls(window.requests, window.errors, window.error_rate,
                   None if p99 is None else round(p99 * 1000, 3))

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": self.error_rate, "p99_ms": self.p99_ms}


@dataclass(frozen=True, slots=True)
class Analysis:
    """One check's outcome: the overall verdict and every gate's numbers."""

    verdict: str
    window: float
    candidate: Sample
    live: Sample
    gates: tuple[GateResult, ...]
    sequential: SequentialResult | None = None

    def summary(self) -> str:
        """The gates that decided the verdict, with their numbers (goes into audit events)."""
        if self.verdict == PASS:
            shown = [g for g in self.gates if g.verdict == PASS]
        else:
            shown = [g for g in self.gates if g.verdict == self.verdict]
        text = "; ".join(g.describe() for g in shown) or "no gates"
        return (f"{text} (window {self.window:.2f}s, candidate {self.candidate.requests} req "
                f"{self.candidate.errors} err, live {self.live.requests} req "
                f"{self.live.errors} err)")

    def to_json(self) -> dict[str, Any]:
        out = {"verdict": self.verdict, "window": round(self.window, 3),
               "candidate": self.candidate.to_json(), "live": self.live.to_json(),
               "gates": [g.to_json() for g in self.gates]}
        if self.sequential is not None:
            out["sequential"] = self.sequential.to_json()
        return out


def judge(
    gates: Gates,
    candidate: WindowSummary,
    live: WindowSummary,
    window: float,
    *,
    shadow: tuple[int, float | None] | None = None,
    alarms: list[str] | None = None,
    sequential: SequentialResult | None = None,
) -> Analysis:
    """Evaluate every configured gate. `shadow` is (pairs, agreement rate) when a shadow
    comparison runs, `alarms` the firing alarm names when monitoring runs (None: absent),
    `sequential` the sequential test's verdict in that mode."""
    need = gates.min_requests
    results: list[GateResult] = []
    enough = candidate.requests >= need
    results.append(GateResult(
        "min_requests", float(candidate.requests), float(need), PASS if enough else NO_DATA,
        f"min_requests: {candidate.requests} >= {need}" if enough
        else f"{candidate.requests} of {need} requests in window",
    ))
    live_enough = live.requests >= need
    cand_rate = candidate.error_rate
    cand_p99 = candidate.quantile(0.99)

    if gates.max_error_rate is not None:
        results.append(_upper("error_rate", cand_rate if enough else None,
                              gates.max_error_rate, enough))
    if gates.max_error_rate_ratio is not None:
        if not live_enough:
            results.append(_skip("error_rate_ratio", gates.max_error_rate_ratio,
                                 f"live has {live.requests} of {need} requests"))
        else:
            # A live backend without errors would make any candidate error an infinite ratio.
            # Floor live's rate at the smallest non-zero rate the *candidate* can show (one
            # error in its window): at 10 % weight, live's own floor would be ~9x lower and a
            # single 5xx from a healthy canary would fail the gate.
            base = max(live.errors / live.requests, 1 / max(candidate.requests, 1))
            ratio = (cand_rate or 0.0) / base if enough else None
            results.append(_upper("error_rate_ratio", ratio, gates.max_error_rate_ratio, enough))
    if gates.max_p99_ms is not None:
        value = cand_p99 * 1000 if enough and cand_p99 is not None else None
        results.append(_upper("p99_ms", value, gates.max_p99_ms, enough))
    if gates.max_p99_ratio is not None:
        live_p99 = live.quantile(0.99)
        if not live_enough or live_p99 is None:
            results.append(_skip("p99_ratio", gates.max_p99_ratio,
                                 f"live has {live.requests} of {need} requests"))
        else:
            ratio = cand_p99 / live_p99 if enough and cand_p99 is not None else None
            results.append(_upper("p99_ratio", ratio, gates.max_p99_ratio, enough))
    if gates.max_null_rate is not None:
        outputs = candidate.counter(OUTPUT_COUNTER)
        nulls = candidate.counter(NULL_COUNTER)
        if outputs <= 0:
            results.append(_skip("null_rate", gates.max_null_rate,
                                 "no output probe data on this route"))
        elif outputs < need:
            results.append(GateResult("null_rate", None, gates.max_null_rate, NO_DATA,
                                      f"{outputs:g} of {need} probed outputs"))
        else:
            results.append(_upper("null_rate", nulls / outputs, gates.max_null_rate, True))
    if gates.min_shadow_agreement is not None:
        limit = gates.min_shadow_agreement
        if shadow is None:
            results.append(_skip("shadow_agreement", limit, "no shadow comparison running"))
        else:
            pairs, rate = shadow
            if pairs < need or rate is None:
                results.append(GateResult("shadow_agreement", rate, limit, NO_DATA,
                                          f"{pairs} of {need} compared pairs"))
            else:
                verdict = PASS if rate >= limit else FAIL
                results.append(GateResult("shadow_agreement", rate, limit, verdict,
                                          f"agreement {_fmt(rate)} "
                                          f"{'>=' if verdict == PASS else '<'} {_fmt(limit)} "
                                          f"over {pairs} pairs"))
    if gates.max_ttft_p99_ms is not None or gates.max_ttft_p99_ratio is not None:
        results += _ttft_gates(gates, candidate, live, need)
    if gates.no_firing_alarms:
        if alarms is None:
            results.append(_skip("firing_alarms", 0, "monitoring not running"))
        else:
            verdict = FAIL if alarms else PASS
            results.append(GateResult("firing_alarms", float(len(alarms)), 0.0, verdict,
                                      f"firing: {', '.join(alarms)}" if alarms else ""))

    if sequential is not None:
        results.append(sequential_gate(sequential))

    verdicts = {r.verdict for r in results}
    if FAIL in verdicts:
        overall = FAIL
    elif NO_DATA in verdicts:
        overall = NO_DATA
    else:
        overall = PASS
    return Analysis(overall, window, Sample.of(candidate), Sample.of(live), tuple(results),
                    sequential)


def slow_requests(window: WindowSummary, threshold_ms: float) -> int:
    """Requests in latency buckets wholly above `threshold_ms` (the threshold rounds up to a
    bucket bound, ≤ 20 % coarser; both backends are counted alike)."""
    first = bisect.bisect_left(FINE_BOUNDS, threshold_ms / 1000.0) + 1
    return sum(window.hist[first:])


def sequential_check(config: AnalysisConfig, evidence: Evidence, candidate: WindowSummary,
                     live: WindowSummary) -> SequentialResult:
    """Add one check's new traffic (`candidate`, `live`: since the previous check) to the
    evidence and decide. Requests a match rule routed are left out of the error test (the
    latency test still counts them: the buckets are not split by rule)."""
    batches = {ERRORS: (_unruled(candidate), _unruled(live), config.margin)}
    if config.latency_ms is not None:
        batches[LATENCY] = (Counts(candidate.requests, slow_requests(candidate,
                                                                     config.latency_ms)),
                            Counts(live.requests, slow_requests(live, config.latency_ms)),
                            config.slow_margin)
    return decide(evidence.update(batches), config.alpha, config.min_samples)


def _unruled(window: WindowSummary) -> Counts:
    """A window's requests and errors without those a match rule routed: a rule picks a
    segment (a tenant, a header), not a random share of users, so its traffic would compare
    unlike with unlike."""
    requests = window.requests - int(window.counter(RULED_REQUESTS))
    errors = window.errors - int(window.counter(RULED_ERRORS))
    return Counts(max(0, requests), max(0, min(errors, requests)))


def sequential_gate(result: SequentialResult) -> GateResult:
    """The sequential verdict as a gate: its value the smallest p-value that decides it."""
    if result.verdict == WORSE:
        worst = min(result.metrics, key=lambda m: m.p_worse)
        return GateResult("sequential", worst.p_worse, worst.alpha_worse, FAIL,
                          result.describe())
    if result.verdict == NOT_WORSE:
        weakest = max(result.metrics, key=lambda m: m.p_not_worse)
        return GateResult("sequential", weakest.p_not_worse, weakest.alpha_not_worse, PASS,
                          result.describe())
    detail = result.describe() or "no traffic to compare yet"
    if result.metrics and all(m.verdict == NOT_WORSE for m in result.metrics):
        detail = (f"not worse; step has {result.step_requests} of {result.min_samples} "
                  f"candidate requests: {detail}")
    else:
        detail = f"pending: {detail}"
    p = min((m.p_worse for m in result.metrics), default=None)
    return GateResult("sequential", p, None, NO_DATA, detail)


def _ttft_gates(gates: Gates, candidate: WindowSummary, live: WindowSummary, need: int
                ) -> list[GateResult]:
    """Time to first event (p99) of streamed answers, absolute and relative to live. Judged
    on streams, not requests: `need` of them (`min_requests`) before a verdict. A route where
    neither backend streamed in the window skips them (a route without streams never holds on
    them); a candidate without streams while live has some has no data yet (one whose streams
    hang must not pass)."""
    cand_hist = ttft_hist(candidate.counters)
    live_hist = ttft_hist(live.counters)
    cand_n, live_n = sum(cand_hist), sum(live_hist)
    cand_p99 = quantile(cand_hist, 0.99)
    out: list[GateResult] = []
    for name, limit in (("ttft_p99_ms", gates.max_ttft_p99_ms),
                        ("ttft_p99_ratio", gates.max_ttft_p99_ratio)):
        if limit is None:
            continue
        if cand_n == 0 and live_n == 0:
            out.append(_skip(name, limit, "no streamed answers in the window"))
            continue
        if cand_n < need or cand_p99 is None:
            out.append(GateResult(name, None, limit, NO_DATA,
                                  f"{cand_n} of {need} streamed answers"))
            continue
        if name == "ttft_p99_ms":
            out.append(_upper(name, cand_p99 * 1000, limit, True))
            continue
        live_p99 = quantile(live_hist, 0.99)
        if live_n < need or live_p99 is None:
            out.append(_skip(name, limit, f"live has {live_n} of {need} streamed answers"))
        else:
            out.append(_upper(name, cand_p99 / live_p99, limit, True))
    return out


def _upper(name: str, value: float | None, limit: float, enough: bool) -> GateResult:
    if not enough or value is None:
        return GateResult(name, None, limit, NO_DATA, "")
    verdict = PASS if value <= limit else FAIL
    return GateResult(name, round(value, 6), limit, verdict,
                      f"{name} {_fmt(value)} {'<=' if verdict == PASS else '>'} {_fmt(limit)}")


def _skip(name: str, limit: float, why: str) -> GateResult:
    return GateResult(name, None, limit, SKIPPED, why)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


# -- windows from cumulative totals ------------------------------------------------------------
class HasTotals(Protocol):
    """Where a backend's cumulative numbers come from: this process's `BackendStats`, or the
    cluster's sums (gateway.cluster.metrics)."""

    def totals(self) -> Totals: ...


class Meter:
    """Snapshots of some backends' cumulative totals; windows are differences of two.

    Bounded: at most ~`SNAPSHOTS_PER_WINDOW` snapshots per window (closer ones are not kept
    unless forced, e.g. at a step start) and never more than `MAX_SNAPSHOTS`.

    Counter resets: a snapshot with any number lower than the previous one's is taken as a
    reset (as Prometheus' rate() does): the totals from before are carried as an offset, so the
    snapshots stay monotone and no window is ever negative, whatever the source does.
    """

    def __init__(self, stats: Mapping[str, HasTotals], window: float) -> None:
        self.stats = stats
        self.window = window
        self._spacing = window / SNAPSHOTS_PER_WINDOW
        self._snaps: deque[tuple[float, dict[str, Totals]]] = deque(maxlen=MAX_SNAPSHOTS)
        self._raw: dict[str, Totals] = {}  # the last totals read, as read
        self._offset: dict[str, Totals] = {}  # what resets took away, per backend
        self._first: dict[str, Totals] | None = None  # the first snapshot ever taken
        self._latest: dict[str, Totals] = {}
        self._batch_base: dict[str, Totals] | None = None

    def _take(self) -> dict[str, Totals]:
        out: dict[str, Totals] = {}
        for name, source in self.stats.items():
            raw = source.totals()
            last = self._raw.get(name)
            if last is not None and raw.went_back(last):
                log.warning("totals of backend %s went back: counted as a reset", name,
                            extra={"event": "metrics_reset", "backend": name})
                self._offset[name] = self._offset.get(name, EMPTY).plus(last)
            self._raw[name] = raw
            offset = self._offset.get(name)
            out[name] = raw if offset is None else raw.plus(offset)
        return out

    def mark(self, now: float, force: bool = False) -> dict[str, Totals]:
        """Snapshot now; kept if forced or far enough from the last kept one."""
        snap = self._take()
        self._latest = snap
        if self._first is None:
            self._first = snap
        snaps = self._snaps
        if force or not snaps or now - snaps[-1][0] >= self._spacing:
            snaps.append((now, snap))
        horizon = now - self.window - self._spacing
        while len(snaps) > 1 and snaps[1][0] <= horizon:
            snaps.popleft()
        return snap

    def batch(self, backends: Iterable[str]) -> dict[str, WindowSummary]:
        """Each backend's traffic from the previous batch (the first one: from the meter's
        first snapshot) to the latest snapshot: a check's new requests, each counted once."""
        base = self._batch_base if self._batch_base is not None else self._first or {}
        current = self._latest
        self._batch_base = current
        return {name: current.get(name, EMPTY).minus(base.get(name, EMPTY), 0.0)
                for name in backends}

    def windows(self, now: float, not_before: float, backends: Iterable[str]
                ) -> tuple[float, dict[str, WindowSummary]]:
        """Snapshot now, then each backend's traffic until now since the snapshot that makes
        the window at least `self.window` long but not older than `not_before` (the step's
        start); returns (seconds covered, windows)."""
        current = self.mark(now)
        want = now - self.window
        chosen: tuple[float, dict[str, Totals]] | None = None
        for t, snap in self._snaps:  # oldest first
            if t < not_before - 1e-9:
                continue
            if chosen is None or t <= want + 1e-9:
                chosen = (t, snap)  # the latest one still covering the whole window
            else:
                break
        base_time, base = chosen if chosen is not None else (now, current)
        seconds = max(0.0, now - base_time)
        return seconds, {
            name: current.get(name, EMPTY).minus(base.get(name, EMPTY), seconds)
            for name in backends
        }
