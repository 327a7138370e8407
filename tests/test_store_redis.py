"""What only the Redis store does: outages, lost data (a new epoch), missed notifications,
namespaces, and keeping the shared log bounded. The contract itself is in test_store.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.config import parse_config
from gateway.control import ControlPlane
from gateway.errors import StoreUnavailable, VersionConflict
from gateway.store.redis import RedisStore
from gateway.store.url import redacted_url
from tests.helpers import refusing_port, wait_for
from tests.redis_server import RedisServer

Seen = list[tuple[str, Any, int]]


@asynccontextmanager
async def opened(url: str, **kwargs: Any) -> AsyncIterator[RedisStore]:
    store = RedisStore(url, **kwargs)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def recorder(store: RedisStore) -> Seen:
    seen: Seen = []
    store.watch(lambda key, doc, version: seen.append((key, doc, version)))
    return seen


def latest(seen: Seen, key: str) -> Callable[[], tuple[Any, int] | None]:
    def find() -> tuple[Any, int] | None:
        found = [(doc, version) for k, doc, version in seen if k == key]
        return found[-1] if found else None

    return find


async def test_unreachable_redis_raises_store_unavailable_and_recovers(
        redis_server: RedisServer) -> None:
    async with opened(redis_server.url, resync_interval=0.2) as a, \
            opened(redis_server.url, resync_interval=0.2) as b:
        seen = recorder(b)
        await a.write("k", {"n": 1}, 0)
        redis_server.kill()
        for call in (a.write("k", {"n": 2}, 1), a.read("k"), a.read_all(""), a.events(),
                     a.commit("k", {}, 1, {"route": "r"}), a.append_event({}),
                     a.acquire_lease("l", "me", 1), a.members(), a.heartbeat("m", {}, 1)):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await call
        assert not a.up
        await wait_for(lambda: not b.up, timeout=5, message="b's listener to notice")
        redis_server.start()  # empty: the data is gone
        await wait_for(lambda: a.up and b.up, timeout=10, message="both to reconnect")
        # Both listeners are back: a change made now reaches the other instance.
        await a.write("k", {"n": 3}, 0)
        await wait_for(lambda: latest(seen, "k")() == ({"n": 3}, 1), timeout=5,
                       message="the change after recovery")


async def test_lost_data_calls_reset_listeners_and_owners_seed_again(
        redis_server: RedisServer) -> None:
    async with opened(redis_server.url, resync_interval=0.2) as owner, \
            opened(redis_server.url, resync_interval=0.2) as other:
        resets: list[str] = []

        async def reseed() -> None:
            resets.append("owner")
            await owner.write("route/a", {"seeded": True}, 0)

        async def broken() -> None:
            raise RuntimeError("reset listener bug")

        owner.on_reset(broken)
        owner.on_reset(reseed)
        other.on_reset(lambda: _append(resets, "other"))
        seen = recorder(other)
        await owner.write("route/a", {"seeded": True}, 0)
        await owner.write("route/a", {"changed": True}, 1)
        await wait_for(lambda: latest(seen, "route/a")() == ({"changed": True}, 2), timeout=5)
        assert resets == []  # starting is not a reset
        redis_server.kill()
        redis_server.start()
        await wait_for(lambda: sorted(resets) == ["other", "owner"], timeout=10,
                       message="both instances to see the new epoch")
        # The other instance forgot what it had delivered: it delivers the re-seeded document
        # even though its version (1) is lower than the one it knew.
        await wait_for(lambda: latest(seen, "route/a")() == ({"seeded": True}, 1), timeout=5,
                       message="the re-seeded document")
        assert await other.read("route/a") == ({"seeded": True}, 1)
        await asyncio.sleep(0)
        assert sorted(resets) == ["other", "owner"]  # once each


async def _append(items: list[str], item: str) -> None:
    items.append(item)


async def test_missed_notifications_are_repaired_by_the_resync(
        redis_server: RedisServer) -> None:
    ns = f"test-{uuid.uuid4().hex[:8]}"
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        async with opened(redis_server.url, namespace=ns, resync_interval=0.2) as store:
            seen = recorder(store)
            await store.write("gone", {"n": 1}, 0)
            # Changes that were never published (as if the message was lost on the way).
            await raw.hset(f"{ns}:docs", mapping={"k": b'{"n":7}'})
            await raw.hset(f"{ns}:versions", mapping={"k": 3})
            await raw.hdel(f"{ns}:docs", "gone")
            await raw.hdel(f"{ns}:versions", "gone")
            await wait_for(lambda: latest(seen, "k")() == ({"n": 7}, 3), timeout=5,
                           message="the resync to deliver the missed write")
            await wait_for(lambda: latest(seen, "gone")() == (None, 0), timeout=5,
                           message="the resync to deliver the missed delete")
            assert [k for k, _, _ in seen].count("k") == 1  # delivered once, not every resync
    finally:
        await raw.aclose()


async def test_every_change_reaches_the_other_instance(redis_server: RedisServer) -> None:
    async with opened(redis_server.url) as writer, opened(redis_server.url) as reader:
        seen = recorder(reader)
        for i in range(100):
            await writer.write(f"k/{i}", {"i": i}, 0)
        for version in range(1, 101):
            await writer.commit("same", {"v": version}, version - 1, {"route": "same"})
        await wait_for(lambda: len({k for k, _, _ in seen if k.startswith("k/")}) == 100
                       and latest(seen, "same")() == ({"v": 100}, 100), timeout=10,
                       message="every change at the reader")
        assert sorted((k, d) for k, d, _ in seen if k.startswith("k/")) == sorted(
            (f"k/{i}", {"i": i}) for i in range(100))
        versions = [v for k, _, v in seen if k == "same"]
        assert versions == sorted(set(versions))  # never out of order, never twice


async def test_a_broken_watcher_does_not_stop_the_listener(redis_server: RedisServer) -> None:
    async with opened(redis_server.url) as writer, opened(redis_server.url) as reader:
        def broken(key: str, doc: Any, version: int) -> None:
            raise RuntimeError("watcher bug")

        reader.watch(broken)
        seen = recorder(reader)
        await writer.write("a", {}, 0)
        await writer.write("b", {}, 0)
        await wait_for(lambda: [k for k, _, _ in seen] == ["a", "b"], timeout=5)


async def test_namespaces_are_isolated(redis_server: RedisServer) -> None:
    async with opened(redis_server.url, namespace="one") as one, \
            opened(redis_server.url, namespace="two") as two:
        seen = recorder(two)
        await one.write("k", {"n": 1}, 0)
        await one.append_event({"route": "r"})
        assert await one.acquire_lease("lead", "x", 10)
        await one.heartbeat("gw", {}, 10)
        assert await two.read("k") is None
        assert await two.events() == [] and await two.events(route="r") == []
        assert await two.lease_holder("lead") is None
        assert await two.members() == []
        await two.write("k", {"n": 2}, 0)  # its own version 1, independent of one's
        assert seen == [("k", {"n": 2}, 1)]
        keys = await one.redis.keys("*")
        assert keys and all(isinstance(k, bytes) and k.startswith((b"one:", b"two:"))
                            for k in keys)
        assert two.namespace == "two"


async def test_the_shared_event_log_stays_bounded(redis_server: RedisServer) -> None:
    async with opened(redis_server.url, event_limit=5) as store:
        for i in range(500):
            await store.append_event({"route": "r", "n": i})
        # Trimming is approximate (whole stream nodes), but it happens.
        assert await store.redis.xlen("modelgate:events") < 250
        assert await store.redis.xlen("modelgate:events:route:r") < 250
        assert [e["n"] for e in await store.events(limit=3)] == [497, 498, 499]
        assert [e["id"] for e in await store.events(limit=3, route="r")] == [498, 499, 500]


async def test_a_lost_event_counter_does_not_break_the_log(redis_server: RedisServer) -> None:
    async with opened(redis_server.url) as store:
        await store.append_event({"route": "r"})
        _, second = await store.commit("k", {}, 0, {"route": "r"})
        await store.redis.delete("modelgate:events:seq")  # evicted alone, say
        third = await store.append_event({"route": "r"})
        _, fourth = await store.commit("k", {}, 1, {"route": "r"})
        assert (second["id"], third["id"], fourth["id"]) == (2, 3, 4)
        assert [e["id"] for e in await store.events(route="r")] == [1, 2, 3, 4]


async def test_start_fails_fast_without_redis_and_hides_the_password() -> None:
    async with refusing_port() as url:
        port = url.rsplit(":", 1)[1]
        store = RedisStore(f"redis://:hunter2@127.0.0.1:{port}/0")
        with pytest.raises(StoreUnavailable) as caught:
            await store.start()
        assert "hunter2" not in str(caught.value) and f":{port}" in str(caught.value)
        assert not store.up
        await store.close()


def test_store_urls_never_show_a_password() -> None:
    assert redacted_url("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redacted_url("redis://app:s3cret@db:6379/0") == "redis://app:***@db:6379/0"
    shown = redacted_url("redis://db:6379/0?password=s3cret&socket_timeout=1")
    assert "s3cret" not in shown and "socket_timeout=1" in shown
    assert "s3cret" not in redacted_url("unix:///run/redis.sock?db=0&password=s3cret")
    assert redacted_url("redis://db:6379/0") == "redis://db:6379/0"


ROUTES = {"routes": [{"name": "r", "match": {"path_prefix": "/p"},
                      "backends": {"blue": {"url": "http://h:1"}, "green": {"url": "http://h:2"}},
                      "live": "blue"}]}


async def test_an_older_copy_of_the_data_is_taken_and_later_writes_apply(
    redis_server: RedisServer,
) -> None:
    """A replica promoted with the last writes missing (the epoch kept, the versions reused
    from a lower number): processes take the store's copy, and their next writes route."""
    config = parse_config({**ROUTES, "store": redis_server.url})
    store = RedisStore(redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}",
                       resync_interval=0.1)
    await store.start()
    control = ControlPlane(config, store)
    try:
        await control.start()
        await control.set_canary("r", "green", 5, actor="op")
        keys = [f"{store.namespace}:{k}" for k in ("docs", "versions", "rev")]
        older = {k: await store.redis.dump(k) for k in keys}
        await control.set_canary("r", "green", 10, actor="op")  # lost in the failover
        for key, value in older.items():
            await store.redis.restore(key, 0, value, replace=True)
        await wait_for(lambda: control.state("r").canary_weight == 5, timeout=5,
                       message="the process to take the store's copy")
        changed = await control.set_canary("r", "green", 0, actor="op")
        assert changed.canary_weight == 0
        assert control.state("r").canary_weight == 0  # routes by its own write again
    finally:
        await store.close()


async def test_a_change_sent_twice_by_a_retry_is_applied_once(redis_server: RedisServer) -> None:
    """redis-py sends a command again when the connection drops after the script ran: the
    second run sees its own change as a conflict, which must not become a second change."""
    async with opened(redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}") as store:
        await store.write("route/r", {"live": "blue"}, 0)
        script = store._change

        async def ran_twice(*args: Any, **kwargs: Any) -> Any:
            await script(*args, **kwargs)  # the reply of this run was "lost"
            return await script(*args, **kwargs)

        store._change = ran_twice  # type: ignore[assignment]
        event = {"route": "r", "actor": "op", "action": "rollback", "time": 1.5}
        version, stored = await store.commit("route/r", {"live": "green"}, 1, event)
        assert version == 2 and stored["action"] == "rollback"
        assert await store.read("route/r") == ({"live": "green"}, 2)
        assert [e["id"] for e in await store.events(10, "r")] == [stored["id"]]
        with pytest.raises(VersionConflict):  # a real conflict stays one
            await store.commit("route/r", {"live": "blue"}, 1, dict(event, time=2.5))
