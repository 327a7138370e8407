#!/usr/bin/env python3
"""The ceiling: PERF-NOTES' bare prototype proxy, as a process bench.py can measure.

    python loadtest/prototype_proxy.py --port P --backend-port B

A raw uvloop Protocol per client, httptools both ways, one keep-alive backend connection per
client connection, no features, no limits, no timeouts: not a design, a yardstick. bench.py's
`prototype` target runs it beside nginx and modelgate in the same rounds, so "how far is
modelgate from what Python can do on this machine today" is a ratio of one run, not a
number remembered from another day.
"""

from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop


class Backend(asyncio.Protocol):
    """One keep-alive connection to the backend, owned by one client connection."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parts = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()]
        for name, value in self.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        parts.append(b"".join(self.body))
        assert self.client.transport is not None
        self.client.transport.write(b"".join(parts))


class Client(asyncio.Protocol):
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.transport: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parts = [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        parts.append(b"".join(self.body))
        request = b"".join(parts)
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.write(request)
        else:
            asyncio.get_running_loop().create_task(self._connect(request))

    async def _connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        backend = Backend(self)
        await loop.create_connection(lambda: backend, "127.0.0.1", self.backend_port)
        self.backend = backend
        assert backend.transport is not None
        backend.transport.write(request)


async def serve(port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(backend_port), "127.0.0.1", port,
                                      backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend-port", type=int, required=True)
    args = p.parse_args()
    uvloop.run(serve(args.port, args.backend_port))


if __name__ == "__main__":
    main()
