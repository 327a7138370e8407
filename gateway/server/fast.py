"""The fast proxy server: an asyncio Protocol per connection, httptools' request parser.

Why it exists: aiohttp's server machinery was about half the gateway's CPU per request
(/work/shared/PERF-NOTES.md). This is the server-side counterpart of the upstream pool
(gateway/upstream/fastpool.py): bytes in, `ProxyRequest` out, headers as bytes throughout.

How it is put together:

- `_Connection` is one client socket and the httptools callback object. Parsed requests go
  on a short queue; one task per connection at a time runs them through `Proxy.handle` in
  order (pipelining is answered in order) and exits when the queue is empty, so an idle
  keep-alive connection owns no task. The connection is also the `ResponseSink` of the
  request being answered: writes go straight to the transport, so a buffered answer is on
  the wire before the proxy runs its taps.
- The common exchange skips the Task: a request received whole in one read, on a connection
  with nothing else to answer, goes to `fastpath.answer` from `on_message_complete`, which
  answers it from the backend connection's callbacks when it can (see gateway/server/
  fastpath.py) and otherwise hands it back (`resume`) to the Task, with what it decided.
- Limits are checked in the parser callbacks: request target (414), header count and bytes
  (431); the route's body limit is the proxy's (413, counted while streaming).
- Flow control both ways. Reading: a request body waiting for its consumer (the proxy,
  which waits for the backend to take it) beyond `BODY_HIGH`, or more than `MAX_PIPELINED`
  queued requests, pause the socket. Writing: when the transport's buffer is full, `write()`
  waits for `resume_writing`, so the upstream response is not read (fastpool then pauses
  the backend's socket).
- No timer per request: every connection keeps a `deadline` (header-read, keep-alive idle,
  body silence, or a client not reading our answer) and one sweep task per server closes the
  connections whose deadline has passed, every `SWEEP_INTERVAL`.
- Graceful stop: listeners close, idle connections close, busy ones close after their
  current answer; what remains after the timeout is aborted and its task cancelled and
  awaited.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections import deque
from collections.abc import Sequence
from typing import cast

import httptools
import orjson

from gateway.config import ServerConfig
from gateway.interim import interim_headers
from gateway.proxy import (
    _PLAIN_CONNECTION,
    _RESPONSE_KIND_BY_RAW,
    BUFFER_REQUEST_UP_TO,
    R_CONNECTION,
    R_FRAMING,
    R_PLAIN,
    R_REQUEST_ID,
    ClientGone,
    Proxy,
    ProxyRequest,
    Resume,
    response_header_kind,
)
from gateway.server import fastpath
from gateway.server.limits import REFUSED, ConnectionLimit
from gateway.server.tls import tls_context
from gateway.upstream import Headers

log = logging.getLogger("modelgate.server")

BODY_HIGH = 256 * 1024  # pause reading when this much request body waits for the proxy
MAX_PIPELINED = 16  # parsed requests waiting for their turn before reading pauses
LINGER = 2.0  # seconds a rejected client may still send before its connection is closed
DISCARD_MAX = 16 * 1024 * 1024  # unread request body swallowed (like nginx lingering close)
SWEEP_INTERVAL = 0.5  # timeout resolution
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})
_CLOSE = b"Connection: close"
# Header name lengths the parser callback looks at: content-length, transfer-encoding,
# expect, connection.
_SPECIAL_LENGTHS = frozenset({14, 17, 6, 10})
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
_KEEP_ALIVE = b"Connection: keep-alive"


# Status lines by (status, reason), as backends repeat them: a lookup instead of formatting
# one per answer. Bounded: reasons are the backend's.
_STATUS_LINES: dict[tuple[int, str], bytes] = {}
STATUS_LINES_MAX = 512


def _status_line(status: int, reason: str) -> bytes:
    """b"HTTP/1.1 <status> <reason>" (no CRLF), cached. (`answer_backend`, once a request,
    looks in `_STATUS_LINES` itself first and saves this call.)"""
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %s" % (status, reason.encode("latin-1", "replace"))
        if len(_STATUS_LINES) < STATUS_LINES_MAX:
            _STATUS_LINES[(status, reason)] = line
    return line


class _Reject(Exception):
    """Raised in a parser callback: answer `status` and close."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


