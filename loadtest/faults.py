#!/usr/bin/env python3
"""The fault suite: each fault injected under steady open-loop load, one table of outcomes.

    .venv/bin/python loadtest/faults.py                      # every scenario, 300 req/s x 12 s
    .venv/bin/python loadtest/faults.py --rate 300 --seconds 12 --only switch_storm,url_killed \
        --json faults.json

Per scenario it starts, on free 127.0.0.1 ports, what the scenario needs (demo model servers,
a fresh gateway, a redis-server) and sends open-loop POSTs (Poisson arrivals at `--rate`,
latency counted from each request's intended send time: bench.py's generator) to the proxy.
`--fault-at` seconds into the measured window (default 3 s) the fault is injected: a model
server's `POST /faults`, a SIGKILL of a real model-server process, admin calls, SIGTERM to the
gateway, sockets opened by this script, a lowered RLIMIT_NOFILE, killing redis-server.

Table: scenario, requests sent, failed (client-visible: 5xx by status, resets, connect errors,
timeouts), p99 ms of the successful requests, what recovered (computed from observations) and
a verdict against the expected outcome (see EXPECTED). Exit status 1 when a scenario that must
have zero failed requests had some (or could not run), else 0.

Every process this starts is stopped by its PID after its scenario, on errors and on
Ctrl-C/SIGTERM (bench.Processes; the children also die with this script, PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (loadtest/bench.py: the open-loop generator and process handling)

TOKEN = "faultsuite-admin-token-0123456789"
ROUTE = "classifier"
PATH = bench.PATH  # /v2/models/classifier/infer
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ZERO = "zero failed"

# What each scenario must show. `zero` scenarios fail the run (exit 1) when they do not.
EXPECTED: dict[str, tuple[bool, str]] = {
    "switch_storm": (True, ZERO),
    "shadow_down": (True, ZERO),
    "shadow_slow": (True, ZERO),
    "canary_killed_fallback": (True, ZERO + ", rolled back"),
    "canary_killed_no_fallback": (False, "some failed, rolled back, none after"),
    "url_killed": (True, ZERO + ", URL ejected"),
    "backend_hang": (False, "only 504s, at the read timeout; 200s after"),
    "slow_idle_clients": (False, "/healthz answers throughout; idle ones closed"),
    "fd_exhaustion": (False, "/healthz answers throughout; serving after"),
    "sigterm_drain": (True, ZERO + " (refused after stop apart)"),
    "overload_3x": (False, "only 503 + Retry-After; admitted p99 bounded"),
    "redis_killed": (False, "traffic flows; changes fail cleanly, resume"),
}


# ---------------------------------------------------------------------------------------------
# Load: bench.py's open-loop pool, with each failure's time kept (to tell before from after).


class _TimedPool(bench._Pool):
    """bench's pool, also keeping (sent, kind) of each failure and (sent, done) of each 2xx."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.failures: list[tuple[float, str]] = []
        self.oks: list[tuple[float, float]] = []
        self._lost_sent: float | None = None

    def response(self, conn: bench._Conn, status: int, keep_alive: bool) -> None:
        if conn.busy and conn.counted:
            if 200 <= status < 300:
                self.oks.append((conn.sent_at, time.perf_counter()))
            else:
                self.failures.append((conn.sent_at, f"http_{status}"))
        super().response(conn, status, keep_alive)

    def lost(self, conn: bench._Conn) -> None:
        self._lost_sent = conn.sent_at if conn.busy else None
        try:
            super().lost(conn)
        finally:
            self._lost_sent = None

    def _finish(self, counted: bool, kind: str) -> None:
        if counted:  # a connect failure was never sent: "sent" is now
            sent = self._lost_sent if self._lost_sent is not None else time.perf_counter()
            self.failures.append((sent, kind))
        super()._finish(counted, kind)


@dataclass
class LoadStats:
    t0: float  # perf_counter at the start of the measured window
    sent: int
    ok: int
    failures: list[tuple[float, str]]  # (sent, kind); kind http_504, reset, connect, timeout...
    oks: list[tuple[float, float]]  # (sent, done) of the 2xx answers
    p99_ms: float

    def kinds(self, after: float = -math.inf, before: float = math.inf) -> Counter[str]:
        return Counter(k for t, k in self.failures if after <= t < before)


