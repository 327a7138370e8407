"""The contract every `Upstream` implementation must meet, run against each of them.

Real sockets on 127.0.0.1 port 0: small aiohttp servers for well-behaved backends, raw asyncio
servers for misbehaving ones (closing early, stalling, never answering). Coordination is by
events and queues, never by sleeping; the few timeout tests use a 0.3 s read timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
from aiohttp import web

from gateway.config import Timeouts
from gateway.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamResetError,
    UpstreamTimeout,
)
from gateway.upstream import Body, Headers, Upstream, UpstreamResponse, make_upstream
from tests.helpers import refusing_port

pytestmark = pytest.mark.timeout(30)

T = Timeouts(connect=2.0, read=5.0)
SHORT = Timeouts(connect=2.0, read=0.3)
BIG = os.urandom(5 * 1024 * 1024)
ALL_BYTES = bytes(range(256)) * 4

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MakeUpstream = Callable[[str], Upstream]


# Servers


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    """An aiohttp server answering every method and path with `handler`; yields its origin."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


class RawServer:
    """A bare asyncio server running `handler` per connection, for misbehaving backends."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.connections = 0
        self.origin = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.origin = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        for task in self._tasks:
            task.cancel()
        await self._server.wait_closed()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
            self._writers.discard(writer)
            self._tasks.discard(task)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


# Fixtures


@pytest.fixture(params=["aiohttp", "fast"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make(kind: str) -> AsyncIterator[MakeUpstream]:
    """Factory: an Upstream of the parametrized kind for an origin, closed at teardown."""
    made: list[Upstream] = []

    def _make(origin: str) -> Upstream:
        upstream = make_upstream(origin, kind)
        made.append(upstream)
        return upstream

    yield _make
    for upstream in made:
        await upstream.close()


TextHeaders = list[tuple[str, str]]


def encoded(headers: TextHeaders) -> Headers:
    """Headers as the interface takes them: bytes, as read off the client's socket."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


async def fetch(
    upstream: Upstream,
    method: str = "GET",
    target: str = "/",
    headers: TextHeaders | None = None,
    body: Body = None,
    timeouts: Timeouts = T,
    length: int | None = None,
) -> tuple[UpstreamResponse, bytes]:
    resp = await upstream.send(method, target, encoded(headers or []), body, timeouts, length)
    return resp, await resp.read()


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    info = {
        "method": request.method,
        "target": request.raw_path,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body": body.hex(),
    }
    return web.json_response(info, headers={"X-Reply": "1", "x-reply-lower": "2"})


def header_values(headers: list[list[str]] | Headers, name: str) -> list[str]:
    return [text(v) for k, v in headers if text(k).lower() == name.lower()]


# Fidelity


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_target_headers_and_body_pass_through(
    make: MakeUpstream, method: str
) -> None:
    target = "/a%2Fb/%7Euser/x%20y?q=1&q=2&enc=%2F%26%3D&empty=&flag"
    sent: TextHeaders = [
        ("X-Dup", "one"),
        ("X-MiXeD-Case", "Value With  Spaces"),
        ("X-Dup", "two"),
        ("Content-Type", "application/x-test"),
        ("Authorization", "Bearer abc"),
    ]
    body = ALL_BYTES if method in ("POST", "PUT", "PATCH") else None
    async with serve(echo) as origin:
        resp, raw = await fetch(make(origin), method, target, sent, body)
    assert resp.status == 200
    info = json.loads(raw)
    assert info["method"] == method
    assert info["target"] == target
    got = info["headers"]
    # The given headers arrive in order, names spelled as given, repeats kept.
    ours = [(k, v) for k, v in got if k.lower() in {n.lower() for n, _ in sent}]
    assert ours == sent
    assert header_values(got, "host") == [origin.removeprefix("http://")]
    assert bytes.fromhex(info["body"]) == (body or b"")
    if body is not None:
        assert header_values(got, "content-length") == [str(len(body))]
    # Nothing the caller did not send, beyond Host and framing.
    extra = {k.lower() for k, _ in got} - {n.lower() for n, _ in sent}
    assert extra <= {"host", "content-length"}
    # Response headers: in order, names as sent by the server.
    names = [text(k) for k, _ in resp.headers]
    assert names.index("X-Reply") < names.index("x-reply-lower")
    assert resp.content_length == len(raw)
    assert resp.reason == "OK"


