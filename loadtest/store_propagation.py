#!/usr/bin/env python3
"""How soon another gateway process sees a change: RedisStore write → other process's watcher.

    python loadtest/store_propagation.py [--trials 100] [--gap 0.01] [--resync 1.0] [--json out]

Starts its own redis-server (no persistence, 127.0.0.1, a free port) and a reader process with
a `RedisStore` whose watcher notes when each version arrives (CLOCK_MONOTONIC: one clock for
every process on the host). This process writes `--trials` versions of one document, `--gap`
seconds apart, noting when each write returned. Prints p50/p95/p99/max of (arrival - write
returned), in ms; negative means the change was there before the writer's call returned. The
target is p99 < 100 ms (pub/sub normally delivers in about a millisecond; a lost message waits
for the resync, `--resync` seconds at most).

Bounds: 127.0.0.1 only; a few seconds; the redis-server and the reader are stopped by their
PIDs at the end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.store.redis import RedisStore  # noqa: E402

KEY = "route/propagation"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--logfile", str(Path(workdir) / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    proc.wait(10)
    sys.exit(f"redis-server did not answer on port {port}")


def reader(url: str, resync: float, pipe: Connection) -> None:
    """The other gateway process: records when each version reaches its watcher."""

    async def run() -> None:
        arrivals: dict[int, float] = {}
        store = RedisStore(url, resync_interval=resync)

        def arrived(key: str, doc: Any, version: int) -> None:
            if key == KEY:
                arrivals.setdefault(version, time.monotonic())

        store.watch(arrived)
        await store.start()
        pipe.send("ready")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pipe.recv)  # "done"
        await store.close()
        pipe.send(arrivals)

    asyncio.run(run())


async def write_all(url: str, trials: int, gap: float) -> dict[int, float]:
    store = RedisStore(url)
    await store.start()
    returned: dict[int, float] = {}
    try:
        for version in range(1, trials + 1):
            await store.write(KEY, {"live": "blue" if version % 2 else "green", "n": version},
                              version - 1)
            returned[version] = time.monotonic()
            await asyncio.sleep(gap)
        await asyncio.sleep(0.2)  # let the last ones arrive
    finally:
        await store.close()
    return returned


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between writes")
    parser.add_argument("--resync", type=float, default=1.0, help="reader's resync interval")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not 1 <= args.trials <= 100_000 or not 0 <= args.gap <= 10:
        sys.exit("--trials 1..100000, --gap 0..10")

    workdir = tempfile.mkdtemp(prefix="modelgate-propagation-")
    port = free_port()
    redis_proc = start_redis(port, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=reader, args=(url, args.resync, theirs), daemon=True)
    try:
        proc.start()
        if not ours.poll(20) or ours.recv() != "ready":
            sys.exit("the reader did not start")
        returned = asyncio.run(write_all(url, args.trials, args.gap))
        ours.send("done")
        if not ours.poll(20):
            sys.exit("the reader did not report")
        arrivals: dict[int, float] = ours.recv()
    finally:
        if proc.pid is not None and proc.is_alive():
            proc.terminate()
        proc.join(10)
        redis_proc.terminate()
        try:
            redis_proc.wait(10)
        except subprocess.TimeoutExpired:
            redis_proc.kill()
            redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    delays = [(arrivals[v] - returned[v]) * 1000 for v in returned if v in arrivals]
    missing = sorted(set(returned) - set(arrivals))
    figures: dict[str, Any] = {
        "trials": args.trials, "arrived": len(delays), "skipped_versions": len(missing),
        "p50_ms": percentile(delays, 0.50), "p95_ms": percentile(delays, 0.95),
        "p99_ms": percentile(delays, 0.99), "max_ms": max(delays),
        "mean_ms": statistics.fmean(delays),
    }
    print(f"{figures['arrived']}/{args.trials} versions arrived one by one"
          f" ({len(missing)} covered by a later one)")
    print("write returned → other process's watcher, ms: "
          + "  ".join(f"{k[:-3]} {figures[k]:.2f}" for k in ("p50_ms", "p95_ms", "p99_ms",
                                                              "max_ms")))
    print("target p99 < 100 ms:", "met" if figures["p99_ms"] < 100 else "MISSED")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
