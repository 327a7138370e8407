"""The proxy end to end: real client → gateway → real backends, all over loopback sockets.

Backends are the demo model servers (`blue`/`green`), an aiohttp echo server that reports
exactly what it received, and small raw-socket servers that misbehave on purpose (refuse,
reset, hang up, stall, cut a body short).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.helpers import (
    INFER,
    ModelServer,
    RunningGateway,
    each_server,  # noqa: F401  (the fixture `server`: every test runs over each proxy server)
    infer_body,
    refusing_port,
    running_gateway,
    wait_for,
)

MiB = 1024 * 1024
ROW = [5.1, 3.5, 1.4, 0.2]
HOP_RESPONSE_HEADERS = {
    "Connection": "X-Backend-Hop",
    "X-Backend-Hop": "must not reach the client",
    "Keep-Alive": "timeout=5, max=100",
    "Proxy-Authenticate": "Basic realm=backend",
    "Trailer": "X-Checksum",
}


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes (a shifted or truncated copy won't match)."""
    block = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(2048))
    return (block * (size // len(block) + 1))[:size]


# -- backends ------------------------------------------------------------------------------------


class Echo:
    """Answers with what it received: method, raw target, headers in order, body digest."""

    def __init__(self) -> None:
        self.first_chunk = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_route("*", "/blob/{size}", self.blob)
        app.router.add_route("*", "/status/{code}", self.status)
        app.router.add_post("/stream-upload", self.stream_upload)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def echo(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except ConnectionResetError:  # the gateway cut the upload (its client broke it off)
            return web.Response(status=499)
        report = {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                        for k, v in request.raw_headers],
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "body": body.decode("latin-1") if len(body) <= 4096 else None,
        }
        response = web.Response(body=orjson.dumps(report), content_type="application/json",
                                headers=HOP_RESPONSE_HEADERS)
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        response.headers["X-End-To-End"] = "kept"
        return response

    async def stream_upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        while chunk := await request.content.read(64 * 1024):
            if not self.first_chunk.is_set():
                self.first_chunk.set()
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"length": size, "sha256": digest.hexdigest()})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        data = pattern(size)
        if request.query.get("chunked"):
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(0, size, 256 * 1024):
                await response.write(data[i:i + 256 * 1024])
            await response.write_eof()
            return response
        return web.Response(body=data, content_type="application/octet-stream")

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"X-Status": str(code)})
        return web.Response(status=code, text=f"status {code}", headers={"X-Status": str(code)})


@pytest.fixture(params=["aiohttp", "fast"])
def kind(request: pytest.FixtureRequest) -> str:
    """Every proxy test runs over each `Upstream` implementation."""
    value: str = request.param
    return value




@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[str]:
    """A TCP server whose every connection runs `handler`; yields its URL."""
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.append(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


# -- gateway -------------------------------------------------------------------------------------


def route(name: str, prefix: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"path_prefix": prefix},
            "backends": {"main": {"url": url}}, "live": "main", **extra}


def config(*routes: dict[str, Any]) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "routes": list(routes)}


def echo_gateway(echo: Echo, kind: str, **extra: Any) -> Any:
    return running_gateway(config(route("echo", "/", echo.url, **extra)), upstream_kind=kind)


