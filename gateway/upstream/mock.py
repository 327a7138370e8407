"""An in-process upstream for tests, in the spirit of httpx's `MockTransport(handler)`.

A feature test (shadow comparison, rollout gates, probes) whose subject is not the socket can
answer every backend call with a function instead of a model server:

    def blue(request: MockRequest) -> MockResponse:
        return MockResponse(200, body=b'{"outputs": [{"data": [1]}]}')

    Gateway(config, upstream_kind=mock_factory({"http://blue": blue, "http://green": green}))

The handler may be async and may raise `UpstreamConnectError`/`UpstreamTimeout`/... to act as
a backend that is down or slow to answer. Responses look like a real server's: a buffered body
carries its Content-Length; `chunks` stream it chunked.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from gateway.config import Timeouts
from gateway.upstream.base import Body, Headers, InterimReceiver, Upstream


@dataclass(frozen=True, slots=True)
class MockRequest:
    method: str
    target: str
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        lower = name.lower()
        return next((v for n, v in self.headers if n.lower() == lower), None)


@dataclass(slots=True)
class MockResponse:
    status: int = 200
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    chunks: list[bytes] | None = None  # streamed (chunked) instead of `body`
    reason: str = "OK"


Handler = Callable[[MockRequest], MockResponse | Awaitable[MockResponse]]


class _Response:
    __slots__ = ("status", "reason", "headers", "content_length", "_body", "_chunks")

    def __init__(self, answer: MockResponse) -> None:
        self.status = answer.status
        self.reason = answer.reason
        headers = list(answer.headers)
        names = {n.lower() for n, _ in headers}
        if answer.chunks is not None:
            self.content_length: int | None = None
            if b"transfer-encoding" not in names:
                headers.append((b"Transfer-Encoding", b"chunked"))
        else:
            self.content_length = len(answer.body)
            if b"content-length" not in names:
                headers.append((b"Content-Length", b"%d" % len(answer.body)))
        self.headers = headers
        self._body = answer.body
        self._chunks = answer.chunks

    async def read(self) -> bytes:
        return self._body if self._chunks is None else b"".join(self._chunks)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks if self._chunks is not None else [self._body]:
            if chunk:
                yield chunk

    def close(self) -> None:
        return None


class MockUpstream:
    """Answers every call of one origin with `handler`; `requests` records what it got."""

    def __init__(self, handler: Handler, origin: str = "http://mock") -> None:
        self.handler = handler
        self.origin = origin
        self.requests: list[MockRequest] = []

    async def send(self, method: str, target: str, headers: Headers, body: Body,
                   timeouts: Timeouts, length: int | None = None,
                   interim: InterimReceiver | None = None) -> _Response:
        # A handler answers with one final response: there are no interim heads to pass on.
        if body is None or isinstance(body, bytes):
            data = body or b""
        else:
            data = b"".join([chunk async for chunk in body])
        request = MockRequest(method, target, list(headers), data)
        self.requests.append(request)
        answer = self.handler(request)
        if inspect.isawaitable(answer):
            answer = await answer
        return _Response(answer)

    async def close(self) -> None:
        return None


def mock_factory(handlers: Mapping[str, Handler]) -> Callable[[str], Upstream]:
    """An `UpstreamFactory` giving each origin its handler (a KeyError names a missing one)."""
    def make(origin: str) -> Upstream:
        return MockUpstream(handlers[origin], origin)

    return make
