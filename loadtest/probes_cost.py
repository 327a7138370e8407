#!/usr/bin/env python3
"""What the input/output probes cost: gateway CPU per request with probes on vs off.

    python loadtest/probes_cost.py [--rate 1000] [--seconds 3.5] [--rounds 5] [--json out.json]

Starts one demo model server and two gateways (`modelgate serve`) in front of it that differ
only in the route's ``probes:`` section: "off" has none (the route gets no tap), "on" has the
demo's full set (input length, missing values, required paths, two binned features; output
prediction, labels, score histogram, error body) at `--sample` (default 1.0). Each round
drives both in turn -- order alternating -- with bench.py's open-loop Poisson generator at
`--rate`, and reads each gateway's CPU time from /proc/<pid>/stat around its run. Figures are
medians over rounds; the on/off difference is taken within each round before the median (the
machine is shared and noisy). It also times the probe tap alone, in this process, on the same
request and response bodies (a hot loop: the floor of the cost).

Bounds: 127.0.0.1 only; about rounds × 2 × (warm-up + seconds) + a few seconds of start-up
(~45-55 s by default); every process started is stopped by its PID (bench.py's `Processes`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402 - loadtest/bench.py: load generator and process handling

PROBES_YAML = """\
    probes:
      sample: {sample}
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
        score: outputs[1].data
        labels: [setosa, versicolor, virginica]
        error_body: error
