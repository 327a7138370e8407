"""Shared helpers of the rollout end-to-end tests (no tests here): background traffic through
the gateway with sticky user keys, and a webhook receiver."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from aiohttp import web

from tests.helpers import INFER, RunningGateway, infer_body, wait_for

ROUTE = "classifier"
ROLLOUT = f"/admin/routes/{ROUTE}/rollout"
ROW = [[5.9, 3.0, 5.1, 1.8]]


@dataclass
class Result:
    started: float  # wall clock when the client sent it (comparable with event times)
    status: int
    version: str | None


class Traffic:
    """Client loops sending requests through the gateway until stopped.

    Each user key belongs to one loop, so a key's requests are sequential and its sequence of
    backends (`seen[key]`) is well defined. A short pause between requests keeps the load
    modest on a shared machine; it is pacing, not waiting for anything.
    """

    def __init__(self, client: httpx.AsyncClient, keys: int = 120, loops: int = 4,
                 pace: float = 0.003) -> None:
        self.client = client
        self.keys = [f"user-{i}" for i in range(keys)]
        self.loops = loops
        self.pace = pace
        self.results: list[Result] = []
        self.seen: dict[str, list[str | None]] = defaultdict(list)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._body = orjson.dumps(infer_body(ROW))

    @property
    def count(self) -> int:
        return len(self.results)

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.loops)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, index: int) -> None:
        keys = self.keys[index::self.loops]
        n = 0
        while not self._stop.is_set():
            key = keys[n % len(keys)]
            n += 1
            started = time.time()
            r = await self.client.post(INFER, content=self._body, headers={
                "x-user-id": key, "content-type": "application/json"})
            version = r.headers.get("x-model-version")
            self.results.append(Result(started, r.status_code, version))
            self.seen[key].append(version)
            await asyncio.sleep(self.pace)

    async def more(self, n: int, timeout: float = 20.0) -> None:
        """Wait until `n` more requests have been answered."""
        target = self.count + n
        await wait_for(lambda: self.count >= target, timeout=timeout,
                       message=f"{n} more requests")


async def rollout_view(gw: RunningGateway) -> dict[str, Any]:
    r = await gw.admin.get(ROLLOUT)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def wait_phase(gw: RunningGateway, *phases: str, timeout: float = 20.0
                     ) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        view = await rollout_view(gw)
        return view if view["phase"] in phases else None

    result: dict[str, Any] = await wait_for(check, timeout=timeout,
                                            message=f"rollout phase in {phases}")
    return result


async def events(gw: RunningGateway) -> list[dict[str, Any]]:
    r = await gw.admin.get("/admin/events", params={"limit": 10000})
    assert r.status_code == 200
    found: list[dict[str, Any]] = r.json()["events"]
    return found


async def set_faults(url: str, **faults: Any) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{url}/faults", json=faults)
        assert r.status_code == 200, r.text


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every JSON body; can fail or hang."""

    fail_first: int = 0
    hang: bool = False
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.json()
        if self.hang:
            await self.release.wait()
            return web.Response(status=204)
        if self.attempts <= self.fail_first:
            return web.Response(status=503)
        self.received.append(body)
        return web.Response(status=204)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # noqa: SLF001 - the port chosen for port 0
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()  # let a hanging handler finish so the server closes cleanly
        assert self.runner is not None
        await self.runner.cleanup()

    def actions(self) -> list[str]:
        return [e["action"] for e in self.received]
