"""The fast path: the common exchange answered from protocol callbacks, without a Task.

When it applies (checked in order; anything else is `Proxy.handle` in a Task, as before):

- the fast server parsed the whole request in one read, with no body or a Content-Length body
  of at most `BUFFER_REQUEST_UP_TO` (not chunked, no 100-continue, not HEAD, no Upgrade), and
  the connection is not answering another request nor waiting for the client to read;
- `Proxy.plan` forwards it (a refusal, 400/404/413, goes the Task path: rare, and written once);
- the planned upstream is a `FastUpstream` with an idle keep-alive connection free.

Then the request head and body go out in one write (`FastUpstream.try_start`) and this
`FastExchange` is the connection's response listener. When the response is complete and it
had a Content-Length of at most `BUFFER_RESPONSE_UP_TO` (or a bodiless status), the client's
answer is written in one write, the metrics observed and the taps run, all inside the
backend connection's parser callback. Why: per request this saves the Task, its steps and
~9 coroutine layers, a third of the gateway's CPU (/work/shared/PERF-NOTES.md).

Hand-offs to the Task path (`Resume`), keeping the Task path's behaviour exactly:
- a response head announcing a streamed, chunked or large body: the Task streams it on;
- a reused connection that failed before any byte came back (the backend closed it while
  idle): the Task sends again, like `FastUpstream.send`'s retry;
- a failure before the status line (or a canary's 503) that `resilience.retry.retry` sends
  again, to another URL of the backend or, for a canary with `fallback`, to live: the Task
  sends it as the changed plan says (the canary is charged its failure first);
- a route or backend over its concurrency limit: the Task answers 503.
A backend's interim (1xx) head goes to the client as it comes (`response_interim` →
`Client.interim`, which drops it for HTTP/1.0): always before the final head, so before
anything of the answer. It counts as a byte come back: no stale-connection resend after it.
Other failures are answered here as the Task path would: 502/504 before the head, the same
error after a broken body. Timeouts need no timer: the pool's deadline sweep fails a
connection whose backend is silent past the route's read timeout (`_Conn.timed_out`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Protocol, cast

from gateway.errors import UpstreamError, UpstreamResetError
from gateway.proxy import (
    BUFFER_RESPONSE_UP_TO,
    Plan,
    Proxy,
    ProxyRequest,
    Resume,
    error_response,
)
from gateway.resilience.limits import admit, full, leave
from gateway.resilience.retry import may_fall_back, may_resend, retry
from gateway.upstream import Headers
from gateway.upstream.fastpool import IDEMPOTENT, FastResponse, FastUpstream, _Conn

log = logging.getLogger("modelgate.proxy")

_NO_BODY_STATUS = frozenset({204, 304})


class Client(Protocol):
    """What the fast path needs of the client connection (gateway/server/fast.py)."""

    fast: FastExchange | None  # the exchange in flight on this connection

    def begin_answer(self, request: ProxyRequest, keep_alive: bool) -> None: ...

    def answer_now(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        """Write a whole answer (as `ResponseSink.send`, without waiting for a slow reader)."""

    def answer_backend(self, status: int, reason: str, backend_headers: Headers, rid: bytes,
                       body: bytes) -> bool:
        """Write a backend's answer with its hop-by-hop headers dropped and X-Request-ID
        added (as `Proxy._response_headers` + `answer_now`); False, having written nothing,
        when only those two can (a Connection header listing other headers)."""

    def fast_done(self, request: ProxyRequest) -> None:
        """The answer is written: go on with the connection (next request, keep-alive...)."""

    def resume(self, request: ProxyRequest, keep_alive: bool, resume: Resume | None) -> None:
        """Answer `request` through `Proxy.handle` in the connection's Task after all."""

    def interim(self, status: int, reason: str, headers: Headers) -> None:
        """A backend's interim (1xx) head, as `ResponseSink.interim`."""


class BufferedBody(Protocol):
    """The fast server's request body, all received: its chunks are taken as they are."""

    chunks: deque[bytes]
    buffered: int


