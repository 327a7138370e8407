"""Closed-loop micro-benchmark of the `Upstream` implementations against a local backend.

    python loadtest/bench_upstream.py --seconds 3

Starts a tiny HTTP/1.1 backend (asyncio Protocol + httptools, ~100-byte answers) in a
subprocess on 127.0.0.1, then drives each implementation with `--concurrency` loops of
send + read (a ~120-byte POST, like PERF-NOTES) under uvloop. Implementations are interleaved
over `--rounds` rounds, since this machine's noise is large: only the medians and their ratio
from one run mean anything. Traffic stays on 127.0.0.1; the backend is stopped by its PID.
On a machine with two or more CPUs the backend and the client are pinned to different ones.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import Timeouts  # noqa: E402
from gateway.upstream import Upstream, make_upstream  # noqa: E402

KINDS = ("aiohttp", "fast")
BODY = b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'
HEADERS = [
    ("Content-Type", "application/json"),
    ("User-Agent", "bench/1.0"),
    ("Accept", "*/*"),
    ("X-Forwarded-For", "127.0.0.1"),
    ("X-Request-Id", "0123456789abcdef"),
]
TIMEOUTS = Timeouts(connect=2.0, read=5.0)
REPLY_BODY = b'{"model_name":"classifier","outputs":[{"name":"label","data":[0]}]}'
REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(REPLY_BODY), REPLY_BODY)
)


# The backend (runs in the subprocess)


class _Backend(asyncio.Protocol):
    """Answers every request with REPLY; keep-alive, no limits. A ceiling, not a server."""

    def __init__(self) -> None:
        import httptools

        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's isn't a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(REPLY)


async def _serve(stop_after: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Backend, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    # Bounded even if the parent dies without stopping us.
    await asyncio.sleep(stop_after)
    server.close()


# The client


async def _run_once(kind: str, origin: str, seconds: float, concurrency: int) -> float:
    upstream: Upstream = make_upstream(origin, kind)
    done = 0
    stop = False

    async def worker() -> None:
        nonlocal done
        send = upstream.send
        while not stop:
            resp = await send("POST", "/v2/models/classifier/infer", HEADERS, BODY, TIMEOUTS)
            body = await resp.read()
            if resp.status != 200 or len(body) != len(REPLY_BODY):
                raise RuntimeError(f"bad answer: {resp.status} {body!r}")
            done += 1

    try:
        # Warm-up: open the connections, fill caches.
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(min(0.5, seconds / 4))
        start_count, started = done, time.perf_counter()
        await asyncio.sleep(seconds)
        count, elapsed = done - start_count, time.perf_counter() - started
        stop = True
        await asyncio.gather(*workers)
    finally:
        await upstream.close()
    return count / elapsed


async def _bench(origin: str, seconds: float, concurrency: int, rounds: int) -> None:
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for i in range(rounds):
        order = KINDS if i % 2 == 0 else KINDS[::-1]  # interleave, alternating who goes first
        for kind in order:
            rate = await _run_once(kind, origin, seconds, concurrency)
            results[kind].append(rate)
            print(f"round {i + 1} {kind:8s} {rate:9.0f} req/s", flush=True)
    medians = {kind: statistics.median(rates) for kind, rates in results.items()}
    print()
    for kind in KINDS:
        print(f"median {kind:8s} {medians[kind]:9.0f} req/s   "
              f"{1e6 / medians[kind]:6.1f} µs/request (client side, wall)")
    # Paired within each round too: noise that drifts over the run cancels out of these.
    paired = [f / a for f, a in zip(results["fast"], results["aiohttp"], strict=True)]
    print(f"fast / aiohttp = {medians['fast'] / medians['aiohttp']:.2f} (of medians); "
          f"per round {', '.join(f'{r:.2f}' for r in paired)}, "
          f"median {statistics.median(paired):.2f}")


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {cpu})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop workers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import uvloop

    if args.serve is not None:  # we are the backend subprocess
        _pin(1)
        uvloop.run(_serve(args.serve))
        return

    budget = args.rounds * len(KINDS) * (args.seconds + 2) + 30
    backend = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(budget)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert backend.stdout is not None
        port = int(backend.stdout.readline())
        _pin(0)
        print(f"backend pid {backend.pid} on 127.0.0.1:{port}; {args.concurrency} loops, "
              f"{args.seconds}s x {args.rounds} rounds per implementation")
        uvloop.run(_bench(f"http://127.0.0.1:{port}", args.seconds, args.concurrency,
                          args.rounds))
    finally:
        backend.terminate()
        try:
            backend.wait(timeout=5)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()


if __name__ == "__main__":
    main()
