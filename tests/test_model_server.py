"""Tests for the demo model server: the pure classifier, the HTTP APIs and the fault knobs.

Servers run in-process on real sockets (port 0) so the tests see exactly what the gateway sees.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from gateway.demo.model_server import (
    LABELS,
    Faults,
    FaultsError,
    add_arguments,
    build_app,
    predict,
    reply_tokens,
    start_model_server,
)

RANGES = [(4.0, 8.0), (2.0, 4.5), (1.0, 7.0), (0.1, 2.5)]
IRIS = [[5.1, 3.5, 1.4, 0.2], [7.0, 3.2, 4.7, 1.4], [6.3, 3.3, 6.0, 2.5]]

Server = tuple[httpx.AsyncClient, str]
StartServer = Callable[..., Awaitable[Server]]


def _sample(seed: int, n: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.uniform(lo, hi) for lo, hi in RANGES] for _ in range(n)]


def _infer_body(rows: Any, shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input-0", "shape": shape or [len(rows), 4], "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": rows}], **extra}


@pytest.fixture
async def start() -> AsyncIterator[StartServer]:
    """Factory fixture: start any number of servers, all torn down at the end."""
    runners = []
    clients = []

    async def _start(version: str = "v1", **kwargs: Any) -> Server:
        runner, port = await start_model_server(version, **kwargs)
        runners.append(runner)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5.0)
        clients.append(client)
        return client, version

    yield _start
    for client in clients:
        await client.aclose()
    for runner in runners:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------
# Pure classifier


def test_predict_classifies_textbook_iris_examples() -> None:
    for version in ("v1", "v2"):
        results = predict(version, IRIS)
        assert [label for label, _ in results] == list(LABELS)
        assert all(1 / 3 < prob <= 1.0 for _, prob in results)


def test_predict_rejects_unknown_version_and_bad_rows() -> None:
    with pytest.raises(ValueError, match="version"):
        predict("v3", IRIS)
    with pytest.raises(ValueError, match="4 features"):
        predict("v1", [[1.0, 2.0, 3.0]])


def test_v1_v2_disagree_on_a_few_percent_of_plausible_inputs() -> None:
    rows = _sample(seed=1234, n=2000)
    v1 = [label for label, _ in predict("v1", rows)]
    v2 = [label for label, _ in predict("v2", rows)]
    rate = sum(a != b for a, b in zip(v1, v2, strict=True)) / len(rows)
    assert 0.02 <= rate <= 0.08, rate
    # Every label actually occurs, so the classifier is not degenerate on this range.
    assert set(v1) == set(LABELS)


def test_faults_validation() -> None:
    faults = Faults(error_rate=0.5)
    with pytest.raises(FaultsError):
        faults.update({"error_rate": 1.5, "latency_ms": 10})
    assert faults.as_dict() == {"error_rate": 0.5, "latency_ms": 0.0, "null_rate": 0.0,
                                "ttft_ms": 0.0}
    with pytest.raises(FaultsError):
        Faults(null_rate=-0.1)


# ---------------------------------------------------------------------------------------------
# KServe V2 API


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_infer_returns_predict_results(start: StartServer, version: str) -> None:
    client, _ = await start(version)
    rows = _sample(seed=7, n=25) + IRIS
    resp = await client.post("/v2/models/classifier/infer", json=_infer_body(rows, id="req-1"))
    assert resp.status_code == 200
    assert resp.headers["X-Model-Version"] == version
    body = resp.json()
    assert body["model_name"] == "classifier"
    assert body["model_version"] == version
    assert body["id"] == "req-1"
    label_out, prob_out = body["outputs"]
    expected = predict(version, rows)
    assert label_out["name"] == "label" and label_out["datatype"] == "BYTES"
    assert label_out["shape"] == [len(rows)]
    assert label_out["data"] == [label for label, _ in expected]
    assert prob_out["name"] == "probability" and prob_out["datatype"] == "FP32"
    assert prob_out["data"] == pytest.approx([prob for _, prob in expected])


async def test_infer_accepts_flat_data_and_generates_id(start: StartServer) -> None:
    client, _ = await start()
    flat = [value for row in IRIS for value in row]
    resp = await client.post("/v2/models/classifier/infer", json=_infer_body(flat, [3, 4]))
    assert resp.status_code == 200
    body = resp.json()
    assert isinstance(body["id"], str) and body["id"]
    assert body["outputs"][0]["data"] == list(LABELS)


async def test_infer_treats_missing_values_as_zero(start: StartServer) -> None:
    client, _ = await start()
    rows = [[None, 3.5, None, 0.2], [7.0, "NaN", 4.7, 1.4]]
    resp = await client.post("/v2/models/classifier/infer", json=_infer_body(rows))
    assert resp.status_code == 200
    expected = predict("v1", [[0.0, 3.5, 0.0, 0.2], [7.0, 0.0, 4.7, 1.4]])
    assert resp.json()["outputs"][0]["data"] == [label for label, _ in expected]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b"{}",
        orjson.dumps({"inputs": []}),
        orjson.dumps(_infer_body(IRIS, [3, 3])),  # shape does not have 4 features
        orjson.dumps(_infer_body(IRIS, [2, 4])),  # more rows than shape says
        orjson.dumps(_infer_body([1.0, 2.0, 3.0], [1, 4])),  # flat data too short
        orjson.dumps(_infer_body([[1.0, 2.0, 3.0]], [1, 4])),  # row too short
        orjson.dumps(_infer_body([[1.0, "x", 3.0, 4.0]])),  # non-numeric value
        orjson.dumps(_infer_body([[1.0, True, 3.0, 4.0]])),  # bool is not a feature
        orjson.dumps({**_infer_body(IRIS), "id": 5}),
    ],
)
async def test_infer_bad_body_is_400(start: StartServer, content: bytes) -> None:
    client, _ = await start()
    resp = await client.post("/v2/models/classifier/infer", content=content)
    assert resp.status_code == 400
    assert isinstance(resp.json()["error"], str)
    assert resp.headers["X-Model-Version"] == "v1"


async def test_unknown_model_and_route_are_json_404(start: StartServer) -> None:
    client, _ = await start("v2")
    resp = await client.post("/v2/models/nope/infer", json=_infer_body(IRIS))
    assert resp.status_code == 404
    assert "nope" in resp.json()["error"]
    resp = await client.get("/definitely/not/here")
    assert resp.status_code == 404
    assert "error" in resp.json()
    assert resp.headers["X-Model-Version"] == "v2"


async def test_health_and_metadata(start: StartServer) -> None:
    client, _ = await start("v2", model_name="iris")
    live = await client.get("/v2/health/live")
    ready = await client.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert live.headers["X-Model-Version"] == "v2"
    meta = (await client.get("/v2/models/iris")).json()
    assert meta["name"] == "iris"
    assert meta["versions"] == ["v2"]
    assert meta["platform"] == "modelgate-demo"
    assert meta["inputs"][0]["shape"] == [-1, 4]
    assert [out["name"] for out in meta["outputs"]] == ["label", "probability"]
    model_ready = await client.get("/v2/models/iris/ready")
    assert model_ready.status_code == 200 and model_ready.json()["ready"] is True
    assert (await client.get("/v2/models/classifier/ready")).status_code == 404


# ---------------------------------------------------------------------------------------------
# Faults


async def test_error_rate_one_fails_infer_and_chat_but_not_health(start: StartServer) -> None:
    client, _ = await start()
    resp = await client.post("/faults", json={"error_rate": 1})
    assert resp.status_code == 200 and resp.json()["error_rate"] == 1.0
    infer = await client.post("/v2/models/classifier/infer", json=_infer_body(IRIS))
    assert infer.status_code == 500
    assert infer.json() == {"error": "injected fault"}
    assert infer.headers["X-Model-Version"] == "v1"
    chat = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 500
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/faults")).json()["error_rate"] == 1.0


async def test_null_rate_one_returns_null_outputs(start: StartServer) -> None:
    client, _ = await start()
    assert (await client.post("/faults", json={"null_rate": 1.0})).status_code == 200
    resp = await client.post("/v2/models/classifier/infer", json=_infer_body(IRIS))
    assert resp.status_code == 200
    outputs = resp.json()["outputs"]
    assert [out["data"] for out in outputs] == [None, None]
    assert [out["shape"] for out in outputs] == [[3], [3]]


async def test_latency_fault_delays_infer(start: StartServer) -> None:
    client, _ = await start()
    assert (await client.post("/faults", json={"latency_ms": 150})).status_code == 200
    began = time.perf_counter()
    resp = await client.post("/v2/models/classifier/infer", json=_infer_body(IRIS))
    elapsed = time.perf_counter() - began
    assert resp.status_code == 200
    assert elapsed >= 0.15


async def test_faults_from_start_arguments(start: StartServer) -> None:
    client, _ = await start(error_rate=1.0, latency_ms=5, null_rate=0.25)
    faults = (await client.get("/faults")).json()
    assert faults == {"error_rate": 1.0, "latency_ms": 5.0, "null_rate": 0.25, "ttft_ms": 0.0}
    infer = await client.post("/v2/models/classifier/infer", json=_infer_body(IRIS))
    assert infer.status_code == 500


@pytest.mark.parametrize(
    "content",
    [
        orjson.dumps({"error_rate": 1.5}),
        orjson.dumps({"error_rate": -0.1}),
        orjson.dumps({"null_rate": "0.5"}),
        orjson.dumps({"null_rate": True}),
        orjson.dumps({"latency_ms": -1}),
        orjson.dumps({"latency_ms": None}),
        orjson.dumps({"error_rate": 0.5, "bogus": 1}),  # valid key must not apply either
        orjson.dumps({"error_rate": 0.5, "latency_ms": -5}),
        orjson.dumps([0.5]),
        b"{nope",
    ],
)
async def test_invalid_fault_bodies_are_400_and_change_nothing(
    start: StartServer, content: bytes
) -> None:
    client, _ = await start(null_rate=0.1)
    before = (await client.get("/faults")).json()
    resp = await client.post("/faults", content=content)
    assert resp.status_code == 400
    assert isinstance(resp.json()["error"], str)
    assert (await client.get("/faults")).json() == before


async def test_fault_draws_are_repeatable_per_seed(start: StartServer) -> None:
    async def pattern(client: httpx.AsyncClient) -> list[int]:
        body = _infer_body(IRIS)
        return [
            (await client.post("/v2/models/classifier/infer", json=body)).status_code
            for _ in range(30)
        ]

    first, _ = await start(error_rate=0.5, seed=99)
    second, _ = await start(error_rate=0.5, seed=99)
    statuses = await pattern(first)
    assert statuses == await pattern(second)
    assert set(statuses) == {200, 500}


def test_build_app_rejects_unknown_version() -> None:
    with pytest.raises(ValueError):
        build_app("v9")


# ---------------------------------------------------------------------------------------------
# Chat completions / SSE


async def test_chat_completion_is_deterministic_and_version_specific(start: StartServer) -> None:
    body = {
        "model": "demo",
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "hello there friend"},
        ],
    }
    contents = {}
    for version in ("v1", "v2"):
        client, _ = await start(version)
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200
        assert resp.headers["X-Model-Version"] == version
        data = resp.json()
        assert data["object"] == "chat.completion"
        assert data["model"] == "demo" and data["model_version"] == version
        message = data["choices"][0]["message"]
        assert message["role"] == "assistant"
        assert message["content"] == "".join(reply_tokens(version, "hello there friend"))
        again = await client.post("/v1/chat/completions", json=body)
        assert again.json()["choices"][0]["message"]["content"] == message["content"]
        contents[version] = message["content"]
    assert contents["v1"] != contents["v2"]
    assert "hello there friend" in contents["v1"]


async def test_chat_stream_delivers_chunks_incrementally(start: StartServer) -> None:
    client, _ = await start("v2")
    text = "hello there friend"
    tokens = reply_tokens("v2", text)
    assert len(tokens) == 5
    body = {
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "stream_delay_ms": 100,
    }
    arrivals: list[tuple[float, str]] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["X-Model-Version"] == "v2"
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                arrivals.append((time.perf_counter(), line.removeprefix("data: ")))
    ended = time.perf_counter()

    assert arrivals[-1][1] == "[DONE]"
    chunks = [orjson.loads(payload) for _, payload in arrivals[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model_version"] == "v2" for c in chunks)
    *chunks, closing = chunks  # the last event carries OpenAI-style usage, no choices
    content = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert content[:-1] == tokens
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert closing["choices"] == []
    assert closing["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert ended - arrivals[0][0] >= 0.2  # First token arrived long before the end.


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "system", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        {"messages": [{"role": "user", "content": "x"}], "stream_delay_ms": -1},
    ],
)
async def test_chat_bad_body_is_400(start: StartServer, body: dict[str, Any]) -> None:
    client, _ = await start()
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    assert "error" in resp.json()


# ---------------------------------------------------------------------------------------------
# CLI entry points


def test_add_arguments_defaults_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.version, args.host, args.port, args.model_name) == (
        "v1",
        "127.0.0.1",
        9001,
        "classifier",
    )
    assert (args.error_rate, args.latency_ms, args.null_rate, args.seed) == (0.0, 0.0, 0.0, None)
    args = parser.parse_args(["--version", "v2", "--error-rate", "0.2", "--seed", "3"])
    assert (args.version, args.error_rate, args.seed) == ("v2", 0.2, 3)
    for bad in (["--error-rate", "2"], ["--null-rate", "x"], ["--version", "v3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


async def test_run_serves_until_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from gateway.demo.model_server import add_arguments, run\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(run(p.parse_args(['--port', '0', '--version', 'v2'])))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert line.startswith("model server v2 listening on http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=line.rsplit(" ", 1)[1]) as client:
            resp = await client.get("/v2/health/live")
            assert resp.headers["X-Model-Version"] == "v2"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        # Drain so the pipe transports close cleanly (unclosed-transport warnings are errors).
        await proc.communicate()
