#!/usr/bin/env python3
"""Latency and throughput of modelgate next to a direct call and an nginx reverse proxy.

    python loadtest/bench.py [--rate 1000] [--seconds 10] [--rounds 3]
                             [--targets direct,nginx,modelgate,modelgate-fast] [--json out.json]
    python loadtest/bench.py --cells canary,shadow-probes,workers2-redis,model20ms --json a.json
    python loadtest/bench.py compare a.json b.json
    python loadtest/bench.py loadgen --url http://127.0.0.1:8000/v2/models/classifier/infer

The first form starts everything it measures (a backend, nginx as the baseline proxy, modelgate
with each upstream), runs every target in turn per round and prints medians over rounds; the
second measures the budget's cells (each a gateway configuration on its backend, next to
direct and nginx on that same backend); `compare` prints, per cell, the ratios between two
`--json` reports (two commits); `loadgen` runs only the open-loop generator against a URL and
prints its result as JSON.

How it measures (see /work/shared/PERF-NOTES.md and loadtest/README.md):

- Open loop: requests leave at Poisson-distributed *intended* times, whatever happened to the
  previous ones, and each latency is counted from its intended time. A closed-loop client
  waits for an answer before sending again, so a stall delays the requests that would have
  seen it and the stall vanishes from the percentiles (coordinated omission).
- Closed loop: wrk with 64 connections gives the most requests/s a target can serve.
- The machine is shared and noisy (±5-40% between runs), so targets are interleaved within a
  round, the figures are medians over rounds, and the comparisons (added latency vs direct,
  throughput × nginx) are made within a round before taking the median.
- With two or more cores and `taskset`, the proxy under test runs on core 0 and everything
  else (backend, load generator, wrk) on core 1.

Every process this starts is stopped by its PID at the end, on errors and on Ctrl-C/SIGTERM,
and dies with this script if it is killed (PR_SET_PDEATHSIG). Everything listens and connects
on 127.0.0.1 only; counts and run times are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

HERE = Path(__file__).resolve().parent
NGINX_TEMPLATES = HERE / "nginx"
PATH = "/v2/models/classifier/infer"
# A real KServe V2 request (~120 bytes): the demo model server answers it too.
BODY = (
    b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP32",'
    b'"data":[[5.1,3.5,1.4,0.2]]}],"id":"bench-request-0001"}'
)
# What the nginx backend returns (~100 bytes), shaped like the demo model's answer.
BACKEND_BODY = (
    '{"model_name":"classifier","model_version":"v1",'
    '"outputs":[{"name":"label","datatype":"BYTES","shape":[1],"data":["setosa"]}]}'
)
USERS = 1000  # distinct x-user-id values, so the sticky split hashes real keys
# modelgate targets: (proxy server, upstream client). `modelgate` is the default build (fast
# server + fast upstream); `modelgate-fast` is the aiohttp server with the fast upstream (the
# old default, issue #9's `--upstream fast`); `modelgate-aiohttp` is aiohttp both ways.
MODELGATE = {
    "modelgate": ("fast", "fast"),
    "modelgate-fast": ("aiohttp", "fast"),
    "modelgate-aiohttp": ("aiohttp", "aiohttp"),
}
# `prototype`: loadtest/prototype_proxy.py, the bare uvloop + httptools proxy of PERF-NOTES (no
# features): the ceiling for Python on this machine, measured in the same rounds.
TARGETS = ("direct", "nginx", "prototype", *MODELGATE)
DEFAULT_TARGETS = ("direct", "nginx", "modelgate", "modelgate-fast")
# The "model20ms" backend: loadtest/slow_backend.py answering after this long. (The demo model
# server has --latency-ms, but it saturates below 1000 req/s on a shared 2-core machine.)
MODEL_LATENCY_MS = 20.0


@dataclass(frozen=True)
class Cell:
    """One cell of the performance budget: a gateway configuration on a backend kind.

    `backend` is "trivial" (nginx `return 200`, or the demo model server with --backend
    model-server) or "model20ms" (loadtest/slow_backend.py answering after 20 ms); the cell's
    added latency and × nginx are against direct and nginx on that same backend, per round.
    """

    name: str
    description: str
    backend: str = "trivial"
    shadow_probes: bool = False  # shadow 100 % to a second backend + input/output probes
    workers: int = 1  # serve --workers N (summed CPU and RSS over supervisor and workers)
    redis: bool = False  # store: redis://… on a redis-server bench.py starts


CELLS = {
    "canary": Cell("canary", "sticky 10 % canary, metrics on (the default build)"),
    "shadow-probes": Cell("shadow-probes", "canary + shadow 100 % to a second backend + "
                          "input/output probes (sample 1.0)", shadow_probes=True),
    "workers2-redis": Cell("workers2-redis", "canary, serve --workers 2, store: redis",
                           workers=2, redis=True),
    "model20ms": Cell("model20ms", f"canary in front of a {MODEL_LATENCY_MS:g} ms model "
                      "(loadtest/slow_backend.py)", backend="model20ms"),
}
# The baselines of each backend kind: (direct, nginx) target names.
BASELINES = {"trivial": ("direct", "nginx"),
             "model20ms": ("direct-model20ms", "nginx-model20ms")}
ADMIN_TOKEN = "bench-admin-token-0123456789"
PROXY_CPU = "0"  # the proxy under test
LOAD_CPU = "1"  # backend, load generator, wrk

# Hard bounds: this is a benchmark on a shared machine, not a stress tool.
MAX_RATE = 50_000.0
MAX_SECONDS = 300.0
MAX_ROUNDS = 20
MAX_CONNECTIONS = 1024
MAX_OUTSTANDING = 20_000
YIELD_EVERY = 64  # when behind schedule, still let responses in every this many sends


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in milliseconds."""
    ordered = sorted(seconds)
    out = {
        name: percentile(ordered, q) * 1000.0
        for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
    }
    out["max"] = ordered[-1] * 1000.0 if ordered else math.nan
    out["mean"] = statistics.fmean(ordered) * 1000.0 if ordered else math.nan
    return out


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


# ---------------------------------------------------------------------------------------------
# Open-loop load generator: a keep-alive HTTP/1.1 connection pool over asyncio Protocols and
# httptools' response parser (~20 µs a request, so 1000 req/s costs it ~2% of a core).


