"""The embedded store: dicts in one process, with the same contract the Redis store keeps."""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.errors import VersionConflict

log = logging.getLogger("modelgate.store")
EVENT_LOG_LIMIT = 10_000


class InMemoryStore:
    def __init__(self, event_limit: int = EVENT_LOG_LIMIT) -> None:
        self._docs: dict[str, tuple[dict[str, Any], int]] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=event_limit)
        self._next_event_id = 1
        self._watchers: list[Callable[[str, dict[str, Any] | None, int], None]] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._watchers.clear()

    async def read(self, key: str) -> tuple[dict[str, Any], int] | None:
        found = self._docs.get(key)
        return (copy.deepcopy(found[0]), found[1]) if found else None

    async def read_all(self, prefix: str) -> dict[str, tuple[dict[str, Any], int]]:
        return {
            k: (copy.deepcopy(doc), ver) for k, (doc, ver) in self._docs.items()
            if k.startswith(prefix)
        }

    async def write(self, key: str, doc: dict[str, Any], expected_version: int) -> int:
        current = self._docs.get(key)
        current_version = current[1] if current else 0
        if current_version != expected_version:
            raise VersionConflict(
                f"{key}: expected version {expected_version}, store has {current_version}"
            )
        version = current_version + 1
        stored = copy.deepcopy(doc)
        self._docs[key] = (stored, version)
        self._notify(key, stored, version)
        return version

    async def delete(self, key: str) -> None:
        if self._docs.pop(key, None) is not None:
            self._notify(key, None, 0)

    async def append_event(self, event: dict[str, Any]) -> dict[str, Any]:
        stored = dict(event, id=self._next_event_id)
        self._next_event_id += 1
        self._events.append(stored)
        return stored

    async def events(self, limit: int = 100, route: str | None = None) -> list[dict[str, Any]]:
        selected = [e for e in self._events if route is None or e.get("route") == route]
        return copy.deepcopy(selected[-limit:]) if limit > 0 else []

    def watch(self, callback: Callable[[str, dict[str, Any] | None, int], None]) -> None:
        self._watchers.append(callback)

    def _notify(self, key: str, doc: dict[str, Any] | None, version: int) -> None:
        for callback in list(self._watchers):
            try:
                callback(key, copy.deepcopy(doc) if doc is not None else None, version)
            except Exception:  # a watcher's bug must not fail the writer
                log.exception("store watcher failed for %s", key)