class FastExchange:
    """One request answered on the fast path; the backend connection's `ResponseListener`."""

    __slots__ = ("client", "proxy", "request", "keep_alive", "plan", "payload", "sent", "resp")

    def __init__(self, client: Client, proxy: Proxy, request: ProxyRequest,
                 keep_alive: bool, plan: Plan, payload: bytes | None) -> None:
        self.client = client
        self.proxy = proxy
        self.request = request
        self.keep_alive = keep_alive
        self.plan = plan
        self.payload = payload
        self.sent = 0.0
        self.resp: FastResponse | None = None

    # -- the backend connection's callbacks ---------------------------------------------------

    def response_head(self, conn: _Conn, resp: FastResponse) -> None:
        self.plan.backend.stats.upstream_time(time.perf_counter() - self.sent)
        length = resp.content_length
        if resp.status in _NO_BODY_STATUS or (
                length is not None and length <= BUFFER_RESPONSE_UP_TO):
            self.resp = resp
            resp.buffer_all()
            return
        # A body to stream: the Task takes this response over (upstream time is recorded),
        # as `Proxy._send` would have had it: reported for outlier detection, a canary's 503
        # sent to live instead.
        conn.listener = None
        plan = self.plan
        status = resp.status
        plan.backend.report(plan.upstream, status)
        if status == 503 and plan.route.fallback and retry(plan, 503, "", False, True):
            resp.close()  # a streamed body the client will not see: not worth reading
            self._again()
            return
        # The exchange stays counted (gates, in-flight): `Proxy.forward` takes the counts
        # over, so no other request slips in over a limit in between; if the client is gone
        # before, `abandon` gives them back.
        self.client.resume(self.request, self.keep_alive,
                           Resume(plan, resp, self.sent, self.payload))

    def response_interim(self, status: int, reason: str, headers: Headers) -> None:
        # Before the final head (the connection calls this only then), so before any answer
        # of ours. It came from the backend, so `got_bytes` is set: a failure after it is
        # never resent as a stale connection's (`response_failed`).
        self.client.interim(status, reason, headers)

    def response_done(self, resp: FastResponse) -> None:
        plan = self.plan
        request = self.request
        proxy = self.proxy
        client = self.client
        status = resp.status
        if plan.backend.outliers is not None:  # one URL: no outlier state, nothing to report
            plan.backend.report(plan.upstream, status)
        if status == 503 and plan.route.fallback and retry(plan, 503, "", False, True):
            resp.body_now()  # a canary's 503 the client will not see: live answers
            self._again()
            return
        exchange = (proxy.exchange(plan, request, status, resp.headers, self.payload)
                    if plan.route.taps else None)
        body = resp.body_now()
        if status in _NO_BODY_STATUS:
            body = b""
        elif exchange is not None:
            exchange.response_body = body
        if not client.answer_backend(status, resp.reason, resp.headers, plan.rid, body):
            headers, _ = Proxy._response_headers(resp, plan.rid)
            client.answer_now(status, resp.reason, headers, body)
        self._uncount()
        proxy.finished(plan, request, status, exchange)
        client.fast_done(request)

    def response_failed(self, exc: UpstreamError, got_bytes: bool) -> None:
        plan = self.plan
        request = self.request
        resp = self.resp
        if (resp is None and not got_bytes and isinstance(exc, UpstreamResetError)
                and request.method in IDEMPOTENT):
            # A reused connection the backend had closed: the Task sends again (only what may
            # be sent twice: a POST the backend processed before dying must not run again).
            self._again()
            return
        if resp is None:
            plan.backend.report_failure(plan.upstream, exc.kind)
            if retry(plan, exc.status, exc.kind, may_resend(plan, request.method, exc),
                     may_fall_back(plan, request.method, exc)):
                self._again()  # another URL, or live for a failed canary
                return
        self._uncount()
        route = plan.route
        backend = plan.backend
        status = exc.status
        backend.stats.upstream_error(exc.kind)
        code = "upstream_timeout" if status == 504 else "upstream_unavailable"
        exchange = None
        if resp is None:
            log.warning("upstream %s of route %s failed: %s", backend.name, route.name, exc)
            reason, headers, body = error_response(
                status, code, f"backend {backend.name!r}: {exc.kind}", plan.request_id,
                route=route.name, backend=backend.name)
        else:  # the body broke off
            reason, headers, body = error_response(
                status, code, f"backend failed while sending its body: {exc.kind}",
                plan.request_id, route=route.name)
            if route.taps:
                exchange = self.proxy.exchange(plan, request, status, resp.headers,
                                               self.payload)
        self.client.answer_now(status, reason, headers, body)
        self.proxy.finished(plan, request, status, exchange)
        self.client.fast_done(request)

    def _again(self) -> None:
        """Send the request again through the Task, as `self.plan` now says."""
        self._uncount()
        if self.payload is not None:
            cast(BufferedBody, self.request.body).chunks.append(self.payload)
        self.client.resume(self.request, self.keep_alive, Resume(self.plan))

    def _uncount(self) -> None:
        _uncount(self.proxy, self.plan)


