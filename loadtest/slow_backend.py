#!/usr/bin/env python3
"""A "model" for the benchmark: answers every request after a fixed delay, cheaply.

    python loadtest/slow_backend.py --port 9100 --delay-ms 20 [--body '{"outputs": …}']

bench.py's `model20ms` cell needs a backend that takes 20 ms like a small model, at 1000 req/s
and more. nginx cannot wait before answering, and the demo model server (aiohttp, JSON in and
out) saturates below 1000 req/s on a shared 2-core machine, so the cell would measure the
backend's queue instead of the gateway. This is a raw asyncio protocol with httptools on uvloop
(~20 µs of CPU a request): each request is answered `--delay-ms` after it has been read whole
(a timer, never a sleeping task), with a fixed body, keeping the connection alive; pipelined
requests are answered in order. It listens on 127.0.0.1 only and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import deque
from typing import cast

import httptools

DEFAULT_BODY = (
    '{"model_name":"classifier","model_version":"v1",'
    '"outputs":[{"name":"label","datatype":"BYTES","shape":[1],"data":["setosa"]}]}'
)


def response(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Conn(asyncio.Protocol):
    """One client connection: requests parsed by httptools, answered in order after the delay."""

    __slots__ = ("transport", "parser", "delay", "answer", "pending", "keep_alive")

    def __init__(self, delay: float, answer: bytes) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.delay = delay
        self.answer = answer
        # One flag per request read and not yet answered: True once its delay is over.
        self.pending: deque[list[bool]] = deque()
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()

    def on_message_complete(self) -> None:
        done = [False]
        self.pending.append(done)
        if not self.parser.should_keep_alive():
            self.keep_alive = False
        asyncio.get_running_loop().call_later(self.delay, self._ready, done)

    def _ready(self, done: list[bool]) -> None:
        done[0] = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        while self.pending and self.pending[0][0]:  # in order: pipelined answers wait
            self.pending.popleft()
            transport.write(self.answer)
        if not self.pending and not self.keep_alive:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pending.clear()


async def serve(port: int, delay_ms: float, body: bytes) -> None:
    loop = asyncio.get_running_loop()
    answer = response(body)
    server = await loop.create_server(lambda: _Conn(delay_ms / 1000.0, answer), "127.0.0.1",
                                      port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"slow_backend: 127.0.0.1:{port}, {delay_ms:g} ms per request", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A backend answering after a fixed delay.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--body", default=DEFAULT_BODY)
    args = p.parse_args(argv)
    if not 0 <= args.delay_ms <= 10_000:
        p.error("--delay-ms must be in [0, 10000]")
    if not 0 < args.port < 65536:
        p.error("--port must be in 1..65535")
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.port, args.delay_ms, args.body.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