def headers_of(report: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in report["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def assert_json_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert "Traceback" not in r.text and 'File "' not in r.text
    body: dict[str, Any] = r.json()
    assert isinstance(body.get("message"), str) and body["message"]
    if code is not None:
        assert body["error"] == code, body
    assert r.headers.get("x-request-id"), "errors carry the request id too"
    assert body.get("request_id") == r.headers["x-request-id"]
    return body


# -- fidelity ------------------------------------------------------------------------------------


async def test_method_path_query_headers_body(echo: Echo, kind: str) -> None:
    target = "/models/a%2Fb/caf%C3%A9?a=1&a=2&b=x%20y%2Bz%26w&empty=&flag&e=%C3%A9#frag"
    sent_target = target.split("#")[0]
    async with echo_gateway(echo, kind) as gw:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"):
            body = bytes(range(256)) * 3 if method not in ("GET", "OPTIONS") else b""
            r = await gw.client.request(
                method, target, content=body or None,
                headers=[("X-Custom", "one"), ("X-Repeat", "1"), ("X-Repeat", "2"),
                         ("Content-Type", "application/x-thing"),
                         ("Authorization", "Bearer e2e"), ("Cookie", "uid=42; theme=dark")],
            )
            assert r.status_code == 200, r.text
            report = r.json()
            assert report["method"] == method
            assert report["target"] == sent_target
            got = headers_of(report)
            assert got["x-custom"] == ["one"]
            assert got["x-repeat"] == ["1", "2"]  # repeated headers keep their order
            assert got["content-type"] == ["application/x-thing"]
            assert got["authorization"] == ["Bearer e2e"]  # end-to-end: not ours to strip
            assert got["cookie"] == ["uid=42; theme=dark"]
            assert report["length"] == len(body), method
            assert report["sha256"] == hashlib.sha256(body).hexdigest(), method


async def test_response_status_headers_and_body_come_back(echo: Echo, kind: str) -> None:
    async with echo_gateway(echo, kind) as gw:
        r = await gw.client.get("/status/418")
        assert r.status_code == 418
        assert r.text == "status 418"
        assert r.headers["x-status"] == "418"
        r = await gw.client.post("/status/503")
        assert r.status_code == 503  # a backend's own error passes through untouched
        assert r.text == "status 503"
        r = await gw.client.get("/anything")
        assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert r.headers["x-end-to-end"] == "kept"


async def test_hop_by_hop_headers_are_stripped_both_ways(echo: Echo, kind: str) -> None:
    async with echo_gateway(echo, kind) as gw:
        r = await gw.client.get("/hop", headers=[
            ("Connection", "keep-alive, X-Client-Hop"),
            ("X-Client-Hop", "must not reach the backend"),
            ("Keep-Alive", "timeout=30"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("X-End-To-End", "yes"),
        ])
        assert r.status_code == 200
        got = headers_of(r.json())
    for name in ("x-client-hop", "keep-alive", "te", "trailer", "proxy-authorization",
                 "proxy-connection"):
        assert name not in got, f"{name} reached the backend"
    assert "keep-alive, x-client-hop" not in [v.lower() for v in got.get("connection", [])]
    assert got["x-end-to-end"] == ["yes"]
    # And on the way back: the backend's hop-by-hop headers stay between it and us.
    for name in ("x-backend-hop", "keep-alive", "proxy-authenticate", "trailer"):
        assert name not in r.headers, f"{name} reached the client"
    assert "x-backend-hop" not in r.headers.get("connection", "").lower()
    assert r.headers["x-end-to-end"] == "kept"


async def test_forwarded_headers(echo: Echo, kind: str) -> None:
    # From a trusted proxy (loopback here); an untrusted client's: tests/test_hygiene.py.
    trusting = {**config(route("echo", "/", echo.url)), "trusted_proxies": ["127.0.0.0/8"]}
    async with running_gateway(trusting, upstream_kind=kind) as gw:
        port = gw.gateway.addresses[0][1]
        got = headers_of((await gw.client.get("/fwd")).json())
        assert got["x-forwarded-for"] == ["127.0.0.1"]
        assert got["x-forwarded-proto"] == ["http"]
        assert got["x-forwarded-host"] == [f"127.0.0.1:{port}"]
        assert got["host"] == [f"127.0.0.1:{echo.port}"]  # the backend's own Host

        got = headers_of((await gw.client.get(
            "/fwd", headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.2",
                             "Host": "api.example.com"})).json())
        assert got["x-forwarded-for"] == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
        assert got["x-forwarded-host"] == ["api.example.com"]

        # Two X-Forwarded-For lines are one list (RFC 9110 §5.3): neither may be lost.
        got = headers_of((await gw.client.get("/fwd", headers=[
            ("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.2")])).json())
        assert got["x-forwarded-for"] == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]


async def test_request_id_kept_or_created_and_returned(echo: Echo, kind: str) -> None:
    async with echo_gateway(echo, kind) as gw:
        r = await gw.client.get("/id", headers={"X-Request-ID": "req-abc-123"})
        assert r.headers["x-request-id"] == "req-abc-123"
        assert headers_of(r.json())["x-request-id"] == ["req-abc-123"]

        seen = set()
        for _ in range(3):
            r = await gw.client.get("/id")
            created = r.headers["x-request-id"]
            assert len(created) >= 16
            assert headers_of(r.json())["x-request-id"] == [created]
            seen.add(created)
        assert len(seen) == 3  # a new one per request


async def test_empty_request_id_is_replaced_consistently(echo: Echo, kind: str) -> None:
    async with echo_gateway(echo, kind) as gw:
        r = await gw.client.get("/id", headers={"X-Request-ID": ""})
        created = r.headers["x-request-id"]
        assert created
        assert headers_of(r.json())["x-request-id"] == [created]  # the backend saw the same


# -- bodies --------------------------------------------------------------------------------------


async def test_large_upload_with_content_length(echo: Echo, kind: str) -> None:
    data = pattern(8 * MiB)
    async with echo_gateway(echo, kind) as gw:
        r = await gw.client.post("/upload", content=data)
        assert r.status_code == 200, r.text
        report = r.json()
    assert report["length"] == len(data)
    assert report["sha256"] == hashlib.sha256(data).hexdigest()


async def test_large_chunked_upload(echo: Echo, kind: str) -> None:
    data = pattern(8 * MiB)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100_000):  # odd-sized pieces
            yield data[i:i + 100_000]

    async with echo_gateway(echo, kind) as gw:
        r = await gw.client.post("/upload", content=chunks())
        assert r.status_code == 200, r.text
        report = r.json()
    assert report["length"] == len(data)
    assert report["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("known_length", [True, False])
async def test_upload_is_streamed_not_buffered(echo: Echo, known_length: bool, kind: str) -> None:
    """The backend gets the first part while the client still holds the rest back."""
    data = pattern(4 * MiB)
    head, rest = data[:256 * 1024], data[256 * 1024:]

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        # A proxy that buffers the whole body never forwards `head` and this times out.
        await asyncio.wait_for(echo.first_chunk.wait(), 10)
        for i in range(0, len(rest), 256 * 1024):
            yield rest[i:i + 256 * 1024]

    headers = {"Content-Length": str(len(data))} if known_length else {}
    async with echo_gateway(echo, kind) as gw:
        r = await gw.client.post("/stream-upload", content=chunks(), headers=headers)
        assert r.status_code == 200, r.text
    assert r.json() == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def raw_request(port: int, head: bytes) -> tuple[asyncio.StreamReader,
                                                     asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return reader, writer


async def test_expect_100_continue(echo: Echo, kind: str) -> None:
    """curl and many clients hold a large body back until they see 100 Continue."""
    body = pattern(200_000)
    async with echo_gateway(echo, kind, max_body_bytes="1MiB") as gw:
        port = gw.gateway.addresses[0][1]
        reader, writer = await raw_request(port, (
            b"POST /expect HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)))
        try:
            # Without the interim answer the client would stall (curl: 1 s) on every upload.
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
            writer.write(body)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            report = orjson.loads(await reader.readexactly(length))
        finally:
            writer.close()
        assert report["sha256"] == hashlib.sha256(body).hexdigest()
        assert "expect" not in headers_of(report)  # answered here, not passed on

        # Over the limit: the answer is a final 413, and the body is never asked for.
        reader, writer = await raw_request(port, (
            b"POST /expect HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (2 * MiB)))
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 413 ")
        finally:
            writer.close()


async def test_upload_over_the_limit_with_content_length_is_413(echo: Echo, kind: str) -> None:
    async with echo_gateway(echo, kind, max_body_bytes="1MiB") as gw:
        r = await gw.client.post("/upload", content=pattern(MiB + 1))
        body = assert_json_error(r, 413, "body_too_large")
        assert "1048576" in body["message"]
        # Exactly at the limit is fine, and the connection still serves requests.
        r = await gw.client.post("/upload", content=pattern(MiB))
        assert r.status_code == 200 and r.json()["length"] == MiB


async def test_upload_over_the_limit_chunked_is_413(echo: Echo, kind: str) -> None:
    data = pattern(3 * MiB)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    async with echo_gateway(echo, kind, max_body_bytes="1MiB") as gw:
        r = await gw.client.post("/upload", content=chunks())
        assert_json_error(r, 413, "body_too_large")
        r = await gw.client.get("/after")
        assert r.status_code == 200


async def test_small_chunked_upload_over_the_limit_is_413(echo: Echo, kind: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 300

    async with echo_gateway(echo, kind, max_body_bytes=1000) as gw:
        r = await gw.client.post("/upload", content=chunks())
        assert_json_error(r, 413, "body_too_large")


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_response_intact(echo: Echo, chunked: bool, kind: str) -> None:
    size = 5 * MiB
    async with echo_gateway(echo, kind) as gw:
        r = await gw.client.get(f"/blob/{size}", params={"chunked": "1"} if chunked else None)
        assert r.status_code == 200
        assert len(r.content) == size
        assert r.content == pattern(size)
        if not chunked:
            assert r.headers["content-length"] == str(size)


async def test_sse_stream_arrives_chunk_by_chunk(blue: ModelServer, kind: str) -> None:
    words = "one two three four five"
    cfg = config(route("chat", "/v1/chat/completions", blue.url))
    async with running_gateway(cfg, upstream_kind=kind) as gw:
        arrivals: list[tuple[float, dict[str, Any] | str]] = []
        buffer = b""
        async with gw.client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": words}], "stream": True,
            "stream_delay_ms": 100,
        }) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for raw in r.aiter_raw():
                now = time.monotonic()
                buffer += raw
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    assert event.startswith(b"data: ")
                    payload = event[6:]
                    arrivals.append((now, "[DONE]" if payload == b"[DONE]"
                                     else orjson.loads(payload)))
    assert buffer == b""
    assert arrivals[-1][1] == "[DONE]"
    chunks = [e for _, e in arrivals if isinstance(e, dict)]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if c["choices"])  # the closing event has only `usage`
    assert text == "You said: " + words
    assert all(c["model_version"] == "v1" for c in chunks)
    # 7 tokens 100 ms apart: the first must be in the client's hands long before the last.
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first >= 0.2, f"first event only {last - first:.3f}s before the end"
    # ... and they arrived spread out, not in one burst at the end.
    distinct = {round(t, 2) for t, _ in arrivals}
    assert len(distinct) >= 4


async def test_client_leaving_a_stream_frees_the_request(blue: ModelServer, kind: str) -> None:
    cfg = config(route("chat", "/v1/chat/completions", blue.url))
    async with running_gateway(cfg, upstream_kind=kind) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "a b c d e f g h i j"}],
                "stream": True, "stream_delay_ms": 300,
            }) as r:
                async for _ in r.aiter_raw():
                    break  # first event in hand: hang up
        await wait_for(lambda: gw.gateway.proxy.in_flight == 0, timeout=10,
                       message="the abandoned stream to be cleaned up")
        r = await gw.client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "again"}], "stream_delay_ms": 0})
        assert r.status_code == 200