@dataclass
class LoadResult:
    """One open-loop run. Latencies are from each request's intended send time."""

    url: str
    rate: float  # asked for, req/s
    seconds: float  # measured window (warm-up excluded)
    count: int  # requests due in the measured window
    ok: int  # 2xx responses among them
    errors: dict[str, int]  # kind -> count: status_5xx, connect, reset, timeout, overload...
    achieved_rate: float  # responses (any status) per second of the measured window
    latency_ms: dict[str, float]  # of the 2xx responses
    lag_ms: dict[str, float]  # how late the generator itself sent (timer slack), p50/p99/max
    # From the actual send instead of the intended time: without the generator's own lag and
    # the wait for a free connection. A diagnostic only: it hides stalls (coordinated omission).
    service_ms: dict[str, float]
    connections: int  # connections opened

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    __slots__ = ("pool", "transport", "parser", "busy", "intended", "counted", "sent_at",
                 "fail_kind", "closing")

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False
        self.intended = 0.0
        self.counted = False
        self.sent_at = 0.0
        self.fail_kind = "reset"
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail_kind = "bad_response"
            self.abort()

    def on_message_complete(self) -> None:
        self.pool.response(self, self.parser.get_status_code(), self.parser.should_keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Connections to one origin; requests wait FIFO for a free one (bounded)."""

    def __init__(self, host: str, port: int, requests: list[bytes], connections: int,
                 max_outstanding: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.requests = requests
        self.max_conns = connections
        self.max_outstanding = max_outstanding
        self.timeout = timeout
        self.idle: list[_Conn] = []
        self.conns: set[_Conn] = set()
        self.queue: deque[tuple[float, bool]] = deque()  # (intended, counted) waiting for a conn
        self.connecting = 0
        self.opened = 0
        self.outstanding = 0
        self.next_request = 0
        self.latencies: list[float] = []
        self.service: list[float] = []
        self.lags: list[float] = []
        self.errors: Counter[str] = Counter()
        self.count = 0
        self.ok = 0
        self.completed = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        # Most recently used connection first (default: the fewest connections stay warm), or
        # each in turn (soak.py: none idles long enough for the server to close it).
        self.round_robin = False
        self._idle_waiter: asyncio.Future[None] | None = None
        self._lost_waiter: asyncio.Future[None] | None = None

    # The arrival process calls this at each intended time.
    def fire(self, intended: float, counted: bool) -> None:
        if counted:
            self.count += 1
            self.lags.append(time.perf_counter() - intended)
        if self.outstanding >= self.max_outstanding:
            if counted:
                self.errors["overload"] += 1
            return
        self.outstanding += 1
        if self.idle:
            self._send(self.idle.pop(0) if self.round_robin else self.idle.pop(), intended,
                       counted)
        else:
            self.queue.append((intended, counted))
            self._maybe_connect()

    def _send(self, conn: _Conn, intended: float, counted: bool) -> None:
        requests = self.requests
        i = self.next_request
        self.next_request = i + 1 if i + 1 < len(requests) else 0
        conn.busy = True
        conn.intended = intended
        conn.counted = counted
        conn.sent_at = time.perf_counter()
        assert conn.transport is not None
        conn.transport.write(requests[i])

    def _available(self, conn: _Conn) -> None:
        if self.queue:
            intended, counted = self.queue.popleft()
            self._send(conn, intended, counted)
        else:
            self.idle.append(conn)

    def _maybe_connect(self) -> None:
        while (self.accepting and self.connecting < len(self.queue)
               and len(self.conns) + self.connecting < self.max_conns):
            self.connecting += 1
            task = asyncio.get_running_loop().create_task(self._connect())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def preconnect(self, n: int) -> int:
        """Open connections until there are `n` (at most the cap) before any load, so their
        number stays put during a long run (soak.py counts the gateway's descriptors).
        Returns how many are open."""
        for _ in range(max(0, min(n, self.max_conns) - len(self.conns))):
            self.connecting += 1
            await self._connect()
        return len(self.conns)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self), self.host, self.port
                )
        except OSError:  # refused, unreachable, or TimeoutError (an OSError)
            self.connecting -= 1
            if self.queue:  # one failed attempt fails one waiting request: no retry storm
                _, counted = self.queue.popleft()
                self._finish(counted, "connect")
            self._maybe_connect()
            return
        self.connecting -= 1
        self.opened += 1
        self.conns.add(conn)
        if not self.accepting:
            conn.close()
            return
        self._available(conn)

    # Called by connections.
    def response(self, conn: _Conn, status: int, keep_alive: bool) -> None:
        if not conn.busy:  # a response nobody asked for: the connection is out of step
            conn.fail_kind = "bad_response"
            conn.abort()
            return
        conn.busy = False
        now = time.perf_counter()
        self.outstanding -= 1
        self.completed += conn.counted
        if conn.counted:
            if 200 <= status < 300:
                self.ok += 1
                self.latencies.append(now - conn.intended)
                self.service.append(now - conn.sent_at)
            else:
                self.errors[f"status_{status // 100}xx"] += 1
        self._check_idle()
        if keep_alive and not conn.closing and self.accepting:
            self._available(conn)
        else:
            conn.close()

    def lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:
            conn.busy = False
            self._finish(conn.counted, conn.fail_kind)
        if self.queue:
            self._maybe_connect()
        if not self.conns and self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)

    def _finish(self, counted: bool, kind: str) -> None:
        self.outstanding -= 1
        if counted:
            self.errors[kind] += 1
        self._check_idle()

    def _check_idle(self) -> None:
        if self.outstanding == 0 and self._idle_waiter is not None:
            if not self._idle_waiter.done():
                self._idle_waiter.set_result(None)

    async def sweep(self) -> None:
        """Fail requests that waited longer than the timeout (one timer for all of them)."""
        while True:
            await asyncio.sleep(0.1)
            deadline = time.perf_counter() - self.timeout
            for conn in [c for c in self.conns if c.busy and c.sent_at < deadline]:
                conn.fail_kind = "timeout"
                conn.abort()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for the requests in flight to finish."""
        if self.outstanding == 0:
            return
        self._idle_waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({self._idle_waiter}, timeout=timeout)
        finally:
            self._idle_waiter = None

    async def close(self) -> None:
        """Give up on whatever is left, close every connection and await every task."""
        self.accepting = False
        while self.queue:
            _, counted = self.queue.popleft()
            self._finish(counted, "unfinished")
        for conn in list(self.conns):
            if conn.busy:
                conn.fail_kind = "unfinished"
                conn.abort()
            else:
                conn.close()
        self.idle.clear()
        tasks = set(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # not gather: our own cancellation must propagate
        if self.conns:
            self._lost_waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait({self._lost_waiter}, timeout=2.0)
            finally:
                self._lost_waiter = None


def build_requests(host_header: str, path: str = PATH, body: bytes = BODY,
                   users: int = USERS) -> list[bytes]:
    """The request bytes, built once: one per user id, sent round-robin."""
    out = []
    for i in range(max(1, users)):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n"
            f"Content-Type: application/json\r\nx-user-id: user-{i}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode("latin-1") + body)
    return out


async def arrivals(rng: random.Random, rate: float, start: float,
                   end: float) -> AsyncIterator[float]:
    """Poisson-distributed intended send times after `start` and before `end`
    (`time.perf_counter()` clock), each yielded when it is due. Ahead of time it sleeps; behind,
    it still yields to the loop every `YIELD_EVERY` sends, so answers keep being read."""
    intended = start
    behind = 0
    while True:
        intended += rng.expovariate(rate)
        if intended >= end:
            return
        delay = intended - time.perf_counter()
        if delay > 0:
            behind = 0
            await asyncio.sleep(delay)
        else:
            behind += 1
            if behind >= YIELD_EVERY:
                behind = 0
                await asyncio.sleep(0)
        yield intended


async def open_loop(
    url: str,
    rate: float,
    seconds: float,
    *,
    connections: int = 256,
    max_outstanding: int = 10_000,
    timeout: float = 5.0,
    warmup: float = 1.0,
    seed: int = 1,
    body: bytes = BODY,
    users: int = USERS,
) -> LoadResult:
    """POST `body` to `url` at Poisson arrivals of `rate`/s for `seconds` (after `warmup`
    seconds that are sent but not counted) and return what came back.

    At most `connections` connections and `max_outstanding` requests at once (more arrivals
    count as `overload` errors); a request without an answer after `timeout` seconds is a
    `timeout` error; the whole call returns within about warmup + seconds + timeout + 2 s.
    """
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate must be in (0, {MAX_RATE:g}]")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}]")
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections must be in [1, {MAX_CONNECTIONS}]")
    if not 1 <= max_outstanding <= MAX_OUTSTANDING:
        raise ValueError(f"max_outstanding must be in [1, {MAX_OUTSTANDING}]")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    pool = _Pool(parts.hostname, port, build_requests(parts.netloc, path, body, users),
                 connections, max_outstanding, timeout)
    rng = random.Random(seed)
    sweeper = asyncio.get_running_loop().create_task(pool.sweep())
    try:
        start = time.perf_counter() + 0.01
        measure_from = start + max(0.0, warmup)
        async for intended in arrivals(rng, rate, start, measure_from + seconds):
            pool.fire(intended, intended >= measure_from)
        await pool.drain(timeout)
    finally:
        sweeper.cancel()
        await asyncio.wait({sweeper})
        await pool.close()
    return LoadResult(
        url=url,
        rate=rate,
        seconds=seconds,
        count=pool.count,
        ok=pool.ok,
        errors=dict(sorted(pool.errors.items())),
        achieved_rate=pool.completed / seconds,
        latency_ms=latency_summary(pool.latencies),
        lag_ms={k: v for k, v in latency_summary(pool.lags).items()
                if k in ("p50", "p99", "max")},
        service_ms=latency_summary(pool.service),
        connections=pool.opened,
    )


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loadgen_main(argv: Sequence[str]) -> int:
    """`bench.py loadgen`: one open-loop run, result as JSON on stdout."""
    p = argparse.ArgumentParser(prog="bench.py loadgen",
                                description="Open-loop (Poisson) POST load against one URL.")
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000" + PATH)
    p.add_argument("--rate", type=float, default=1000.0, help="requests/s (default 1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds first")
    p.add_argument("--connections", type=int, default=256, help="at most this many (256)")
    p.add_argument("--max-outstanding", type=int, default=10_000)
    p.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    # A bounded run makes no cyclic garbage worth a collection pause in the measurements.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            result = runner.run(open_loop(
                args.url, args.rate, args.seconds, connections=args.connections,
                max_outstanding=args.max_outstanding, timeout=args.timeout,
                warmup=args.warmup, seed=args.seed,
            ))
    except ValueError as exc:
        print(f"bench.py loadgen: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict()))
    return 0


# ---------------------------------------------------------------------------------------------
# Processes: started pinned, stopped by PID.


def _pdeathsig() -> None:
    """In the child before exec: die with the benchmark even if it is SIGKILLed."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (Linux /proc), nan elsewhere."""
        return cpu_seconds(self.pid)


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (Linux /proc), nan elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def children(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc), [] elsewhere or when it is gone."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def status_kb(pid: int, key: str) -> float:
    """A kB field of /proc/PID/status (VmRSS: resident now, VmHWM: its peak); nan if absent."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return math.nan
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return float(match.group(1)) if match else math.nan


def open_fds(pid: int) -> int:
    """How many file descriptors `pid` has open (/proc/PID/fd); -1 when unreadable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Processes:
    """Every child the benchmark starts; `stop_all()` ends them by PID, newest first."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin
        self.procs: list[Proc] = []

    def argv(self, argv: list[str], cpu: str | None) -> list[str]:
        taskset = shutil.which("taskset")
        if self.pin and cpu is not None and taskset:
            return [taskset, "-c", cpu, *argv]
        return argv

    def start(self, name: str, argv: list[str], cpu: str | None,
              env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                self.argv(argv, cpu), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
                preexec_fn=_pdeathsig if sys.platform == "linux" else None,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        print(f"started {name} pid {proc.pid}", file=sys.stderr, flush=True)
        return proc

    def stop_all(self) -> None:
        # A second Ctrl-C must not cut the clean-up short and leave children running.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                stop_process(proc)
            self.procs.clear()
        finally:
            signal.signal(signal.SIGINT, previous)


def stop_process(proc: Proc, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaped."""
    popen = proc.popen
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            popen.wait(grace)
    print(f"stopped {proc.name} pid {proc.pid}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post_once(port: int, timeout: float = 1.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", PATH, body=BODY,
                     headers={"Content-Type": "application/json", "x-user-id": "ready"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_ready(proc: Proc, port: int, timeout: float = 30.0) -> None:
    """Until a POST answers 200; fails early (with the log) if the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                             f"{proc.log_tail()}")
        try:
            status = post_once(port)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"HTTP {status}"
        time.sleep(0.05)
    raise BenchError(f"{proc.name} not ready on port {port} after {timeout:g}s ({last}):\n"
                     f"{proc.log_tail()}")


class BenchError(Exception):
    pass


def render(template: str, **values: str) -> str:
    text = (NGINX_TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise BenchError(f"{template}: placeholders left unfilled: {sorted(set(left))}")
    return text


def start_nginx(procs: Processes, name: str, template: str, cpu: str,
                **values: str) -> tuple[Proc, int]:
    nginx = find_nginx()
    assert nginx is not None
    port = free_port()
    # A folder per nginx: two of one template (two backends, two proxies) must not share
    # their pid file and temp folders.
    home = procs.workdir / name
    home.mkdir(exist_ok=True)
    conf = home / f"{name}.conf"
    conf.write_text(render(template, DIR=str(home), PORT=str(port), **values))
    # -e: the error log from the first moment (before the config's error_log applies).
    proc = procs.start(name, [nginx, "-p", str(home), "-c", str(conf),
                              "-e", str(home / f"{name}-error.log")], cpu)
    wait_ready(proc, port)
    return proc, port


def find_nginx() -> str | None:
    for candidate in ("/usr/sbin/nginx", shutil.which("nginx")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


# Input and output probes on every infer call (as in the demo config and probes_cost.py).
PROBES_YAML = """\
    probes:
      sample: 1.0
      path_suffix: /infer
      input:
        length: inputs[0].data
        missing: inputs[0].data
        required: [inputs, "inputs[0].data"]
        features:
          sepal_length: {path: "inputs[0].data[*][0]", range: [4, 8], bins: 8}
          petal_length: {path: "inputs[0].data[*][2]", range: [1, 7], bins: 6}
      output:
        prediction: outputs[0].data
        labels: [setosa, versicolor, virginica]
"""


def gateway_config(port: int, admin_port: int, backend_port: int,
                   server: str = "fast", *, shadow_port: int | None = None,
                   probes: bool = False, store: str | None = None) -> str:
    """One route `/` → the backend, sticky on x-user-id, a 10% canary to a second backend
    name on the same URL: the hash, split and per-backend metrics all run per request.

    `shadow_port`: every request (sample 100 %) is also mirrored to a backend named `shadow`
    there and the predictions compared (kserve_v2); `probes`: input/output probes on every
    infer call; `store`: a store URL (redis://…) instead of the in-memory store."""
    backend = f"http://127.0.0.1:{backend_port}"
    text = (
        f"listen: 127.0.0.1:{port}\n"
        f"server: {server}\n"
        f"admin:\n  listen: 127.0.0.1:{admin_port}\n"
        + (f"store: {store}\n" if store else "")
        + "routes:\n"
        "  - name: bench\n"
        "    match:\n      path_prefix: /\n"
        "    backends:\n"
        f"      stable:\n        url: {backend}\n"
        f"      canary:\n        url: {backend}\n"
        + (f"      shadow:\n        url: http://127.0.0.1:{shadow_port}\n"
           if shadow_port is not None else "")
        + "    live: stable\n"
        "    canary:\n      backend: canary\n      weight: 10\n"
        "    sticky:\n      header: x-user-id\n"
    )
    if shadow_port is not None:
        text += ("    shadow:\n      backend: shadow\n      sample: 100\n"
                 "      compare:\n        preset: kserve_v2\n")
    if probes:
        text += PROBES_YAML
    return text


def start_modelgate(procs: Processes, name: str, upstream: str,
                    backend_port: int, server: str = "fast", *,
                    shadow_port: int | None = None, probes: bool = False,
                    store: str | None = None, workers: int = 1) -> tuple[Proc, int]:
    port = free_port()
    # Workers serve the admin API on its port + i: port 0 gives each any free port.
    admin_port = free_port() if workers == 1 else 0
    config = procs.workdir / f"{name}.yaml"
    config.write_text(gateway_config(port, admin_port, backend_port, server,
                                     shadow_port=shadow_port, probes=probes, store=store))
    argv = [sys.executable, "-m", "gateway", "serve", "-c", str(config), "--upstream", upstream]
    if workers > 1:
        argv += ["--workers", str(workers)]
    env = {**os.environ, "MODELGATE_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONUNBUFFERED": "1",
           "MODELGATE_STATE_DIR": str(procs.workdir)}
    proc = procs.start(name, argv, PROXY_CPU, env)
    if workers > 1:
        # The first worker answering is not enough: wait for the supervisor's ready line
        # (every worker listening), or a measurement would start on one worker.
        deadline = time.monotonic() + 60
        while "modelgate ready:" not in proc.log.read_text(errors="replace"):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{name} (--workers {workers}) did not start:\n"
                                 f"{proc.log_tail()}")
            time.sleep(0.05)
    wait_ready(proc, port)
    return proc, port


def start_model_server(procs: Processes, name: str = "backend") -> tuple[Proc, int]:
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "model-server", "--port", str(port)]
    proc = procs.start(name, argv, LOAD_CPU)
    wait_ready(proc, port)
    return proc, port


def start_trivial_backend(procs: Processes, name: str, nginx: bool) -> int:
    """The trivial backend's port: nginx `return 200` with the fixed body, or the demo model
    server when nginx is not used."""
    if nginx:
        return start_nginx(procs, name, "backend.conf.template", LOAD_CPU,
                           BODY=BACKEND_BODY)[1]
    return start_model_server(procs, name)[1]


def start_slow_backend(procs: Processes, name: str, delay_ms: float) -> tuple[Proc, int]:
    """loadtest/slow_backend.py: the fixed body after `delay_ms`, cheap enough for 1000s/s."""
    port = free_port()
    argv = [sys.executable, str(HERE / "slow_backend.py"), "--port", str(port),
            "--delay-ms", f"{delay_ms:g}", "--body", BACKEND_BODY]
    proc = procs.start(name, argv, LOAD_CPU)
    wait_ready(proc, port)
    return proc, port


def start_prototype(procs: Processes, name: str, backend_port: int) -> tuple[Proc, int]:
    """loadtest/prototype_proxy.py on the proxy core: the ceiling beside nginx."""
    port = free_port()
    argv = [sys.executable, str(HERE / "prototype_proxy.py"), "--port", str(port),
            "--backend-port", str(backend_port)]
    proc = procs.start(name, argv, PROXY_CPU)
    wait_ready(proc, port)
    return proc, port


def start_redis(procs: Processes) -> tuple[Proc, int]:
    """A redis-server on a free loopback port, no persistence, stopped by PID with the rest."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found (apt-get install redis-server)")
    port = free_port()
    proc = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no",
                                 "--dir", str(procs.workdir)], LOAD_CPU)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        if proc.popen.poll() is not None:
            break
        time.sleep(0.05)
    raise BenchError(f"redis-server did not start:\n{proc.log_tail()}")


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class Target:
    name: str
    port: int
    proc: Proc | None  # the proxy process (CPU is measured on it); None for direct
    direct: str = "direct"  # the baselines its added latency and × nginx are taken against
    nginx: str = "nginx"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def pids(self) -> list[int]:
        """The proxy's processes: the one started and its children (`--workers N`: the
        supervisor and each worker), read now, so a restarted worker is counted."""
        if self.proc is None:
            return []
        return [self.proc.pid, *children(self.proc.pid)]

    def cpu_seconds(self) -> float:
        """CPU time so far, summed over the proxy's processes; nan for direct."""
        pids = self.pids()
        return sum(cpu_seconds(pid) for pid in pids) if pids else math.nan

    def memory_mb(self) -> tuple[float, float]:
        """(resident now, sum of each process's peak resident) in MB; nan for direct."""
        pids = self.pids()
        if not pids:
            return math.nan, math.nan
        return (sum(status_kb(pid, "VmRSS") for pid in pids) / 1024,
                sum(status_kb(pid, "VmHWM") for pid in pids) / 1024)


@dataclass
class RunRecord:
    round: int
    target: str
    open_loop: dict[str, Any] | None = None
    open_cpu_us: float = math.nan  # proxy CPU per request at the open-loop rate
    closed_rps: float = math.nan
    closed_errors: int = 0
    closed_cpu_us: float = math.nan
    rss_mb: float = math.nan  # the proxy's resident memory after this round's runs
    peak_rss_mb: float = math.nan  # VmHWM: the peak, summed over its processes
    notes: list[str] = field(default_factory=list)


def run_open(procs: Processes, target: Target, args: argparse.Namespace,
             seed: int) -> tuple[dict[str, Any], float]:
    argv = procs.argv(
        [sys.executable, str(Path(__file__).resolve()), "loadgen", "--url", target.url,
         "--rate", str(args.rate), "--seconds", str(args.seconds),
         "--warmup", str(args.warmup), "--connections", str(args.connections),
         "--seed", str(seed)],
        LOAD_CPU,
    )
    cpu0 = target.cpu_seconds()
    limit = args.warmup + args.seconds + 5.0 + 30.0
    # Own process, owned PID: stopped by its PID if anything goes wrong below.
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True,
                             preexec_fn=_pdeathsig if sys.platform == "linux" else None)
    try:
        out, err = popen.communicate(timeout=limit)
    finally:
        if popen.poll() is None:
            stop_process(Proc("loadgen", popen, Path(os.devnull)))
    cpu1 = target.cpu_seconds()
    if popen.returncode != 0:
        raise BenchError(f"load generator failed ({popen.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    # CPU is measured over warm-up + run, so divide by the requests of both.
    total = result["count"] * (args.warmup + args.seconds) / args.seconds
    cpu_us = (cpu1 - cpu0) / total * 1e6 if total else math.nan
    return result, cpu_us


WRK_SCRIPT = """-- Generated by loadtest/bench.py: POST the benchmark body, 1000 user ids in turn.
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
local requests = {}
local n = 0
init = function(args)
  for i = 1, %(users)d do
    wrk.headers["x-user-id"] = "user-" .. i
    requests[i] = wrk.format()
  end
end
request = function()
  n = n %% #requests + 1
  return requests[n]
end
"""


def run_closed(procs: Processes, target: Target, args: argparse.Namespace,
               script: Path) -> tuple[float, int, float]:
    """wrk's requests/s, its error count and the proxy's CPU µs per request."""
    wrk = shutil.which("wrk")
    assert wrk is not None
    argv = procs.argv([wrk, "-t1", f"-c{args.wrk_connections}", f"-d{args.closed_seconds}s",
                       "-s", str(script), target.url], LOAD_CPU)
    cpu0 = target.cpu_seconds()
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=_pdeathsig if sys.platform == "linux" else None)
    try:
        out, _ = popen.communicate(timeout=args.closed_seconds + 30)
    finally:
        if popen.poll() is None:
            stop_process(Proc("wrk", popen, Path(os.devnull)))
    cpu1 = target.cpu_seconds()
    text = out.decode(errors="replace")
    rps, requests, errors = parse_wrk(text)
    if popen.returncode != 0 or math.isnan(rps):
        raise BenchError(f"wrk failed ({popen.returncode}):\n{text[-2000:]}")
    cpu_us = (cpu1 - cpu0) / requests * 1e6 if requests else math.nan
    return rps, errors, cpu_us