async def test_repeated_header_names_differing_in_case(
    make: MakeUpstream, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "aiohttp":
        # ClientSession._prepare_headers dedupes names case-sensitively, then sets them
        # case-insensitively: the first value is lost. Rare in practice (clients spell a
        # repeated header the same way), so documented here rather than worked around.
        request.applymarker(pytest.mark.xfail(strict=True, reason="aiohttp drops a value"))
    sent: TextHeaders = [("X-Dup", "one"), ("x-dup", "two"), ("X-DUP", "three")]
    async with serve(echo) as origin:
        _, raw = await fetch(make(origin), headers=sent)
    got = json.loads(raw)["headers"]
    assert [(k, v) for k, v in got if k.lower() == "x-dup"] == sent


async def test_given_host_header_is_used_once(make: MakeUpstream) -> None:
    async with serve(echo) as origin:
        _, raw = await fetch(make(origin), headers=[("Host", "model.example:8443")])
    assert header_values(json.loads(raw)["headers"], "host") == ["model.example:8443"]


async def test_framing_headers_from_the_caller_are_replaced(make: MakeUpstream) -> None:
    async with serve(echo) as origin:
        _, raw = await fetch(
            make(origin), "POST", "/", [("Content-Length", "999"), ("X-A", "b")], b"hello"
        )
    info = json.loads(raw)
    assert bytes.fromhex(info["body"]) == b"hello"
    assert header_values(info["headers"], "content-length") == ["5"]
    assert header_values(info["headers"], "transfer-encoding") == []


async def test_response_status_reason_and_repeated_headers(make: MakeUpstream) -> None:
    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(status=418, reason="I Am A Teapot", body=b"short and stout")
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        return resp

    async with serve(handler) as origin:
        resp, raw = await fetch(make(origin))
    assert (resp.status, resp.reason, raw) == (418, "I Am A Teapot", b"short and stout")
    assert header_values(resp.headers, "set-cookie") == ["a=1", "b=2"]


# Large and streamed bodies


# aiohttp warns about sending big bytes bodies from memory; the gateway buffers only small ones.
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_large_bodies_both_directions(make: MakeUpstream) -> None:
    async def handler(request: web.Request) -> web.Response:
        data = await request.read()
        return web.Response(body=BIG, headers={"X-Sha": hashlib.sha256(data).hexdigest(),
                                               "X-Len": str(len(data))})

    async with serve(handler) as origin:
        upstream = make(origin)
        resp, raw = await fetch(upstream, "POST", "/up", body=BIG)
        assert resp.headers and header_values(resp.headers, "x-len") == [str(len(BIG))]
        assert header_values(resp.headers, "x-sha") == [hashlib.sha256(BIG).hexdigest()]
        assert resp.content_length == len(BIG)
        assert raw == BIG
        # The same body again, consumed as chunks by a consumer slower than the socket.
        resp = await upstream.send("GET", "/down", [], None, T)
        parts = []
        async for chunk in resp.iter_chunks():
            parts.append(chunk)
            await asyncio.sleep(0)
        assert b"".join(parts) == BIG


async def test_streamed_request_body(make: MakeUpstream) -> None:
    pieces = [b"first,", b"", b"second,", os.urandom(300_000), b"last"]

    async def gen() -> AsyncIterator[bytes]:
        for piece in pieces:
            await asyncio.sleep(0)
            yield piece

    async with serve(echo) as origin:
        upstream = make(origin)
        resp, raw = await fetch(upstream, "POST", "/stream", [("X-Kind", "stream")], gen())
        info = json.loads(raw)
        assert bytes.fromhex(info["body"]) == b"".join(pieces)
        assert header_values(info["headers"], "transfer-encoding") == ["chunked"]
        # The connection is still usable afterwards.
        _, raw = await fetch(upstream, "POST", "/after", body=b"x")
        assert bytes.fromhex(json.loads(raw)["body"]) == b"x"


async def test_streamed_request_body_of_known_length_keeps_content_length(
    make: MakeUpstream,
) -> None:
    """Some model servers refuse chunked uploads: a body whose length is known goes out with
    that Content-Length even when it is streamed."""
    pieces = [b"first,", b"", b"second,", os.urandom(300_000), b"last"]
    size = sum(map(len, pieces))

    async def gen() -> AsyncIterator[bytes]:
        for piece in pieces:
            await asyncio.sleep(0)
            yield piece

    async with serve(echo) as origin:
        upstream = make(origin)
        _, raw = await fetch(upstream, "POST", "/stream", [], gen(), length=size)
        info = json.loads(raw)
        assert bytes.fromhex(info["body"]) == b"".join(pieces)
        assert header_values(info["headers"], "content-length") == [str(size)]
        assert header_values(info["headers"], "transfer-encoding") == []
        _, raw = await fetch(upstream, "POST", "/after", body=b"x")
        assert bytes.fromhex(json.loads(raw)["body"]) == b"x"


async def test_big_streamed_request_body(make: MakeUpstream) -> None:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(BIG), 256 * 1024):
            yield BIG[i:i + 256 * 1024]

    async def handler(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        return web.Response(text=digest.hexdigest())

    async with serve(handler) as origin:
        _, raw = await fetch(make(origin), "PUT", "/", body=gen())
    assert raw.decode() == hashlib.sha256(BIG).hexdigest()


async def test_chunked_response_is_delivered_incrementally(make: MakeUpstream) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first chunk")
        await release.wait()  # the last chunk only after the client has seen the first
        await resp.write(b"last chunk")
        await resp.write_eof()
        return resp

    async with serve(handler) as origin:
        resp = await make(origin).send("GET", "/", [], None, T)
        assert resp.status == 200
        assert resp.content_length is None
        chunks = resp.iter_chunks()
        first = await asyncio.wait_for(anext(chunks), 5)
        assert first == b"first chunk"
        release.set()
        rest = [chunk async for chunk in chunks]
        assert b"".join(rest) == b"last chunk"


async def test_server_sent_events(make: MakeUpstream) -> None:
    go: asyncio.Queue[None] = asyncio.Queue()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await go.get()
            await resp.write(f"event: token\ndata: {i}\n\n".encode())
        await resp.write_eof()
        return resp

    async with serve(handler) as origin:
        resp = await make(origin).send("GET", "/events", [(b"Accept", b"text/event-stream")],
                                       None, T)
        assert header_values(resp.headers, "content-type") == ["text/event-stream"]
        chunks = resp.iter_chunks()
        seen = b""
        for i in range(3):
            go.put_nowait(None)
            event = f"data: {i}\n\n".encode()
            while event not in seen:
                seen += await asyncio.wait_for(anext(chunks), 5)
        assert [chunk async for chunk in chunks] in ([], [b""])
        assert seen.count(b"event: token") == 3


# Connections


async def test_keep_alive_reuses_connections(make: MakeUpstream) -> None:
    peers: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text=request.path)

    async with serve(handler) as origin:
        upstream = make(origin)
        for i in range(10):
            _, raw = await fetch(upstream, target=f"/r{i}")
            assert raw == f"/r{i}".encode()
        resp = await upstream.send("GET", "/chunks", [], None, T)
        assert b"".join([c async for c in resp.iter_chunks()]) == b"/chunks"
        _, raw = await fetch(upstream, "POST", "/post", body=b"x" * 1000)
    assert len(peers) == 12
    assert len(set(peers)) == 1


