"""The embedded store's contract and the control plane's compare-and-set loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.control import ControlPlane, route_key
from gateway.errors import Conflict, InvalidRequest, NotFound, VersionConflict
from gateway.state import Event, RouteState
from gateway.store import InMemoryStore, open_store


def config() -> Any:
    return parse_config({"routes": [{
        "name": "classifier",
        "match": {"path_prefix": "/v2/models/classifier"},
        "backends": {"blue": {"url": "http://127.0.0.1:9"}, "green": {"url": "http://127.0.0.1:10"},
                     "red": {"url": "http://127.0.0.1:11"}},
        "live": "blue",
    }]}, env={})


# -- InMemoryStore -------------------------------------------------------------------------------


async def test_write_is_compare_and_set() -> None:
    store = InMemoryStore()
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


async def test_documents_are_copies() -> None:
    store = InMemoryStore()
    doc = {"nested": {"x": 1}}
    await store.write("k", doc, 0)
    doc["nested"]["x"] = 99  # the writer's object is not the stored one
    found = await store.read("k")
    assert found is not None and found[0] == {"nested": {"x": 1}}
    found[0]["nested"]["x"] = 42  # nor is the reader's
    assert (await store.read("k")) == ({"nested": {"x": 1}}, 1)


async def test_read_all_by_prefix_and_delete() -> None:
    store = InMemoryStore()
    await store.write("route/a", {"n": 1}, 0)
    await store.write("route/b", {"n": 2}, 0)
    await store.write("other/c", {"n": 3}, 0)
    assert await store.read_all("route/") == {"route/a": ({"n": 1}, 1),
                                              "route/b": ({"n": 2}, 1)}
    await store.delete("route/a")
    assert await store.read("route/a") is None
    assert await store.write("route/a", {"n": 4}, 0) == 1  # absent again


async def test_events_get_ids_are_filtered_and_bounded() -> None:
    store = InMemoryStore(event_limit=5)
    for i in range(8):
        stored = await store.append_event({"route": "a" if i % 2 else "b", "n": i})
        assert stored["id"] == i + 1
    kept = await store.events(limit=100)
    assert [e["n"] for e in kept] == [3, 4, 5, 6, 7]  # oldest dropped, newest last
    assert [e["n"] for e in await store.events(limit=2)] == [6, 7]
    assert [e["n"] for e in await store.events(route="a")] == [3, 5, 7]
    assert [e["n"] for e in await store.events(limit=1, route="b")] == [6]
    assert await store.events(limit=0) == []


async def test_watchers_see_every_change_and_a_broken_one_does_not_fail_writes() -> None:
    store = InMemoryStore()
    seen: list[tuple[str, Any, int]] = []

    def broken(key: str, doc: Any, version: int) -> None:
        raise RuntimeError("watcher bug")

    store.watch(broken)
    store.watch(lambda key, doc, version: seen.append((key, doc, version)))
    await store.write("k", {"a": 1}, 0)
    await store.write("k", {"a": 2}, 1)
    await store.delete("k")
    await store.delete("k")  # absent: nothing to tell
    assert seen == [("k", {"a": 1}, 1), ("k", {"a": 2}, 2), ("k", None, 0)]
    await store.close()
    await store.write("k", {"a": 3}, 0)
    assert len(seen) == 3  # closed: watchers dropped


def test_open_store() -> None:
    assert isinstance(open_store("memory"), InMemoryStore)


# -- ControlPlane --------------------------------------------------------------------------------


async def started_plane(store: InMemoryStore | None = None) -> ControlPlane:
    plane = ControlPlane(config(), store or InMemoryStore())
    await plane.start()
    return plane


async def test_start_seeds_state_from_config_once() -> None:
    store = InMemoryStore()
    plane = await started_plane(store)
    assert plane.state("classifier") == RouteState(live="blue", version=1)
    await plane.switch("classifier", "green", actor="ops")
    # A second process (or a restart) on the same store keeps what is there.
    other = await started_plane(store)
    assert other.state("classifier").live == "green"
    assert other.state("classifier").version == 2


async def test_every_change_is_versioned_and_audited() -> None:
    plane = await started_plane()
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


async def test_refused_change_writes_nothing() -> None:
    plane = await started_plane()
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


async def test_no_op_change_records_nothing() -> None:
    plane = await started_plane()
    await plane.switch("classifier", "blue", actor="a")  # already live
    assert plane.state("classifier").version == 1
    assert await plane.events() == []


async def test_switch_and_rollback() -> None:
    plane = await started_plane()
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

    async def write(self, key: str, doc: dict[str, Any], expected_version: int) -> int:
        try:
            return await super().write(key, doc, expected_version)
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
        async def write(self, key: str, doc: dict[str, Any], expected_version: int) -> int:
            if key == route_key("classifier") and expected_version > 0:
                raise VersionConflict("someone else, again")
            return await super().write(key, doc, expected_version)

    plane = await started_plane(AlwaysConflicting())
    with pytest.raises(Conflict):
        await plane.switch("classifier", "green", actor="a")
    assert await plane.events() == []