# -- errors --------------------------------------------------------------------------------------


async def test_unknown_route_is_404_json(echo: Echo, kind: str) -> None:
    cfg = config(route("echo", "/echo", echo.url))
    async with running_gateway(cfg, upstream_kind=kind) as gw:
        body = assert_json_error(await gw.client.get("/nothing/here"), 404, "no_route")
        assert "/nothing/here" in body["message"]
        assert_json_error(await gw.client.post("/echoes", content=b"x"), 404, "no_route")


async def test_dot_segments_are_refused(echo: Echo, kind: str) -> None:
    """Routing on "/public" while the backend resolves "/public/../internal" to "/internal"
    would expose paths no route allows: such targets are refused, not forwarded."""
    cfg = config(route("public", "/public", echo.url))
    async with running_gateway(cfg, upstream_kind=kind) as gw:
        port = gw.gateway.addresses[0][1]
        for target in (b"/public/../internal", b"/public/%2e%2e/internal", b"/public/./x",
                       b"/public/x/.."):
            reader, writer = await raw_request(
                port, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            try:
                answer = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), (target, head)
            assert orjson.loads(body)["error"] == "bad_path"
        # Dots inside a segment are ordinary names.
        for path in ("/public/.well-known/x", "/public/a..b", "/public/v1.2/..x"):
            r = await gw.client.get(path)
            assert r.status_code == 200 and r.json()["target"] == path


