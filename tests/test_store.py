"""The store contract, for every store (embedded and Redis), and the control plane's
compare-and-set loop on top of it.

Each contract test takes `store` (and `peer`: another instance sharing its state, as another
gateway process sees it; the embedded store is per process, so its peer is itself).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.control import ControlPlane, route_key
from gateway.errors import Conflict, InvalidRequest, LeaseLost, NotFound, VersionConflict
from gateway.state import Event, RouteState
from gateway.store import InMemoryStore, Store, open_store
from gateway.store.redis import RedisStore
from tests.helpers import wait_for


def config() -> Any:
    return parse_config({"routes": [{
        "name": "classifier",
        "match": {"path_prefix": "/v2/models/classifier"},
        "backends": {"blue": {"url": "http://127.0.0.1:9"}, "green": {"url": "http://127.0.0.1:10"},
                     "red": {"url": "http://127.0.0.1:11"}},
        "live": "blue",
    }]}, env={})


class Stores:
    """Instances of the store under test that share one state, and their clean-up."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url
        self.namespace = f"test-{uuid.uuid4().hex[:8]}"
        self.opened: list[Store] = []

    async def open(self) -> Store:
        if self.kind == "memory":
            if not self.opened:
                self.opened.append(InMemoryStore())
            return self.opened[0]
        assert self.url is not None
        store = RedisStore(self.url, namespace=self.namespace)
        await store.start()
        self.opened.append(store)
        return store

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    opened = Stores(request.param, url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(stores: Stores) -> Store:
    return await stores.open()


@pytest.fixture
async def peer(stores: Stores, store: Store) -> Store:
    return await stores.open()


# -- documents -----------------------------------------------------------------------------------


async def test_flags(store: Store, stores: Stores) -> None:
    assert store.up
    assert store.shared == (stores.kind != "memory")


async def test_write_is_compare_and_set(store: Store) -> None:
    assert await store.read("k") is None
    assert await store.write("k", {"a": 1}, 0) == 1
    assert await store.read("k") == ({"a": 1}, 1)
    with pytest.raises(VersionConflict):
        await store.write("k", {"a": 2}, 0)  # "absent" but it exists
    with pytest.raises(VersionConflict):
        await store.write("k", {"a": 2}, 2)  # from the future
    assert await store.read("k") == ({"a": 1}, 1)  # losers changed nothing
    assert await store.write("k", {"a": 2}, 1) == 2
    with pytest.raises(VersionConflict):
        await store.write("new", {"a": 1}, 1)  # absent is version 0
    assert await store.read("new") is None


async def test_documents_are_copies(store: Store) -> None:
    doc: dict[str, Any] = {"nested": {"x": 1}, "f": 0.1, "s": "ü\n", "n": None,
                           "l": [1, 2.5, True]}
    await store.write("k", doc, 0)
    doc["nested"]["x"] = 99  # the writer's object is not the stored one
    found = await store.read("k")
    assert found is not None and found[0]["nested"] == {"x": 1}
    assert found[0] == dict(doc, nested={"x": 1})  # JSON values survive as they were
    found[0]["nested"]["x"] = 42  # nor is the reader's
    assert (await store.read("k")) == (dict(doc, nested={"x": 1}), 1)


async def test_read_all_by_prefix_and_compare_and_set_delete(store: Store) -> None:
    await store.write("route/a", {"n": 1}, 0)
    await store.write("route/b", {"n": 2}, 0)
    await store.write("other/c", {"n": 3}, 0)
    assert await store.read_all("route/") == {"route/a": ({"n": 1}, 1),
                                              "route/b": ({"n": 2}, 1)}
    with pytest.raises(VersionConflict):
        await store.delete("route/a", 2)  # not the version stored
    with pytest.raises(VersionConflict):
        await store.delete("route/a", 0)  # "absent", but it exists
    assert await store.read("route/a") == ({"n": 1}, 1)
    await store.delete("route/a", 1)
    assert await store.read("route/a") is None
    await store.delete("route/a", 0)  # absent, as expected: a no-op
    with pytest.raises(VersionConflict):
        await store.delete("route/a", 1)
    assert await store.write("route/a", {"n": 4}, 0) == 1  # absent again
    assert set(await store.read_all("")) == {"route/a", "route/b", "other/c"}


async def test_commit_stores_the_change_and_its_event_atomically(store: Store) -> None:
    version, event = await store.commit("route/a", {"n": 1}, 0,
                                        {"route": "a", "action": "seed", "id": 999})
    assert version == 1
    assert event == {"route": "a", "action": "seed", "id": 1}  # the store assigns ids
    assert await store.events() == [event]
    event["action"] = "changed by the caller"  # the stored event is not the returned one
    event = (await store.events())[0]
    assert event["action"] == "seed"
    with pytest.raises(VersionConflict):  # lost the race: neither the change nor its event
        await store.commit("route/a", {"n": 2}, 0, {"route": "a", "action": "lost"})
    assert await store.read("route/a") == ({"n": 1}, 1)
    assert await store.events() == [event]
    version, second = await store.commit("route/a", {"n": 2}, 1, {"route": "a", "action": "set"})
    assert (version, second["id"]) == (2, 2)
    assert await store.read("route/a") == ({"n": 2}, 2)
    assert [e["action"] for e in await store.events()] == ["seed", "set"]


async def test_events_ids_limit_cursor_and_route_filter(store: Store) -> None:
    for i in range(8):
        route = "a" if i % 2 else "b"
        if i % 3:
            stored = await store.append_event({"route": route, "n": i})
        else:  # commits and plain appends share one sequence
            _, stored = await store.commit(f"k{i}", {}, 0, {"route": route, "n": i})
        assert stored["id"] == i + 1
    await store.append_event({"route": None, "n": 8})
    assert [e["n"] for e in await store.events()] == list(range(9))  # oldest first
    assert [e["id"] for e in await store.events()] == list(range(1, 10))
    assert [e["n"] for e in await store.events(limit=2)] == [7, 8]  # the newest
    assert [e["n"] for e in await store.events(route="a")] == [1, 3, 5, 7]
    assert [e["n"] for e in await store.events(limit=1, route="b")] == [6]
    assert await store.events(route="nope") == []
    assert await store.events(limit=0) == []
    # The cursor form: the first `limit` after `since`.
    assert [e["id"] for e in await store.events(limit=3, since=0)] == [1, 2, 3]
    assert [e["id"] for e in await store.events(limit=3, since=3)] == [4, 5, 6]
    assert [e["id"] for e in await store.events(limit=3, since=8)] == [9]
    assert await store.events(limit=3, since=9) == []
    assert [e["n"] for e in await store.events(limit=2, route="a", since=2)] == [3, 5]
    assert [e["n"] for e in await store.events(route="b", since=5)] == [6]


async def test_events_are_shared(store: Store, peer: Store) -> None:
    first = await store.append_event({"route": "a", "n": 1})
    second = await peer.append_event({"route": "a", "n": 2})
    assert second["id"] > first["id"]
    assert await store.events(route="a") == await peer.events(route="a") == [first, second]


# -- change notification -------------------------------------------------------------------------


async def test_watchers_see_every_change_and_a_broken_one_does_not_fail_writes(
        store: Store, peer: Store) -> None:
    seen: list[tuple[str, Any, int]] = []

    def broken(key: str, doc: Any, version: int) -> None:
        raise RuntimeError("watcher bug")

    store.watch(broken)
    store.watch(lambda key, doc, version: seen.append((key, doc, version)))
    await store.write("k", {"a": 1}, 0)
    await store.commit("k", {"a": 2}, 1, {"route": None})
    await store.delete("k", 2)
    await store.delete("k", 0)  # absent: nothing to tell
    # The writer's own watchers have heard when the call returns.
    assert seen == [("k", {"a": 1}, 1), ("k", {"a": 2}, 2), ("k", None, 0)]
    await store.close()
    await peer.write("k", {"a": 3}, 0)
    assert len(seen) == 3  # closed: watchers dropped


async def test_watchers_get_their_own_copies(store: Store) -> None:
    docs: list[Any] = []
    store.watch(lambda key, doc, version: docs.append(doc))
    store.watch(lambda key, doc, version: docs.append(doc))
    await store.write("k", {"nested": {"x": 1}}, 0)
    docs[0]["nested"]["x"] = 2
    assert docs[1] == {"nested": {"x": 1}}
    assert await store.read("k") == ({"nested": {"x": 1}}, 1)


async def test_watch_sees_changes_from_another_instance(store: Store, peer: Store) -> None:
    heard: list[tuple[str, Any, int]] = []
    peer.watch(lambda key, doc, version: heard.append((key, doc, version)))
    await store.write("k", {"a": 1}, 0)
    await store.commit("k", {"a": 2}, 1, {"route": "r"})
    await store.write("other", {"b": 1}, 0)
    await store.delete("other", 1)
    await wait_for(lambda: ("other", None, 0) in heard, timeout=5, message="the delete")
    # In order per key (a resync may skip an intermediate version, never go back).
    versions = [version for key, _, version in heard if key == "k"]
    assert versions == sorted(set(versions)) and versions[-1] == 2
    assert ("k", {"a": 2}, 2) in heard
    assert [(d, v) for k, d, v in heard if k == "other"][-1] == (None, 0)


# -- fences, leases, members ---------------------------------------------------------------------


async def test_fenced_writes_need_the_lease(store: Store, peer: Store) -> None:
    fence = ("controller", "me")
    with pytest.raises(LeaseLost):  # nobody holds it
        await store.write("k", {"a": 1}, 0, fence=fence)
    assert await peer.acquire_lease("controller", "other", 10)
    for attempt in (
        store.write("k", {"a": 1}, 0, fence=fence),
        store.commit("k", {"a": 1}, 0, {"route": "r"}, fence=fence),
    ):
        with pytest.raises(LeaseLost):
            await attempt
    assert await store.read("k") is None
    assert await store.events() == []  # a refused commit leaves no event
    await peer.release_lease("controller", "other")
    assert await store.acquire_lease("controller", "me", 10)
    assert await store.write("k", {"a": 1}, 0, fence=fence) == 1
    version, _ = await store.commit("k", {"a": 2}, 1, {"route": "r"}, fence=fence)
    assert version == 2
    with pytest.raises(VersionConflict):  # the fence does not replace the version check
        await store.write("k", {"a": 3}, 1, fence=fence)
    await store.release_lease("controller", "me")
    with pytest.raises(LeaseLost):
        await store.delete("k", 2, fence=fence)
    assert await store.read("k") == ({"a": 2}, 2)
    await store.delete("k", 2)


async def test_leases(store: Store, peer: Store) -> None:
    assert await store.lease_holder("lead") is None
    assert await store.acquire_lease("lead", "a", 10)
    assert await peer.lease_holder("lead") == "a"
    assert not await peer.acquire_lease("lead", "b", 10)  # held by another
    assert await store.acquire_lease("lead", "a", 10)  # renewed
    await peer.release_lease("lead", "b")  # not the holder: nothing happens
    assert await store.lease_holder("lead") == "a"
    await store.release_lease("lead", "a")
    assert await peer.lease_holder("lead") is None
    assert await peer.acquire_lease("lead", "b", 0.2)
    # Not renewed: it expires after its TTL and another holder can take it.
    await wait_for(lambda: store.acquire_lease("lead", "a", 10), timeout=5,
                   message="the lease to expire")
    assert await peer.lease_holder("lead") == "a"


async def test_renewing_extends_a_lease(store: Store) -> None:
    assert await store.acquire_lease("lead", "a", 0.3)
    for _ in range(5):  # renewed faster than it expires: never lost
        assert await store.acquire_lease("lead", "a", 0.3)
        await asyncio.sleep(0.1)
    assert await store.lease_holder("lead") == "a"


async def test_members(store: Store, peer: Store) -> None:
    assert await store.members() == []
    await store.heartbeat("gw-1", {"pid": 1, "id": "ignored"}, 10)
    await peer.heartbeat("gw-2", {"pid": 2}, 0.2)
    found = {m["id"]: m for m in await store.members()}
    assert set(found) == {"gw-1", "gw-2"}
    assert found["gw-1"]["pid"] == 1 and found["gw-1"]["heartbeat"] > 0
    # gw-2 stops sending heartbeats: gone after its TTL.
    await wait_for(lambda: _member_ids(store, {"gw-1"}), timeout=5, message="gw-2 to expire")
    await store.heartbeat("gw-1", {"pid": 1, "n": 2}, 10)  # a heartbeat updates the info
    assert [m.get("n") for m in await peer.members()] == [2]
    await store.leave("gw-1")
    assert await peer.members() == []
    await store.leave("gw-1")  # twice: fine


async def _member_ids(store: Store, expected: set[str]) -> bool:
    return {m["id"] for m in await store.members()} == expected


# -- races ---------------------------------------------------------------------------------------


async def test_concurrent_writers_one_winner_per_version_one_event_per_change(
        store: Store, peer: Store) -> None:
    writers = 50
    await store.write("k", {"n": 0, "by": None}, 0)
    barrier = asyncio.Barrier(writers)
    winners: dict[int, int] = {}  # version -> writer
    first_round: list[bool] = []
    conflicts = 0

    async def writer(i: int, instance: Store) -> None:
        nonlocal conflicts
        racing = True
        while True:
            found = await instance.read("k")
            assert found is not None
            doc, version = found
            if racing:
                await barrier.wait()  # everyone read the same version before anyone writes
            try:
                new, _ = await instance.commit(
                    "k", {"n": doc["n"] + 1, "by": i}, version,
                    {"route": "k", "by": i, "version": version + 1})
            except VersionConflict:
                conflicts += 1
                if racing:
                    first_round.append(False)
                racing = False
                continue
            if racing:
                first_round.append(True)
            assert new == version + 1 and new not in winners
            winners[new] = i
            return

    await asyncio.wait_for(asyncio.gather(*(
        writer(i, store if i % 2 else peer) for i in range(writers))), 60)
    assert first_round.count(True) == 1 and len(first_round) == writers
    assert sorted(winners) == list(range(2, writers + 2))
    assert sorted(winners.values()) == list(range(writers))
    assert conflicts >= writers - 1
    # No lost update: every increment landed.
    assert await store.read("k") == ({"n": writers, "by": winners[writers + 1]}, writers + 1)
    # One event per successful change, in the order of the changes.
    events = await peer.events(limit=1000, route="k")
    assert [(e["version"], e["by"]) for e in events] == sorted(winners.items())
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)