def parse_wrk(text: str) -> tuple[float, int, int]:
    """(requests/s, requests, errors) from wrk's report; errors = non-2xx/3xx + socket errors."""
    rps_m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    total_m = re.search(r"(\d+) requests in", text)
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    rps = float(rps_m.group(1)) if rps_m else math.nan
    total = int(total_m.group(1)) if total_m else 0
    return rps, total, errors


def rotate(items: list[Target], n: int) -> list[Target]:
    """Round n starts with a different target, so no target always runs first or last."""
    k = n % len(items) if items else 0
    return items[k:] + items[:k]


def summarize(records: list[RunRecord], targets: Sequence[str],
              baselines: dict[str, tuple[str, str]] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Per target: medians over rounds; added latency and × nginx are per-round differences
    and ratios first (both sides saw the same machine state), then their median.

    `baselines` maps a target to its (direct, nginx) targets: those on the same backend
    (default: "direct" and "nginx")."""
    by_round: dict[int, dict[str, RunRecord]] = {}
    for rec in records:
        by_round.setdefault(rec.round, {})[rec.target] = rec
    out: dict[str, dict[str, Any]] = {}
    for name in targets:
        mine = [r for r in records if r.target == name]
        lat = [r.open_loop["latency_ms"] for r in mine if r.open_loop]
        row: dict[str, Any] = {
            "rounds": len(mine),
            "rate": median([r.open_loop["achieved_rate"] for r in mine if r.open_loop]),
            "errors": sum(sum(r.open_loop["errors"].values()) for r in mine if r.open_loop),
            "count": sum(r.open_loop["count"] for r in mine if r.open_loop),
            **{q: median([x[q] for x in lat]) for q in ("p50", "p90", "p99", "p99.9")},
            "lag_p99": median([r.open_loop["lag_ms"]["p99"] for r in mine if r.open_loop]),
            **{f"service_{q}": median([r.open_loop["service_ms"][q] for r in mine
                                       if r.open_loop and "service_ms" in r.open_loop])
               for q in ("p50", "p99")},
            "open_cpu_us": median([r.open_cpu_us for r in mine]),
            "closed_rps": median([r.closed_rps for r in mine]),
            "closed_errors": sum(r.closed_errors for r in mine),
            "closed_cpu_us": median([r.closed_cpu_us for r in mine]),
            "rss_mb": median([r.rss_mb for r in mine]),
            "peak_rss_mb": max([r.peak_rss_mb for r in mine if not math.isnan(r.peak_rss_mb)],
                               default=math.nan),
        }
        direct_name, nginx_name = (baselines or {}).get(name, ("direct", "nginx"))
        row["baseline"] = {"direct": direct_name, "nginx": nginx_name}
        added50, added99, ratio = [], [], []
        for recs in by_round.values():
            me, direct, nginx = recs.get(name), recs.get(direct_name), recs.get(nginx_name)
            if me and direct and me.open_loop and direct.open_loop:
                added50.append(me.open_loop["latency_ms"]["p50"]
                               - direct.open_loop["latency_ms"]["p50"])
                added99.append(me.open_loop["latency_ms"]["p99"]
                               - direct.open_loop["latency_ms"]["p99"])
            if me and nginx and nginx.closed_rps > 0:
                ratio.append(me.closed_rps / nginx.closed_rps)
        row["added_p50"] = median(added50)
        row["added_p99"] = median(added99)
        row["x_nginx"] = median(ratio)
        out[name] = row
    return out


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _signed(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}"


def print_table(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"open loop: Poisson {args.rate:g} req/s × {args.seconds:g} s; closed loop: wrk "
             f"-c{args.wrk_connections} × {args.closed_seconds:g} s; medians of "
             f"{args.rounds} interleaved round(s); latency in ms; + and × against direct and "
             "nginx on the same backend")
    table = Table(title=title, title_justify="left")
    for col in ("target", "req/s", "errors", "p50", "p90", "p99", "p99.9", "+p50 vs direct",
                "+p99 vs direct", "cpu µs/req @rate", "max req/s", "× nginx",
                "cpu µs/req @max", "RSS MB", "peak MB"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for name, row in summary.items():
        is_direct = row.get("baseline", {}).get("direct", "direct") == name
        table.add_row(
            name, _fmt(row["rate"], 0), str(row["errors"] + row["closed_errors"]),
            _fmt(row["p50"], 3), _fmt(row["p90"], 3), _fmt(row["p99"], 3),
            _fmt(row["p99.9"], 3),
            "" if is_direct else _signed(row["added_p50"]),
            "" if is_direct else _signed(row["added_p99"]),
            _fmt(row["open_cpu_us"], 0), _fmt(row["closed_rps"], 0),
            _fmt(row["x_nginx"], 2), _fmt(row["closed_cpu_us"], 0),
            _fmt(row.get("rss_mb", math.nan), 1), _fmt(row.get("peak_rss_mb", math.nan), 1),
        )
    Console(width=220).print(table)


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes (None outside git)."""
    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(HERE.parent), *argv], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if status is None else bool(status)}


