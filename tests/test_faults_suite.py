"""The fault suite (loadtest/faults.py): its pure parts directly, and a tiny real run of three
cheap scenarios (real gateway, real model servers, SIGKILL and SIGTERM) with their verdicts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "loadtest" / "faults.py"


@pytest.fixture(scope="module")
def faults() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("faults_suite", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_drain_classification(faults: ModuleType) -> None:
    stopped, closed = 10.0, 15.0
    failures = [
        (9.0, "reset"),        # before SIGTERM: a failure
        (12.0, "http_502"),    # while draining: a failure
        (14.0, "reset"),       # a kept-alive request reset while draining: a failure
        (14.95, "reset"),      # written as the idle connection closed: refused
        (15.2, "connect"),     # the listener is closed: refused
        (16.0, "reset"),       # on a connection closed by the stop: refused
        (16.0, "timeout"),     # no answer: a failure whenever it was sent
    ]
    failed, refused = faults.classify_drain(failures, stopped, closed)
    assert failed == Counter({"reset": 2, "http_502": 1, "timeout": 1})
    assert refused == Counter({"reset": 2, "connect": 1})


def test_arguments_are_checked(faults: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--only", "nope"], ["--rate", "0"], ["--seconds", "1"],
                 ["--seconds", "5", "--fault-at", "5"]):
        with pytest.raises(SystemExit) as exc:
            faults.parse_args(argv)
        assert exc.value.code == 2
    assert "unknown scenario(s): nope" in capsys.readouterr().err
    args = faults.parse_args(["--only", "url_killed, switch_storm"])
    assert args.names == ["url_killed", "switch_storm"]
    assert set(faults.SCENARIOS) == set(faults.EXPECTED)


def test_rows_and_markdown(faults: ModuleType) -> None:
    stats = faults.LoadStats(t0=0.0, sent=10, ok=8, failures=[(1.0, "http_504"), (2.0, "reset")],
                             oks=[], p99_ms=12.34)
    good = faults.row("backend_hang", faults.Outcome(stats, "came back", True))
    assert good["failed"] == 2 and good["failed_by_kind"] == {"http_504": 1, "reset": 1}
    assert good["verdict"] == "PASS" and not good["zero_failures_required"]
    broken = faults.row("switch_storm", None, "BenchError: no gateway")
    assert broken["verdict"] == "FAIL" and broken["zero_failures_required"]
    md = faults.markdown({"scenarios": [good, broken]})
    assert "| backend_hang | 10 | 2 (http_504 1, reset 1) | 12.3 | came back |" in md
    assert "ERROR: BenchError: no gateway" in md


def test_suite_runs_three_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    names = ["switch_storm", "url_killed", "sigterm_drain"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", ",".join(names), "--rate", "60",
         "--seconds", "3", "--fault-at", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rate"] == 60 and report["seconds"] == 3 and report["cpus"] >= 1
    rows = {r["scenario"]: r for r in report["scenarios"]}
    assert list(rows) == names
    for r in rows.values():
        assert set(r) >= {"sent", "ok", "failed", "failed_by_kind", "p99_ms", "recovered",
                          "expect", "verdict", "zero_failures_required"}
        assert r["verdict"] == "PASS", r
        assert r["failed"] == 0 and r["zero_failures_required"]
        assert 100 <= r["sent"] <= 300  # ~60/s x 3 s of Poisson arrivals
        assert r["p99_ms"] is not None and r["p99_ms"] > 0
    assert "URL ejected" in rows["url_killed"]["recovered"]
    assert "40/40 switch+rollback ok" in rows["switch_storm"]["recovered"]
    drain = rows["sigterm_drain"]
    assert drain["in_flight_completed"] >= 1 and "exit 0" in drain["recovered"]
    assert sum(drain["refused_after_stop"].values()) > 0  # load went on after the stop
    assert "fault suite" in proc.stdout and "PASS" in proc.stdout
