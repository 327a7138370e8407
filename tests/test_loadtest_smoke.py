"""Smoke tests of the load-test kit (loadtest/): the open-loop generator, the benchmark's
orchestration (processes started and stopped by PID) and the Locust scenarios.

None of these assert on speed: the figures belong to `python loadtest/bench.py`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from tests.helpers import ModelServer, classifier_config, model_server, running_gateway, wait_for

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "loadtest" / "bench.py"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadtest_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


# -- pure pieces ----------------------------------------------------------------------------

def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile(values, 99.9) == 100.0
    assert bench.percentile([3.0], 99) == 3.0
    assert math.isnan(bench.percentile([], 50))


def _record(rnd: int, target: str, p50: float, p99: float, rps: float) -> Any:
    rec = bench.RunRecord(rnd, target)
    rec.open_loop = {"latency_ms": {"p50": p50, "p90": p50, "p99": p99, "p99.9": p99},
                     "achieved_rate": 1000.0, "errors": {}, "count": 1000,
                     "lag_ms": {"p99": 0.1}}
    rec.closed_rps = rps
    return rec


def test_summary_compares_within_each_round_then_takes_medians() -> None:
    records = [
        _record(0, "direct", 0.2, 1.0, 40_000), _record(0, "nginx", 0.3, 1.2, 20_000),
        _record(0, "modelgate", 0.8, 2.0, 5_000),
        # A noisy round: everything slower, the differences and ratios much the same.
        _record(1, "direct", 0.4, 3.0, 20_000), _record(1, "nginx", 0.5, 3.3, 10_000),
        _record(1, "modelgate", 1.0, 4.1, 2_400),
        _record(2, "direct", 0.2, 1.1, 40_000), _record(2, "nginx", 0.3, 1.3, 20_000),
        _record(2, "modelgate", 0.9, 2.2, 5_200),
    ]
    summary = bench.summarize(records, ["direct", "nginx", "modelgate"])
    mg = summary["modelgate"]
    assert mg["added_p50"] == pytest.approx(0.6)
    assert mg["added_p99"] == pytest.approx(1.1)
    assert mg["x_nginx"] == pytest.approx(0.25)
    assert mg["closed_rps"] == 5_000
    assert summary["nginx"]["x_nginx"] == pytest.approx(1.0)
    assert math.isnan(summary["direct"]["added_p99"]) is False  # direct vs itself: 0
    assert summary["direct"]["added_p99"] == 0


def test_parse_wrk_report() -> None:
    text = (
        "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n"
        "  104212 requests in 5.00s, 20.1MB read\n"
        "  Socket errors: connect 0, read 2, write 0, timeout 1\n"
        "  Non-2xx or 3xx responses: 4\nRequests/sec:  20841.90\nTransfer/sec:      4.02MB\n"
    )
    assert bench.parse_wrk(text) == (20841.90, 104212, 7)
    rps, total, errors = bench.parse_wrk("garbage")
    assert math.isnan(rps) and total == 0 and errors == 0


def test_generated_configs_are_complete() -> None:
    config = parse_config(yaml.safe_load(bench.gateway_config(18000, 18001, 19000)))
    route = config.routes[0]
    assert route.path_prefix == "/" and route.live == "stable"
    assert route.canary == "canary" and route.canary_weight == 10
    assert route.sticky is not None and route.sticky.name == "x-user-id"
    assert {b.urls for b in route.backends.values()} == {("http://127.0.0.1:19000",)}
    for template, extra in (("backend.conf.template", {"BODY": bench.BACKEND_BODY}),
                            ("proxy.conf.template", {"BACKEND_PORT": "19000"})):
        text = bench.render(template, DIR="/tmp/x", PORT="18000", **extra)
        assert "@@" not in text and "127.0.0.1:18000" in text
    with pytest.raises(bench.BenchError, match="BACKEND_PORT"):
        bench.render("proxy.conf.template", DIR="/tmp/x", PORT="18000")


def test_requests_are_built_once_with_distinct_users() -> None:
    reqs = bench.build_requests("127.0.0.1:1", "/p?q=1", b"{}", users=3)
    assert len(reqs) == 3 and len(set(reqs)) == 3
    assert reqs[0].startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n")
    assert b"x-user-id: user-2\r\n" in reqs[2] and reqs[2].endswith(b"Content-Length: 2\r\n\r\n{}")


# -- the generator over real sockets ---------------------------------------------------------

async def test_open_loop_sends_the_rate_without_errors(blue: ModelServer) -> None:
    result = await bench.open_loop(f"{blue.url}{bench.PATH}", 200, 1.0, warmup=0.2)
    assert 140 <= result.count <= 260, result  # Poisson: 200 ± 30%
    assert result.errors == {} and result.ok == result.count
    assert result.latency_ms["p50"] > 0 and result.latency_ms["p99"] >= result.latency_ms["p50"]
    assert 1 <= result.connections <= 256


async def test_open_loop_counts_failures_and_stops_on_time(unused_tcp_port: int) -> None:
    started = time.monotonic()
    refused = await bench.open_loop(f"http://127.0.0.1:{unused_tcp_port}/", 100, 0.5,
                                    warmup=0, timeout=1.0)
    assert refused.ok == 0 and refused.errors == {"connect": refused.count}
    async with model_server("v1", error_rate=1.0) as failing:
        errors = await bench.open_loop(f"{failing.url}{bench.PATH}", 100, 0.5, warmup=0)
    assert errors.ok == 0 and errors.errors == {"status_5xx": errors.count}
    assert time.monotonic() - started < 10


async def test_open_loop_through_the_gateway_spreads_users(blue: ModelServer,
                                                           green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, canary={"backend": "green", "weight": 50})
    async with running_gateway(config) as gw:
        result = await bench.open_loop(f"{gw.url}{bench.PATH}", 200, 1.0, warmup=0.2)
        assert result.errors == {} and 140 <= result.ok <= 260
        stats = {b: gw.gateway.recorder.stats("classifier", b).status_totals[2]
                 for b in ("blue", "green")}
        # 1000 distinct x-user-id values on a sticky 50% split: both backends get users.
        assert stats["blue"] > 20 and stats["green"] > 20, stats


# -- bench.py as operators run it ------------------------------------------------------------

def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_bench_runs_and_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH), "--targets", "direct,modelgate-fast", "--rate", "200",
        "--seconds", "1", "--warmup", "0.2", "--rounds", "1", "--closed-seconds", "1",
        "--json", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert set(summary) == {"direct", "modelgate-fast"}
    for name, row in summary.items():
        assert row["errors"] == 0 and row["closed_errors"] == 0, (name, row)
        assert 140 <= row["count"] <= 260, (name, row)
    if shutil.which("wrk"):
        assert summary["modelgate-fast"]["closed_rps"] > 0
    assert "modelgate-fast" in stdout.decode()  # the table
    assert report["processes"] and all(_gone(pid) for pid in report["processes"].values())


async def test_bench_interrupted_stops_every_process(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH), "--targets", "direct,modelgate", "--rate", "100",
        "--seconds", "60", "--rounds", "1", "--no-closed",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        # Wait for the first load run: by then the backend, the gateway and the load
        # generator are all running as children of bench.py.
        while b"open loop" not in await asyncio.wait_for(proc.stderr.readline(), 60):
            pass
        children = await wait_for(lambda: len(_children(proc.pid)) >= 3 and _children(proc.pid),
                                  timeout=20, message="bench.py's children")
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    assert all(_gone(pid) for pid in children), [p for p in children if not _gone(p)]


# -- the Locust scenarios ----------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
async def test_locust_scenarios_run_headless_through_the_gateway(
    blue: ModelServer, green: ModelServer, tmp_path: Path
) -> None:
    # Locust is run in its own process: importing it here would monkey-patch this one (gevent).
    config = classifier_config(blue.url, green.url, canary={"backend": "green", "weight": 10})
    config["routes"].append({"name": "chat", "match": {"path_prefix": "/v1/chat"},
                             "backends": {"blue": {"url": blue.url}}, "live": "blue"})
    async with running_gateway(config) as gw:
        stats_file = tmp_path / "stats.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", gw.url,
            "--headless", "-u", "4", "-r", "4", "-t", "3s", "--only-summary", "--skip-log",
            "--json-file", str(stats_file.with_suffix("")), "--exit-code-on-error", "3",
            "ClassifierUser", "BatchUser", "ChatUser",
            # Each kind of user runs, whatever the weights (a list option: it goes last).
            "--config-users", json.dumps([
                {"user_class_name": name, "fixed_count": n}
                for name, n in (("ClassifierUser", 2), ("BatchUser", 1), ("ChatUser", 1))
            ]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "MODELGATE_STREAM_DELAY_MS": "1"},
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0, (stdout + stderr).decode()[-3000:]
    stats = {s["name"]: s for s in json.loads(stats_file.read_text())}
    for name in ("infer (1 row)", "infer (batch)", "chat (stream)", "chat: first token",
                 "chat: whole stream"):
        assert stats[name]["num_requests"] > 0, sorted(stats)
    assert sum(s["num_failures"] for s in stats.values()) == 0, stats


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
async def test_locust_chat_users_stop_without_a_chat_route(blue: ModelServer,
                                                           green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", gw.url,
            "--headless", "-u", "2", "-r", "2", "-t", "2s", "--only-summary",
            "ClassifierUser", "ChatUser",
            "--config-users", json.dumps({"user_class_name": "ChatUser", "fixed_count": 1}),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 40)
    output = (stdout + stderr).decode()
    assert proc.returncode == 0, output[-3000:]
    assert "no route for /v1/chat/completions" in output