async def test_many_concurrent_requests(make: MakeUpstream) -> None:
    async with serve(echo) as origin:
        upstream = make(origin)

        async def one(i: int) -> None:
            _, raw = await fetch(upstream, "POST", f"/item/{i}?n={i}", [("X-N", str(i))],
                                 f"body {i}".encode())
            info = json.loads(raw)
            assert info["target"] == f"/item/{i}?n={i}"
            assert header_values(info["headers"], "x-n") == [str(i)]
            assert bytes.fromhex(info["body"]) == f"body {i}".encode()

        await asyncio.gather(*(one(i) for i in range(200)))
        await asyncio.gather(*(one(i) for i in range(200, 400)))  # on pooled connections


async def test_connection_refused(make: MakeUpstream) -> None:
    async with refusing_port() as url:
        with pytest.raises(UpstreamConnectError):
            await make(url).send("GET", "/", [], None, T)


async def test_server_closes_without_answering(make: MakeUpstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)

    async with RawServer(handler) as server:
        with pytest.raises(UpstreamResetError):
            await make(server.origin).send("GET", "/", [], None, T)


async def test_garbage_response_is_a_reset(make: MakeUpstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await reader.read()

    async with RawServer(handler) as server:
        with pytest.raises(UpstreamResetError):
            await make(server.origin).send("GET", "/", [], None, T)


async def test_stale_keep_alive_connection_is_retried(make: MakeUpstream) -> None:
    """The server drops a kept-alive connection just as the next request goes out."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await read_head(reader)  # the second request on this connection: hang up on it

    async with RawServer(handler) as server:
        upstream = make(server.origin)
        assert (await fetch(upstream))[1] == b"first"
        assert (await fetch(upstream))[1] == b"first"
    assert server.connections == 2


async def test_server_that_never_answers_times_out(make: MakeUpstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.read()  # until the client gives up

    async with RawServer(handler) as server:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await make(server.origin).send("GET", "/", [], None, SHORT)
        assert time.monotonic() - started < 3.0


async def test_server_not_reading_a_streamed_body_times_out(
    make: MakeUpstream, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "aiohttp":
        # aiohttp's sock_read timeout does not run while the request body is blocked on a
        # full socket buffer: it waits until the server gives up (here after 2 s).
        request.applymarker(pytest.mark.xfail(strict=True, reason="aiohttp waits forever"))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        saw_eof = asyncio.ensure_future(writer.wait_closed())  # read nothing, answer nothing
        await asyncio.wait({saw_eof}, timeout=2.0)

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"z" * (1024 * 1024)

    async with RawServer(handler) as server:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await make(server.origin).send("POST", "/", [], gen(), SHORT)
        assert time.monotonic() - started < 3.0


async def test_interim_responses_are_skipped(make: MakeUpstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
                         b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")

    async with RawServer(handler) as server:
        upstream = make(server.origin)
        for _ in range(2):
            resp, raw = await fetch(upstream, "GET", "/")
            assert (resp.status, raw) == (201, b"done")
            assert header_values(resp.headers, "link") == []
    assert server.connections == 1


class Interims:
    """An `InterimReceiver` recording what it is handed."""

    def __init__(self) -> None:
        self.got: list[tuple[int, str, Headers]] = []

    def interim(self, status: int, reason: str, headers: Headers) -> None:
        self.got.append((status, reason, list(headers)))


async def test_interim_heads_go_to_the_receiver_if_seen(kind: str, make: MakeUpstream) -> None:
    """The fast pool hands every 1xx head to `interim`, as received, once per request and
    never after the final head; aiohttp's client cannot see them (a documented limit)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                         b"link: </b.js>\r\nConnection: keep-alive\r\n\r\n"
                         b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")

    async with RawServer(handler) as server:
        upstream = make(server.origin)
        for _ in range(2):  # a new connection, then the same one kept alive
            receiver = Interims()
            resp = await upstream.send("GET", "/", [], None, T, None, receiver)
            assert (resp.status, await resp.read()) == (201, b"done")
            if kind == "aiohttp":
                assert receiver.got == []
            else:
                assert receiver.got == [
                    (100, "Continue", []),
                    (103, "Early Hints", [(b"Link", b"</a.css>; rel=preload"),
                                          (b"link", b"</b.js>"),
                                          (b"Connection", b"keep-alive")]),
                ]
        # Without a receiver they are skipped, and the last one is not called again.
        resp, raw = await fetch(upstream, "GET", "/")
        assert (resp.status, raw) == (201, b"done")
        assert len(receiver.got) == (0 if kind == "aiohttp" else 2)
    assert server.connections == 1


async def test_stall_mid_body_fails_read(make: MakeUpstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await reader.read()

    async with RawServer(handler) as server:
        resp = await make(server.origin).send("GET", "/", [], None, SHORT)
        assert resp.status == 200
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await resp.read()
        assert time.monotonic() - started < 3.0


async def test_close_mid_body_fails_read_and_stream(make: MakeUpstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    async with RawServer(handler) as server:
        upstream = make(server.origin)
        resp = await upstream.send("GET", "/", [], None, T)
        with pytest.raises(UpstreamError):
            await resp.read()
        resp = await upstream.send("GET", "/", [], None, T)
        got = b""
        with pytest.raises(UpstreamError):
            async for chunk in resp.iter_chunks():
                got += chunk
        assert got in (b"", b"hello")


async def test_cancelled_request_closes_its_connection(make: MakeUpstream) -> None:
    got_request = asyncio.Event()
    saw_eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        got_request.set()
        await reader.read()
        saw_eof.set()

    async with RawServer(handler) as server:
        task = asyncio.create_task(make(server.origin).send("GET", "/", [], None, T))
        await asyncio.wait_for(got_request.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(saw_eof.wait(), 5)


# Bodiless and close-delimited responses


async def test_head_204_and_304_then_reuse(make: MakeUpstream) -> None:
    peers: set[Any] = set()

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        if request.path == "/empty":
            return web.Response(status=204)
        if request.path == "/cached":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(body=b"x" * 1234)

    async with serve(handler) as origin:
        upstream = make(origin)
        resp, raw = await fetch(upstream, "HEAD", "/doc")
        assert (resp.status, raw, resp.content_length) == (200, b"", 1234)
        resp, raw = await fetch(upstream, "GET", "/empty")
        assert (resp.status, raw) == (204, b"")
        resp, raw = await fetch(upstream, "GET", "/cached")
        assert (resp.status, raw) == (304, b"")
        resp = await upstream.send("HEAD", "/doc", [], None, T)
        resp.close()  # what the proxy does with HEAD
        resp, raw = await fetch(upstream, "GET", "/doc")
        assert raw == b"x" * 1234
    assert len(peers) == 1


async def test_connection_close_responses(make: MakeUpstream) -> None:
    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(text=f"closing {request.path}")
        resp.force_close()
        return resp

    async with serve(handler) as origin:
        upstream = make(origin)
        for i in range(3):
            resp, raw = await fetch(upstream, target=f"/{i}")
            assert raw == f"closing /{i}".encode()
            assert "close" in header_values(resp.headers, "connection")


async def test_close_delimited_body(make: MakeUpstream) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ")
        await writer.drain()
        await release.wait()
        writer.write(b"part two")
        await writer.drain()

    async with RawServer(handler) as server:
        upstream = make(server.origin)
        resp = await upstream.send("GET", "/", [], None, T)
        assert resp.content_length is None
        chunks = resp.iter_chunks()
        assert await asyncio.wait_for(anext(chunks), 5) == b"part one, "
        release.set()
        assert b"".join([c async for c in chunks]) == b"part two"
        release.clear()
        resp = await upstream.send("GET", "/", [], None, T)
        release.set()
        assert await resp.read() == b"part one, part two"
    assert server.connections == 2


# Teardown


async def test_close_leaves_no_pending_tasks(make: MakeUpstream) -> None:
    before = asyncio.all_tasks()
    async with serve(echo) as origin:
        upstream = make(origin)
        await asyncio.gather(*(fetch(upstream, target=f"/{i}") for i in range(20)))
        resp = await upstream.send("GET", "/abandoned", [], None, T)
        resp.close()
        await upstream.close()
    for _ in range(3):
        await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()
    # close() is idempotent and the upstream can be closed again at teardown.
    await upstream.close()


async def test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every connection busy, a request waits at most the connect timeout (then 503
    upstream_busy: its own outcome, not a backend timeout), instead of queueing without
    bound behind hung requests."""
    from gateway.upstream import fastpool

    monkeypatch.setattr(fastpool, "MAX_ACTIVE", 2)
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with RawServer(handler) as server:
        upstream = make_upstream(server.origin, "fast")
        try:
            hung = [asyncio.create_task(fetch(upstream)) for _ in range(2)]
            while upstream._slots < 2:  # type: ignore[attr-defined]  # both slots taken
                await asyncio.sleep(0)
            quick = Timeouts(connect=0.2, read=5.0)
            with pytest.raises(UpstreamPoolTimeout):
                await upstream.send("GET", "/", [], None, quick)
            release.set()
            for resp, body in await asyncio.gather(*hung):
                assert (resp.status, body) == (200, b"ok")
        finally:
            release.set()
            await upstream.close()
