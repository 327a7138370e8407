"""The hot path: match a route, pick a backend, forward, stream the answer back.

Per request this does no I/O besides the backend call, takes no lock and allocates little:
route tables, backends, pools and metric objects are all built when the config or the
routing state changes (see routing.py). Features that need to look at the exchange (shadow,
probes) are taps run after the client has its response; they never await.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import UpstreamError
from gateway.routing import CompiledRoute, Exchange, sticky_key_of
from gateway.upstream import HOP_BY_HOP, Headers, UpstreamResponse

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("modelgate.proxy")
access_log = logging.getLogger("modelgate.access")

BUFFER_REQUEST_UP_TO = 64 * 1024  # smaller bodies of known length are read whole: cheaper
BUFFER_RESPONSE_UP_TO = 1024 * 1024
READ_CHUNK = 64 * 1024
REQUEST_ID = "X-Request-ID"
MAX_REQUEST_ID = 200
_DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
_NO_BODY_STATUS = frozenset({204, 304})
_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "Keep-Alive", "Close"})
_PLAIN_CONNECTION_TOKENS = frozenset({"keep-alive", "close"})
# Ours to set (host, framing) or already answered here (expect: see Proxy.handle).
_NOT_FORWARDED = frozenset({"host", "content-length", "expect"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyTooLarge(Exception):
    pass


def json_error(status: int, code: str, message: str, request_id: str | None = None,
               **extra: object) -> web.Response:
    body: dict[str, object] = {"error": code, "message": message, **extra}
    headers = {}
    if request_id:
        body["request_id"] = request_id
        headers[REQUEST_ID] = request_id
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


_ID_PREFIX = os.urandom(6).hex()  # per process: ids stay unique across workers and replicas
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A unique id without a syscall per request: random process prefix + a counter."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def client_request_id(value: str | None) -> str | None:
    """The client's X-Request-ID if it is safe to log, echo and forward, else None."""
    if not value or len(value) > MAX_REQUEST_ID or not value.isascii() or not value.isprintable():
        return None
    return value


def connection_tokens(value: str) -> frozenset[str]:
    """Header names a `Connection` header makes hop-by-hop (beyond the fixed set).

    Nearly every message says just ``keep-alive`` or ``close``: answer that without a set."""
    if value in _PLAIN_CONNECTION:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",")) - _PLAIN_CONNECTION_TOKENS


