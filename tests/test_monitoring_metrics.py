"""Prometheus exposition: the contract names, with the right labels, from real traffic."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import BackendStats
from gateway.monitoring.component import Monitoring
from tests.helpers import (
    INFER,
    ModelServer,
    classifier_config,
    infer_body,
    refusing_port,
    running_gateway,
    wait_for,
)

PROBES: dict[str, Any] = {
    "path_suffix": "/infer",
    "input": {"length": "inputs[0].data", "missing": "inputs[0].data",
              "features": {"sepal_length": "inputs[0].data[*][0]"}},
    "output": {"prediction": "outputs[0].data", "score": "outputs[1].data"},
}


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float | None:
    for got, v in found.get(name, []):
        if all(got.get(k) == want for k, want in labels.items()):
            return v
    return None


def test_add_many_feeds_windows_and_totals() -> None:
    now = [100.0]
    stats = BackendStats("r", "b", clock=lambda: now[0])
    stats.add_many([("output_total", 1), ("output_null", 1)])
    stats.add("output_total")
    now[0] += 1
    stats.add_many([("output_total", 2.0)])
    assert stats.window(2).counters == {"output_total": 4, "output_null": 1}
    assert stats.window(1).counters == {"output_total": 2}
    assert stats.counter_totals == {"output_total": 4, "output_null": 1}
    stats.upstream_time(0.003)
    assert sum(stats.upstream_hist_totals) == 1 and stats.upstream_sum_total == 0.003


async def test_exposition_has_the_contract_names(blue: ModelServer, green: ModelServer) -> None:
    async with refusing_port() as down:
        await _exposition_has_the_contract_names(blue, down)


async def _exposition_has_the_contract_names(blue: ModelServer, down: str) -> None:
    config = classifier_config(
        blue.url, down, probes=PROBES,
        override_header="x-modelgate-backend",
        alarms=[{"name": "slow", "route": "classifier", "metric": "p99_ms",
                 "threshold": 1000, "window": "10s"}],
    )
    async with running_gateway(config, components=[Monitoring]) as gw:
        for rows in ([[5.1, None, 1.4, 0.2]], [[6.0, 3.0, 4.5, 1.5], [None, 3.0, 5.0, 2.0]]):
            r = await gw.client.post(INFER, json=infer_body(rows))
            assert r.status_code == 200
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                 headers={"x-modelgate-backend": "green"})
        assert r.status_code == 502  # green's port is closed: refused
        async with httpx.AsyncClient() as c:
            await c.post(f"{blue.url}/faults", json={"null_rate": 1})
        await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
        await gw.admin.put("/admin/routes/classifier/canary",
                           json={"backend": "green", "weight": 12.5})
        mon: Monitoring = gw.gateway.component("monitoring")
        await wait_for(lambda: mon.loop_lag_max >= 0 and len(mon._lag_recent) > 0,
                       message="a loop-lag sample")

        r = await gw.admin.get("/metrics")
        assert r.status_code == 200
        found = samples(r.text)
        b = {"route": "classifier", "backend": "blue"}
        assert value(found, "modelgate_requests_total", **b, status_class="2xx") == 3
        assert value(found, "modelgate_requests_total", route="classifier", backend="green",
                     status_class="5xx") == 1
        assert value(found, "modelgate_request_duration_seconds_count", **b) == 3
        assert value(found, "modelgate_request_duration_seconds_bucket", **b, le="+Inf") == 3
        assert value(found, "modelgate_upstream_duration_seconds_count", **b) == 3
        assert value(found, "modelgate_upstream_errors_total", route="classifier",
                     backend="green", kind="refused") == 1
        assert value(found, "modelgate_input_missing_values_total", **b) == 2
        assert value(found, "modelgate_input_values_total", **b) == 16
        assert value(found, "modelgate_output_null_total", **b) == 1
        assert value(found, "modelgate_output_responses_total", **b) == 3
        labels = [(lab["label"], v) for lab, v in found["modelgate_output_labels_total"]
                  if lab["backend"] == "blue"]
        assert sum(v for _, v in labels) == 3  # rows of the two non-null responses
        assert value(found, "modelgate_input_length_count", **b) == 3
        assert value(found, "modelgate_input_length_sum", **b) == 4
        assert value(found, "modelgate_request_body_bytes_count", **b) == 3
        assert value(found, "modelgate_output_score_count", **b) == 3
        assert value(found, "modelgate_canary_weight", route="classifier") == 12.5
        assert value(found, "modelgate_live_backend", **b) == 1
        assert value(found, "modelgate_live_backend", route="classifier",
                     backend="green") == 0
        assert value(found, "modelgate_alarm_firing", alarm="slow", route="classifier") == 0
        assert value(found, "modelgate_event_loop_lag_seconds") is not None
        assert value(found, "modelgate_in_flight_requests", route="classifier") == 0
        assert value(found, "modelgate_process_resident_memory_bytes") is not None
        assert value(found, "modelgate_process_cpu_seconds_total") is not None
