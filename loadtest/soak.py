#!/usr/bin/env python3
"""Soak: modelgate with shadow 100 % and probes on, at a steady open-loop rate, for minutes.

    python loadtest/soak.py [--rate 1000] [--duration 600] [--json soak.json]

It starts, on 127.0.0.1 ports it picks: the backend (nginx `return 200` as in bench.py, or the
demo model server when nginx is missing or with --backend model-server), a second backend of
the same kind for the shadow copies, and `modelgate serve` with bench.py's gateway config plus
``shadow: {backend: shadow, sample: 100}`` and input/output probes (sample 1.0). The load is
bench.py's open-loop generator (Poisson arrivals, latency from each intended send time) in its
own process, with a fixed set of `--connections` keep-alive connections opened before the
first request, so the gateway's descriptor count does not depend on how many connections a
burst made the client open. Every `--sample-every` seconds it reads the gateway's VmRSS, VmHWM
and open descriptors (/proc/PID/status, /proc/PID/fd); every `--interval` seconds the
generator reports req/s, errors and latency percentiles.

It prints one row per interval and passes (exit 0) when, over the last `--window` (60) seconds
of load, the gateway's RSS and descriptors are within `--tolerance` (10 %) of their values in
the window after `--baseline-after` seconds (the first minute), and no request failed. RSS is
a window's median sample; descriptors its floor (fewest), because the backend pools open and
idle-close connections with the bursts while a leaked descriptor raises the floor. Exit 1:
the soak ran and failed; 2: it could not run; 130: interrupted. Every process it starts is
stopped by its PID at the end, on errors, on Ctrl-C and on SIGTERM (bench.py's process
handling, PR_SET_PDEATHSIG included). Nothing is pinned to a core unless --pin is given.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (loadtest/bench.py: generator, processes, configs)

MAX_RATE = 5_000.0
MAX_DURATION = 3_600.0
MAX_INTERVAL = 120.0  # the generator keeps one interval's latencies: rate × interval floats


# ---------------------------------------------------------------------------------------------
# The load: bench.py's connection pool, reporting one line per interval.


def interval_report(pool: bench._Pool, t: float, length: float) -> dict[str, Any]:
    """What the pool saw since the last report (then reset), as one JSON-able row."""
    lat = bench.latency_summary(pool.latencies)
    row = {
        "t": round(t, 3), "seconds": round(length, 3), "count": pool.count, "ok": pool.ok,
        "errors": dict(sorted(pool.errors.items())),
        "rate": pool.completed / length if length > 0 else math.nan,
        "p50": lat["p50"], "p99": lat["p99"], "max": lat["max"],
        "lag_p99": bench.latency_summary(pool.lags)["p99"],
        "connections": len(pool.conns),
    }
    pool.latencies, pool.service, pool.lags = [], [], []
    pool.errors = Counter()
    pool.count = pool.ok = pool.completed = 0
    return row


async def soak_load(url: str, rate: float, duration: float, interval: float, connections: int,
                    emit: Callable[[dict[str, Any]], None], *, seed: int = 1,
                    timeout: float = 5.0) -> None:
    """POST at Poisson arrivals of `rate`/s for `duration` s over `connections` connections
    opened first; `emit` gets {"event": "started", "connections"} once they are open, then a
    row every `interval` s and a last one after the requests in flight are answered."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    pool = bench._Pool(parts.hostname, parts.port or 80,
                       bench.build_requests(parts.netloc, path), connections, 10_000, timeout)
    # Each connection in turn: at 1000 req/s over 32 connections each one is used every
    # ~32 ms, so the gateway never closes one for idling and the client's count stays put.
    pool.round_robin = True
    rng = random.Random(seed)
    sweeper = asyncio.get_running_loop().create_task(pool.sweep())
    try:
        opened = await pool.preconnect(connections)
        if opened < connections:
            raise ConnectionError(f"opened {opened} of {connections} connections to {url}")
        start = time.perf_counter() + 0.01
        emit({"event": "started", "connections": opened})
        last = start
        next_report = start + interval
        async for intended in bench.arrivals(rng, rate, start, start + duration):
            now = time.perf_counter()
            if now >= next_report:
                emit(interval_report(pool, now - start, now - last))
                last = now
                next_report += interval
            pool.fire(intended, True)
        await pool.drain(timeout)
        now = time.perf_counter()
        emit(interval_report(pool, now - start, now - last))
    finally:
        sweeper.cancel()
        await asyncio.wait({sweeper})
        await pool.close()