class Load:
    """Open-loop POSTs to the proxy in the background; `at(s)` waits for s into the window."""

    def __init__(self, url: str, rate: float, seconds: float, warmup: float,
                 timeout: float, connections: int) -> None:
        parts = url.split("/", 3)
        host, port = parts[2].rsplit(":", 1)
        self.pool = _TimedPool(host, int(port), bench.build_requests(parts[2], "/" + parts[3]),
                               connections, 20_000, timeout)
        self.rate, self.seconds, self.warmup, self.timeout = rate, seconds, warmup, timeout
        self.t0 = time.perf_counter() + 0.01 + warmup
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        pool = self.pool
        rng = random.Random(1)
        sweeper = asyncio.get_running_loop().create_task(pool.sweep())
        try:
            async for intended in bench.arrivals(rng, self.rate, self.t0 - self.warmup,
                                                 self.t0 + self.seconds):
                pool.fire(intended, intended >= self.t0)
            await pool.drain(self.timeout)
        finally:
            sweeper.cancel()
            await asyncio.wait({sweeper})
            await pool.close()

    def now(self) -> float:
        """Seconds into the measured window."""
        return time.perf_counter() - self.t0

    async def at(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + seconds - time.perf_counter()))

    async def finish(self) -> LoadStats:
        await self._task
        pool = self.pool
        # p99 from the intended send time, as bench reports it (no coordinated omission).
        lat = sorted(pool.latencies)
        return LoadStats(self.t0, pool.count, pool.ok, list(pool.failures), list(pool.oks),
                         bench.percentile(lat, 99) * 1000.0)

    async def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Gateway:
    proc: bench.Proc
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@dataclass
class Outcome:
    stats: LoadStats
    recovered: str
    ok: bool  # the expectation held
    failed: Counter[str] | None = None  # when not every failure counts (drain)
    extra: dict[str, Any] = field(default_factory=dict)


def server_keys() -> set[str]:
    """The ServerConfig keys this checkout knows (the `limits` branch adds some)."""
    from gateway.config import ServerConfig

    return {f.name for f in dataclasses.fields(ServerConfig)}


_ALL: list[bench.Processes] = []  # every scenario's children, for the last-resort stop