def _uncount(proxy: Proxy, plan: Plan) -> None:
    proxy.in_flight -= 1
    proxy.recorder.in_flight[plan.route.name] -= 1
    if plan.route.gate is not None or plan.backend.gate is not None:
        leave(plan.route.gate, plan.backend.gate)


def abandon(proxy: Proxy, request: ProxyRequest, resume: Resume | None) -> None:
    """A request handed to the Task (`Client.resume`) whose client left before the Task
    took it: a response handed over with its head in is closed, its counts given back and
    the request recorded as the client's abort (499), as `Proxy.forward` would have."""
    if resume is None:
        return
    resp = resume.resp
    if resp is not None:
        resp.close()
        _uncount(proxy, resume.plan)
        proxy.finished(resume.plan, request, resp.status, None, True)
    else:
        proxy.finished(resume.plan, request, 0, None, True)


def answer(client: Client, proxy: Proxy, request: ProxyRequest, keep_alive: bool) -> None:
    """Answer a fully received request: on the fast path if it applies (module docstring),
    else through `Proxy.handle` in the connection's Task."""
    plan = proxy.plan(request)
    if type(plan) is not Plan:
        client.resume(request, keep_alive, None)
        return
    body: BufferedBody | None = request.body  # type: ignore[assignment]  # the fast server's
    payload: bytes | None = None
    if body is not None:
        chunks = body.chunks
        payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if plan.rules_at >= 0:  # rules on the body: it is all here, so they decide now
        proxy.body_rules(plan, request, payload)
    upstream = plan.upstream
    route = plan.route
    gated = route.gate is not None or plan.backend.gate is not None
    if type(upstream) is not FastUpstream or (gated and full(route.gate, plan.backend.gate)):
        # Over a concurrency limit: the Task path counts and answers the 503 (rare).
        client.resume(request, keep_alive, Resume(plan))
        return
    if gated:
        admit(route.gate, plan.backend.gate)
    exchange = FastExchange(client, proxy, request, keep_alive, plan, payload)
    client.begin_answer(request, keep_alive)
    exchange.sent = time.perf_counter()
    try:
        started = upstream.try_start(request.method, request.target, plan.headers, payload,
                                     plan.route.timeouts.read, exchange, plan.framed)
    except ValueError:
        started = False  # a header that cannot be written: the Task path answers 400
    if not started:
        if gated:
            leave(route.gate, plan.backend.gate)
        client.resume(request, keep_alive, Resume(plan))
        return
    if body is not None:
        body.chunks.clear()
        body.buffered = 0
    route_name = plan.route.name
    proxy.in_flight += 1
    in_flight = proxy.recorder.in_flight
    in_flight[route_name] = in_flight.get(route_name, 0) + 1
    client.fast = exchange


__all__ = ["FastExchange", "abandon", "answer"]
