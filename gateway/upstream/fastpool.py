"""The fast `Upstream`: a thin keep-alive HTTP/1.1 pool over asyncio Protocols and httptools.

Why it exists: aiohttp's client costs ~100 µs per proxied request; a pool of raw
`asyncio.Protocol` connections parsing responses with httptools costs about half
(/work/shared/PERF-NOTES.md). It speaks only what a reverse proxy needs: one request at a time
per connection (no pipelining), Content-Length / chunked / close-delimited response bodies, and
Content-Length or chunked request bodies (a streamed body of known length keeps its
Content-Length). Header names and values stay bytes both ways.

How it is put together:

- `_Conn` is one socket. Idle ones sit in a LIFO list (the most recently used is the warmest);
  at most `MAX_IDLE` are kept, and at most `MAX_ACTIVE` are busy at once (more requests wait
  for a slot, FIFO).
- A connection goes back to the pool as soon as its response is complete *on the wire*: body
  bytes the caller has not consumed yet belong to the `FastResponse`, not to the socket. A
  response abandoned before its end closes its connection.
- No timer per request (one costs ~13 µs): a connection waiting for bytes keeps a `deadline`,
  refreshed on every read, and one sweep task per `FastUpstream` fails the connections whose
  deadline has passed every `SWEEP_INTERVAL`. The sweep starts with the first request, stops by
  itself when the pool is empty, and `close()` cancels and awaits it.
- Reading is flow-controlled: when more than `READ_HIGH` bytes wait for a slow consumer the
  socket stops being read (and the read deadline is suspended: the wait is ours) until the
  consumer takes them. `iter_chunks()` hands over everything buffered at once and resumes
  reading only when asked for the next chunk (after the consumer wrote the last one out), so
  memory per response stays near `READ_HIGH` plus one socket read, however slow the client.

- Interim (1xx) heads before the final one are handed to whoever sent the request, only when
  one comes: a `ResponseListener`'s `response_interim`, or the `interim` receiver given to
  `send()` (kept on the connection until the final head or the failure). No per-request
  cost for the usual answer without one. A 101 the pool did not ask for fails the request.

Errors are translated here, once: refused / unreachable / DNS → `UpstreamConnectError`; reset,
closed early or an unparsable response → `UpstreamResetError`; connect or read timeout →
`UpstreamTimeout`; no free connection within the connect timeout (or the wait queue full) →
`UpstreamPoolTimeout`. Body errors surface from `read()` / `iter_chunks()`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from gateway.config import Timeouts
from gateway.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamResetError,
    UpstreamTimeout,
)
from gateway.upstream.base import Body, Headers, InterimReceiver

log = logging.getLogger("modelgate.upstream")

MAX_SLOT_WAITERS = 4096  # requests queued for a connection beyond MAX_ACTIVE
MAX_IDLE = 256  # idle keep-alive connections kept per origin
MAX_ACTIVE = 1024  # connections busy at once per origin; further requests wait for one
# Close idle connections older than this: below the 5 s keep-alive of uvicorn-based model
# servers, so a POST (never resent, see IDEMPOTENT) rarely meets one the server is closing.
IDLE_TTL = 4.0
# RFC 9110 §9.2.2: only these are resent automatically after a connection failed with no
# answer (the backend may have processed a POST and died before answering).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
SWEEP_INTERVAL = 0.1  # timeout resolution: deadlines are checked this often
# Stop reading the socket when this much body waits for the consumer; with one socket read
# on top, the most a slow client of a streamed answer holds here (issue #11: 200 clients that
# never read must cost < 100 MB).
READ_HIGH = 128 * 1024
COALESCE = 64 * 1024  # bytes bodies up to this size go out in the same write as the head

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_SPECIAL_LENGTHS = frozenset({4, 14, 17})  # len("host"), len("content-length"), ...
_COLON_JOIN = b": ".join  # (name, value) -> b"name: value", mapped at C speed

class ResponseListener(Protocol):
    """Who gets a response without awaiting it (`FastUpstream.try_start`): the callbacks run
    inside the connection's parser callbacks, so they must not block or await."""

    def response_head(self, conn: _Conn, resp: FastResponse) -> None:
        """The head is in. To take the body as it streams, set `conn.listener = None` and
        consume `resp` like one from `send()`; else the body is buffered whole."""

    def response_done(self, resp: FastResponse) -> None:
        """The whole response is in (`resp.body_now()`); the connection is back in the pool."""

    def response_failed(self, exc: UpstreamError, got_bytes: bool) -> None:
        """No (complete) response: the connection is dropped; `got_bytes`: any byte came."""

    def response_interim(self, status: int, reason: str, headers: Headers) -> None:
        """An interim (1xx) head came before the final one, headers as received (called
        only then: a response without one costs nothing)."""