def test_open_store() -> None:
    assert isinstance(open_store("memory"), InMemoryStore)
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@example.com:6380/1",
                "unix:///run/redis.sock?db=2"):
        assert isinstance(open_store(url), RedisStore)


async def test_embedded_event_log_is_bounded() -> None:
    store = InMemoryStore(event_limit=5)
    for i in range(8):
        stored = await store.append_event({"route": "a" if i % 2 else "b", "n": i})
        assert stored["id"] == i + 1
    kept = await store.events(limit=100)
    assert [e["n"] for e in kept] == [3, 4, 5, 6, 7]  # oldest dropped, newest last
    assert [e["n"] for e in await store.events(route="a")] == [3, 5, 7]


# -- ControlPlane --------------------------------------------------------------------------------


async def started_plane(store: Store | None = None) -> ControlPlane:
    plane = ControlPlane(config(), store or InMemoryStore())
    await plane.start()
    return plane


async def test_start_seeds_state_from_config_once(store: Store, peer: Store) -> None:
    plane = await started_plane(store)
    assert plane.state("classifier") == RouteState(live="blue", version=1)
    await plane.switch("classifier", "green", actor="ops")
    # A second process (or a restart) on the same store keeps what is there.
    other = await started_plane(peer)
    assert other.state("classifier").live == "green"
    assert other.state("classifier").version == 2