def loadgen_main(argv: Sequence[str]) -> int:
    """`soak.py loadgen`: the soak's load, one JSON line per interval on stdout."""
    p = argparse.ArgumentParser(prog="soak.py loadgen")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--interval", type=float, required=True)
    p.add_argument("--connections", type=int, required=True)
    args = p.parse_args(argv)

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)

    gc.collect()
    gc.freeze()  # the pool's long-lived objects are never scanned again
    try:
        with asyncio.Runner(loop_factory=bench.loop_factory()) as runner:
            runner.run(soak_load(args.url, args.rate, args.duration, args.interval,
                                 args.connections, emit))
    except (ValueError, ConnectionError) as exc:
        print(f"soak.py loadgen: {exc}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# The verdict (pure): samples and interval rows in, pass/fail with the figures out.


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: float
    peak_rss_mb: float
    fds: int
    # Of the descriptors, established TCP connections (clients, live and shadow backend
    # pools): their number follows congestion, bounded by the pools, not time.
    connections: int = 0

    @property
    def other_fds(self) -> int:
        """Descriptors that are not established connections: listening sockets, files, pipes,
        the event loop's, and any socket left half-closed (a leaked one lands here)."""
        return self.fds - self.connections


def _within(base: float, end: float, tolerance: float) -> bool:
    return base > 0 and abs(end - base) <= tolerance * base


def _window(samples: Sequence[Sample]) -> dict[str, Any]:
    """A window's figures: RSS as the median of its samples; descriptors other than
    established connections as their floor; all descriptors' range for the record."""
    return {"from": samples[0].t, "to": samples[-1].t, "samples": len(samples),
            "rss_mb": statistics.median(s.rss_mb for s in samples),
            "other_fds": min(s.other_fds for s in samples),
            "fds": min(s.fds for s in samples), "fds_max": max(s.fds for s in samples),
            "connections_max": max(s.connections for s in samples)}


def verdict(samples: Sequence[Sample], intervals: Sequence[dict[str, Any]],
            baseline_after: float, duration: float, tolerance: float,
            window: float = 60.0) -> dict[str, Any]:
    """Compare the `window` seconds from `baseline_after` on (after the first minute) with the
    last `window` seconds of load (t ≤ `duration`, after the first window). Passes when RSS
    and descriptors at the end are within `tolerance` (a fraction) of the baseline's and no
    request failed.

    RSS is each window's median sample. Descriptors are those that are not established TCP
    connections, each window's *floor* (its smallest sample): the connections to clients and
    backends follow congestion (64 descriptors in a calm minute, 95 in a congested one at
    1000 req/s, bounded by the pools), while a leaked descriptor (a file, a pipe, a socket
    never closed after its peer left) is never closed and raises the floor."""
    loaded = [s for s in samples if s.t <= duration]
    first = [s for s in loaded if baseline_after <= s.t < baseline_after + window]
    last = [s for s in loaded if s.t > duration - window and s.t >= baseline_after + window]
    errors = sum(sum(row["errors"].values()) for row in intervals)
    requests = sum(row["count"] for row in intervals)
    base = _window(first) if first else None
    end = _window(last) if last else None
    out: dict[str, Any] = {
        "baseline": base, "end": end, "window": window,
        "tolerance": tolerance, "requests": requests, "errors": errors,
    }
    if base is None or end is None:
        out.update(rss_ok=False, fds_ok=False, passed=False,
                   reason="no sample in the first or the last window of the load")
        return out
    out["rss_change"] = (end["rss_mb"] - base["rss_mb"]) / base["rss_mb"]
    out["fds_change"] = ((end["other_fds"] - base["other_fds"]) / base["other_fds"]
                         if base["other_fds"] else math.nan)
    out["rss_ok"] = _within(base["rss_mb"], end["rss_mb"], tolerance)
    out["fds_ok"] = _within(base["other_fds"], end["other_fds"], tolerance)
    out["passed"] = bool(out["rss_ok"] and out["fds_ok"] and errors == 0 and requests > 0)
    reasons = [what for what, ok in (("RSS", out["rss_ok"]), ("descriptors", out["fds_ok"]))
               if not ok]
    if errors:
        reasons.append(f"{errors} failed requests")
    if requests == 0:
        reasons.append("no requests")
    out["reason"] = ", ".join(reasons) if reasons else "within tolerance, no errors"
    return out


def table(samples: Sequence[Sample], intervals: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown rows: per interval, the generator's figures and the last sample before its
    end (RSS, peak, descriptors)."""
    lines = ["| t (s) | RSS MB | peak MB | fds | of which not connections | req/s | errors | "
             "p50 ms | p99 ms | max ms | client conns |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in intervals:
        before = [s for s in samples if s.t <= row["t"]]
        s = before[-1] if before else None
        lines.append(
            f"| {row['t']:.0f} | {_f(s.rss_mb if s else math.nan, 1)} | "
            f"{_f(s.peak_rss_mb if s else math.nan, 1)} | {s.fds if s else '–'} | "
            f"{s.other_fds if s else '–'} | "
            f"{_f(row['rate'], 0)} | {sum(row['errors'].values())} | {_f(row['p50'], 2)} | "
            f"{_f(row['p99'], 2)} | {_f(row['max'], 1)} | {row['connections']} |")
    return lines


def _f(value: float, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


# ---------------------------------------------------------------------------------------------
# The run.


def established(pid: int) -> int:
    """How many of `pid`'s descriptors are established TCP connections (its socket inodes
    looked up in /proc/PID/net/tcp and tcp6, which list the whole network namespace)."""
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                count += 1
    return count


def sample(pid: int, t: float) -> Sample:
    return Sample(t=round(t, 3), rss_mb=bench.status_kb(pid, "VmRSS") / 1024,
                  peak_rss_mb=bench.status_kb(pid, "VmHWM") / 1024, fds=bench.open_fds(pid),
                  connections=established(pid))


def shadow_totals(admin_port: int) -> dict[str, Any] | None:
    """The shadow's totals from the admin API (copies compared, dropped…), None on failure."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/admin/routes/bench/shadow",
                     headers={"Authorization": f"Bearer {bench.ADMIN_TOKEN}"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        total = json.loads(body).get("total")
        return total if isinstance(total, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


def probed_requests(admin_port: int) -> float:
    """Requests the input probes measured (modelgate_input_length's count, summed over its
    labels) from the admin /metrics; nan on failure."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {bench.ADMIN_TOKEN}"})
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    except OSError:
        return math.nan
    finally:
        conn.close()
    if resp.status != 200:
        return math.nan
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("modelgate_input_length_count"))


def start_backends(procs: bench.Processes, kind: str) -> tuple[int, int]:
    """(backend port, shadow backend port): two of the same kind."""
    ports = []
    for name in ("backend", "backend-shadow"):
        if kind == "nginx":
            _, port = bench.start_nginx(procs, name, "backend.conf.template", bench.LOAD_CPU,
                                        BODY=bench.BACKEND_BODY)
        else:
            _, port = bench.start_model_server(procs, name)
        ports.append(port)
    return ports[0], ports[1]


def read_rows(log: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """JSON lines the generator printed since `offset` (whole lines only)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    rows = []
    complete = data.rfind(b"\n") + 1
    for line in data[:complete].splitlines():
        if line.startswith(b"{"):
            rows.append(json.loads(line))
    return rows, offset + complete


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    nginx = bench.find_nginx()
    kind = args.backend if args.backend != "auto" else ("nginx" if nginx else "model-server")
    if kind == "nginx" and nginx is None:
        raise bench.BenchError("--backend nginx: nginx not found")
    pin = args.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    env = {**bench.environment(pin), "backend": kind}
    samples: list[Sample] = []
    intervals: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelgate-soak-") as tmp:
        procs = bench.Processes(Path(tmp), pin)
        try:
            backend_port, shadow_port = start_backends(procs, kind)
            gateway, port = bench.start_modelgate(procs, "modelgate", "fast", backend_port,
                                                  shadow_port=shadow_port, probes=True)
            admin_port = admin_port_of(procs.workdir / "modelgate.yaml")
            load = procs.start("loadgen", [
                sys.executable, str(Path(__file__).resolve()), "loadgen",
                "--url", f"http://127.0.0.1:{port}{bench.PATH}", "--rate", str(args.rate),
                "--duration", str(args.duration), "--interval", str(args.interval),
                "--connections", str(args.connections)], bench.LOAD_CPU)
            offset = 0
            started: float | None = None
            give_up = time.monotonic() + args.duration + 90  # start-up, drain, close
            while True:
                rows, offset = read_rows(load.log, offset)
                for row in rows:
                    if row.get("event") == "started":
                        started = time.monotonic()
                    else:
                        intervals.append(row)
                        print(f"{row['t']:7.0f} s  {row['rate']:7.0f} req/s  errors "
                              f"{sum(row['errors'].values())}  p99 {_f(row['p99'], 2)} ms  "
                              f"RSS {_f(samples[-1].rss_mb if samples else math.nan, 1)} MB  "
                              f"fds {samples[-1].fds if samples else '–'}",
                              file=sys.stderr, flush=True)
                if gateway.popen.poll() is not None:
                    raise bench.BenchError(f"the gateway exited with "
                                           f"{gateway.popen.returncode}:\n{gateway.log_tail()}")
                if load.popen.poll() is not None:
                    break
                if time.monotonic() > give_up:
                    raise bench.BenchError("the load generator ran past its time")
                if started is not None:
                    samples.append(sample(gateway.pid, time.monotonic() - started))
                time.sleep(args.sample_every if started is not None else 0.05)
            rows, offset = read_rows(load.log, offset)
            intervals.extend(r for r in rows if r.get("event") != "started")
            if load.popen.returncode != 0 or started is None:
                raise bench.BenchError(f"the load generator failed "
                                       f"({load.popen.returncode}):\n{load.log_tail()}")
            shadow = shadow_totals(admin_port)
            probed = probed_requests(admin_port)
            pids = {p.name: p.pid for p in procs.procs}
        finally:
            procs.stop_all()
    result = verdict(samples, intervals, args.baseline_after, args.duration, args.tolerance,
                     args.window)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": {**env, "loadavg_after": os.getloadavg()},
        "processes": pids,
        "verdict": result,
        "shadow": shadow,
        "probed_requests": probed,
        "intervals": intervals,
        "samples": [asdict(s) for s in samples],
    }


def admin_port_of(config: Path) -> int:
    import yaml

    listen = str(yaml.safe_load(config.read_text())["admin"]["listen"])
    return int(listen.rsplit(":", 1)[1])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="soak.py",
        description="modelgate with shadow 100 %% and probes on under a steady open-loop "
        "rate: RSS and open descriptors at the end within a tolerance of their values after "
        "the first minute, and no failed request. `soak.py loadgen --help`: the load alone.")
    p.add_argument("--rate", type=float, default=1000.0, help="req/s (default 1000)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds of load (default 600: ten minutes)")
    p.add_argument("--interval", type=float, default=60.0,
                   help="seconds per table row (default 60)")
    p.add_argument("--baseline-after", type=float, default=60.0,
                   help="the figures compared against are taken this long into the load "
                   "(default 60: after the first minute)")
    p.add_argument("--sample-every", type=float, default=5.0,
                   help="seconds between RSS/descriptor samples (default 5)")
    p.add_argument("--window", type=float, default=60.0,
                   help="seconds of samples compared at the start (from --baseline-after on) "
                   "and at the end of the load (default 60)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="allowed change of RSS and descriptors, a fraction (default 0.10)")
    p.add_argument("--connections", type=int, default=32,
                   help="keep-alive connections, opened before the load (default 32)")
    p.add_argument("--backend", choices=("auto", "nginx", "model-server"), default="auto")
    p.add_argument("--pin", action="store_true",
                   help="pin the gateway to core 0 and the rest to core 1 as bench.py does "
                   "(off by default: a soak checks leaks and errors, not latency ratios, and "
                   "on a shared machine one pinned core is one crowded core)")
    p.add_argument("--json", metavar="FILE", help="also write everything measured as JSON")
    args = p.parse_args(argv)
    if not 0 < args.rate <= MAX_RATE:
        p.error(f"--rate must be in (0, {MAX_RATE:g}]")
    if not 1 <= args.duration <= MAX_DURATION:
        p.error(f"--duration must be in [1, {MAX_DURATION:g}]")
    if not 0.1 <= args.interval <= min(MAX_INTERVAL, args.duration):
        p.error(f"--interval must be in [0.1, {min(MAX_INTERVAL, args.duration):g}]")
    if not 0 <= args.baseline_after < args.duration:
        p.error("--baseline-after must be in [0, --duration)")
    if not 0 < args.window <= (args.duration - args.baseline_after) / 2:
        p.error("--window must be in (0, (--duration - --baseline-after) / 2]: the first and "
                "the last window of the load must not overlap")
    if not 0.1 <= args.sample_every <= 60:
        p.error("--sample-every must be in [0.1, 60]")
    if not 0 < args.tolerance < 1:
        p.error("--tolerance must be in (0, 1)")
    if not 1 <= args.connections <= bench.MAX_CONNECTIONS:
        p.error(f"--connections must be in [1, {bench.MAX_CONNECTIONS}]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    args = parse_args(argv)
    try:
        with bench.sigterm_as_interrupt():
            report = run_soak(args)
    except KeyboardInterrupt:
        print("soak.py: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except bench.BenchError as exc:
        print(f"soak.py: {exc}", file=sys.stderr)
        return 2
    v = report["verdict"]
    env = report["environment"]
    print(f"soak: {args.rate:g} req/s × {args.duration:g} s, shadow 100 % + probes on, "
          f"backend {env['backend']}, {env['cpus']} CPUs, load average "
          f"{env['loadavg'][0]:.2f} before / {env['loadavg_after'][0]:.2f} after, "
          f"commit {(env['git'].get('commit') or '?')[:10]}")
    print("\n".join(table([Sample(**s) for s in report["samples"]], report["intervals"])))
    base, end = v["baseline"], v["end"]
    if base and end:
        print(f"{base['from']:.0f}–{base['to']:.0f} s: RSS {base['rss_mb']:.1f} MB (median), "
              f"{base['other_fds']} fds besides connections (all: {base['fds']}–"
              f"{base['fds_max']}); {end['from']:.0f}–{end['to']:.0f} s: RSS "
              f"{end['rss_mb']:.1f} MB ({v['rss_change']:+.1%}), {end['other_fds']} fds "
              f"besides connections ({v['fds_change']:+.1%}; all: {end['fds']}–"
              f"{end['fds_max']}); tolerance ±{v['tolerance']:.0%}")
    shadow = report["shadow"] or {}
    if shadow:
        print("shadow copies: " + ", ".join(f"{k} {shadow[k]}" for k in
                                            ("compared", "dropped") if k in shadow))
    print(f"requests probed (input probes): {_f(report['probed_requests'], 0)}")
    print(f"requests {v['requests']}, errors {v['errors']}: "
          f"{'PASS' if v['passed'] else 'FAIL'} ({v['reason']})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
