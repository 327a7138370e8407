"""The hot path: match a route, pick a backend, forward, write the answer, then tap.

The proxy core is transport-neutral: a server (gateway/server/: the httptools protocol server
or the aiohttp adapter) turns each request into a `ProxyRequest` (method, target, headers as
bytes, a body source, peer, TLS flag) and hands it to `Proxy.handle` with a `ResponseSink`
to write the answer into. The proxy logic (match, pick, forward, errors, taps) is written
once, here.

Per request this does no I/O besides the backend call, takes no lock and allocates little:
route tables, backends, pools and metric objects are built when the config or the routing
state changes (see routing.py). Headers stay bytes from socket to socket; only the values a
feature needs (host, request id, sticky key) are decoded. Features that look at the exchange
(shadow, probes) are taps run after the client's answer is written; they never await.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Protocol, cast
from urllib.parse import parse_qsl, unquote

import orjson

from gateway.errors import UpstreamError, UpstreamPoolTimeout
from gateway.metrics import BackendStats, Recorder
from gateway.resilience.limits import Gate, admit, leave
from gateway.resilience.retry import may_fall_back, may_resend, retry
from gateway.routing import Backend, CompiledRoute, Exchange, RoutingTable, cookie_value
from gateway.rules import RULED_ERRORS, RULED_REQUESTS
from gateway.streaming import StreamMeter, is_event_stream
from gateway.upstream import HOP_BY_HOP, Headers, Upstream, UpstreamResponse

log = logging.getLogger("modelgate.proxy")
access_log = logging.getLogger("modelgate.access")

BUFFER_REQUEST_UP_TO = 64 * 1024  # smaller bodies of known length are read whole: cheaper
BUFFER_RESPONSE_UP_TO = 1024 * 1024
MAX_REQUEST_ID = 200
# Hop-by-hop headers the backend sent are dropped; its framing header (Content-Length or
# Transfer-Encoding) stays where it was, since the body goes on framed the same way.
_DROP_RESPONSE = HOP_BY_HOP - {b"transfer-encoding"}
_NO_BODY_STATUS = frozenset({204, 304})
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_PLAIN_CONNECTION_TOKENS = frozenset({b"keep-alive", b"close"})
# Ours to set (host) or answered by the server (expect: 100-continue). The client's framing
# header goes on in its place; the upstream replaces it if it does not match what it sends.
_NOT_FORWARDED = frozenset({b"host", b"expect"})
_DROP_REQUEST = HOP_BY_HOP - {b"transfer-encoding"}
_JSON = (b"Content-Type", b"application/json")
REQUEST_ID = b"X-Request-ID"
# What the request-header pass does with a (lower-case) name; absent: forwarded as is.
_H_PLAIN, _H_DROP, _H_HOST, _H_CONNECTION, _H_FORWARDED_FOR, _H_FORWARDED_PROTO, \
    _H_FORWARDED_HOST, _H_REQUEST_ID, _H_FORWARDED, _H_LENGTH = range(10)
_REQUEST_HEADER_KIND: dict[bytes, int] = {
    **dict.fromkeys(_DROP_REQUEST | _NOT_FORWARDED, _H_DROP),
    b"host": _H_HOST,
    b"connection": _H_CONNECTION,
    b"x-forwarded-for": _H_FORWARDED_FOR,
    b"x-forwarded-proto": _H_FORWARDED_PROTO,
    b"x-forwarded-host": _H_FORWARDED_HOST,
    b"x-request-id": _H_REQUEST_ID,
    b"forwarded": _H_FORWARDED,
    b"content-length": _H_LENGTH,
}
# The same by the name as received: clients repeat their spellings, and one dict lookup is
# cheaper than lower-casing every name of every request. Bounded (names are the client's).
_REQUEST_KIND_BY_RAW: dict[bytes, int] = {}
_RESPONSE_KIND_BY_RAW: dict[bytes, int] = {}
RAW_NAME_CACHE_MAX = 1024
# What the response-header pass does with a name.
R_PLAIN, R_DROP, R_CONNECTION, R_REQUEST_ID, R_FRAMING = range(5)


def request_header_kind(name: bytes) -> int:
    kind = _REQUEST_HEADER_KIND.get(name.lower(), _H_PLAIN)
    if len(_REQUEST_KIND_BY_RAW) < RAW_NAME_CACHE_MAX:
        _REQUEST_KIND_BY_RAW[name] = kind
    return kind


def response_header_kind(name: bytes) -> int:
    """What the proxy does with a backend's response header `name` (as received)."""
    kind = _RESPONSE_KIND_BY_RAW.get(name)
    if kind is not None:
        return kind
    lower = name.lower()
    if lower in _DROP_RESPONSE:
        kind = R_CONNECTION if lower == b"connection" else R_DROP
    elif lower == b"x-request-id":
        kind = R_REQUEST_ID
    elif lower == b"content-length" or lower == b"transfer-encoding":
        kind = R_FRAMING
    else:
        kind = R_PLAIN
    if len(_RESPONSE_KIND_BY_RAW) < RAW_NAME_CACHE_MAX:
        _RESPONSE_KIND_BY_RAW[name] = kind
    return kind


