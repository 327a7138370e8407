"""Backend faults and overload end to end (issue #11 items 5, 6 and finding 8): real gateway,
real demo model servers (some crashed mid-test: listening socket closed, connections aborted),
loopback sockets, over both proxy servers.

- one URL of a two-URL backend refusing or killed: no client sees a failure; the URL is
  ejected after exactly `consecutive_gateway_failure` refusals;
- the retry budget caps those retries;
- a canary killed at 20 % of a rollout: with fallback every client request succeeds and the
  rollout still rolls back (the canary is charged its failures); without, clients fail;
- a canary answering 503 falls back to live;
- 3× a concurrency limit: the excess gets 503 + Retry-After at once, the admitted ones wait
  only for the backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.helpers import (
    INFER,
    ModelServer,
    RunningGateway,
    classifier_config,
    each_server,  # noqa: F401  (the fixture `server`: every test runs over each proxy server)
    infer_body,
    model_server,
    refusing_port,
    running_gateway,
    wait_for,
)
from tests.test_rollout_support import ROLLOUT, ROUTE, Traffic, events, wait_phase

BODY = orjson.dumps(infer_body([[5.1, 3.5, 1.4, 0.2]]))
HEADERS = {"content-type": "application/json"}




async def crash(server: ModelServer) -> None:
    """Kill a model server the way SIGKILL would, in-process (a subprocess costs seconds to
    start): stop listening (connects are refused) and abort every open connection."""
    runner = server.runner
    for site in list(runner.sites):
        await site.stop()
    assert runner.server is not None
    for handler in runner.server.connections:
        if handler.transport is not None:
            handler.transport.abort()


async def post(gw: RunningGateway, **headers: str) -> httpx.Response:
    return await gw.client.post(INFER, content=BODY, headers={**HEADERS, **headers})


async def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 when absent)."""
    r = await gw.admin.get("/metrics")
    assert r.status_code == 200
    for line in r.text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- one URL of a two-URL backend --------------------------------------------------------------


async def test_a_refusing_url_is_ejected_after_three_failures_and_no_client_fails(
        blue: ModelServer) -> None:
    """Sequential requests alternate between the URLs; the dead one refuses 3 times in a row
    (consecutive_gateway_failure: 3), each refused request goes to the other URL, then the
    dead URL is out and gets nothing."""
    async with refusing_port() as dead:
        config = classifier_config(blue.url, blue.url)
        config["routes"][0]["backends"]["blue"] = {"urls": [blue.url, dead]}
        async with running_gateway(config) as gw:
            statuses = [(await post(gw)).status_code for _ in range(20)]
            assert statuses == [200] * 20
            labels = {"route": ROUTE, "backend": "blue"}
            assert await metric(gw, "modelgate_outlier_ejections_total", url=dead,
                                **labels) == 1
            assert await metric(gw, "modelgate_outlier_ejections_total", url=blue.url,
                                **labels) == 0
            assert await metric(gw, "modelgate_outlier_ejected_urls", **labels) == 1
            assert await metric(gw, "modelgate_retries_total", **labels) == 3
            assert await metric(gw, "modelgate_upstream_errors_total", kind="refused",
                                **labels) == 3
            stats = gw.gateway.static[ROUTE].stats["blue"]
            assert stats.status_totals[2] == 20 and stats.status_totals[5] == 0


async def test_a_url_killed_under_load_costs_no_client_request(blue: ModelServer) -> None:
    async with model_server("v1") as second:
        config = classifier_config(blue.url, blue.url, side_effect_free=True)
        config["routes"][0]["backends"]["blue"] = {"urls": [blue.url, second.url]}
        async with running_gateway(config) as gw:
            async with Traffic(gw.client) as traffic:
                await traffic.more(40)
                await crash(second)
                await traffic.more(100)
            assert [r.status for r in traffic.results if r.status != 200] == []
            assert await metric(gw, "modelgate_outlier_ejections_total", url=second.url) == 1
            assert await metric(gw, "modelgate_retries_total", backend="blue") >= 1


