#!/usr/bin/env python3
"""`modelgate serve --workers 1` next to `--workers 2`: requests/s and CPU per request.

    python loadtest/workers_bench.py [--seconds 10] [--rounds 3] [--connections 64]
                                     [--threads 2] [--json out.json]

It starts, on 127.0.0.1 ports it picks: a redis-server (no persistence; the shared store both
runs use), the backend (nginx answering a fixed body, as in bench.py; the demo model server
when nginx is missing), and then, in interleaved rounds (1, 2 / 2, 1 / 1, 2 …), `modelgate
serve --workers N` on a config with ``store: redis://…``, driven by wrk (closed loop) for
``--seconds`` after a short warm-up. Per run it reads utime + stime from /proc/<pid>/stat
before and after for every process (the supervisor, each worker, the backend, redis-server)
and wrk's own CPU from its rusage, and prints medians over rounds:

- req/s, and its ratio 2 workers / 1 worker;
- the gateway's CPU µs per request (all its processes summed), and that ratio: the "workers
  add no shared-state cost on the request path" check (within 10 %);
- each process's CPU per request, its share of one core and its context switches per request,
  so that on a small machine it is visible which process took the cores the second worker
  would have needed (a worker that shares its core wakes up more often, with fewer requests
  per wake-up, and pays for it in CPU per request).

Nothing is pinned: the point is to let two workers use two cores. Every process is stopped
by its PID at the end, on errors and on Ctrl-C/SIGTERM (helpers from bench.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (loadtest/bench.py: processes, backend, wrk script and parsing)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> float:
    """Voluntary + involuntary context switches so far (Linux /proc), nan elsewhere."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return math.nan
    return float(sum(int(n) for n in re.findall(r"ctxt_switches:\s+(\d+)", text)))


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


start_redis = bench.start_redis  # a redis-server on a free port, stopped by PID


def start_gateway(procs: bench.Processes, workers: int, backend_port: int,
                  redis_port: int) -> tuple[bench.Proc, int, list[int]]:
    """`modelgate serve --workers N`: (the process started, its port, the worker PIDs)."""
    port, admin = bench.free_port(), bench.free_port()
    if workers > 1:
        while any(_taken(admin + i) for i in range(workers)):
            admin = bench.free_port()
    config = procs.workdir / f"workers-{workers}.yaml"
    config.write_text(bench.gateway_config(port, admin, backend_port)
                      + f"store: redis://127.0.0.1:{redis_port}/{workers}\n")
    argv = [sys.executable, "-m", "gateway", "serve", "-c", str(config), "--workers",
            str(workers), "--log-level", "warning"]
    env = {**os.environ, "MODELGATE_ADMIN_TOKEN": bench.ADMIN_TOKEN, "PYTHONUNBUFFERED": "1"}
    proc = procs.start(f"modelgate-w{workers}", argv, None, env)
    deadline = time.monotonic() + 60
    while "modelgate ready:" not in proc.log.read_text(errors="replace"):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise bench.BenchError(f"modelgate --workers {workers} did not start:\n"
                                   f"{proc.log_tail()}")
        time.sleep(0.05)
    bench.wait_ready(proc, port)
    worker_pids = children(proc.pid) if workers > 1 else []
    return proc, port, worker_pids


def _taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def run_wrk(procs: bench.Processes, port: int, seconds: float, args: argparse.Namespace,
            script: Path) -> tuple[float, int, int, float]:
    """(req/s, requests, errors, wrk's CPU seconds)."""
    wrk = shutil.which("wrk")
    assert wrk is not None
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds:g}s", "-s",
            str(script), f"http://127.0.0.1:{port}{bench.PATH}"]
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert popen.stdout is not None
        out = popen.stdout.read()
        _, status, usage = os.wait4(popen.pid, 0)
        popen.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if popen.returncode is None:
            bench.stop_process(bench.Proc("wrk", popen, Path(os.devnull)))
    text = out.decode(errors="replace")
    rps, requests, errors = bench.parse_wrk(text)
    if popen.returncode != 0 or math.isnan(rps):
        raise bench.BenchError(f"wrk failed ({popen.returncode}):\n{text[-2000:]}")
    return rps, requests, errors, usage.ru_utime + usage.ru_stime