def end_to_end_headers(headers: Headers) -> tuple[Headers, bool, bool]:
    """A backend's response (or interim) headers minus the hop-by-hop ones: the fixed set
    and those its Connection header names. Also whether they hold an X-Request-ID and a
    framing header (Content-Length or Transfer-Encoding, as received)."""
    out: Headers = []
    has_id = framed = False
    named: frozenset[bytes] = frozenset()
    kind_of = _RESPONSE_KIND_BY_RAW.get
    for item in headers:
        kind = kind_of(item[0])
        if kind is None:
            kind = response_header_kind(item[0])
        if kind != R_PLAIN:
            if kind == R_DROP:
                continue
            if kind == R_CONNECTION:
                named |= connection_tokens(item[1])
                continue
            if kind == R_REQUEST_ID:
                has_id = True
            else:
                framed = True
        out.append(item)
    if named:  # rare: headers the backend's Connection header made hop-by-hop
        out = [(n, v) for n, v in out if n.lower() not in named]
        has_id = any(n.lower() == b"x-request-id" for n, _ in out)
    return out, has_id, framed


class BodyTooLarge(Exception):
    pass


class ClientGone(ConnectionError):
    """The client closed its connection (or sent a broken body) while we were reading."""


class RequestBody(Protocol):
    """A request body as the server receives it. `chunk()` returns the next piece, b"" at the
    end; it raises `ClientGone` if the client leaves mid-body. The first call is what tells
    an `Expect: 100-continue` client to send (the server answers 100 then)."""

    length: int | None  # Content-Length, None when chunked

    async def chunk(self) -> bytes: ...


