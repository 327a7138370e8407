"""The reviewer's findings on the request-path features (match rules, resilience, client
limits), each reproduced end to end over both proxy servers: real gateway, real demo model
servers (or a small aiohttp backend that misbehaves on purpose), loopback sockets.

1. a body rule that moves a request to another backend leaves both gates' counts right;
2. a client aborting its upload never reaches outlier detection;
3. a canary's streamed (chunked) 503 falls back to live on the fast server too;
4. a concurrency slot is taken only once a buffered body is all in;
5. a POST the canary may have run (reset) is not sent again to live unless the route is
   side-effect free; a refused connection or a 503 still falls back.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiohttp import web

import gateway.proxy
from gateway.upstream import aiohttp_client, fastpool
from tests.helpers import (
    INFER,
    ModelServer,
    classifier_config,
    each_server,  # noqa: F401  (the fixture `server`: every test runs over each proxy server)
    infer_body,
    model_server,
    running_gateway,
    wait_for,
)

BODY = orjson.dumps(infer_body([[5.1, 3.5, 1.4, 0.2]]))
HEADERS = {"content-type": "application/json"}
ROUTE = "classifier"




@asynccontextmanager
async def backend(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def one_chunk() -> AsyncIterator[bytes]:
    yield BODY  # chunked upload: the Task path on the fast server too


# -- 1 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
async def test_a_body_rule_moving_the_request_keeps_the_gates_right(
        blue: ModelServer, green: ModelServer, chunked: bool) -> None:
    config = classifier_config(blue.url, green.url)
    route = config["routes"][0]
    route["backends"]["blue"]["limits"] = {"max_concurrency": 2}
    route["backends"]["green"]["limits"] = {"max_concurrency": 2}
    route["rules"] = [{"name": "gold", "body": "parameters.tier", "exact": "gold",
                       "backend": "green"}]
    body = infer_body([[5.1, 3.5, 1.4, 0.2]])
    body["parameters"] = {"tier": "gold"}
    data = orjson.dumps(body)

    async def content() -> AsyncIterator[bytes]:
        yield data

    async with running_gateway(config) as gw:
        backends = gw.gateway.static[ROUTE].backends
        for _ in range(5):
            r = await gw.client.post(INFER, content=content() if chunked else data,
                                     headers=HEADERS)
            assert r.status_code == 200, r.text
            assert r.headers["x-model-version"] == "v2"
            await wait_for(lambda: backends["blue"].gate.count == 0  # type: ignore[union-attr]
                           and backends["green"].gate.count == 0,  # type: ignore[union-attr]
                           timeout=5, message="both gates back at 0")


# -- 2 -----------------------------------------------------------------------------------------


async def test_a_client_aborting_its_upload_ejects_no_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    handed = 0  # first chunks of a streamed upload handed to the upstream
    stream_body = gateway.proxy._stream_body

    async def counting(*args: Any) -> AsyncIterator[bytes]:
        nonlocal handed
        first = True
        async for chunk in stream_body(*args):
            yield chunk
            if first:
                handed += 1
                first = False

    monkeypatch.setattr(gateway.proxy, "_stream_body", counting)
    async with model_server("v1") as b1, model_server("v1") as b2:
        config = classifier_config(b1.url, b2.url)
        config["routes"][0]["backends"]["blue"] = {"urls": [b1.url, b2.url]}
        async with running_gateway(config) as gw:
            port = gw.gateway.addresses[0][1]
            aborts = gw.gateway.proxy.recorder.client_aborts
            for i in range(8):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                        "\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
                w.write(b"4000\r\n" + b" " * 0x4000 + b"\r\n")
                await w.drain()
                await wait_for(lambda n=i + 1: handed == n, timeout=5,
                               message="the upload is on its way to a backend")
                w.transport.abort()
                await wait_for(lambda n=i + 1: aborts.get(ROUTE, 0) == n, timeout=5,
                               message="the abort recorded")
            blue = gw.gateway.static[ROUTE].backends["blue"]
            assert blue.outliers is not None
            assert [(u.consecutive_gateway, u.total_ejections) for u in blue.outliers.urls] \
                == [(0, 0), (0, 0)]
            assert (await gw.client.post(INFER, content=BODY, headers=HEADERS)
                    ).status_code == 200


# -- 3 -----------------------------------------------------------------------------------------


async def test_a_canary_chunked_503_falls_back_to_live(blue: ModelServer) -> None:
    async def chunked_503(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=503)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"error":"unavailable"}')
        await resp.write_eof()
        return resp

    async with backend(chunked_503) as green:
        config = classifier_config(blue.url, green, fallback=True,
                                   canary={"backend": "green", "weight": 100})
        async with running_gateway(config) as gw:
            codes = [(await gw.client.post(INFER, content=BODY, headers=HEADERS)).status_code
                     for _ in range(6)]
            assert codes == [200] * 6
            stats = gw.gateway.static[ROUTE].stats
            assert stats["green"].status_totals[5] == 6  # the canary is charged
            await wait_for(lambda: stats["blue"].status_totals[2] == 6, timeout=5)


# -- 4 -----------------------------------------------------------------------------------------


async def test_clients_trickling_their_bodies_hold_no_slot(
        blue: ModelServer, monkeypatch: pytest.MonkeyPatch) -> None:
    reading = 0
    read_body = gateway.proxy._read_body

    async def counting(body: Any, limit: int) -> bytes:
        nonlocal reading
        reading += 1
        return await read_body(body, limit)

    monkeypatch.setattr(gateway.proxy, "_read_body", counting)
    config = classifier_config(blue.url, blue.url)
    config["routes"][0]["limits"] = {"max_concurrency": 2}
    async with running_gateway(config) as gw:
        port = gw.gateway.addresses[0][1]
        slow = []
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:1])
            await w.drain()
            slow.append((r, w))
        await wait_for(lambda: reading == 2, timeout=5, message="both bodies being read")
        r = await gw.client.post(INFER, content=BODY, headers=HEADERS)
        assert r.status_code == 200, r.text
        for reader, writer in slow:  # the trickling ones finish and are answered too
            writer.write(BODY[1:])
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.transport.abort()


# -- 5 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("side_effect_free", [False, True])
async def test_a_post_the_canary_may_have_run_is_not_resent(
        blue: ModelServer, side_effect_free: bool) -> None:
    seen: list[bytes] = []

    async def dies(request: web.Request) -> web.StreamResponse:
        seen.append(await request.read())  # the canary ran the POST...
        assert request.transport is not None
        request.transport.abort()  # ...and died before answering
        return web.Response()

    async with backend(dies) as green:
        config = classifier_config(blue.url, green, fallback=True,
                                   side_effect_free=side_effect_free,
                                   canary={"backend": "green", "weight": 100})
        async with running_gateway(config) as gw:
            r = await gw.client.post(INFER, content=BODY, headers=HEADERS)
            stats = gw.gateway.static[ROUTE].stats
            assert len(seen) == 1
            if side_effect_free:
                assert r.status_code == 200
                await wait_for(lambda: stats["blue"].status_totals[2] == 1, timeout=5)
            else:
                assert r.status_code == 502, r.text
                assert r.json()["backend"] == "green"
                assert stats["blue"].status_totals[2] == 0


# -- 6b ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fast", "aiohttp"])
async def test_upstream_busy_after_a_fallback_names_live(
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A canary's 503 falls back onto live, whose only pooled connection is busy: the 503
    upstream_busy and its counter name live, not the canary."""
    monkeypatch.setattr(fastpool, "MAX_ACTIVE", 1)
    monkeypatch.setattr(aiohttp_client, "POOL_LIMIT", 1)
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="ok")

    async def declines(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "unavailable"}, status=503)

    async with backend(held) as live, backend(declines) as canary:
        config = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "routes": [{
            "name": "r", "match": {"path_prefix": "/"}, "live": "main", "fallback": True,
            "backends": {"main": {"url": live}, "canary": {"url": canary}},
            "canary": {"backend": "canary", "weight": 100},
            "timeouts": {"connect": "300ms", "read": "20s"}}]}
        async with running_gateway(config, upstream_kind=kind) as gw:
            first = asyncio.create_task(gw.client.get("/first"))
            try:
                await wait_for(lambda: gw.gateway.proxy.recorder.in_flight.get("r") == 1,
                               timeout=5, message="the first request on live")
                r = await gw.client.get("/second")
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "upstream_busy"
                assert r.json()["backend"] == "main", r.text
                assert "'main'" in r.json()["message"]
            finally:
                release.set()
                assert (await first).status_code == 200
            text = (await gw.admin.get("/metrics")).text
            assert 'modelgate_upstream_pool_timeouts_total{backend="main",route="r"} 1.0' \
                in text, [ln for ln in text.splitlines() if "pool_timeouts" in ln]


