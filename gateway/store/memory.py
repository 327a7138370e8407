"""The embedded store: dicts in one process, with the same contract the Redis store keeps."""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.errors import LeaseLost, VersionConflict

log = logging.getLogger("modelgate.store")
EVENT_LOG_LIMIT = 10_000

Doc = dict[str, Any]


class InMemoryStore:
    def __init__(self, event_limit: int = EVENT_LOG_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._docs: dict[str, tuple[Doc, int]] = {}
        self._events: deque[Doc] = deque(maxlen=event_limit)
        self._next_event_id = 1
        self._watchers: list[Callable[[str, Doc | None, int], None]] = []
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (holder, expires)
        self._members: dict[str, tuple[Doc, float]] = {}  # id -> (info, expires)
        self._clock = clock

    @property
    def up(self) -> bool:
        return True

    @property
    def shared(self) -> bool:
        return False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._watchers.clear()

    async def read(self, key: str) -> tuple[Doc, int] | None:
        found = self._docs.get(key)
        return (copy.deepcopy(found[0]), found[1]) if found else None

    async def read_all(self, prefix: str) -> dict[str, tuple[Doc, int]]:
        return {
            k: (copy.deepcopy(doc), ver) for k, (doc, ver) in self._docs.items()
            if k.startswith(prefix)
        }

    def _check(self, key: str, expected_version: int, fence: tuple[str, str] | None) -> None:
        if fence is not None and self._holder(fence[0]) != fence[1]:
            raise LeaseLost(f"{key}: lease {fence[0]!r} is not held by {fence[1]!r}")
        current = self._docs.get(key)
        current_version = current[1] if current else 0
        if current_version != expected_version:
            raise VersionConflict(
                f"{key}: expected version {expected_version}, store has {current_version}"
            )

    def _put(self, key: str, doc: Doc) -> int:
        current = self._docs.get(key)
        version = (current[1] if current else 0) + 1
        stored = copy.deepcopy(doc)
        self._docs[key] = (stored, version)
        self._notify(key, stored, version)
        return version

    async def write(self, key: str, doc: Doc, expected_version: int, *,
                    fence: tuple[str, str] | None = None) -> int:
        self._check(key, expected_version, fence)
        return self._put(key, doc)

    async def commit(self, key: str, doc: Doc, expected_version: int, event: Doc, *,
                     fence: tuple[str, str] | None = None) -> tuple[int, Doc]:
        self._check(key, expected_version, fence)
        stored = self._append(event)
        return self._put(key, doc), stored

    async def delete(self, key: str, expected_version: int, *,
                     fence: tuple[str, str] | None = None) -> None:
        self._check(key, expected_version, fence)
        if self._docs.pop(key, None) is not None:
            self._notify(key, None, 0)

    def _append(self, event: Doc) -> Doc:
        stored = dict(copy.deepcopy(event), id=self._next_event_id)
        self._next_event_id += 1
        self._events.append(stored)
        return copy.deepcopy(stored)

    async def append_event(self, event: Doc) -> Doc:
        return self._append(event)

    async def events(self, limit: int = 100, route: str | None = None,
                     since: int | None = None) -> list[Doc]:
        if limit <= 0:
            return []
        selected = [e for e in self._events if (route is None or e.get("route") == route)
                    and (since is None or e["id"] > since)]
        picked = selected[:limit] if since is not None else selected[-limit:]
        return copy.deepcopy(picked)

    def watch(self, callback: Callable[[str, Doc | None, int], None]) -> None:
        self._watchers.append(callback)

    def on_reset(self, callback: Callable[[], Awaitable[None]]) -> None:
        return None  # an embedded store never loses its data while its process lives

    def _notify(self, key: str, doc: Doc | None, version: int) -> None:
        for callback in list(self._watchers):
            try:
                callback(key, copy.deepcopy(doc) if doc is not None else None, version)
            except Exception:  # a watcher's bug must not fail the writer
                log.exception("store watcher failed for %s", key)

    # -- leases and members (one process: trivially agreed, kept for the same contract) ------
    def _holder(self, name: str) -> str | None:
        found = self._leases.get(name)
        if found is None or found[1] <= self._clock():
            return None
        return found[0]

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        current = self._holder(name)
        if current not in (None, holder):
            return False
        self._leases[name] = (holder, self._clock() + ttl)
        return True

    async def release_lease(self, name: str, holder: str) -> None:
        if self._holder(name) == holder:
            del self._leases[name]

    async def lease_holder(self, name: str) -> str | None:
        return self._holder(name)

    async def heartbeat(self, member: str, info: Doc, ttl: float) -> None:
        self._members[member] = (dict(copy.deepcopy(info), id=member, heartbeat=time.time()),
                                 self._clock() + ttl)

    async def leave(self, member: str) -> None:
        self._members.pop(member, None)

    async def members(self) -> list[Doc]:
        now = self._clock()
        return [copy.deepcopy(info) for info, expires in self._members.values()
                if expires > now]
