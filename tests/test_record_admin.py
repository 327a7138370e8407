"""The recordings admin API: bad input is a JSON 4xx that changes nothing; the limits end a
recording with their reason; roles; stopping keeps what was captured."""

from __future__ import annotations

import gzip
from typing import Any

from tests.helpers import (
    INFER,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    running_gateway,
    wait_for,
)
from tests.test_admin_hardening import VIEWER, config_with_roles

RECORDINGS = "/admin/routes/classifier/recordings"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]


async def traffic(gw: RunningGateway, n: int) -> None:
    for _ in range(n):
        r = await gw.client.post(INFER, json=infer_body(ROWS))
        assert r.status_code == 200


async def ended(gw: RunningGateway, rid: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        view: dict[str, Any] = (await gw.admin.get(f"/admin/recordings/{rid}")).json()
        return view if view["state"] == "done" else None

    found: dict[str, Any] = await wait_for(done, message=f"recording {rid} to end")
    return found


BAD_BODIES: list[tuple[Any, str]] = [
    ({}, "missing field 'duration_s'"),
    ({"duration_s": "soon"}, "duration_s: expected a duration"),
    ({"duration_s": "25h"}, "duration_s"),
    ({"duration_s": 60, "sample_percent": 0}, "sample_percent"),
    ({"duration_s": 60, "sample_percent": 101}, "sample_percent"),
    ({"duration_s": 60, "max_requests": 0}, "max_requests: must be from 1"),
    ({"duration_s": 60, "max_bytes": "1GiB"}, "max_bytes: must be at most 256MiB"),
    ({"duration_s": 60, "max_bytes": 10}, "max_bytes: must be at least 1KiB"),
    ({"duration_s": 60, "redact_headers": ["bad header"]}, "redact_headers[0]: not a header name"),
    ({"duration_s": 60, "redact_json_fields": "id"}, "redact_json_fields"),
    ({"duration_s": 60, "redact_query_params": [""]}, "redact_query_params[0]"),
    ({"duration_s": 60, "colour": "red"}, "unknown field 'colour'"),
    ([1], "body must be a JSON object"),
]


async def test_bad_bodies_are_json_400_and_start_nothing(blue: ModelServer,
                                                         green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        for body, message in BAD_BODIES:
            r = await gw.admin.post(RECORDINGS, json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"] == "invalid_request"
            assert message in r.json()["message"], (body, r.json())
        r = await gw.admin.post(RECORDINGS, content=b"{nope")
        assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
        assert (await gw.admin.get("/admin/recordings")).json() == {"recordings": []}
        assert gw.gateway.table.by_name["classifier"].taps == ()


async def test_unknown_route_id_conflicts_and_roles(blue: ModelServer,
                                                    green: ModelServer) -> None:
    async with running_gateway(config_with_roles(blue, green)) as gw:
        r = await gw.admin.post("/admin/routes/nope/recordings", json={"duration_s": 60})
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        for method in ("GET", "DELETE"):
            r = await gw.admin.request(method, "/admin/recordings/feedbeef")
            assert r.status_code == 404 and "no recording 'feedbeef'" in r.json()["message"]
        viewer = {"Authorization": f"Bearer {VIEWER}"}
        r = await gw.admin.post(RECORDINGS, json={"duration_s": 60}, headers=viewer)
        assert r.status_code == 403

        r = await gw.admin.post(RECORDINGS, json={"duration_s": 60})
        assert r.status_code == 201
        rid = r.json()["id"]
        r = await gw.admin.post(RECORDINGS, json={"duration_s": 60})
        assert r.status_code == 409 and rid in r.json()["message"]
        r = await gw.admin.get(f"/admin/recordings/{rid}/download")
        assert r.status_code == 409 and "still running" in r.json()["message"]
        r = await gw.admin.get(f"/admin/recordings/{rid}", headers=viewer)  # viewers read
        assert r.status_code == 200 and r.json()["state"] == "recording"
        assert (await gw.admin.delete(f"/admin/recordings/{rid}", headers=viewer)
                ).status_code == 403

        await traffic(gw, 3)
        r = await gw.admin.delete(f"/admin/recordings/{rid}")
        view = r.json()
        assert (view["state"], view["stop_reason"], view["captured"]) == ("done", "stopped", 3)
        r = await gw.admin.get(f"/admin/recordings/{rid}/download", headers=viewer)
        assert r.status_code == 403 and "operator token" in r.json()["message"]  # traffic
        r = await gw.admin.get(f"/admin/recordings/{rid}/download")
        assert len(gzip.decompress(r.content).splitlines()) == 3
        assert gw.gateway.table.by_name["classifier"].taps == ()
        # DELETE on a finished recording discards it.
        assert (await gw.admin.delete(f"/admin/recordings/{rid}")).status_code == 200
        assert (await gw.admin.get(f"/admin/recordings/{rid}")).status_code == 404
        # Start, stop and discard are audit events with their actor, like other changes.
        events = (await gw.admin.get("/admin/events", params={"route": "classifier"})
                  ).json()["events"]
        mine = [(e["action"], e["after"]["id"], e["after"].get("captured")) for e in events
                if e["action"].startswith("recording_")]
        assert sorted(mine) == sorted([("recording_start", rid, 0), ("recording_stop", rid, 3),
                                       ("recording_discard", rid, 3)])
        assert all(e["actor"] != "" for e in events if e["action"].startswith("recording_"))


async def test_limits_end_recordings_with_their_reason(blue: ModelServer,
                                                       green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        r = await gw.admin.post(RECORDINGS, json={"duration_s": 60, "max_bytes": "2KiB"})
        rid = r.json()["id"]
        await traffic(gw, 6)  # a line is about 1 KiB: the third would pass 2 KiB
        view = await ended(gw, rid)
        assert view["stop_reason"] == "max_bytes" and 1 <= view["captured"] < 6
        assert view["bytes"] <= 2048 and view["dropped"] >= 1

        r = await gw.admin.post(RECORDINGS, json={"duration_s": "1s", "sample_percent": 50})
        rid = r.json()["id"]
        view = await ended(gw, rid)
        assert view["stop_reason"] == "duration" and view["captured"] == 0
        assert view["sample_percent"] == 50
        assert "authorization" in view["redact_headers"]  # the defaults are listed
        r = await gw.admin.get(f"/admin/recordings/{rid}/download")
        assert r.status_code == 200 and gzip.decompress(r.content) == b""
        listed = (await gw.admin.get("/admin/recordings")).json()["recordings"]
        assert [v["stop_reason"] for v in listed] == ["max_bytes", "duration"]