# -- 6a ----------------------------------------------------------------------------------------


async def test_a_client_gone_when_a_streamed_answer_begins_is_a_499(server: str) -> None:
    """The fast path hands a streamed answer to the Task; the client left before: its 499 is
    recorded and its concurrency slot and in-flight count given back."""
    if server != "fast":
        pytest.skip("the fast path's hand-over: the fast server only")
    entered = asyncio.Event()
    release = asyncio.Event()

    async def streams(request: web.Request) -> web.StreamResponse:
        if request.path == "/stream":
            entered.set()
            await release.wait()
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"token ")
        await resp.write_eof()
        return resp

    async with backend(streams) as url:
        config = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "routes": [{
            "name": "r", "match": {"path_prefix": "/"}, "live": "main",
            "backends": {"main": {"url": url}}, "limits": {"max_concurrency": 1}}]}
        async with running_gateway(config) as gw:
            proxy = gw.gateway.proxy
            connections = gw.gateway._proxy_server.connections  # type: ignore[union-attr]
            # A first request leaves an idle backend connection: the fast path needs one.
            assert (await gw.client.get("/warm")).status_code == 200
            _, w = await asyncio.open_connection("127.0.0.1", gw.gateway.addresses[0][1])
            w.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            await w.drain()
            try:
                await asyncio.wait_for(entered.wait(), 5)
                open_before = len(connections)
                # A reset, not a half-close (which the gateway answers before closing).
                w.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
                await wait_for(lambda: len(connections) == open_before - 1, timeout=5,
                               message="the client gone")
            finally:
                release.set()
            await wait_for(lambda: proxy.recorder.client_aborts.get("r") == 1, timeout=5,
                           message="the 499 recorded")
            gate = gw.gateway.static["r"].gate
            assert gate is not None and gate.count == 0
            assert proxy.in_flight == 0 and proxy.recorder.in_flight["r"] == 0
            r = await gw.client.get("/again")
            assert r.status_code == 200 and r.text == "token "
