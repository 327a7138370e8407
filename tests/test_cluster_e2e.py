"""Scale-out end to end: gateways sharing one real redis-server, real demo model servers, real
loopback sockets. In-process gateways where the test reads their snapshots; `modelgate serve`
subprocesses where a process must die (SIGKILL) as it would in production."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import cast

import httpx
import orjson

from tests.cluster import admin_client, gateway_processes
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
from tests.test_rollout_support import ROLLOUT, ROUTE, ROW, Traffic, set_faults, wait_phase

BODY = orjson.dumps(infer_body(ROW))


async def version_of(client: httpx.AsyncClient, key: str) -> str:
    r = await client.post(INFER, content=BODY, headers={"x-user-id": key,
                                                        "content-type": "application/json"})
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


async def test_two_gateways_route_every_key_alike_and_follow_each_others_changes(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    config = classifier_config(blue.url, green.url, store=redis_server.url)
    async with running_gateway(config) as a, running_gateway(config) as b:
        r = await a.admin.put(f"/admin/routes/{ROUTE}/canary",
                              json={"backend": "green", "weight": 10})
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        await wait_for(lambda: b.gateway.control.state(ROUTE).version == version, timeout=5,
                       message="b to apply a's canary")
        route_a = a.gateway.table.by_name[ROUTE]
        route_b = b.gateway.table.by_name[ROUTE]
        keys = [f"user-{i}" for i in range(10_000)]
        picks_a = [route_a.pick(k).name for k in keys]
        assert picks_a == [route_b.pick(k).name for k in keys]
        assert 0.08 < picks_a.count("green") / len(keys) < 0.12
        # The same through both proxies, over real sockets, for a sample of the keys.
        for key in keys[:150]:
            assert await version_of(a.client, key) == await version_of(b.client, key), key

        # Every change made on either one is applied by the other (the timing target is
        # measured by loadtest/cluster_propagation.py, not asserted here).
        for i in range(20):
            writer, reader = (a, b) if i % 2 == 0 else (b, a)
            to = "green" if writer.gateway.control.state(ROUTE).live == "blue" else "blue"
            r = await writer.admin.post(f"/admin/routes/{ROUTE}/switch", json={"to": to})
            assert r.status_code == 200, r.text
            version = r.json()["version"]
            await wait_for(lambda r=reader, v=version: r.gateway.control.state(ROUTE).version
                           == v, timeout=5, message=f"change {i} to reach the other gateway")
            assert reader.gateway.control.state(ROUTE).live == to


async def test_concurrent_writes_on_two_gateways_one_event_per_change(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    config = classifier_config(blue.url, green.url, store=redis_server.url)
    async with running_gateway(config) as a, running_gateway(config) as b:
        start = a.gateway.control.state(ROUTE).version

        async def put(i: int) -> httpx.Response:
            admin = (a, b)[i % 2].admin
            return await admin.put(f"/admin/routes/{ROUTE}/canary",
                                   json={"backend": "green", "weight": i + 1})

        answers = await asyncio.gather(*(put(i) for i in range(50)))
        assert all(r.status_code in (200, 409) for r in answers), [r.text for r in answers]
        changed = [r.json() for r in answers if r.status_code == 200]
        versions = [v["version"] for v in changed]
        assert len(set(versions)) == len(versions)  # one winner per version
        r = await a.admin.get("/admin/events", params={"route": ROUTE, "limit": 1000})
        canary_events = [e for e in r.json()["events"] if e["action"] == "canary"]
        assert len(canary_events) == len(changed)  # one event per change, none for losers
        final = a.gateway.control.state(ROUTE).version
        assert final == start + len(changed)
        assert sorted(e["after"]["version"] for e in canary_events) == sorted(versions)


async def test_redis_killed_under_traffic_fails_no_client_request_and_resyncs(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    config = classifier_config(blue.url, green.url, store=redis_server.url)
    async with running_gateway(config) as a, running_gateway(config) as b:
        r = await a.admin.post(f"/admin/routes/{ROUTE}/switch", json={"to": "green"})
        assert r.status_code == 200
        await wait_for(lambda: b.gateway.control.state(ROUTE).live == "green", timeout=5,
                       message="b to follow the switch")
        async with Traffic(a.client, loops=2) as ta, Traffic(b.client, loops=2) as tb:
            await ta.more(20)
            redis_server.kill()
            await wait_for(lambda: not a.gateway.store.up and not b.gateway.store.up,
                           timeout=10, message="both gateways to notice the outage")
            r = await a.admin.put(f"/admin/routes/{ROUTE}/canary",
                                  json={"backend": "blue", "weight": 5})
            assert r.status_code == 503, r.text
            assert "store" in r.json()["message"]
            health = (await b.admin.get("/healthz")).json()
            assert health["store"] == {"kind": "redis", "up": False}
            assert (await b.admin.get("/readyz")).status_code == 200
            metrics = (await a.admin.get("/metrics")).text
            assert "modelgate_store_up 0.0" in metrics
            await ta.more(100)
            await tb.more(100)
            redis_server.start()  # empty: no persistence, a new epoch
            await wait_for(lambda: a.gateway.store.up and b.gateway.store.up, timeout=15,
                           message="both gateways to reconnect")
            await ta.more(50)
            await tb.more(50)
        assert [x for x in ta.results + tb.results if x.status != 200] == []
        # The lost state was seeded again from the last routing state (green stays live),
        # and the store answers writes again.
        found = await a.gateway.store.read(f"route/{ROUTE}")
        assert found is not None and found[0]["live"] == "green"
        r = await b.admin.put(f"/admin/routes/{ROUTE}/canary",
                              json={"backend": "blue", "weight": 5})
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        await wait_for(lambda: a.gateway.control.state(ROUTE).version == version, timeout=5,
                       message="a to follow a change made after the outage")


async def leader_of(admins: list[httpx.AsyncClient]) -> str | None:
    for admin in admins:
        try:
            view = (await admin.get("/admin/cluster")).json()
        except httpx.TransportError:
            continue
        return view["lease"]["holder"]
    return None


async def test_lease_holder_killed_hands_over_and_the_rollout_goes_on(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    config = classifier_config(blue.url, green.url, store=redis_server.url)
    async with gateway_processes(config, tmp_path, 2) as procs:
        admins = [admin_client(p) for p in procs]
        try:
            view = (await admins[0].get("/admin/cluster")).json()
            assert len(view["members"]) == 2
            holder = view["lease"]["holder"]
            ids = {m["pid"]: m["id"] for m in view["members"]}
            by_id = {ids[p.pid]: i for i, p in enumerate(procs)}
            assert holder in by_id and sum(m["leader"] for m in view["members"]) == 1
            dead = by_id[holder]
            alive = 1 - dead
            r = await admins[alive].post(ROLLOUT, json={
                "backend": "green", "steps": [10, 50, 100], "interval": "1500ms",
                "check_interval": "100ms", "window": "10s",
                "gates": {"max_error_rate": 0.05, "min_requests": 5}})
            assert r.status_code == 201, r.text
            async with httpx.AsyncClient(base_url=procs[alive].url, timeout=30) as client:
                async with Traffic(client, loops=2) as traffic:
                    await traffic.more(20)
                    procs[dead].kill()
                    killed = time.monotonic()
                    new = await wait_for(
                        lambda: _new_holder(admins[alive], holder), timeout=15, interval=0.05,
                        message="another process to take the lease")
                    print(f"lease failover after SIGKILL: {time.monotonic() - killed:.2f}s")
                    assert new == ids[procs[alive].pid]
                    gw = cast(RunningGateway, _Remote(admins[alive]))
                    done = await wait_phase(gw, "promoted", "rolled_back", "aborted",
                                            timeout=30)
                    assert done["phase"] == "promoted", done
            await wait_for(lambda: _members(admins[alive], 1), timeout=15,
                           message="the dead process to drop out of the member list")
        finally:
            for admin in admins:
                await admin.aclose()


async def _new_holder(admin: httpx.AsyncClient, old: str) -> str | None:
    holder = (await admin.get("/admin/cluster")).json()["lease"]["holder"]
    return holder if holder not in (None, old) else None


async def _members(admin: httpx.AsyncClient, count: int) -> bool:
    return len((await admin.get("/admin/cluster")).json()["members"]) == count


class _Remote:
    """What `wait_phase` needs of a RunningGateway: its admin client."""

    def __init__(self, admin: httpx.AsyncClient) -> None:
        self.admin = admin



def leader_and_follower(a: RunningGateway, b: RunningGateway
                        ) -> tuple[RunningGateway, RunningGateway]:
    assert a.gateway.lease.held != b.gateway.lease.held, "exactly one controller"
    return (a, b) if a.gateway.lease.held else (b, a)


async def test_a_canary_failing_only_on_the_other_replica_is_rolled_back(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    """The controller's replica sees no traffic at all: only the cluster numbers can tell it
    that the canary fails."""
    config = classifier_config(blue.url, green.url, store=redis_server.url)
    async with running_gateway(config) as a, running_gateway(config) as b:
        leader, follower = leader_and_follower(a, b)
        await set_faults(green.url, error_rate=1.0)
        r = await follower.admin.post(ROLLOUT, json={
            "backend": "green", "steps": [20, 50, 100], "interval": "2s",
            "check_interval": "100ms", "window": "10s",
            "gates": {"max_error_rate": 0.05, "min_requests": 5}})
        assert r.status_code == 201, r.text
        async with Traffic(follower.client, loops=3) as traffic:
            done = await wait_phase(leader, "promoted", "rolled_back", "aborted", timeout=30)
        assert done["phase"] == "rolled_back", done
        assert follower.gateway.control.state(ROUTE).canary_weight == 0
        assert leader.gateway.recorder.stats(ROUTE, "green").totals().requests == 0
        assert any(x.status >= 500 for x in traffic.results)  # the canary did fail there
        decided = [e for e in (await leader.admin.get("/admin/events")).json()["events"]
                   if e["action"] == "rollout_rollback"]
        assert len(decided) == 1 and decided[0]["actor"] == "controller"


async def test_only_the_controller_evaluates_alarms_and_everyone_shows_them(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    alarm = {"name": "blue-errors", "route": ROUTE, "metric": "error_rate", "backend": "blue",
             "window": "30s", "op": ">", "threshold": 0.5, "for": "0s", "min_samples": 5}
    config = classifier_config(blue.url, green.url, store=redis_server.url, alarms=[alarm])
    async with running_gateway(config) as a, running_gateway(config) as b:
        leader, follower = leader_and_follower(a, b)
        await set_faults(blue.url, error_rate=1.0)
        async with Traffic(follower.client, loops=2) as traffic:
            await traffic.more(20)

            async def firing_on(gw: RunningGateway) -> bool:
                alarms = (await gw.admin.get("/admin/alarms")).json()["alarms"]
                return any(x["name"] == "blue-errors" and x["state"] == "firing"
                           for x in alarms)

            await wait_for(lambda: firing_on(follower), timeout=20,
                           message="the follower to show the controller's firing alarm")
            assert await firing_on(leader)
        events = (await a.admin.get("/admin/events")).json()["events"]
        fired = [e for e in events if e["action"] == "alarm_firing"]
        assert len(fired) == 1  # one controller: one event, not one per replica


async def test_thresholds_and_drift_baselines_are_shared_and_outlive_a_process(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer,
) -> None:
    probes = {"path_suffix": "/infer", "output": {"prediction": "outputs[0].data"}}
    alarm = {"name": "nulls", "route": ROUTE, "metric": "null_rate", "backend": "any",
             "window": "30s", "threshold": 0.5}
    config = classifier_config(blue.url, green.url, store=redis_server.url, probes=probes,
                               alarms=[alarm])
    async with running_gateway(config) as b:
        async with running_gateway(config) as a:
            async with Traffic(a.client, loops=2) as traffic:
                await traffic.more(30)
            r = await a.admin.put("/admin/alarms/nulls", json={"threshold": 0.25})
            assert r.status_code == 200, r.text
            taken = None

            async def baseline() -> bool:
                nonlocal taken
                r = await a.admin.post(f"/admin/routes/{ROUTE}/drift/baseline",
                                       json={"window": "1m"})
                taken = r.json().get("baseline")
                return r.status_code == 200  # 409 until the cluster numbers show traffic

            await wait_for(baseline, timeout=10, message="a baseline to be taken")
            assert taken is not None

            async def shown(gw: RunningGateway) -> bool:
                drift = (await gw.admin.get(f"/admin/routes/{ROUTE}/drift")).json()
                alarms = (await gw.admin.get("/admin/alarms")).json()["alarms"]
                return drift["baseline"] == taken and alarms[0]["threshold"] == 0.25

            await wait_for(lambda: shown(b), timeout=5, message="b to show a's changes")
        async with running_gateway(config) as c:  # a is gone; a new process starts
            assert await shown(c)
            assert await shown(b)