def environment(pin: bool) -> dict[str, Any]:
    nginx = find_nginx()
    return {
        "cpus": os.cpu_count(),
        "pinned": pin,
        "python": sys.version.split()[0],
        "nginx": nginx,
        "wrk": shutil.which("wrk"),
        "redis_server": shutil.which("redis-server"),
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_commit(),
    }


def plan_targets(targets: Sequence[str], cells: Sequence[str]) -> list[tuple[str, str]]:
    """(target, backend kind) in measuring order: the targets asked for, then the baselines
    each cell needs on its backend (direct and nginx), then the cells. No duplicates."""
    out: list[tuple[str, str]] = [(t, "trivial") for t in targets]
    for cell in cells:
        for baseline in BASELINES[CELLS[cell].backend]:
            if (baseline, CELLS[cell].backend) not in out:
                out.append((baseline, CELLS[cell].backend))
    out += [(c, CELLS[c].backend) for c in cells]
    return out


def parse_list(text: str | None, known: Sequence[str], what: str) -> list[str]:
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if unknown:
        raise BenchError(f"unknown {what}(s) {unknown}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))  # in order, once each


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    cells = parse_list(args.cells, tuple(CELLS), "cell")
    # Without --targets: the old default set, or only the baselines when cells are asked for.
    targets = parse_list(args.targets if args.targets is not None
                         else ",".join(("direct", "nginx") if cells else DEFAULT_TARGETS),
                         TARGETS, "target")
    if not targets and not cells:
        raise BenchError("nothing to measure: give --targets and/or --cells")
    nginx = find_nginx()
    notes: list[str] = []
    plan = plan_targets(targets, cells)
    if nginx is None and any(name.startswith("nginx") for name, _ in plan):
        plan = [(n, b) for n, b in plan if not n.startswith("nginx")]
        notes.append("nginx not found: no nginx baseline")
    if any(CELLS[c].redis for c in cells) and shutil.which("redis-server") is None:
        raise BenchError("cell workers2-redis needs redis-server (apt-get install redis-server)")
    backend_kind = args.backend
    if backend_kind == "auto":
        backend_kind = "nginx" if nginx else "model-server"
    if backend_kind == "nginx" and nginx is None:
        raise BenchError("--backend nginx: nginx not found")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if not pin:
        notes.append("processes not pinned (needs taskset and 2+ cores): ratios are noisier")
    closed = not args.no_closed and shutil.which("wrk") is not None
    if not args.no_closed and not closed:
        notes.append("wrk not found: no closed-loop throughput")
    env_before = environment(pin)
    baselines = {name: BASELINES[kind] for name, kind in plan}

    with tempfile.TemporaryDirectory(prefix="modelgate-bench-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir, pin)
        records: list[RunRecord] = []
        pids: dict[str, int] = {}
        try:
            # The backends each planned target needs, started once.
            ports: dict[str, int] = {}
            if any(kind == "trivial" for _, kind in plan):
                ports["trivial"] = start_trivial_backend(procs, "backend",
                                                         backend_kind == "nginx")
            if any(kind == "model20ms" for _, kind in plan):
                _, ports["model20ms"] = start_slow_backend(procs, "backend-model20ms",
                                                           MODEL_LATENCY_MS)
            shadow_port = None
            if any(CELLS[c].shadow_probes for c in cells):
                # A second backend for the shadow copies, of the same kind as the first.
                shadow_port = start_trivial_backend(procs, "backend-shadow",
                                                    backend_kind == "nginx")
            redis_url = None
            if any(CELLS[c].redis for c in cells):
                _, redis_port = start_redis(procs)
                redis_url = f"redis://127.0.0.1:{redis_port}/0"
            running: list[Target] = []
            for name, kind in plan:
                backend_port = ports[kind]
                direct_name, nginx_name = BASELINES[kind]
                if name == direct_name:
                    target = Target(name, backend_port, None)
                elif name == nginx_name:
                    proc, port = start_nginx(procs, name, "proxy.conf.template", PROXY_CPU,
                                             BACKEND_PORT=str(backend_port))
                    target = Target(name, port, proc)
                elif name == "prototype":
                    proc, port = start_prototype(procs, name, backend_port)
                    target = Target(name, port, proc)
                elif name in CELLS:
                    cell = CELLS[name]
                    proc, port = start_modelgate(
                        procs, name, "fast", backend_port, "fast",
                        shadow_port=shadow_port if cell.shadow_probes else None,
                        probes=cell.shadow_probes, store=redis_url if cell.redis else None,
                        workers=cell.workers)
                    target = Target(name, port, proc)
                else:
                    server, upstream = MODELGATE[name]
                    proc, port = start_modelgate(procs, name, upstream, backend_port, server)
                    target = Target(name, port, proc)
                target.direct, target.nginx = direct_name, nginx_name
                running.append(target)
            for target in running:
                for i, pid in enumerate(target.pids()[1:]):
                    pids[f"{target.name} worker {i}"] = pid
            script = workdir / "post.lua"
            script.write_text(WRK_SCRIPT % {"body": BODY.decode(), "users": USERS})
            for rnd in range(args.rounds):
                order = rotate(running, rnd)
                recs = {t.name: RunRecord(rnd, t.name) for t in running}
                for target in order:
                    print(f"round {rnd + 1}/{args.rounds}: open loop {target.name}",
                          file=sys.stderr, flush=True)
                    result, cpu_us = run_open(procs, target, args, seed=1000 * rnd + 1)
                    recs[target.name].open_loop = result
                    recs[target.name].open_cpu_us = cpu_us
                if closed:
                    for target in order:
                        print(f"round {rnd + 1}/{args.rounds}: closed loop {target.name}",
                              file=sys.stderr, flush=True)
                        rps, errors, cpu_us = run_closed(procs, target, args, script)
                        recs[target.name].closed_rps = rps
                        recs[target.name].closed_errors = errors
                        recs[target.name].closed_cpu_us = cpu_us
                for target in running:
                    recs[target.name].rss_mb, recs[target.name].peak_rss_mb = target.memory_mb()
                records.extend(recs.values())
            pids.update({p.name: p.pid for p in procs.procs})
        finally:
            procs.stop_all()
    names = [name for name, _ in plan]
    summary = summarize(records, names, baselines)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": {**env_before, "loadavg_after": os.getloadavg(),
                        "backend": backend_kind},
        "cells": {c: {**asdict(CELLS[c]), "baseline": dict(zip(("direct", "nginx"),
                                                               BASELINES[CELLS[c].backend],
                                                               strict=True))}
                  for c in cells},
        "notes": notes,
        "processes": pids,
        "summary": summary,
        "runs": [asdict(r) for r in records],
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark modelgate against direct calls and nginx on this machine. "
        "`bench.py loadgen --help`: the open-loop generator alone; `bench.py profile --help`: "
        "modelgate under load, sampled by py-spy; `bench.py compare A.json B.json`: two "
        "--json reports side by side.",
    )
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop req/s (default 1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="open-loop seconds (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds before each "
                   "open-loop run (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--targets", default=None,
                   help=f"comma-separated, from {','.join(TARGETS)} "
                   f"(default {','.join(DEFAULT_TARGETS)}; with --cells: direct,nginx)")
    p.add_argument("--cells", default="",
                   help="comma-separated budget cells, each a gateway configuration measured "
                   "beside direct and nginx on its own backend: "
                   + "; ".join(f"{c.name}: {c.description}" for c in CELLS.values())
                   .replace("%", "%%"))
    p.add_argument("--connections", type=int, default=256,
                   help="open-loop connection cap (default 256)")
    p.add_argument("--closed-seconds", type=float, default=5.0,
                   help="wrk seconds per target per round (default 5)")
    p.add_argument("--wrk-connections", type=int, default=64)
    p.add_argument("--no-closed", action="store_true", help="skip the closed-loop (wrk) runs")
    p.add_argument("--backend", choices=("auto", "nginx", "model-server"), default="auto",
                   help="what answers: nginx `return 200` (default when installed) or the "
                   "demo model server")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--json", metavar="FILE", help="also write everything measured as JSON")
    args = p.parse_args(argv)
    if not 0 < args.rate <= MAX_RATE:
        p.error(f"--rate must be in (0, {MAX_RATE:g}]")
    if not 0 < args.seconds <= MAX_SECONDS:
        p.error(f"--seconds must be in (0, {MAX_SECONDS:g}]")
    if not 0 <= args.warmup <= 30:
        p.error("--warmup must be in [0, 30]")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        p.error(f"--rounds must be in [1, {MAX_ROUNDS}]")
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        p.error(f"--connections must be in [1, {MAX_CONNECTIONS}]")
    if not 1 <= args.wrk_connections <= MAX_CONNECTIONS:
        p.error(f"--wrk-connections must be in [1, {MAX_CONNECTIONS}]")
    if not 1 <= args.closed_seconds <= MAX_SECONDS:
        p.error(f"--closed-seconds must be in [1, {MAX_SECONDS:g}]")
    args.closed_seconds = int(args.closed_seconds)
    return args


