"""The admin API over real sockets: auth on every /admin/ path, validation that changes
nothing, audit events, probes, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    running_gateway,
)

ROW = [5.1, 3.5, 1.4, 0.2]
ALICE = "alice-secret-token"


def two_routes(blue: ModelServer, green: ModelServer) -> dict[str, Any]:
    cfg = classifier_config(blue.url, green.url)
    cfg["admin"]["tokens"] = {"alice": ALICE}
    cfg["routes"].append({
        "name": "other", "match": {"path_prefix": "/other"},
        "backends": {"blue": {"url": blue.url}, "green": {"url": green.url}},
        "live": "blue",
    })
    return cfg


def admin_paths(gw: RunningGateway) -> list[tuple[str, str]]:
    """(method, concrete path) of every /admin/ endpoint the admin app really serves, the
    components' included: read from its router, so a new endpoint cannot dodge this test."""
    apps = [r.app for r in gw.gateway._runners if isinstance(r, web.AppRunner)]
    assert len(apps) == 1
    found = set()
    for resource_route in apps[0].router.routes():
        path = resource_route.resource.canonical if resource_route.resource else ""
        if not path.startswith("/admin/") or resource_route.method == "HEAD":
            continue
        concrete = path.replace("{route}", "classifier")
        concrete = re.sub(r"\{[^}]+\}", "x", concrete)
        found.add((resource_route.method, concrete))
    return sorted(found)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body["error"], str)
    assert isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in r.text
    if code is not None:
        assert body["error"] == code, body
    message: str = body["message"]
    return message


async def route_state(gw: RunningGateway, name: str = "classifier") -> dict[str, Any]:
    r = await gw.admin.get(f"/admin/routes/{name}")
    assert r.status_code == 200, r.text
    view: dict[str, Any] = r.json()
    return view


async def events(gw: RunningGateway, **params: Any) -> list[dict[str, Any]]:
    r = await gw.admin.get("/admin/events", params=params)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["events"]
    return found


# -- auth ----------------------------------------------------------------------------------------


async def test_every_admin_endpoint_needs_the_token(blue: ModelServer, green: ModelServer
                                                    ) -> None:
    async with running_gateway(two_routes(blue, green)) as gw:
        paths = admin_paths(gw)
        core = {("GET", "/admin/routes"), ("GET", "/admin/routes/classifier"),
                ("PUT", "/admin/routes/classifier/canary"),
                ("POST", "/admin/routes/classifier/switch"),
                ("POST", "/admin/routes/classifier/rollback"),
                ("GET", "/admin/events"), ("GET", "/admin/openapi.json")}
        assert core <= set(paths)
        before = await route_state(gw)
        async with httpx.AsyncClient(base_url=gw.admin_url, timeout=30) as anon:
            for method, path in paths:
                body = {"to": "green", "backend": "green", "weight": 50}
                for headers in ({}, {"Authorization": "Bearer wrong-token"},
                                {"Authorization": f"Basic {TOKEN}"},
                                {"Authorization": TOKEN},
                                {"Authorization": f"Bearer {TOKEN}x"},
                                {"Authorization": "Bearer"}):
                    r = await anon.request(method, path, json=body, headers=headers)
                    assert_error(r, 401, "unauthorized")
        # None of those calls changed anything.
        assert await route_state(gw) == before
        assert await events(gw) == []


async def test_valid_tokens_and_scheme_case(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(two_routes(blue, green)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url, timeout=30) as anon:
        for header in (f"Bearer {TOKEN}", f"Bearer {ALICE}", f"bearer {TOKEN}",
                       f"BEARER {ALICE}"):
            r = await anon.get("/admin/routes", headers={"Authorization": header})
            assert r.status_code == 200, (header, r.text)


async def test_probes_and_metrics_need_no_token(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url, timeout=30) as anon:
        r = await anon.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = await anon.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True
        r = await anon.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")


async def test_readyz_is_503_while_draining(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url, timeout=30) as anon:
        assert (await anon.get("/readyz")).status_code == 200
        await gw.gateway.drain(timeout=0)
        r = await anon.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "reason": "draining"}
        assert (await anon.get("/healthz")).status_code == 200  # alive, just not ready


