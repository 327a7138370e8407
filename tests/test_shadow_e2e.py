"""Shadow mode end to end: real gateway, real model servers, real loopback sockets."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.demo.model_server import predict
from gateway.routing import bucket_of
from gateway.shadow.compare import similarity
from gateway.state import BUCKETS
from tests.helpers import (
    INFER,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    model_server,
    refusing_port,
    running_gateway,
    wait_for,
)

RANGES = [(4.0, 8.0), (2.0, 4.5), (1.0, 7.0), (0.1, 2.5)]


def sample_rows(seed: int, n: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[round(rng.uniform(lo, hi), 3) for lo, hi in RANGES] for _ in range(n)]


async def report(gw: RunningGateway, route: str = "classifier", **params: str) -> Any:
    r = await gw.admin.get(f"/admin/routes/{route}/shadow", params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def wait_mirrored(gw: RunningGateway, n: int, route: str = "classifier") -> Any:
    async def done() -> Any:
        rep = await report(gw, route)
        total = rep["total"]
        return rep if total is not None and total["mirrored"] + total["dropped"] >= n else None

    return await wait_for(done, timeout=20, message=f"{n} mirrored pairs")


@asynccontextmanager
async def app_server(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# Done when: agreement and confusion counts equal those of calling both models directly


@pytest.mark.parametrize("upstream", ["aiohttp", "fast"])
async def test_report_equals_direct_model_calls(blue: ModelServer, green: ModelServer,
                                                upstream: str) -> None:
    rows = sample_rows(seed=7, n=500)
    config = classifier_config(blue.url, green.url, shadow={
        "backend": "green", "sample": 100,
        "compare": {"preset": "kserve_v2", "agree_on": "labels"},
    })
    async with running_gateway(config, upstream_kind=upstream) as gw:
        batches = [rows[i:i + 10] for i in range(0, len(rows), 10)]
        for start in range(0, len(batches), 10):
            responses = await asyncio.gather(*(
                gw.client.post(INFER, json=infer_body(batch))
                for batch in batches[start:start + 10]))
            assert [r.status_code for r in responses] == [200] * len(responses)
            assert all(r.json()["model_version"] == "v1" for r in responses)
        rep = await wait_mirrored(gw, len(batches))

    v1 = predict("v1", rows)
    v2 = predict("v2", rows)
    expected_confusion: Counter[tuple[str, str]] = Counter(
        (a, b) for (a, _), (b, _) in zip(v1, v2, strict=True))
    agree_rows = sum(n for (a, b), n in expected_confusion.items() if a == b)
    assert 0 < agree_rows < len(rows)  # the two versions really differ on this sample
    total = rep["total"]
    assert total["dropped"] == 0
    assert total["compared"] == len(batches)
    assert total["elements"] == {"compared": len(rows), "agree": agree_rows}
    assert total["agreement_rate"] == agree_rows / len(rows)
    got = {(live, shadow): n for live, row in total["confusion"].items()
           for shadow, n in row.items()}
    assert got == dict(expected_confusion)
    full_batches = sum(
        all(a[0] == b[0] for a, b in zip(predict("v1", batch), predict("v2", batch),
                                          strict=True))
        for batch in batches)
    assert total["agree"] == full_batches
    assert total["pair_agreement_rate"] == full_batches / len(batches)
    deltas = [abs(a[1] - b[1]) for a, b in zip(v1, v2, strict=True)]
    assert total["numbers"]["compared"] == len(rows)
    assert total["numbers"]["max_delta"] == max(deltas)
    assert abs(total["numbers"]["mean_delta"] - sum(deltas) / len(deltas)) < 1e-12
    assert total["latency"]["live"]["count"] == len(batches)
    assert total["latency"]["shadow"]["p99"] is not None
    # The window (default 5m) holds the same pairs.
    assert rep["window"]["confusion"] == total["confusion"]
    assert rep["window"]["agreement_rate"] == total["agreement_rate"]


# --------------------------------------------------------------------------------------------
# Mirroring: headers, request id, bodies, sampling stickiness


class Recorder:
    """A shadow backend that remembers what it was sent and answers like the demo model."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.release = asyncio.Event()
        self.stall = False

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            self.seen.append((dict(request.headers), body))
            if self.stall:
                await self.release.wait()
            return web.json_response({"outputs": [{"name": "label", "data": ["setosa"]}]})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def test_copies_carry_marker_request_id_and_whole_body(blue: ModelServer) -> None:
    rec = Recorder()
    async with app_server(rec.app()) as shadow_url:
        config = classifier_config(blue.url, shadow_url, shadow={"backend": "green"})
        async with running_gateway(config) as gw:
            r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                     headers={"X-Request-ID": "req-123", "x-user-id": "ann"})
            assert r.status_code == 200
            await wait_for(lambda: len(rec.seen) == 1, message="the copy")
            headers, body = rec.seen[0]
            assert headers["X-Modelgate-Shadow"] == "1"
            assert headers["X-Request-ID"] == "req-123"
            assert headers["x-user-id"] == "ann"
            assert orjson.loads(body) == infer_body([[5.1, 3.5, 1.4, 0.2]])

            # A body far over the proxy's buffering threshold (64 KiB) is mirrored whole
            # (under the demo model server's own 1 MiB limit; bigger bodies: next test).
            raw = orjson.dumps(infer_body([[5.1, 3.5, 1.4, 0.2]])) + b" " * (900 * 1024)
            r = await gw.client.post(INFER, content=raw,
                                     headers={"Content-Type": "application/json"})
            assert r.status_code == 200
            await wait_for(lambda: len(rec.seen) == 2, message="the big copy")
            assert rec.seen[1][1] == raw
            # The live request id (generated by the gateway) is the copy's too.
            assert rec.seen[1][0]["X-Request-ID"] == r.headers["X-Request-ID"]


