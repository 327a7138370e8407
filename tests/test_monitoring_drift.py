"""Drift: PSI as a pure function, and per-backend drift through a real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import random
from typing import Any

import orjson
import pytest

from gateway.cli import main
from gateway.monitoring.component import Monitoring
from gateway.monitoring.drift import Baseline, compare, families, psi
from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    classifier_config,
    infer_body,
    running_gateway,
)


def test_psi_identical_is_zero_and_shift_is_large() -> None:
    a = {"setosa": 500.0, "versicolor": 300.0, "virginica": 200.0}
    assert psi(a, a) == 0.0
    assert psi(a, {k: v * 3 for k, v in a.items()}) == pytest.approx(0.0, abs=1e-12)
    slight = {"setosa": 490.0, "versicolor": 310.0, "virginica": 200.0}
    assert 0 < psi(a, slight) < 0.01
    shifted = {"setosa": 200.0, "versicolor": 300.0, "virginica": 500.0}
    assert psi(a, shifted) > 0.25
    # a class the reference never saw: finite (epsilon share), and large
    new = {**a, "unknown": 500.0}
    assert math.isfinite(psi(a, new)) and psi(a, new) > 0.25
    # symmetric in the sense PSI is: (a-e)ln(a/e) is the same both ways
    assert psi(a, shifted) == pytest.approx(psi(shifted, a))


def test_psi_of_samples_from_one_distribution_is_small() -> None:
    rng = random.Random(7)

    def draw(n: int, weights: list[float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for label in rng.choices(["a", "b", "c", "d"], weights=weights, k=n):
            out[label] = out.get(label, 0.0) + 1
        return out

    same = psi(draw(5000, [4, 3, 2, 1]), draw(5000, [4, 3, 2, 1]))
    moved = psi(draw(5000, [4, 3, 2, 1]), draw(5000, [1, 2, 3, 4]))
    assert same < 0.01 < 0.25 < moved


def test_compare_needs_samples() -> None:
    assert compare({"a": 5}, {"a": 5}, min_samples=10) is None
    assert compare({}, {"a": 50}, min_samples=0) is None
    assert compare({"a": 50}, {"a": 50}, min_samples=10) == 0.0
    with pytest.raises(ValueError):
        psi({}, {"a": 1})


def test_families_and_baseline_reference() -> None:
    counters = {"label:a": 3.0, "label:b": 1.0, "score_bucket:2": 4.0, "feature:x:0": 2.0,
                "feature:xy:1": 5.0, "output_total": 4.0}
    fams = families(counters, ["x", "xy"])
    assert fams == {"labels": {"a": 3.0, "b": 1.0}, "scores": {"2": 4.0},
                    "feature:x": {"0": 2.0}, "feature:xy": {"1": 5.0}}
    base = Baseline(taken_at=0, source="auto", window=60, live="blue",
                    counts={"blue": {"labels": {"a": 100.0}}})
    assert base.reference("green", "labels", 50) == {"a": 100.0}  # falls back to live's
    assert base.reference("green", "labels", 500) is None


PROBES: dict[str, Any] = {
    "path_suffix": "/infer",
    "input": {"features": {"petal_length": {"path": "inputs[0].data[*][2]",
                                            "range": [1, 7], "bins": 6}}},
    "output": {"prediction": "outputs[0].data", "score": "outputs[1].data"},
    "drift": {"window": "1m", "baseline": 0, "min_samples": 20},
}
SETOSA = [5.0, 3.4, 1.5, 0.2]
VIRGINICA = [6.7, 3.0, 5.6, 2.2]


async def test_drift_vs_live_and_vs_baseline(blue: ModelServer, green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, probes=PROBES,
                               override_header="x-modelgate-backend")
    async with running_gateway(config, components=[Monitoring]) as gw:
        r = await gw.admin.post("/admin/routes/classifier/drift/baseline", json={})
        assert r.status_code == 409  # no traffic yet: nothing changes
        for _ in range(30):  # blue sees mostly setosa
            await gw.client.post(INFER, json=infer_body([SETOSA, SETOSA, VIRGINICA]))
        r = await gw.admin.post("/admin/routes/classifier/drift/baseline",
                                json={"window": "1m", "reason": "known good"})
        assert r.status_code == 200, r.text
        assert r.json()["baseline"]["source"] == "admin"
        for _ in range(30):  # green sees mostly virginica
            await gw.client.post(INFER, json=infer_body([VIRGINICA, VIRGINICA, SETOSA]),
                                 headers={"x-modelgate-backend": "green"})
        r = await gw.admin.get("/admin/routes/classifier/drift")
        assert r.status_code == 200
        data = r.json()
        assert data["live"] == "blue" and data["window"] == 60
        b, g = data["backends"]["blue"], data["backends"]["green"]
        assert b["vs_live"] is None
        assert b["vs_baseline"]["labels"] == pytest.approx(0.0, abs=1e-9)
        assert g["vs_live"]["labels"] > 0.25
        assert g["vs_live"]["features"]["petal_length"] > 0.25
        assert g["vs_baseline"]["labels"] > 0.25  # green had no baseline: blue's is used
        assert g["labels"]["virginica"] == pytest.approx(2 / 3, abs=0.01)
        assert b["samples"]["labels"] == 90

        events = (await gw.admin.get("/admin/events")).json()["events"]
        assert [e["action"] for e in events] == ["drift_baseline"]
        assert events[0]["reason"] == "known good" and events[0]["actor"] == "admin"

        r = await gw.admin.get("/admin/routes/classifier/drift", params={"window": "2h"})
        assert r.status_code == 400
        r = await gw.admin.get("/admin/routes/nope/drift")
        assert r.status_code == 404

        table = await _cli(["drift", "classifier", "--admin", gw.admin_url, "--token", TOKEN])
        assert "blue (live)" in table and "feature petal_length" in table
        out = await _cli(["drift", "classifier", "--baseline", "--window", "30s", "--reason",
                          "cli", "--json", "--admin", gw.admin_url, "--token", TOKEN])
        assert orjson.loads(out)["baseline"]["window"] == 30
        probes = await _cli(["probes", "classifier", "--admin", gw.admin_url, "--token", TOKEN])
        assert "null rate" in probes and "green" in probes

        metrics = (await gw.admin.get("/metrics")).text
        assert ('modelgate_drift_psi{against="live",backend="green",family="labels",'
                'route="classifier"}') in metrics


async def _cli(argv: list[str]) -> str:
    """Run the (synchronous) CLI in a thread: the gateway shares this loop."""
    buf = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(buf):
            return main(argv)

    assert await asyncio.to_thread(run) == 0, buf.getvalue()
    return buf.getvalue()
