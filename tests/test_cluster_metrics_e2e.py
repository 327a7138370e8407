"""Cluster-wide metrics end to end: two in-process gateways sharing one real redis-server, real
demo model servers, real loopback sockets. Traffic is split across the two; the numbers the
admin API shows (rollout analysis, probe summary, dashboard, shadow report, alarms, drift) are
the sum over both processes, on either gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson

from gateway.shadow.stats import Tally
from tests.helpers import (
    INFER,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    running_gateway,
    wait_for,
)
from tests.redis_server import RedisServer
from tests.test_rollout_support import ROLLOUT, ROUTE, ROW

BODY = orjson.dumps(infer_body(ROW))
PROBES = {"path_suffix": "/infer",
          "output": {"prediction": "outputs[0].data",
                     "labels": ["setosa", "versicolor", "virginica"]}}
ALARM = {"name": "busy", "route": ROUTE, "metric": "rps", "backend": "blue", "window": "60s",
         "op": ">", "threshold": 1_000_000}


async def send(client: httpx.AsyncClient, n: int, prefix: str) -> None:
    """`n` requests, each with its own user key (so the canary split spreads them)."""
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            r = await client.post(INFER, content=BODY, headers={
                "x-user-id": f"{prefix}-{i}", "content-type": "application/json"})
            assert r.status_code == 200, r.text

    await asyncio.gather(*(one(i) for i in range(n)))


def local_requests(gws: tuple[RunningGateway, ...], backend: str) -> int:
    return sum(gw.gateway.recorder.stats(ROUTE, backend).totals().requests for gw in gws)


def local_counter(gws: tuple[RunningGateway, ...], backend: str, name: str) -> float:
    return sum(gw.gateway.recorder.stats(ROUTE, backend).counter_totals.get(name, 0.0)
               for gw in gws)


def local_shadow(gws: tuple[RunningGateway, ...]) -> Tally:
    out = Tally()
    for gw in gws:
        for stats in gw.gateway.recorder.all_shadow_stats():
            out.merge(stats.total)
    return out


async def get(gw: RunningGateway, path: str, **params: Any) -> Any:
    r = await gw.admin.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_admin_numbers_on_either_gateway_are_the_sum_over_both(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    config = classifier_config(blue.url, green.url, store=redis_server.url, probes=PROBES,
                               shadow={"backend": "green", "sample": 100}, alarms=[ALARM])
    async with running_gateway(config) as a, running_gateway(config) as b:
        gws = (a, b)
        assert a.gateway.metrics.cluster and b.gateway.metrics.cluster
        await wait_for(lambda: a.gateway.lease.held or b.gateway.lease.held, timeout=10,
                       message="a controller")
        leader = a if a.gateway.lease.held else b

        r = await a.admin.post(ROLLOUT, json={
            "backend": "green", "steps": [50], "interval": "1h", "check_interval": "200ms",
            "window": "5m", "gates": {"max_error_rate": 0.5, "min_requests": 1}})
        assert r.status_code == 201, r.text

        async def checked() -> bool:
            return (await get(a, ROLLOUT)).get("last_check") is not None

        # The controller's meter starts at its first check: traffic after it all counts.
        await wait_for(checked, timeout=10, message="the controller's first check")

        await asyncio.gather(send(a.client, 60, "a"), send(b.client, 90, "b"))
        for gw, n in ((a, 60), (b, 90)):  # each process served its own share of both
            mine = [gw.gateway.recorder.stats(ROUTE, x).totals().requests
                    for x in ("blue", "green")]
            assert sum(mine) == n and min(mine) > 0, mine
        blue_n, green_n = local_requests(gws, "blue"), local_requests(gws, "green")
        assert blue_n + green_n == 150
        # Every copy mirrored to the shadow has been compared (or dropped) by now.
        await wait_for(lambda: sum(local_shadow(gws).outcomes.values())
                       + local_shadow(gws).dropped == blue_n, timeout=15,
                       message="every shadow copy handled")
        shadow = local_shadow(gws)
        outputs = {x: local_counter(gws, x, "output_total") for x in ("blue", "green")}
        assert outputs == {"blue": blue_n, "green": green_n}

        for gw in gws:
            # Rollout analysis (computed by the lease holder, stored with the rollout).
            async def analysed(gw: RunningGateway = gw) -> dict[str, Any] | None:
                check = (await get(gw, ROLLOUT))["last_check"]
                ok = (check["candidate"]["requests"], check["live"]["requests"]) == (
                    green_n, blue_n)
                return check if ok else None

            await wait_for(analysed, timeout=15, message="the rollout analysis to sum up")

            # Probe summary.
            async def probed(gw: RunningGateway = gw) -> dict[str, Any] | None:
                rows = (await get(gw, f"/admin/routes/{ROUTE}/probes", window="2m"))["backends"]
                ok = all(rows[x]["requests"] == n and rows[x]["output_probed"] == outputs[x]
                         for x, n in (("blue", blue_n), ("green", green_n)))
                return rows if ok else None

            await wait_for(probed, timeout=15, message="the probe summary to sum up")

            # Dashboard: the header's figures and the per-second series.
            async def charted(gw: RunningGateway = gw) -> dict[str, Any] | None:
                route = (await get(gw, "/admin/dashboard/data", minutes=2, step=1))["routes"][0]
                ok = all(route["summary"][x]["requests"] == n
                         and sum(v or 0 for v in route["backends"][x]["requests"]) == n
                         for x, n in (("blue", blue_n), ("green", green_n)))
                return route if ok else None

            await wait_for(charted, timeout=15, message="the dashboard to sum up")

            # Shadow report: the window and the totals.
            async def reported(gw: RunningGateway = gw) -> dict[str, Any] | None:
                report = await get(gw, f"/admin/routes/{ROUTE}/shadow")
                window, total = report["window"], report["total"]
                ok = window is not None and all(
                    part[k] == shadow.summary()[k] for part in (window, total)
                    for k in ("mirrored", "compared", "agree", "disagree", "dropped",
                              "elements", "labels", "confusion"))
                return report if ok else None

            report = await wait_for(reported, timeout=15, message="the shadow report to sum up")
            assert report["window"]["mirrored"] == blue_n
            assert report["window"]["latency"]["live"]["count"] == \
                shadow.summary()["latency"]["live"]["count"]

        # Alarms: the controller evaluates them over the cluster's windows.
        async def alarmed() -> dict[str, Any] | None:
            found = (await get(leader, "/admin/alarms/busy"))
            return found if found["value"] == round(blue_n / 60, 6) else None

        await wait_for(alarmed, timeout=15, message="the alarm value over both processes")

        # Drift: the same counts on either gateway, the sum of both processes' labels.
        drift = [await get(gw, f"/admin/routes/{ROUTE}/drift", window="2m") for gw in gws]
        for x in ("blue", "green"):
            labels = sum(v for k, v in (
                (k, local_counter(gws, x, k)) for k in
                {n for gw in gws for n in gw.gateway.recorder.stats(ROUTE, x).counter_totals})
                if k.startswith("label:"))
            assert drift[0]["backends"][x]["samples"]["labels"] == labels
            assert drift[0]["backends"][x] == drift[1]["backends"][x]

        # Prometheus stays per process: each one counts only what it served.
        for gw in gws:
            text = (await gw.admin.get("/metrics")).text
            served = gw.gateway.recorder.stats(ROUTE, "blue").status_totals[2]
            assert (f'modelgate_requests_total{{backend="blue",route="{ROUTE}",'
                    f'status_class="2xx"}} {float(served)}') in text
