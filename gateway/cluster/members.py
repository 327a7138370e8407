"""Who is in the cluster: every gateway process announces itself with a heartbeat.

`GET /admin/cluster` and `modelgate status` list the members (id, host, pid, addresses,
version, worker index, last heartbeat) and the lease holder. A member that stops beating
drops out after `ttl` (default 5 s); a stopping one leaves at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from gateway.errors import StoreError
from gateway.store import Store

log = logging.getLogger("modelgate.cluster")


class Membership:
    def __init__(self, store: Store, member: str, info: Callable[[], dict[str, Any]], *,
                 interval: float = 1.0, ttl: float = 5.0) -> None:
        self.store = store
        self.member = member
        self.info = info
        self.interval = interval
        self.ttl = ttl
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="modelgate-heartbeat")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await self.store.leave(self.member)
        except StoreError as exc:
            log.warning("could not leave the member list: %s", exc)

    async def beat(self) -> None:
        try:
            await self.store.heartbeat(self.member, self.info(), self.ttl)
        except StoreError:
            pass  # the store's own `up` and the lease report the outage

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()