class Ctx:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.procs = bench.Processes(workdir, pin=False)
        _ALL.append(self.procs)
        self.workdir = workdir
        self.session: aiohttp.ClientSession | None = None
        self.n = 0
        self.pending: list[tuple[bench.Proc, int, float]] = []  # model servers starting
        self.loads: list[Load] = []  # cancelled and awaited when the scenario ends

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    def _name(self, base: str) -> str:
        self.n += 1
        return f"{base}-{self.n}"

    def model(self, version: str = "v1", latency_ms: float = 0.0,
              port: int | None = None) -> tuple[bench.Proc, int]:
        port = port or bench.free_port()
        argv = [sys.executable, "-m", "gateway", "model-server", "--version", version,
                "--port", str(port), "--latency-ms", str(latency_ms)]
        proc = self.procs.start(self._name(f"model-{version}"), argv, None,
                                {**os.environ, "PYTHONPATH": str(ROOT)})
        # Ready-checked by gateway(), which starts meanwhile: the imports take seconds.
        self.pending.append((proc, port, 30 + latency_ms / 1000))
        return proc, port

    def gateway(self, routes: list[dict[str, Any]], *, nofile: int | None = None,
                **top: Any) -> Gateway:
        port, admin_port = bench.free_port(), bench.free_port()
        config = {"listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{admin_port}"},
                  "drain_timeout": "5s", "routes": routes, **top}
        name = self._name("gateway")
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        argv = [sys.executable, "-m", "gateway", "serve", "-c", str(path),
                "--log-level", "warning"]
        if nofile is not None:
            prlimit = shutil.which("prlimit")
            if prlimit is None:
                raise bench.BenchError("prlimit (util-linux) is not installed")
            argv = [prlimit, f"--nofile={nofile}:{nofile}", "--", *argv]
        env = {**os.environ, "MODELGATE_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT)}
        proc = self.procs.start(name, argv, None, env)
        for model, model_port, timeout in self.pending:
            bench.wait_ready(model, model_port, timeout)
        self.pending.clear()
        bench.wait_ready(proc, port)
        return Gateway(proc, port, admin_port)

    def redis(self, port: int) -> bench.Proc:
        exe = shutil.which("redis-server")
        if exe is None:
            raise bench.BenchError("redis-server is not installed")
        proc = self.procs.start(self._name("redis"), [
            exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir)], None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc
            time.sleep(0.05)
        raise bench.BenchError(f"redis-server did not answer on port {port}")

    def load(self, gw: Gateway, timeout: float = 5.0) -> Load:
        load = Load(gw.url, self.args.rate, self.args.seconds, 0.5, timeout, 1024)
        self.loads.append(load)
        return load

    # Admin and model-server calls (JSON in, (status, JSON or text) out; never raises on 4xx).
    async def call(self, method: str, url: str, body: Any = None,
                   timeout: float = 2.0) -> tuple[int, Any]:
        try:
            async with self.http.request(method, url, json=body, headers=AUTH,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                with contextlib.suppress(ValueError):
                    return resp.status, json.loads(text)
                return resp.status, text
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    async def admin(self, gw: Gateway, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.call(method, f"{gw.admin}{path}", body)

    async def faults(self, port: int, **knobs: float) -> None:
        status, body = await self.call("POST", f"http://127.0.0.1:{port}/faults", knobs)
        if status != 200:
            raise bench.BenchError(f"POST /faults {knobs}: {status} {body}")

    async def metric(self, gw: Gateway, name: str) -> float:
        """The sum of a metric's samples on the gateway's /metrics (0 when absent)."""
        status, text = await self.call("GET", f"{gw.admin}/metrics")
        total = 0.0
        if status == 200 and isinstance(text, str):
            for line in text.splitlines():
                if line.startswith(name) and line[len(name):len(name) + 1] in "{ ":
                    total += float(line.rsplit(" ", 1)[1])
        return total

    async def healthz_until(self, gw: Gateway, stop: asyncio.Event,
                            every: float = 0.2) -> tuple[int, int]:
        """Poll admin /healthz on a fresh connection each time until `stop`: (answered, tried)."""
        answered = tried = 0
        while not stop.is_set():
            tried += 1
            try:
                async with aiohttp.ClientSession() as fresh, fresh.get(
                        f"{gw.admin}/healthz", timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                    answered += resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
        return answered, tried


def route(backends: dict[str, Any], live: str = "blue", **extra: Any) -> dict[str, Any]:
    return {"name": ROUTE, "match": {"path_prefix": "/v2/models/classifier"},
            "backends": backends, "live": live, "sticky": {"header": "x-user-id"}, **extra}


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


async def until(check: Callable[[], Awaitable[bool]], timeout: float,
                every: float = 0.1) -> float | None:
    """Seconds until `check()` is true, polling; None if it never was within `timeout`."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if await check():
            return time.perf_counter() - start
        await asyncio.sleep(every)
    return None


# ---------------------------------------------------------------------------------------------
# Scenarios


async def switch_storm(ctx: Ctx) -> Outcome:
    _, blue = ctx.model("v1")
    _, green = ctx.model("v2")
    gw = ctx.gateway([route({"blue": {"url": url(blue)}, "green": {"url": url(green)}})])
    load = ctx.load(gw)
    await load.at(ctx.args.fault_at)
    start = time.perf_counter()
    statuses: Counter[int] = Counter()
    for i in range(20):
        s1, _ = await ctx.admin(gw, "POST", f"/admin/routes/{ROUTE}/switch",
                                {"to": "green", "reason": f"storm {i}"})
        s2, _ = await ctx.admin(gw, "POST", f"/admin/routes/{ROUTE}/rollback",
                                {"reason": f"storm {i}"})
        statuses.update((s1, s2))
    took = time.perf_counter() - start
    _, state = await ctx.admin(gw, "GET", f"/admin/routes/{ROUTE}")
    live = state.get("live") if isinstance(state, dict) else None
    stats = await load.finish()
    changes_ok = statuses[200]
    return Outcome(stats, f"{changes_ok}/40 switch+rollback ok in {took:.1f} s; live={live}",
                   not stats.failures and changes_ok == 40 and live == "blue")


async def _shadow(ctx: Ctx, slow: bool) -> Outcome:
    _, blue = ctx.model("v1")
    _, shadow = ctx.model("v2")
    target = url(shadow) if slow else url(bench.free_port())  # down: nobody listens there
    gw = ctx.gateway([route({"blue": {"url": url(blue)}, "shadow": {"url": target}},
                            shadow={"timeout": "2s", "compare": {"preset": "kserve_v2"}})])
    rss0 = rss_mib(gw.proc.pid)
    load = ctx.load(gw)
    await load.at(ctx.args.fault_at)
    if slow:
        await ctx.faults(shadow, latency_ms=1500)
    status, body = await ctx.admin(gw, "PUT", f"/admin/routes/{ROUTE}/shadow",
                                   {"backend": "shadow", "sample": 100})
    if status != 200:
        raise bench.BenchError(f"PUT shadow: {status} {body}")
    peak = rss0
    while load.now() < ctx.args.seconds:
        peak = max(peak, rss_mib(gw.proc.pid))
        await asyncio.sleep(0.25)
    stats = await load.finish()
    _, rep = await ctx.admin(gw, "GET", f"/admin/routes/{ROUTE}/shadow?backend=shadow")
    total = (rep.get("total") or {}) if isinstance(rep, dict) else {}
    copies = (f"mirrored {total.get('mirrored', 0)}, dropped {total.get('dropped', 0)}, "
              f"shadow errors {total.get('shadow_errors', 0)}, "
              f"timeouts {total.get('shadow_timeouts', 0)}")
    return Outcome(stats, f"client untouched; {copies}; RSS +{peak - rss0:.0f} MB",
                   not stats.failures, extra={"shadow": total, "rss_peak_delta_mib": peak - rss0})


async def shadow_down(ctx: Ctx) -> Outcome:
    return await _shadow(ctx, slow=False)


async def shadow_slow(ctx: Ctx) -> Outcome:
    return await _shadow(ctx, slow=True)


async def _canary_killed(ctx: Ctx, fallback: bool) -> Outcome:
    _, blue = ctx.model("v1")
    green_proc, green = ctx.model("v2")
    extra: dict[str, Any] = ({"side_effect_free": True} if fallback
                             else {"side_effect_free": False, "fallback": False})
    gw = ctx.gateway([route({"blue": {"url": url(blue)}, "green": {"url": url(green)}},
                            **extra)])
    load = ctx.load(gw)
    status, body = await ctx.admin(gw, "POST", f"/admin/routes/{ROUTE}/rollout", {
        "backend": "green", "steps": [20, 50, 100], "interval": "60s",
        "check_interval": "500ms", "failure_threshold": 1,
        "gates": {"max_error_rate": 0.05, "min_requests": 10}})
    if status not in (200, 201):
        raise bench.BenchError(f"POST rollout: {status} {body}")
    await load.at(ctx.args.fault_at)
    green_proc.popen.kill()  # SIGKILL mid-ramp (weight 20)
    green_proc.popen.wait()
    killed = load.now()

    async def rolled_back() -> bool:
        _, view = await ctx.admin(gw, "GET", f"/admin/routes/{ROUTE}/rollout")
        return isinstance(view, dict) and view.get("phase") == "rolled_back"

    took = await until(rolled_back, max(1.0, ctx.args.seconds - killed), every=0.05)
    stats = await load.finish()
    if took is None:
        return Outcome(stats, "no rollback seen", False)
    settled = stats.t0 + killed + took + 1.0  # in-flight ones at the rollback may still fail
    late = sum(stats.kinds(after=settled).values())
    text = f"rolled back {took:.1f} s after the kill"
    if not fallback:
        text += f"; {late} failed 1 s after the rollback"
        return Outcome(stats, text, bool(stats.failures) and late == 0)
    return Outcome(stats, text + "; fallback onto live", not stats.failures)


async def canary_killed_fallback(ctx: Ctx) -> Outcome:
    return await _canary_killed(ctx, fallback=True)


async def canary_killed_no_fallback(ctx: Ctx) -> Outcome:
    return await _canary_killed(ctx, fallback=False)


async def url_killed(ctx: Ctx) -> Outcome:
    _, a = ctx.model("v1")
    b_proc, b = ctx.model("v1")
    gw = ctx.gateway([route({"blue": {
        "urls": [url(a), url(b)],
        "outlier_detection": {"consecutive_gateway_failure": 3, "base_ejection_time": "30s"}}},
        side_effect_free=True)])
    load = ctx.load(gw)
    await load.at(ctx.args.fault_at)
    b_proc.popen.kill()
    b_proc.popen.wait()

    async def ejected() -> bool:
        return await ctx.metric(gw, "modelgate_outlier_ejections_total") >= 1

    took = await until(ejected, max(1.0, ctx.args.seconds - load.now()), every=0.05)
    stats = await load.finish()
    text = (f"URL ejected {took:.2f} s after SIGKILL" if took is not None
            else "URL never ejected")
    return Outcome(stats, text + "; refused ones sent to the other URL",
                   not stats.failures and took is not None)


async def backend_hang(ctx: Ctx) -> Outcome:
    _, blue = ctx.model("v1")
    gw = ctx.gateway([route({"blue": {"url": url(blue)}}, timeouts={"read": "1s"})])
    load = ctx.load(gw)
    hang = min(3.0, max(1.5, ctx.args.seconds - ctx.args.fault_at - 2.0))
    await load.at(ctx.args.fault_at)
    await ctx.faults(blue, latency_ms=30_000)  # hangs: far beyond the read timeout
    start = time.perf_counter()
    status, _ = await ctx.call("POST", gw.url, json.loads(bench.BODY), timeout=5.0)
    probe = time.perf_counter() - start
    await load.at(ctx.args.fault_at + hang)
    await ctx.faults(blue, latency_ms=0)
    ended = load.now()
    stats = await load.finish()
    back = [done - stats.t0 for sent, done in stats.oks if sent - stats.t0 >= ended]
    kinds = stats.kinds()
    only_504 = set(kinds) <= {"http_504"}
    text = (f"probe got {status} after {probe:.1f} s (read timeout 1 s); "
            + (f"200s again {min(back) - ended:.2f} s after the hang" if back
               else "no 200 after the hang"))
    return Outcome(stats, text, only_504 and status == 504 and bool(back))


async def overload_3x(ctx: Ctx) -> Outcome:
    latency = 0.1
    capacity = max(1, round(ctx.args.rate * latency / 3))  # in flight: a third of the offer
    _, blue = ctx.model("v1")
    gw = ctx.gateway([route({"blue": {"url": url(blue)}},
                            limits={"max_concurrency": capacity, "retry_after": 1})])
    load = ctx.load(gw)
    await load.at(ctx.args.fault_at)
    await ctx.faults(blue, latency_ms=latency * 1000)
    fault = load.now()
    retry_after: str | None = None
    for _ in range(50):
        async with ctx.http.post(gw.url, data=bench.BODY,
                                 headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            if resp.status == 503:
                retry_after = resp.headers.get("Retry-After")
                break
        await asyncio.sleep(0.02)
    stats = await load.finish()
    admitted = sorted(done - sent for sent, done in stats.oks if sent - stats.t0 > fault + 0.5)
    p99_admitted = bench.percentile(admitted, 99) * 1000
    bound = 5 * latency * 1000
    kinds = stats.kinds()
    text = (f"503 Retry-After: {retry_after}; {capacity} in flight admitted, their p99 "
            f"{p99_admitted:.0f} ms (bound {bound:.0f})")
    return Outcome(stats, text, set(kinds) <= {"http_503"} and retry_after is not None
                   and p99_admitted <= bound, extra={"admitted_p99_ms": p99_admitted})


async def _open_sockets(port: int, n: int) -> tuple[list[socket.socket], int]:
    """Up to n connected non-blocking sockets (fewer if connecting fails); (sockets, failed)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    failed = 0
    for _ in range(n):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 1.0)
        except (OSError, TimeoutError):
            sock.close()
            failed += 1
            continue
        socks.append(sock)
    return socks, failed


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the gateway closed it (an answer such as a 408 before the close is read)."""
    try:
        for _ in range(1000):
            if sock.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


async def slow_idle_clients(ctx: Ctx) -> Outcome:
    _, blue = ctx.model("v1")
    timeouts = {"kind": "fast", "header_timeout": "2s", "keepalive_timeout": "2s",
                "body_timeout": "2s"}
    if "write_timeout" in server_keys():
        timeouts["write_timeout"] = "2s"
    gw = ctx.gateway([route({"blue": {"url": url(blue)}})], server=timeouts)
    load = ctx.load(gw)
    await load.at(ctx.args.fault_at)
    stop = asyncio.Event()
    health = asyncio.create_task(ctx.healthz_until(gw, stop))
    rss0 = rss_mib(gw.proc.pid)
    idle, _ = await _open_sockets(gw.port, 300)
    loris, _ = await _open_sockets(gw.port, 50)
    readers, _ = await _open_sockets(gw.port, 20)
    loop = asyncio.get_running_loop()
    pipelined = bench.build_requests(f"127.0.0.1:{gw.port}", PATH, users=1)[0] * 200
    try:
        for sock in readers:  # send 200 requests each, never read an answer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(loop.sock_sendall(sock, pipelined), 0.5)
        head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nx-slow: ".encode()
        for sock in loris:
            with contextlib.suppress(OSError):
                sock.send(head)
        opened = load.now()
        peak = rss0
        while load.now() < ctx.args.seconds:  # slowloris: a header byte every 0.5 s
            for sock in loris:
                with contextlib.suppress(OSError):
                    sock.send(b"a")
            peak = max(peak, rss_mib(gw.proc.pid))
            await asyncio.sleep(0.5)
        closed = sum(_closed_by_peer(s) for s in idle)
        closed_loris = sum(_closed_by_peer(s) for s in loris)
        held = load.now() - opened
    finally:
        for sock in idle + loris + readers:
            sock.close()
        stop.set()
        answered, tried = await health
    stats = await load.finish()
    text = (f"/healthz {answered}/{tried}; idle closed {closed}/{len(idle)}, slowloris "
            f"{closed_loris}/{len(loris)} within {held:.0f} s; RSS +{peak - rss0:.0f} MB")
    return Outcome(stats, text, answered == tried and closed == len(idle)
                   and closed_loris == len(loris))


async def fd_exhaustion(ctx: Ctx) -> Outcome:
    nofile = 256
    _, blue = ctx.model("v1")
    gw = ctx.gateway([route({"blue": {"url": url(blue)}})], nofile=nofile)
    load = ctx.load(gw, timeout=2.0)
    await load.at(ctx.args.fault_at)
    stop = asyncio.Event()
    health = asyncio.create_task(ctx.healthz_until(gw, stop))
    hold = min(3.0, max(1.0, ctx.args.seconds - ctx.args.fault_at - 2.5))
    socks: list[socket.socket] = []
    failed = 0
    try:
        socks, failed = await _open_sockets(gw.port, nofile + 150)
        await load.at(ctx.args.fault_at + hold)
        shed = sum(_closed_by_peer(s) for s in socks)  # e.g. refused or evicted at a cap
    finally:
        for sock in socks:
            sock.close()
        released = load.now()
        stop.set()
        answered, tried = await health
    alive = gw.proc.popen.poll() is None
    stats = await load.finish()
    back = [done - stats.t0 for sent, done in stats.oks if sent - stats.t0 >= released]
    text = (f"RLIMIT_NOFILE {nofile}; {len(socks)} sockets opened ({failed} failed), {shed} "
            f"closed by the gateway; /healthz {answered}/{tried}; "
            + (f"serving {min(back) - released:.2f} s after release" if back
               else "not serving after release") + ("" if alive else "; gateway DIED"))
    return Outcome(stats, text, alive and bool(back) and answered == tried)


async def _listener_closed(port: int, timeout: float) -> float | None:
    """perf_counter time when a new connection to `port` is first refused (None: never)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
        except ConnectionRefusedError:
            return time.perf_counter()
        except (OSError, TimeoutError):
            pass
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await asyncio.sleep(0.05)
    return None


RACE = 0.1  # seconds: how well the instant the listener closed is known


def classify_drain(failures: list[tuple[float, str]], stopped: float,
                   closed: float) -> tuple[Counter[str], Counter[str]]:
    """(failed, refused after stop) among (sent, kind) failures, given when SIGTERM was sent
    and when the listener closed.

    A connect error after SIGTERM was never accepted; nor was a request written into an idle
    connection as (or after) it closed: a reset from `closed - RACE` on. Both are "refused
    after stop". Anything else (a 5xx, a timeout, a reset before) is a failure of the drain.
    """
    refused = Counter(k for t, k in failures
                      if t >= stopped and (k == "connect" or (k == "reset" and t >= closed - RACE)))
    return Counter(k for _, k in failures) - refused, refused


async def sigterm_drain(ctx: Ctx) -> Outcome:
    _, blue = ctx.model("v1", latency_ms=200)  # ~60 requests in flight at 300 req/s
    drain = min(5.0, max(1.0, (ctx.args.seconds - ctx.args.fault_at) / 2))
    gw = ctx.gateway([route({"blue": {"url": url(blue)}})], drain_timeout=f"{drain:g}s")
    load = ctx.load(gw)
    await load.at(ctx.args.fault_at)
    stopped = time.perf_counter()
    gw.proc.popen.send_signal(signal.SIGTERM)
    closed = await _listener_closed(gw.port, drain + 10.0)
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, gw.proc.popen.wait)
    exited = time.perf_counter() - stopped
    stats = await load.finish()
    if closed is None:
        return Outcome(stats, "the listener never closed", False)
    # The listener and every idle kept-alive connection close at one instant, which the probe
    # sees late by up to ~0.1 s; the first refused connect of the load sees it sooner.
    closed = min([closed, *(t for t, k in stats.failures if k == "connect" and t >= stopped)])
    failed, refused = classify_drain(stats.failures, stopped, closed)
    completed = sum(1 for sent, done in stats.oks if sent < stopped <= done)
    served = sum(1 for sent, _ in stats.oks if stopped <= sent)
    text = (f"{completed} in flight at SIGTERM completed, {served} more served while draining; "
            f"listener closed after {closed - stopped:.1f} s (drain_timeout {drain:g} s), "
            f"exit {code} after {exited:.1f} s; {sum(refused.values())} refused after stop")
    return Outcome(stats, text, not failed and code == 0, failed=failed,
                   extra={"refused_after_stop": dict(refused), "in_flight_completed": completed})


async def redis_killed(ctx: Ctx) -> Outcome:
    rport = bench.free_port()
    rproc = ctx.redis(rport)
    _, blue = ctx.model("v1")
    _, green = ctx.model("v2")
    gw = ctx.gateway([route({"blue": {"url": url(blue)}, "green": {"url": url(green)}})],
                     store=f"redis://127.0.0.1:{rport}/0")
    load = ctx.load(gw)
    await load.at(ctx.args.fault_at)
    rproc.popen.kill()
    rproc.popen.wait()
    await asyncio.sleep(0.5)
    down_status, down_body = await ctx.admin(gw, "POST", f"/admin/routes/{ROUTE}/switch",
                                             {"to": "green", "reason": "while redis is down"})
    await load.at(ctx.args.fault_at + 2.0)
    await asyncio.get_running_loop().run_in_executor(None, ctx.redis, rport)
    restarted = time.perf_counter()

    async def change_accepted() -> bool:
        status, _ = await ctx.admin(gw, "POST", f"/admin/routes/{ROUTE}/switch",
                                    {"to": "green", "reason": "redis is back"})
        return status == 200

    accepted = await until(change_accepted, max(1.0, ctx.args.seconds - load.now()), 0.2)

    async def routed_to_green() -> bool:
        status, body = await ctx.call("POST", gw.url, json.loads(bench.BODY))
        return status == 200 and isinstance(body, dict) and body.get("model_version") == "v2"

    routed = (await until(routed_to_green, 3.0, 0.05)) if accepted is not None else None
    since = time.perf_counter() - restarted
    stats = await load.finish()
    clean = 400 <= down_status < 600 and isinstance(down_body, dict)
    text = (f"change while down: {down_status} "
            f"{(down_body.get('error') if isinstance(down_body, dict) else down_body)!s:.40}; "
            + (f"redis back: change accepted after {accepted:.1f} s, "
               + ("routing followed" if routed is not None else "routing did NOT follow")
               if accepted is not None else f"no change accepted {since:.0f} s after restart"))
    return Outcome(stats, text, not stats.failures and clean and routed is not None)


SCENARIOS: dict[str, Callable[[Ctx], Awaitable[Outcome]]] = {
    "switch_storm": switch_storm,
    "shadow_down": shadow_down,
    "shadow_slow": shadow_slow,
    "canary_killed_fallback": canary_killed_fallback,
    "canary_killed_no_fallback": canary_killed_no_fallback,
    "url_killed": url_killed,
    "backend_hang": backend_hang,
    "slow_idle_clients": slow_idle_clients,
    "fd_exhaustion": fd_exhaustion,
    "sigterm_drain": sigterm_drain,
    "overload_3x": overload_3x,
    "redis_killed": redis_killed,
}
assert set(SCENARIOS) == set(EXPECTED)


# ---------------------------------------------------------------------------------------------
# Running and reporting


def row(name: str, outcome: Outcome | None, error: str | None = None) -> dict[str, Any]:
    zero, expect = EXPECTED[name]
    if outcome is None:
        return {"scenario": name, "sent": 0, "ok": 0, "failed": 0, "failed_by_kind": {},
                "p99_ms": None, "recovered": f"ERROR: {error}", "expect": expect,
                "zero_failures_required": zero, "verdict": "FAIL"}
    stats = outcome.stats
    failed = outcome.failed if outcome.failed is not None else stats.kinds()
    return {
        "scenario": name, "sent": stats.sent, "ok": stats.ok,
        "failed": sum(failed.values()), "failed_by_kind": dict(sorted(failed.items())),
        "p99_ms": None if math.isnan(stats.p99_ms) else round(stats.p99_ms, 1),
        "recovered": outcome.recovered, "expect": expect, "zero_failures_required": zero,
        "verdict": "PASS" if outcome.ok else "FAIL", **outcome.extra,
    }


async def run_one(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ctx = Ctx(args, workdir)
    try:
        async with aiohttp.ClientSession() as session:
            ctx.session = session
            outcome = await asyncio.wait_for(SCENARIOS[name](ctx), args.seconds + 60)
        return row(name, outcome)
    except Exception as exc:  # one broken scenario is a FAIL row; the others still run
        return row(name, None, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        for load in ctx.loads:  # a scenario that failed half-way leaves its load running
            await load.cancel()
        ctx.procs.stop_all()  # blocking, on purpose: also runs while being cancelled


def _failed_text(r: dict[str, Any]) -> str:
    if not r["failed_by_kind"]:
        return "0"
    kinds = ", ".join(f"{k} {n}" for k, n in r["failed_by_kind"].items())
    return f"{r['failed']} ({kinds})"


def print_table(report: dict[str, Any]) -> None:
    rows = report["scenarios"]
    title = (f"fault suite {report['date']}: open loop {report['rate']:g} req/s x "
             f"{report['seconds']:g} s per scenario, fault at {report['fault_at']:g} s, "
             f"load avg {report['loadavg'][0]:.1f} on {report['cpus']} CPUs")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for r in rows:
            print(f"{r['scenario']:<26}{r['sent']:>7}  {_failed_text(r):<28}"
                  f"{r['p99_ms'] if r['p99_ms'] is not None else '-':>8}  {r['verdict']}  "
                  f"{r['recovered']}")
        return
    table = Table(title=title)
    for col in ("scenario", "sent", "failed", "p99 ms", "recovered", "expected", "verdict"):
        table.add_column(col, justify="right" if col in ("sent", "p99 ms") else "left")
    for r in rows:
        table.add_row(r["scenario"], str(r["sent"]), _failed_text(r),
                      "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}", r["recovered"],
                      r["expect"], r["verdict"])
    Console(width=200).print(table)


def markdown(report: dict[str, Any]) -> str:
    """The table as Markdown (for the READMEs)."""
    lines = ["| scenario | sent | failed | p99 ms | recovered | expected | verdict |",
             "|---|---:|---|---:|---|---|---|"]
    for r in report["scenarios"]:
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        lines.append(f"| {r['scenario']} | {r['sent']} | {_failed_text(r)} | {p99} | "
                     f"{r['recovered']} | {r['expect']} | {r['verdict']} |")
    return "\n".join(lines)


async def run_all(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    rows = []
    loadavg = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        for name in names:
            print(f"== {name}", file=sys.stderr, flush=True)
            r = await run_one(name, args, Path(tmp))
            print(f"   {r['verdict']}: sent {r['sent']}, failed {_failed_text(r)}, "
                  f"{r['recovered']}", file=sys.stderr, flush=True)
            rows.append(r)
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rate": args.rate,
            "seconds": args.seconds, "fault_at": args.fault_at, "cpus": os.cpu_count(),
            "loadavg": [round(loadavg[0], 2), round(os.getloadavg()[0], 2)],
            "scenarios": rows}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rate", type=float, default=300.0, help="open-loop requests/s (300)")
    p.add_argument("--seconds", type=float, default=12.0,
                   help="measured seconds of load per scenario (12)")
    p.add_argument("--fault-at", type=float, default=3.0,
                   help="seconds into the load when the fault is injected (3)")
    p.add_argument("--only", default="", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    p.add_argument("--json", default="", help="also write the report to this file")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = p.parse_args(argv)
    if not 0 < args.rate <= 2000:
        p.error("--rate must be in (0, 2000]")
    if not 2 <= args.seconds <= 120:
        p.error("--seconds must be in [2, 120]")
    if not 0.5 <= args.fault_at < args.seconds:
        p.error("--fault-at must be in [0.5, seconds)")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        with bench.sigterm_as_interrupt(), asyncio.Runner(
                loop_factory=bench.loop_factory()) as runner:
            report = runner.run(run_all(args, args.names))
    except KeyboardInterrupt:
        print("faults.py: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    finally:
        for procs in _ALL:
            procs.stop_all()
    print_table(report)
    if args.markdown:
        print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    bad = [r["scenario"] for r in report["scenarios"]
           if r["zero_failures_required"] and r["verdict"] != "PASS"]
    if bad:
        print(f"FAIL: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
