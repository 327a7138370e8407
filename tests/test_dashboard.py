"""The dashboard's page, static files and data endpoint.

Pure parts (parameters, series from per-second slots, state history) are tested directly;
the endpoint end to end over loopback sockets with the real demo model servers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.admin.dashboard import (
    MAX_POINTS,
    STATIC_DIR,
    Params,
    StateSample,
    backend_series,
    parse_params,
    state_series,
)
from gateway.app import Gateway
from gateway.config import RouteConfig
from gateway.errors import InvalidRequest
from gateway.metrics import BackendStats
from gateway.routing import Tap
from gateway.state import RouteState
from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    running_gateway,
    wait_for,
)

DATA = "/admin/dashboard/data"


# -- pure ------------------------------------------------------------------------------------
def test_params_defaults_and_limits() -> None:
    assert parse_params({}) == Params(15, 5, None)
    assert parse_params({"minutes": "1", "step": "1", "route": "r"}) == Params(1, 1, "r")
    assert parse_params({"minutes": "15", "step": "3"}) == Params(15, 3, None)


@pytest.mark.parametrize(("query", "message"), [
    ({"minutes": "0"}, "minutes: must be from 1 to 15"),
    ({"minutes": "16"}, "minutes: must be from 1 to 15"),
    ({"minutes": "five"}, "minutes: must be a whole number"),
    ({"step": "0"}, "step: must be from 1 to 60"),
    ({"step": "2.5"}, "step: must be a whole number"),
    ({"minutes": "1", "step": "61"}, "step: must be from 1 to 60"),
    ({"minutes": "15", "step": "2"}, f"at most {MAX_POINTS} points"),
    ({"route": ""}, "route: must be a route name"),
    ({"minute": "5"}, "unknown parameter 'minute'"),
])
def test_params_refused(query: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_params(query)


def test_backend_series_from_slots() -> None:
    now = [1000.0]
    stats = BackendStats("r", "blue", clock=lambda: now[0])
    for second, ok, failed in ((991, 10, 0), (992, 6, 2), (996, 5, 0)):
        now[0] = second + 0.5
        for _ in range(ok):
            stats.observe(200, 0.010)
        for _ in range(failed):
            stats.observe(502, 0.200)
    now[0] = 996.5
    stats.add("output_total", 4)
    stats.add("output_null", 1)
    stats.add("input_values", 20)
    stats.add("input_missing", 5)
    # three 5-second buckets ending at second 999: [985-989], [990-994], [995-999]
    out = backend_series(stats.series(15, 5, now=999))
    assert out["requests"] == [0, 18, 5]
    assert out["rps"] == [0.0, 3.6, 1.0]
    assert out["error_rate"] == [None, round(2 / 18, 4), 0.0]
    assert out["p50_ms"][0] is None and out["p99_ms"][0] is None
    assert 9 <= out["p50_ms"][1] <= 11 and 180 <= out["p99_ms"][1] <= 220
    assert out["non_null"] == [None, None, 0.75]
    assert out["input_missing"] == [None, None, 0.25]
    # buckets from before the gateway started are blank, not zero
    blanked = backend_series(stats.series(15, 5, now=999), blank=1)
    assert blanked["rps"] == [None, 3.6, 1.0]
    assert blanked["requests"] == [None, 18, 5]


def test_state_series_follows_samples() -> None:
    blue = RouteState(live="blue")
    canary = RouteState(live="blue", canary="green", canary_weight=25)
    green = RouteState(live="green", previous="blue")
    samples = [
        StateSample.of(101, blue),
        StateSample.of(103, canary, pairs=10, agreement=0.5),
        StateSample.of(104, canary, pairs=30, agreement=0.9),
        StateSample.of(108, green),
    ]
    times = [100.0, 105.0, 110.0]  # buckets (95, 100], (100, 105], (105, 110]
    out = state_series(samples, times, 5, ["blue", "green"])
    assert out["live"] == [None, "blue", "green"]
    assert out["canary"] == [None, "green", None]
    assert out["canary_weight"] == [None, 25.0, 0.0]
    assert out["traffic"] == {"blue": [None, 75.0, 0.0], "green": [None, 25.0, 100.0]}
    assert out["shadow_pairs"] == [0, 40, 0]
    assert out["shadow_agreement"] == [None, 0.8, None]  # weighted by pairs


# -- end to end ------------------------------------------------------------------------------
async def data(gw: RunningGateway, **query: Any) -> dict[str, Any]:
    r = await gw.admin.get(DATA, params=query)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def send(gw: RunningGateway, n: int) -> None:
    for i in range(n):
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                 headers={"x-user-id": f"u{i}"})
        assert r.status_code == 200, r.text


async def test_page_and_assets_need_no_token(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url) as anonymous:
        r = await anonymous.get("/dashboard")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        page = r.text
        for asset, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css"),
                            ("vendor/uPlot.iife.min.js", "javascript"),
                            ("vendor/uPlot.min.css", "text/css")):
            assert f"/dashboard/static/{asset}" in page
            r = await anonymous.get(f"/dashboard/static/{asset}")
            assert r.status_code == 200, asset
            assert kind in r.headers["content-type"]
            assert r.content == (STATIC_DIR / asset).read_bytes()
        assert "v1.6.32" in (STATIC_DIR / "vendor/uPlot.iife.min.js").read_text()[:100]
        assert "MIT License" in (STATIC_DIR / "vendor/uPlot.LICENSE").read_text()
        r = await anonymous.get("/dashboard/")
        assert r.status_code == 302 and r.headers["location"] == "/dashboard"
        # nothing outside the static folder
        r = await anonymous.get("/dashboard/static/../dashboard.py")
        assert r.status_code == 404
        r = await anonymous.get("/dashboard/static/%2e%2e/dashboard.py")
        assert r.status_code in (403, 404)


async def test_data_needs_the_token(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url) as anonymous:
        r = await anonymous.get(DATA)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
        r = await anonymous.get(DATA, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        r = await anonymous.get(DATA, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200


async def test_data_validates_params(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        for query in ({"minutes": "0"}, {"minutes": "x"}, {"step": "0"}, {"step": "61"},
                      {"minutes": "15", "step": "1"}, {"bogus": "1"}):
            r = await gw.admin.get(DATA, params=query)
            assert r.status_code == 400, query
            assert r.json()["error"] == "invalid_request"
        r = await gw.admin.get(DATA, params={"route": "nope"})
        assert r.status_code == 404
        assert "nope" in r.json()["message"]
        body = await data(gw, route="classifier", minutes=2, step=10)
        assert [route["name"] for route in body["routes"]] == ["classifier"]
        assert len(body["routes"][0]["time"]) == 12


async def test_series_after_traffic_and_a_switch(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        await send(gw, 20)

        async def blue_counted() -> dict[str, Any] | None:
            body = await data(gw, minutes=1, step=1)
            route = body["routes"][0]
            return body if route["summary"]["blue"]["requests"] == 20 else None

        body = await wait_for(blue_counted, timeout=10, interval=0.2,
                              message="20 blue requests in the dashboard data")
        assert 1 <= body["summary_seconds"] <= 60  # the last minute, or since start
        route = body["routes"][0]
        assert route["state"]["live"] == "blue"
        assert set(route["backends"]) == {"blue", "green"}
        series = route["backends"]["blue"]
        n = len(route["time"])
        assert n >= 60 and all(len(v) == n for v in series.values())
        assert route["time"] == sorted(route["time"])
        assert sum(v for v in series["requests"] if v) == 20
        assert max(v for v in series["rps"] if v is not None) > 0
        assert any(isinstance(v, float) and v > 0 for v in series["p99_ms"])
        assert {v for v in series["error_rate"] if v is not None} == {0.0}
        assert route["backends"]["green"]["requests"][-1] in (0, None)
        assert route["summary"]["blue"]["rps"] > 0
        assert route["summary"]["green"]["requests"] == 0

        r = await gw.admin.post("/admin/routes/classifier/switch",
                                json={"to": "green", "reason": "dashboard test"})
        assert r.status_code == 200, r.text

        async def switched() -> dict[str, Any] | None:
            body = await data(gw, minutes=1, step=1)
            route = body["routes"][0]
            ok = route["state"]["live"] == "green" and route["live"][-1] == "green"
            return route if ok else None

        route = await wait_for(switched, timeout=10, interval=0.2,
                               message="the switch in the live-backend history")
        assert "blue" in route["live"]  # before the switch
        assert route["traffic"]["green"][-1] == 100.0
        assert route["traffic"]["blue"][-1] == 0.0
        await send(gw, 5)

        async def green_counted() -> dict[str, Any] | None:
            body = await data(gw, minutes=1, step=1)
            return body if body["routes"][0]["summary"]["green"]["requests"] == 5 else None

        body = await wait_for(green_counted, timeout=10, interval=0.2,
                              message="5 green requests in the dashboard data")
        actions = [(e["action"], e["reason"]) for e in body["events"]]
        assert ("switch", "dashboard test") in actions


class FakeShadow:
    """Just the shadow component's contract with the dashboard."""

    name = "shadow"

    def __init__(self, gateway: Gateway) -> None:
        self.asked: list[tuple[str, float]] = []
        gateway.hooks.shadow_agreement = self.agreement  # what the real one offers

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def tap(self, route: RouteConfig, state: RouteState) -> Tap | None:
        return None

    def agreement(self, route: str, seconds: float) -> tuple[int, float | None]:
        self.asked.append((route, seconds))
        return 8, 0.75