class ResponseSink(Protocol):
    """Where the proxy writes its answer. The headers given carry the message's framing
    header (Content-Length or Transfer-Encoding: chunked) where the backend had it, so a
    server that writes them as given adds nothing to the backend's message; a server that
    frames by itself (aiohttp) drops them and sets its own."""

    async def send(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        """A whole response; `headers` hold Content-Length: len(body)."""

    async def send_head(self, status: int, reason: str, headers: Headers) -> None:
        """A response without a body (HEAD, 204, 304), headers as given."""

    async def start(self, status: int, reason: str, headers: Headers, chunked: bool) -> None:
        """Begin a streamed response: chunked (`headers` hold Transfer-Encoding: chunked;
        to an HTTP/1.0 client the server sends it close-delimited instead) or of the length
        in the headers' Content-Length."""

    async def write(self, chunk: bytes) -> None:
        """One piece of a streamed body; waits while the client is slow to read."""

    async def end(self) -> None: ...

    def abort(self) -> None:
        """Cut the connection: the only honest signal once headers are out."""

    def interim(self, status: int, reason: str, headers: Headers) -> None:
        """A backend's interim (1xx) head, headers as received, before the final answer:
        written at once to an HTTP/1.1 client when `gateway.interim` says it goes on, else
        dropped (a server that cannot write interim heads drops them all). Never awaits:
        the upstream calls it from its protocol callbacks (`InterimReceiver`)."""


class ProxyRequest:
    """One request as the proxy sees it, whichever server received it."""

    __slots__ = ("method", "target", "headers", "body", "peer", "tls", "http11")

    def __init__(self, method: str, target: str, headers: Headers, body: RequestBody | None,
                 peer: str, tls: bool, http11: bool) -> None:
        self.method = method
        self.target = target  # path + query: latin-1 text of the client's exact bytes
        self.headers = headers
        self.body = body  # None: the request has no body
        self.peer = peer
        self.tls = tls
        self.http11 = http11


class Plan:
    """What `Proxy.plan` decided for one request: the route, the backend, the headers to
    forward (with X-Forwarded-* and X-Request-ID), the id and the sticky key."""

    __slots__ = ("route", "backend", "upstream", "headers", "rid", "request_id", "key", "path",
                 "started", "framed", "rules_at", "retried", "sampled", "ruled")
    route: CompiledRoute
    backend: Backend
    upstream: Upstream  # picked once: a request handed from the fast path keeps it
    headers: Headers
    rid: bytes
    request_id: str
    key: str | None
    path: str
    started: float
    framed: bool  # `headers` carry the client's Content-Length
    rules_at: int  # >= 0: the route's rules from this one on need the body (`body_rules`)
    retried: int  # what `resilience.retry.retry` did for it (RETRIED_URL | FELL_BACK)
    sampled: bool | None  # the route's body sample (`CompiledRoute.sampled`): False, no bodies
    ruled: bool  # a match rule chose the backend (kept out of the sequential test)


class Resume:
    """A request the fast path (gateway/server/fastpath.py) started and hands back to
    `Proxy.handle`: planned, and maybe sent with the response head in (`resp`)."""

    __slots__ = ("plan", "resp", "sent", "payload")

    def __init__(self, plan: Plan, resp: UpstreamResponse | None = None, sent: float = 0.0,
                 payload: bytes | None = None) -> None:
        self.plan = plan
        self.resp = resp
        self.sent = sent
        self.payload = payload


class Refusal:
    """The gateway's own answer to a request it will not forward (`Proxy.plan`)."""

    __slots__ = ("status", "code", "message", "request_id", "extra")

    def __init__(self, status: int, code: str, message: str, request_id: str,
                 extra: dict[str, object]) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.extra = extra


def error_body(status: int, code: str, message: str, request_id: str | None,
               **extra: object) -> tuple[Headers, bytes]:
    body: dict[str, object] = {"error": code, "message": message, **extra}
    headers: Headers = [_JSON]
    if request_id:
        body["request_id"] = request_id
        headers.append((REQUEST_ID, request_id.encode()))
    return headers, orjson.dumps(body)


_ID_PREFIX = os.urandom(6).hex()  # per process: ids stay unique across workers and replicas
_ID_PREFIX_BYTES = _ID_PREFIX.encode()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A unique id without a syscall per request: random process prefix + a counter."""
    return _new_rid().decode()


def _new_rid() -> bytes:
    return _ID_PREFIX_BYTES + b"%012x" % next(_id_counter)


def client_request_id(value: bytes | None) -> str | None:
    """The client's X-Request-ID if it is safe to log, echo and forward, else None."""
    if not value or len(value) > MAX_REQUEST_ID or not value.isascii():
        return None
    text = value.decode("ascii")
    return text if text.isprintable() else None


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Header names a `Connection` header makes hop-by-hop (beyond the fixed set).

    Nearly every message says just ``keep-alive`` or ``close``: answer that without a set."""
    if value in _PLAIN_CONNECTION:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(b",")) - _PLAIN_CONNECTION_TOKENS


def header_value(headers: Headers, lower_name: bytes) -> bytes | None:
    """The first value of a header (name given lower-case)."""
    n = len(lower_name)
    for name, value in headers:
        if len(name) == n and name.lower() == lower_name:
            return value
    return None


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


class Proxy:
    """The request handler behind the client-facing server.

    It gets only what it uses: the current routing table (replaced whole by the gateway on
    every state change), the recorder for in-flight gauges, and the access-log sample rate.
    """

    def __init__(self, recorder: Recorder, access_log_sample: float = 0.0,
                 trusted_proxies: Sequence[IPv4Network | IPv6Network] = ()) -> None:
        self.table = RoutingTable([])
        self.recorder = recorder
        self.in_flight = 0
        self.access_log_sample = access_log_sample
        # Peers whose X-Forwarded-* / Forwarded are kept (`trusted_proxies`, parsed by the
        # config); from any other peer they are dropped. Empty: no peer is even looked at.
        self.trusted_proxies = tuple(trusted_proxies)

    def trusts(self, peer: str) -> bool:
        """Whether `peer` (an address as text) is one of the `trusted_proxies`."""
        try:
            address = ip_address(peer)
        except ValueError:  # "unknown", a Unix socket
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_proxies)

    async def handle(self, request: ProxyRequest, sink: ResponseSink,
                     resume: Resume | None = None) -> None:
        """Answer one request into `sink`; a bug in the gateway is a JSON 500, never a
        traceback. Returns once the answer is written and the taps have run. `resume`: the
        fast path planned (and maybe sent) it already."""
        try:
            if resume is None:
                await self._proxy(request, sink)
            else:
                await self.forward(resume.plan, request, sink, resume.resp, resume.sent,
                                   resume.payload)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("proxy failed on %s %s", request.method, request.target)
            rid = client_request_id(header_value(request.headers, b"x-request-id"))
            headers, body = error_body(500, "internal_error", "the gateway failed; see its log",
                                       rid)
            headers.append((b"Content-Length", b"%d" % len(body)))
            await sink.send(500, "Internal Server Error", headers, body)

    async def _proxy(self, request: ProxyRequest, sink: ResponseSink) -> None:
        plan = self.plan(request)
        if type(plan) is Refusal:
            await _error(sink, plan.status, plan.code, plan.message, plan.request_id,
                         **plan.extra)
            return
        await self.forward(cast(Plan, plan), request, sink)

    def plan(self, request: ProxyRequest) -> Plan | Refusal:
        """Everything decided before the backend is called, without awaiting: the forwarded
        headers (one pass), the request id, the route and the backend; or the gateway's own
        answer (400 bad path, 404, 413 by Content-Length)."""
        started = time.perf_counter()
        # One pass over the headers: what is forwarded, and the few values we need. One dict
        # lookup per header name; a forwarded header keeps its (name, value) tuple.
        kind_of = _REQUEST_KIND_BY_RAW.get
        out: Headers = []
        append = out.append
        host: bytes | None = None
        rid_raw: bytes | None = None
        rid_at = -1
        connection: bytes | None = None
        forwarded_for: bytes | None = None
        has_proto = has_fhost = framed = False
        # A client's own forwarding headers are lies until a trusted proxy sent them.
        trusted = bool(self.trusted_proxies) and self.trusts(request.peer)
        for item in request.headers:
            kind = kind_of(item[0])
            if kind is None:
                kind = request_header_kind(item[0])
            if kind == _H_PLAIN:
                append(item)
                continue
            if kind == _H_DROP:
                continue
            if kind == _H_LENGTH:
                framed = True
                append(item)
                continue
            if kind == _H_HOST:
                host = item[1]
                continue
            if kind == _H_CONNECTION:
                value = item[1]
                connection = value if connection is None else connection + b"," + value
                continue
            if kind == _H_FORWARDED_FOR:  # several lines are one list: keep them all
                if trusted:
                    value = item[1]
                    forwarded_for = (value if forwarded_for is None
                                     else forwarded_for + b", " + value)
                continue
            if kind == _H_FORWARDED_PROTO:
                if not trusted:
                    continue
                has_proto = True
            elif kind == _H_FORWARDED_HOST:
                if not trusted:
                    continue
                has_fhost = True
            elif kind == _H_FORWARDED:
                if not trusted:
                    continue
            elif rid_at < 0:  # _H_REQUEST_ID
                rid_raw = item[1]
                rid_at = len(out)
            else:
                continue  # one id goes on: the one the client gets back
            append(item)
        if connection is not None and (extra := connection_tokens(connection)):
            out = [(n, v) for n, v in out if n.lower() not in extra]
            framed = framed and b"content-length" not in extra
            rid_at = next((i for i, (n, _) in enumerate(out) if n.lower() == b"x-request-id"),
                          -1)

        request_id = client_request_id(rid_raw) if rid_raw is not None else None
        if request_id is None:
            rid = _new_rid()
            request_id = rid.decode()
        else:
            rid = request_id.encode()
        target = request.target
        if target[:1] != "/":
            # Absolute-form (or authority-/asterisk-form): toward an origin server only
            # origin-form is allowed (RFC 9112 §3.2.1), and we are not a forward proxy.
            return Refusal(400, "bad_target", "the request target must be a path ('/...')",
                           request_id, {})
        if "#" in target:  # a fragment is the client's own business: never forwarded
            target = request.target = target[:target.index("#")]
        query_at = target.find("?")
        path = target if query_at < 0 else target[:query_at]
        host_text = host.decode("latin-1") if host is not None else None
        if ("/." in path or "%2" in path) and _has_dot_segment(unquote(path)):
            # We match "/public" on "/public/../internal" but the backend may resolve it to
            # "/internal": refuse rather than route on one path and serve another.
            return Refusal(400, "bad_path", "'.' and '..' path segments are not allowed",
                           request_id, {})
        route = self.table.match(host_text, path)
        if route is None:
            return Refusal(404, "no_route", f"no route matches {path}", request_id, {})

        body_in = request.body
        length = body_in.length if body_in is not None else None
        if length is not None and length > route.max_body:
            return Refusal(413, "body_too_large",
                           f"request body over the route's limit of {route.max_body} bytes",
                           request_id, {"route": route.name})

        key = _sticky_key(route, request.headers, target, query_at) if route.sticky else None
        override = None
        if route.override_name is not None:
            raw = header_value(request.headers, route.override_name)
            override = _text(raw) if raw is not None else None
        backend = route.pick(key, override)
        rules_at = -1
        ruled = False
        if route.rules is not None and backend.name != override:  # rules before the split
            hit = route.rules.pick(request.headers, target, query_at)
            if isinstance(hit, int):
                rules_at = hit
            elif hit is not None:
                backend = hit
                ruled = True

        peer = request.peer.encode()
        out.append((b"X-Forwarded-For",
                    forwarded_for + b", " + peer if forwarded_for is not None else peer))
        if not has_proto:
            out.append((b"X-Forwarded-Proto", b"https" if request.tls else b"http"))
        if not has_fhost and host:
            out.append((b"X-Forwarded-Host", host))
        if rid_at >= 0:
            out[rid_at] = (out[rid_at][0], rid)  # an empty or unusable one was replaced
        else:
            out.append((REQUEST_ID, rid))

        plan = Plan()
        plan.route = route
        plan.backend = backend
        plan.upstream = backend.upstream()
        plan.headers = out
        plan.rid = rid
        plan.request_id = request_id
        plan.key = key
        plan.path = path
        plan.started = started
        plan.framed = framed
        plan.rules_at = rules_at
        plan.retried = 0
        plan.ruled = ruled
        plan.sampled = route.sampled(key) if route.body_sample is not None else None
        return plan

    @staticmethod
    def body_rules(plan: Plan, request: ProxyRequest, body: bytes | None) -> None:
        """The route's rules from `plan.rules_at` on, now that the whole body is read."""
        rules = plan.route.rules
        at, plan.rules_at = plan.rules_at, -1
        if rules is None:
            return
        target = request.target
        hit = rules.pick(request.headers, target, target.find("?"), body, at)
        if hit is not None and not isinstance(hit, int):
            plan.backend = hit
            plan.upstream = hit.upstream()
            plan.ruled = True

    async def forward(self, plan: Plan, request: ProxyRequest, sink: ResponseSink,
                      resp: UpstreamResponse | None = None, sent: float = 0.0,
                      payload: bytes | None = None) -> None:
        """Call the backend as planned and write its answer; then the bookkeeping and taps.

        With `resp`, the backend was already called (by the fast path, with `payload` as the
        body, at `sent`) and its response head is in: only the answer is left to stream."""
        route = plan.route
        rid = plan.rid
        request_id = plan.request_id
        body_in = request.body
        length = body_in.length if body_in is not None else None
        body: bytes | AsyncIterator[bytes] | None
        too_large: list[bool] = []
        gone: list[bool] = []
        if resp is not None:
            # The fast path's exchange handed on with its head in: it is counted already
            # (gates, in-flight) and stays counted, so nothing can slip in over a limit.
            body = payload
        else:
            if body_in is None:
                body = None
            elif (route.needs_request_body and plan.sampled is not False) or (
                length is not None and length <= BUFFER_REQUEST_UP_TO
            ):
                # A buffered body is read before the request is admitted: a client trickling
                # its body holds no concurrency slot, and body rules decide the backend first.
                try:
                    body = await _read_body(body_in, route.max_body)
                except BodyTooLarge:
                    await _too_large(sink, route, request_id)
                    self.finished(plan, request, 413, None)
                    return
                except ConnectionError:
                    self.finished(plan, request, 0, None, True)
                    raise
            else:
                body = _stream_body(body_in, route.max_body, too_large, gone)
            if plan.rules_at >= 0:  # rules on the body (the route buffers it: bytes or None)
                self.body_rules(plan, request, body if isinstance(body, bytes) else None)
            backend = plan.backend
            if (route.gate is not None or backend.gate is not None) and (
                    full := admit(route.gate, backend.gate)) is not None:
                await _overloaded(sink, route, backend, full, request_id)
                return
            rec_in_flight = self.recorder.in_flight
            self.in_flight += 1
            rec_in_flight[route.name] = rec_in_flight.get(route.name, 0) + 1
        backend = plan.backend
        stats = backend.stats
        status = 0  # 0 until known: a failure of the gateway itself is not the backend's
        exchange: Exchange | None = None
        aborted = False  # the client left before the backend's answer began
        counted = True  # in the backend's numbers (gates, alarms)
        try:
            if resp is None:
                sent = time.perf_counter()
                try:
                    resp = await self._send(plan, request, sink, body, length, too_large,
                                            gone)
                except ValueError:
                    # Header bytes the upstream client cannot write (CR/LF, or invalid UTF-8
                    # through aiohttp's client): the client's request is at fault.
                    status = 400
                    await _error(sink, 400, "bad_header",
                                 "a request header cannot be forwarded", request_id,
                                 route=route.name)
                    return
                except (UpstreamError, BodyTooLarge) as exc:
                    if gone:  # our body iterator's ClientGone, as the upstream reports it
                        raise ClientGone("the client left while sending its body") from exc
                    # An upstream may let our own body iterator's BodyTooLarge through
                    # untranslated.
                    if too_large or not isinstance(exc, UpstreamError):
                        status = 413
                        await _too_large(sink, route, request_id)
                        return
                    backend = plan.backend  # live, when the canary's failure fell back
                    stats = backend.stats
                    if isinstance(exc, UpstreamPoolTimeout):
                        # Our own queue, not the backend: no backend error, no 5xx for
                        # gates and alarms (not `counted`), its own counter instead.
                        status = 503
                        counted = False
                        self.recorder.pool_timeout(route.name, backend.name)
                        log.warning("route %s: %s", route.name, exc)
                        await _error(sink, 503, "upstream_busy",
                                     f"backend {backend.name!r}: no connection free",
                                     request_id, route=route.name, backend=backend.name)
                        return
                    status = exc.status
                    stats.upstream_error(exc.kind)
                    log.warning("upstream %s of route %s failed: %s", backend.name, route.name,
                                exc)
                    code = "upstream_timeout" if status == 504 else "upstream_unavailable"
                    await _error(sink, status, code, f"backend {backend.name!r}: {exc.kind}",
                                 request_id, route=route.name, backend=backend.name)
                    return
                backend = plan.backend
                stats = backend.stats
                stats.upstream_time(time.perf_counter() - sent)
            status = resp.status
            if route.taps:
                exchange = self.exchange(plan, request, status, resp.headers,
                                         body if isinstance(body, bytes) else None)
            failure = await self._respond(request, sink, route, resp, rid, exchange, stats,
                                          sent)
            if failure is not None:  # the backend broke mid-body: an error for gates/alarms
                status = failure.status
                stats.upstream_error(failure.kind)
                if exchange is not None:
                    exchange.status = status
        except ConnectionError:
            # Gone before the backend answered (mid-upload, typically): not the backend's
            # error, whatever the upstream made of the cut-off body.
            aborted = status == 0
            raise
        finally:
            # The client has its answer (or is gone): only now the bookkeeping and the taps.
            self.in_flight -= 1
            self.recorder.in_flight[route.name] -= 1
            if route.gate is not None or plan.backend.gate is not None:
                leave(route.gate, plan.backend.gate)
            self.finished(plan, request, status, exchange, aborted, counted)

    async def _send(self, plan: Plan, request: ProxyRequest, sink: ResponseSink,
                    body: bytes | AsyncIterator[bytes] | None, length: int | None,
                    too_large: list[bool], gone: list[bool]) -> UpstreamResponse:
        """`plan.upstream.send`, with the retries `retry` allows when the body can be sent
        again (`plan` then names the backend and URL that answered). `too_large` and `gone`
        are the streamed body's own failures (`_stream_body`). The backend's interim heads
        go to `sink` (an HTTP/1.0 client gets none): a retried or fallen-back request may
        have passed on one of the first URL's hints, harmless since a hint is advisory."""
        route = plan.route
        interim = sink if request.http11 else None
        while True:
            upstream = plan.upstream
            backend = plan.backend
            try:
                resp = await upstream.send(request.method, request.target, plan.headers, body,
                                           route.timeouts, length, interim)
            except UpstreamError as exc:
                if gone or too_large or isinstance(exc, UpstreamPoolTimeout):
                    # The client's doing (left mid-upload, body over the limit) or our own
                    # full pool: nothing the URL did, so no outlier report and no retry.
                    raise
                backend.report_failure(upstream, exc.kind)
                if not isinstance(body, bytes | None) or not retry(
                        plan, exc.status, exc.kind, may_resend(plan, request.method, exc),
                        may_fall_back(plan, request.method, exc)):
                    raise
                log.info("retrying %s of route %s on %s after %s", plan.request_id,
                         route.name, plan.upstream.origin, exc)
                continue
            status = resp.status
            backend.report(upstream, status)
            if (status == 503 and route.fallback and backend is route.canary
                    and isinstance(body, bytes | None) and retry(plan, 503, "", False, True)):
                await _discard(resp)
                continue
            return resp

    @staticmethod
    def exchange(plan: Plan, request: ProxyRequest, status: int, response_headers: Headers,
                 body: bytes | None) -> Exchange:
        """What the route's taps will see of this request (the response body comes later)."""
        exchange = Exchange()
        exchange.route = plan.route.name
        exchange.backend = plan.backend.name
        exchange.request_id = plan.request_id
        exchange.method = request.method
        exchange.target = request.target
        exchange.request_headers = plan.headers
        exchange.request_body = body
        exchange.sticky_key = plan.key
        exchange.status = status
        exchange.started = plan.started
        exchange.response_headers = response_headers
        exchange.sampled = plan.sampled
        return exchange

    def finished(self, plan: Plan, request: ProxyRequest, status: int,
                 exchange: Exchange | None, aborted: bool = False,
                 counted: bool = True) -> None:
        """The client has its answer (or is gone): metrics, taps, the sampled access log.
        `aborted`: the client left before the answer began (logged as 499). `counted`: False
        for the gateway's own answer that is none of the backend's doing (503 upstream_busy):
        logged, not in the backend's numbers."""
        latency = time.perf_counter() - plan.started
        route = plan.route
        if aborted:
            aborts = self.recorder.client_aborts
            aborts[route.name] = aborts.get(route.name, 0) + 1
        if status and counted:
            backend = plan.backend
            backend.stats.observe(status, latency)
            if plan.ruled:
                backend.stats.add_many(((RULED_REQUESTS, 1.0),
                                        (RULED_ERRORS, 1.0 if status >= 500 else 0.0)))
        if exchange is not None:
            exchange.latency = latency
            for tap in route.taps:
                try:
                    tap(exchange)
                except Exception:
                    log.exception("tap failed on route %s", route.name)
        if self.access_log_sample and random.random() < self.access_log_sample:
            access_log.info(
                "request", extra={"request_id": plan.request_id, "route": route.name,
                                  "backend": plan.backend.name,
                                  "status": 499 if aborted else status,
                                  "latency_ms": round(latency * 1000, 3),
                                  "method": request.method, "path": plan.path},
            )

    @staticmethod
    def _response_headers(resp: UpstreamResponse, rid: bytes) -> tuple[Headers, bool]:
        """The backend's headers minus hop-by-hop ones, plus our X-Request-ID; and whether
        they hold a framing header (Content-Length or Transfer-Encoding)."""
        out, has_id, framed = end_to_end_headers(resp.headers)
        if not has_id:
            out.append((REQUEST_ID, rid))
        return out, framed

    async def _respond(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        route: CompiledRoute,
        resp: UpstreamResponse,
        rid: bytes,
        exchange: Exchange | None,
        stats: BackendStats,
        sent: float,
    ) -> UpstreamError | None:
        """Write the client's response; the backend's failure if its body broke off. A
        chunked answer is measured as it passes (gateway/streaming.py), from `sent`."""
        headers, framed = self._response_headers(resp, rid)
        if request.method == "HEAD" or resp.status in _NO_BODY_STATUS:
            if request.method == "HEAD":
                resp.close()
            else:
                await resp.read()
            await sink.send_head(resp.status, resp.reason, headers)
            return None
        length = resp.content_length
        if length is not None and length <= BUFFER_RESPONSE_UP_TO:
            try:
                body = await resp.read()
            except UpstreamError as exc:
                code = "upstream_timeout" if exc.status == 504 else "upstream_unavailable"
                await _error(sink, exc.status, code,
                             f"backend failed while sending its body: {exc.kind}",
                             rid.decode(), route=route.name)
                return exc
            if exchange is not None:
                exchange.response_body = body
            await sink.send(resp.status, resp.reason, headers, body)
            return None

        chunked = length is None
        if not framed:  # close-delimited from the backend: chunked to the client
            headers.append((b"Transfer-Encoding", b"chunked"))
        capture: list[bytes] | None = (
            [] if exchange is not None and route.needs_response_body
            and exchange.sampled is not False else None
        )
        captured = 0
        # Chunked answers (token streams) are measured; a meter only looks at a chunk after
        # it was written, so it never delays one.
        meter = (StreamMeter(stats.stream, stats, sent, is_event_stream(resp.headers))
                 if chunked else None)
        try:
            await sink.start(resp.status, resp.reason, headers, chunked)
            async for chunk in resp.iter_chunks():
                if meter is None:
                    await sink.write(chunk)
                else:
                    arrived = time.perf_counter()
                    await sink.write(chunk)
                    meter.chunk(chunk, arrived)
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
            sink.abort()
            return exc
        except BaseException:
            resp.close()  # the client went away (or we were cancelled): drop the backend too
            raise
        finally:
            if meter is not None:
                meter.finish()
        await sink.end()
        if capture is not None and exchange is not None:
            exchange.response_body = b"".join(capture)
        return None


def error_response(status: int, code: str, message: str, request_id: str | None,
                   **extra: object) -> tuple[str, Headers, bytes]:
    """The gateway's own JSON answer: reason, headers (with Content-Length), body."""
    headers, body = error_body(status, code, message, request_id, **extra)
    headers.append((b"Content-Length", b"%d" % len(body)))
    return _REASONS.get(status, ""), headers, body


async def _error(sink: ResponseSink, status: int, code: str, message: str,
                 request_id: str | None, **extra: object) -> None:
    reason, headers, body = error_response(status, code, message, request_id, **extra)
    await sink.send(status, reason, headers, body)


async def _discard(resp: UpstreamResponse) -> None:
    """Drop a response the client will not see: read a small one (its connection is
    reused), close anything else."""
    length = resp.content_length
    if length is not None and length <= BUFFER_RESPONSE_UP_TO:
        try:
            await resp.read()
            return
        except UpstreamError:
            pass
    resp.close()


def overloaded_response(route: CompiledRoute, backend: Backend, full: Gate,
                        request_id: str | None) -> tuple[str, Headers, bytes]:
    """503 at once over a concurrency limit (`limits.max_concurrency`), with Retry-After."""
    scope = "route" if full is route.gate else "backend"
    reason, headers, body = error_response(
        503, "overloaded", f"over the {scope}'s concurrency limit of {full.limit}; retry later",
        request_id, route=route.name, backend=backend.name, scope=scope)
    headers.append((b"Retry-After", full.retry_after_header))
    return reason, headers, body


async def _overloaded(sink: ResponseSink, route: CompiledRoute, backend: Backend, full: Gate,
                      request_id: str) -> None:
    reason, headers, body = overloaded_response(route, backend, full, request_id)
    await sink.send(503, reason, headers, body)


async def _too_large(sink: ResponseSink, route: CompiledRoute, request_id: str) -> None:
    await _error(sink, 413, "body_too_large",
                 f"request body over the route's limit of {route.max_body} bytes",
                 request_id, route=route.name)


_REASONS = {400: "Bad Request", 404: "Not Found", 413: "Request Entity Too Large",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def _sticky_key(route: CompiledRoute, headers: Headers, target: str, query_at: int) -> str | None:
    sticky = route.sticky
    assert sticky is not None
    if sticky.source == "header":
        raw = header_value(headers, route.sticky_name)
        return _text(raw) if raw else None
    if sticky.source == "query":
        if query_at < 0:
            return None
        for name, value in parse_qsl(target[query_at + 1:], keep_blank_values=True):
            if name == sticky.name:
                return value or None
        return None
    raw = header_value(headers, b"cookie")
    return cookie_value(_text(raw), sticky.name) if raw else None


def _has_dot_segment(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/"))


async def _read_body(body: RequestBody, limit: int) -> bytes:
    first = await body.chunk()
    if not first:
        return b""
    size = len(first)
    if size > limit:
        raise BodyTooLarge
    if size == body.length:
        return first  # all of a body of known length: no call for the end
    parts = [first]
    while chunk := await body.chunk():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
    return first if len(parts) == 1 else b"".join(parts)


async def _stream_body(body: RequestBody, limit: int, too_large: list[bool], gone: list[bool]
                       ) -> AsyncIterator[bytes]:
    size = 0
    while True:
        try:
            chunk = await body.chunk()
        except ConnectionError:  # ClientGone, or the server's own word for it
            gone.append(True)  # the upstream may wrap it: `forward` must know it was ours
            raise
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            too_large.append(True)
            raise BodyTooLarge
        yield chunk
