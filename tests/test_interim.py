"""A backend's interim (1xx) heads through the gateway (gateway/interim.py).

The header filter directly; the fast server's sink over an in-memory transport (when it
may write a hint); then end to end over real sockets: a raw-socket backend that
sends `103 Early Hints` (and its own `100 Continue`) before its answer, the default build
(fast server, fast upstream) and raw-socket clients, on the Task path (a new backend
connection) and on the fast path (a warm one). The gated backend holds its final answer
until the client has the 103: the hint must arrive early, not with the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway.config import ServerConfig
from gateway.interim import interim_headers
from gateway.metrics import Recorder
from gateway.proxy import Proxy, ProxyRequest
from gateway.server.fast import FastServer
from gateway.server.fastpath import FastExchange
from gateway.upstream import Headers
from gateway.upstream.fastpool import FastUpstream
from tests.helpers import running_gateway

pytestmark = pytest.mark.timeout(30)

HINT = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
# What the backend adds to its hint besides: hop-by-hop, and a length a 1xx must not have.
HINT_SENT = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n"
             b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
BODY = b"<p>hi</p>"


# -- the filter ---------------------------------------------------------------------------------


def test_which_interim_statuses_go_on() -> None:
    assert interim_headers(100, []) is None  # the gateway answers Expect itself
    assert interim_headers(101, []) is None  # never forwarded (the upstream refuses it)
    assert interim_headers(102, []) == []
    assert interim_headers(103, []) == []
    assert interim_headers(199, []) == []
    assert interim_headers(200, []) is None


def test_interim_headers_drop_hop_by_hop_and_framing_and_keep_the_rest() -> None:
    headers: Headers = [
        (b"Link", b"</a.css>; rel=preload"), (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"Content-Length", b"0"),
        (b"Transfer-Encoding", b"chunked"), (b"link", b"</b.js>; rel=preload"),
        (b"X-Request-ID", b"backend-id"), (b"X-Empty", b""),
    ]
    assert interim_headers(103, headers) == [
        (b"Link", b"</a.css>; rel=preload"), (b"link", b"</b.js>; rel=preload"),
        (b"X-Request-ID", b"backend-id"), (b"X-Empty", b""),
    ]


def test_no_request_id_is_added_to_an_interim_head() -> None:
    assert interim_headers(103, [(b"Link", b"</a>")]) == [(b"Link", b"</a>")]


# -- the fast server's sink, over an in-memory transport --------------------------------------


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def write(self, data: Any) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


async def test_the_fast_server_writes_a_hint_only_while_it_may() -> None:
    server = FastServer(Proxy(Recorder()), ServerConfig())
    conn = server._protocol()
    transport = Transport()
    conn.connection_made(transport)
    sent: Headers = [(b"Link", b"</a.css>; rel=preload"), (b"Connection", b"keep-alive")]

    def hint() -> bytes:
        transport.out.clear()
        conn.interim(103, "Early Hints", sent)
        return bytes(transport.out)

    assert hint() == b""  # no request being answered
    http11 = ProxyRequest("GET", "/", [], None, "127.0.0.1", False, True)
    conn.begin_answer(http11, True)
    assert hint() == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    transport.out.clear()
    conn.interim(100, "Continue", [])
    assert transport.out == b""  # the backend's own 100: not the client's
    conn.pause_writing()
    assert hint() == b""  # the client is not reading: a hint is not worth the memory
    conn.resume_writing()
    conn.begin_answer(ProxyRequest("GET", "/", [], None, "127.0.0.1", False, False), True)
    assert hint() == b""  # HTTP/1.0
    conn.begin_answer(http11, True)
    assert hint().startswith(b"HTTP/1.1 103 ")
    conn.connection_lost(None)
    assert hint() == b""  # the client is gone
    assert conn not in server.connections


# -- end to end ---------------------------------------------------------------------------------


class Backend:
    """Per path: /gated sends a 103, waits for `release`, then answers; /gated-chunked the
    same with a chunked answer; /plain sends a 103 and the answer at once; /continue its
    own 100 Continue, a 103 and the answer at once."""

    def __init__(self) -> None:
        self.release: asyncio.Queue[None] = asyncio.Queue()
        self.connections = 0
        self.port = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                path = head.split(b" ", 2)[1]
                answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
                if path == b"/continue":
                    writer.write(CONTINUE + HINT_SENT + answer)
                elif path == b"/plain":
                    writer.write(HINT_SENT + answer)
                else:
                    writer.write(HINT_SENT)
                    await writer.drain()
                    await self.release.get()
                    if path == b"/gated-chunked":
                        answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
                    writer.write(answer)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@asynccontextmanager
async def backend() -> AsyncIterator[Backend]:
    server = Backend()
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for task in server._tasks:
            task.cancel()
        if server._tasks:
            await asyncio.wait(server._tasks)
        await listener.wait_closed()


def config(port: int) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
            "routes": [{"name": "r", "match": {"path_prefix": "/"},
                        "backends": {"main": {"url": f"http://127.0.0.1:{port}"}},
                        "live": "main"}]}


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        out = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            out += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return out
    length = int(lower.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    return await asyncio.wait_for(reader.readexactly(length), 10)


class Spy:
    """Which path answered: `FastUpstream.send` (the Task's) and the fast path's interim."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sends = 0
        self.fast_interims = 0
        send = FastUpstream.send
        response_interim = FastExchange.response_interim

        async def counted_send(upstream: FastUpstream, *args: Any, **kwargs: Any) -> Any:
            self.sends += 1
            return await send(upstream, *args, **kwargs)

        def counted_interim(exchange: FastExchange, *args: Any) -> None:
            self.fast_interims += 1
            response_interim(exchange, *args)

        monkeypatch.setattr(FastUpstream, "send", counted_send)
        monkeypatch.setattr(FastExchange, "response_interim", counted_interim)


async def test_http11_client_gets_the_hint_before_the_answer_on_both_paths(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    async with backend() as server, running_gateway(config(server.port),
                                                    server_kind="fast") as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.addresses[0][1])
        try:
            expected = [("/gated", 1, 0), ("/gated", 1, 1), ("/gated-chunked", 1, 2)]
            for path, sends, fast_interims in expected:
                writer.write(b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % path.encode())
                # The backend holds its answer until we have the hint: it came early.
                assert await read_head(reader) == HINT
                server.release.put_nowait(None)
                head = await read_head(reader)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"x-request-id: " in head.lower()
                assert await read_body(reader, head) == BODY
                # The first on a new backend connection (the Task's send), then the fast
                # path on the warm one: for a plain and for a chunked (streamed) answer.
                assert (spy.sends, spy.fast_interims) == (sends, fast_interims), path
        finally:
            writer.close()
    assert server.connections == 1


async def test_http10_client_gets_no_interim_head(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    async with backend() as server, running_gateway(config(server.port),
                                                    server_kind="fast") as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.addresses[0][1])
        try:
            for sends, fast_interims in [(1, 0), (1, 1)]:  # the Task path, then the fast one
                writer.write(b"GET /plain HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                head = await read_head(reader)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")  # not a 103
                assert await read_body(reader, head) == BODY
                assert (spy.sends, spy.fast_interims) == (sends, fast_interims)
            writer.write(b"GET /plain HTTP/1.0\r\n\r\n")  # the last: the gateway closes
            rest = await asyncio.wait_for(reader.read(), 10)
            assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(BODY)
            assert b" 103 " not in rest
        finally:
            writer.close()
    assert server.connections == 1


async def test_backends_own_100_continue_is_not_forwarded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    async with backend() as server, running_gateway(config(server.port),
                                                    server_kind="fast") as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.addresses[0][1])
        try:
            for sends, fast_interims in [(1, 0), (1, 2)]:  # the fast path sees both heads
                writer.write(b"GET /continue HTTP/1.1\r\nHost: gw\r\n\r\n")
                assert await read_head(reader) == HINT  # the 100 went nowhere
                head = await read_head(reader)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert await read_body(reader, head) == BODY
                assert (spy.sends, spy.fast_interims) == (sends, fast_interims)
        finally:
            writer.close()


async def test_aiohttp_server_drops_interim_heads() -> None:
    """The documented limit: aiohttp's server cannot write a 1xx before its answer; the
    answer itself is whole."""
    async with backend() as server, running_gateway(config(server.port),
                                                    server_kind="aiohttp") as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.addresses[0][1])
        try:
            for _ in range(2):
                writer.write(b"GET /plain HTTP/1.1\r\nHost: gw\r\n\r\n")
                head = await read_head(reader)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert await read_body(reader, head) == BODY
        finally:
            writer.close()