# ---------------------------------------------------------------------------------------------
# Profiling: where modelgate's time goes under closed-loop load.


def top_functions(raw: str, top: int = 15) -> tuple[int, list[tuple[str, int, int]]]:
    """From py-spy's raw (collapsed) stacks: total samples and the `top` functions by self
    samples, as (function, self samples, inclusive samples)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return total, [(name, n, inclusive[name]) for name, n in own.most_common(top)]


def profile_main(argv: Sequence[str]) -> int:
    """`bench.py profile`: modelgate under wrk, sampled by py-spy; top functions by self time."""
    p = argparse.ArgumentParser(
        prog="bench.py profile",
        description="Run modelgate (pinned like the benchmark) under closed-loop load from wrk, "
        "sample it with py-spy and print the functions with the most self time.",
    )
    p.add_argument("--upstream", choices=("aiohttp", "fast"), default="fast")
    p.add_argument("--cell", choices=("canary", "shadow-probes"), default="canary",
                   help="the gateway configuration of that budget cell (default canary)")
    p.add_argument("--seconds", type=int, default=10, help="sampling seconds (default 10)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy",
                   help="py-spy executable (e.g. after `pip install --target /tmp/pyspy "
                   "py-spy`: /tmp/pyspy/bin/py-spy)")
    p.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    p.add_argument("--lines", action="store_true",
                   help="rank source lines instead of whole functions")
    p.add_argument("--raw", metavar="FILE", help="also keep the raw stacks (speedscope and "
                   "flamegraph.pl read them)")
    args = p.parse_args(argv)
    if not 1 <= args.seconds <= 120:
        p.error("--seconds must be in [1, 120]")
    if not os.access(args.py_spy, os.X_OK) and shutil.which(args.py_spy) is None:
        p.error(f"py-spy not found ({args.py_spy}); pip install --target /tmp/pyspy py-spy")
    wrk = shutil.which("wrk")
    if wrk is None:
        p.error("wrk not found")
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="modelgate-prof-") as tmp:
            workdir = Path(tmp)
            procs = Processes(workdir, pin)
            try:
                nginx = find_nginx() is not None
                backend_port = start_trivial_backend(procs, "backend", nginx)
                shadow_port = None
                if args.cell == "shadow-probes":
                    shadow_port = start_trivial_backend(procs, "backend-shadow", nginx)
                gateway, port = start_modelgate(procs, "modelgate", args.upstream, backend_port,
                                                shadow_port=shadow_port,
                                                probes=shadow_port is not None)
                script = workdir / "post.lua"
                script.write_text(WRK_SCRIPT % {"body": BODY.decode(), "users": USERS})
                load = procs.start("wrk", [wrk, "-t1", f"-c{args.connections}",
                                           f"-d{args.seconds + 3}s", "-s", str(script),
                                           f"http://127.0.0.1:{port}{PATH}"], LOAD_CPU)
                time.sleep(1.0)  # let the connections open and the pools fill
                raw_path = workdir / "stacks.txt"
                spy = [args.py_spy, "record", "-p", str(gateway.pid), "-d", str(args.seconds),
                       "-r", "250", "-f", "raw", "-o", str(raw_path)]
                if not args.lines:
                    spy.append("--function")  # frames named by the function's first line
                # Native stacks need py-spy to pause the process for each sample (slower).
                spy.append("--native" if args.native else "--nonblocking")
                sampler = procs.start("py-spy", spy, LOAD_CPU)
                sampler.popen.wait(args.seconds + 60)
                load.popen.wait(args.seconds + 60)
                if sampler.popen.returncode != 0 or not raw_path.exists():
                    raise BenchError(f"py-spy failed:\n{sampler.log_tail()}")
                rps, _, _ = parse_wrk(load.log.read_text(errors="replace"))
                raw = raw_path.read_text()
                if args.raw:
                    Path(args.raw).write_text(raw)
            finally:
                procs.stop_all()
    except KeyboardInterrupt:
        return 130
    except BenchError as exc:
        print(f"bench.py profile: {exc}", file=sys.stderr)
        return 1
    total, rows = top_functions(raw, args.top)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"modelgate ({args.cell}) --upstream {args.upstream} under wrk "
                  f"-c{args.connections}: "
                  f"{rps:,.0f} req/s, {total} samples (on-CPU)", title_justify="left")
    for col in ("#", "line (file:line)" if args.lines else "function (file:line)", "self %",
                "total %"):
        table.add_column(col, justify="left" if "file:line" in col else "right")
    for i, (name, own, incl) in enumerate(rows, 1):
        table.add_row(str(i), name, f"{100 * own / total:.1f}", f"{100 * incl / total:.1f}")
    Console(width=160).print(table)
    return 0


# ---------------------------------------------------------------------------------------------
# Comparing two reports (two commits, or before and after a change).

# (summary key, column title, digits): the figures compared per target, B / A.
COMPARED = (
    ("p99", "p99 ms", 3),
    ("added_p99", "+p99 ms", 3),
    ("open_cpu_us", "cpu µs @rate", 0),
    ("closed_rps", "max req/s", 0),
    ("x_nginx", "× nginx", 2),
    ("closed_cpu_us", "cpu µs @max", 0),
    ("peak_rss_mb", "peak MB", 1),
)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target (cell) in both reports' summaries, in A's order: each COMPARED figure as
    {"a", "b", "ratio": b / a} (nan where either is missing or a is 0), and the errors of
    both. Ratios of added latency are only as steady as the differences they divide."""
    rows = []
    for name, row_a in a.get("summary", {}).items():
        row_b = b.get("summary", {}).get(name)
        if row_b is None:
            continue
        out: dict[str, Any] = {"target": name}
        for key, _, _ in COMPARED:
            va, vb = _number(row_a.get(key)), _number(row_b.get(key))
            ratio = vb / va if va and not math.isnan(va) and not math.isnan(vb) else math.nan
            out[key] = {"a": va, "b": vb, "ratio": ratio}
        out["errors"] = {side: int(_number(r.get("errors", 0)) + _number(r.get("closed_errors", 0)))
                         for side, r in (("a", row_a), ("b", row_b))}
        rows.append(out)
    return rows