async def test_backend_refused_is_502_json(kind: str) -> None:
    async with refusing_port() as url, \
            running_gateway(config(route("r", "/", url)), upstream_kind=kind) as gw:
        body = assert_json_error(await gw.client.post("/x", content=b"hi"), 502,
                                 "upstream_unavailable")
        assert body["route"] == "r" and body["backend"] == "main"
        assert_json_error(await gw.client.get("/x"), 502)


async def reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                              ) -> None:
    await read_head(reader)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()  # RST


async def hang_up_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                                ) -> None:
    await read_head(reader)
    writer.close()  # FIN, no answer


async def cut_body_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"
                 b"only a part")
    await writer.drain()
    writer.close()


async def garbage_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"this is not HTTP at all\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("handler", [reset_after_request, hang_up_after_request,
                                     cut_body_short, garbage_answer],
                         ids=["reset", "hang-up", "short-body", "garbage"])
async def test_backend_failing_without_an_answer_is_502_json(handler: RawHandler, kind: str
                                                             ) -> None:
    async with raw_server(handler) as url, \
            running_gateway(config(route("r", "/", url)), upstream_kind=kind) as gw:
        for _ in range(2):
            assert_json_error(await gw.client.post("/x", content=b"{}"), 502)
            assert_json_error(await gw.client.get("/x"), 502)


