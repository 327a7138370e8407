"""Blue-green and canary changes under steady concurrent traffic through the gateway.

The promise: a switch, a rollback or a weight change fails no request; a request sent after
the admin call returned goes to the new backend; a request already in flight finishes on the
backend it started on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from tests.helpers import (
    INFER,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    running_gateway,
    wait_for,
)

ROW = [5.1, 3.5, 1.4, 0.2]
LOOPS = 12


@dataclass
class Result:
    sent: float
    done: float
    status: int  # -1: the request raised
    version: str | None
    user: str


@dataclass
class Traffic:
    results: list[Result] = field(default_factory=list)

    def after(self, moment: float) -> list[Result]:
        """Requests sent after `moment` (monotonic)."""
        return [r for r in self.results if r.sent > moment]

    def failures(self) -> list[Result]:
        return [r for r in self.results if not 200 <= r.status < 300]

    async def more(self, n: int) -> None:
        """Wait until `n` more requests have finished."""
        target = len(self.results) + n
        await wait_for(lambda: len(self.results) >= target, timeout=30,
                       message=f"{n} more requests")


@asynccontextmanager
async def steady_traffic(gw: RunningGateway, loops: int = LOOPS) -> AsyncIterator[Traffic]:
    """`loops` clients each sending requests back to back, many users, until the block ends."""
    traffic = Traffic()
    stop = asyncio.Event()
    counter = itertools.count()

    async def loop(n: int) -> None:
        while not stop.is_set():
            user = f"user-{n}-{next(counter) % 50}"
            sent = time.monotonic()
            try:
                r = await gw.client.post(INFER, json=infer_body([ROW]),
                                         headers={"x-user-id": user})
                version = r.json().get("model_version") if r.status_code == 200 else None
                traffic.results.append(Result(sent, time.monotonic(), r.status_code, version,
                                              user))
            except httpx.HTTPError:
                traffic.results.append(Result(sent, time.monotonic(), -1, None, user))

    tasks = [asyncio.create_task(loop(n)) for n in range(loops)]
    try:
        await traffic.more(loops * 2)
        yield traffic
    finally:
        stop.set()
        await asyncio.gather(*tasks)  # each finishes its current request and returns


def versions(results: list[Result]) -> set[str | None]:
    return {r.version for r in results}


async def switch_to_green(gw: RunningGateway) -> httpx.Response:
    return await gw.admin.post("/admin/routes/classifier/switch", json={"to": "green"})


async def rollback(gw: RunningGateway) -> httpx.Response:
    return await gw.admin.post("/admin/routes/classifier/rollback")


@pytest.mark.parametrize("kind", ["aiohttp", "fast"])
async def test_switch_and_rollback_under_traffic_fail_nothing(
    blue: ModelServer, green: ModelServer, kind: str
) -> None:
    async with running_gateway(classifier_config(blue.url, green.url),
                               upstream_kind=kind) as gw, steady_traffic(gw) as traffic:
        assert versions(traffic.results) == {"v1"}

        # (sent after a call returned, finished before the next call started)
        windows: list[tuple[str, float, float]] = []
        for call, expected in ((switch_to_green, "v2"), (rollback, "v1"),
                               (switch_to_green, "v2")):
            if windows:
                windows[-1] = (windows[-1][0], windows[-1][1], time.monotonic())
            r = await call(gw)
            assert r.status_code == 200, r.text
            windows.append((expected, time.monotonic(), float("inf")))
            await traffic.more(60)

    assert traffic.failures() == []
    for expected, returned, next_call in windows:
        window = [r for r in traffic.after(returned) if r.done < next_call]
        assert len(window) >= 30 and versions(window) == {expected}


async def test_canary_weight_changes_under_traffic_fail_nothing(
    blue: ModelServer, green: ModelServer
) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw, \
            steady_traffic(gw) as traffic:
        # weight -> (call returned, next call started)
        marks: dict[float, tuple[float, float]] = {}
        last: float | None = None
        for weight in (10, 25, 50, 100, 0):
            if last is not None:
                marks[last] = (marks[last][0], time.monotonic())
            r = await gw.admin.put("/admin/routes/classifier/canary",
                                   json={"backend": "green", "weight": weight})
            assert r.status_code == 200, r.text
            marks[weight] = (time.monotonic(), float("inf"))
            last = weight
            await traffic.more(50)

    assert traffic.failures() == []
    by_weight = {
        weight: [r for r in traffic.after(returned) if r.done < next_call]
        for weight, (returned, next_call) in marks.items()
    }
    assert all(len(window) >= 25 for window in by_weight.values())
    assert versions(by_weight[100]) == {"v2"}
    assert versions(by_weight[0]) == {"v1"}
    assert versions(by_weight[50]) == {"v1", "v2"}
    # Sticky during the ramp: a user on the canary at 10% is never back on blue at 25% or 50%.
    on_canary_at_10 = {r.user for r in by_weight[10] if r.version == "v2"}
    later = by_weight[25] + by_weight[50]
    assert all(r.version == "v2" for r in later if r.user in on_canary_at_10)


@asynccontextmanager
async def slow(server: ModelServer, latency_ms: float) -> AsyncIterator[None]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as direct:
        r = await direct.post("/faults", json={"latency_ms": latency_ms})
        assert r.status_code == 200
        try:
            yield
        finally:
            await direct.post("/faults", json={"latency_ms": 0})


async def test_requests_in_flight_finish_on_the_backend_they_started_on(
    blue: ModelServer, green: ModelServer
) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        proxy = gw.gateway.proxy

        async def infer(user: str) -> httpx.Response:
            return await gw.client.post(INFER, json=infer_body([ROW]),
                                        headers={"x-user-id": user})

        # Blue answers slowly: start requests, switch while they wait on blue.
        async with slow(blue, 500):
            in_flight = [asyncio.create_task(infer(f"a{i}")) for i in range(8)]
            await wait_for(lambda: proxy.in_flight == 8, message="8 requests in flight")
            r = await gw.admin.post("/admin/routes/classifier/switch", json={"to": "green"})
            assert r.status_code == 200, r.text
            assert not any(t.done() for t in in_flight)  # they are still waiting on blue
            after = await infer("new-user")
            assert after.status_code == 200 and after.json()["model_version"] == "v2"
            old = await asyncio.gather(*in_flight)
        assert [r.status_code for r in old] == [200] * 8
        assert {r.json()["model_version"] for r in old} == {"v1"}

        # And back: green slow, roll back while requests wait on green.
        async with slow(green, 500):
            in_flight = [asyncio.create_task(infer(f"b{i}")) for i in range(8)]
            await wait_for(lambda: proxy.in_flight == 8, message="8 requests in flight")
            r = await gw.admin.post("/admin/routes/classifier/rollback")
            assert r.status_code == 200, r.text
            assert not any(t.done() for t in in_flight)
            after = await infer("new-user")
            assert after.status_code == 200 and after.json()["model_version"] == "v1"
            old = await asyncio.gather(*in_flight)
        assert [r.status_code for r in old] == [200] * 8
        assert {r.json()["model_version"] for r in old} == {"v2"}


async def test_switch_to_any_named_backend(blue: ModelServer, green: ModelServer) -> None:
    cfg = classifier_config(blue.url, green.url)
    cfg["routes"][0]["backends"]["red"] = {"urls": [green.url, blue.url]}  # two URLs, balanced
    async with running_gateway(cfg) as gw:
        r = await gw.admin.post("/admin/routes/classifier/switch", json={"to": "red"})
        assert r.status_code == 200, r.text
        seen = {(await gw.client.post(INFER, json=infer_body([ROW]))).json()["model_version"]
                for _ in range(6)}
        assert seen == {"v1", "v2"}  # round-robin over red's two URLs
        r = await gw.admin.post("/admin/routes/classifier/rollback")
        assert r.json()["live"] == "blue"