def _load_report(path: str) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BenchError(f"{path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise BenchError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        raise BenchError(f"{path}: not a bench.py --json report (no summary)")
    return report


def _describe(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    git = env.get("git") or {}
    commit = (git.get("commit") or "?")[:10] + (" (dirty)" if git.get("dirty") else "")
    load = env.get("loadavg") or [math.nan]
    return f"{commit}, {env.get('time', '?')}, load {_number(load[0]):.2f}, {env.get('cpus')} CPUs"


def compare_main(argv: Sequence[str]) -> int:
    """`bench.py compare A.json B.json`: per cell, B's figures as a ratio of A's."""
    p = argparse.ArgumentParser(prog="bench.py compare",
                                description="Two bench.py --json reports side by side: per "
                                "target or cell, B / A for each figure.")
    p.add_argument("a", metavar="A.json")
    p.add_argument("b", metavar="B.json")
    args = p.parse_args(argv)
    try:
        a, b = _load_report(args.a), _load_report(args.b)
    except BenchError as exc:
        print(f"bench.py compare: {exc}", file=sys.stderr)
        return 2
    rows = compare_reports(a, b)
    print(f"A: {args.a}: {_describe(a)}")
    print(f"B: {args.b}: {_describe(b)}")
    if not rows:
        print("no target or cell in both reports")
        return 1
    from rich.console import Console
    from rich.table import Table

    table = Table(title="B / A per figure (A → B); < 1 is less of it in B", title_justify="left")
    table.add_column("target")
    for _, title, _ in COMPARED:
        table.add_column(title, justify="right")
    table.add_column("errors A → B", justify="right")
    for row in rows:
        cells = []
        for key, _, digits in COMPARED:
            fig = row[key]
            cells.append(f"{_fmt(fig['a'], digits)} → {_fmt(fig['b'], digits)} "
                         f"({_fmt(fig['ratio'], 2)}×)")
        table.add_row(row["target"], *cells, f"{row['errors']['a']} → {row['errors']['b']}")
    Console(width=240).print(table)
    print("Machines differ and so do minutes: compare reports from the same machine, and "
          "read the ratios against each report's own direct and nginx rows.")
    return 0


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    args = parse_args(argv)
    try:
        with sigterm_as_interrupt():
            report = run_bench(args)
    except KeyboardInterrupt:
        print("bench.py: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 1
    print_table(report["summary"], args)
    env = report["environment"]
    lags = [row["lag_p99"] for row in report["summary"].values()]
    print(f"load generator's own send lag (timer slack), p99: {_fmt(median(lags), 3)} ms; "
          "it is inside every target's latency alike")
    print(f"load average before/after: {env['loadavg'][0]:.2f}/{env['loadavg_after'][0]:.2f} "
          f"on {env['cpus']} CPUs (well above 0 means someone else shares the cores: compare "
          "the ratios, not the absolute figures)")
    for note in report["notes"]:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
