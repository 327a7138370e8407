"""Calling a backend: the hot path's biggest cost, so it sits behind a two-method interface.

An `Upstream` is a keep-alive connection pool to one origin (``http://host:port``). Any
implementation must pass tests/test_upstream_contract.py. Errors before the response starts are
raised as `UpstreamConnectError`, `UpstreamResetError` or `UpstreamTimeout`; errors while
streaming the body surface from `iter_chunks()`/`read()` as `UpstreamError`.

Headers are lists of (name, value) byte pairs, in order, names spelled as received: the
proxy passes them from socket to socket without decoding (a feature that needs a value
decodes that one).

A streamed body (an async iterable) whose length is known is sent with that Content-Length
(`send(..., length=n)`), never re-framed as chunked: some model servers refuse chunked
uploads. Only a body of unknown length goes out chunked.
"""

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
    ) -> UpstreamResponse:
        """Send a request (`target` is path + query) and return once the status line and
        headers are in. `length`: the size of a streamed `body` when known (Content-Length
        framing; the stream must yield exactly that many bytes), None for chunked."""

    async def close(self) -> None: ...


def make_upstream(origin: str, kind: str = "fast") -> Upstream:
    """`fast` (default): the httptools pool, ~3x the throughput; `aiohttp`: the reference."""
    if kind == "fast":
        from gateway.upstream.fastpool import FastUpstream

        return FastUpstream(origin)
    from gateway.upstream.aiohttp_client import AiohttpUpstream

    return AiohttpUpstream(origin)


__all__ = ["Body", "HOP_BY_HOP", "Headers", "Upstream", "UpstreamResponse", "make_upstream"]
