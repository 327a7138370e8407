"""Rollout decisions and their routing changes when the store fails in between: the traffic
change comes first, so a failure never leaves a decision on record that was not carried out.
In-process backends (MockUpstream): the subject is the controller, not the socket."""

from __future__ import annotations

from typing import Any

from gateway.errors import StoreUnavailable
from gateway.store import InMemoryStore
from gateway.upstream.mock import MockRequest, MockResponse, mock_factory
from tests.helpers import classifier_config, running_gateway, wait_for
from tests.test_rollout_support import ROLLOUT, ROUTE

BLUE, GREEN = "http://blue.test:9001", "http://green.test:9002"


class FlakyStore(InMemoryStore):
    """Fails the next `fail` routing changes made by the rollout controller."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0

    async def commit(self, key: str, doc: dict[str, Any], expected_version: int,
                     event: dict[str, Any], *, fence: Any = None) -> tuple[int, dict[str, Any]]:
        if self.fail and key.startswith("route/") and event.get("actor") == "controller":
            self.fail -= 1
            raise StoreUnavailable("store unavailable (test)")
        return await super().commit(key, doc, expected_version, event, fence=fence)


def ok(request: MockRequest) -> MockResponse:
    return MockResponse(200, [(b"Content-Type", b"application/json")], b'{"ok": true}')


def failing(request: MockRequest) -> MockResponse:
    return MockResponse(500, [(b"Content-Type", b"application/json")], b'{"error": "x"}')


async def test_a_rollback_whose_routing_change_failed_once_is_carried_out() -> None:
    store = FlakyStore()
    config = classifier_config(BLUE, GREEN)
    factory = mock_factory({BLUE: ok, GREEN: failing})
    async with running_gateway(config, store=store, upstream_kind=factory) as gw:
        r = await gw.admin.post(ROLLOUT, json={
            "backend": "green", "steps": [50, 100], "interval": "5s", "check_interval": "50ms",
            "window": "10s", "gates": {"max_error_rate": 0.05, "min_requests": 3},
            "force": True})  # its readiness probe would need DNS for the mock host
        assert r.status_code == 201, r.text
        store.fail = 1  # the rollback's own routing change hits a store outage once

        async def rolled_back() -> dict[str, Any] | None:
            for i in range(10):
                await gw.client.post("/v2/models/classifier/infer", json={},
                                     headers={"x-user-id": f"u{i}"})
            view: dict[str, Any] = (await gw.admin.get(ROLLOUT)).json()
            return view if view["phase"] != "progressing" else None

        view = await wait_for(rolled_back, timeout=20, message="the rollout to end")
        assert store.fail == 0  # the outage did happen
        assert view["phase"] == "rolled_back", view
        # ... and the traffic did move back: the decision on record was carried out.
        assert gw.gateway.control.state(ROUTE).canary_weight == 0
