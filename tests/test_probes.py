"""Input/output probes: pure counting, config errors, and counts through a real gateway."""

from __future__ import annotations

import math
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import parse_config
from gateway.demo.model_server import predict
from gateway.errors import ConfigError
from gateway.jsonpath import MISSING, compile_path
from gateway.metrics import Recorder
from gateway.monitoring.component import Monitoring
from gateway.monitoring.probes import (
    PathSet,
    RouteProbes,
    count_missing,
    decile_edges,
    is_missing,
    is_null_prediction,
)
from gateway.routing import Exchange
from tests.helpers import (
    INFER,
    ModelServer,
    classifier_config,
    infer_body,
    running_gateway,
    wait_for,
)

PROBES: dict[str, Any] = {
    "path_suffix": "/infer",
    "input": {
        "length": "inputs[0].data",
        "missing": "inputs[0].data",
        "required": ["inputs", "inputs[0].data"],
        "features": {"sepal_length": {"path": "inputs[0].data[*][0]", "edges": [5, 6, 7]}},
    },
    "output": {
        "prediction": "outputs[0].data",
        "score": "outputs[1].data",
        "labels": ["setosa", "versicolor", "virginica"],
        "error_body": "error",
    },
}


def _route(probes: dict[str, Any] = PROBES, **extra: Any) -> Any:
    config = parse_config(classifier_config("http://127.0.0.1:1", "http://127.0.0.1:2",
                                            probes=probes, **extra))
    return config.routes[0]


def _exchange(request: Any, response: Any, status: int = 200, backend: str = "blue",
              target: str = INFER) -> Exchange:
    ex = Exchange()
    ex.route, ex.backend, ex.method, ex.target, ex.status = (
        "classifier", backend, "POST", target, status)
    ex.request_body = request if isinstance(request, bytes | None) else orjson.dumps(request)
    ex.response_body = (response if isinstance(response, bytes | None)
                        else orjson.dumps(response))
    return ex


def _v2_response(labels: Any, probs: Any) -> dict[str, Any]:
    return {"outputs": [{"name": "label", "data": labels}, {"name": "probability",
                                                            "data": probs}]}


# -- pure pieces -------------------------------------------------------------------------------
def test_missing_and_null_predicates() -> None:
    assert is_missing(None) and is_missing(MISSING) and is_missing(math.nan)
    assert is_missing("NaN") and is_missing("nan")
    assert not is_missing(0) and not is_missing(0.0) and not is_missing("x")
    assert count_missing([[1, None, 3], [math.nan, 2, "NaN"]]) == (6, 3)
    assert count_missing(None) == (1, 1)
    assert count_missing([]) == (0, 0)
    assert is_null_prediction(None) and is_null_prediction(MISSING)
    assert is_null_prediction([]) and is_null_prediction("") and is_null_prediction(["a", None])
    assert not is_null_prediction(["a", "b"]) and not is_null_prediction(0)


def test_decile_edges() -> None:
    assert decile_edges([float(i) for i in range(100)]) == tuple(float(i) for i in
                                                                 range(10, 100, 10))
    assert decile_edges([3.0] * 50) == (3.0,)


