"""The reference proxy server: aiohttp's low-level `web.Server` adapted to the proxy core.

Selectable with `server: aiohttp` while the fast server proves itself. Everything the proxy
does is in gateway/proxy.py; this only converts: aiohttp's raw header bytes in, and the
proxy's answer written through a `web.StreamResponse` inside the handler, so the taps run
after the client has its answer here too.
"""

from __future__ import annotations

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
from gateway.server.tls import tls_context
from gateway.upstream import Headers

log = logging.getLogger("modelgate.server")

READ_CHUNK = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Body:
    __slots__ = ("request", "length", "expect")

    def __init__(self, request: web.BaseRequest, length: int | None, expect: bool) -> None:
        self.request = request
        self.length = length
        self.expect = expect

    async def chunk(self) -> bytes:
        request = self.request
        if self.expect:
            # The client holds its body back until it sees this (curl waits 1 s for it); the
            # low-level server does not send it for us the way web.Application does.
            self.expect = False
            await request.writer.write(_CONTINUE)
            request.writer.output_size = 0
        try:
            return await request.content.read(READ_CHUNK)
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
    __slots__ = ("request", "response")

    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def send(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        # A StreamResponse, not web.Response: that one adds a Content-Type of its own.
        response = self.response = web.StreamResponse(status=status, reason=reason or None,
                                                      headers=_str_headers(headers))
        if status not in (204, 304) and status >= 200:
            response.content_length = len(body)
        await response.prepare(self.request)
        if body and self.request.method != "HEAD":
            await response.write(body)
        await response.write_eof()

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
        await self.response.write(chunk)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


_REJECT_CODE = {400: "bad_request", 413: "body_too_large", 414: "uri_too_long",
                431: "headers_too_large"}


class _Handler(RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse gets the gateway's JSON
    400 (like the fast server's), and neither that answer nor the log at INFO and above
    quotes the client's bytes: aiohttp's own (text answer, ERROR log with the exception)
    both carry the offending line, which may hold a credential."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
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
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class AiohttpServer:
    def __init__(self, proxy: Proxy, config: ServerConfig) -> None:
        self.proxy = proxy
        self.config = config
        self.tls = tls_context(config)
        self.addresses: list[tuple[str, int]] = []
        self._runner: web.ServerRunner | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = request.headers
        length = request.content_length
        body: _Body | None = None
        if request.body_exists or length == 0:
            expect = headers.get("Expect", "").lower() == "100-continue"
            body = _Body(request, length, expect and request.version >= (1, 1)
                         and request.body_exists)
        target = request.raw_path
        if not target.isascii():  # aiohttp decoded it as UTF-8: back to the client's bytes
            target = target.encode("utf-8", "surrogateescape").decode("latin-1")
        proxied = ProxyRequest(request.method, target, list(request.raw_headers), body,
                               request.remote or "unknown", self.tls is not None,
                               request.version >= (1, 1))
        sink = _Sink(request)
        await self.proxy.handle(proxied, sink)
        if sink.response is None:  # nothing was written: the client is gone
            raise ConnectionResetError("no answer written")
        return sink.response

    async def start(self, listen: Sequence[tuple[str, int]], sockets: Sequence[socket.socket],
                    reuse_port: bool) -> None:
        server = _Server(self.handle, access_log=None, handler_cancellation=False,
                        max_line_size=self.config.max_request_line,
                        max_field_size=self.config.max_header_bytes)
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

    async def stop(self, timeout: float) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _bound(site: web.TCPSite, host: str, port: int) -> tuple[str, int]:
    server: Any = site._server  # the only way to learn the port chosen for port 0
    sockets = getattr(server, "sockets", None)
    if sockets:
        return host, int(sockets[0].getsockname()[1])
    return host, port
