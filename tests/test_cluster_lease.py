"""The controller lease and the member list, against both stores (one contract)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.cluster.lease import Lease
from gateway.cluster.members import Membership
from gateway.errors import LeaseLost
from gateway.store import InMemoryStore, Store, open_store
from tests.helpers import wait_for


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, Store]]:
    """Two handles on one store, as two processes would have."""
    if request.param == "memory":
        shared = InMemoryStore()
        yield shared, shared
        return
    url = request.getfixturevalue("redis_server").url
    a, b = open_store(url), open_store(url)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_one_holder_at_a_time_and_release_hands_over(stores: tuple[Store, Store]) -> None:
    a, b = stores
    first = Lease(a, "p1", ttl=3.0, renew=0.5)
    second = Lease(b, "p2", ttl=3.0, renew=0.5)
    changes: list[bool] = []
    second.on_change(changes.append)
    await first.start()
    await second.start()
    try:
        assert first.held and not second.held
        assert await a.lease_holder("controller") == "p1"
        await first.stop()  # releases: p2 takes over at its next attempt, not after the TTL
        await wait_for(lambda: second.held, timeout=5, message="p2 to take the lease")
        assert changes == [True]
        assert await b.lease_holder("controller") == "p2"
    finally:
        await first.stop()
        await second.stop()
    assert not second.held
    assert changes == [True, False]


async def test_a_holder_that_stops_renewing_is_replaced_after_the_ttl(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    dead = Lease(a, "p1", ttl=0.6, renew=0.1)
    assert await dead.attempt()  # taken once, never renewed: the process "died"
    other = Lease(b, "p2", ttl=0.6, renew=0.1)
    await other.start()
    try:
        await wait_for(lambda: other.held, timeout=5, message="p2 to take the expired lease")
        assert not await dead.attempt()  # the old holder comes back: refused
    finally:
        await other.stop()


async def test_fenced_writes_of_a_process_without_the_lease_are_refused(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    assert await a.acquire_lease("controller", "p1", 5.0)
    version = await a.write("doc", {"n": 1}, 0, fence=("controller", "p1"))
    with pytest.raises(LeaseLost):
        await b.write("doc", {"n": 2}, version, fence=("controller", "p2"))
    with pytest.raises(LeaseLost):
        await b.commit("doc", {"n": 2}, version, {"action": "x"}, fence=("controller", "p2"))
    assert (await b.read("doc")) == ({"n": 1}, version)
    assert await b.events(10) == []  # the refused commit left no event behind


async def test_members_announce_themselves_and_leave(stores: tuple[Store, Store]) -> None:
    a, b = stores
    one = Membership(a, "p1", lambda: {"pid": 1}, interval=0.1, ttl=2.0)
    two = Membership(b, "p2", lambda: {"pid": 2}, interval=0.1, ttl=2.0)
    await one.start()
    await two.start()
    try:
        members = {m["id"]: m for m in await a.members()}
        assert set(members) == {"p1", "p2"}
        assert members["p2"]["pid"] == 2 and members["p2"]["heartbeat"] > 0
        await two.stop()
        assert [m["id"] for m in await a.members()] == ["p1"]
    finally:
        await one.stop()
        await two.stop()