def test_route_probes_count_exactly() -> None:
    recorder = Recorder()
    probes = RouteProbes(_route(), _route().probes, recorder)
    assert probes.needs_request_body and probes.needs_response_body
    rows: list[list[Any]] = [[5.1, None, 1.4, 0.2], [6.5, 3.0, "NaN", 2.0],
                             [7.5, 3.0, 6.0, 2.0]]
    probes(_exchange(infer_body(rows), _v2_response(["setosa", "virginica", "virginica"],
                                        [0.9, 0.55, 0.97])))
    probes(_exchange(b"not json", {"error": "bad"}, status=400))
    probes(_exchange({"nothing": 1}, _v2_response(None, None)))
    probes(_exchange(infer_body([[5.0, 3.0, 1.0, 0.1]]), {"error": "oops"}))
    probes(_exchange(infer_body([[5.0, 3.0, 1.0, 0.1]]), _v2_response(["mystery"], [0.5]),
                     backend="green"))
    probes(_exchange(infer_body([[5.0, 3.0, 1.0, 0.1]]), _v2_response(["x"], [0.5]),
                     target="/v2/models/classifier"))  # not the probed suffix: ignored
    blue = recorder.stats("classifier", "blue").counter_totals
    assert blue["input_total"] == 4
    assert blue["input_values"] == 12 + 1 + 4  # an absent path counts as one missing value
    assert blue["input_missing"] == 2 + 1
    assert blue["input_schema_errors"] == 2  # not JSON; no `inputs`
    assert blue["output_responses"] == 4
    assert blue["output_error"] == 2  # the 400 and the 200 with an error field
    assert blue["output_total"] == 2
    assert blue["output_null"] == 1
    assert blue["label:setosa"] == 1 and blue["label:virginica"] == 2
    assert sum(v for k, v in blue.items() if k.startswith("score_bucket:")) == 3
    # buckets are Prometheus-style (le): 0.55 in (0.5, 0.6], 0.9 in (0.8, 0.9], 0.97 above
    assert (blue["score_bucket:5"], blue["score_bucket:8"], blue["score_bucket:9"]) == (1, 1, 1)
    # edges [5, 6, 7]: 5.0 in (-inf, 5], 5.1 in (5, 6], 6.5 in (6, 7], 7.5 above
    assert [blue[f"feature:sepal_length:{i}"] for i in range(4)] == [1, 1, 1, 1]
    assert blue["input_length_sum"] == 3 + 1
    green = recorder.stats("classifier", "green").counter_totals
    assert green["label:__other__"] == 1  # not a configured label
    assert "label:mystery" not in green


def test_sampling_and_open_labels_are_bounded() -> None:
    recorder = Recorder()
    route = _route({"sample": 0.0, "output": {"prediction": "p"}})
    probes = RouteProbes(route, route.probes, recorder)
    for _ in range(50):
        probes(_exchange({}, {"p": "a"}))
    assert recorder.stats("classifier", "blue").counter_totals == {}

    route = _route({"output": {"prediction": "p", "max_labels": 2}})
    probes = RouteProbes(route, route.probes, recorder)
    for label in ["a", "b", "c", "d", "a", 7]:
        probes(_exchange({}, {"p": label}))
    totals = recorder.stats("classifier", "blue").counter_totals
    assert totals["label:a"] == 2 and totals["label:b"] == 1
    assert totals["label:__other__"] == 3


def test_learned_feature_edges() -> None:
    recorder = Recorder()
    route = _route({"input": {"features": {"x": {"path": "x[*]", "learn": 20}}}})
    probes = RouteProbes(route, route.probes, recorder)
    probes(_exchange({"x": list(range(20))}, None))
    assert not any(k.startswith("feature:") for k in
                   recorder.stats("classifier", "blue").counter_totals)
    probes(_exchange({"x": [0, 100]}, None))
    totals = recorder.stats("classifier", "blue").counter_totals
    assert sum(v for k, v in totals.items() if k.startswith("feature:x:")) == 2