async def test_every_change_is_versioned_and_audited(store: Store) -> None:
    plane = await started_plane(store)
    heard: list[Event] = []
    changes: list[tuple[str, RouteState]] = []
    plane.on_event(heard.append)
    plane.on_change(lambda name, state: changes.append((name, state)))
    state = await plane.set_canary("classifier", "green", 10, actor="alice", reason="try it")
    assert (state.canary, state.canary_weight, state.version) == ("green", 10.0, 2)
    assert plane.state("classifier") == state
    assert changes == [("classifier", state)]
    events = await plane.events()
    assert events == heard
    (event,) = events
    assert (event.route, event.actor, event.action, event.reason) == (
        "classifier", "alice", "canary", "try it")
    assert event.before is not None and event.before["canary"] is None
    assert event.after is not None and event.after["canary_weight"] == 10.0
    assert event.after["version"] == 2 and event.before["version"] == 1
    assert event.time > 0 and event.id == 1


async def test_another_process_routes_by_a_change(store: Store, peer: Store) -> None:
    plane = await started_plane(store)
    other = await started_plane(peer)
    state = await plane.switch("classifier", "green", actor="ops")
    await wait_for(lambda: other.state("classifier") == state, timeout=5,
                   message="the other process to see the switch")


async def test_refused_change_writes_nothing(store: Store) -> None:
    plane = await started_plane(store)
    for call in (
        plane.set_canary("classifier", "purple", 10, actor="a"),
        plane.set_canary("classifier", "blue", 10, actor="a"),
        plane.set_canary("classifier", "green", 101, actor="a"),
        plane.set_canary("classifier", "green", True, actor="a"),
        plane.set_canary("classifier", "green", 10.001, actor="a"),
        plane.switch("classifier", "purple", actor="a"),
    ):
        with pytest.raises(InvalidRequest):
            await call
    with pytest.raises(Conflict):
        await plane.rollback("classifier", actor="a")
    with pytest.raises(NotFound):
        await plane.switch("nope", "green", actor="a")
    assert plane.state("classifier").version == 1
    assert await plane.events() == []


