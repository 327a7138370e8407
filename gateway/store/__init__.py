"""Where routing state lives: a small versioned document store with an event log.

`InMemoryStore` is the embedded default (one process); `RedisStore` (later) shares the same
interface across workers and replicas. Every write is compare-and-set on a version, so two
operators (or an operator and the controller) can never silently overwrite each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from gateway.store.memory import InMemoryStore

Doc = dict[str, Any]
Watcher = Callable[[str, Doc | None, int], None]


class Store(Protocol):
    """Versioned JSON documents by key, an append-only event log, and change notifications."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self, key: str) -> tuple[Doc, int] | None:
        """The document and its version, or None if absent."""

    async def read_all(self, prefix: str) -> dict[str, tuple[Doc, int]]: ...

    async def write(self, key: str, doc: Doc, expected_version: int) -> int:
        """Write if the stored version equals `expected_version` (0 = absent); return the new
        version, or raise `VersionConflict`."""

    async def delete(self, key: str) -> None: ...

    async def append_event(self, event: Doc) -> Doc:
        """Append to the audit log; the store assigns ``id``. Returns the stored event."""

    async def events(self, limit: int = 100, route: str | None = None) -> list[Doc]:
        """Newest last."""

    def watch(self, callback: Watcher) -> None:
        """Call `callback(key, doc, version)` on every change, from any writer."""


def open_store(url: str) -> Store:
    if url == "memory":
        return InMemoryStore()
    from gateway.errors import ConfigError

    raise ConfigError("store", f"store {url!r} is not available yet: only 'memory' is built in")


__all__ = ["Doc", "InMemoryStore", "Store", "Watcher", "open_store"]