async def test_stream_broken_mid_body_cuts_the_client_connection(kind: str) -> None:
    """Headers are out: the client must see a broken response, never a clean short one."""
    async def stream_then_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                              ) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"".join(b"%x\r\n%s\r\n" % (1000, b"x" * 1000) for _ in range(3)))
        await writer.drain()
        writer.transport.abort()

    async with raw_server(stream_then_die) as url, \
            running_gateway(config(route("r", "/", url)), upstream_kind=kind) as gw:
        with pytest.raises(httpx.HTTPError):
            r = await gw.client.get("/x")
            r.raise_for_status()
            pytest.fail(f"got a complete response of {len(r.content)} bytes")


async def test_backend_slower_than_read_timeout_is_504_json(kind: str) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.read()  # until the gateway gives up and closes

    cfg = config(route("slow", "/", "http://unused", timeouts={"read": "300ms"}))
    async with raw_server(never_answer) as url:
        cfg["routes"][0]["backends"]["main"]["url"] = url
        async with running_gateway(cfg, upstream_kind=kind) as gw:
            started = time.monotonic()
            body = assert_json_error(await gw.client.post("/x", content=b"{}"), 504,
                                     "upstream_timeout")
            assert time.monotonic() - started < 10
            assert body["backend"] == "main"


async def test_slow_model_server_is_504_and_fast_one_is_fine(blue: ModelServer, kind: str) -> None:
    cfg = config(route("classifier", "/v2/models/classifier", blue.url,
                       timeouts={"read": "200ms"}))
    async with running_gateway(cfg, upstream_kind=kind) as gw, httpx.AsyncClient() as direct:
        r = await gw.client.post(INFER, json=infer_body([ROW]))
        assert r.status_code == 200
        await direct.post(f"{blue.url}/faults", json={"latency_ms": 600})
        assert_json_error(await gw.client.post(INFER, json=infer_body([ROW])), 504)
        await direct.post(f"{blue.url}/faults", json={"latency_ms": 0})
        r = await gw.client.post(INFER, json=infer_body([ROW]))
        assert r.status_code == 200


async def test_head_and_204_pass_through(echo: Echo, kind: str) -> None:
    async with echo_gateway(echo, kind) as gw:
        get = await gw.client.get("/blob/1000")
        head = await gw.client.head("/blob/1000")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"] == "1000"
        assert head.headers["x-request-id"]
        r = await gw.client.delete("/status/204")
        assert r.status_code == 204
        assert r.content == b""
        assert r.headers["x-status"] == "204"
        # The connection is still in a good state afterwards.
        r = await gw.client.post("/after", content=b"abc")
        assert r.status_code == 200 and r.json()["body"] == "abc"