async def test_bodies_over_a_mebibyte_reach_live_and_shadow_whole() -> None:
    """With a shadow on, the proxy buffers the body (to copy it): both calls get it whole,
    whatever the upstream implementation, also past aiohttp's 1 MiB in-memory body warning."""
    live, shadow = Recorder(), Recorder()
    async with app_server(live.app()) as live_url, app_server(shadow.app()) as shadow_url:
        config = classifier_config(live_url, shadow_url, shadow={"backend": "green"})
        for kind in ("aiohttp", "fast"):
            async with running_gateway(config, upstream_kind=kind) as gw:
                raw = orjson.dumps(infer_body([[5.1, 3.5, 1.4, 0.2]])) + b" " * (3 * 1024 * 1024)
                r = await gw.client.post(INFER, content=raw,
                                         headers={"Content-Type": "application/json"})
                assert r.status_code == 200, (kind, r.text)
                assert live.seen[-1][1] == raw
                await wait_for(lambda: len(shadow.seen) == len(live.seen), message="the copy")
                assert shadow.seen[-1][1] == raw


async def test_sampling_is_sticky_per_user(blue: ModelServer) -> None:
    rec = Recorder()
    async with app_server(rec.app()) as shadow_url:
        config = classifier_config(blue.url, shadow_url,
                                   shadow={"backend": "green", "sample": 50})
        async with running_gateway(config) as gw:
            users = [f"user-{i}" for i in range(40)]
            salt = b"classifier#shadow"
            expected = {u for u in users if bucket_of(salt, u) < BUCKETS // 2}
            assert 5 < len(expected) < 35
            for _ in range(2):
                rs = await asyncio.gather(*(
                    gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                   headers={"x-user-id": u}) for u in users))
                assert all(r.status_code == 200 for r in rs)
            await wait_mirrored(gw, 2 * len(expected))
            seen = Counter(h["x-user-id"] for h, _ in rec.seen)
            assert set(seen) == expected
            assert set(seen.values()) == {2}


