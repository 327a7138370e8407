"""How long until every other gateway process routes by a change: the scale-out target is
100 ms p99 from the write returning.

Starts a redis-server on a free loopback port, a *follower* process (a `Gateway` on that store,
no listeners) that prints when each routing-state version reaches its snapshot, and in this
process a *writer* `Gateway` that changes the canary weight `--trials` times. The delay of a
trial is the follower's apply time minus the moment the writer's call returned (one machine,
one clock). Prints p50/p99/max; `--json FILE` writes them. Every process it starts is stopped
by its PID.

    .venv/bin/python loadtest/cluster_propagation.py --trials 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

CONFIG: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "admin": {"listen": "127.0.0.1:0"},
    "routes": [{
        "name": "classifier", "match": {"path_prefix": "/"},
        "backends": {"blue": {"url": "http://127.0.0.1:9"}, "green": {"url": "http://127.0.0.1:9"}},
        "live": "blue", "sticky": {"header": "x-user-id"},
    }],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_for(store_url: str) -> Any:
    from gateway.app import Gateway
    from gateway.config import parse_config

    return Gateway(parse_config({**CONFIG, "store": store_url}), components=[])


async def follower(store_url: str) -> None:
    """Print `applied <version> <unix time>` as each new routing state is swapped in."""
    gateway = gateway_for(store_url)

    def applied(route: str, state: Any) -> None:
        print(f"applied {state.version} {time.time():.6f}", flush=True)

    gateway.control.on_change(applied)
    await gateway.start(serve_proxy=False, serve_admin=False)
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await gateway.stop(drain_timeout=0)


async def writer(store_url: str, trials: int, pause: float) -> list[float]:
    gateway = gateway_for(store_url)
    await gateway.start(serve_proxy=False, serve_admin=False)
    child = subprocess.Popen([sys.executable, __file__, "--follow", store_url],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, child.stdout.readline)) != "ready\n":
            if not line:
                raise SystemExit("the follower did not start")
        returned: dict[int, float] = {}
        for i in range(trials):
            state = await gateway.control.set_canary("classifier", "green", float(i % 50 + 1),
                                                     actor="bench")
            returned[state.version] = time.time()
            await asyncio.sleep(pause)
        await asyncio.sleep(1.0)
    finally:
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=20)
        await gateway.stop(drain_timeout=0)
    applied = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "applied":
            applied.setdefault(int(parts[1]), float(parts[2]))
    missing = [v for v in returned if v not in applied]
    if missing:
        raise SystemExit(f"{len(missing)} of {trials} changes never reached the follower")
    return [max(0.0, applied[v] - t) * 1000 for v, t in returned.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between writes")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--follow", metavar="STORE_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        asyncio.run(follower(args.follow))
        return 0
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 1
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="modelgate-prop-")
    redis = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", workdir],
                             stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.02)
        delays = asyncio.run(writer(f"redis://127.0.0.1:{port}/0", args.trials, args.pause))
    finally:
        os.kill(redis.pid, signal.SIGTERM)
        redis.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    delays.sort()
    p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))]
    result = {"trials": len(delays), "p50_ms": round(statistics.median(delays), 3),
              "p99_ms": round(p99, 3), "max_ms": round(delays[-1], 3)}
    print(f"{result['trials']} changes: applied by the other process p50 "
          f"{result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
          f"(target: p99 <= 100 ms)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
