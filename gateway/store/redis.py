"""The shared store: Redis, so every worker and replica of a gateway cluster sees one state.

Key layout (all under ``{ns}``, the namespace, default ``modelgate``):

    {ns}:docs                  hash  key -> document JSON
    {ns}:versions              hash  key -> version (int)
    {ns}:rev                   int   one count of every document change (orders notifications)
    {ns}:epoch                 str   random id of this Redis's data set (gone: data was lost)
    {ns}:events                stream, id ``<n>-0`` (n from {ns}:events:seq), field ``e`` (JSON)
    {ns}:events:route:{route}  stream, the same entries for one route (so a filter reads only it)
    {ns}:lease:{name}          str   the holder, with a TTL
    {ns}:member:{id}           str   the member's info JSON, with a TTL
    {ns}:members               set   member ids (expired ones are pruned on read)
    {ns}:changes               pub/sub channel, one message per document change:
                               {"key", "version", "rev", "epoch", "doc"} (doc null: deleted)

Every change is one Lua script (compare-and-set on the version, the fence, the audit event
and the notification together), so nothing a caller sees can be half done. Notifications are
best effort (pub/sub drops messages while a subscriber is disconnected), so each instance also
re-reads all documents every `resync_interval` and on every reconnect, and delivers what it
missed: a lost message costs at most that interval.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import LeaseLost, StoreError, StoreUnavailable, VersionConflict
from gateway.store.memory import EVENT_LOG_LIMIT
from gateway.store.url import redacted_url

log = logging.getLogger("modelgate.store")

Doc = dict[str, Any]
Watcher = Callable[[str, Doc | None, int], None]
ResetListener = Callable[[], Awaitable[None]]

BACKOFF_MIN = 0.1
BACKOFF_MAX = 1.0
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)
"""Errors that mean "cannot reach a writable Redis right now" (a replica being promoted answers
READONLY: that is an outage too, not a bug)."""

# Next audit event id: INCR, but never at or below what the streams already hold (the counter
# could have been evicted alone; XADD with an explicit id would then fail forever).
_NEXT_EVENT_ID = """
local function last_id(stream)
  local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if top then return tonumber(string.match(top[1], '^(%d+)')) end
  return 0
end
local function next_event_id(seq, main, route)
  local id = redis.call('INCR', seq)
  local floor = last_id(main)
  if route then floor = math.max(floor, last_id(route)) end
  if id <= floor then
    id = floor + 1
    redis.call('SET', seq, id)
  end
  return id
end
local function add_event(seq, main, route, event, maxlen)
  local id = next_event_id(seq, main, route)
  redis.call('XADD', main, 'MAXLEN', '~', maxlen, id .. '-0', 'e', event)
  if route then redis.call('XADD', route, 'MAXLEN', '~', maxlen, id .. '-0', 'e', event) end
  return id
end
"""

# write / commit / delete, all compare-and-set:
# KEYS: docs, versions, rev, epoch, fence lease (or any key), seq, events, [route events]
# ARGV: key, key as JSON, expected version, doc JSON ('' = delete), fenced ('1'/'0'),
#       fence holder, channel, event JSON ('' = none), event maxlen
# -> {'lease'} | {'conflict', current} | {'ok', version, rev, event id, epoch or false}
_CHANGE = _NEXT_EVENT_ID + """
if ARGV[5] == '1' and redis.call('GET', KEYS[5]) ~= ARGV[6] then
  return {'lease'}
end
local field = ARGV[1]
local current = tonumber(redis.call('HGET', KEYS[2], field) or '0')
if current ~= tonumber(ARGV[3]) then
  return {'conflict', current}
end
local doc = ARGV[4]
if doc == '' and current == 0 then
  return {'ok', 0, 0, 0, false}  -- deleting what is absent: nothing changes, nothing to tell
