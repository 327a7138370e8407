"""Streamed-answer metrics (gateway/streaming.py): the SSE scanner and the meter directly, the
TTFT gates, the cluster sums; end to end through both proxy servers with the demo's OpenAI-style
streaming chat endpoint: TTFT per backend on /metrics and the dashboard, events still arriving
one by one, and a rollout rolled back by `max_ttft_p99_ms` when green is slow to start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import config_schema
from gateway.errors import ConfigError
from gateway.histogram import FINE_BOUNDS
from gateway.metrics import Recorder, WindowSummary
from gateway.rollout.analysis import FAIL, NO_DATA, PASS, SKIPPED, judge
from gateway.rollout.plan import Gates, parse_plan
from gateway.streaming import (
    COMPLETION_TOKENS,
    EVENTS,
    MAX_EVENT,
    PROMPT_TOKENS,
    SPAN,
    STREAMS,
    TTFT_KEYS,
    SseScanner,
    StreamMeter,
    is_event_stream,
    stream_summary,
    ttft_hist,
    usage_of,
)
from tests import helpers
from tests.helpers import ModelServer, classifier_config, model_server, running_gateway, wait_for
from tests.redis_server import RedisServer
from tests.test_cluster_metrics import Clock, cluster
from tests.test_rollout_support import events, set_faults

CHAT = "/v1/chat/completions"


# -- the scanner ----------------------------------------------------------------------------
def scan(*chunks: bytes) -> list[list[bytes]]:
    scanner = SseScanner()
    return [scanner.feed(c) for c in chunks]


def test_events_end_at_a_blank_line_whichever_line_ends() -> None:
    assert scan(b"data: a\n\ndata: b\n\n") == [[b"data: a", b"data: b"]]
    assert scan(b"data: a\r\n\r\ndata: b\r\n\r\n") == [[b"data: a", b"data: b"]]
    # CR-only line ends: an event is complete once the next byte shows the CR was no CRLF.
    assert scan(b"data: a\r\r", b"x") == [[], [b"data: a"]]
    assert scan(b"event: x\ndata: 1\ndata: 2\n\n") == [[b"event: x\ndata: 1\ndata: 2"]]


def test_events_split_across_chunks_anywhere() -> None:
    stream = b"data: one\n\n: keep-alive\n\ndata: two\r\n\r\nid: 3\ndata: three\n\n"
    want = [b"data: one", b"data: two", b"id: 3\ndata: three"]
    for cut in range(1, len(stream)):
        got = [e for batch in scan(stream[:cut], stream[cut:]) for e in batch]
        assert got == want, cut
    one_by_one = [e for batch in scan(*(stream[i:i + 1] for i in range(len(stream))))
                  for e in batch]
    assert one_by_one == want
    # The CRLF blank line cut between CR and LF: the event ends on the LF, not before.
    assert scan(b"data: a\r\n\r", b"\ndata: b\r\n\r\n") == [[], [b"data: a", b"data: b"]]


SSE_BITS = st.sampled_from([b"data: x", b"\n", b"\r", b"\r\n", b": c", b"id: 1", b'"usage"',
                            b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 2}}'])


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.lists(SSE_BITS, max_size=30).map(b"".join)),
       st.lists(st.integers(0, 300), max_size=6))
def test_any_bytes_cut_anywhere_give_the_same_events_and_never_raise(
    data: bytes, cuts: list[int]
) -> None:
    whole = SseScanner().feed(data)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    scanner = SseScanner()
    pieces = [scanner.feed(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    got = [e for batch in pieces for e in batch]
    assert got == whole
    for event in got:
        usage_of(event)  # never raises


def test_comments_and_blank_blocks_are_no_events() -> None:
    assert scan(b": ping\n\n:\n\n\n\n\n") == [[]]
    assert scan(b": stamp\ndata: x\n\n") == [[b": stamp\ndata: x"]]
    assert scan(b"data: a\n\n\n\ndata: b\n\n") == [[b"data: a", b"data: b"]]


def test_blocks_without_data_are_no_events() -> None:
    """SSE dispatches only a block with a data field: a retry/event/id-only block is state,
    not a first token (review finding 7)."""
    assert scan(b"retry: 3000\n\nevent: ping\n\nid: 1\n\ndatabase: x\n\n") == [[]]
    assert scan(b"data\n\n", b"data:\n\n") == [[b"data"], [b"data:"]]  # empty data counts
    assert scan(b"retry: 10\nid: 2\ndata: x\n\n") == [[b"retry: 10\nid: 2\ndata: x"]]
    assert scan(b"event: e\ndata\n\n") == [[b"event: e\ndata"]]


def test_a_retry_preamble_is_not_the_first_token() -> None:
    recorder = Recorder(clock=lambda: 100.0)
    stats = recorder.stats("chat", "blue")
    meter = StreamMeter(stats.stream, stats, sent=0.0, sse=True)
    meter.chunk(b"retry: 1000\n\n", 0.001)
    meter.chunk(b"data: tok\n\n", 2.0)
    meter.finish()
    assert stats.stream.ttft_sum == pytest.approx(2.0)
    assert stats.stream.events == 1


def test_ttft_lands_in_the_window_of_the_first_event_not_of_the_stream_end() -> None:
    """A 60 s answer's first token at 0.5 s is in the window at 0.5 s (review finding 6);
    a stream that hangs after its first event still shows its TTFT."""
    now = [100.0]
    recorder = Recorder(clock=lambda: now[0])
    stats = recorder.stats("chat", "blue")
    meter = StreamMeter(stats.stream, stats, sent=100.0, sse=True)
    now[0] = 100.5
    meter.chunk(b"data: first\n\n", 100.5)
    first = stats.window(1, now=100.5).counters
    assert first == {TTFT_KEYS[bucket(0.5)]: 1.0}
    assert ttft_hist(first)[bucket(0.5)] == 1
    names = {m.name for m in recorder.registry.collect()}
    assert "modelgate_stream_ttft_seconds" in names  # before the stream ended
    now[0] = 160.0
    meter.chunk(b"data: last\n\n", 160.0)
    meter.finish()
    last = stats.window(1, now=160.0).counters
    assert not any(k in last for k in TTFT_KEYS)  # counted once, at the first event
    assert last[EVENTS] == 2 and last[SPAN] == pytest.approx(59.5)
    assert sum(stats.stream.ttft_hist) == 1


def test_a_huge_event_is_counted_without_being_kept() -> None:
    scanner = SseScanner()
    assert scanner.feed(b"data: " + b"x" * (MAX_EVENT + 10)) == []
    assert len(scanner._pending) < 10  # only a marker is left of it
    assert scanner.feed(b'"usage" more\n') == []
    assert scanner.feed(b"\n: c\n\n") == [b"data:\0\"usage\" more"]  # counted, not parsed
    assert usage_of(b"data:\0\"usage\" more") is None
    # A comment that grew too long stays a comment.
    assert scanner.feed(b": " + b"c" * (MAX_EVENT + 1)) == []
    assert scanner.feed(b"\n\n") == []


def test_usage_is_read_from_openai_style_events_only() -> None:
    event = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}'
    assert usage_of(event) == (3, 7)
    assert usage_of(b'data:{"usage": {"prompt_tokens": 1,\ndata: "completion_tokens": 2}}') \
        == (1, 2)
    for bad in (b'data: {"usage": null}', b"data: [DONE]", b'data: {"usage": {"prompt_tokens"',
                b'data: {"usage": {"prompt_tokens": -1, "completion_tokens": 2}}',
                b'data: {"usage": {"prompt_tokens": 1.5, "completion_tokens": 2}}',
                b'data: ["usage"]'):
        assert usage_of(bad) is None, bad


def test_event_stream_content_type() -> None:
    assert is_event_stream([(b"Content-Type", b"text/event-stream; charset=utf-8")])
    assert is_event_stream([(b"content-type", b"Text/Event-Stream")])
    assert not is_event_stream([(b"Content-Type", b"application/json")])
    assert not is_event_stream([(b"X-Content-Type", b"text/event-stream")])


# -- the meter ------------------------------------------------------------------------------
def bucket(seconds: float) -> int:
    return next(i for i, b in enumerate(FINE_BOUNDS) if seconds <= b)


def test_meter_measures_ttfb_ttft_gaps_events_and_usage() -> None:
    recorder = Recorder(clock=lambda: 100.0)
    stats = recorder.stats("chat", "blue")
    meter = StreamMeter(stats.stream, stats, sent=0.0, sse=True)
    meter.chunk(b": hello\n\n", 0.047)  # a comment: first byte, not first event
    meter.chunk(b"data: {\"a\": 1}\n\ndata: ", 0.21)
    meter.chunk(b"{\"b\": 2}\n\n", 0.51)
    meter.chunk(b'data: {"usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n'
                b"data: [DONE]\n\n", 0.61)
    meter.finish()
    s = stats.stream
    assert (s.streams, s.events, s.prompt_tokens, s.completion_tokens) == (1, 4, 4, 2)
    assert s.ttfb_sum == pytest.approx(0.047) and s.ttfb_hist[bucket(0.047)] == 1
    assert s.ttft_sum == pytest.approx(0.21) and s.ttft_hist[bucket(0.21)] == 1
    assert s.gap_sum == pytest.approx(0.4) and sum(s.gap_hist) == 3  # 0.3, 0.1, 0 (same chunk)
    window = stats.window(1, now=100)
    assert window.counters == pytest.approx({
        STREAMS: 1, EVENTS: 4, SPAN: 0.4, PROMPT_TOKENS: 4, COMPLETION_TOKENS: 2,
        TTFT_KEYS[bucket(0.21)]: 1})
    figures = stream_summary(window.counters, 1.0)
    assert figures["ttft_p50_ms"] == figures["ttft_p99_ms"] == round(
        FINE_BOUNDS[bucket(0.21)] * 1000, 3)
    assert figures["events_per_s"] == pytest.approx(3 / 0.4, rel=1e-3)
    assert (figures["streams"], figures["events"], figures["completion_tokens"]) == (1, 4, 2)

    text = recorder.registry.collect()
    names = {m.name for m in text}
    assert {"modelgate_stream_ttfb_seconds", "modelgate_stream_ttft_seconds",
            "modelgate_stream_inter_event_seconds", "modelgate_stream_events",
            "modelgate_stream_tokens"} <= names


def test_meter_of_a_plain_chunked_answer_and_of_one_that_never_began() -> None:
    recorder = Recorder(clock=lambda: 100.0)
    stats = recorder.stats("r", "b")
    meter = StreamMeter(stats.stream, stats, sent=1.0, sse=False)
    meter.chunk(b"data: not parsed\n\n", 1.01)
    meter.finish()
    assert (stats.stream.streams, stats.stream.events, sum(stats.stream.ttft_hist)) == (1, 0, 0)
    StreamMeter(stats.stream, stats, sent=2.0, sse=True).finish()  # no byte: nothing recorded
    assert stats.stream.streams == 1
    assert stats.window(1, now=100).counters == {STREAMS: 1.0}


# -- the gates ------------------------------------------------------------------------------
def window(requests: int, ttfts: list[float]) -> WindowSummary:
    w = WindowSummary(seconds=10, requests=requests)
    for t in ttfts:
        key = TTFT_KEYS[bucket(t)]
        w.counters[key] = w.counters.get(key, 0.0) + 1
    return w


def verdict(gates: Gates, candidate: WindowSummary, live: WindowSummary
            ) -> dict[str, tuple[str, float | None]]:
    analysis = judge(gates, candidate, live, 10.0)
    return {g.name: (g.verdict, g.value) for g in analysis.gates if g.name.startswith("ttft")}


def test_ttft_gates() -> None:
    gates = Gates(max_ttft_p99_ms=500, max_ttft_p99_ratio=2, min_requests=5)
    fast, slow = [0.1] * 10, [0.1] * 8 + [0.9] * 2
    got = verdict(gates, window(10, fast), window(50, fast))
    assert got["ttft_p99_ms"][0] == PASS and got["ttft_p99_ratio"] == (PASS, 1.0)
    got = verdict(gates, window(10, slow), window(50, fast))
    assert got["ttft_p99_ms"][0] == FAIL and got["ttft_p99_ms"][1] > 500  # type: ignore[operator]
    assert got["ttft_p99_ratio"][0] == FAIL
    # A route without streams never holds on them; a candidate whose streams have not ended
    # (or hang) while live streams has no data: it does not pass.
    assert {v for v, _ in verdict(gates, window(10, []), window(50, [])).values()} == {SKIPPED}
    assert {v for v, _ in verdict(gates, window(10, []), window(50, fast)).values()} == {NO_DATA}
    assert {v for v, _ in verdict(gates, window(10, fast[:4]), window(50, fast)).values()} \
        == {NO_DATA}
    # The ratio needs live streams to compare with.
    got = verdict(gates, window(10, fast), window(50, fast[:2]))
    assert got == {"ttft_p99_ms": (PASS, got["ttft_p99_ms"][1]), "ttft_p99_ratio": (SKIPPED, None)}


def test_ttft_gates_in_plans_name_the_key_path() -> None:
    gates = config_schema()["$defs"]["Gates"]["properties"]
    assert {"max_ttft_p99_ms", "max_ttft_p99_ratio"} <= set(gates)
    plan = parse_plan({"gates": {"max_ttft_p99_ms": "250", "max_ttft_p99_ratio": 1.5}},
                      {"blue", "green"})
    assert (plan.gates.max_ttft_p99_ms, plan.gates.max_ttft_p99_ratio) == (250, 1.5)
    assert plan.gates.to_json()["max_ttft_p99_ms"] == 250
    for gates, key in (({"max_ttft_p99_ms": 0}, "gates.max_ttft_p99_ms"),
                       ({"max_ttft_p99_ratio": "x"}, "gates.max_ttft_p99_ratio")):
        with pytest.raises(ConfigError) as err:
            parse_plan({"gates": gates}, {"blue"}, "routes[0].rollout")
        assert f"routes[0].rollout.{key}" in str(err.value)


# -- the cluster sums -----------------------------------------------------------------------
async def test_ttft_histograms_sum_across_processes(redis_server: RedisServer) -> None:
    clock = Clock(1000.0)
    async with cluster(redis_server.url, clock, n=3) as (a, b, reader):
        for proc, ttfts in ((a, [0.05, 0.08, 0.3]), (b, [0.9, 0.06])):
            stats = proc.recorder.stats("chat", "green")
            for t in ttfts:
                meter = StreamMeter(stats.stream, stats, sent=0.0, sse=True)
                meter.chunk(b"data: x\n\n", t)
                meter.finish()
        clock.now = 1001.2
        for p in (a, b):
            await p.metrics.publish_once()
        await reader.metrics.read_once()
        view = reader.metrics.backend("chat", "green")
        got = view.window(60)
        want = ttft_hist(a.recorder.stats("chat", "green").window(60, 1000).counters)
        want = [x + y for x, y in zip(
            want, ttft_hist(b.recorder.stats("chat", "green").window(60, 1000).counters),
            strict=True)]
        assert ttft_hist(got.counters) == want and sum(want) == 5
        assert dict(view.totals().counters)[STREAMS] == 5
        # The lease holder's gate sees every replica's streams.
        analysis = judge(Gates(max_ttft_p99_ms=500, min_requests=5), got, got, 60)
        assert [g.verdict for g in analysis.gates if g.name == "ttft_p99_ms"] == [FAIL]


# -- end to end -----------------------------------------------------------------------------
@pytest.fixture(params=["fast", "aiohttp"])
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Over each proxy server: streamed answers go through the Task path of both."""
    value: str = request.param
    monkeypatch.setattr(helpers, "DEFAULT_SERVER", value)
    return value


