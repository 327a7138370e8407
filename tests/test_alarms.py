"""Alarms: the state machine tick by tick, config errors, and alarms over real traffic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from gateway.app import Gateway
from gateway.cli import main
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.metrics import WindowSummary
from gateway.monitoring.alarms import AlarmStatus, advance, breaches, metric_value, worst
from gateway.monitoring.component import Monitoring
from gateway.monitoring.config import AlarmRule
from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    classifier_config,
    infer_body,
    running_gateway,
    wait_for,
)

OUTPUT_PROBES = {"path_suffix": "/infer", "output": {"prediction": "outputs[0].data"}}


def fast_monitoring(gateway: Gateway) -> Monitoring:
    return Monitoring(gateway, interval=0.1)


# -- pure --------------------------------------------------------------------------------------
def test_state_machine_pending_firing_resolved() -> None:
    status = AlarmStatus(AlarmRule("a", for_=10), threshold=0.5, since=0)
    assert advance(status, True, 100) is None and status.state == "pending"
    assert advance(status, True, 105) is None and status.state == "pending"
    assert advance(status, True, 110) == "firing" and status.since == 110
    assert advance(status, True, 111) is None and status.state == "firing"
    assert advance(status, False, 112) == "resolved" and status.state == "ok"
    # a blip shorter than `for` never fires
    assert advance(status, True, 120) is None
    assert advance(status, False, 121) is None and status.state == "ok"
    # for 0: fires on the first breaching tick
    quick = AlarmStatus(AlarmRule("b"), threshold=1, since=0)
    assert advance(quick, True, 1) == "firing"


def test_breaches_and_worst() -> None:
    assert breaches(">", 0.6, 0.5) and not breaches(">", 0.5, 0.5) and breaches(">=", 0.5, 0.5)
    assert breaches("<", 1, 2) and not breaches("<", None, 2)  # no data never breaches
    cands = [("blue", 0.1, 50.0), ("green", 0.9, 50.0), ("red", None, 0.0)]
    assert worst(">", cands) == ("green", 0.9, 50.0)
    assert worst("<", cands) == ("blue", 0.1, 50.0)
    assert worst(">", [("blue", None, 3.0)]) == (None, None, 3.0)


def test_metric_values() -> None:
    w = WindowSummary(seconds=10, requests=20, errors=5,
                      counters={"output_total": 10, "output_null": 4, "input_values": 40,
                                "input_missing": 2, "input_total": 10,
                                "input_schema_errors": 1})
    assert metric_value("error_rate", w) == (0.25, 20)
    assert metric_value("rps", w) == (2.0, 20)
    assert metric_value("null_rate", w) == (0.4, 10)
    assert metric_value("missing_rate", w) == (0.05, 40)
    assert metric_value("schema_error_rate", w) == (0.1, 10)
    assert metric_value("null_rate", WindowSummary(seconds=10)) == (None, 0)
    assert metric_value("p99_ms", WindowSummary(seconds=10)) == (None, 0)


def _config(alarms: list[dict[str, Any]], probes: dict[str, Any] | None = OUTPUT_PROBES
            ) -> Any:
    extra = {"probes": probes} if probes else {}
    return parse_config(classifier_config("http://127.0.0.1:1", "http://127.0.0.1:2",
                                          alarms=alarms, **extra))


def test_alarm_config() -> None:
    config = _config([{"name": "nulls", "route": "classifier", "metric": "null_rate",
                       "backend": "any", "window": "30s", "op": ">=", "threshold": 0.2,
                       "for": "10s"}])
    rule = config.alarms[0]
    assert (rule.name, rule.window, rule.for_, rule.op, rule.threshold, rule.backend) == (
        "nulls", 30.0, 10.0, ">=", 0.2, "any")


@pytest.mark.parametrize(("rule", "probes", "where", "says"), [
    ({"route": "nope"}, OUTPUT_PROBES, "alarms[0].route", "unknown route"),
    ({"metric": "happiness"}, OUTPUT_PROBES, "alarms[0].metric", "unknown metric"),
    ({"metric": "missing_rate"}, OUTPUT_PROBES, "alarms[0].metric", "needs probes.input"),
    ({"metric": "null_rate"}, None, "alarms[0].metric", "needs probes.output"),
    ({"backend": "purple"}, OUTPUT_PROBES, "alarms[0].backend", "purple"),
    ({"op": "=="}, OUTPUT_PROBES, "alarms[0].op", "expected one of"),
    ({"window": "20m"}, OUTPUT_PROBES, "alarms[0].window", "15m"),
    ({"against": "live"}, OUTPUT_PROBES, "alarms[0].against", "psi"),
    ({"threshold": "high"}, OUTPUT_PROBES, "alarms[0].threshold", "number"),
    ({"oops": 1}, OUTPUT_PROBES, "alarms[0].oops", "unknown key"),
])
def test_alarm_config_errors(rule: dict[str, Any], probes: Any, where: str, says: str) -> None:
    base = {"name": "a", "route": "classifier", "metric": "error_rate", "threshold": 0.5}
    with pytest.raises(ConfigError) as info:
        _config([{**base, **rule}], probes)
    assert info.value.path == where and says in info.value.problem


def test_duplicate_alarm_names() -> None:
    rule = {"name": "a", "route": "classifier", "metric": "error_rate", "threshold": 0.5}
    with pytest.raises(ConfigError, match="duplicate alarm name"):
        _config([rule, rule])


# -- component, tick by tick on a fake clock ---------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_ticks_on_a_fake_clock() -> None:
    clock = Clock()
    config = _config([{"name": "nulls", "route": "classifier", "metric": "null_rate",
                       "backend": "any", "window": "30s", "threshold": 0.5, "for": "10s",
                       "min_samples": 5}])
    gateway = Gateway(config, clock=clock,
                      components=[lambda gw: Monitoring(gw, interval=3600)])
    await gateway.start(serve_proxy=False, serve_admin=False)
    try:
        mon: Monitoring = gateway.component("monitoring")
        green = gateway.recorder.stats("classifier", "green")
        green.add_many([("output_total", 4), ("output_null", 4)])
        await mon.tick()
        assert mon.alarms_view()[0]["state"] == "ok"  # 4 < min_samples: no data
        green.add_many([("output_total", 6), ("output_null", 2)])
        await mon.tick()
        view = mon.alarms_view()[0]
        assert (view["state"], view["value"], view["value_backend"]) == ("pending", 0.6, "green")
        clock.now += 9
        await mon.tick()
        assert mon.firing_alarms("classifier") == []
        clock.now += 1
        await mon.tick()
        assert mon.firing_alarms("classifier") == ["nulls"]
        events = await gateway.control.events()
        assert [e.action for e in events] == ["alarm_firing"]
        assert events[0].actor == "monitoring" and events[0].route == "classifier"
        assert events[0].reason is not None and "null_rate on green = 0.6 > 0.5" in \
            events[0].reason
        clock.now += 31  # the window slid past the nulls: no data, resolves
        await mon.tick()
        assert mon.alarms_view()[0]["state"] == "ok"
        assert [e.action for e in await gateway.control.events()] == [
            "alarm_firing", "alarm_resolved"]
    finally:
        await gateway.stop(drain_timeout=0)


# -- end to end --------------------------------------------------------------------------------
@asynccontextmanager
async def traffic(client: httpx.AsyncClient, backend: str) -> AsyncIterator[list[int]]:
    """Requests to `backend` every ~20 ms until the block ends; yields the statuses seen."""
    stop = asyncio.Event()
    statuses: list[int] = []

    async def run() -> None:
        while not stop.is_set():
            r = await client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                  headers={"x-modelgate-backend": backend})
            statuses.append(r.status_code)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(run())
    try:
        yield statuses
    finally:
        stop.set()
        await task


async def _actions(gw: Any) -> list[str]:
    return [e["action"] for e in (await gw.admin.get("/admin/events")).json()["events"]]


async def test_null_outputs_fault_fires_and_resolves(blue: ModelServer,
                                                     green: ModelServer) -> None:
    rule = {"name": "null-outputs", "route": "classifier", "backend": "any",
            "metric": "null_rate", "op": ">", "threshold": 0.5, "window": "2s", "for": "1s",
            "min_samples": 5}
    config = classifier_config(blue.url, green.url, probes=OUTPUT_PROBES, alarms=[rule],
                               override_header="x-modelgate-backend")
    async with running_gateway(config, components=[fast_monitoring]) as gw, \
            httpx.AsyncClient() as direct, traffic(gw.client, "green") as statuses:
        await wait_for(lambda: len(statuses) > 10, message="traffic")
        assert (await gw.admin.get("/admin/alarms")).json()["alarms"][0]["state"] == "ok"
        await direct.post(f"{green.url}/faults", json={"null_rate": 1})
        await wait_for(lambda: _has(gw, "alarm_firing"), timeout=2 + 1 + 5,
                       message="alarm_firing within the rule's window + for")
        event = await _event(gw, "alarm_firing")
        assert event["route"] == "classifier" and event["actor"] == "monitoring"
        assert event["after"]["backend"] == "green" and event["after"]["value"] > 0.5
        assert "null-outputs" in event["reason"] and "null_rate" in event["reason"]
        view = (await gw.admin.get("/admin/alarms/null-outputs")).json()
        assert view["state"] == "firing" and view["value_backend"] == "green"
        mon: Monitoring = gw.gateway.component("monitoring")
        assert mon.firing_alarms("classifier") == ["null-outputs"]
        # As a rollout gate it is about green (its value came from green), not about blue.
        assert mon.firing_alarms("classifier", "green") == ["null-outputs"]
        assert mon.firing_alarms("classifier", "blue") == []
        metrics = (await gw.admin.get("/metrics")).text
        assert 'modelgate_alarm_firing{alarm="null-outputs",route="classifier"} 1.0' in metrics

        await direct.post(f"{green.url}/faults", json={"null_rate": 0})
        await wait_for(lambda: _has(gw, "alarm_resolved"), timeout=2 + 5,
                       message="alarm_resolved once the nulls left the window")
        assert mon.firing_alarms("classifier") == []
        assert await _actions(gw) == ["alarm_firing", "alarm_resolved"]


async def _has(gw: Any, action: str) -> bool:
    return action in await _actions(gw)


async def _event(gw: Any, action: str) -> dict[str, Any]:
    events = (await gw.admin.get("/admin/events")).json()["events"]
    found: dict[str, Any] = next(e for e in events if e["action"] == action)
    return found


async def test_threshold_change_at_run_time(blue: ModelServer, green: ModelServer) -> None:
    rule = {"name": "busy", "route": "classifier", "metric": "rps", "op": ">",
            "threshold": 10_000, "window": "2s"}
    config = classifier_config(blue.url, green.url, alarms=[rule],
                               override_header="x-modelgate-backend")
    async with running_gateway(config, components=[fast_monitoring]) as gw, \
            traffic(gw.client, "blue") as statuses:
        await wait_for(lambda: len(statuses) > 20, message="traffic")
        # bad input: a clear 4xx and nothing changes
        for body, code in [({"threshold": "x"}, 400), ({}, 400), ({"threshold": 1, "x": 2}, 400),
                           ({"threshold": True}, 400)]:
            r = await gw.admin.put("/admin/alarms/busy", json=body)
            assert r.status_code == code, r.text
            assert r.json()["error"] == "invalid_request"
        r = await gw.admin.put("/admin/alarms/nope", json={"threshold": 1})
        assert r.status_code == 404
        paths = (await gw.admin.get("/admin/openapi.json")).json()["paths"]
        assert {"get", "put"} <= set(paths["/admin/alarms/{name}"])
        assert "post" in paths["/admin/routes/{route}/drift/baseline"]
        assert (await gw.admin.get("/admin/alarms/busy")).json()["threshold"] == 10_000
        assert await _actions(gw) == []

        r = await gw.admin.put("/admin/alarms/busy", json={"threshold": 1, "reason": "test"})
        assert r.status_code == 200, r.text
        assert r.json()["threshold"] == 1 and r.json()["config_threshold"] == 10_000
        await wait_for(lambda: _has(gw, "alarm_firing"), message="firing at the new threshold")
        event = await _event(gw, "alarm_threshold")
        assert event["before"] == {"alarm": "busy", "threshold": 10_000}
        assert event["after"] == {"alarm": "busy", "threshold": 1}
        assert event["actor"] == "admin" and event["reason"] == "test"
        stored = await gw.gateway.store.read("alarm/busy")
        assert stored is not None and stored[0] == {"threshold": 1}

        # the CLI: list, then back to the config's threshold
        args = ["--admin", gw.admin_url, "--token", TOKEN, "--json"]
        out = await _cli(["alarms", *args])
        assert orjson.loads(out)["alarms"][0]["state"] == "firing"
        out = await _cli(["alarms", "reset", "busy", *args])
        assert orjson.loads(out)["threshold"] == 10_000
        await wait_for(lambda: _has(gw, "alarm_resolved"), message="resolved after reset")
        out = await _cli(["alarms", "set", "busy", "--threshold", "2.5", "--admin",
                          gw.admin_url, "--token", TOKEN])
        assert "busy: rps > 2.5 (config 1e+04)" in out
        table = await _cli(["alarms", "--admin", gw.admin_url, "--token", TOKEN])
        assert "busy" in table and "rps > 2.5" in table


async def _cli(argv: list[str]) -> str:
    """Run the CLI in a thread (it is synchronous; the gateway shares our loop)."""
    import contextlib
    import io

    buf = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(buf):
            return main(argv)

    code = await asyncio.to_thread(run)
    assert code == 0, buf.getvalue()
    return buf.getvalue()