async def test_no_op_change_records_nothing(store: Store) -> None:
    plane = await started_plane(store)
    await plane.switch("classifier", "blue", actor="a")  # already live
    assert plane.state("classifier").version == 1
    assert await plane.events() == []


async def test_switch_and_rollback(store: Store) -> None:
    plane = await started_plane(store)
    await plane.set_canary("classifier", "green", 20, actor="a")
    state = await plane.switch("classifier", "green", actor="a")
    assert (state.live, state.previous, state.canary, state.canary_weight) == (
        "green", "blue", None, 0.0)
    state = await plane.rollback("classifier", actor="a")
    assert (state.live, state.previous) == ("blue", "green")
    # A rollback with canary traffic flowing takes the canary to 0 first.
    await plane.set_canary("classifier", "red", 5, actor="a")
    state = await plane.rollback("classifier", actor="a")
    assert (state.live, state.canary_weight) == ("blue", 0.0)
    actions = [e.action for e in await plane.events()]
    assert actions == ["canary", "switch", "rollback", "canary", "rollback"]


async def test_fenced_mutation_by_a_process_without_the_lease_is_refused(store: Store) -> None:
    plane = await started_plane(store)
    fence = ("rollout", "controller-1")
    with pytest.raises(LeaseLost):
        await plane.switch("classifier", "green", actor="controller", fence=fence)
    assert await store.acquire_lease("rollout", "controller-1", 10)
    state = await plane.switch("classifier", "green", actor="controller", fence=fence)
    assert state.live == "green"
    assert [e.action for e in await plane.events()] == ["switch"]