class Proxy:
    """The request handler of the client-facing server."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.in_flight = 0
        self.access_log_sample = gateway.config.access_log_sample

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The server's handler: a bug in the gateway is a JSON 500, never a traceback."""
        try:
            return await self._proxy(request)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("proxy failed on %s %s", request.method, request.path)
            return json_error(500, "internal_error", "the gateway failed; see its log",
                              client_request_id(request.headers.get(REQUEST_ID)))

    async def _proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        headers_in = request.headers
        request_id = client_request_id(headers_in.get(REQUEST_ID)) or new_request_id()
        path = request.path
        if "/." in path and _has_dot_segment(path):
            # We match "/public" on "/public/../internal" but the backend may resolve it to
            # "/internal": refuse rather than route on one path and serve another.
            return json_error(400, "bad_path", "'.' and '..' path segments are not allowed",
                              request_id)
        route = self.gateway.table.match(request.host, path)
        if route is None:
            return json_error(404, "no_route", f"no route matches {request.path}", request_id)

        length = request.content_length
        if length is not None and length > route.max_body:
            return json_error(413, "body_too_large",
                              f"request body over the route's limit of {route.max_body} bytes",
                              request_id, route=route.name)

        key = sticky_key_of(route.sticky, headers_in, request.query) if route.sticky else None
        override = headers_in.get(route.override_header) if route.override_header else None
        backend = route.pick(key, override)
        stats = backend.stats

        rec = self.gateway.recorder
        self.in_flight += 1
        rec.in_flight[route.name] = rec.in_flight.get(route.name, 0) + 1
        status = 0  # 0 until known: a failure of the gateway itself is not the backend's
        exchange: Exchange | None = None
        try:
            forward = self._forward_headers(request, request_id)
            expect = headers_in.get("Expect")
            if (expect is not None and expect.lower() == "100-continue" and request.body_exists
                    and request.version >= (1, 1)):
                # The client holds its body back until it sees this (curl waits 1 s for it);
                # the low-level server does not send it for us the way web.Application does.
                await request.writer.write(_CONTINUE)
                request.writer.output_size = 0
            body: bytes | AsyncIterator[bytes] | None
            too_large: list[bool] = []
            if not request.body_exists:
                body = None
            elif route.needs_request_body or (
                length is not None and length <= BUFFER_REQUEST_UP_TO
            ):
                try:
                    body = await _read_body(request, route.max_body)
                except BodyTooLarge:
                    status = 413
                    return json_error(413, "body_too_large",
                                      f"request body over the route's limit of "
                                      f"{route.max_body} bytes", request_id, route=route.name)
            else:
                body = _stream_body(request, route.max_body, too_large)

            upstream = backend.upstream()
            sent = time.perf_counter()
            try:
                resp = await upstream.send(
                    request.method, request.raw_path, forward, body, route.timeouts
                )
            except ValueError:
                # Header bytes the upstream client cannot write (invalid UTF-8 through
                # aiohttp's client, CR/LF): the client's request is at fault.
                status = 400
                return json_error(400, "bad_header", "a request header cannot be forwarded",
                                  request_id, route=route.name)
            except (UpstreamError, BodyTooLarge) as exc:
                # An upstream may let our own body iterator's BodyTooLarge through untranslated.
                if too_large or not isinstance(exc, UpstreamError):
                    status = 413
                    return json_error(413, "body_too_large",
                                      f"request body over the route's limit of "
                                      f"{route.max_body} bytes", request_id, route=route.name)
                status = exc.status
                stats.upstream_error(exc.kind)
                log.warning("upstream %s of route %s failed: %s", backend.name, route.name, exc)
                code = "upstream_timeout" if status == 504 else "upstream_unavailable"
                return json_error(status, code, f"backend {backend.name!r}: {exc.kind}",
                                  request_id, route=route.name, backend=backend.name)

            stats.upstream_time(time.perf_counter() - sent)
            status = resp.status
            if route.taps:
                exchange = Exchange()
                exchange.route = route.name
                exchange.backend = backend.name
                exchange.request_id = request_id
                exchange.method = request.method
                exchange.target = request.raw_path
                exchange.request_headers = forward
                exchange.request_body = body if isinstance(body, bytes) else None
                exchange.sticky_key = key
                exchange.status = status
                exchange.started = started
            out_headers = self._response_headers(resp, request_id)
            if exchange is not None:
                exchange.response_headers = resp.headers
            response, failure = await self._respond(request, route, resp, out_headers, exchange)
            if failure is not None:  # the backend broke mid-body: an error for gates/alarms
                status = failure.status
                stats.upstream_error(failure.kind)
                if exchange is not None:
                    exchange.status = status
            return response
        finally:
            latency = time.perf_counter() - started
            if status:
                stats.observe(status, latency)
            self.in_flight -= 1
            rec.in_flight[route.name] -= 1
            if exchange is not None:
                exchange.latency = latency
                for tap in route.taps:
                    try:
                        tap(exchange)
                    except Exception:
                        log.exception("tap failed on route %s", route.name)
            if self.access_log_sample and random.random() < self.access_log_sample:
                access_log.info(
                    "request", extra={"request_id": request_id, "route": route.name,
                                      "backend": backend.name, "status": status,
                                      "latency_ms": round(latency * 1000, 3),
                                      "method": request.method, "path": request.path},
                )

    def _forward_headers(self, request: web.BaseRequest, request_id: str) -> Headers:
        raw = request.headers
        drop = HOP_BY_HOP
        connection = raw.get("connection")
        if connection and (extra := connection_tokens(connection)):
            drop = drop | extra
        out: Headers = []
        forwarded_for = None
        has_proto = has_host = has_id = False
        for name, value in raw.items():
            lower = name.lower()
            if lower in drop or lower in _NOT_FORWARDED:
                continue
            if lower == "x-forwarded-for":  # several lines are one list: keep them all
                forwarded_for = f"{forwarded_for}, {value}" if forwarded_for else value
                continue
            if lower == "x-forwarded-proto":
                has_proto = True
            elif lower == "x-forwarded-host":
                has_host = True
            elif lower == "x-request-id":
                has_id = True
                value = request_id  # the one the client gets back (an empty one was replaced)
            out.append((name, value))
        peer = request.remote or "unknown"
        out.append(("X-Forwarded-For", f"{forwarded_for}, {peer}" if forwarded_for else peer))
        if not has_proto:
            out.append(("X-Forwarded-Proto", request.scheme))
        if not has_host and request.host:
            out.append(("X-Forwarded-Host", request.host))
        if not has_id:
            out.append((REQUEST_ID, request_id))
        return out

    @staticmethod
    def _response_headers(resp: UpstreamResponse, request_id: str) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict()
        has_id = False
        named: frozenset[str] = frozenset()
        for name, value in resp.headers:
            lower = name.lower()
            if lower in _DROP_RESPONSE:
                if lower == "connection":
                    named |= connection_tokens(value)
                continue
            if lower == "x-request-id":
                has_id = True
            out.add(name, value)
        for lower in named:  # rare: headers the backend's Connection header made hop-by-hop
            if lower == "x-request-id" and lower in out:
                has_id = False
            out.popall(lower, None)
        if not has_id:
            out[REQUEST_ID] = request_id
        return out

    async def _respond(
        self,
        request: web.BaseRequest,
        route: CompiledRoute,
        resp: UpstreamResponse,
        headers: CIMultiDict[str],
        exchange: Exchange | None,
    ) -> tuple[web.StreamResponse, UpstreamError | None]:
        """The client's response, and the backend's failure if its body broke off."""
        if request.method == "HEAD" or resp.status in _NO_BODY_STATUS:
            resp.close() if request.method == "HEAD" else await resp.read()
            if resp.content_length is not None and request.method == "HEAD":
                headers["Content-Length"] = str(resp.content_length)
            # The Content-Length header set above is kept (aiohttp refuses the attribute).
            return web.Response(status=resp.status, reason=resp.reason, headers=headers), None
        length = resp.content_length
        streaming = length is None or length > BUFFER_RESPONSE_UP_TO
        if not streaming:
            try:
                body = await resp.read()
            except UpstreamError as exc:
                code = "upstream_timeout" if exc.status == 504 else "upstream_unavailable"
                return json_error(exc.status, code,
                                  f"backend failed while sending its body: {exc.kind}",
                                  headers.get(REQUEST_ID), route=route.name), exc
            if exchange is not None:
                exchange.response_body = body
            return web.Response(status=resp.status, reason=resp.reason, body=body,
                                headers=headers), None

        response = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        if length is not None:
            response.content_length = length
        capture: list[bytes] | None = (
            [] if exchange is not None and route.needs_response_body else None
        )
        captured = 0
        await response.prepare(request)
        try:
            async for chunk in resp.iter_chunks():
                await response.write(chunk)
                if capture is not None:
                    captured += len(chunk)
                    if captured <= route.max_body:
                        capture.append(chunk)
                    else:
                        capture = None
        except UpstreamError as exc:
            # Headers are out: the only honest signal left is to cut the connection.
            log.warning("stream from %s broke mid-body: %s", route.name, exc)
            resp.close()
            if request.transport is not None:
                request.transport.close()
            return response, exc
        except (ConnectionResetError, ConnectionError):
            resp.close()  # the client went away; drop the backend connection too
            raise
        await response.write_eof()
        if capture is not None and exchange is not None:
            exchange.response_body = b"".join(capture)
        return response, None


def _has_dot_segment(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/"))


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    content = request.content
    length = request.content_length
    if length is not None:
        return await content.read()  # the HTTP parser enforces Content-Length
    parts: list[bytes] = []
    size = 0
    while chunk := await content.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
    return b"".join(parts)


async def _stream_body(
    request: web.BaseRequest, limit: int, too_large: list[bool]
) -> AsyncIterator[bytes]:
    size = 0
    content = request.content
    while chunk := await content.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            too_large.append(True)
            raise BodyTooLarge
        yield chunk