def chat_config(blue: str, green: str, **route: Any) -> dict[str, Any]:
    return classifier_config(blue, green, name="chat", match={"path_prefix": "/v1/chat"},
                             **route)


def chat_body(words: int = 6, delay_ms: float = 20, **extra: Any) -> dict[str, Any]:
    text = " ".join(f"w{i}" for i in range(words))
    return {"model": "demo", "stream": True, "stream_delay_ms": delay_ms,
            "messages": [{"role": "user", "content": text}], **extra}


async def read_events(client: httpx.AsyncClient, body: dict[str, Any],
                      headers: dict[str, str] | None = None
                      ) -> AsyncIterator[tuple[float, bytes]]:
    """(time received, event) as the client's SSE reader gets them."""
    async with client.stream("POST", CHAT, json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        pending = b""
        async for chunk in r.aiter_raw():
            pending += chunk
            *done, pending = pending.split(b"\n\n")
            for event in done:
                yield time.time(), event


def sent_at(event: bytes) -> float:
    stamp = event.split(b"\n", 1)[0]
    assert stamp.startswith(b": sent ")
    return float(stamp[len(b": sent "):])


def data_of(event: bytes) -> Any:
    line = event.split(b"\n")[-1]
    assert line.startswith(b"data: ")
    return line[6:] if line == b"data: [DONE]" else orjson.loads(line[6:])


async def test_streams_arrive_event_by_event_and_ttft_shows_per_backend(
    server: str, blue: ModelServer, green: ModelServer
) -> None:
    words = 8
    async with running_gateway(chat_config(blue.url, green.url,
                                           canary={"backend": "green", "weight": 50})) as gw:
        # The first event reaches the client before the backend has sent the last token
        # (the server's own send stamps): nothing is held back to be scanned.
        got = [(t, e) async for t, e in read_events(gw.client, chat_body(
            words, delay_ms=30, stream_timestamps=True), {"x-user-id": "u1"})]
        tokens = words + 2  # "You said:" / "You wrote:" + the words
        assert len(got) == tokens + 3  # + the stop event, the usage event, [DONE]
        assert got[0][0] < sent_at(got[tokens - 1][1])
        assert [sent_at(e) for _, e in got[:tokens]] == sorted(sent_at(e) for _, e in got[:tokens])
        assert data_of(got[-1][1]) == b"[DONE]"
        usage = data_of(got[-2][1])["usage"]
        assert usage == {"prompt_tokens": words, "completion_tokens": tokens,
                         "total_tokens": words + tokens}

        # Streams to both backends (sticky keys split between them).
        keys = [f"user-{i}" for i in range(12)]
        for key in keys:
            async for _ in read_events(gw.client, chat_body(3, delay_ms=1),
                                       {"x-user-id": key}):
                pass
        stats = {b: gw.gateway.recorder.stats("chat", b).stream for b in ("blue", "green")}
        assert all(s.streams > 0 for s in stats.values()), stats
        total = sum(s.streams for s in stats.values())
        assert total == 13
        assert sum(s.completion_tokens for s in stats.values()) == tokens + 12 * 5

        metrics = (await gw.admin.get("/metrics")).text
        for b in ("blue", "green"):
            labels = f'backend="{b}",route="chat"'  # (the exposition sorts label names)
            n = stats[b].streams
            assert f"modelgate_stream_ttft_seconds_count{{{labels}}} {n:.1f}" in metrics
            assert f"modelgate_stream_ttfb_seconds_count{{{labels}}} {n:.1f}" in metrics
            gaps = stats[b].events - n  # one fewer than the events of each stream
            assert f"modelgate_stream_inter_event_seconds_count{{{labels}}} {gaps:.1f}" in metrics
            completion = stats[b].completion_tokens
            assert (f'modelgate_stream_tokens_total{{backend="{b}",kind="completion",'
                    f'route="chat"}} {completion:.1f}') in metrics
            assert f"modelgate_stream_events_total{{{labels}}} {stats[b].events:.1f}" in metrics

        async def summary() -> dict[str, Any] | None:
            r = await gw.admin.get("/admin/dashboard/data", params={"route": "chat"})
            assert r.status_code == 200, r.text
            found: dict[str, Any] = r.json()["routes"][0]["summary"]
            done = sum(found[b]["streams"] for b in ("blue", "green")) == total
            return found if done else None

        # The dashboard's "now" figures cover whole seconds only: wait for the last one.
        figures = await wait_for(summary, timeout=5, interval=0.2, message="dashboard streams")
        for b in ("blue", "green"):
            f = figures[b]
            assert 0 < f["ttft_p50_ms"] <= f["ttft_p99_ms"] < 5000, f
            assert f["events_per_s"] > 0 and f["completion_tokens"] > 0
        r = await gw.admin.get("/admin/dashboard/data", params={"route": "chat"})
        series = r.json()["routes"][0]["backends"]["blue"]
        assert any(v is not None for v in series["ttft_p99_ms"])


async def test_a_candidate_slow_to_start_is_rolled_back_on_ttft(server: str) -> None:
    """green's first token comes 400 ms late (the demo's `ttft_ms` fault; its later tokens
    are as fast as blue's): the TTFT gate rolls it back."""
    async with model_server("v1") as blue, model_server("v2", ttft_ms=400) as green:
        config = chat_config(blue.url, green.url)
        async with running_gateway(config) as gw, ChatTraffic(gw.client):
            # A bad gate is a 400 naming its key path, and starts nothing.
            r = await gw.admin.post("/admin/routes/chat/rollout", json={
                "backend": "green", "gates": {"max_ttft_p99_ms": -5}})
            assert r.status_code == 400 and "gates.max_ttft_p99_ms" in r.text, r.text
            assert gw.gateway.control.state("chat").canary_weight == 0
            r = await gw.admin.post("/admin/routes/chat/rollout", json={
                "backend": "green", "steps": [50, 100], "interval": "5s",
                "check_interval": "100ms", "window": "10s", "failure_threshold": 2,
                "gates": {"max_ttft_p99_ms": 250, "min_requests": 3}})
            assert r.status_code == 201, r.text
            async def ended() -> dict[str, Any] | None:
                view: dict[str, Any] = (await gw.admin.get("/admin/routes/chat/rollout")).json()
                return view if view["phase"] in ("rolled_back", "promoted") else None

            view = await wait_for(ended, timeout=20, interval=0.05, message="rollout end")
            assert view["phase"] == "rolled_back", view
            assert "ttft_p99_ms" in view["reason"] and "> 250" in view["reason"], view
            assert gw.gateway.control.state("chat").canary_weight == 0
            log = await events(gw)
            checks = [e["after"]["analysis"] for e in log if e["action"] == "rollout_check"]
            gate = next(g for g in checks[-1]["gates"] if g["name"] == "ttft_p99_ms")
            assert gate["verdict"] == "fail" and gate["value"] >= 400


class ChatTraffic:
    """Streaming chat clients through the gateway until stopped (sticky keys, paced)."""

    def __init__(self, client: httpx.AsyncClient, loops: int = 4) -> None:
        self.client = client
        self.loops = loops
        self.done = 0
        self._stop = False
        self._tasks: list[Any] = []

    async def __aenter__(self) -> ChatTraffic:
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.loops)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)

    async def _loop(self, index: int) -> None:
        n = 0
        while not self._stop:
            n += 1
            async for _ in read_events(self.client, chat_body(2, delay_ms=5),
                                       {"x-user-id": f"u{index}-{n % 20}"}):
                pass
            self.done += 1


async def test_demo_chat_with_a_first_token_delay(blue: ModelServer) -> None:
    async with httpx.AsyncClient(base_url=blue.url) as client:
        await set_faults(blue.url, ttft_ms=150)
        r = await client.get("/faults")
        assert r.json()["ttft_ms"] == 150
        started = time.monotonic()
        r = await client.post(CHAT, json=chat_body(2, delay_ms=0))
        assert time.monotonic() - started >= 0.15
        body = r.content
        assert body.endswith(b"data: [DONE]\n\n") and b'"usage"' in body
        # Without `stream`, a JSON answer with the same usage; bad knobs are refused.
        r = await client.post(CHAT, json={**chat_body(2), "stream": False})
        assert r.json()["usage"]["completion_tokens"] == 4
        for bad in ({"ttft_ms": -1}, {"ttft_ms": "slow"}):
            r = await client.post("/faults", json=bad)
            assert r.status_code == 400 and "ttft_ms" in r.json()["error"]
        r = await client.post(CHAT, json=chat_body(2, stream_timestamps="yes"))
        assert r.status_code == 400