"""
MODES = ("off", "on")


def gateway_config(port: int, admin_port: int, backend_port: int, probes: bool,
                   sample: float = 1.0) -> str:
    backend = f"http://127.0.0.1:{backend_port}"
    text = (
        f"listen: 127.0.0.1:{port}\n"
        f"admin:\n  listen: 127.0.0.1:{admin_port}\n"
        "routes:\n"
        "  - name: classifier\n"
        "    match:\n      path_prefix: /v2/models/classifier\n"
        f"    backends:\n      blue:\n        url: {backend}\n"
        f"      green:\n        url: {backend}\n"
        "    live: blue\n"
        "    sticky:\n      header: x-user-id\n"
    )
    return text + (PROBES_YAML.replace("{sample}", f"{sample:g}") if probes else "")


def start_gateway(procs: bench.Processes, mode: str, backend_port: int,
                  sample: float) -> bench.Target:
    port, admin_port = bench.free_port(), bench.free_port()
    config = procs.workdir / f"gateway-{mode}.yaml"
    config.write_text(gateway_config(port, admin_port, backend_port, mode == "on", sample))
    env = {**os.environ, "MODELGATE_ADMIN_TOKEN": bench.ADMIN_TOKEN, "PYTHONUNBUFFERED": "1",
           "MODELGATE_STATE_DIR": str(procs.workdir)}
    proc = procs.start(f"gateway-probes-{mode}",
                       [sys.executable, "-m", "gateway", "serve", "-c", str(config)],
                       bench.PROXY_CPU, env)
    bench.wait_ready(proc, port)
    return bench.Target(mode, port, proc)


def tap_cost(iterations: int = 20_000) -> float:
    """µs per probe-tap call on the benchmark's request and the model's answer, in-process."""
    import yaml

    from gateway.config import parse_config
    from gateway.demo.model_server import predict
    from gateway.metrics import Recorder
    from gateway.monitoring.probes import RouteProbes
    from gateway.routing import Exchange

    doc = yaml.safe_load("routes:\n  - name: classifier\n    match: {path_prefix: /v2}\n"
                         "    backends: {blue: {url: 'http://127.0.0.1:1'}}\n    live: blue\n"
                         + PROBES_YAML.replace("{sample}", "1"))
    route = parse_config(doc).routes[0]
    assert route.probes is not None
    tap = RouteProbes(route, route.probes, Recorder())
    label, prob = predict("v1", [[5.1, 3.5, 1.4, 0.2]])[0]
    response = json.dumps({
        "model_name": "classifier", "model_version": "v1", "id": "bench-request-0001",
        "outputs": [{"name": "label", "shape": [1], "datatype": "BYTES", "data": [label]},
                    {"name": "probability", "shape": [1], "datatype": "FP32",
                     "data": [prob]}]}).encode()
    ex = Exchange()
    ex.route, ex.backend, ex.method, ex.target, ex.status = (
        "classifier", "blue", "POST", bench.PATH, 200)
    ex.request_body, ex.response_body = bench.BODY, response
    for _ in range(1000):
        tap(ex)
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(iterations // 5):
            tap(ex)
        best = min(best, (time.process_time() - started) / (iterations // 5) * 1e6)
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelgate-probes-cost-") as tmp:
        procs = bench.Processes(Path(tmp), pin)
        try:
            backend, backend_port = bench.start_model_server(procs)
            targets = {mode: start_gateway(procs, mode, backend_port, args.sample)
                       for mode in MODES}
            for rnd in range(args.rounds):
                order = MODES if rnd % 2 == 0 else MODES[::-1]
                row: dict[str, Any] = {"round": rnd}
                for mode in order:
                    print(f"round {rnd + 1}/{args.rounds}: probes {mode}", file=sys.stderr,
                          flush=True)
                    result, cpu_us = bench.run_open(procs, targets[mode], args,
                                                    seed=1000 * rnd + 1)
                    row[mode] = {"cpu_us": cpu_us, "p50_ms": result["latency_ms"]["p50"],
                                 "p99_ms": result["latency_ms"]["p99"],
                                 "achieved_rate": result["achieved_rate"],
                                 "ok": result["ok"], "errors": result["errors"]}
                row["added_cpu_us"] = row["on"]["cpu_us"] - row["off"]["cpu_us"]
                records.append(row)
        finally:
            procs.stop_all()

    def med(mode: str, key: str) -> float:
        return statistics.median(r[mode][key] for r in records)

    off, on = med("off", "cpu_us"), med("on", "cpu_us")
    added = statistics.median(r["added_cpu_us"] for r in records)
    return {
        "config": {"rate": args.rate, "seconds": args.seconds, "warmup": args.warmup,
                   "rounds": args.rounds, "sample": args.sample, "pinned": pin,
                   "cpus": os.cpu_count()},
        "summary": {
            "cpu_us_per_request_off": round(off, 1),
            "cpu_us_per_request_on": round(on, 1),
            "added_cpu_us_per_request": round(added, 1),
            "added_percent": round(100 * added / off, 1) if off else None,
            "p50_ms": {"off": round(med("off", "p50_ms"), 3),
                       "on": round(med("on", "p50_ms"), 3)},
            "p99_ms": {"off": round(med("off", "p99_ms"), 3),
                       "on": round(med("on", "p99_ms"), 3)},
            "tap_alone_us_per_call": round(tap_cost(), 2),
        },
        "rounds": records,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop req/s (default 1000)")
    p.add_argument("--seconds", type=float, default=3.5,
                   help="measured s per run (default 3.5)")
    p.add_argument("--warmup", type=float, default=1.0, help="uncounted s per run (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--connections", type=int, default=256, help="open-loop connection cap")
    p.add_argument("--sample", type=float, default=1.0,
                   help="probes' sample rate in the 'on' gateway (default 1.0)")
    p.add_argument("--json", metavar="FILE", help="also write the full result here")
    args = p.parse_args(argv)
    if (not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 30 or not 0 < args.rate <= 5000
            or not 0 <= args.sample <= 1):
        p.error("rounds 1-20, seconds up to 30, rate up to 5000, sample 0-1")
    try:
        result = run(args)
    except bench.BenchError as exc:
        print(f"probes_cost.py: {exc}", file=sys.stderr)
        return 1
    s = result["summary"]
    print(f"gateway CPU per request at {args.rate:g} req/s (median of {args.rounds} "
          f"interleaved rounds, probes sample {args.sample:g}):")
    print(f"  probes off  {s['cpu_us_per_request_off']:7.1f} µs   p50 {s['p50_ms']['off']:.3f} "
          f"ms  p99 {s['p99_ms']['off']:.3f} ms")
    print(f"  probes on   {s['cpu_us_per_request_on']:7.1f} µs   p50 {s['p50_ms']['on']:.3f} "
          f"ms  p99 {s['p99_ms']['on']:.3f} ms")
    print(f"  added       {s['added_cpu_us_per_request']:7.1f} µs  ({s['added_percent']}%)")
    print(f"  probe tap alone, in-process: {s['tap_alone_us_per_call']} µs per call")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
