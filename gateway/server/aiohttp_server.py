"""The reference proxy server: aiohttp's low-level `web.Server` adapted to the proxy core.

Selectable with `server: aiohttp` while the fast server proves itself. Everything the proxy
does is in gateway/proxy.py; this only converts: aiohttp's raw header bytes in, and the
proxy's answer written through a `web.StreamResponse` inside the handler, so the taps run
after the client has its answer here too.

The client limits of `ServerConfig` hold here as in the fast server: aiohttp's own keep-alive
timer closes idle connections; a request head must be complete within `header_timeout` of
its first byte (a sweep task, like the fast server's, answers 408 and closes); each body read
waits at most `body_timeout` and each write at most `write_timeout` (then the connection is
aborted and the proxy sees the client gone); connections beyond the cap are refused.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server
from multidict import CIMultiDict

from gateway.config import ServerConfig
from gateway.proxy import ClientGone, Proxy, ProxyRequest
from gateway.server.limits import REFUSED, ConnectionLimit
from gateway.server.tls import tls_context
from gateway.upstream import Headers

log = logging.getLogger("modelgate.server")

READ_CHUNK = 64 * 1024
SWEEP_INTERVAL = 0.5  # header-timeout resolution
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _cut(request: web.BaseRequest, limit: ConnectionLimit, kind: str) -> ClientGone:
    """A client-side timeout: abort the connection; the proxy sees the client gone."""
    limit.timed_out(kind)
    transport = request.transport
    if transport is not None:
        transport.abort()
    return ClientGone(f"client {kind} timeout")


class _Body:
    __slots__ = ("request", "length", "expect", "timeout", "limit")

    def __init__(self, request: web.BaseRequest, length: int | None, expect: bool,
                 timeout: float, limit: ConnectionLimit) -> None:
        self.request = request
        self.length = length
        self.expect = expect
        self.timeout = timeout  # longest silence of the client while it sends the body
        self.limit = limit

    async def chunk(self) -> bytes:
        request = self.request
        if self.expect:
            # The client holds its body back until it sees this (curl waits 1 s for it); the
            # low-level server does not send it for us the way web.Application does.
            self.expect = False
            await request.writer.write(_CONTINUE)
            request.writer.output_size = 0
        try:
            async with asyncio.timeout(self.timeout):
                return await request.content.read(READ_CHUNK)
        except TimeoutError:
            raise _cut(request, self.limit, "body") from None
        except ConnectionError:
            raise
        except OSError as exc:
            raise ClientGone(str(exc)) from exc


_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def _str_headers(headers: Headers, keep_length: bool = False) -> CIMultiDict[str]:
    # aiohttp frames by itself (and refuses a Content-Length attribute on bodiless answers,
    # hence `keep_length`); it writes header text as UTF-8, so non-UTF-8 becomes U+FFFD.
    return CIMultiDict((k.decode("latin-1"), v.decode("utf-8", "replace")) for k, v in headers
                       if k.lower() not in _FRAMING
                       or keep_length and k.lower() == b"content-length")


class _Sink:
    """Every write waits at most `timeout` for the client to take the bytes (aiohttp drains
    above its buffer's high-water mark): a client that reads nothing is cut, and the proxy
    closes the backend response it was streaming."""

    __slots__ = ("request", "response", "timeout", "limit")

    def __init__(self, request: web.BaseRequest, timeout: float,
                 limit: ConnectionLimit) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.timeout = timeout
        self.limit = limit

    async def send(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        # A StreamResponse, not web.Response: that one adds a Content-Type of its own.
        response = self.response = web.StreamResponse(status=status, reason=reason or None,
                                                      headers=_str_headers(headers))
        if status not in (204, 304) and status >= 200:
            response.content_length = len(body)
        await response.prepare(self.request)
        try:
            async with asyncio.timeout(self.timeout):
                if body and self.request.method != "HEAD":
                    await response.write(body)
                await response.write_eof()
        except TimeoutError:
            raise _cut(self.request, self.limit, "write") from None

    async def send_head(self, status: int, reason: str, headers: Headers) -> None:
        response = self.response = web.StreamResponse(
            status=status, reason=reason or None,
            headers=_str_headers(headers, keep_length=self.request.method == "HEAD"))
        await response.prepare(self.request)
        await response.write_eof()

    async def start(self, status: int, reason: str, headers: Headers, chunked: bool) -> None:
        response = self.response = web.StreamResponse(status=status, reason=reason or None,
                                                      headers=_str_headers(headers))
        if not chunked:
            length = next(v for k, v in headers if k.lower() == b"content-length")
            response.content_length = int(length)
        elif self.request.version >= (1, 1):
            response.enable_chunked_encoding()
        await response.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self.response.write(chunk)
        except TimeoutError:
            raise _cut(self.request, self.limit, "write") from None

    async def end(self) -> None:
        assert self.response is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self.response.write_eof()
        except TimeoutError:
            raise _cut(self.request, self.limit, "write") from None

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()

    def interim(self, status: int, reason: str, headers: Headers) -> None:
        """Dropped: aiohttp's server writes one response per request and offers no way to
        put a 1xx before it (only its own 100 Continue). A documented limit of this server
        (docs/ARCHITECTURE.md, Known limits); the fast server forwards them."""


LINGER = 2.0  # seconds a connection answered 408 may still send before it is closed
_REJECT_CODE = {400: "bad_request", 413: "body_too_large", 414: "uri_too_long",
                431: "headers_too_large"}


class _Handler(RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse gets the gateway's JSON
    400 (like the fast server's), and neither that answer nor the log at INFO and above
    quotes the client's bytes: aiohttp's own (text answer, ERROR log with the exception)
    both carry the offending line, which may hold a credential.

    It also keeps the connection cap (refused before anything is read) and a `deadline` for
    the request head: set by the first bytes of a head (or the connection's start), cleared
    when the proxy takes the request; the server's sweep answers 408 past it."""

    limit: ConnectionLimit
    header_timeout: float
    deadline = 0.0
    busy = False
    refused = False
    head_bytes = False  # bytes of the next request head came in
    lingering = False  # our last answer is out: what the client still sends is swallowed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        assert isinstance(manager, _Server)
        if not self.limit.admit(len(manager.connections), manager.evict_idle):
            self.refused = True  # not handed to aiohttp: nothing of it is started
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(REFUSED)
            transport.close()
            return
        self.deadline = self._loop.time() + self.header_timeout
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if not self.busy and not self.head_bytes and not self.refused:
            self.head_bytes = True  # a new head begins: it has header_timeout from here
            self.deadline = self._loop.time() + self.header_timeout
        super().data_received(data)

    def head_timed_out(self) -> None:
        """Past the deadline: a head begun and not finished is answered 408 (as the fast
        server does); a connection that never sent anything is just closed."""
        self.deadline = 0.0
        transport = self.transport
        if (self.head_bytes and not self.lingering and transport is not None
                and not transport.is_closing()):
            self.limit.timed_out("header")
            log.info("rejected a request: 408 request_timeout")
            body = orjson.dumps({"error": "request_timeout",
                                 "message": "the request head took too long"})
            transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json"
                            b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                            % (len(body), body))
            if transport.can_write_eof():
                # Closing with the client's bytes unread would reset the connection and could
                # destroy the answer before it is read: half-close, swallow what still comes
                # for at most LINGER seconds (the sweep closes then), as nginx's lingering close.
                transport.write_eof()
                self.lingering = True
                self.deadline = self._loop.time() + LINGER
                return
        self.force_close()
        if transport is not None:
            transport.close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # The client left or was cut by a client timeout: the proxy counted it (499);
            # aiohttp would log it at ERROR with a traceback. Its own loop ignores this one.
            log.debug("client %s gone: %s", request.remote, exc)
            self.force_close()
            # Its traceback's frames hold the answer's last chunks, and this frame (which
            # aiohttp's caller keeps in the traceback of what we raise) holds `exc`: a cycle
            # only the garbage collector would free, ~0.25 MB for each client that left.
            exc.__traceback__ = None
            raise ConnectionError("the client is gone") from None
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        if status == 400 and "Too many headers" in str(exc):
            status = 431  # aiohttp's parser says 400 for what the fast server answers 431
        code = _REJECT_CODE.get(status, "bad_request")
        log.info("rejected a request from %s: %d %s", request.remote, status, code)
        log.debug("malformed request from %s: %s", request.remote, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already sent")
        response = web.Response(status=status, content_type="application/json",
                                body=orjson.dumps({"error": code,
                                                   "message": "malformed request"}))
        response.force_close()
        return response


class _Server(Server):
    def __init__(self, *args: Any, limit: ConnectionLimit, header_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit = limit
        self.header_timeout = header_timeout

    def evict_idle(self) -> bool:
        """At the connection cap: close the oldest connection with no request in flight."""
        for handler, transport in self._connections.items():  # oldest first
            if (isinstance(handler, _Handler) and not handler.busy
                    and not handler._messages and not transport.is_closing()):
                handler.force_close()
                transport.close()
                self._connections.pop(handler, None)  # its connection_lost comes later
                return True
        return False

    def __call__(self) -> RequestHandler:
        handler = _Handler(self, loop=self._loop, **self._kwargs)
        handler.limit = self.limit
        handler.header_timeout = self.header_timeout
        return handler


class AiohttpServer:
    def __init__(self, proxy: Proxy, config: ServerConfig) -> None:
        self.proxy = proxy
        self.config = config
        self.tls = tls_context(config)
        self.addresses: list[tuple[str, int]] = []
        self._runner: web.ServerRunner | None = None
        self._server: _Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.limit = ConnectionLimit(config.max_connections, self._open_count)

    def _open_count(self) -> int:
        return len(self._server.connections) if self._server is not None else 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = request.protocol
        assert isinstance(handler, _Handler)
        handler.busy = True
        handler.deadline = 0.0
        handler.head_bytes = False
        try:
            return await self._handle(request)
        finally:
            handler.busy = False

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        config = self.config
        if sum(len(k) + len(v) for k, v in request.raw_headers) > config.max_header_bytes:
            log.info("rejected a request from %s: 431 headers_too_large", request.remote)
            response = web.Response(status=431, content_type="application/json",
                                    body=orjson.dumps({
                                        "error": "headers_too_large",
                                        "message": f"headers over {config.max_header_bytes} "
                                                   "bytes"}))
            response.force_close()
            return response
        headers = request.headers
        length = request.content_length
        body: _Body | None = None
        if request.body_exists or length == 0:
            expect = headers.get("Expect", "").lower() == "100-continue"
            body = _Body(request, length, expect and request.version >= (1, 1)
                         and request.body_exists, config.body_timeout, self.limit)
        target = request.raw_path
        if not target.isascii():  # aiohttp decoded it as UTF-8: back to the client's bytes
            target = target.encode("utf-8", "surrogateescape").decode("latin-1")
        proxied = ProxyRequest(request.method, target, list(request.raw_headers), body,
                               request.remote or "unknown", self.tls is not None,
                               request.version >= (1, 1))
        sink = _Sink(request, config.write_timeout, self.limit)
        await self.proxy.handle(proxied, sink)
        if sink.response is None:  # nothing was written: the client is gone
            raise ConnectionResetError("no answer written")
        return sink.response

    async def start(self, listen: Sequence[tuple[str, int]], sockets: Sequence[socket.socket],
                    reuse_port: bool) -> None:
        config = self.config
        server = self._server = _Server(
            self.handle, access_log=None, handler_cancellation=False,
            max_line_size=config.max_request_line, max_field_size=config.max_header_bytes,
            max_headers=config.max_headers, keepalive_timeout=config.keepalive_timeout,
            limit=self.limit, header_timeout=config.header_timeout)
        runner = self._runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=self.tls).start()
            host, port = sock.getsockname()[:2]
            self.addresses.append((host, port))
        for host, port in () if sockets else listen:
            site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024,
                               reuse_port=reuse_port or None, ssl_context=self.tls)
            await site.start()
            self.addresses.append(_bound(site, host, port))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(server))
        self.proxy.recorder.gauges["proxy_connections"] = self.limit.metrics

    async def stop(self, timeout: float) -> None:
        self.proxy.recorder.gauges.pop("proxy_connections", None)
        sweeper = self._sweeper
        self._sweeper = None
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.wait({sweeper})  # not gather: our own cancellation must propagate
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _sweep(self, server: _Server) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            for handler in server.connections:
                if isinstance(handler, _Handler) and 0.0 < handler.deadline <= now:
                    handler.head_timed_out()


def _bound(site: web.TCPSite, host: str, port: int) -> tuple[str, int]:
    server: Any = site._server  # the only way to learn the port chosen for port 0
    sockets = getattr(server, "sockets", None)
    if sockets:
        return host, int(sockets[0].getsockname()[1])
    return host, port
