"""The benchmark's budget cells (`bench.py --cells`, `bench.py compare`), the 20 ms backend
(loadtest/slow_backend.py) and the soak (loadtest/soak.py): their pure pieces directly, then
each run for a few seconds at a tiny rate over real sockets.

None of these assert on speed: the figures belong to the scripts themselves.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "loadtest" / "bench.py"
SOAK = ROOT / "loadtest" / "soak.py"
SLOW = ROOT / "loadtest" / "slow_backend.py"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


bench = _load("loadtest_bench_cells", BENCH)
soak = _load("loadtest_soak", SOAK)

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server not installed")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in bench.children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# -- bench.py: pure pieces --------------------------------------------------------------------

def test_cells_bring_their_own_baselines_once() -> None:
    plan = bench.plan_targets(["direct", "nginx"], ["canary", "model20ms", "shadow-probes"])
    assert plan == [
        ("direct", "trivial"), ("nginx", "trivial"),
        ("direct-model20ms", "model20ms"), ("nginx-model20ms", "model20ms"),
        ("canary", "trivial"), ("model20ms", "model20ms"), ("shadow-probes", "trivial"),
    ]
    # A cell alone still gets direct and nginx on its backend.
    assert bench.plan_targets([], ["workers2-redis"]) == [
        ("direct", "trivial"), ("nginx", "trivial"), ("workers2-redis", "trivial")]
    with pytest.raises(bench.BenchError, match="unknown cell.*'nope'"):
        bench.parse_list("canary,nope", tuple(bench.CELLS), "cell")
    assert bench.parse_list("canary, canary,model20ms", tuple(bench.CELLS), "cell") == [
        "canary", "model20ms"]


def _record(rnd: int, target: str, p50: float, p99: float, rps: float) -> Any:
    rec = bench.RunRecord(rnd, target)
    rec.open_loop = {"latency_ms": {"p50": p50, "p90": p50, "p99": p99, "p99.9": p99},
                     "achieved_rate": 1000.0, "errors": {}, "count": 1000,
                     "lag_ms": {"p99": 0.1}}
    rec.closed_rps = rps
    rec.peak_rss_mb = 60.0 + rnd
    return rec


def test_a_cell_is_compared_with_the_baselines_of_its_own_backend() -> None:
    records = []
    for rnd in range(3):
        records += [
            _record(rnd, "direct", 0.2, 1.0, 40_000), _record(rnd, "nginx", 0.3, 1.2, 20_000),
            _record(rnd, "direct-model20ms", 20.2, 21.0, 3_000),
            _record(rnd, "nginx-model20ms", 20.4, 21.3, 2_900),
            _record(rnd, "canary", 0.7, 1.8, 8_000),
            _record(rnd, "model20ms", 20.9, 22.5, 2_320),
        ]
    baselines = {name: bench.BASELINES[kind] for name, kind in bench.plan_targets(
        ["direct", "nginx"], ["canary", "model20ms"])}
    summary = bench.summarize(records, list(baselines), baselines)
    assert summary["canary"]["added_p99"] == pytest.approx(0.8)
    assert summary["canary"]["x_nginx"] == pytest.approx(0.4)
    # Against the 20 ms backend's direct and nginx, not the trivial backend's.
    assert summary["model20ms"]["added_p50"] == pytest.approx(0.7)
    assert summary["model20ms"]["added_p99"] == pytest.approx(1.5)
    assert summary["model20ms"]["x_nginx"] == pytest.approx(0.8)
    assert summary["model20ms"]["baseline"] == {"direct": "direct-model20ms",
                                                "nginx": "nginx-model20ms"}
    assert summary["direct-model20ms"]["added_p99"] == 0
    assert summary["canary"]["peak_rss_mb"] == 62.0  # the highest peak of the rounds


def test_cell_configs_are_valid_gateway_configs() -> None:
    text = bench.gateway_config(18000, 18001, 19000, shadow_port=19001, probes=True,
                                store="redis://127.0.0.1:6390/0")
    config = parse_config(yaml.safe_load(text))
    route = config.routes[0]
    assert route.canary == "canary" and route.canary_weight == 10
    assert route.backends["shadow"].urls == ("http://127.0.0.1:19001",)
    assert route.shadow is not None and route.shadow.backend == "shadow"
    assert route.shadow.sample == 100
    assert route.probes is not None and route.probes.sample == 1.0
    assert config.store.startswith("redis://127.0.0.1:6390")
    plain = parse_config(yaml.safe_load(bench.gateway_config(18000, 18001, 19000)))
    assert plain.routes[0].shadow is None and plain.routes[0].probes is None


def _report(commit: str, **rows: dict[str, float]) -> dict[str, Any]:
    return {"environment": {"git": {"commit": commit}, "loadavg": [0.5], "cpus": 2,
                            "time": "t"},
            "summary": {name: {"errors": 0, "closed_errors": 0, **row}
                        for name, row in rows.items()}}


def test_compare_gives_b_over_a_per_cell() -> None:
    a = _report("a" * 40, canary={"p99": 2.0, "added_p99": 1.0, "open_cpu_us": 200.0,
                                  "closed_rps": 10_000.0, "peak_rss_mb": 70.0},
                nginx={"p99": 1.0})
    b = _report("b" * 40, canary={"p99": 1.0, "added_p99": 0.4, "open_cpu_us": 150.0,
                                  "closed_rps": 12_500.0, "peak_rss_mb": 70.0,
                                  "closed_errors": 3},
                other={"p99": 1.0})
    rows = bench.compare_reports(a, b)
    assert [r["target"] for r in rows] == ["canary"]  # only what both measured
    row = rows[0]
    assert row["p99"] == {"a": 2.0, "b": 1.0, "ratio": 0.5}
    assert row["added_p99"]["ratio"] == pytest.approx(0.4)
    assert row["open_cpu_us"]["ratio"] == pytest.approx(0.75)
    assert row["closed_rps"]["ratio"] == pytest.approx(1.25)
    assert row["peak_rss_mb"]["ratio"] == 1.0
    assert math.isnan(row["x_nginx"]["ratio"])  # missing on both sides: no ratio
    assert row["errors"] == {"a": 0, "b": 3}


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_report("a" * 40, canary={"p99": 2.0, "closed_rps": 100.0})))
    b.write_text(json.dumps(_report("b" * 40, canary={"p99": 1.0, "closed_rps": 150.0})))
    assert bench.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "aaaaaaaaaa" in out and "bbbbbbbbbb" in out
    assert "canary" in out and "0.50×" in out and "1.50×" in out
    # Bad input: a clear message, exit 2.
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert bench.main(["compare", str(a), str(bad)]) == 2
    assert "bad.json: not JSON" in capsys.readouterr().err
    bad.write_text('{"runs": []}')
    assert bench.main(["compare", str(bad), str(b)]) == 2
    assert "not a bench.py --json report" in capsys.readouterr().err
    assert bench.main(["compare", str(a), str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


# -- soak.py: the verdict -----------------------------------------------------------------------

def _samples(rss: list[float], fds: list[int], step: float = 10.0,
             connections: list[int] | None = None) -> list[Any]:
    conns = connections or [0] * len(rss)
    return [soak.Sample(t=step * (i + 1), rss_mb=r, peak_rss_mb=max(rss[: i + 1]), fds=f,
                        connections=c)
            for i, (r, f, c) in enumerate(zip(rss, fds, conns, strict=True))]


def _rows(errors: int = 0) -> list[dict[str, Any]]:
    return [{"t": 60.0, "count": 60_000, "errors": {"timeout": errors} if errors else {}},
            {"t": 120.0, "count": 60_000, "errors": {}}]


def test_soak_verdict() -> None:
    # Samples every 10 s for 130 s; the load ran 120 s. Windows of 20 s: the first is 60–70 s,
    # the last 110–120 s (the sample at 130 s is after the load and does not count).
    steady = _samples([50, 60, 68, 70, 71, 72, 73, 74, 75, 76, 76, 77.5, 10],
                      [40, 60, 60, 60, 60, 60, 75, 60, 62, 60, 61, 90, 60])
    v = soak.verdict(steady, _rows(), baseline_after=60, duration=120, tolerance=0.10,
                     window=20)
    assert v["passed"], v
    assert (v["baseline"]["from"], v["baseline"]["to"]) == (60, 70)
    assert (v["end"]["from"], v["end"]["to"]) == (110, 120)
    assert v["baseline"]["rss_mb"] == 72.5 and v["end"]["rss_mb"] == 76.75  # medians
    assert v["rss_change"] == pytest.approx(76.75 / 72.5 - 1)
    # Descriptors: the floor of each window; a burst (90 at 120 s) is no leak.
    assert v["baseline"]["other_fds"] == 60 and v["end"]["other_fds"] == 61
    assert v["end"]["fds_max"] == 90
    # Connections opened by congestion at the end are no leak either: only the descriptors
    # besides established connections are judged.
    congested = _samples([70] * 12, [50] * 6 + [80] * 6,
                         connections=[35] * 6 + [65] * 6)
    v = soak.verdict(congested, _rows(), 60, 120, 0.10, window=20)
    assert v["passed"] and v["end"]["fds"] == 80 and v["end"]["other_fds"] == 15, v
    # RSS growing past 10 %: fails on RSS only.
    leak = _samples([60] * 6 + [64, 66, 68, 70, 72, 78], [60] * 12)
    v = soak.verdict(leak, _rows(), 60, 120, 0.10, window=20)
    assert not v["passed"] and not v["rss_ok"] and v["fds_ok"] and v["reason"] == "RSS"
    # A descriptor leak raises the floor.
    fds = _samples([60] * 12, [60] * 6 + [62, 64, 66, 68, 70, 72])
    v = soak.verdict(fds, _rows(), 60, 120, 0.10, window=20)
    assert not v["passed"] and v["rss_ok"] and not v["fds_ok"]
    # One failed request fails the soak.
    v = soak.verdict(steady, _rows(errors=1), 60, 120, 0.10, window=20)
    assert not v["passed"] and v["errors"] == 1 and "1 failed requests" in v["reason"]
    # Nothing sampled in the last window: no verdict can pass.
    v = soak.verdict(_samples([60] * 8, [60] * 8), _rows(), 60, 120, 0.10, window=20)
    assert not v["passed"] and "no sample" in v["reason"]


def test_soak_table_rows_take_the_last_sample_of_each_interval() -> None:
    samples = _samples([60, 61, 62, 63], [50, 51, 52, 53], step=30)
    rows = [{"t": 60.0, "rate": 1000.0, "errors": {}, "p50": 0.5, "p99": 1.5, "max": 3.0,
             "connections": 32},
            {"t": 120.0, "rate": 999.0, "errors": {"status_5xx": 2}, "p50": 0.5, "p99": 1.6,
             "max": 4.0, "connections": 32}]
    lines = soak.table(samples, rows)
    assert lines[2].startswith("| 60 | 61.0 | 61.0 | 51 | 51 | 1,000 | 0 |")
    assert lines[3].startswith("| 120 | 63.0 | 63.0 | 53 | 53 | 999 | 2 |")


def test_soak_rejects_unbounded_runs(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--rate", "0"], "--rate"), (["--duration", "99999"], "--duration"),
                          (["--duration", "10", "--baseline-after", "10"], "--baseline-after"),
                          (["--duration", "100", "--baseline-after", "60"], "--window"),
                          (["--tolerance", "1.5"], "--tolerance")):
        with pytest.raises(SystemExit) as exc:
            soak.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


# -- over real sockets ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_slow_backend_answers_after_its_delay_in_order() -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SLOW), "--port", str(port), "--delay-ms", "50",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        assert b"slow_backend" in await asyncio.wait_for(proc.stdout.readline(), 20)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        started = time.monotonic()
        writer.write(request * 2)  # pipelined: two answers, in order, each after 50 ms
        answers = []
        for _ in range(2):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            answers.append(head + await reader.readexactly(length))
        elapsed = time.monotonic() - started
        assert elapsed >= 0.05
        assert all(a.startswith(b"HTTP/1.1 200 OK") and a.endswith(b"]}]}") for a in answers)
        writer.close()
        await writer.wait_closed()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0


@needs_redis
async def test_bench_runs_every_cell(tmp_path: Path) -> None:
    out = tmp_path / "cells.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH), "--cells", ",".join(bench.CELLS), "--rate", "100",
        "--seconds", "0.6", "--warmup", "0.1", "--rounds", "1", "--no-closed",
        "--json", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    nginx = bench.find_nginx() is not None
    expected = {"direct", "direct-model20ms", *bench.CELLS}
    if nginx:
        expected |= {"nginx", "nginx-model20ms"}
    summary = report["summary"]
    assert set(summary) == expected
    for name, row in summary.items():
        assert row["errors"] == 0 and row["closed_errors"] == 0, (name, row)
        assert 30 <= row["count"] <= 95, (name, row)
    for cell in bench.CELLS:
        row = summary[cell]
        assert row["open_cpu_us"] > 0 and row["peak_rss_mb"] > 10, (cell, row)
        assert not math.isnan(row["added_p99"]), (cell, row)
    # The 20 ms backend is slow, and its cell is compared with it, not with the fast one.
    assert summary["direct-model20ms"]["p50"] >= 20
    assert summary["model20ms"]["baseline"]["direct"] == "direct-model20ms"
    assert report["cells"]["model20ms"]["backend"] == "model20ms"
    # Two workers: their CPU and memory are counted with the supervisor's.
    workers = [k for k in report["processes"] if k.startswith("workers2-redis worker")]
    assert len(workers) == 2, report["processes"]
    assert summary["workers2-redis"]["peak_rss_mb"] > summary["canary"]["peak_rss_mb"]
    env = report["environment"]
    assert env["cpus"] and len(env["loadavg"]) == 3 and env["time"]
    assert env["git"]["commit"] and len(env["git"]["commit"]) == 40
    assert "workers2-redis" in stdout.decode()
    assert all(_gone(pid) for pid in report["processes"].values()), report["processes"]


async def test_soak_passes_a_short_run_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SOAK), "--rate", "100", "--duration", "2", "--interval", "0.5",
        "--baseline-after", "0.5", "--window", "0.5", "--sample-every", "0.2",
        "--connections", "8",
        "--json", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (stdout + stderr).decode()[-3000:]
    report = json.loads(out.read_text())
    v = report["verdict"]
    assert v["passed"] and v["errors"] == 0 and 130 <= v["requests"] <= 270, v
    assert v["baseline"]["from"] >= 0.5 and v["end"]["from"] >= v["baseline"]["to"]
    assert v["baseline"]["fds"] > 8 and v["end"]["rss_mb"] > 10
    # The 8 client connections (and the pools') are established connections, not the rest.
    assert 0 < v["end"]["other_fds"] < v["end"]["fds"] - 8
    assert len(report["intervals"]) >= 3
    assert all(row["connections"] == 8 for row in report["intervals"])
    # Shadow and probes were on: every request was mirrored and probed.
    assert report["shadow"]["compared"] >= v["requests"] * 0.9, report["shadow"]
    assert report["shadow"]["dropped"] == 0
    assert report["probed_requests"] >= v["requests"]
    assert "PASS" in stdout.decode() and "| t (s) |" in stdout.decode()
    assert all(_gone(pid) for pid in report["processes"].values())


async def test_soak_stops_everything_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SOAK), "--rate", "50", "--duration", "30", "--interval", "1",
        "--baseline-after", "1", "--window", "5",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        seen = b""
        while b"started loadgen" not in seen:
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert line, f"soak.py ended before starting its load: {seen.decode()[-2000:]}"
            seen += line
        started = await wait_for(lambda: len(_descendants(proc.pid)) >= 4
                                 and _descendants(proc.pid), timeout=20,
                                 message="soak.py's children")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    assert all(_gone(pid) for pid in started), [p for p in started if not _gone(p)]