async def test_keep_alive_client_many_sequential_requests(echo: Echo, kind: str) -> None:
    """One client connection, many requests of mixed shapes: framing never desyncs."""
    async with echo_gateway(echo, kind, max_body_bytes="1MiB") as gw:
        async with httpx.AsyncClient(
            base_url=gw.url, limits=httpx.Limits(max_connections=1), timeout=30,
        ) as client:
            for i in range(100):
                shape = i % 5
                if shape == 0:
                    r = await client.get(f"/seq/{i}?i={i}")
                    assert r.json()["target"] == f"/seq/{i}?i={i}"
                elif shape == 1:
                    body = pattern(i * 97)
                    r = await client.post(f"/seq/{i}", content=body)
                    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
                elif shape == 2:
                    r = await client.get(f"/blob/{200_000 + i}")
                    assert r.content == pattern(200_000 + i)
                elif shape == 3:
                    r = await client.head(f"/blob/{i}")
                    assert r.status_code == 200 and r.content == b""
                else:
                    r = await client.get("/status/204")
                    assert r.status_code == 204
                assert r.status_code in (200, 204)


async def test_model_server_through_the_gateway(blue: ModelServer, kind: str) -> None:
    cfg = config(route("classifier", "/v2/models/classifier", blue.url))
    async with running_gateway(cfg, upstream_kind=kind) as gw:
        r = await gw.client.post(INFER, json=infer_body([ROW, [6.7, 3.0, 5.2, 2.3]]))
        assert r.status_code == 200
        assert r.json()["model_version"] == "v1"
        assert r.headers["x-model-version"] == "v1"
        r = await gw.client.get("/v2/models/classifier")
        assert r.status_code == 200 and r.json()["name"] == "classifier"
        r = await gw.client.post("/v2/models/classifier/infer", content=b"not json")
        assert r.status_code == 400  # the backend's 400, passed through


async def test_no_response_ever_contains_a_traceback(echo: Echo, kind: str) -> None:
    """Throw odd requests at it: whatever comes back is a clean response."""
    async with refusing_port() as dead:
        cfg = config(route("echo", "/echo", echo.url, max_body_bytes=100),
                     route("dead", "/dead", dead))
        async with running_gateway(cfg, upstream_kind=kind) as gw:
            responses = [
                await gw.client.get("/"),
                await gw.client.post("/echo", content=b"x" * 101),
                await gw.client.get("/dead/x"),
                await gw.client.request("BREW", "/echo/pot"),
                await gw.client.get("/echo/%ZZ"),
                await gw.client.get("/echo", headers={"Cookie": 'bad="'}),
            ]
    for r in responses:
        assert "Traceback" not in r.text and 'File "' not in r.text, r.text


# -- routing through the gateway -----------------------------------------------------------------


def classifier_routes(blue: ModelServer, green: ModelServer) -> dict[str, Any]:
    backends = {"blue": {"url": blue.url}, "green": {"url": green.url}}
    return config(
        {"name": "classifier", "match": {"path_prefix": "/v2/models/classifier"},
         "backends": backends, "live": "blue", "sticky": {"header": "x-user-id"},
         "override_header": "X-Modelgate-Backend", "canary": {"backend": "green", "weight": 50}},
        {"name": "locked", "match": {"path_prefix": "/v2/models/classifier",
                                     "host": "locked.example.com"},
         "backends": backends, "live": "blue"},
    )


async def version_of(gw: RunningGateway, **headers: str) -> str:
    r = await gw.client.post(INFER, json=infer_body([ROW]), headers=headers)
    assert r.status_code == 200, r.text
    version: str = r.json()["model_version"]
    return version


async def test_sticky_users_keep_their_backend(blue: ModelServer, green: ModelServer,
                                               kind: str) -> None:
    async with running_gateway(classifier_routes(blue, green), upstream_kind=kind) as gw:
        seen: dict[str, str] = {}
        for i in range(40):
            seen[f"u{i}"] = await version_of(gw, **{"x-user-id": f"u{i}"})
        for user, version in list(seen.items())[:20]:
            assert await version_of(gw, **{"x-user-id": user}) == version
        assert set(seen.values()) == {"v1", "v2"}  # 50%: both sides have users


async def test_override_header_only_where_enabled(blue: ModelServer, green: ModelServer,
                                                  kind: str) -> None:
    async with running_gateway(classifier_routes(blue, green), upstream_kind=kind) as gw:
        # Every user forced to green, then to blue, whatever their bucket.
        for i in range(10):
            assert await version_of(gw, **{"x-user-id": f"u{i}",
                                           "x-modelgate-backend": "green"}) == "v2"
            assert await version_of(gw, **{"x-user-id": f"u{i}",
                                           "x-modelgate-backend": "blue"}) == "v1"
        # Route "locked" (matched by host) has no override header: the header does nothing.
        for _ in range(5):
            assert await version_of(gw, host="locked.example.com",
                                    **{"x-modelgate-backend": "green"}) == "v1"


