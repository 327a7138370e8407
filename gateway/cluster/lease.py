"""One controller across every worker and replica: a lease in the store, renewed, fenced.

The holder runs the rollout scheduler and the alarm evaluation; the others only route and
serve the admin API. The lease has a TTL (`ttl`) and is renewed every `renew` seconds; a
process that stops renewing (dead, partitioned, Redis down) stops deciding on its own clock
before the TTL could have let another one in (`held` turns false at `ttl × SAFETY` after the
last renewal *began*), and the store refuses its writes all the same: every controller write
carries the lease as a fence, checked atomically with the write. A stopping holder releases the
lease, so the next one takes over at its next attempt instead of after the TTL.

Failover after a holder dies: at most `ttl + renew` (defaults 3 s + 1 s).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.errors import StoreError
from gateway.store import Fence, Store

log = logging.getLogger("modelgate.cluster")
CONTROLLER_LEASE = "controller"
SAFETY = 0.8  # of the TTL: stop deciding well before another process may take over

Listener = Callable[[bool], None]


class Lease:
    """This process's side of a named lease: try to take it, keep it, give it back."""

    def __init__(self, store: Store, holder: str, *, name: str = CONTROLLER_LEASE,
                 ttl: float = 3.0, renew: float = 1.0) -> None:
        if not 0 < renew < ttl * SAFETY:
            raise ValueError("renew interval must be shorter than the lease's safe span")
        self.store = store
        self.holder = holder
        self.name = name
        self.ttl = ttl
        self.renew = renew
        self.fence: Fence = (name, holder)
        self._valid_until = 0.0
        self._was_held = False
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def held(self) -> bool:
        """Whether this process may decide now (its last renewal is recent enough)."""
        return asyncio.get_running_loop().time() < self._valid_until

    def on_change(self, listener: Listener) -> None:
        """`listener(held)` when this process gains or loses the lease."""
        self._listeners.append(listener)

    async def start(self) -> None:
        await self.attempt()
        self._task = asyncio.create_task(self._keep(), name=f"modelgate-lease-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._was_held:
            self._valid_until = 0.0
            self._changed(False)
            try:
                await self.store.release_lease(self.name, self.holder)
            except StoreError as exc:
                log.warning("could not release the %s lease: %s", self.name, exc)

    async def attempt(self) -> bool:
        """Take or renew the lease once; returns whether this process holds it now."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            got = await self.store.acquire_lease(self.name, self.holder, self.ttl)
        except StoreError as exc:
            if not self._failing:
                log.warning("lease %s: store unavailable (%s); not deciding until it is back",
                            self.name, exc, extra={"event": "lease_unavailable"})
                self._failing = True
            got = False
        else:
            self._failing = False
        self._valid_until = began + self.ttl * SAFETY if got else 0.0
        self._changed(got)
        return got

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.renew)
            await self.attempt()

    def _changed(self, held: bool) -> None:
        if held == self._was_held:
            return
        self._was_held = held
        log.info("%s the %s lease", "took" if held else "lost", self.name,
                 extra={"event": "lease_taken" if held else "lease_lost",
                        "holder": self.holder})
        for listener in list(self._listeners):
            try:
                listener(held)
            except Exception:
                log.exception("lease listener failed")
