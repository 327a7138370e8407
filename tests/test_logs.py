"""Structured logs: JSON lines with the request fields, never bodies or secrets."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.logs import REDACTED, setup_logging
from gateway.monitoring.component import Monitoring
from tests.helpers import INFER, ModelServer, classifier_config, infer_body, running_gateway

SENTINEL = "SENTINEL-payload-7731"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """setup_logging() into a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_with_extras_and_nothing_secret(log_stream: io.StringIO) -> None:
    setup_logging("info", "json", stream=log_stream)
    log = logging.getLogger("modelgate.test")
    log.debug("not at info")
    log.info("switched %s", "classifier", extra={
        "event": "switch", "route": "classifier", "backend": "green", "status": 200,
        "latency_ms": 1.5, "request_id": "abc", "body": SENTINEL, "request_body": SENTINEL,
        "headers": {"authorization": SENTINEL}, "token": SENTINEL, "api_key": SENTINEL,
    })
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"event": "oops"})
    out = lines(log_stream)
    assert len(out) == 2
    first = out[0]
    assert first["message"] == "switched classifier" and first["level"] == "info"
    assert first["logger"] == "modelgate.test" and first["time"].endswith("Z")
    assert {k: first[k] for k in ("event", "route", "backend", "status", "latency_ms",
                                  "request_id")} == {
        "event": "switch", "route": "classifier", "backend": "green", "status": 200,
        "latency_ms": 1.5, "request_id": "abc"}
    assert "body" not in first and "request_body" not in first and "headers" not in first
    assert first["token"] == REDACTED and first["api_key"] == REDACTED
    assert SENTINEL not in log_stream.getvalue()
    assert "ValueError: boom" in out[1]["exception"] and out[1]["level"] == "error"


def test_text_format_and_bad_arguments(log_stream: io.StringIO) -> None:
    setup_logging("warning", "text", stream=log_stream)
    setup_logging("warning", "text", stream=log_stream)  # idempotent: one handler
    logging.getLogger("modelgate").warning("careful", extra={"route": "r", "secret": "s3"})
    text = log_stream.getvalue()
    assert text.count("careful") == 1
    assert "warning modelgate: careful route=r secret=[redacted]" in text
    with pytest.raises(ValueError):
        setup_logging("loud")
    with pytest.raises(ValueError):
        setup_logging("info", "xml")


async def test_access_log_is_json_and_has_no_body(
    log_stream: io.StringIO, blue: ModelServer, green: ModelServer
) -> None:
    setup_logging("info", "json", stream=log_stream)
    probes = {"output": {"prediction": "outputs[0].data"}}
    config = classifier_config(blue.url, green.url, probes=probes, access_log_sample=1.0)
    async with running_gateway(config, components=[Monitoring]) as gw:
        body = {**infer_body([[5.1, 3.5, 1.4, 0.2]]), "id": SENTINEL}
        r = await gw.client.post(INFER, json=body, headers={"x-request-id": "req-1",
                                                            "authorization": SENTINEL})
        assert r.status_code == 200 and SENTINEL in r.text  # the model echoes the id
    access = [e for e in lines(log_stream) if e["logger"] == "modelgate.access"]
    assert len(access) == 1
    entry = access[0]
    assert entry["request_id"] == "req-1" and entry["route"] == "classifier"
    assert entry["backend"] == "blue" and entry["status"] == 200
    assert entry["latency_ms"] > 0
    assert SENTINEL not in log_stream.getvalue()


async def test_access_log_is_off_by_default(
    log_stream: io.StringIO, blue: ModelServer, green: ModelServer
) -> None:
    setup_logging("info", "json", stream=log_stream)
    async with running_gateway(classifier_config(blue.url, green.url),
                               components=[Monitoring]) as gw:
        assert gw.gateway.proxy.access_log_sample == 0
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
        assert r.status_code == 200
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"{gw.admin_url}/healthz")).status_code == 200
    assert not [e for e in lines(log_stream) if e["logger"] == "modelgate.access"]
    assert any(e.get("event") == "ready" for e in lines(log_stream))