_REJECT_REASON = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long",
                  431: b"Request Header Fields Too Large", 505: b"HTTP Version Not Supported"}


class _Body:
    """The body of one request, as the client sends it (the proxy's `RequestBody`)."""

    __slots__ = ("conn", "length", "expect", "chunks", "buffered", "done", "gone", "waiter")

    def __init__(self, conn: _Connection, length: int | None, expect: bool) -> None:
        self.conn = conn
        self.length = length
        self.expect = expect  # the client waits for 100 Continue before sending
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.done = False
        self.gone = False
        self.waiter: asyncio.Future[None] | None = None

    async def chunk(self) -> bytes:
        chunks = self.chunks
        conn = self.conn
        while True:
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                if conn.reading_paused:
                    conn.update_reading()
                return data
            if self.done:
                return b""
            if self.gone:
                raise ClientGone("the client left while sending its body")
            if self.expect:
                self.expect = False
                conn.send_continue()
            waiter = self.waiter = conn.loop.create_future()
            conn.deadline = conn.loop.time() + conn.config.body_timeout
            try:
                await waiter
            finally:
                self.waiter = None
                conn.deadline = 0.0

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self) -> None:
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.waiter is not None:
            self.conn.deadline = self.conn.loop.time() + self.conn.config.body_timeout