def one_run(procs: bench.Processes, workers: int, backend: bench.Proc, redis: bench.Proc,
            backend_port: int, redis_port: int, args: argparse.Namespace,
            script: Path) -> dict[str, Any]:
    gateway, port, worker_pids = start_gateway(procs, workers, backend_port, redis_port)
    try:
        run_wrk(procs, port, args.warmup, args, script)  # connections, caches, JIT-free warm-up
        pids = {"supervisor" if workers > 1 else "gateway": gateway.pid}
        for i, pid in enumerate(worker_pids):
            pids[f"worker {i}"] = pid
        pids["backend"] = backend.pid
        pids["redis"] = redis.pid
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        switches0 = {name: context_switches(pid) for name, pid in pids.items()}
        started = time.monotonic()
        rps, requests, errors, wrk_cpu = run_wrk(procs, port, args.seconds, args, script)
        wall = time.monotonic() - started
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        switches1 = {name: context_switches(pid) for name, pid in pids.items()}
        rate_cpu_us, rate_errors = (fixed_rate(port, pids, args) if args.rate > 0
                                    else (math.nan, 0))
    finally:
        bench.stop_process(gateway)
        procs.procs.remove(gateway)
    cpu = {name: after[name] - before[name] for name in pids}
    cpu["wrk"] = wrk_cpu
    gateway_cpu = sum(v for k, v in cpu.items() if k not in ("backend", "redis", "wrk"))
    return {
        "workers": workers, "rps": rps, "requests": requests, "errors": errors, "wall": wall,
        "rate_cpu_us": rate_cpu_us, "rate_errors": rate_errors,
        "cpu_seconds": cpu,
        "gateway_cpu_us": gateway_cpu / requests * 1e6 if requests else math.nan,
        "cpu_us": {k: v / requests * 1e6 if requests else math.nan for k, v in cpu.items()},
        "cores": {k: v / wall for k, v in cpu.items()},
        "switches_per_req": {k: (switches1[k] - switches0[k]) / requests if requests
                             else math.nan for k in pids},
    }


def fixed_rate(port: int, pids: dict[str, int], args: argparse.Namespace
               ) -> tuple[float, int]:
    """The gateway's CPU µs per request at a steady open-loop rate (bench.py's generator,
    Poisson arrivals): below saturation every configuration wakes up for each request, so
    this compares what each request costs, not how well a saturated loop batches."""
    gateway = [pid for name, pid in pids.items() if name not in ("backend", "redis")]
    argv = [sys.executable, str(Path(bench.__file__).resolve()), "loadgen", "--url",
            f"http://127.0.0.1:{port}{bench.PATH}", "--rate", str(args.rate),
            "--seconds", str(args.seconds), "--warmup", "1"]
    before = sum(cpu_seconds(pid) for pid in gateway)
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
    try:
        out, err = popen.communicate(timeout=args.seconds + 40)
    finally:
        if popen.poll() is None:
            bench.stop_process(bench.Proc("loadgen", popen, Path(os.devnull)))
    used = sum(cpu_seconds(pid) for pid in gateway) - before
    if popen.returncode != 0:
        raise bench.BenchError(f"load generator failed: {err.decode()[-2000:]}")
    result = json.loads(out)
    total = result["count"] * (1 + args.seconds) / args.seconds  # CPU spans warm-up too
    errors = result.get("errors") or {}
    return (used / total * 1e6 if total else math.nan), int(sum(errors.values()))


