"""Record and replay end to end: real gateways (both proxy servers), real demo model servers.

Done when: record requests on the demo, replay them against green, and the report equals
what calling blue and green directly on those requests gives."""

from __future__ import annotations

import asyncio
import gzip
import random
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.cli import main
from gateway.record.component import RecordTap
from gateway.record.format import REDACTED, Captured, read_recording
from gateway.record.replay import replay
from gateway.routing import Exchange, in_sample, threshold
from gateway.shadow.compare import Comparator, judge
from gateway.shadow.config import CompareConfig
from gateway.shadow.stats import Tally
from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    running_gateway,
    wait_for,
)
from tests.test_record_admin import RECORDINGS, ended

RANGES = [(4.0, 8.0), (2.0, 4.5), (1.0, 7.0), (0.1, 2.5)]


def batches(seed: int, n: int) -> list[list[list[float]]]:
    """`n` request bodies of 1 to 5 rows of realistic iris features."""
    rng = random.Random(seed)
    return [[[round(rng.uniform(lo, hi), 3) for lo, hi in RANGES]
             for _ in range(rng.randint(1, 5))] for _ in range(n)]


async def send_all(gw: RunningGateway, bodies: list[list[list[float]]]) -> None:
    for start in range(0, len(bodies), 20):
        responses = await asyncio.gather(*(
            gw.client.post(INFER, json=infer_body(rows),
                           headers={"x-user-id": f"u{start + i}", "Authorization": "Bearer s3"})
            for i, rows in enumerate(bodies[start:start + 20])))
        assert [r.status_code for r in responses] == [200] * len(responses)


async def direct(captured: list[Captured], blue: str, green: str,
                 comparator: Comparator) -> Tally:
    """What calling blue and green directly on the recorded requests gives."""
    tally = Tally()
    json = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=30) as client:
        for start in range(0, len(captured), 20):
            chunk = captured[start:start + 20]
            answers = await asyncio.gather(*(
                client.request(ex.method, url + ex.target, content=ex.request_body,
                               headers=json)
                for ex in chunk for url in (blue, green)))
            for a, b in zip(answers[::2], answers[1::2], strict=True):
                outcome, comparison, _, _ = await judge(
                    comparator, a.status_code, a.content, a.headers.get("content-type"),
                    b.status_code, b.content, b.headers.get("content-type"), None)
                tally.add(outcome, 0.001, 0.001, comparison)
    return tally