class _Connection(asyncio.Protocol):
    """One client connection: parser callbacks, request queue, and the response sink."""

    __slots__ = (
        "server", "proxy", "config", "loop", "transport", "parser", "peer", "tls", "closed",
        "deadline", "reading_paused", "read_no_more", "queue", "task", "closing", "in_headers",
        "_url", "_headers", "_header_bytes", "_count_bytes", "_length", "_chunked", "_expect",
        "_body", "_connection_header", "_write_paused", "_drain_waiter", "_out_chunked",
        "_out_keep_alive", "_out_http11", "_head_only", "_discarding", "_discarded", "_answering",
        "_msg_keep_alive", "_pending", "fast", "_lingering", "serial",
    )

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.proxy = server.proxy
        self.config = server.config
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = "unknown"
        self.tls = server.tls is not None
        self.closed = False
        self.deadline = 0.0  # 0: not waiting on the client
        self.reading_paused = False
        self.read_no_more = False  # the client asked to close: what it sent next is not read
        self.queue: deque[tuple[ProxyRequest, bool, Resume | None]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closing = False  # close once the current answer is written
        self.in_headers = False
        self._url = b""
        self._headers: Headers = []
        self._header_bytes = 0
        self._count_bytes = False  # on_header must count header bytes (see data_received)
        self._length: int | None = None
        self._chunked = False
        self._expect = False
        self._body: _Body | None = None  # the body being received
        self._connection_header = False  # the request has a Connection header
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._out_chunked = False
        self._out_keep_alive = True
        self._out_http11 = True
        self._head_only = False
        self._discarding = False
        self._discarded = 0
        self._answering: ProxyRequest | None = None
        self._msg_keep_alive = True
        # A request that may take the fast path once its message completes in this read.
        self._pending: tuple[ProxyRequest, bool] | None = None
        self.fast: fastpath.FastExchange | None = None  # the fast-path exchange in flight
        self._lingering = False  # our last answer is out: what still comes is swallowed
        self.serial = next(server.serials)  # accept order: the oldest idle one is evicted

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = str(peer[0])
        elif peer:
            self.peer = str(peer)
        connections = self.server.connections
        if not self.server.limit.admit(len(connections), self.server.evict_idle):
            self.closed = True  # over the cap: refused before reading anything
            self.transport.write(REFUSED)
            self.transport.close()
            return
        connections.add(self)
        self.deadline = self.loop.time() + self.config.header_timeout
        if self.server.stopping:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline = 0.0
        self.server.connections.discard(self)
        body = self._body
        if body is not None:
            body.fail()
        for request, _, _ in self.queue:
            if request.body is not None:
                cast(_Body, request.body).fail()
        self._drop_queue()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the writer sees `closed` and stops

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._lingering:
            self._discarded += len(data)
            if self._discarded > DISCARD_MAX:
                self._close()
            return
        # The header byte limit: a head that begins and ends within one read of at most that
        # many bytes is within it, so on_header counts only for a bigger read or a head
        # continued from an earlier read (then from what that read brought).
        if self.in_headers:
            if not self._count_bytes:
                self._header_bytes = sum(len(n) + len(v) for n, v in self._headers)
            self._count_bytes = True
        else:
            self._count_bytes = len(data) > self.config.max_header_bytes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We speak HTTP/1.1 only: the request was queued as a plain one (Upgrade is
            # hop-by-hop and not forwarded); what follows it is another protocol, so read no
            # further and close after the answer.
            self._stop_reading()
        except httptools.HttpParserCallbackError as exc:
            reject = exc.__context__
            if isinstance(reject, _Reject):
                self._reject(reject.status, reject.code, str(reject))
            else:
                log.error("parser callback failed", exc_info=reject)
                self._reject(400, "bad_request", "the request could not be parsed")
        except httptools.HttpParserInvalidMethodError:
            self._reject(400, "bad_request", "invalid method")
        except httptools.HttpParserError as exc:
            # Neither the answer nor the INFO log quotes the client's bytes: a malformed
            # line may carry a credential. The parser's reason goes to DEBUG only.
            log.debug("malformed request from %s: %s", self.peer, exc)
            self._reject(400, "bad_request", "malformed request")
        pending = self._pending
        if pending is not None:
            # Its body did not all come in this read: the Task path, as for any streamed body.
            self._pending = None
            if not self.closed:
                self.resume(pending[0], pending[1], None)

    def eof_received(self) -> bool | None:
        if self._lingering:
            return None  # the client read our last answer and closed: close too
        # The client half-closed: finish what was asked (its answers still go out), then close.
        body = self._body
        if body is not None:  # ... but a body cut off here will never be whole: it left
            body.fail()
        if self.task is None and not self.queue and self.fast is None:
            return None  # transport closes
        self.closing = True
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_headers = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._length = None
        self._chunked = False
        self._expect = False
        self._connection_header = False
        self.deadline = self.loop.time() + self.config.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.config.max_request_line:
            raise _Reject(414, "uri_too_long", "request target over "
                          f"{self.config.max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The line count is checked once the head is in (on_headers_complete): the byte limit
        # bounds it meanwhile (every line has a name).
        self._headers.append((name, value))
        if self._count_bytes:
            self._header_bytes += len(name) + len(value)
            if self._header_bytes > self.config.max_header_bytes:
                raise _Reject(431, "headers_too_large",
                              f"headers over {self.config.max_header_bytes} bytes")
        n = len(name)
        if n in _SPECIAL_LENGTHS:
            lower = name.lower()
            if lower == b"connection":
                self._connection_header = True
            elif lower == b"content-length":
                self._length = int(value)  # llhttp checked the digits and any conflict
            elif lower == b"transfer-encoding":
                self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif lower == b"expect":
                self._expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        if len(self._headers) > self.config.max_headers:
            raise _Reject(431, "too_many_headers",
                          f"more than {self.config.max_headers} header lines")
        self.in_headers = False
        self.deadline = 0.0
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        # Keep-alive without a Connection header is HTTP/1.1's default (1.0 needs the header):
        # the version string (formatted by httptools on each call) only when that can't tell.
        http11 = ((keep_alive and not self._connection_header)
                  or parser.get_http_version() != "1.0")
        length = self._length
        body: _Body | None = None
        if self._chunked or (length is not None and length > 0):
            body = _Body(self, None if self._chunked else length, self._expect and http11)
        elif length == 0:
            body = _Body(self, 0, False)
            body.done = True
        self._body = body
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        keep_alive = self._msg_keep_alive = keep_alive and not self.closing
        request = ProxyRequest(method, self._url.decode("latin-1"), self._headers, body,
                               self.peer, self.tls, http11)
        if (self.task is None and self.fast is None and not self.queue
                and not self._write_paused and method != "HEAD"
                and (body is None or (not self._chunked and not self._expect
                                      and length is not None and length <= BUFFER_REQUEST_UP_TO))
                and not parser.should_upgrade()):
            self._pending = (request, keep_alive)  # decided in on_message_complete
            return
        self.queue.append((request, keep_alive, None))
        if self.task is None and self.fast is None:
            self.task = self.loop.create_task(self._run())
        elif len(self.queue) >= MAX_PIPELINED:
            self.update_reading()

    def on_body(self, data: bytes) -> None:
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > DISCARD_MAX:
                self._close()
            return
        body = self._body
        if body is None:
            return
        body.feed(data)
        if body.buffered > BODY_HIGH and not self.reading_paused:
            self.update_reading()

    def on_message_complete(self) -> None:
        body = self._body
        self._body = None
        if self._discarding:
            self._discarding = False
            self._close()  # the answer is out; this was only to let the client read it
            return
        if body is not None:
            body.finish()
        if not self._msg_keep_alive:
            # The last request asked to close: read nothing more, but answer the ones before
            # it first (its own answer closes the connection: keep_alive False).
            self._pause_for_good()
        pending = self._pending
        if pending is not None:
            self._pending = None
            fastpath.answer(self, self.proxy, pending[0], pending[1])

    # -- the request loop --------------------------------------------------------------------

    async def _run(self) -> None:
        proxy = self.proxy
        queue = self.queue
        try:
            while queue and not self.closed:
                request, keep_alive, resume = queue.popleft()
                if self.reading_paused:
                    self.update_reading()
                self.begin_answer(request, keep_alive)
                try:
                    await proxy.handle(request, self, resume)
                except ConnectionError:
                    self._close(abort=True)
                    return
                except Exception:  # handle() answers its own failures: this is a bug
                    log.exception("answering %s %s failed", request.method, request.target)
                    self._close(abort=True)
                    return
                finally:
                    self._answering = None
                if not self._out_keep_alive or self.closed:
                    self._after_last(request)
                    return
                body = cast(_Body | None, request.body)
                if body is not None and not body.done:
                    # Answered before its body was read (404, 413...): the connection can
                    # only be reused once the rest has been read, so it closes after that.
                    self._after_last(request)
                    return
            if self.closing:
                self._close()  # half-closed by the client, or the server is stopping
            elif not self.closed and not self.in_headers and self._body is None:
                self.deadline = self.loop.time() + self.config.keepalive_timeout
        finally:
            self.task = None
            if self.closed:
                self._drop_queue()

    def _drop_queue(self) -> None:
        """Forget the requests still queued; a backend response handed over by the fast path
        is closed, so its backend connection is not held (paused, no deadline) for ever."""
        for request, _, resume in self.queue:
            fastpath.abandon(self.proxy, request, resume)
        self.queue.clear()

    # -- the fast path's side (gateway/server/fastpath.py) --------------------------------

    def begin_answer(self, request: ProxyRequest, keep_alive: bool) -> None:
        self._answering = request
        self._out_keep_alive = keep_alive and not self.closing
        self._out_http11 = request.http11
        self._head_only = request.method == "HEAD"
        self._out_chunked = False

    def resume(self, request: ProxyRequest, keep_alive: bool, resume: Resume | None) -> None:
        """Answer `request` in the Task after all, first in line."""
        self.fast = None
        if self.closed:  # the client left meanwhile: nobody to answer
            fastpath.abandon(self.proxy, request, resume)
            return
        self.queue.appendleft((request, keep_alive, resume))
        if self.task is None:
            self.task = self.loop.create_task(self._run())

    def fast_done(self, request: ProxyRequest) -> None:
        """The fast path wrote its answer: what `_run` does after each answer."""
        self.fast = None
        self._answering = None
        if not self._out_keep_alive or self.closed:
            self._after_last(request)
        elif self.queue:
            self.task = self.loop.create_task(self._run())  # pipelined requests wait
        elif self.closing:
            self._close()
        elif not self.in_headers and self._body is None:
            self.deadline = self.loop.time() + self.config.keepalive_timeout

    def _after_last(self, request: ProxyRequest) -> None:
        """The connection ends after this answer."""
        self._drop_queue()
        body = cast(_Body | None, request.body)
        if (body is not None and not body.done and not body.gone and not body.expect
                and not self.closed and self._body is body):
            # The client is still sending a body we will not read. Closing now with unread
            # bytes would reset the connection and could destroy the answer on its way:
            # swallow the rest (bounded), then close.
            self._discarding = True
            self._discarded = body.buffered
            body.chunks.clear()
            self.deadline = self.loop.time() + self.config.body_timeout
            if self.reading_paused:
                self.reading_paused = False
                if self.transport is not None:
                    self.transport.resume_reading()
            return
        self._close()

    # -- flow control and closing ---------------------------------------------------------

    def update_reading(self) -> None:
        """Pause or resume reading the socket: bounded buffers for bodies and pipelines."""
        body = self._body
        pause = (len(self.queue) >= MAX_PIPELINED
                 or (body is not None and body.buffered > BODY_HIGH))
        transport = self.transport
        if transport is None or self.closed or self.read_no_more or pause == self.reading_paused:
            return
        self.reading_paused = pause
        if pause:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _stop_reading(self) -> None:
        """Read no more and close once the answers in flight are out."""
        self.closing = True
        self._pause_for_good()

    def _pause_for_good(self) -> None:
        self.read_no_more = True
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def send_continue(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(_CONTINUE)

    def _close(self, abort: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self.deadline = 0.0
            transport = self.transport
            if transport is not None:
                if abort:
                    transport.abort()
                else:
                    transport.close()

    def _reject(self, status: int, code: str, message: str) -> None:
        """A request we cannot parse or accept: answer it and close (`message` must not
        quote the client's bytes). With earlier requests still being answered (one may
        already be at the backend), read no further and close after their answers: dropping
        them would lose a POST's result."""
        log.info("rejected a request from %s: %d %s", self.peer, status, code)
        broken = self._body
        if broken is not None and not broken.done:
            # A body broken mid-way (bad chunk framing) will never be whole: its request
            # ends as an aborted upload (the client's fault), the ones before it are answered.
            self._body = None
            broken.fail()
        if (self.task is not None or self.queue or self.fast is not None
                or self._pending is not None):
            self._stop_reading()
            return
        if not self.closed and self.transport:
            body = orjson.dumps({"error": code, "message": message})
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, _REJECT_REASON.get(status, b""),
                                                  len(body), body))
        self._linger()

    def _linger(self) -> None:
        """Close once the client can have read our last answer. Closing with its bytes
        unread would reset the connection and could destroy the answer on its way: half-close,
        swallow what still comes (bounded), close on its EOF or after LINGER seconds (nginx's
        lingering close)."""
        transport = self.transport
        if self.closed or transport is None or not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        self._lingering = True
        self._discarded = 0
        self.deadline = self.loop.time() + LINGER
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def timed_out(self) -> None:
        """The sweep found the deadline passed."""
        if self._lingering:
            self._close()
            return
        limit = self.server.limit
        if self.in_headers and self.task is None and not self.queue and self.fast is None:
            limit.timed_out("header")
            self._reject(408, "request_timeout", "the request head took too long")
            return
        body = self._body
        if self._drain_waiter is not None:
            limit.timed_out("write")
        elif body is not None and body.waiter is not None:
            limit.timed_out("body")
        if body is not None:
            body.fail()
        self._close(abort=self._drain_waiter is not None)

    def shutdown(self) -> None:
        """The server is stopping: close now if idle, else after the current answer."""
        self.closing = True
        if self.task is None and not self.queue and not self.in_headers and self.fast is None:
            self._close()

    # -- ResponseSink (of the request being answered) -----------------------------------------

    def _head(self, status: int, reason: str, headers: Headers, framing: bytes) -> bytes:
        parts = [_status_line(status, reason), b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if framing:
            parts.append(framing)
        connection = self._connection_line()
        if connection:
            parts += (connection, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _connection_line(self) -> bytes:
        """The answer's Connection header line (without CRLF), or b"" when none is due."""
        answering = self._answering
        if (not self._out_keep_alive or self.closing or answering is not None
                and answering.body is not None and not cast(_Body, answering.body).done):
            # Closing after this answer: say so (a body we did not read ends the connection).
            self._out_keep_alive = False
            return _CLOSE
        return b"" if self._out_http11 else _KEEP_ALIVE

    async def send(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        self.answer_now(status, reason, headers, body)
        if self._write_paused and not self.closed:
            await self._drain()

    def answer_now(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        if self.closed:
            return
        transport = self.transport
        assert transport is not None
        head = self._head(status, reason, headers, b"")
        if self._head_only or not body or status in _NO_BODY_STATUS:
            transport.write(head)
        elif len(body) <= 64 * 1024:
            transport.write(head + body)
        else:
            transport.writelines((head, body))

    def answer_backend(self, status: int, reason: str, backend_headers: Headers, rid: bytes,
                       body: bytes) -> bool:
        """Write a backend's whole answer: `Proxy._response_headers` and `answer_now` in one
        pass over the headers, at C speed. False, having written nothing, for an answer that
        needs the general way (a Connection header naming other headers)."""
        line = _STATUS_LINES.get((status, reason))
        if line is None:
            line = _status_line(status, reason)
        lines = [line]
        append = lines.append
        kind_of = _RESPONSE_KIND_BY_RAW.get
        has_id = False
        for item in backend_headers:
            kind = kind_of(item[0])
            if kind is None:
                kind = response_header_kind(item[0])
            if kind == R_PLAIN or kind == R_FRAMING:
                append(b": ".join(item))
            elif kind == R_CONNECTION:
                if item[1] not in _PLAIN_CONNECTION:
                    return False
            elif kind == R_REQUEST_ID:
                has_id = True
                append(b": ".join(item))
        if not has_id:
            append(b"X-Request-ID: " + rid)
        connection = self._connection_line()
        if connection:
            append(connection)
        append(b"")
        if self.closed:
            return True
        transport = self.transport
        assert transport is not None
        if self._head_only or not body or status in _NO_BODY_STATUS:
            append(b"")
            transport.write(b"\r\n".join(lines))
        elif len(body) <= 64 * 1024:
            append(body)
            transport.write(b"\r\n".join(lines))
        else:
            append(b"")
            transport.writelines((b"\r\n".join(lines), body))
        return True

    async def send_head(self, status: int, reason: str, headers: Headers) -> None:
        if self.closed:
            return
        assert self.transport is not None
        self.transport.write(self._head(status, reason, headers, b""))

    async def start(self, status: int, reason: str, headers: Headers, chunked: bool) -> None:
        if self.closed:
            raise ClientGone("the client left before its answer")
        assert self.transport is not None
        if chunked:
            if self._out_http11:
                self._out_chunked = True
            else:  # HTTP/1.0 knows no chunks: the body ends with the connection
                headers = [(n, v) for n, v in headers if n.lower() != b"transfer-encoding"]
                self._out_keep_alive = False
        self.transport.write(self._head(status, reason, headers, b""))

    async def write(self, chunk: bytes) -> None:
        if self.closed:
            raise ClientGone("the client left while reading its answer")
        if not chunk:
            return
        transport = self.transport
        assert transport is not None
        if self._out_chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            transport.write(chunk)
        if self._write_paused:
            await self._drain()

    async def end(self) -> None:
        if self._out_chunked and not self.closed:
            assert self.transport is not None
            self.transport.write(b"0\r\n\r\n")

    def abort(self) -> None:
        self._close(abort=True)

    def interim(self, status: int, reason: str, headers: Headers) -> None:
        """A backend's interim head for the request being answered (the Task's, through
        `FastUpstream.send`, or the fast path's, through `FastExchange`), written at once
        when `interim_headers` forwards it. Never after the final head: the upstream calls
        this only before the final head is in, and the answer is written only after that.
        Dropped for an HTTP/1.0 client (RFC 9110 §15.2), a client gone, and a client not
        reading (its buffer full): a hint is advisory, memory stays bounded."""
        if (self.closed or not self._out_http11 or self._answering is None
                or self._write_paused):
            return
        forwarded = interim_headers(status, headers)
        if forwarded is None:
            return
        assert self.transport is not None
        self.transport.write(b"\r\n".join(
            (_status_line(status, reason), *map(b": ".join, forwarded), b"", b"")))

    async def _drain(self) -> None:
        waiter = self._drain_waiter = self.loop.create_future()
        # A client that stops reading our answer must not hold the connection forever: at
        # the deadline the sweep aborts it, the waiter wakes, the backend response is closed.
        self.deadline = self.loop.time() + self.config.write_timeout
        try:
            await waiter
        finally:
            self._drain_waiter = None
            self.deadline = 0.0
        if self.closed:
            raise ClientGone("the client left while reading its answer")


class FastServer:
    """The httptools protocol server for the proxy port (see the module docstring)."""

    def __init__(self, proxy: Proxy, config: ServerConfig) -> None:
        self.proxy = proxy
        self.config = config
        self.tls = tls_context(config)
        self.loop = asyncio.get_running_loop()
        self.addresses: list[tuple[str, int]] = []
        self.connections: set[_Connection] = set()
        self.serials = itertools.count()
        self.stopping = False
        self.limit = ConnectionLimit(config.max_connections, lambda: len(self.connections))
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    def _protocol(self) -> _Connection:
        return _Connection(self)

    def evict_idle(self) -> bool:
        """At the connection cap: close the oldest connection with no request in flight
        (as the aiohttp server does), to make room for a new one. O(connections), only at
        the cap."""
        oldest: _Connection | None = None
        for conn in self.connections:
            if (conn.task is None and conn.fast is None and not conn.queue
                    and conn._body is None and conn._pending is None and not conn.closed
                    and (oldest is None or conn.serial < oldest.serial)):
                oldest = conn
        if oldest is None:
            return False
        oldest._close()
        self.connections.discard(oldest)  # its connection_lost comes later
        return True

    async def start(self, listen: Sequence[tuple[str, int]], sockets: Sequence[socket.socket],
                    reuse_port: bool) -> None:
        loop = self.loop
        for sock in sockets:
            server = await loop.create_server(self._protocol, sock=sock, ssl=self.tls,
                                              backlog=1024)
            self._servers.append(server)
            host, port = sock.getsockname()[:2]
            self.addresses.append((host, port))
        for host, port in () if sockets else listen:
            server = await loop.create_server(self._protocol, host, port, ssl=self.tls,
                                              reuse_address=True, backlog=1024,
                                              reuse_port=reuse_port or None)
            self._servers.append(server)
            bound = server.sockets[0].getsockname() if server.sockets else (host, port)
            self.addresses.append((host, int(bound[1])))
        self._sweeper = loop.create_task(self._sweep())
        self.proxy.recorder.gauges["proxy_connections"] = self.limit.metrics

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        self.proxy.recorder.gauges.pop("proxy_connections", None)
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        tasks = []
        for conn in list(self.connections):
            conn._close(abort=True)
            if conn.task is not None:
                conn.task.cancel()
                tasks.append(conn.task)
        if tasks:
            await asyncio.wait(tasks)
        sweeper = self._sweeper
        self._sweeper = None
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.wait({sweeper})  # not gather: our own cancellation must propagate
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _sweep(self) -> None:
        loop = self.loop
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            expired = [c for c in self.connections if 0.0 < c.deadline <= now]
            for conn in expired:
                conn.timed_out()


__all__ = ["FastServer"]
