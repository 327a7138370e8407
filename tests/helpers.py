"""Shared test helpers: real servers on loopback port 0, and waiting on conditions."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.app import ComponentFactory, Gateway
from gateway.config import parse_config
from gateway.demo.model_server import start_model_server
from gateway.upstream import UpstreamFactory

TOKEN = "test-admin-token"
INFER = "/v2/models/classifier/infer"


def infer_body(rows: list[list[float]]) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [len(rows), 4], "datatype": "FP32",
                        "data": rows}]}


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, interval: float = 0.01,
    message: str = "condition",
) -> Any:
    """Poll until `predicate()` is truthy; fail the test with `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A port free right now, for a server started in another process (which must bind it
    itself). For a port that must refuse connections, use `refusing_port`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def refusing_port() -> AsyncIterator[str]:
    """A URL whose port is bound but not listening: connecting is refused, every time.

    Not a port bound and closed again: the kernel may hand it out as the source port of a
    new connection, and a connection to it then succeeds (to itself) and hangs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@dataclass
class ModelServer:
    version: str
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def model_server(version: str, **faults: Any) -> AsyncIterator[ModelServer]:
    runner, port = await start_model_server(version, **faults)
    try:
        yield ModelServer(version, port, runner)
    finally:
        await runner.cleanup()


def classifier_config(blue: str, green: str, **route: Any) -> dict[str, Any]:
    """The demo's route shape, on ephemeral ports."""
    top = {k: route.pop(k) for k in list(route) if k in ("alarms", "webhooks", "store",
                                                        "access_log_sample", "drain_timeout")}
    base: dict[str, Any] = {
        "name": "classifier",
        "match": {"path_prefix": "/v2/models/classifier"},
        "backends": {"blue": {"url": blue}, "green": {"url": green}},
        "live": "blue",
        "sticky": {"header": "x-user-id"},
    }
    base.update(route)
    return {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "routes": [base], **top}


@dataclass
class RunningGateway:
    gateway: Gateway
    client: httpx.AsyncClient
    admin: httpx.AsyncClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.addresses[0][1]}"

    @property
    def admin_url(self) -> str:
        assert self.gateway.admin_address is not None
        return f"http://127.0.0.1:{self.gateway.admin_address[1]}"


# The proxy port's server for gateways started here; a suite runs over both by overriding
# it (the `server` fixture below).
DEFAULT_SERVER: str | None = None
SERVERS = ["fast-server", "aiohttp-server"]


def _server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The proxy server (`fast` or `aiohttp`) of the gateways this test starts."""
    value: str = request.param.removesuffix("-server")
    monkeypatch.setattr(sys.modules[__name__], "DEFAULT_SERVER", value)
    return value


# Imported by a test module (under these names), the fixture `server`: `each_server` runs
# every test of the module over both proxy servers, `server_fixture` only those asking.
each_server = pytest.fixture(params=SERVERS, autouse=True, name="server")(_server)
server_fixture = pytest.fixture(params=SERVERS, name="server")(_server)


@asynccontextmanager
async def running_gateway(
    config: dict[str, Any], *, upstream_kind: str | UpstreamFactory = "fast",
    components: list[ComponentFactory] | None = None, **kwargs: Any,
) -> AsyncIterator[RunningGateway]:
    kwargs.setdefault("server_kind", DEFAULT_SERVER)
    gateway = Gateway(parse_config(config), admin_token={"admin": TOKEN},
                      upstream_kind=upstream_kind, components=components, **kwargs)
    await gateway.start()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.addresses[0][1]}",
                               timeout=30, limits=limits)
    assert gateway.admin_address is not None
    admin = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.admin_address[1]}",
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    try:
        yield RunningGateway(gateway, client, admin)
    finally:
        await client.aclose()
        await admin.aclose()
        await gateway.stop(drain_timeout=2)
