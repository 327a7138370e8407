"""Does shadow mode leave the client alone? Shadow off vs a DOWN shadow vs a 2-second shadow.

    .venv/bin/python loadtest/shadow_isolation.py            # ~55 s, prints a table
    .venv/bin/python loadtest/shadow_isolation.py --rate 300 --seconds 10 --rounds 3 --json

Three processes, all on 127.0.0.1: the model servers (blue v1 answering at once, `slow` v2
answering after 2 s), the gateway (uvloop, aiohttp upstream), and this script as an open-loop
load generator: requests leave at fixed intervals whatever the answers do, and latency counts
from each request's *intended* send time, so a stalled gateway cannot hide its stall
(no coordinated omission). The route's shadow is switched through the admin API between runs;
conditions are interleaved (off, down, slow) for `--rounds` rounds and the figures are the
medians over rounds, since only ratios measured in one run mean anything on a shared machine.
The `down` backend is a port nobody listens on. Reported per condition: client errors, p50 and
p99, the gateway's CPU time per request (steadier than latency when the machine is shared),
copies dropped, shadow errors/timeouts; and the gateway's RSS at start, at peak and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "loadtest-token-123"
INFER = "/v2/models/classifier/infer"
RANGES = [(4.0, 8.0), (2.0, 4.5), (1.0, 7.0), (0.1, 2.5)]
CONDITIONS = ("off", "down", "slow")


# --------------------------------------------------------------------------------------------
# child processes


async def _serve_models() -> None:
    from gateway.demo.model_server import start_model_server

    # Copies still sleeping in the slow server when it stops are expected: keep quiet.
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    blue, blue_port = await start_model_server("v1")
    slow, slow_port = await start_model_server("v2", latency_ms=2000)
    print(json.dumps({"blue": blue_port, "slow": slow_port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await blue.cleanup()
    await slow.cleanup()


async def _serve_gateway(config_json: str, upstream: str) -> None:
    from gateway.app import Gateway
    from gateway.config import parse_config

    gateway = Gateway(parse_config(json.loads(config_json)), upstream_kind=upstream)
    await gateway.start()
    assert gateway.admin_address is not None
    print(json.dumps({"proxy": gateway.addresses[0][1], "admin": gateway.admin_address[1]}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await gateway.stop(drain_timeout=1)


def _run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _spawn(*args: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise SystemExit(f"child {args[0]} failed to start (exit {proc.returncode})")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: steadier than latency on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# load


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _open_loop(session: aiohttp.ClientSession, url: str, rate: float, seconds: float,
                     rng: random.Random) -> tuple[list[float], int]:
    """Send rate x seconds requests at fixed intervals; (latencies in s, errors)."""
    n = int(rate * seconds)
    bodies = [json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                                      "data": [[round(rng.uniform(lo, hi), 2)
                                                for lo, hi in RANGES]]}]}).encode()
              for _ in range(64)]
    latencies: list[float] = []
    errors = 0

    async def one(i: int, intended: float) -> None:
        nonlocal errors
        try:
            async with session.post(url, data=bodies[i % len(bodies)],
                                    headers={"Content-Type": "application/json",
                                             "x-user-id": f"user-{i % 500}"}) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
        except (aiohttp.ClientError, TimeoutError):
            errors += 1
        latencies.append(time.perf_counter() - intended)

    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(n):
        intended = start + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, intended)))
    await asyncio.gather(*tasks)
    return latencies, errors


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    models, ports = _spawn("--serve-models")
    gateway = None
    try:
        blue = f"http://127.0.0.1:{ports['blue']}"
        slow = f"http://127.0.0.1:{ports['slow']}"
        down = f"http://127.0.0.1:{_free_port()}"
        config = {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
            "routes": [{
                "name": "classifier",
                "match": {"path_prefix": "/v2/models/classifier"},
                "backends": {"blue": {"url": blue}, "slow": {"url": slow},
                             "down": {"url": down}},
                "live": "blue",
                "sticky": {"header": "x-user-id"},
                "shadow": {"timeout": "5s", "compare": {"preset": "kserve_v2"}},
            }],
        }
        gateway, gports = _spawn("--serve-gateway", json.dumps(config), args.upstream)
        proxy_url = f"http://127.0.0.1:{gports['proxy']}{INFER}"
        admin = f"http://127.0.0.1:{gports['admin']}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        rng = random.Random(42)
        connector = aiohttp.TCPConnector(limit=512)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def set_shadow(condition: str) -> None:
                url = f"{admin}/admin/routes/classifier/shadow"
                if condition == "off":
                    resp = await session.delete(url, headers=auth)
                else:
                    resp = await session.put(url, headers=auth,
                                             json={"backend": condition, "sample": 100})
                resp.raise_for_status()
                resp.release()

            async def shadow_totals(backend: str) -> dict[str, int]:
                async with session.get(f"{admin}/admin/routes/classifier/shadow",
                                       params={"backend": backend}, headers=auth) as resp:
                    rep = await resp.json()
                total = rep["total"] or {}
                return {k: total.get(k, 0) for k in ("dropped", "shadow_errors",
                                                     "shadow_timeouts", "mirrored")}

            # Warm-up: connections, caches, the first shadow switch.
            await _open_loop(session, proxy_url, args.rate, min(1.0, args.seconds), rng)
            pid = gateway.pid
            rss_start = _rss_mib(pid)
            peak = [rss_start]

            async def sample_rss(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], _rss_mib(pid))
                    await asyncio.sleep(0.25)

            results: dict[str, list[dict[str, Any]]] = {c: [] for c in CONDITIONS}
            for rnd in range(args.rounds):
                for condition in CONDITIONS:
                    await set_shadow(condition)
                    before = (await shadow_totals(condition) if condition != "off" else {})
                    sampler_stop = asyncio.Event()
                    sampler = asyncio.create_task(sample_rss(sampler_stop))
                    cpu_before = _cpu_seconds(pid)
                    lat, errors = await _open_loop(session, proxy_url, args.rate, args.seconds,
                                                   rng)
                    cpu = _cpu_seconds(pid) - cpu_before
                    sampler_stop.set()
                    await sampler
                    after = (await shadow_totals(condition) if condition != "off" else {})
                    run = {"round": rnd + 1, "requests": len(lat), "errors": errors,
                           "p50_ms": _quantile(lat, 0.5) * 1000,
                           "p99_ms": _quantile(lat, 0.99) * 1000,
                           "gateway_cpu_us_per_request": cpu / len(lat) * 1e6,
                           **{k: after[k] - before.get(k, 0) for k in after}}
                    results[condition].append(run)
                    print(f"round {rnd + 1} {condition:>4}: {run}", file=sys.stderr, flush=True)
            await set_shadow("off")
            rss_end = _rss_mib(pid)
    finally:
        if gateway is not None:
            _stop(gateway)
        _stop(models)

    summary = {}
    for condition, runs in results.items():
        summary[condition] = {
            "runs": len(runs),
            "requests": sum(r["requests"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "p50_ms_median": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in runs),
            "p99_ms_runs": [round(r["p99_ms"], 2) for r in runs],
            "gateway_cpu_us_per_request_median": statistics.median(
                r["gateway_cpu_us_per_request"] for r in runs),
            "dropped": sum(r.get("dropped", 0) for r in runs),
            "shadow_errors": sum(r.get("shadow_errors", 0) for r in runs),
            "shadow_timeouts": sum(r.get("shadow_timeouts", 0) for r in runs),
            "mirrored": sum(r.get("mirrored", 0) for r in runs),
        }
    return {
        "rate": args.rate, "seconds": args.seconds, "rounds": args.rounds,
        "upstream": args.upstream, "cpus": os.cpu_count(),
        "conditions": summary,
        "gateway_rss_mib": {"start": round(rss_start, 1), "peak": round(peak[0], 1),
                            "end": round(rss_end, 1)},
    }


def _print_table(result: dict[str, Any]) -> None:
    print(f"open loop {result['rate']:g} req/s x {result['seconds']:g} s per run, "
          f"{result['rounds']} interleaved rounds, upstream={result['upstream']}")
    print(f"{'condition':<10}{'requests':>9}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'cpu us/req':>11}{'dropped':>9}{'sh.err':>8}{'sh.tmo':>8}  p99 per round")
    for name, c in result["conditions"].items():
        print(f"{name:<10}{c['requests']:>9}{c['errors']:>8}{c['p50_ms_median']:>9.2f}"
              f"{c['p99_ms_median']:>9.2f}{c['gateway_cpu_us_per_request_median']:>11.0f}"
              f"{c['dropped']:>9}{c['shadow_errors']:>8}{c['shadow_timeouts']:>8}"
              f"  {c['p99_ms_runs']}")
    rss = result["gateway_rss_mib"]
    print(f"gateway RSS MiB: start {rss['start']}, peak {rss['peak']}, end {rss['end']}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-models":
        _run(_serve_models())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-gateway":
        _run(_serve_gateway(sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--upstream", choices=("aiohttp", "fast"), default="aiohttp")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    result = asyncio.run(_measure(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)


if __name__ == "__main__":
    main()
