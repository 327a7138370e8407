"""Guarded blue-green: readiness check before a switch, and a bake that switches back."""

from __future__ import annotations

from typing import Any

from tests.helpers import (
    ModelServer,
    classifier_config,
    refusing_port,
    running_gateway,
)
from tests.test_rollout_support import (
    ROLLOUT,
    ROUTE,
    Traffic,
    events,
    rollout_view,
    set_faults,
    wait_phase,
)

SWITCH = f"/admin/routes/{ROUTE}/switch"
GATES: dict[str, Any] = {
    "check_interval": "100ms", "failure_threshold": 2,
    "gates": {"max_error_rate": 0.1, "min_requests": 5},
}


async def test_switch_refuses_a_down_backend_unless_forced(blue: ModelServer) -> None:
    async with refusing_port() as dead_url, \
            running_gateway(classifier_config(blue.url, dead_url)) as gw:
        r = await gw.admin.post(SWITCH, json={"to": "green"})
        assert r.status_code == 409, r.text
        body = r.json()
        assert body["error"] == "conflict"
        assert "'green' is not ready" in body["message"] and "force" in body["message"]
        assert gw.gateway.control.state(ROUTE).live == "blue"
        assert await events(gw) == []  # nothing changed

        for bad, message in (({"to": "green", "force": "yes"}, "force: must be true or false"),
                             ({"to": "green", "bake": "later"}, "bake: expected a duration"),
                             ({"to": "green", "bake": 0}, "bake: must be at least 10ms"),
                             ({"to": "green", "bake": "5ms"}, "bake: must be at least 10ms"),
                             ({"to": "red"}, "to: unknown backend 'red'")):
            r = await gw.admin.post(SWITCH, json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert message in r.json()["message"]

        r = await gw.admin.post(SWITCH, json={"to": "green", "force": True, "reason": "I know"})
        assert r.status_code == 200, r.text
        state = gw.gateway.control.state(ROUTE)
        assert (state.live, state.previous) == ("green", "blue")
        # Rollback stays one call and takes effect for the next request.
        r = await gw.admin.post(f"/admin/routes/{ROUTE}/rollback", json={})
        assert r.status_code == 200
        r = await gw.client.post("/v2/models/classifier/infer", json={"inputs": [{
            "name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}]})
        assert r.headers["x-model-version"] == "v1"


async def test_smoke_request_decides_readiness(blue: ModelServer, green: ModelServer) -> None:
    smoke = {"method": "POST", "path": "/v2/models/classifier/infer", "status": 200,
             "body": {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                                  "data": [[5.1, 3.5, 1.4, 0.2]]}]}}
    cfg = classifier_config(blue.url, green.url, rollout={"smoke": smoke})
    async with running_gateway(cfg) as gw:
        await set_faults(green.url, error_rate=1)
        r = await gw.admin.post(SWITCH, json={"to": "green"})
        assert r.status_code == 409
        assert "answered 500 (expected 200)" in r.json()["message"]
        await set_faults(green.url, error_rate=0)
        r = await gw.admin.post(SWITCH, json={"to": "green"})
        assert r.status_code == 200, r.text
        assert gw.gateway.control.state(ROUTE).live == "green"


async def test_bake_switches_back_on_failure(blue: ModelServer, green: ModelServer) -> None:
    cfg = classifier_config(blue.url, green.url, rollout=GATES)
    async with running_gateway(cfg) as gw:
        async with Traffic(gw.client) as traffic:
            await traffic.more(20)
            r = await gw.admin.post(SWITCH, json={"to": "green", "bake": "20s"})
            assert r.status_code == 200, r.text
            assert gw.gateway.control.state(ROUTE).live == "green"
            view = await rollout_view(gw)
            assert (view["kind"], view["phase"], view["baseline"]) == ("bake", "progressing",
                                                                       "blue")
            # Canary calls that change nothing, or are refused, leave the bake watching.
            r = await gw.admin.delete(f"/admin/routes/{ROUTE}/canary")
            assert r.status_code == 200, r.text
            r = await gw.admin.put(f"/admin/routes/{ROUTE}/canary", json={"weight": 10})
            assert r.status_code == 400, r.text
            assert (await rollout_view(gw))["phase"] == "progressing"
            await traffic.more(20)
            await set_faults(green.url, error_rate=1)
            view = await wait_phase(gw, "rolled_back", "promoted")
            assert view["phase"] == "rolled_back", view
            after = gw.gateway.control.state(ROUTE)
            assert (after.live, after.previous) == ("blue", "green")
            await traffic.more(20)
        log = await events(gw)
        back = [e for e in log if e["action"] == "switch" and e["actor"] == "controller"]
        assert len(back) == 1 and back[0]["after"]["live"] == "blue"
        assert "error_rate" in back[0]["reason"] and "consecutive failed checks" in \
            back[0]["reason"]
        assert [e["action"] for e in log if e["action"].startswith("rollout_")][-1] == \
            "rollout_rollback"
        tail = [r for r in traffic.results if r.started > back[0]["time"]]
        assert tail and all(r.version == "v1" for r in tail)


async def test_healthy_bake_finishes_and_a_switch_supersedes_a_bake(
    blue: ModelServer, green: ModelServer
) -> None:
    cfg = classifier_config(blue.url, green.url, rollout=GATES)
    async with running_gateway(cfg) as gw:
        async with Traffic(gw.client) as traffic:
            await traffic.more(10)
            r = await gw.admin.post(SWITCH, json={"to": "green", "bake": "500ms"})
            assert r.status_code == 200, r.text
            # A bake holds the route like a rollout does.
            r = await gw.admin.post(ROLLOUT, json={"backend": "blue"})
            assert r.status_code == 409
            view = await wait_phase(gw, "promoted", "rolled_back")
        assert view["phase"] == "promoted", view
        assert view["kind"] == "bake" and "bake of 0.5s finished" in view["reason"]
        assert gw.gateway.control.state(ROUTE).live == "green"
        assert traffic.count > 0
        # A switch supersedes a running bake (the operator's call wins).
        r = await gw.admin.post(SWITCH, json={"to": "blue", "bake": "30s"})
        assert r.status_code == 200
        r = await gw.admin.post(SWITCH, json={"to": "green"})
        assert r.status_code == 200
        view = await rollout_view(gw)
        assert view["phase"] == "aborted" and "superseded by a manual switch" in view["reason"]
        assert gw.gateway.control.state(ROUTE).live == "green"