ALARM = {"name": "nulls", "route": "classifier", "backend": "green", "metric": "null_rate",
         "window": "30s", "comparison": ">", "threshold": 0.1, "for": "10s",
         "state": "firing", "value": 0.5, "since": 1.0}


class FakeMonitoring(FakeShadow):
    name = "monitoring"

    def __init__(self, gateway: Gateway) -> None:
        self.asked = []
        gateway.hooks.alarms = self.alarms_view

    def alarms_view(self) -> list[dict[str, Any]]:
        return [ALARM]


async def test_shadow_agreement_alarms_and_probe_counters(
        blue: ModelServer, green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url)
    async with running_gateway(config, components=[FakeMonitoring, FakeShadow]) as gw:
        stats = gw.gateway.static["classifier"].stats["blue"]
        stats.add("output_total", 10)
        stats.add("output_null", 1)
        stats.add("input_values", 40)
        stats.add("input_missing", 2)

        async def seen() -> dict[str, Any] | None:
            # the series hold whole seconds only: the counters show once their second is over
            body = await data(gw, minutes=1, step=1)
            route = body["routes"][0]
            ok = (0.75 in route["shadow_agreement"]
                  and 0.9 in route["backends"]["blue"]["non_null"])
            return body if ok else None

        body = await wait_for(seen, timeout=10, interval=0.2,
                              message="shadow agreement and probe counters")
        assert body["shadow_available"] is True
        assert body["alarms"] == [ALARM]
        route = body["routes"][0]
        assert 8 in route["shadow_pairs"]
        assert 0.9 in route["backends"]["blue"]["non_null"]
        assert 0.05 in route["backends"]["blue"]["input_missing"]
        assert route["summary"]["blue"]["non_null"] == 0.9
        assert route["summary"]["blue"]["input_missing"] == 0.05
        assert gw.gateway.component("shadow").asked[0] == ("classifier", 2.0)


async def test_without_shadow_or_monitoring(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url), components=[]) as gw:
        body = await data(gw)
        assert body["alarms"] is None
        assert body["shadow_available"] is False
        route = body["routes"][0]
        assert set(route["shadow_agreement"]) == {None}
        assert route["time"][-1] - route["time"][-2] == 5
    # the state sampler went with the admin app
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "dashboard-sampler"]