async def test_no_copy_when_the_shadow_served_the_request(blue: ModelServer,
                                                          green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, shadow={"backend": "green"},
                               override_header="x-modelgate-backend")
    async with running_gateway(config) as gw:
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                 headers={"x-modelgate-backend": "green"})
        assert r.json()["model_version"] == "v2"
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
        assert r.json()["model_version"] == "v1"
        rep = await wait_mirrored(gw, 1)
        await asyncio.sleep(0)  # nothing else is queued: the first request was never offered
        assert rep["total"]["mirrored"] == 1
        assert rep["queue"]["depth"] == 0


# --------------------------------------------------------------------------------------------
# Isolation: the client's answer is the same, a slow/stalled/down shadow changes nothing


def _comparable(r: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = sorted((k.lower(), v) for k, v in r.headers.items() if k.lower() != "date")
    return r.status_code, headers, r.content


async def test_client_response_identical_with_shadow_on_and_off(
        blue: ModelServer, green: ModelServer) -> None:
    body = {**infer_body([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]), "id": "fixed"}
    headers = {"X-Request-ID": "same-id", "x-user-id": "ann"}
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        off = await gw.client.post(INFER, json=body, headers=headers)
        r = await gw.admin.put("/admin/routes/classifier/shadow",
                               json={"backend": "green", "sample": 100})
        assert r.status_code == 200, r.text
        on = await gw.client.post(INFER, json=body, headers=headers)
        await wait_mirrored(gw, 1)
        assert _comparable(on) == _comparable(off)


async def test_stalled_shadow_fills_queue_and_drops(blue: ModelServer) -> None:
    rec = Recorder()
    rec.stall = True
    async with app_server(rec.app()) as shadow_url:
        config = classifier_config(blue.url, shadow_url, shadow={
            "backend": "green", "queue": 2, "senders": 1, "timeout": "30s"})
        try:
            async with running_gateway(config) as gw:
                statuses = []
                for i in range(20):
                    r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]),
                                             headers={"x-user-id": f"u{i}"})
                    statuses.append(r.status_code)
                assert statuses == [200] * 20
                rep = await report(gw)
                # One copy is stuck in the sender, two wait in the queue, the rest dropped.
                assert rep["queue"]["depth"] + rep["total"]["dropped"] + len(rec.seen) == 20
                assert rep["total"]["dropped"] >= 17
                assert rep["total"]["mirrored"] == 0
                metrics = (await gw.admin.get("/metrics")).text
                dropped = rep["total"]["dropped"]
                assert ('modelgate_shadow_dropped_total{backend="green",reason="queue",'
                        f'route="classifier"}} {dropped:.1f}') in metrics
        finally:
            rec.release.set()


async def test_switching_the_shadow_drops_copies_queued_for_the_old_one(
        blue: ModelServer, green: ModelServer) -> None:
    rec = Recorder()
    rec.stall = True
    async with app_server(rec.app()) as stalled_url:
        config = classifier_config(
            blue.url, stalled_url,
            backends={"blue": {"url": blue.url}, "green": {"url": stalled_url},
                      "v2": {"url": green.url}},
            shadow={"backend": "green", "queue": 5, "senders": 1, "timeout": "1s"})
        try:
            async with running_gateway(config) as gw:
                for _ in range(10):
                    r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
                    assert r.status_code == 200
                assert (await report(gw))["queue"]["depth"] == 5
                r = await gw.admin.put("/admin/routes/classifier/shadow", json={"backend": "v2"})
                assert r.status_code == 200
                old = await report(gw, backend="green")
                assert old["queue"]["depth"] == 0  # the 5 waiting copies went with the switch
                assert old["total"]["dropped"] >= 5 + 4
                for _ in range(3):
                    await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
                rep = await wait_mirrored(gw, 3)  # once the stuck copy times out
                assert rep["backend"] == "v2" and rep["total"]["agree"] == 3
                old = await report(gw, backend="green")
                total = old["total"]
                assert total["dropped"] + total["shadow_timeouts"] == 10
        finally:
            rec.release.set()


