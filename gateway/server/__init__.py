"""The client-facing server of the proxy port: turns bytes on a socket into `ProxyRequest`s
for the transport-neutral proxy core (gateway/proxy.py) and writes its answers back.

Two implementations behind one small interface, sharing one proxy test suite:

- `fast` (default, gateway/server/fast.py): an asyncio Protocol with httptools' request
  parser on uvloop. Keep-alive, pipelining answered in order, `Expect: 100-continue`,
  chunked both ways, limits on the request line, header count and size, body size while
  streaming, idle, header-read, body and write timeouts, flow control both ways, TLS,
  graceful drain.
- `aiohttp` (gateway/server/aiohttp_server.py): aiohttp's low-level server, the reference,
  selectable with `server: aiohttp` until the fast one has proven itself.

Both keep the client limits of `ServerConfig` and the connection cap of
gateway/server/limits.py (shared).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Protocol

from gateway.config import ServerConfig
from gateway.proxy import Proxy
from gateway.server.tls import tls_context

SERVER_KINDS = ("fast", "aiohttp")


class ProxyServer(Protocol):
    addresses: list[tuple[str, int]]

    async def start(self, listen: Sequence[tuple[str, int]], sockets: Sequence[socket.socket],
                    reuse_port: bool) -> None:
        """Listen on `sockets` (inherited listening sockets) when given, else bind `listen`
        (with SO_REUSEPORT when `reuse_port`)."""

    async def stop(self, timeout: float) -> None:
        """Stop accepting, close idle connections, let answers being written finish (at most
        `timeout` seconds), then close everything and await every task it owns."""


def make_server(kind: str, proxy: Proxy, config: ServerConfig) -> ProxyServer:
    if kind == "fast":
        from gateway.server.fast import FastServer

        return FastServer(proxy, config)
    if kind == "aiohttp":
        from gateway.server.aiohttp_server import AiohttpServer

        return AiohttpServer(proxy, config)
    raise ValueError(f"server must be one of {', '.join(SERVER_KINDS)}, got {kind!r}")


__all__ = ["SERVER_KINDS", "ProxyServer", "make_server", "tls_context"]
