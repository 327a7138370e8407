"""The upstream interface: what every way of calling a backend implements (a leaf module:
the implementations import it, the package picks one of them)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

from gateway.config import Timeouts

Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes] | None

# RFC 9110 §7.6.1 hop-by-hop headers, plus the de-facto ones proxies also drop.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})


class InterimReceiver(Protocol):
    """Who gets a backend's interim (1xx) heads (`Upstream.send(..., interim=)`): the
    proxy's `ResponseSink`, which forwards them (gateway/interim.py says which)."""

    def interim(self, status: int, reason: str, headers: Headers) -> None:
        """One interim head, before the final one; headers as received. Called from the
        upstream's protocol callbacks: it must not block nor await."""


class UpstreamResponse(Protocol):
    status: int
    reason: str
    headers: Headers
    content_length: int | None

    async def read(self) -> bytes:
        """The whole body (then the connection is reused)."""

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (for streams: SSE, chunked, large bodies)."""

    def close(self) -> None:
        """Abandon the response (its connection is dropped, not reused). Idempotent."""


class Upstream(Protocol):
    origin: str

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        timeouts: Timeouts,
        length: int | None = None,
        interim: InterimReceiver | None = None,
    ) -> UpstreamResponse:
        """Send a request (`target` is path + query) and return once the status line and
        headers are in. `length`: the size of a streamed `body` when known (Content-Length
        framing; the stream must yield exactly that many bytes), None for chunked.
        `interim`: gets the interim (1xx) heads that come before the final one, if the
        implementation sees them (the fast pool does; aiohttp's client drops them)."""

    async def close(self) -> None: ...