def med(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def summarize(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for workers in sorted({r["workers"] for r in runs}):
        mine = [r for r in runs if r["workers"] == workers]
        names = list(mine[0]["cpu_us"])
        out[workers] = {
            "rps": med([r["rps"] for r in mine]),
            "gateway_cpu_us": med([r["gateway_cpu_us"] for r in mine]),
            "rate_cpu_us": med([r["rate_cpu_us"] for r in mine]),
            "rate_errors": sum(r["rate_errors"] for r in mine),
            "errors": sum(r["errors"] for r in mine),
            "cpu_us": {n: med([r["cpu_us"][n] for r in mine]) for n in names},
            "cores": {n: med([r["cores"][n] for r in mine]) for n in names},
            "switches": {n: med([r["switches_per_req"].get(n, math.nan) for r in mine])
                         for n in names},
            "rounds": [round(r["rps"]) for r in mine],
        }
    return out


def print_table(summary: dict[int, dict[str, Any]], rounds: list[tuple[float, float]]) -> None:
    print()
    print("| workers | req/s (median) | per round | gateway CPU µs/req at max | errors | "
          "gateway CPU µs/req at fixed rate | errors |")
    print("|---|---|---|---|---|---|---|")
    for workers, s in summary.items():
        print(f"| {workers} | {s['rps']:.0f} | {', '.join(map(str, s['rounds']))} | "
              f"{s['gateway_cpu_us']:.1f} | {s['errors']} | {s['rate_cpu_us']:.1f} | "
              f"{s['rate_errors']} |")
    if 1 in summary and 2 in summary:
        one, two = summary[1], summary[2]
        rps_ratio = med([b / a for a, b in rounds])
        print()
        print(f"throughput 2 workers / 1 worker: {rps_ratio:.2f}x (median of per-round "
              f"ratios; of medians {two['rps'] / one['rps']:.2f}x)")
        print(f"gateway CPU per request 2 workers / 1 worker: at saturation "
              f"{two['gateway_cpu_us'] / one['gateway_cpu_us']:.3f}, at the fixed rate "
              f"{two['rate_cpu_us'] / one['rate_cpu_us']:.3f}")
    print()
    print("| workers | process | CPU µs/req | cores used | context switches/req |")
    print("|---|---|---|---|---|")
    for workers, s in summary.items():
        for name in s["cpu_us"]:
            print(f"| {workers} | {name} | {s['cpu_us'][name]:.1f} | {s['cores'][name]:.2f} | "
                  f"{s['switches'][name]:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up before it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="open-loop req/s for the fixed-rate CPU column (0: skip)")
    parser.add_argument("--json", metavar="FILE", help="also write every run here")
    args = parser.parse_args(argv)
    if not (1 <= args.rounds <= 20 and 1 <= args.seconds <= 120 and args.warmup <= 30):
        parser.error("rounds 1-20, seconds 1-120, warm-up at most 30")
    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 1
    runs: list[dict[str, Any]] = []
    rounds: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="modelgate-workers-bench-") as tmp, \
            bench.sigterm_as_interrupt():
        procs = bench.Processes(Path(tmp), pin=False)
        try:
            redis, redis_port = start_redis(procs)
            if bench.find_nginx():
                backend, backend_port = bench.start_nginx(
                    procs, "backend", "backend.conf.template", bench.LOAD_CPU,
                    BODY=bench.BACKEND_BODY)
            else:
                backend, backend_port = bench.start_model_server(procs)
            script = Path(tmp) / "post.lua"
            script.write_text(bench.WRK_SCRIPT % {"body": bench.BODY.decode(),
                                                  "users": bench.USERS})
            for rnd in range(args.rounds):
                order = (1, 2) if rnd % 2 == 0 else (2, 1)
                got: dict[int, float] = {}
                for workers in order:
                    print(f"round {rnd + 1}/{args.rounds}: --workers {workers}",
                          file=sys.stderr, flush=True)
                    run = one_run(procs, workers, backend, redis, backend_port, redis_port,
                                  args, script)
                    run["round"] = rnd
                    runs.append(run)
                    got[workers] = run["rps"]
                rounds.append((got[1], got[2]))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
    summary = summarize(runs)
    print(f"\n{os.cpu_count()} CPUs; load average now {os.getloadavg()[0]:.2f}; backend "
          f"{'nginx' if bench.find_nginx() else 'model-server'}; wrk -t{args.threads} "
          f"-c{args.connections} -d{args.seconds:g}s, {args.rounds} interleaved rounds")
    print_table(summary, rounds)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