def without_latency(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures that must be equal: all but latency (and the mean delta only up to the
    order of summation, which concurrent replies change)."""
    out = {k: v for k, v in summary.items() if k not in ("latency", "since")}
    numbers = dict(out["numbers"])
    numbers["mean_delta"] = pytest.approx(numbers["mean_delta"], rel=1e-12)
    out["numbers"] = numbers
    return out


@pytest.mark.parametrize(("server", "n"), [("fast", 200), ("aiohttp", 60)])
async def test_replay_against_green_equals_calling_blue_and_green_directly(
        blue: ModelServer, green: ModelServer, server: str, n: int, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bodies = batches(seed=11, n=n + 20)
    async with running_gateway(classifier_config(blue.url, green.url),
                               server_kind=server) as gw:
        r = await gw.admin.post(RECORDINGS, json={
            "duration_s": "2m", "max_requests": n, "redact_headers": ["X-User-Id"],
            "redact_json_fields": ["model_name"]})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert gw.gateway.table.by_name["classifier"].taps  # the route has the tap now
        await send_all(gw, bodies)  # 20 more than max_requests: the recording stops at n
        view = await ended(gw, rid)
        assert (view["captured"], view["dropped"], view["stop_reason"]) == (n, 0,
                                                                           "max_requests")
        assert gw.gateway.table.by_name["classifier"].taps == ()  # and pays nothing again
        r = await gw.admin.get(f"/admin/recordings/{rid}/download")
        assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
        path = tmp_path / "rec.jsonl.gz"
        path.write_bytes(r.content)
        assert len(r.content) == view["compressed_bytes"]
        metrics = (await gw.admin.get("/metrics")).text
        assert f'modelgate_recording_exchanges_total{{result="captured",route="classifier"}} ' \
               f'{float(n)}' in metrics

        if server == "fast":  # the CLI resolves "green" through this admin API
            code = await asyncio.to_thread(main, [
                "replay", str(path), "--backend", "green", "--concurrency", "4", "--json",
                "--admin", gw.admin_url, "--token", TOKEN])
            assert code == 0
            cli_report = orjson.loads(capsys.readouterr().out)

    captured = list(read_recording(path))
    assert len(captured) == n
    first = orjson.loads(gzip.decompress(path.read_bytes()).splitlines()[0])
    headers = dict((k.lower(), v) for k, v in first["request_headers"])
    assert headers["authorization"] == REDACTED and headers["x-user-id"] == REDACTED
    assert orjson.loads(first["response_body"])["model_name"] == REDACTED
    assert {c.backend for c in captured} == {"blue"} and {c.status for c in captured} == {200}
    assert all(c.latency_ms > 0 for c in captured)

    comparator = Comparator(CompareConfig())
    if server == "fast":  # the command's report (it compared as the route says: auto)
        report = cli_report["total"]
        assert cli_report["backend"] == "green" and cli_report["replay"]["requests"] == n
    else:
        report = (await replay(captured, green.url, comparator, concurrency=8)).summary()
    wanted = (await direct(captured, blue.url, green.url, comparator)).summary()
    assert report["compared"] == n and 0 < report["agree"] < n  # v1 and v2 really differ
    assert report["labels"]["compared"] > n  # batches: one label pair per row
    assert without_latency(report) == without_latency(wanted)
    assert report["latency"]["live"]["count"] == report["latency"]["shadow"]["count"] == n


async def test_record_and_replay_commands(blue: ModelServer, green: ModelServer, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.jsonl.gz"
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        args = ["record", "classifier", "--duration", "30s", "--max-requests", "30",
                "--sample", "100", "--redact-field", "id", "-o", str(out), "--poll", "0.05",
                "--admin", gw.admin_url, "--token", TOKEN]
        command = asyncio.create_task(asyncio.to_thread(main, args))

        async def running() -> bool:
            found = (await gw.admin.get("/admin/recordings")).json()["recordings"]
            return bool(found) and found[0]["state"] == "recording"

        await wait_for(running, message="the record command to start a recording")
        await send_all(gw, batches(seed=5, n=40))
        assert await asyncio.wait_for(command, 20) == 0
        # Downloaded, so discarded on the gateway (it holds real traffic): no --keep.
        assert (await gw.admin.get("/admin/recordings")).json() == {"recordings": []}
    printed = capsys.readouterr()
    assert "recording" in printed.err and "captured" in printed.err
    assert f"30 exchanges (0 dropped, ended by max_requests) written to {out}" in printed.out
    assert len(list(read_recording(out))) == 30

    # Offline: a URL needs no admin API; the text report is shadow mode's table.
    assert await asyncio.to_thread(main, ["replay", str(out), "--url", green.url,
                                          "--rate", "500"]) == 0
    printed = capsys.readouterr()
    assert "replayed 30/30" in printed.err
    text = printed.out
    assert f"replay report: classifier -> {green.url}" in text
    assert "pairs compared" in text and "candidate latency p99" in text
    assert "confusion counts (replayed): rows live, columns candidate" in text
    assert "30 requests replayed" in text

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"version": 1}\n')
    assert await asyncio.to_thread(main, ["replay", str(bad), "--url", green.url]) == 1
    assert "line 1: missing key" in capsys.readouterr().err


async def test_ctrl_c_stops_the_recording_and_still_downloads(
        blue: ModelServer, green: ModelServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "early.jsonl.gz"
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        await send_all(gw, batches(seed=1, n=1))  # warm: the connection pool is up
        loop = asyncio.get_running_loop()
        pauses = 0

        def pause(seconds: float) -> None:  # the operator presses Ctrl-C at the 1st update
            nonlocal pauses
            pauses += 1
            asyncio.run_coroutine_threadsafe(send_all(gw, batches(seed=2, n=4)),
                                             loop).result(10)
            raise KeyboardInterrupt

        monkeypatch.setattr("gateway.cli.record._pause", pause)
        code = await asyncio.to_thread(main, [
            "record", "classifier", "--duration", "10m", "-o", str(out), "--keep",
            "--admin", gw.admin_url, "--token", TOKEN])
        assert code == 0 and pauses == 1
        listed = (await gw.admin.get("/admin/recordings")).json()["recordings"]
        assert [(v["state"], v["stop_reason"]) for v in listed] == [("done", "stopped")]
    assert "stopping" in capsys.readouterr().err
    assert len(list(read_recording(out))) == 4


async def test_only_sampled_streams_are_captured_and_their_content_redacted(
        blue: ModelServer, green: ModelServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review findings 5 and 3 over real sockets: at a 30 % recording the sample is decided
    when the request is planned, so the other streamed answers are never copied; the
    recorded streams have `content` redacted in every SSE data line."""
    seen: list[tuple[str | None, bool | None, bool]] = []
    real_call = RecordTap.__call__

    def spy(self: RecordTap, exchange: Exchange) -> None:
        seen.append((exchange.sticky_key, exchange.sampled, exchange.response_body is not None))
        real_call(self, exchange)

    monkeypatch.setattr(RecordTap, "__call__", spy)
    config = classifier_config(blue.url, green.url, name="chat",
                               match={"path_prefix": "/v1/chat"})
    users = [f"u{i}" for i in range(24)]
    async with running_gateway(config) as gw:
        r = await gw.admin.post("/admin/routes/chat/recordings", json={
            "duration_s": 60, "sample_percent": 30, "redact_json_fields": ["content"]})
        rid = r.json()["id"]
        for user in users:
            r = await gw.client.post("/v1/chat/completions", headers={"x-user-id": user},
                                     json={"model": "demo", "stream": True,
                                           "stream_delay_ms": 0, "messages": [
                                               {"role": "user", "content": "secret words"}]})
            assert r.status_code == 200 and b"data: [DONE]" in r.content
        await wait_for(lambda: len(seen) == len(users), message="every exchange tapped")
        view = (await gw.admin.delete(f"/admin/recordings/{rid}")).json()
        data = gzip.decompress((await gw.admin.get(f"/admin/recordings/{rid}/download")).content)
    want = {u for u in users if in_sample(threshold(30), b"chat#record", u)}
    assert 0 < len(want) < len(users)
    assert {key for key, sampled, _ in seen if sampled} == want
    assert all(sampled is not None and copied == sampled for _, sampled, copied in seen)
    lines = [orjson.loads(raw) for raw in data.splitlines()]
    assert view["captured"] == len(lines) == len(want)
    assert {dict(map(tuple, doc["request_headers"]))["x-user-id"] for doc in lines} == want
    for doc in lines:
        assert "data: " in doc["response_body"] and "secret" not in doc["request_body"]
        assert '"content":"[REDACTED]"' in doc["response_body"]