async def test_metrics_per_route_and_backend(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url, timeout=30) as anon:
        for _ in range(5):
            r = await gw.client.post(INFER, json=infer_body([ROW]))
            assert r.status_code == 200
        await gw.admin.post("/admin/routes/classifier/switch", json={"to": "green"})
        for _ in range(3):
            r = await gw.client.post(INFER, json=infer_body([ROW]))
            assert r.json()["model_version"] == "v2"
        r = await gw.client.post("/v2/models/classifier/infer", content=b"not json")
        assert r.status_code == 400  # counted as a 4xx of green
        text = (await anon.get("/metrics")).text

    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        (s.labels["route"], s.labels["backend"], s.labels["status_class"]): s.value
        for s in families["modelgate_requests"].samples if s.name == "modelgate_requests_total"
    }
    assert requests[("classifier", "blue", "2xx")] == 5
    assert requests[("classifier", "green", "2xx")] == 3
    assert requests[("classifier", "green", "4xx")] == 1
    duration = families["modelgate_request_duration_seconds"]
    counts = {(s.labels["route"], s.labels["backend"]): s.value for s in duration.samples
              if s.name == "modelgate_request_duration_seconds_count"}
    assert counts[("classifier", "blue")] == 5
    assert counts[("classifier", "green")] == 4
    buckets = [s for s in duration.samples
               if s.name == "modelgate_request_duration_seconds_bucket"
               and s.labels["backend"] == "blue"]
    assert len(buckets) >= 10 and buckets[-1].labels["le"] == "+Inf"
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)  # cumulative
    sums = [s for s in duration.samples if s.name == "modelgate_request_duration_seconds_sum"]
    assert all(s.value > 0 for s in sums)


# -- reading -------------------------------------------------------------------------------------


