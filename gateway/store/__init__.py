"""Where routing state lives: a small versioned document store with an event log.

`InMemoryStore` is the embedded default (one process); `RedisStore` shares the same interface
across workers and replicas. Every write is compare-and-set on a version, so two operators (or
an operator and the controller) can never silently overwrite each other. A state change and
its audit event are one atomic `commit`: never a change without its event, nor an event for a
change that lost the race.

Besides documents the store keeps what a cluster of gateway processes must agree on: leases
(one controller), fenced writes (a process that lost its lease cannot write), and the member
list (heartbeats with a TTL).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from gateway.errors import ConfigError
from gateway.store.memory import InMemoryStore

Doc = dict[str, Any]
Watcher = Callable[[str, Doc | None, int], None]
ResetListener = Callable[[], Awaitable[None]]
Fence = tuple[str, str]
"""(lease name, holder): a write with a fence is refused with `LeaseLost` unless `holder`
holds that lease at the moment of the write (checked atomically with it)."""


class Store(Protocol):
    """Versioned JSON documents by key, an audit log, change notifications, leases, members.

    Errors: `VersionConflict` (lost a compare-and-set), `LeaseLost` (fenced write refused),
    `StoreUnavailable` (cannot reach the store; nothing was written, or it is unknown).
    """

    @property
    def up(self) -> bool:
        """Whether the last operation reached the store (for /healthz and a metric)."""

    @property
    def shared(self) -> bool:
        """True when other processes can share this store (workers, replicas)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self, key: str) -> tuple[Doc, int] | None:
        """The document and its version, or None if absent."""

    async def read_all(self, prefix: str) -> dict[str, tuple[Doc, int]]: ...

    async def write(self, key: str, doc: Doc, expected_version: int, *,
                    fence: Fence | None = None) -> int:
        """Write if the stored version equals `expected_version` (0 = absent); return the new
        version, or raise `VersionConflict`."""

    async def commit(self, key: str, doc: Doc, expected_version: int, event: Doc, *,
                     fence: Fence | None = None) -> tuple[int, Doc]:
        """`write` and `append_event` as one atomic step: (new version, stored event)."""

    async def delete(self, key: str, expected_version: int, *,
                     fence: Fence | None = None) -> None:
        """Delete if the stored version equals `expected_version`, else `VersionConflict`
        (deleting an absent key with expected version 0 is a no-op)."""

    async def append_event(self, event: Doc) -> Doc:
        """Append to the audit log; the store assigns an increasing integer ``id``."""

    async def events(self, limit: int = 100, route: str | None = None,
                     since: int | None = None) -> list[Doc]:
        """Oldest first. Without `since`: the newest `limit`. With it: the first `limit`
        events whose id is greater than `since` (a cursor)."""

    def watch(self, callback: Watcher) -> None:
        """Call `callback(key, doc, version)` on every change, from any writer (doc None and
        version 0 for a delete). Callbacks must ignore versions they already have."""

    def on_reset(self, callback: ResetListener) -> None:
        """Call `callback()` when the store lost its data (a Redis restarted without
        persistence: a new epoch), so each owner can seed its documents again."""

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take the lease if free, or renew it if `holder` has it; True if held now."""

    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up if `holder` has it (on shutdown: the next holder needn't wait
        for the TTL)."""

    async def lease_holder(self, name: str) -> str | None: ...

    async def heartbeat(self, member: str, info: Doc, ttl: float) -> None:
        """Announce `member` (one gateway process) as alive for `ttl` seconds."""

    async def leave(self, member: str) -> None: ...

    async def members(self) -> list[Doc]:
        """The live members' last `info`, each with ``id`` and ``heartbeat`` (unix time)."""


def open_store(url: str) -> Store:
    """The store a config's ``store:`` names: ``memory`` or ``redis://`` / ``rediss://`` /
    ``unix://`` (redis-py URL syntax; password in the URL or through ``${ENV}``)."""
    if url == "memory":
        return InMemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from gateway.store.redis import RedisStore

        return RedisStore(url)
    raise ConfigError("store", f"expected 'memory' or a redis:// URL, got {url!r}")


__all__ = ["Doc", "Fence", "InMemoryStore", "ResetListener", "Store", "Watcher", "open_store"]