# _Conn.state
_NEW, _ACTIVE, _IDLE, _DEAD = 0, 1, 2, 3


class _ProtocolViolation(Exception):
    """Raised inside parser callbacks; surfaces as an httptools callback error."""


class FastResponse:
    """One response. Its body chunks are buffered here, so the connection can be reused as
    soon as the response is complete on the wire, whether or not the caller has read it."""

    __slots__ = ("status", "reason", "headers", "content_length", "_conn", "_loop", "_chunks",
                 "_buffered", "_waiter", "_eof", "_exc", "_read_all")

    def __init__(
        self,
        conn: _Conn,
        status: int,
        reason: str,
        headers: Headers,
        content_length: int | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self._conn: _Conn | None = conn  # None once the body is complete, failed or abandoned
        self._loop = conn.loop
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._exc: UpstreamError | None = None
        self._read_all = False  # read() wants everything: no read flow control

    def __repr__(self) -> str:
        return f"<FastResponse {self.status} {self.reason}>"

    def buffer_all(self) -> None:
        """The whole body will be taken at once: no read flow control."""
        self._read_all = True

    def body_now(self) -> bytes:
        """The body received so far (all of it once complete), without awaiting."""
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    async def read(self) -> bytes:
        """The whole body (then the connection is reused)."""
        if not self._eof and self._exc is None:
            self._read_all = True
            conn = self._conn
            if conn is not None and conn.reading_paused:
                conn.resume_reading()
            while not self._eof and self._exc is None:
                await self._wait()
        if self._exc is not None:
            raise self._exc
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (whatever is buffered is yielded as one chunk)."""
        chunks = self._chunks
        try:
            while True:
                if chunks:
                    data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                    chunks.clear()
                    self._buffered = 0
                    yield data
                    # Only once the consumer asks for more (it wrote `data` into the client's
                    # socket buffer) is the backend read again: a client that reads nothing
                    # holds about one chunk here, not one more per chunk it did not take.
                    conn = self._conn
                    if conn is not None and conn.reading_paused:
                        conn.resume_reading()
                elif self._exc is not None:
                    raise self._exc
                elif self._eof:
                    return
                else:
                    await self._wait()
        finally:
            if not self._eof:  # the consumer stopped early (or failed): drop the connection
                self.close()

    def close(self) -> None:
        """Abandon the response: its connection is dropped unless the body was complete."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abandon(self)
        if not self._eof and self._exc is None:
            self._exc = UpstreamResetError("response was closed before its end")
        self._chunks.clear()
        self._buffered = 0

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.close()  # cancelled mid-body: never reuse a half-read connection
            raise
        finally:
            self._waiter = None

    # Called by the connection.

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed_eof(self) -> None:
        self._eof = True
        self._conn = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        self._conn = None
        if self._eof or self._exc is not None:
            return
        self._exc = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Conn(asyncio.Protocol):
    """One keep-alive socket; also the httptools callback object for its responses."""

    __slots__ = (
        "pool", "loop", "transport", "parser", "state", "closed", "idle_since", "deadline",
        "read_timeout", "got_bytes", "reading_paused", "_head_waiter", "_drain_waiter",
        "_write_paused", "_writing", "_head_only", "resp", "_reason", "_headers",
        "_content_length", "_chunked", "_informational", "_keep_alive", "_msg_done", "listener",
        "interim",
    )

    def __init__(self, pool: FastUpstream, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = _NEW
        self.closed = False
        self.idle_since = 0.0
        self.deadline = 0.0  # 0: not waiting for the server
        self.read_timeout = 30.0
        self.got_bytes = False  # any byte of the current request's response arrived
        self.reading_paused = False
        self._head_waiter: asyncio.Future[FastResponse] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._writing = False  # a streamed request body is still being written
        self._head_only = False  # the request was HEAD: the response has no body
        self.resp: FastResponse | None = None  # the response whose body is being received
        self._reason = b""
        self._headers: Headers = []
        self._content_length: int | None = None
        self._chunked = False
        self._informational = False
        self._keep_alive = False
        self._msg_done = False
        self.listener: ResponseListener | None = None  # a request sent by try_start
        # Who gets the interim heads of a request sent by `send()`: set only when its caller
        # passed one, cleared with the final head (or the failure).
        self.interim: InterimReceiver | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pool._open.add(self)

    def data_received(self, data: bytes) -> None:
        if self._head_waiter is None and self.resp is None and self.listener is None:
            # Bytes nobody asked for (an idle connection, or after a complete response): the
            # server is confused or closing. Don't reuse the connection.
            self._drop()
            return
        self.got_bytes = True
        if self.deadline:
            self.deadline = self.loop.time() + self.read_timeout
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._msg_done:
                # Junk after a complete response: the response stands, the connection goes.
                self._keep_alive = False
                self._finish()
            else:
                self.fail(UpstreamResetError(f"{self.pool.origin}: bad response: {exc}"))
            return
        if self._msg_done:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if (resp is not None and not self._msg_done and self._content_length is None
                and not self._chunked and not self._head_only):
            # A close-delimited body (no length, not chunked) ends with the connection.
            self.resp = None
            resp._feed_eof()
        reason = f": {exc}" if exc is not None else ""
        self.fail(UpstreamResetError(f"{self.pool.origin}: connection closed{reason}"))
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the writer sees `closed` and stops
        self.pool._lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._msg_done:
            raise _ProtocolViolation("data after the end of the response")
        self._reason = b""
        self._headers = []
        self._content_length = None
        self._chunked = False

    def on_status(self, status: bytes) -> None:
        self._reason += status  # may come in pieces when split across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in _SPECIAL_LENGTHS:
            lower = name.lower()
            if lower == b"content-length":
                self._content_length = int(value)  # llhttp has checked it is digits
            elif lower == b"transfer-encoding":
                # Chunked framing only if chunked is the final coding; otherwise the body is
                # close-delimited (RFC 9112 §6.3).
                self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        self._headers.append((name, value))  # bytes as received: the proxy writes them back

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                raise _ProtocolViolation("unexpected protocol upgrade (101)")
            self._informational = True  # 100 Continue, 103 Early Hints...: wait for the next
            listener = self.listener
            if listener is not None or self.interim is not None:
                self._interim(status, listener)
            return
        waiter = self._head_waiter
        listener = self.listener
        if listener is None:
            if waiter is None or waiter.done():
                # The request was cancelled: its connection must not be reused (nor its
                # answer completing the message put it back in the pool under the canceller's
                # feet).
                raise _ProtocolViolation("response to an abandoned request")
            self._head_waiter = None
            self.interim = None  # the final head is in: no interim head may follow it
        self._keep_alive = self.parser.should_keep_alive()
        length = None if self._chunked else self._content_length
        reason = self._reason.decode("latin-1")  # exact: the server encodes it back
        resp = FastResponse(self, status, reason, self._headers, length)
        self.resp = resp
        if self._head_only:
            # httptools doesn't know the request was HEAD and would wait for the body its
            # headers announce: end the message here (the parser is replaced in _finish).
            # llhttp would also call a HEAD answer without a length close-delimited.
            self._msg_done = True
            self._keep_alive = _keep_alive(self.parser.get_http_version(), self._headers)
        if listener is not None:
            listener.response_head(self, resp)
        else:
            assert waiter is not None
            waiter.set_result(resp)

    def _interim(self, status: int, listener: ResponseListener | None) -> None:
        """Hand an interim head to the request's caller. `_headers` is this message's own
        list (`on_message_begin` starts a new one). A failure to pass on a hint must not
        fail the exchange: it is logged."""
        reason = self._reason.decode("latin-1")
        try:
            if listener is not None:
                listener.response_interim(status, reason, self._headers)
            elif self.interim is not None:
                self.interim.interim(status, reason, self._headers)
        except Exception:
            log.exception("passing on a %d from %s failed", status, self.pool.origin)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is None or self._msg_done:
            raise _ProtocolViolation("body bytes after the end of the response")
        resp._feed(body)
        if resp._buffered > READ_HIGH and not resp._read_all and not self.reading_paused:
            self.reading_paused = True
            self.deadline = 0.0  # waiting on our consumer, not on the server
            assert self.transport is not None
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._msg_done = True

    # Driven by FastUpstream / FastResponse

    async def request(
        self, head: bytes, payload: bytes | None, stream: AsyncIterable[bytes] | None,
        read_timeout: float, head_only: bool, chunked: bool = True,
        interim: InterimReceiver | None = None,
    ) -> FastResponse:
        self.got_bytes = False
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise UpstreamResetError(f"{self.pool.origin}: connection closed")
        if interim is not None:
            self.interim = interim
        self.read_timeout = read_timeout
        self._head_only = head_only
        waiter: asyncio.Future[FastResponse] = self.loop.create_future()
        self._head_waiter = waiter
        try:
            if stream is not None:
                transport.write(head)
                try:
                    await self._write_stream(stream, chunked)
                except (UpstreamError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    # The caller's body iterator failed (client went away, body too large):
                    # keep the contract, every error before the response is an UpstreamError.
                    raise UpstreamResetError(
                        f"{self.pool.origin}: request body failed: {exc!r}"
                    ) from exc
            elif payload is None:
                transport.write(head)
            elif len(payload) <= COALESCE:
                transport.write(head + payload)
            else:
                transport.write(head)
                transport.write(payload)
            if not self.closed and not self.reading_paused:
                self.deadline = self.loop.time() + read_timeout
            return await waiter
        except BaseException:
            # Cancelled, the body iterator failed, or the response failed: never reuse the
            # connection. Once the waiter has a response the connection may already be back
            # in the pool (not ours any more): then only the response is abandoned.
            if not waiter.done():
                waiter.cancel()  # nobody will await it
            elif not waiter.cancelled() and waiter.exception() is None:
                waiter.result().close()
                raise
            if not self.closed:
                self.fail(UpstreamResetError(f"{self.pool.origin}: request abandoned"))
            raise

    async def _write_stream(self, stream: AsyncIterable[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        self._writing = True
        try:
            async for chunk in stream:
                if self.closed:
                    break  # the waiter holds the outcome (an early response or an error)
                if not chunk:
                    continue  # a zero-length chunk would end the body
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_paused:
                    await self._drain()
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        finally:
            self._writing = False

    async def _drain(self) -> None:
        waiter = self._drain_waiter = self.loop.create_future()
        # A server that stops reading our body must not hang us: the read deadline applies.
        self.deadline = self.loop.time() + self.read_timeout
        try:
            await waiter
        finally:
            self._drain_waiter = None
            if self._head_waiter is not None:
                self.deadline = 0.0

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if not self.closed and self.transport is not None:
                self.deadline = self.loop.time() + self.read_timeout
                self.transport.resume_reading()

    def abandon(self, resp: FastResponse) -> None:
        if self.resp is resp:
            self.resp = None
            self._drop(abort=True)

    def timed_out(self) -> None:
        origin = self.pool.origin
        if self.resp is not None:
            exc = UpstreamTimeout(f"{origin}: no body bytes within {self.read_timeout}s")
        else:
            exc = UpstreamTimeout(f"{origin}: no response within {self.read_timeout}s")
        self.fail(exc)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: UpstreamError) -> None:
        """Fail whatever waits on this connection and drop it."""
        listener = self.listener
        if listener is not None:
            self.listener = None
            resp = self.resp
            self.resp = None
            if resp is not None:
                resp._fail(exc)
            self._drop(abort=True)
            listener.response_failed(exc, self.got_bytes)
            return
        self.interim = None
        waiter = self._head_waiter
        if waiter is not None:
            self._head_waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
        resp = self.resp
        if resp is not None:
            self.resp = None
            resp._fail(exc)
        self._drop(abort=True)

    def _finish(self) -> None:
        """The response is complete on the wire: hand the connection back or close it."""
        self._msg_done = False
        resp = self.resp
        if resp is not None:
            self.resp = None
            resp._feed_eof()
        listener = self.listener
        self.listener = None
        self.deadline = 0.0
        transport = self.transport
        assert transport is not None
        if (not self._keep_alive or self._writing or self.closed
                or transport.get_write_buffer_size()):
            # Not reusable: the server said close, or answered before our body was all sent.
            self._drop(abort=bool(transport.get_write_buffer_size()))
        else:
            if self._head_only:
                self.parser = httptools.HttpResponseParser(self)  # it still expects a body
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
            self.pool._release(self)
        if listener is not None and resp is not None:
            listener.response_done(resp)

    def _drop(self, abort: bool = False) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                if abort:
                    self.transport.abort()
                else:
                    self.transport.close()
        self.deadline = 0.0
        self.pool._forget(self)


def _keep_alive(version: str, headers: Headers) -> bool:
    """Keep-alive by version and Connection header (for HEAD answers, which have no body)."""
    tokens = {
        t.strip().lower() for n, v in headers if n.lower() == b"connection"
        for t in v.split(b",")
    }
    if version == "1.0":
        return b"keep-alive" in tokens
    return b"close" not in tokens


class FastUpstream:
    """Keep-alive HTTP/1.1 pool to one origin (``http://host:port``, optionally https)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self._prefix = parts.path.rstrip("/")
        self._host_line = f"Host: {parts.netloc}\r\n".encode("idna")
        self._prefix_bytes = self._prefix.encode("latin-1")
        self._idle: list[_Conn] = []  # LIFO: the end is the most recently used
        self._active: set[_Conn] = set()
        self._open: set[_Conn] = set()  # connection_made .. connection_lost
        self._slots = 0  # connections active or connecting
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._all_lost: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (f"<FastUpstream {self.origin} active={len(self._active)} "
                f"idle={len(self._idle)}>")

    async def send(
        self, method: str, target: str, headers: Headers, body: Body, timeouts: Timeouts,
        length: int | None = None, interim: InterimReceiver | None = None,
    ) -> FastResponse:
        payload: bytes | None = None
        stream: AsyncIterable[bytes] | None = None
        if body is None:
            framing = b"Content-Length: 0\r\n" if method in _BODY_METHODS else b""
        elif isinstance(body, (bytes, bytearray, memoryview)):
            payload = body if type(body) is bytes else bytes(body)
            framing = b"Content-Length: %d\r\n" % len(payload)
        else:
            stream = body
            framing = (b"Transfer-Encoding: chunked\r\n" if length is None
                       else b"Content-Length: %d\r\n" % length)
        head = self._head(method, target, headers, framing)
        head_only = method == "HEAD"
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

        fresh = False
        while True:
            # The common case without a coroutine: a free slot and a warm idle connection.
            conn = self._take_idle() if not fresh and self._slots < MAX_ACTIVE else None
            if conn is not None:
                reused = True
            else:
                conn, reused = await self._acquire(timeouts, fresh)
            try:
                return await conn.request(head, payload, stream, timeouts.read, head_only,
                                          length is None, interim)
            except UpstreamResetError:
                # A reused connection the server had closed while idle: try once on a new one.
                # Only when nothing came back and the body can be sent again.
                if (reused and not conn.got_bytes and stream is None and not fresh
                        and method in IDEMPOTENT):
                    fresh = True
                    continue
                raise

    def try_start(self, method: str, target: str, headers: Headers, payload: bytes | None,
                  read_timeout: float, listener: ResponseListener, framed: bool = False) -> bool:
        """Send a request on an idle connection without awaiting; `listener` gets the response
        (the fast path, gateway/server/fastpath.py). False, having sent nothing, when no idle
        connection is free: then `send()` is the way. The read timeout is the sweep's, as for
        `send()`. Raises ValueError like `send()` for a header that cannot be written.

        `headers` are the proxy's (no Host, no Transfer-Encoding); `framed`: they carry a
        Content-Length that is `len(payload)` (the client's, for a body read whole by it)."""
        if not self._idle or self._slots >= MAX_ACTIVE:
            return False
        if payload is not None and framed:
            framing = b""
        elif payload is None:
            framing = b"Content-Length: 0\r\n" if method in _BODY_METHODS else b""
        else:
            framing = b"Content-Length: %d\r\n" % len(payload)
        if headers:
            head = self._plain_head(method, target, headers, framing)
        else:
            head = self._head(method, target, headers, framing)
        conn = self._take_idle()
        if conn is None:
            return False
        loop = conn.loop
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        conn.got_bytes = False
        conn.read_timeout = read_timeout
        conn._head_only = method == "HEAD"
        conn.listener = listener
        transport = conn.transport
        assert transport is not None
        if payload is None:
            transport.write(head)
        elif len(payload) <= COALESCE:
            transport.write(head + payload)
        else:
            transport.writelines((head, payload))
        if not conn.closed and not conn.reading_paused:
            conn.deadline = loop.time() + read_timeout
        return True

    async def close(self) -> None:
        """Close every connection and stop the sweep task."""
        sweeper = self._sweeper
        self._sweeper = None
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.wait({sweeper})  # not gather: our own cancellation must propagate
        for conn in list(self._idle):
            conn._drop()
        for conn in list(self._open):
            conn.fail(UpstreamResetError(f"{self.origin}: upstream closed"))
        if self._open:
            # Let the transports run connection_lost, which closes the sockets.
            self._all_lost = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait({self._all_lost}, timeout=1.0)
            finally:
                self._all_lost = None

    # Request head

    def _head(self, method: str, target: str, headers: Headers, framing: bytes) -> bytes:
        # The target is latin-1 text of the client's bytes (see gateway.proxy): exact.
        parts = [method.encode("latin-1"), b" ", self._prefix_bytes, target.encode("latin-1"),
                 b" HTTP/1.1\r\n"]
        lines = 1
        has_host = False
        for name, value in headers:
            if len(name) in _SPECIAL_LENGTHS:
                lower = name.lower()
                if lower in _FRAMING:
                    # The framing is ours: it must match what we send. The caller's header
                    # stays in its place when it says just that (exact message fidelity).
                    if framing and framing.endswith(b": %s\r\n" % value) and framing.lower(
                    ).startswith(lower):
                        parts += (name, b": ", value, b"\r\n")
                        lines += 1
                        framing = b""
                    continue
                if lower == b"host":
                    has_host = True
            parts += (name, b": ", value, b"\r\n")
            lines += 1
        if not has_host:
            parts.insert(5, self._host_line)
            lines += 1
        if framing:
            parts.append(framing)
            lines += 1
        parts.append(b"\r\n")
        lines += 1
        head = b"".join(parts)
        # One CRLF per line and no other CR or LF: a value carrying CR/LF would split the
        # request (request smuggling). Two C-speed scans instead of a check per header.
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("CR or LF inside the request line or a header")
        return head

    def _plain_head(self, method: str, target: str, headers: Headers, framing: bytes) -> bytes:
        """`_head` for headers known to hold no Host and no framing header (the proxy's, on
        the fast path), at C speed: the request line, our Host, the headers, the framing."""
        head = b"".join((method.encode("latin-1"), b" ", self._prefix_bytes,
                         target.encode("latin-1"), b" HTTP/1.1\r\n", self._host_line,
                         b"\r\n".join(map(_COLON_JOIN, headers)), b"\r\n", framing, b"\r\n"))
        lines = len(headers) + (4 if framing else 3)
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("CR or LF inside the request line or a header")
        return head

    # Connections and slots

    def _take_idle(self) -> _Conn | None:
        """A slot and the warmest idle connection, or None (and no slot) if none is usable."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                conn.state = _DEAD
                continue
            self._slots += 1
            conn.state = _ACTIVE
            self._active.add(conn)
            return conn
        return None

    async def _acquire(self, timeouts: Timeouts, fresh: bool) -> tuple[_Conn, bool]:
        if self._slots < MAX_ACTIVE:
            self._slots += 1
        else:
            if len(self._slot_waiters) >= MAX_SLOT_WAITERS:
                raise UpstreamPoolTimeout(f"{self.origin}: {MAX_ACTIVE} requests in flight "
                                          f"and {MAX_SLOT_WAITERS} waiting: overloaded")
            # Waiting for a connection is bounded by the connect timeout, but it is our own
            # queue, not the backend failing: its own outcome (503 upstream_busy).
            try:
                async with asyncio.timeout(timeouts.connect):
                    await self._wait_slot()
            except TimeoutError as exc:
                raise UpstreamPoolTimeout(f"{self.origin}: no connection free within "
                                          f"{timeouts.connect}s") from exc
        if not fresh:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.closed or conn.transport is None or conn.transport.is_closing():
                    conn.state = _DEAD
                    continue
                conn.state = _ACTIVE
                self._active.add(conn)
                return conn, True
        try:
            conn = await self._connect(timeouts.connect)
        except BaseException:
            self._release_slot()
            raise
        conn.state = _ACTIVE
        self._active.add(conn)
        return conn, False

    async def _connect(self, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = _Conn(self, loop)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: conn, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise UpstreamTimeout(f"{self.origin}: connect timed out after {timeout}s") from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS
            raise UpstreamConnectError(f"{self.origin}: {exc.strerror or exc}") from exc
        return conn

    async def _wait_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot just as we were cancelled: pass it on
            else:
                try:
                    self._slot_waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter
                return
        self._slots -= 1

    def _release(self, conn: _Conn) -> None:
        """A connection finished its response cleanly."""
        if conn.state != _ACTIVE:
            return
        self._active.discard(conn)
        if len(self._idle) >= MAX_IDLE:
            conn.state = _DEAD
            conn._drop()
        else:
            conn.state = _IDLE
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        self._release_slot()

    def _forget(self, conn: _Conn) -> None:
        """A connection is closing: it leaves the pool."""
        state = conn.state
        conn.state = _DEAD
        if state == _ACTIVE:
            self._active.discard(conn)
            self._release_slot()
        elif state == _IDLE:
            try:
                self._idle.remove(conn)
            except ValueError:
                pass

    def _lost(self, conn: _Conn) -> None:
        self._forget(conn)
        self._open.discard(conn)
        if not self._open and self._all_lost is not None and not self._all_lost.done():
            self._all_lost.set_result(None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            expired = [c for c in self._active if 0.0 < c.deadline <= now]
            for conn in expired:
                try:  # answering a timed-out exchange runs the fast path's code: never let a
                    conn.timed_out()  # bug there end the sweep (no timeout would fire again)
                except Exception:
                    log.exception("timing out a connection to %s failed", self.origin)
                    conn._drop()
            idle = self._idle
            too_old = now - IDLE_TTL
            while idle and idle[0].idle_since < too_old:
                idle[0]._drop()  # leaves the list through _forget
            if not self._slots and not idle:
                self._sweeper = None  # nothing to watch; send() starts a new sweep
                return


__all__ = ["FastResponse", "FastUpstream", "ResponseListener"]