class RacyStore(InMemoryStore):
    """Lets two writers read the same version before either writes: a real lost race."""

    def __init__(self, readers: int) -> None:
        super().__init__()
        self.barrier = asyncio.Barrier(readers)
        self.racing = False
        self.conflicts = 0

    async def read(self, key: str) -> tuple[dict[str, Any], int] | None:
        found = await super().read(key)
        if self.racing:
            await asyncio.wait_for(self.barrier.wait(), 5)  # both have read the same version
            self.racing = False
        return found

    async def commit(self, key: str, doc: dict[str, Any], expected_version: int,
                     event: dict[str, Any], *,
                     fence: tuple[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        try:
            return await super().commit(key, doc, expected_version, event, fence=fence)
        except VersionConflict:
            self.conflicts += 1
            raise


async def test_mutate_retries_a_lost_race_and_both_writers_land() -> None:
    store = RacyStore(readers=2)
    plane = await started_plane(store)
    before = plane.state("classifier").version
    store.racing = True
    a, b = await asyncio.gather(
        plane.set_canary("classifier", "green", 10, actor="alice"),
        plane.set_shadow("classifier", "red", 50, actor="bob"),
    )
    assert store.conflicts == 1  # one of them lost the race and retried
    final = plane.state("classifier")
    assert final.version == before + 2
    assert {a.version, b.version} == {before + 1, before + 2}
    # Neither change was lost.
    assert (final.canary, final.canary_weight) == ("green", 10.0)
    assert (final.shadow, final.shadow_sample) == ("red", 50.0)
    events = await plane.events()
    assert sorted(e.actor for e in events) == ["alice", "bob"]
    # The second event's "before" is the first one's "after": the retry re-read the state.
    first, second = events
    assert second.before == first.after


async def test_mutate_gives_up_on_endless_conflicts() -> None:
    class AlwaysConflicting(InMemoryStore):
        async def commit(self, key: str, doc: dict[str, Any], expected_version: int,
                         event: dict[str, Any], *,
                         fence: tuple[str, str] | None = None) -> tuple[int, dict[str, Any]]:
            if key == route_key("classifier"):
                raise VersionConflict("someone else, again")
            return await super().commit(key, doc, expected_version, event, fence=fence)

    plane = await started_plane(AlwaysConflicting())
    with pytest.raises(Conflict):
        await plane.switch("classifier", "green", actor="a")
    assert await plane.events() == []