async def test_the_retry_budget_caps_retries(blue: ModelServer) -> None:
    """No ejection, a budget of 0 % with a floor of 2: of the 5 requests that meet the dead
    URL, the first 2 are retried and succeed, the other 3 fail."""
    async with refusing_port() as dead:
        config = classifier_config(blue.url, blue.url,
                                   retry_budget={"percent": 0, "min_retries": 2})
        config["routes"][0]["backends"]["blue"] = {
            "urls": [blue.url, dead],
            "outlier_detection": {"consecutive_5xx": 0, "consecutive_gateway_failure": 0}}
        async with running_gateway(config) as gw:
            statuses = [(await post(gw)).status_code for _ in range(10)]
            assert sorted(statuses) == [200] * 7 + [502] * 3
            assert await metric(gw, "modelgate_retries_total", backend="blue") == 2
            assert await metric(gw, "modelgate_retry_budget_exhausted_total",
                                backend="blue") == 3


# -- canary fallback ---------------------------------------------------------------------------


def rollout_plan() -> dict[str, Any]:
    # Holds at 20 % (a long interval) until the gates fail.
    return {"backend": "green", "steps": [20, 100], "interval": "60s",
            "check_interval": "100ms", "failure_threshold": 2, "window": "10s",
            "gates": {"max_error_rate": 0.05, "min_requests": 5}}


@pytest.mark.parametrize("fallback", [True, False])
async def test_canary_killed_at_20_percent(blue: ModelServer, fallback: bool) -> None:
    """Finding 8: with fallback on, no client request fails while the dead canary is rolled
    back (its failures still reach the gates); with fallback off, clients see them."""
    async with model_server("v2") as green:
        config = classifier_config(blue.url, green.url, side_effect_free=True,
                                   fallback=fallback)
        async with running_gateway(config) as gw:
            async with Traffic(gw.client) as traffic:
                await traffic.more(20)
                r = await gw.admin.post(ROLLOUT, json=rollout_plan())
                assert r.status_code == 201, r.text
                await wait_for(lambda: traffic.seen and any(
                    "v2" in seen for seen in traffic.seen.values()), message="green answers")
                killed = len(traffic.results)
                await crash(green)
                view = await wait_phase(gw, "rolled_back", "promoted", timeout=20)
                assert view["phase"] == "rolled_back", view
                await traffic.more(50)
            log = await events(gw)
            green_stats = gw.gateway.static[ROUTE].stats["green"]
            failed = [r.status for r in traffic.results[killed:] if r.status != 200]
            if fallback:
                assert failed == []
                assert await metric(gw, "modelgate_retries_total", backend="blue") >= 1
            else:
                assert failed and set(failed) <= {502}
                assert await metric(gw, "modelgate_retries_total", backend="blue") == 0
            # Either way green was charged: the gates saw it and rolled it back.
            assert green_stats.status_totals[5] >= 2
            rollback = next(e for e in log if e["action"] == "rollout_rollback")
            assert "error_rate" in rollback["reason"]
            assert gw.gateway.control.state(ROUTE).canary_weight == 0


@asynccontextmanager
async def always_503() -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": "unavailable"}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("fallback", [True, False])
async def test_a_canary_503_is_answered_by_live(blue: ModelServer, fallback: bool) -> None:
    async with always_503() as green:
        config = classifier_config(blue.url, green, fallback=fallback,
                                   canary={"backend": "green", "weight": 100})
        async with running_gateway(config) as gw:
            responses = [await post(gw) for _ in range(6)]
            static = gw.gateway.static[ROUTE]
            assert static.stats["green"].status_totals[5] == 6  # charged either way
            if fallback:
                assert [r.status_code for r in responses] == [200] * 6
                assert {r.headers["x-model-version"] for r in responses} == {"v1"}
                assert static.stats["blue"].status_totals[2] == 6
            else:
                assert [r.status_code for r in responses] == [503] * 6


async def test_no_fallback_for_a_request_to_live(blue: ModelServer) -> None:
    """Fallback is for the canary only: a failing live backend's error reaches the client."""
    async with refusing_port() as dead:
        config = classifier_config(dead, blue.url, side_effect_free=True,
                                   canary={"backend": "green", "weight": 0})
        async with running_gateway(config) as gw:
            assert (await post(gw)).status_code == 502