async def test_routes_show_state_and_backend_urls(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(two_routes(blue, green)) as gw:
        r = await gw.admin.get("/admin/routes")
        assert r.status_code == 200
        names = [route["name"] for route in r.json()["routes"]]
        assert names == ["classifier", "other"]
        view = await route_state(gw)
        assert view["live"] == "blue" and view["previous"] is None and view["canary"] is None
        assert view["backends"]["blue"]["url"] == blue.url
        assert view["backends"]["green"]["url"] == green.url
        assert view["traffic"] == {"blue": 100.0}
        assert view["version"] == 1
        assert view["sticky"] == {"header": "x-user-id"}


async def test_unknown_route_is_404(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        for method, path, body in [
            ("GET", "/admin/routes/nope", None),
            ("PUT", "/admin/routes/nope/canary", {"backend": "green", "weight": 5}),
            ("DELETE", "/admin/routes/nope/canary", None),
            ("POST", "/admin/routes/nope/switch", {"to": "green"}),
            ("POST", "/admin/routes/nope/rollback", None),
        ]:
            message = assert_error(await gw.admin.request(method, path, json=body), 404,
                                   "not_found")
            assert "nope" in message
        assert_error(await gw.admin.get("/admin/events", params={"route": "nope"}), 404)
        assert_error(await gw.admin.get("/admin/no-such-endpoint"), 404)
        assert await events(gw) == []


# -- writing and validation ----------------------------------------------------------------------


BAD_CANARY: list[tuple[str, bytes | dict[str, Any] | list[Any], str]] = [
    ("bad json", b'{"backend": "green", "weight": ', "not valid JSON"),
    ("not an object", [{"backend": "green", "weight": 10}], "JSON object"),
    ("a string", b'"green"', "JSON object"),
    ("unknown field", {"backend": "green", "weight": 10, "wieght": 5}, "wieght"),
    ("missing weight", {"backend": "green"}, "weight"),
    ("empty body", b"", "weight"),
    ("weight -1", {"backend": "green", "weight": -1}, "weight"),
    ("weight 101", {"backend": "green", "weight": 101}, "weight"),
    ("weight text", {"backend": "green", "weight": "ten"}, "weight"),
    ("weight true", {"backend": "green", "weight": True}, "weight"),
    ("weight null", {"backend": "green", "weight": None}, "weight"),
    ("weight too fine", {"backend": "green", "weight": 10.001}, "0.01"),
    ("unknown backend", {"backend": "purple", "weight": 10}, "purple"),
    ("backend not a string", {"backend": 5, "weight": 10}, "backend"),
    ("backend is live", {"backend": "blue", "weight": 10}, "live"),
    ("reason not a string", {"backend": "green", "weight": 10, "reason": 5}, "reason"),
]


async def test_bad_canary_is_400_and_changes_nothing(blue: ModelServer, green: ModelServer
                                                     ) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        before = await route_state(gw)
        for name, body, fragment in BAD_CANARY:
            if isinstance(body, bytes):
                r = await gw.admin.put("/admin/routes/classifier/canary", content=body,
                                       headers={"Content-Type": "application/json"})
            else:
                r = await gw.admin.put("/admin/routes/classifier/canary", json=body)
            message = assert_error(r, 400)
            assert fragment in message, (name, message)
            assert await route_state(gw) == before, name
            assert await events(gw) == [], name
            assert gw.gateway.control.state("classifier").version == before["version"], name


async def test_bad_canary_does_not_pause_a_running_rollout(blue: ModelServer, green: ModelServer
                                                           ) -> None:
    """Refused input changes nothing anywhere, including the rollout a canary PUT would pause."""
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        r = await gw.admin.post("/admin/routes/classifier/rollout",
                                json={"backend": "green", "steps": [10, 50], "interval": "1h"})
        if r.status_code == 404:
            pytest.skip("no rollout component in this build")
        assert r.status_code == 201, r.text
        rollout_before = (await gw.admin.get("/admin/routes/classifier/rollout")).json()
        seen = len(await events(gw))
        for body in ({"backend": "green", "weight": 101}, {"backend": "purple", "weight": 5},
                     {"backend": "blue", "weight": 5}):
            assert_error(await gw.admin.put("/admin/routes/classifier/canary", json=body), 400)
        assert len(await events(gw)) == seen
        rollout_after = (await gw.admin.get("/admin/routes/classifier/rollout")).json()
        moving = {"time_in_step", "elapsed", "now"}  # clocks tick; nothing else may move
        assert {k: v for k, v in rollout_after.items() if k not in moving} == {
            k: v for k, v in rollout_before.items() if k not in moving}
        assert rollout_after["phase"] == "progressing"


async def test_bad_switch_is_400_and_changes_nothing(blue: ModelServer, green: ModelServer
                                                     ) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        before = await route_state(gw)
        for body, fragment in [({}, "to"), ({"to": "purple"}, "purple"), ({"to": 3}, "to"),
                               ({"to": "green", "extra": 1}, "extra")]:
            message = assert_error(
                await gw.admin.post("/admin/routes/classifier/switch", json=body), 400)
            assert fragment in message
        assert await route_state(gw) == before
        assert await events(gw) == []


async def test_rollback_with_nothing_to_roll_back_is_409(blue: ModelServer, green: ModelServer
                                                         ) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        before = await route_state(gw)
        message = assert_error(await gw.admin.post("/admin/routes/classifier/rollback"), 409,
                               "conflict")
        assert "nothing to roll back" in message
        assert await route_state(gw) == before
        assert await events(gw) == []


async def test_canary_switch_rollback_and_their_events(blue: ModelServer, green: ModelServer
                                                       ) -> None:
    async with running_gateway(two_routes(blue, green)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url, timeout=30,
                              headers={"Authorization": f"Bearer {ALICE}"}) as alice:
        r = await alice.put("/admin/routes/classifier/canary",
                            json={"backend": "green", "weight": 12.5, "reason": "first look"})
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["canary"] == {"backend": "green", "weight": 12.5}
        assert view["traffic"] == {"blue": 87.5, "green": 12.5}
        assert view["version"] == 2

        r = await gw.admin.post("/admin/routes/classifier/switch",
                                json={"to": "green", "reason": "looks good"})
        assert r.status_code == 200, r.text
        assert (r.json()["live"], r.json()["previous"], r.json()["canary"]) == (
            "green", "blue", None)
        r = await gw.admin.post("/admin/routes/other/switch", json={"to": "green"})
        assert r.status_code == 200
        r = await alice.post("/admin/routes/classifier/rollback", json={"reason": "oops"})
        assert r.status_code == 200, r.text
        assert (r.json()["live"], r.json()["previous"]) == ("blue", "green")

        found = await events(gw)
        assert [(e["route"], e["action"], e["actor"]) for e in found] == [
            ("classifier", "canary", "alice"),
            ("classifier", "switch", "admin"),
            ("other", "switch", "admin"),
            ("classifier", "rollback", "alice"),
        ]
        first = found[0]
        assert first["reason"] == "first look"
        assert first["before"]["canary"] is None and first["before"]["canary_weight"] == 0
        assert first["after"]["canary"] == "green" and first["after"]["canary_weight"] == 12.5
        assert isinstance(first["time"], float) and first["time"] > 1.6e9
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
        assert found[1]["before"]["live"] == "blue" and found[1]["after"]["live"] == "green"
        assert found[1]["reason"] == "looks good"
        assert found[3]["reason"] == "oops"
        assert [e["id"] for e in found] == sorted(e["id"] for e in found)

        only = await events(gw, route="other")
        assert [(e["route"], e["action"]) for e in only] == [("other", "switch")]
        last_two = await events(gw, limit=2)
        assert [e["action"] for e in last_two] == ["switch", "rollback"]
        assert last_two == found[-2:]
        last_of_route = await events(gw, route="classifier", limit=1)
        assert [e["action"] for e in last_of_route] == ["rollback"]
        for bad in ("0", "-1", "abc", "10001"):
            assert_error(await gw.admin.get("/admin/events", params={"limit": bad}), 400)


async def test_delete_canary_sets_weight_zero(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        await gw.admin.put("/admin/routes/classifier/canary",
                           json={"backend": "green", "weight": 30})
        r = await gw.admin.delete("/admin/routes/classifier/canary")
        assert r.status_code == 200
        assert r.json()["traffic"] == {"blue": 100.0}
        versions = [(await gw.client.post(INFER, json=infer_body([ROW]),
                                          headers={"x-user-id": f"u{i}"})).json()["model_version"]
                    for i in range(20)]
        assert set(versions) == {"v1"}


async def test_openapi_document(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        r = await gw.admin.get("/admin/openapi.json")
        assert r.status_code == 200
        doc = r.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    paths = doc["paths"]
    for path, method in [
        ("/admin/routes", "get"), ("/admin/routes/{route}", "get"),
        ("/admin/routes/{route}/canary", "put"), ("/admin/routes/{route}/switch", "post"),
        ("/admin/routes/{route}/rollback", "post"), ("/admin/events", "get"),
        ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"),
    ]:
        op = paths[path][method]
        assert op["summary"] and op["responses"]
        if "{route}" in path:
            assert any(p["name"] == "route" and p["in"] == "path" for p in op["parameters"])
    canary = paths["/admin/routes/{route}/canary"]["put"]["requestBody"]
    schema = canary["content"]["application/json"]["schema"]
    assert schema["required"] == ["weight"]
    assert schema["properties"]["weight"]["maximum"] == 100
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert paths["/healthz"]["get"]["security"] == []  # probes answer without a token


async def test_token_with_bytes_that_are_not_text_is_401(blue: ModelServer, green: ModelServer
                                                        ) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        assert gw.gateway.admin_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.admin_address[1])
        writer.write(b"GET /admin/routes HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
        await writer.drain()
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert response.startswith(b"HTTP/1.1 401"), response[:200]
        assert b'"error":"unauthorized"' in response
