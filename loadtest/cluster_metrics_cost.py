"""What cluster-wide metrics cost a gateway process, per tick, for N backends.

Starts a redis-server on a free loopback port and plays `--processes` gateway processes in this
one (a `Recorder` and a `ClusterMetrics` each, one fake clock). Every simulated second each
backend of each process sees `--rps` requests (latencies over ~20 histogram buckets, 5 % 5xx)
and a few probe counters; then every process publishes (`publish_once`) and reads
(`read_once`). Prints, per tick and process (medians): the event-loop time of building the
batch (CPU on the proxy's loop), the whole publish (with the Redis round trip and the Lua
script), the whole read, and the time Redis spends in each Lua script (SLOWLOG). The hot path
is not involved: it fills the same `BackendStats` with or without any of this.

    .venv/bin/python loadtest/cluster_metrics_cost.py --backends 10 50 200
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis  # noqa: E402

from gateway.cluster.metrics import ClusterMetrics  # noqa: E402
from gateway.metrics import Recorder  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def traffic(recorder: Recorder, backends: int, rps: int, rng: random.Random) -> None:
    for b in range(backends):
        stats = recorder.stats(f"route{b // 2}", f"backend{b % 2}")
        for _ in range(rps):
            stats.observe(503 if rng.random() < 0.05 else 200, rng.lognormvariate(-4.5, 0.6))
        stats.add_many([("output_total", float(rps)), ("output_null", 1.0),
                        (f"label:{rng.choice('abc')}", float(rps))])


async def run(backends: int, processes: int, rps: int, ticks: int, url: str) -> dict[str, float]:
    clock = Clock()
    rng = random.Random(1)
    clients = [aioredis.Redis.from_url(url, socket_timeout=10) for _ in range(processes)]
    procs = []
    for i, client in enumerate(clients):
        recorder = Recorder(clock)
        procs.append((recorder, ClusterMetrics(client, f"bench{backends}", f"p{i}", recorder,
                                               clock=clock)))
    build: list[float] = []
    publish: list[float] = []
    read: list[float] = []
    await clients[0].config_set("slowlog-log-slower-than", 0)  # log every command's time
    await clients[0].config_set("slowlog-max-len", 4096)
    try:
        for tick in range(ticks):
            second = 1_000_000 + tick
            clock.now = second + 0.5  # the traffic of one second
            for recorder, _ in procs:
                traffic(recorder, backends, rps, rng)
            clock.now = second + 1.05  # just after it: publish it
            for _, metrics in procs:
                t = time.perf_counter()
                metrics._build(clock.now, False)  # what publish_once does on the loop
                build.append(time.perf_counter() - t)
                metrics._seq -= 1  # that batch is never sent
                t = time.perf_counter()
                await metrics.publish_once()
                publish.append(time.perf_counter() - t)
            clock.now = second + 1.3  # then read it
            for _, metrics in procs:
                t = time.perf_counter()
                await metrics.read_once()
                read.append(time.perf_counter() - t)
        log = await clients[0].slowlog_get(4096)
        await clients[0].slowlog_reset()
        metrics = procs[0][1]
        by_sha: dict[bytes, list[int]] = {}
        for entry in log:
            command = entry["command"].split(b" ")
            if command[0].upper() == b"EVALSHA":
                by_sha.setdefault(command[1], []).append(int(entry["duration"]))
        apply_us = by_sha.get(metrics._apply_script.sha.encode(), [0])
        read_us = by_sha.get(metrics._read_script.sha.encode(), [0])
    finally:
        for client in clients:
            await client.aclose()
    warm = slice(2 * processes, None)  # the first read loads the whole history
    return {"build_ms": statistics.median(build[warm]) * 1000,
            "publish_ms": statistics.median(publish[warm]) * 1000,
            "read_ms": statistics.median(read[warm]) * 1000,
            "apply_us": statistics.median(apply_us), "read_us": statistics.median(read_us)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rps", type=int, default=200, help="per backend and process")
    parser.add_argument("--ticks", type=int, default=20)
    args = parser.parse_args()
    server = RedisServer()
    server.start()
    try:
        print(f"{args.processes} processes, {args.rps} req/s per backend and process; "
              "medians per tick and process")
        print(f"{'backends':>8} {'build ms':>9} {'publish ms':>11} {'read ms':>8} "
              f"{'Redis: publish µs':>18} {'read µs':>8}")
        for n in args.backends:
            r = await run(n, args.processes, args.rps, args.ticks, server.url)
            print(f"{n:>8} {r['build_ms']:>9.2f} {r['publish_ms']:>11.2f} {r['read_ms']:>8.2f} "
                  f"{r['apply_us']:>18.0f} {r['read_us']:>8.0f}")
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
