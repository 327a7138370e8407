"""Active health checks: one owned task per backend with a `health_check`, checking each of
its URLs every interval (``GET path``; healthy = a 2xx within the timeout).

The verdict goes into the backend's `Outliers` (`set_healthy`), which the proxy already
consults on every pick, so a check never touches the request path. Each gateway process
checks on its own and acts on its own view: no coordination, nothing in the store, and a
URL only one process cannot reach is still used by the others. A backend with one URL is
not checked (its one URL is never taken out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import aiohttp

from gateway.resilience.config import HealthCheck
from gateway.resilience.outlier import Outliers

log = logging.getLogger("modelgate.health")


class UrlCheck:
    """Consecutive results of one URL's checks."""

    __slots__ = ("passes", "fails")

    def __init__(self) -> None:
        self.passes = 0
        self.fails = 0

    def record(self, ok: bool, settings: HealthCheck) -> bool | None:
        """One check's result; the new verdict when a threshold is reached, else None."""
        if ok:
            self.passes += 1
            self.fails = 0
            return True if self.passes >= settings.healthy_threshold else None
        self.fails += 1
        self.passes = 0
        return False if self.fails >= settings.unhealthy_threshold else None


class BackendChecks:
    """The checks of one backend (`label` names it in logs: ``route/backend``)."""

    def __init__(self, label: str, urls: list[str], outliers: Outliers,
                 settings: HealthCheck) -> None:
        self.label = label
        self.urls = urls
        self.outliers = outliers
        self.settings = settings
        self.state = [UrlCheck() for _ in urls]
        self.rounds = 0  # completed rounds (tests wait on it)

    async def run(self, session: aiohttp.ClientSession) -> None:
        settings = self.settings
        while True:
            results = await asyncio.gather(*(self.check(session, url) for url in self.urls))
            now = time.monotonic()
            for i, ok in enumerate(results):
                verdict = self.state[i].record(ok, settings)
                if verdict is not None and self.outliers.set_healthy(i, verdict, now):
                    log.warning("%s: URL %s %s by its health checks", self.label,
                                self.urls[i], "back in" if verdict else "taken out")
            self.rounds += 1
            await asyncio.sleep(settings.interval)

    async def check(self, session: aiohttp.ClientSession, url: str) -> bool:
        try:
            async with session.get(url.rstrip("/") + self.settings.path,
                                   timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
                                   allow_redirects=False) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
        except Exception:  # a bug must not end the checks: this URL just fails its check
            log.exception("%s: health check of %s failed", self.label, url)
            return False


class HealthChecks:
    """Owns the check tasks of every backend that has a `health_check` (started and stopped
    with the gateway)."""

    def __init__(self, backends: Iterable[BackendChecks]) -> None:
        self.backends = list(backends)
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if not self.backends:
            return
        # Its own small pool: checks never compete with requests for proxy connections.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, force_close=True))
        self._tasks = [asyncio.create_task(b.run(self._session), name=f"health {b.label}")
                       for b in self.backends]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)  # not gather: our own cancellation must propagate
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def running(self) -> int:
        return sum(1 for t in self._tasks if not t.done())


__all__ = ["BackendChecks", "HealthChecks", "UrlCheck"]