@pytest.mark.parametrize(("probes", "where"), [
    ({"sample": 2}, "routes[0].probes.sample"),
    ({"input": {"missing": "inputs[0"}}, "routes[0].probes.input.missing"),
    ({"input": {"missing": ["ok", "[bad"]}}, "routes[0].probes.input.missing[1]"),
    ({"output": {"prediction": "p", "score_edges": [0.5, 0.2]}},
     "routes[0].probes.output.score_edges[1]"),
    ({"output": {}}, "routes[0].probes.output"),
    ({"output": {"prediction": "p", "typo": 1}}, "routes[0].probes.output.typo"),
    ({"input": {"features": {"f": {"path": "x", "range": [3, 1]}}}},
     "routes[0].probes.input.features.f.range"),
    ({}, "routes[0].probes"),
    ({"input": {}, "drift": {"window": "1h"}}, "routes[0].probes.drift.window"),
])
def test_probe_config_errors_name_the_key(probes: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        _route(probes)
    assert info.value.path == where


# -- end to end --------------------------------------------------------------------------------
async def test_probe_counts_through_the_gateway(blue: ModelServer, green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, probes=PROBES,
                               override_header="x-modelgate-backend")
    async with running_gateway(config, components=[Monitoring]) as gw:
        batches = [
            [[5.1, 3.5, 1.4, 0.2], [6.7, None, 5.2, 2.3]],
            [[None, None, 4.5, 1.5]],
            [[5.9, 3.0, 4.2, 1.5], [6.3, 2.9, 5.6, 1.8], [4.9, 3.1, None, 0.1]],
        ] * 4
        sent_missing = sum(v is None for rows in batches for row in rows for v in row)
        expected_labels: dict[str, int] = {}
        for rows in batches:
            clean = [[0.0 if v is None else v for v in row] for row in rows]
            for label, _ in predict("v1", clean):
                expected_labels[label] = expected_labels.get(label, 0) + 1
            r = await gw.client.post(INFER, json=infer_body(rows))
            assert r.status_code == 200
        r = await gw.client.post(INFER, content=b"{not json",
                                 headers={"content-type": "application/json"})
        assert r.status_code == 400
        await gw.client.get("/v2/models/classifier")  # metadata: not probed

        # null outputs on green only
        async with httpx.AsyncClient() as c:
            await c.post(f"{green.url}/faults", json={"null_rate": 1})
        for _ in range(5):
            r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                     headers={"x-modelgate-backend": "green"})
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] is None

        blue_totals = gw.gateway.recorder.stats("classifier", "blue").counter_totals
        await wait_for(lambda: blue_totals.get("input_total") == len(batches) + 1)
        assert blue_totals["input_missing"] == sent_missing
        assert blue_totals["input_values"] == sum(len(r) * 4 for r in batches)
        assert blue_totals["input_schema_errors"] == 1
        assert blue_totals["output_total"] == len(batches)
        assert blue_totals.get("output_null", 0) == 0
        assert blue_totals["output_error"] == 1
        assert {k[6:]: v for k, v in blue_totals.items() if k.startswith("label:")} == \
            expected_labels
        green_totals = gw.gateway.recorder.stats("classifier", "green").counter_totals
        assert green_totals["output_total"] == 5 and green_totals["output_null"] == 5

        r = await gw.admin.get("/admin/routes/classifier/probes", params={"window": "1m"})
        summary = r.json()["backends"]
        assert summary["green"]["null_rate"] == 1.0
        assert summary["blue"]["null_rate"] == 0.0
        assert summary["blue"]["missing_rate"] == pytest.approx(
            sent_missing / blue_totals["input_values"], abs=1e-6)
        route = (await gw.admin.get("/admin/routes/classifier")).json()
        assert route["monitoring"]["probes"]["features"] == ["sepal_length"]


async def test_routes_without_probes_have_no_tap(blue: ModelServer, green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, probes={"output": {"prediction": "p"}})
    config["routes"].append({"name": "plain", "match": {"path_prefix": "/plain"},
                             "backends": {"blue": {"url": blue.url}}, "live": "blue"})
    async with running_gateway(config, components=[Monitoring]) as gw:
        table = gw.gateway.table.by_name
        assert table["plain"].taps == ()
        assert not table["plain"].needs_request_body and not table["plain"].needs_response_body
        assert len(table["classifier"].taps) == 1
        assert table["classifier"].needs_response_body
        assert not table["classifier"].needs_request_body  # no input probes: no buffering
        # the tap is built once and survives routing-state changes
        tap = table["classifier"].taps[0]
        await gw.admin.post("/admin/routes/classifier/switch", json={"to": "green"})
        assert gw.gateway.table.by_name["classifier"].taps[0] is tap
        r = await gw.admin.get("/admin/routes/plain/drift")
        assert r.status_code == 200 and r.json()["probes"] is False


def test_path_set_matches_single_paths() -> None:
    texts = ["inputs", "inputs[0].data", "inputs[0].data[*][0]", "inputs[0].data[*][2]",
             "inputs[-1].name", "inputs[0]", "outputs[1].data", "inputs[*].name", "a.b.c",
             "$"]
    paths = [compile_path(t) for t in texts]
    pset = PathSet(paths)
    docs: list[Any] = [
        infer_body([[1, 2, 3, 4], [5, 6, None, 8]]),
        {"inputs": []},
        {"inputs": [{"data": "text"}]},
        {"inputs": {"0": 1}},
        {"a": {"b": {"c": [1]}}, "inputs": [{"name": "x"}, {"name": "y"}]},
        [1, 2],
        None,
    ]
    for doc in docs:
        assert pset.resolve(doc) == [p.get(doc) for p in paths], doc
