"""Cluster-wide metrics: several processes' numbers summed through a real redis-server.

Each test plays two or three gateway "processes" in one event loop: a `Recorder` and a
`ClusterMetrics` each, with their own member id, on one controllable clock. Publishing and
reading are driven step by step (`publish_once`, `read_once`), except where the background
loops themselves are under test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from operator import add
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.cluster.metrics import ClusterMetrics, LocalMetrics, metrics_source
from gateway.metrics import EMPTY, Recorder, Totals, WindowSummary
from gateway.rollout.analysis import Meter
from gateway.shadow.compare import Comparison
from gateway.shadow.stats import Tally
from gateway.store import InMemoryStore
from tests.helpers import wait_for
from tests.redis_server import RedisServer

NS = "test"
ROUTE = "classifier"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Proc:
    """One gateway process as far as metrics go."""

    recorder: Recorder
    metrics: ClusterMetrics

    def observe(self, backend: str, n: int, status: int = 200, latency: float = 0.01) -> None:
        stats = self.recorder.stats(ROUTE, backend)
        for _ in range(n):
            stats.observe(status, latency)


def client(url: str) -> aioredis.Redis:
    # Like the store's: short timeouts, one quick retry on a connection error (a pooled
    # connection that died with the server); a batch sent twice is applied once.
    return aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1,
                                   retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1,
                                               supported_errors=(RedisConnectionError,)))


@asynccontextmanager
async def cluster(url: str, clock: Callable[[], float], n: int = 2, interval: float = 1.0
                  ) -> AsyncIterator[list[Proc]]:
    async with AsyncExitStack() as stack:
        procs = []
        for i in range(n):
            redis = client(url)
            stack.push_async_callback(redis.aclose)
            recorder = Recorder(clock)
            procs.append(Proc(recorder, ClusterMetrics(redis, NS, f"host:{i}:abc", recorder,
                                                       clock=clock, interval=interval)))
        yield procs


def summed(*windows: WindowSummary) -> WindowSummary:
    out = WindowSummary(seconds=windows[0].seconds)
    for w in windows:
        out.requests += w.requests
        out.errors += w.errors
        out.latency_sum += w.latency_sum
        out.hist = list(map(add, out.hist, w.hist))
        for name, value in w.counters.items():
            out.counters[name] = out.counters.get(name, 0.0) + value
    return out


def assert_same(got: WindowSummary, want: WindowSummary) -> None:
    assert (got.requests, got.errors) == (want.requests, want.errors)
    assert got.hist == want.hist  # bucket by bucket: latency quantiles merge exactly
    assert got.counters == pytest.approx(want.counters)
    assert got.latency_sum == pytest.approx(want.latency_sum, rel=1e-12)
    assert got.quantile(0.99) == want.quantile(0.99)


def assert_totals(got: Totals, *parts: Totals) -> None:
    want = EMPTY
    for part in parts:
        want = want.plus(part)
    assert (got.requests, got.errors, got.hist) == (want.requests, want.errors, want.hist)
    assert dict(got.counters) == pytest.approx(dict(want.counters))
    assert got.latency_sum == pytest.approx(want.latency_sum, rel=1e-12)


def comparison(labels: list[tuple[str, str]], delta: float = 0.0) -> Comparison:
    c = Comparison("auto")
    c.labels = len(labels)
    c.labels_agree = sum(a == b for a, b in labels)
    c.confusion = labels
    c.numbers = 1
    c.numbers_agree = delta <= 1e-6
    c.delta_sum = c.delta_max = delta
    return c


# -- sums -----------------------------------------------------------------------------------
async def test_windows_series_and_totals_are_the_exact_sum(redis_server: RedisServer) -> None:
    clock = Clock(1000.0)
    async with cluster(redis_server.url, clock, n=3) as (a, b, reader):
        a.observe("blue", 10, latency=0.004)
        a.observe("blue", 2, status=503, latency=0.3)
        a.observe("green", 5, latency=0.05)
        a.recorder.stats(ROUTE, "blue").add_many([("output_total", 7.0), ("output_null", 1.0),
                                                  ("label:setosa", 3.0)])
        b.observe("blue", 4, latency=0.012)
        b.observe("blue", 1, status=500, latency=1.5)
        b.recorder.stats(ROUTE, "blue").add_many([("output_total", 2.0),
                                                  ("label:ver\x1fsi color", 1.0)])
        clock.now = 1001.5
        a.observe("blue", 3, latency=0.02)
        b.observe("blue", 6, latency=0.002)
        b.observe("green", 1, status=404, latency=0.07)
        clock.now = 1002.2
        for p in (a, b):
            await p.metrics.publish_once()
        for p in (a, b, reader):
            await p.metrics.read_once()

        for p in (a, b, reader):  # every process sees the same sums, a reader with no traffic too
            for backend in ("blue", "green"):
                view = p.metrics.backend(ROUTE, backend)
                mine, theirs = a.recorder.stats(ROUTE, backend), b.recorder.stats(ROUTE, backend)
                for seconds in (1, 2, 60, 900):
                    assert_same(view.window(seconds, now=1001),
                                summed(mine.window(seconds, 1001), theirs.window(seconds, 1001)))
                # Without `now`: up to the last completed second.
                assert_same(view.window(60), summed(mine.window(60, 1001),
                                                     theirs.window(60, 1001)))
                series = view.series(60, 5, now=1001)
                for got, x, y in zip(series, mine.series(60, 5, now=1001),
                                     theirs.series(60, 5, now=1001), strict=True):
                    assert_same(got, summed(x, y))
                assert_totals(view.totals(), mine.totals(), theirs.totals())
        view = reader.metrics.backend(ROUTE, "blue")
        assert (view.window(60).requests, view.totals().requests) == (26, 26)
        # The current second is published once it is over, and nothing is counted twice.
        a.observe("blue", 1)
        for p in (a, b):
            await p.metrics.publish_once()
        await reader.metrics.read_once()
        assert (view.window(60).requests, view.totals().requests) == (26, 26)
        clock.now = 1003.2
        for p in (a, b):
            await p.metrics.publish_once()
        for _ in range(2):
            await reader.metrics.read_once()
        assert (view.window(60).requests, view.totals().requests) == (27, 27)


async def test_shadow_tallies_and_agreement_sum(redis_server: RedisServer) -> None:
    clock = Clock(1000.0)
    async with cluster(redis_server.url, clock, n=3) as (a, b, reader):
        sa = a.recorder.shadow_stats(ROUTE, "green", 60)
        sb = b.recorder.shadow_stats(ROUTE, "green", 60)
        sa.record("agree", 0.010, 0.020, comparison([("a", "a"), ("b", "b")], 0.5))
        sa.record("disagree", 0.010, 0.030, comparison([("a", "b")], 0.25))
        sa.drop()
        sb.record("agree", 0.011, 0.021, comparison([("a", "a")]))
        sb.record("shadow_timeout", None, None, None)
        sb.drop(shadow_down=True)
        clock.now = 1001.4
        sb.record("disagree", 0.5, 0.75, comparison([("c", "a"), ('odd "label"', "b")], 2.0))
        clock.now = 1002.3
        for p in (a, b):
            await p.metrics.publish_once()
        for p in (a, b, reader):
            await p.metrics.read_once()

        want = Tally()
        want.merge(sa.window_tally(60))
        want.merge(sb.window_tally(60))
        total = Tally()
        total.merge(sa.total)
        total.merge(sb.total)
        assert want.compared == 4
        for p in (a, b, reader):
            view = p.metrics.shadow(ROUTE, "green")
            assert view is not None and view.backend == "green"
            assert view.window_tally(60).summary() == want.summary()
            assert view.total.summary() == total.summary()
            assert view.agreement(60) == (want.compared, want.agreement_rate)
            assert view.since == min(sa.since, sb.since)
        assert reader.metrics.shadow(ROUTE, "blue") is None  # nobody compared against it
        # a window of the last completed second only
        last = reader.metrics.shadow(ROUTE, "green")
        assert last is not None and last.agreement(1) == (1, 0.0)


async def test_a_stopped_process_counts_until_its_seconds_age_out(
        redis_server: RedisServer) -> None:
    clock = Clock(1000.0)
    async with cluster(redis_server.url, clock, n=2) as (a, reader):
        redis = client(redis_server.url)
        try:
            a.observe("blue", 4)
            clock.now = 1000.5
            await a.metrics.stop()  # the last publish takes the current second too
            clock.now = 1001.3
            await reader.metrics.read_once()
            assert reader.metrics.backend(ROUTE, "blue").window(60).requests == 4
            ttl = await redis.ttl(f"{NS}:m:s:1000")
            assert 900 < ttl <= 960  # then Redis drops it

            clock.now = 1600.3  # ten minutes later its traffic still counts...
            await reader.metrics.read_once()
            assert reader.metrics.backend(ROUTE, "blue").window(900).requests == 4
            clock.now = 1901.3  # ...until it leaves the 15-minute window
            await reader.metrics.read_once()
            assert reader.metrics.backend(ROUTE, "blue").window(900).requests == 0
            assert reader.metrics.backend(ROUTE, "blue").totals().requests == 4  # cumulative
        finally:
            await redis.aclose()


# -- failures -------------------------------------------------------------------------------
async def test_redis_lost_and_back_nothing_lost_nothing_twice(
        redis_server: RedisServer) -> None:
    clock = Clock(1000.0)
    async with cluster(redis_server.url, clock, n=2) as (a, reader):
        a.observe("blue", 20)
        clock.now = 1001.1
        await a.metrics.publish_once()
        await reader.metrics.read_once()
        view = reader.metrics.backend(ROUTE, "blue")
        assert (view.window(60).requests, view.totals().requests) == (20, 20)
        meter = Meter({"blue": view}, window=60)
        meter.mark(1001.1, force=True)

        redis_server.kill()  # no persistence: everything in Redis is gone
        a.observe("blue", 7)
        clock.now = 1002.5
        a.observe("blue", 3)
        clock.now = 1006.1
        with pytest.raises((RedisError, OSError)):
            await a.metrics.publish_once()
        with pytest.raises((RedisError, OSError)):
            await reader.metrics.read_once()
        redis_server.start()
        clock.now = 1006.2
        await a.metrics.publish_once()
        await reader.metrics.read_once()

        # Per second: what was observed meanwhile is there; the second Redis lost is kept.
        assert view.window(60).requests == 30
        assert [view.window(1, now=s).requests for s in (1000, 1001, 1002)] == [20, 7, 3]
        # The totals go on from where they were: the gates' window is exact.
        assert view.totals().requests == 30
        _, windows = meter.windows(1006.2, not_before=0, backends=("blue",))
        assert windows["blue"].requests == 10
        # Nothing goes out twice.
        await a.metrics.publish_once()
        await reader.metrics.read_once()
        assert (view.window(60).requests, view.totals().requests) == (30, 30)


async def test_a_batch_applied_but_unconfirmed_is_not_applied_again(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(1000.0)
    async with cluster(redis_server.url, clock, n=2) as (a, reader):
        real = a.metrics._apply_script
        calls = []

        async def lost_reply(**kwargs: Any) -> Any:
            calls.append(kwargs["args"][0])
            result = await real(**kwargs)
            if len(calls) == 1:
                raise RedisConnectionError("connection lost before the reply")
            return result

        monkeypatch.setattr(a.metrics, "_apply_script", lost_reply)
        a.observe("blue", 5)
        clock.now = 1001.2
        with pytest.raises(RedisConnectionError):
            await a.metrics.publish_once()
        a.observe("blue", 2)  # meanwhile, in second 1001
        clock.now = 1001.6
        await a.metrics.stop()  # the same batch again (skipped by Redis), then the rest
        clock.now = 1002.2
        await reader.metrics.read_once()
        assert calls[0] == calls[1] != calls[2]  # the same batch number was sent again
        view = reader.metrics.backend(ROUTE, "blue")
        assert (view.window(60).requests, view.totals().requests) == (7, 7)


async def test_a_late_publisher_is_read_by_readers_that_went_on_meanwhile(
        redis_server: RedisServer) -> None:
    clock = Clock(1000.0)
    async with cluster(redis_server.url, clock, n=3) as (late, reader, fresh):
        for second in (1000, 1001, 1002):
            clock.now = second + 0.5
            late.observe("blue", second - 999)
        for second in range(1003, 1011):  # the reader reads every second, sees nothing
            clock.now = second + 0.3
            await reader.metrics.read_once()
        assert reader.metrics.backend(ROUTE, "blue").window(60).requests == 0
        clock.now = 1010.1
        await late.metrics.publish_once()  # cut off until now: seconds 1000-1002 are late
        clock.now = 1010.3
        await reader.metrics.read_once()
        await fresh.metrics.read_once()  # a process started now loads the history
        for p in (reader, fresh):
            view = p.metrics.backend(ROUTE, "blue")
            assert [view.window(1, now=s).requests for s in (1000, 1001, 1002)] == [1, 2, 3]


async def test_loops_ride_out_an_outage_log_it_once_and_catch_up(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelgate.cluster")
    async with cluster(redis_server.url, time.time, n=2, interval=0.2) as (a, reader):
        attempts = []
        real = a.metrics.publish_once

        async def counted(*, final: bool = False) -> None:
            attempts.append(time.monotonic())
            await real(final=final)

        a.metrics.publish_once = counted  # type: ignore[method-assign]
        await a.metrics.start()
        await reader.metrics.start()
        try:
            a.observe("blue", 5)
            view = reader.metrics.backend(ROUTE, "blue")
            await wait_for(lambda: view.totals().requests == 5, message="the first 5")
            redis_server.kill()
            a.observe("blue", 3)  # to publish once its second is over: it will fail

            def failed() -> bool:
                return any(r.getMessage().startswith("cluster metrics: cannot publish")
                           for r in caplog.records)

            await wait_for(failed, message="the publisher to notice the outage")
            began = len(attempts)
            t0 = time.monotonic()
            await wait_for(lambda: len(attempts) >= began + 3, message="retries")
            elapsed = time.monotonic() - t0
            # Backing off, not spinning: never closer than a fifth of the interval.
            assert len(attempts) - began <= elapsed / 0.04 + 2
            redis_server.start()
            await wait_for(lambda: view.window(60).requests == 8, message="the 3 from meanwhile")
            assert view.totals().requests == 8
        finally:
            await reader.metrics.stop()
            await a.metrics.stop()
    # Once per loop and outage: a's publisher (the reader has nothing to publish, so it does
    # not call Redis), and both readers.
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("cluster metrics: cannot publish")]) == 1
    assert len([m for m in messages if m.startswith("cluster metrics: cannot read")]) == 2
    assert messages.count("cluster metrics: publish works again") == 1
    assert messages.count("cluster metrics: read works again") == 2
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("modelgate-metrics")]


# -- the rollout meter and the local source ------------------------------------------------
class Source:
    def __init__(self) -> None:
        self.value = EMPTY

    def set(self, requests: int, errors: int = 0) -> None:
        hist = [0] * len(EMPTY.hist)
        hist[3] = requests
        self.value = Totals(requests, errors, requests * 0.01, tuple(hist),
                            (("output_total", float(requests)),))

    def totals(self) -> Totals:
        return self.value


def test_meter_counts_a_reset_like_prometheus_and_never_goes_negative() -> None:
    src = Source()
    meter = Meter({"green": src}, window=100)
    src.set(10, 2)
    meter.mark(0, force=True)
    src.set(15, 3)
    meter.mark(1, force=True)
    src.set(3, 0)  # the counters started again
    meter.mark(2, force=True)
    src.set(8, 1)
    _, windows = meter.windows(3, not_before=0, backends=("green",))
    w = windows["green"]
    assert (w.requests, w.errors) == (5 + 3 + 5, 1 + 0 + 1)
    assert w.hist[3] == 13 and w.counters["output_total"] == 13.0
    _, windows = meter.windows(3, not_before=1.5, backends=("green",))
    assert windows["green"].requests == 5  # since the snapshot right after the reset

    # Whatever the sequence, no number of any window is negative.
    src3 = Source()
    meter3 = Meter({"green": src3}, window=1000)
    for t, n in enumerate([5, 9, 2, 2, 40, 1, 0, 7, 3]):
        src3.set(n, n // 3)
        _, windows = meter3.windows(float(t), not_before=0, backends=("green",))
        w = windows["green"]
        assert w.requests >= 0 and w.errors >= 0 and w.latency_sum >= -1e-9
        assert min(w.hist) >= 0 and min(w.counters.values(), default=0) >= 0


def test_local_source_is_the_recorders_own_objects() -> None:
    recorder = Recorder()
    source = metrics_source(InMemoryStore(), "me", recorder)
    assert isinstance(source, LocalMetrics) and not source.cluster and source.lag == 0
    assert source.backend(ROUTE, "blue") is recorder.stats(ROUTE, "blue")
    assert source.shadow(ROUTE, "green") is None
    shadow = recorder.shadow_stats(ROUTE, "green", 60)
    assert source.shadow(ROUTE, "green") is shadow
    assert recorder.all_shadow_stats() == [shadow]