end
local event_id = 0
if ARGV[8] ~= '' then
  event_id = add_event(KEYS[6], KEYS[7], KEYS[8], ARGV[8], ARGV[9])
end
local version = 0
if doc == '' then
  redis.call('HDEL', KEYS[1], field)
  redis.call('HDEL', KEYS[2], field)
  doc = 'null'
else
  version = current + 1
  redis.call('HSET', KEYS[1], field, doc)
  redis.call('HSET', KEYS[2], field, version)
end
local rev = redis.call('INCR', KEYS[3])
local epoch = redis.call('GET', KEYS[4])
redis.call('PUBLISH', ARGV[7], '{"key":' .. ARGV[2] .. ',"version":' .. version
  .. ',"rev":' .. rev .. ',"epoch":' .. (epoch and cjson.encode(epoch) or 'null')
  .. ',"doc":' .. doc .. '}')
return {'ok', version, rev, event_id, epoch}
"""

# KEYS: seq, events, [route events]; ARGV: event JSON, maxlen -> id
_APPEND = _NEXT_EVENT_ID + """
return add_event(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
"""

# KEYS: lease; ARGV: holder, ttl ms -> 1 if held now
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease; ARGV: holder
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: member set, member key; ARGV: member id. Prune only if it is still expired (it may
# have sent a heartbeat since we looked).
_PRUNE = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('SREM', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(slots=True)
class _Seen:
    """What this instance last delivered for a key: `rev` orders it against notifications
    still in flight; `raw` (None: deleted) tells a re-created key from the one we knew."""

    rev: int
    version: int
    raw: bytes | None


class RedisStore:
    """The `Store` contract on one Redis (standalone or a failover pair behind one URL).

    `redis` (the client) and `namespace` are public, for components that publish their own
    cluster data next to the store's.
    """

    def __init__(self, url: str, *, namespace: str = "modelgate",
                 resync_interval: float = 1.0, timeout: float = 1.0,
                 health_check_interval: int = 5, event_limit: int = EVENT_LOG_LIMIT) -> None:
        if not namespace:
            raise ValueError("namespace must not be empty")
        self.namespace = namespace
        self.resync_interval = resync_interval
        self._where = redacted_url(url)
        # Short timeouts: a dead Redis must fail a caller fast (503), never hang it. One quick
        # retry on a connection error only: it replaces a pooled connection that died while
        # idle (Redis restarted); a timeout is not retried (the script may have run).
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=health_check_interval,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1,
                        supported_errors=(RedisConnectionError,)),
        )
        self._event_limit = event_limit
        ns = namespace
        self._k_docs = f"{ns}:docs"
        self._k_versions = f"{ns}:versions"
        self._k_rev = f"{ns}:rev"
        self._k_epoch = f"{ns}:epoch"
        self._k_seq = f"{ns}:events:seq"
        self._k_events = f"{ns}:events"
        self._k_members = f"{ns}:members"
        self._channel = f"{ns}:changes"
        self._change = self.redis.register_script(_CHANGE)
        self._append_script = self.redis.register_script(_APPEND)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._release = self.redis.register_script(_RELEASE)
        self._prune = self.redis.register_script(_PRUNE)
        self._watchers: list[Watcher] = []
        self._reset_listeners: list[ResetListener] = []
        self._up = False
        self._epoch: bytes | None = None
        self._seen: dict[str, _Seen] = {}
        self._floor = 0  # every change up to this rev is in what we delivered (a snapshot)
        self._high = 0  # the highest rev seen at all: a store below it is an older copy
        self._resync_due = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def up(self) -> bool:
        return self._up

    @property
    def shared(self) -> bool:
        return True

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe, claim (or learn) the epoch, and take the current documents as the
        baseline: owners read those themselves after start (as with the embedded store), and
        every change after `start` returns reaches the watchers."""
        if self._task is not None:
            return
        pubsub = self.redis.pubsub()
        try:
            with self._reaching("start"):
                await pubsub.subscribe(self._channel)
                await self.redis.set(self._k_epoch, secrets.token_hex(8), nx=True)
                epoch, rev, docs, versions = await self._snapshot()
        except BaseException:
            await _close_quietly(pubsub)
            raise
        self._epoch = epoch
        self._apply(rev, docs, versions, deliver=False)
        self._task = asyncio.create_task(self._listen(pubsub),
                                         name=f"modelgate store {self.namespace}")

    async def close(self) -> None:
        self._watchers.clear()
        self._reset_listeners.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # gather() re-raises if *we* are cancelled, and swallows only the task's own end.
            await asyncio.gather(task, return_exceptions=True)
        if not self._closed:
            self._closed = True
            await self.redis.aclose()

    # -- documents ---------------------------------------------------------------------------
    async def read(self, key: str) -> tuple[Doc, int] | None:
        with self._reaching("read"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hget(self._k_docs, key)
                pipe.hget(self._k_versions, key)
                raw, version = await pipe.execute()
        if raw is None or version is None:
            return None
        return orjson.loads(raw), int(version)

    async def read_all(self, prefix: str) -> dict[str, tuple[Doc, int]]:
        with self._reaching("read_all"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._k_docs)
                pipe.hgetall(self._k_versions)
                docs, versions = await pipe.execute()
        found: dict[str, tuple[Doc, int]] = {}
        for field, raw in docs.items():
            key = field.decode()
            version = versions.get(field)
            if key.startswith(prefix) and version is not None:
                found[key] = (orjson.loads(raw), int(version))
        return found

    async def write(self, key: str, doc: Doc, expected_version: int, *,
                    fence: tuple[str, str] | None = None) -> int:
        version, _ = await self._run_change("write", key, orjson.dumps(doc), expected_version,
                                            None, None, fence)
        return version

    async def commit(self, key: str, doc: Doc, expected_version: int, event: Doc, *,
                     fence: tuple[str, str] | None = None) -> tuple[int, Doc]:
        body = orjson.dumps(_without_id(event))
        version, event_id = await self._run_change("commit", key, orjson.dumps(doc),
                                                   expected_version, body, event.get("route"),
                                                   fence)
        return version, dict(orjson.loads(body), id=event_id)  # what was stored, a copy

    async def delete(self, key: str, expected_version: int, *,
                     fence: tuple[str, str] | None = None) -> None:
        await self._run_change("delete", key, None, expected_version, None, None, fence)

    async def _run_change(self, action: str, key: str, raw: bytes | None, expected: int,
                          event: bytes | None, route: Any,
                          fence: tuple[str, str] | None) -> tuple[int, int]:
        """Run the change script; deliver the change to this process's watchers before
        returning, so the writer routes by it as soon as the call returns."""
        keys = [self._k_docs, self._k_versions, self._k_rev, self._k_epoch,
                self._lease_key(fence[0]) if fence else self._k_docs,
                self._k_seq, self._k_events]
        if event is not None and isinstance(route, str):
            keys.append(self._route_events_key(route))
        args: list[bytes | str | int] = [
            key, orjson.dumps(key), expected, raw if raw is not None else b"",
            "1" if fence else "0", fence[1] if fence else "", self._channel,
            event if event is not None else b"", self._event_limit,
        ]
        with self._reaching(action):
            reply = await self._change(keys=keys, args=args)
        status = _text(reply[0])
        if status == "lease":
            assert fence is not None
            raise LeaseLost(f"{key}: lease {fence[0]!r} is not held by {fence[1]!r}")
        if status == "conflict":
            stored = int(reply[1])
            if raw is not None and stored == expected + 1:
                # The connection dropped after the script ran and the client sent it again:
                # the "conflict" is our own change. Never apply it twice (a rollback applied
                # twice undoes itself).
                mine = await self._already_applied(key, raw, event, route)
                if mine is not None:
                    return stored, mine
            raise VersionConflict(f"{key}: expected version {expected}, store has {stored}")
        version, rev, event_id, epoch = int(reply[1]), int(reply[2]), int(reply[3]), reply[4]
        if rev:  # 0: deleting an absent key changed nothing
            self._offer(key, raw, version, rev, epoch or None)
        return version, event_id

    async def _already_applied(self, key: str, raw: bytes, event: bytes | None,
                               route: Any) -> int | None:
        """The event id (0 without one) if the stored document, and the newest event of its
        stream, are exactly what this call wrote; None otherwise (a real conflict). An event
        carries its time to the microsecond: another writer's cannot be equal."""
        stream = (self._route_events_key(route) if isinstance(route, str)
                  else self._k_events)
        with self._reaching("read back"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hget(self._k_docs, key)
                pipe.xrevrange(stream, count=1)
                stored, newest = await pipe.execute()
        if stored != raw:
            return None
        if event is None:
            return 0
        if not newest or newest[0][1].get(b"e") != event:
            return None
        return int(_text(newest[0][0]).split("-")[0])

    # -- audit log ---------------------------------------------------------------------------
    async def append_event(self, event: Doc) -> Doc:
        keys = [self._k_seq, self._k_events]
        route = event.get("route")
        if isinstance(route, str):
            keys.append(self._route_events_key(route))
        body = orjson.dumps(_without_id(event))
        with self._reaching("append_event"):
            event_id = await self._append_script(keys=keys, args=[body, self._event_limit])
        return dict(orjson.loads(body), id=int(event_id))

    async def events(self, limit: int = 100, route: str | None = None,
                     since: int | None = None) -> list[Doc]:
        if limit <= 0:
            return []
        stream = self._k_events if route is None else self._route_events_key(route)
        entries: Any
        with self._reaching("events"):
            if since is None:
                entries = list(reversed(await self.redis.xrevrange(stream, count=limit) or []))
            else:
                start = f"{since + 1}-0" if since >= 0 else "-"
                entries = await self.redis.xrange(stream, min=start, count=limit) or []
        return [dict(orjson.loads(fields[b"e"]), id=int(entry_id.split(b"-", 1)[0]))
                for entry_id, fields in entries]

    # -- change notification -----------------------------------------------------------------
    def watch(self, callback: Watcher) -> None:
        self._watchers.append(callback)

    def on_reset(self, callback: ResetListener) -> None:
        self._reset_listeners.append(callback)

    def _offer(self, key: str, raw: bytes | None, version: int, rev: int,
               epoch: bytes | None) -> None:
        """One change, from a local write or a notification: deliver it unless a snapshot or
        a later change already covered it (they arrive in any order)."""
        if epoch != self._epoch:
            self._resync_due = True  # another data set: the resync resets, then delivers
            return
        self._high = max(self._high, rev)
        if rev <= self._floor:
            return
        seen = self._seen.get(key)
        if seen is not None and seen.rev >= rev:
            return
        self._seen[key] = _Seen(rev, version, raw)
        self._notify(key, raw, version)

    def _notify(self, key: str, raw: bytes | None, version: int) -> None:
        for callback in list(self._watchers):
            try:  # each watcher gets its own copy
                callback(key, orjson.loads(raw) if raw is not None else None, version)
            except Exception:  # a watcher's bug must not fail the writer nor the listener
                log.exception("store watcher failed for %s", key)

    def _on_message(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            key, version, rev = str(message["key"]), int(message["version"]), int(message["rev"])
            doc = message["doc"]
            epoch = message["epoch"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed change message on %s", self._channel)
            return
        self._offer(key, orjson.dumps(doc) if doc is not None else None, version, rev,
                    epoch.encode() if isinstance(epoch, str) else None)

    async def _listen(self, subscribed: PubSub) -> None:
        """Notifications, periodic resync, and reconnects: runs until `close()`, whatever Redis
        does (an error waits BACKOFF_MIN..BACKOFF_MAX, never spins)."""
        delay = BACKOFF_MIN
        loop = asyncio.get_running_loop()
        pubsub: PubSub | None = subscribed
        while True:
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub()
                    await pubsub.subscribe(self._channel)
                next_resync = loop.time() + self.resync_interval
                while True:
                    if self._resync_due or loop.time() >= next_resync:
                        self._resync_due = False
                        await self._resync()
                        delay = BACKOFF_MIN
                        next_resync = loop.time() + self.resync_interval
                    message = await pubsub.get_message(
                        timeout=max(0.0, next_resync - loop.time()))
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # (Re)subscribed: what was published while we were not is lost.
                        self._resync_due = True
                    elif message["type"] == "message":
                        self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except UNREACHABLE as exc:
                self._went_down(exc, "listener")
            except Exception:
                log.exception("store listener failed; restarting it")
            finally:
                if pubsub is not None:
                    await _close_quietly(pubsub)
                    pubsub = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _snapshot(self) -> tuple[bytes | None, int, dict[bytes, bytes], dict[bytes, bytes]]:
        """Epoch, change count and every document with its version, as of one instant."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self._k_epoch)
            pipe.get(self._k_rev)
            pipe.hgetall(self._k_docs)
            pipe.hgetall(self._k_versions)
            epoch, rev, docs, versions = await pipe.execute()
        return epoch, int(rev or 0), docs, versions

    async def _resync(self) -> None:
        """Deliver whatever differs from what we delivered; first, if Redis lost its data (the
        epoch is gone or another), start over and let the owners re-seed."""
        epoch, rev, docs, versions = await self._snapshot()
        if epoch != self._epoch:
            await self._reset()
            epoch, rev, docs, versions = await self._snapshot()
            if epoch != self._epoch:  # lost again meanwhile: the next round deals with it
                self._resync_due = True
                return
        if rev < self._high:
            # The change count went back with the epoch kept: an older copy of the data (a
            # replica promoted with writes missing, a restored dump). Its versions are reused
            # from a lower number, so the owners forget theirs and take the store's copy.
            log.warning("redis store %s: change counter went back from %d to %d",
                        self._where, self._high, rev)
            self._seen.clear()
            self._floor = self._high = 0
            if not await self._run_reset_listeners():
                self._resync_due = True
        self._apply(rev, docs, versions, deliver=True)
        self._set_up()

    async def _reset(self) -> None:
        await self.redis.set(self._k_epoch, secrets.token_hex(8), nx=True)
        epoch = _bytes(await self.redis.get(self._k_epoch))
        log.warning("redis store %s lost its data or was replaced (epoch %s -> %s): "
                    "documents will be seeded again", self._where, _text(self._epoch),
                    _text(epoch), extra={"event": "store_reset"})
        previous, self._epoch = self._epoch, epoch
        self._seen.clear()
        self._floor = self._high = 0
        if not await self._run_reset_listeners():
            # An owner could not seed its documents (Redis flapping): forget the new epoch
            # so the next resync runs the reset again (the seeding is idempotent).
            self._epoch = previous
            self._resync_due = True

    async def _run_reset_listeners(self) -> bool:
        """Let every owner seed its documents again; False if the store failed under one of
        them (worth another try; a listener's own bug is logged, not retried)."""
        ok = True
        for callback in list(self._reset_listeners):
            try:
                await callback()
            except StoreError as exc:
                log.warning("seeding the store again failed: %s; will retry", exc)
                ok = False
            except Exception:
                log.exception("store reset listener failed")
        return ok

    def _apply(self, rev: int, docs: dict[bytes, bytes], versions: dict[bytes, bytes], *,
               deliver: bool) -> None:
        """Bring `_seen` to a snapshot taken at `rev`, delivering the differences."""
        snapshot: dict[str, tuple[int, bytes]] = {}
        for field, raw in docs.items():
            stored_version = versions.get(field)
            if stored_version is not None:
                snapshot[field.decode()] = (int(stored_version), raw)
        for key in list(self._seen.keys() | snapshot.keys()):
            seen = self._seen.get(key)
            if seen is not None and seen.rev > rev:
                continue  # a later change than the snapshot was delivered already
            found = snapshot.get(key)
            if found is None:
                del self._seen[key]
                if deliver and seen is not None and seen.raw is not None:
                    self._notify(key, None, 0)
                continue
            version, raw = found
            self._seen[key] = _Seen(rev, version, raw)
            if deliver and (seen is None or (seen.version, seen.raw) != (version, raw)):
                self._notify(key, raw, version)
        self._floor = max(self._floor, rev)
        self._high = max(self._high, rev)

    # -- leases and members ------------------------------------------------------------------
    def _lease_key(self, name: str) -> str:
        return f"{self.namespace}:lease:{name}"

    def _member_key(self, member: str) -> str:
        return f"{self.namespace}:member:{member}"

    def _route_events_key(self, route: str) -> str:
        return f"{self._k_events}:route:{route}"

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        with self._reaching("acquire_lease"):
            held = await self._acquire(keys=[self._lease_key(name)], args=[holder, _ms(ttl)])
        return bool(held)

    async def release_lease(self, name: str, holder: str) -> None:
        with self._reaching("release_lease"):
            await self._release(keys=[self._lease_key(name)], args=[holder])

    async def lease_holder(self, name: str) -> str | None:
        with self._reaching("lease_holder"):
            holder = await self.redis.get(self._lease_key(name))
        return _text(holder) if holder is not None else None

    async def heartbeat(self, member: str, info: Doc, ttl: float) -> None:
        body = orjson.dumps(dict(info, id=member, heartbeat=time.time()))
        with self._reaching("heartbeat"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self._member_key(member), body, px=_ms(ttl))
                pipe.sadd(self._k_members, member)
                await pipe.execute()

    async def leave(self, member: str) -> None:
        with self._reaching("leave"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._member_key(member))
                pipe.srem(self._k_members, member)
                await pipe.execute()

    async def members(self) -> list[Doc]:
        with self._reaching("members"):
            ids = sorted(_text(m) for m in await self.redis.smembers(self._k_members))
            if not ids:
                return []
            infos = await self.redis.mget([self._member_key(m) for m in ids])
            for member, info in zip(ids, infos, strict=True):
                if info is None:  # its key expired: gone without a goodbye
                    await self._prune(keys=[self._k_members, self._member_key(member)],
                                      args=[member])
        return [orjson.loads(info) for info in infos if info is not None]

    # -- reachability ------------------------------------------------------------------------
    @contextmanager
    def _reaching(self, action: str) -> Iterator[None]:
        """Translate "cannot reach Redis" into `StoreUnavailable` and keep `up` current."""
        try:
            yield
        except UNREACHABLE as exc:
            self._went_down(exc, action)
            raise StoreUnavailable(
                f"redis store {self._where} is unreachable ({action}): {exc}") from exc
        except RedisError as exc:
            raise StoreError(f"redis store {self._where}: {action} failed: {exc}") from exc
        self._set_up()

    def _set_up(self) -> None:
        if not self._up:
            self._up = True
            log.info("redis store %s is reachable", self._where, extra={"event": "store_up"})

    def _went_down(self, exc: BaseException, action: str) -> None:
        if self._up:
            log.warning("redis store %s is unreachable (%s): %s", self._where, action, exc,
                        extra={"event": "store_down"})
        self._up = False


async def _close_quietly(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    except Exception:  # the connection is broken anyway
        log.debug("closing the pub/sub connection failed", exc_info=True)


def _without_id(event: Doc) -> Doc:
    """The store assigns ids: one given by the caller is not kept."""
    return {k: v for k, v in event.items() if k != "id"}


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value