async def test_queue_bytes_bound_drops_big_copies(blue: ModelServer, green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, shadow={
        "backend": "green", "queue_bytes": 2000})
    async with running_gateway(config) as gw:
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]] * 100))
        assert r.status_code == 200
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
        assert r.status_code == 200
        rep = await wait_mirrored(gw, 2)
        assert rep["total"]["dropped"] == 1
        assert rep["total"]["mirrored"] == 1


@pytest.mark.parametrize("upstream", ["aiohttp", "fast"])
async def test_down_shadow_counts_errors_clients_unaffected(blue: ModelServer,
                                                            upstream: str) -> None:
    async with refusing_port() as down, running_gateway(
            classifier_config(blue.url, down, shadow={"backend": "green"}),
            upstream_kind=upstream) as gw:
        rs = await asyncio.gather(*(gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
                                    for _ in range(30)))
        assert [r.status_code for r in rs] == [200] * 30
        rep = await wait_mirrored(gw, 30)
        total = rep["total"]
        # A few copies find the shadow refusing connections; then it is skipped for a while
        # (a failed connect costs as much CPU as a proxied request).
        assert total["shadow_errors"] >= 5
        assert total["shadow_errors"] + total["dropped_shadow_down"] == 30
        assert total["dropped"] == total["dropped_shadow_down"]
        assert total["compared"] == 0
        assert total["agreement_rate"] is None


