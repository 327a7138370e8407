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

from collections.abc import Callable

from gateway.upstream.base import (
    HOP_BY_HOP,
    Body,
    Headers,
    InterimReceiver,
    Upstream,
    UpstreamResponse,
)

UpstreamFactory = Callable[[str], Upstream]
"""Makes the upstream of one origin: tests pass one (e.g. `MockUpstream`) to run features
without sockets."""


def make_upstream(origin: str, kind: str | UpstreamFactory = "fast") -> Upstream:
    """`fast` (default): the httptools pool, ~3x the throughput; `aiohttp`: the reference;
    a factory: whatever it makes (an in-process `MockUpstream` in tests)."""
    if callable(kind):
        return kind(origin)
    if kind == "fast":
        from gateway.upstream.fastpool import FastUpstream

        return FastUpstream(origin)
    from gateway.upstream.aiohttp_client import AiohttpUpstream

    return AiohttpUpstream(origin)


__all__ = ["Body", "HOP_BY_HOP", "Headers", "InterimReceiver", "Upstream", "UpstreamFactory",
           "UpstreamResponse", "make_upstream"]