# -- hostile or broken input: the right status, counted against the right party ------------------


def backend_totals(gw: Any, route_name: str, backend: str) -> tuple[list[int], dict[str, int]]:
    stats = gw.gateway.static[route_name].stats[backend]
    return list(stats.status_totals), dict(stats.error_totals)


async def test_header_bytes_reach_the_backend_unchanged(echo: Echo, kind: str) -> None:
    """UTF-8 and even invalid UTF-8 header bytes pass through as sent; no 500."""
    async with echo_gateway(echo, kind) as gw:
        port = gw.gateway.addresses[0][1]
        head = (b"GET /bytes HTTP/1.1\r\nHost: x\r\nX-Val: caf\xc3\xa9\r\n"
                b"X-Raw: \xff\xfe\r\nConnection: close\r\n\r\n")
        reader, writer = await raw_request(port, head)
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
        status_line = response.split(b"\r\n", 1)[0]
        if kind == "fast":
            assert status_line == b"HTTP/1.1 200 OK", response[:300]
            report = orjson.loads(response.split(b"\r\n\r\n", 1)[1])
            got = headers_of(report)  # the echo reports raw bytes as latin-1 text
            assert got["x-val"][0].encode("latin-1") == b"caf\xc3\xa9"
            assert got["x-raw"][0].encode("latin-1") == b"\xff\xfe"
        else:
            # aiohttp's client cannot write bytes that are not UTF-8: the client's fault.
            assert status_line.startswith((b"HTTP/1.1 200", b"HTTP/1.1 400")), response[:300]
        assert b"Traceback" not in response
        # Whatever happened, the backend is not blamed with a 5xx.
        totals, errors = backend_totals(gw, "echo", "main")
        assert totals[5] == 0 and not any(errors.values())


async def test_response_header_text_is_not_garbled(kind: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with raw_server(answer) as url, \
            running_gateway(config(route("r", "/", url)), upstream_kind=kind) as gw:
        r = await gw.client.get("/x")
        assert r.status_code == 200
        assert r.headers.raw[[k.lower() for k, _ in r.headers.raw].index(b"x-name")][1] == \
            b"caf\xc3\xa9"


async def test_unusable_request_id_is_replaced(echo: Echo, kind: str) -> None:
    async with echo_gateway(echo, kind) as gw:
        port = gw.gateway.addresses[0][1]
        for bad in (b"\xff\xfe", b"x" * 500):
            head = (b"GET /nope/../x HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + bad
                    + b"\r\nConnection: close\r\n\r\n")
            reader, writer = await raw_request(port, head)
            response = await reader.read()
            writer.close()
            await writer.wait_closed()
            head_part, body = response.split(b"\r\n\r\n", 1)
            assert head_part.startswith(b"HTTP/1.1 400"), response[:200]
            error = orjson.loads(body)
            assert error["error"] == "bad_path"
            assert error["request_id"] and error["request_id"].encode() != bad


async def test_body_broken_mid_read_counts_as_a_backend_error(kind: str) -> None:
    """A short body is a 502 to the client, and gates and alarms must see it as one."""
    async with raw_server(cut_body_short) as url, \
            running_gateway(config(route("r", "/", url)), upstream_kind=kind) as gw:
        assert_json_error(await gw.client.get("/x"), 502)
        totals, errors = backend_totals(gw, "r", "main")
        assert totals[2] == 0 and totals[5] == 1
        assert errors["reset"] == 1
        assert gw.gateway.static["r"].stats["main"].window(60).errors == 1


async def test_stream_broken_mid_body_counts_as_a_backend_error(kind: str) -> None:
    async def stream_then_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                              ) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    async with raw_server(stream_then_die) as url, \
            running_gateway(config(route("r", "/", url)), upstream_kind=kind) as gw:
        with pytest.raises(httpx.HTTPError):
            (await gw.client.get("/x")).raise_for_status()
        stats = gw.gateway.static["r"].stats["main"]
        await wait_for(lambda: stats.status_totals[5] == 1, message="the 5xx to be counted")
        assert stats.status_totals[2] == 0