async def test_shadow_that_comes_back_is_used_again(blue: ModelServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import gateway.shadow.component as component
    from gateway.demo.model_server import build_app

    monkeypatch.setattr(component, "BREAKER_COOLDOWN", 0.2)
    # Bound but not listening (refused), until the shadow "comes back" on the same port.
    down = socket.socket()
    try:
        down.bind(("127.0.0.1", 0))
        port = down.getsockname()[1]
        config = classifier_config(blue.url, f"http://127.0.0.1:{port}",
                                   shadow={"backend": "green", "senders": 1})
        async with running_gateway(config) as gw:
            for _ in range(10):
                assert (await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
                        ).status_code == 200
            rep = await wait_mirrored(gw, 10)
            total = rep["total"]
            assert total["shadow_errors"] >= 5  # 5 refusals in a row open the breaker
            assert total["dropped_shadow_down"] > 0
            assert total["shadow_errors"] + total["dropped_shadow_down"] == 10
            down.close()
            runner = web.AppRunner(build_app("v2"), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            try:
                async def agreed() -> bool:
                    r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
                    assert r.status_code == 200
                    return bool((await report(gw))["total"]["agree"])

                await wait_for(agreed, timeout=10, interval=0.05, message="the shadow is back")
            finally:
                await runner.cleanup()
    finally:
        down.close()


@pytest.mark.parametrize("upstream", ["aiohttp", "fast"])
async def test_slow_shadow_times_out_on_its_own_timeout(blue: ModelServer, upstream: str) -> None:
    async with model_server("v2", latency_ms=400) as slow:
        config = classifier_config(blue.url, slow.url, shadow={
            "backend": "green", "timeout": "50ms"})
        async with running_gateway(config, upstream_kind=upstream) as gw:
            rs = await asyncio.gather(*(gw.client.post(INFER,
                                                       json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
                                        for _ in range(3)))
            assert [r.status_code for r in rs] == [200] * 3
            rep = await wait_mirrored(gw, 3)
            assert rep["total"]["shadow_timeouts"] == 3
            assert rep["timeout"] == 0.05


async def test_live_error_is_counted_not_compared(blue: ModelServer, green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, shadow={"backend": "green"})
    async with running_gateway(config) as gw:
        r = await gw.client.post(INFER, json={"inputs": "nonsense"})
        assert r.status_code == 400
        rep = await wait_mirrored(gw, 1)
        assert rep["total"]["live_errors"] == 1
        assert rep["total"]["compared"] == 0


# --------------------------------------------------------------------------------------------
# Presets over real sockets: TF Serving (numbers, tolerance), OpenAI chat (text, SSE)


def tf_app(offset_from_request: bool) -> web.Application:
    """Doubles each instance; the shadow version adds the request's `eps` to every value."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        eps = body.get("eps", 0.0) if offset_from_request else 0.0
        return web.json_response(
            {"predictions": [[x * 2 + eps for x in row] for row in body["instances"]]})

    app = web.Application()
    app.router.add_post("/v1/models/m:predict", handle)
    return app


async def test_tf_serving_numbers_within_tolerance() -> None:
    async with app_server(tf_app(False)) as live_url, app_server(tf_app(True)) as shadow_url:
        config = classifier_config(live_url, shadow_url, match={"path_prefix": "/v1/models"},
                                   shadow={"backend": "green", "compare": {
                                       "preset": "tf_serving",
                                       "numbers": {"abs_tol": 1e-3, "rel_tol": 0}}})
        async with running_gateway(config) as gw:
            cases = [0.0, 0.0005, 0.002, 0.5]
            for eps in cases:
                r = await gw.client.post("/v1/models/m:predict",
                                         json={"instances": [[1.0, 2.5], [3.0, 4.0]], "eps": eps})
                assert r.status_code == 200
            rep = await wait_mirrored(gw, len(cases))
    total = rep["total"]
    assert total["agree"] == 2 and total["disagree"] == 2
    numbers = total["numbers"]
    assert (numbers["compared"], numbers["within_tolerance"]) == (16, 8)
    assert abs(numbers["mean_delta"] - (0.0005 + 0.002 + 0.5) * 4 / 16) < 1e-12
    assert numbers["max_delta"] == 0.5
    assert total["agreement_rate"] == 0.5
    assert total["confusion"] == {}


async def test_openai_chat_text_streamed_and_not(blue: ModelServer, green: ModelServer) -> None:
    from gateway.demo.model_server import reply_tokens

    short, long = "hi", " ".join(f"word{i}" for i in range(40))
    sim_short = similarity("".join(reply_tokens("v1", short)), "".join(reply_tokens("v2", short)))
    sim_long = similarity("".join(reply_tokens("v1", long)), "".join(reply_tokens("v2", long)))
    assert sim_short < sim_long < 1.0
    threshold = (sim_short + sim_long) / 2
    config = classifier_config(
        blue.url, green.url, match={"path_prefix": "/v1/chat"},
        backends={"blue": {"url": blue.url}, "green": {"url": green.url},
                  "blue2": {"url": blue.url}},
        shadow={"backend": "green", "compare": {
            "preset": "openai_chat",
            "text": {"mode": "similarity", "min_similarity": threshold}}})
    async with running_gateway(config) as gw:
        sent = 0
        for text in (short, long):
            for stream in (False, True):
                body = {"messages": [{"role": "user", "content": text}], "stream": stream,
                        "stream_delay_ms": 0}
                r = await gw.client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200
                if stream:
                    assert r.headers["content-type"].startswith("text/event-stream")
                    assert r.text.startswith("data:")
                sent += 1
        rep = await wait_mirrored(gw, sent)
        total = rep["total"]
        assert total["unparsed"] == 0
        assert total["text"]["compared"] == 4
        assert total["text"]["agree"] == 2  # the long replies, streamed and not
        assert abs(total["text"]["mean_similarity"] - (sim_short + sim_long) / 2) < 1e-9
        assert total["confusion"] == {}

        # The same replies against an identical model agree exactly, streamed or not.
        r = await gw.admin.put("/admin/routes/classifier/shadow", json={"backend": "blue2"})
        assert r.status_code == 200
        for stream in (False, True):
            body = {"messages": [{"role": "user", "content": short}], "stream": stream,
                    "stream_delay_ms": 0}
            assert (await gw.client.post("/v1/chat/completions", json=body)).status_code == 200
        rep = await wait_mirrored(gw, 2)
        assert rep["backend"] == "blue2"
        assert rep["total"]["text"] == {"compared": 2, "agree": 2, "mean_similarity": 1.0}
        old = await report(gw, backend="green")
        assert old["total"]["text"]["compared"] == 4


async def test_openai_chat_exact_mode(blue: ModelServer, green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, match={"path_prefix": "/v1/chat"},
                               shadow={"backend": "green", "compare": {"preset": "openai_chat"}})
    async with running_gateway(config) as gw:
        for stream in (False, True):
            body = {"messages": [{"role": "user", "content": "hello there"}], "stream": stream,
                    "stream_delay_ms": 0}
            assert (await gw.client.post("/v1/chat/completions", json=body)).status_code == 200
        rep = await wait_mirrored(gw, 2)
        assert rep["total"]["text"] == {"compared": 2, "agree": 0, "mean_similarity": None}
        assert rep["total"]["disagree"] == 2


# --------------------------------------------------------------------------------------------
# The comparison log: rotation and redaction


async def _send_logged(gw: RunningGateway, n: int, row: list[float]) -> Any:
    for i in range(n):
        r = await gw.client.post(INFER, json=infer_body([row]), headers={"X-Request-ID": f"r{i}"})
        assert r.status_code == 200

    async def flushed() -> Any:
        rep = await report(gw)
        return rep if rep["log"]["written"] == n else None

    return await wait_for(flushed, timeout=20, message=f"{n} log lines written")


async def test_log_rotates_by_size(blue: ModelServer, green: ModelServer, tmp_path: Path) -> None:
    path = tmp_path / "logs" / "shadow.jsonl"
    config = classifier_config(blue.url, green.url, shadow={
        "backend": "green", "compare": {"preset": "kserve_v2"},
        "log": {"path": str(path), "max_bytes": "2KiB", "backups": 2}})
    async with running_gateway(config) as gw:
        rep = await _send_logged(gw, 40, [6.789, 3.0, 5.1, 1.8])
        assert rep["log"]["dropped"] == 0
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["shadow.jsonl", "shadow.jsonl.1", "shadow.jsonl.2"]
    lines = []
    for name in files:
        data = (path.parent / name).read_bytes()
        assert 0 < len(data) <= 2048
        lines += [orjson.loads(line) for line in data.splitlines()]
    assert len(lines) < 40  # older lines rotated out past the 2 backups
    newest = orjson.loads(path.read_bytes().splitlines()[-1])
    assert newest["request_id"] == "r39"
    assert newest["route"] == "classifier"
    assert (newest["live_backend"], newest["shadow_backend"]) == ("blue", "green")
    assert (newest["live_status"], newest["shadow_status"]) == (200, 200)
    assert newest["live_prediction"][0] == [predict("v1", [[6.789, 3.0, 5.1, 1.8]])[0][0]]
    assert newest["agree"] in (True, False)
    assert orjson.loads(newest["request_body"]) == infer_body([[6.789, 3.0, 5.1, 1.8]])
    assert orjson.loads(newest["shadow_body"])["model_version"] == "v2"
    assert newest["live_latency_ms"] > 0 and newest["shadow_latency_ms"] > 0


async def test_log_redacts_bodies(blue: ModelServer, green: ModelServer, tmp_path: Path) -> None:
    path = tmp_path / "shadow.jsonl"
    config = classifier_config(blue.url, green.url, shadow={
        "backend": "green", "compare": {"path": "outputs[0].data"},
        "log": {"path": str(path), "redact_bodies": True}})
    async with running_gateway(config) as gw:
        await _send_logged(gw, 5, [6.789, 3.0, 5.1, 1.8])
    text = path.read_text()
    assert "6.789" not in text
    assert "model_version" not in text
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert len(lines) == 5
    for line in lines:
        assert not {"request_body", "live_body", "shadow_body"} & set(line)
        assert line["live_prediction"] == [predict("v1", [[6.789, 3.0, 5.1, 1.8]])[0][0]]


# --------------------------------------------------------------------------------------------
# Run-time control, the admin API and Prometheus


async def test_turn_on_and_off_at_run_time(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        rep = await report(gw)
        assert rep["shadow"] is None and rep["total"] is None
        r = await gw.admin.put("/admin/routes/classifier/shadow",
                               json={"backend": "green", "sample": 100, "reason": "try v2"})
        assert r.status_code == 200
        assert r.json()["shadow"] == {"backend": "green", "sample": 100.0}
        for _ in range(4):
            await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
        await wait_mirrored(gw, 4)
        r = await gw.admin.delete("/admin/routes/classifier/shadow")
        assert r.status_code == 200 and r.json()["shadow"] is None
        for _ in range(3):
            await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
        rep = await report(gw)
        assert rep["shadow"] is None
        assert rep["backend"] == "green"  # the last shadow's figures stay readable
        assert rep["total"]["mirrored"] == 4
        assert rep["total"]["agree"] == 4
        view = (await gw.admin.get("/admin/routes/classifier")).json()
        assert view["shadow_report"]["compared"] == 4
        assert view["shadow_report"]["agreement_rate"] == 1.0
        shadowing = gw.gateway.component("shadow")
        assert shadowing.agreement("classifier", 60) == (4, 1.0)
        events = (await gw.admin.get("/admin/events")).json()["events"]
        assert [e["action"] for e in events] == ["shadow", "shadow_off"]

        metrics = (await gw.admin.get("/metrics")).text
        assert ('modelgate_shadow_requests_total{backend="green",outcome="agree",'
                'route="classifier"} 4.0') in metrics
        assert 'modelgate_shadow_agreement_ratio{backend="green",route="classifier"} 1.0' in metrics
        assert 'modelgate_shadow_latency_seconds_count{backend="green",route="classifier",' \
               'side="shadow"} 4.0' in metrics
        assert 'modelgate_shadow_confusion_total{backend="green",live="setosa",' \
               'route="classifier",shadow="setosa"} 4.0' in metrics
        doc = (await gw.admin.get("/admin/openapi.json")).json()
        assert set(doc["paths"]["/admin/routes/{route}/shadow"]) == {"get", "put", "delete"}


async def test_admin_errors(blue: ModelServer, green: ModelServer) -> None:
    config = classifier_config(blue.url, green.url, shadow={"window": "1m"})
    async with running_gateway(config) as gw:
        r = await gw.admin.get("/admin/routes/nope/shadow")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = await gw.admin.get("/admin/routes/classifier/shadow", params={"window": "soon"})
        assert r.status_code == 400 and "window" in r.json()["message"]
        r = await gw.admin.get("/admin/routes/classifier/shadow", params={"window": "2m"})
        assert r.status_code == 400 and "60s" in r.json()["message"]
        r = await gw.admin.get("/admin/routes/classifier/shadow", params={"backend": "red"})
        assert r.status_code == 400
        r = await gw.admin.put("/admin/routes/classifier/shadow", json={"backend": "red"})
        assert r.status_code == 400
        r = await gw.admin.put("/admin/routes/classifier/shadow", json={"backend": "blue"})
        assert r.status_code == 400  # the live backend cannot shadow itself
        r = await gw.admin.put("/admin/routes/classifier/shadow",
                               json={"backend": "green", "sample": 101})
        assert r.status_code == 400
        assert (await report(gw))["shadow"] is None  # nothing changed
        r = await gw.admin.get("/admin/routes/classifier/shadow", headers={"Authorization": ""})
        assert r.status_code == 401