# -- overload ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["route", "backend"])
async def test_three_times_capacity_gets_503_at_once_and_admitted_wait_only_for_backend(
        scope: str) -> None:
    latency = 0.5
    capacity = 4
    async with model_server("v1", latency_ms=latency * 1000) as slow:
        config = classifier_config(slow.url, slow.url)
        limits = {"max_concurrency": capacity, "retry_after": 2}
        if scope == "route":
            config["routes"][0]["limits"] = limits
        else:
            config["routes"][0]["backends"]["blue"]["limits"] = limits
        async with running_gateway(config) as gw:
            async def one() -> tuple[httpx.Response, float, float]:
                started = time.monotonic()
                r = await post(gw)
                return r, time.monotonic() - started, time.monotonic()

            results = await asyncio.gather(*(one() for _ in range(3 * capacity)))
            admitted = [(t, end) for r, t, end in results if r.status_code == 200]
            refused = [(r, t, end) for r, t, end in results if r.status_code != 200]
            assert len(admitted) == capacity
            assert len(refused) == 2 * capacity
            for r, _, _ in refused:
                assert r.status_code == 503 and r.headers["retry-after"] == "2"
                assert r.json()["error"] == "overloaded" and r.json()["scope"] == scope
            # Refused at once: every refusal was in before the backend answered anyone...
            assert max(end for _, _, end in refused) < min(end for _, end in admitted)
            # ... and the admitted waited for the backend only, in no queue.
            assert all(latency <= t < 2 * latency for t, _ in admitted)
            assert (await post(gw)).status_code == 200  # the gate is free again

            static = gw.gateway.static[ROUTE]
            gate = static.gate if scope == "route" else static.backends["blue"].gate
            assert gate is not None and gate.count == 0
            # Not the backend's errors: its stats saw only the admitted requests.
            assert static.stats["blue"].status_totals[2] == capacity + 1
            assert static.stats["blue"].status_totals[5] == 0
            assert await metric(gw, "modelgate_overload_rejections_total",
                                scope=scope) == 2 * capacity


# -- active health checks -----------------------------------------------------------------------


class Flaky:
    """A backend whose readiness status is set by the test; counts the requests it serves."""

    def __init__(self) -> None:
        self.health = 200
        self.served = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Flaky:
        async def healthz(request: web.Request) -> web.Response:
            return web.Response(status=self.health)

        async def infer(request: web.Request) -> web.Response:
            await request.read()
            self.served += 1
            return web.json_response({"model_version": "flaky"})

        app = web.Application()
        app.router.add_get("/v2/health/ready", healthz)
        app.router.add_post("/{tail:.*}", infer)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_active_health_checks_take_a_url_out_and_back(blue: ModelServer) -> None:
    async with Flaky() as flaky:
        config = classifier_config(blue.url, blue.url)
        config["routes"][0]["backends"]["blue"] = {
            "urls": [blue.url, flaky.url],
            "health_check": {"path": "/v2/health/ready", "interval": "50ms", "timeout": "1s",
                             "healthy_threshold": 2, "unhealthy_threshold": 2}}
        async with running_gateway(config) as gw:
            gateway = gw.gateway
            backend = gateway.static[ROUTE].backends["blue"]
            outliers = backend.outliers
            assert outliers is not None and gateway.health.running == 1
            checks = gateway.health.backends[0]
            await wait_for(lambda: checks.rounds >= 2, message="two rounds of checks")
            assert [(await post(gw)).status_code for _ in range(4)] == [200] * 4
            assert flaky.served == 2  # in: round-robin gives it half

            flaky.health = 503
            await wait_for(lambda: outliers.is_ejected(1, time.monotonic()),
                           message="the failing URL taken out")
            before = flaky.served
            assert [(await post(gw)).status_code for _ in range(6)] == [200] * 6
            assert flaky.served == before
            assert await metric(gw, "modelgate_outlier_ejected_urls", backend="blue") == 1

            flaky.health = 200
            await wait_for(lambda: not outliers.is_ejected(1, time.monotonic()),
                           message="the URL back after two passed checks")
            assert [(await post(gw)).status_code for _ in range(4)] == [200] * 4
            assert flaky.served == before + 2
        # Stopped with the gateway: the task is cancelled and awaited.
        assert gateway.health.running == 0 and gateway.health._tasks == []
