"""Record and replay, the pure parts: the line format, redaction, the tap's sampling and
bounds, the replay's pacing and concurrency (over an in-process transport)."""

from __future__ import annotations

import asyncio
import gzip
import random
import time
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.record.component import QUEUE, Recording, Recordings, RecordingSpec, RecordTap
from gateway.record.format import (
    REDACTED,
    Captured,
    FormatError,
    Redaction,
    line,
    parse_line,
    read_recording,
    redact_body,
    redact_target,
)
from gateway.record.replay import REPLAY_HEADER, replay, request_headers, send
from gateway.routing import Exchange
from gateway.shadow.compare import Comparator
from gateway.shadow.config import CompareConfig

KSERVE = b'{"outputs":[{"name":"label","data":["setosa","virginica"]}]}'


def one_line(**over: object) -> bytes:
    args: dict[str, object] = dict(
        ts=1767225600.5, route="classifier", backend="blue", request_id="r1", method="POST",
        target="/v2/models/classifier/infer?x=1",
        request_headers=[(b"Content-Type", b"application/json"),
                         (b"Authorization", b"Bearer secret"), (b"X-Tenant", b"acme")],
        request_body=b'{"inputs": [1, 2]}', status=200,
        response_headers=[(b"Content-Type", b"application/json"),
                          (b"Set-Cookie", b"s=1")],
        response_body=KSERVE, latency=0.0123456, redaction=Redaction.of())
    args.update(over)
    return line(**args)  # type: ignore[arg-type]


def test_line_round_trip_text_binary_and_absent_bodies() -> None:
    raw = one_line()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    got = parse_line(raw)
    assert (got.route, got.backend, got.method, got.target, got.status) == (
        "classifier", "blue", "POST", "/v2/models/classifier/infer?x=1", 200)
    assert got.request_body == b'{"inputs": [1, 2]}'  # bytes kept exactly
    assert got.response_body == KSERVE
    assert got.latency_ms == 12.346 and got.ts == 1767225600.5
    assert got.header("content-type") == "application/json"
    assert got.header("x-tenant", response=False) == "acme"
    doc = orjson.loads(raw)
    assert doc["version"] == 1 and doc["request_body_encoding"] == "text"

    binary = bytes(range(256))
    back = parse_line(one_line(request_body=binary, response_body=None))
    assert back.request_body == binary and back.response_body is None
    doc = orjson.loads(one_line(request_body=binary, response_body=None))
    assert doc["request_body_encoding"] == "base64"
    assert doc["response_body"] is None and doc["response_body_encoding"] is None


def test_credentials_are_always_redacted_and_more_on_request() -> None:
    doc = orjson.loads(one_line())
    assert ["Authorization", REDACTED] in doc["request_headers"]
    assert ["Set-Cookie", REDACTED] in doc["response_headers"]
    assert ["X-Tenant", "acme"] in doc["request_headers"]
    doc = orjson.loads(one_line(redaction=Redaction.of(["x-TENANT"], ["inputs"])))
    assert ["X-Tenant", REDACTED] in doc["request_headers"]
    assert ["Authorization", REDACTED] in doc["request_headers"]  # defaults stay
    assert orjson.loads(doc["request_body"]) == {"inputs": REDACTED}
    assert doc["response_body"] == KSERVE.decode()  # no such key: bytes unchanged


def test_json_fields_redacted_at_any_depth_other_bodies_kept() -> None:
    body = b'{"user": {"email": "a@b", "tags": [{"email": "c@d", "x": 1}]}, "n": 2}'
    out = redact_body(body, frozenset({"email"}))
    assert out is not None
    assert orjson.loads(out) == {"user": {"email": REDACTED,
                                          "tags": [{"email": REDACTED, "x": 1}]}, "n": 2}
    assert redact_body(b"not json email", frozenset({"email"})) == b"not json email"
    assert redact_body(body, frozenset()) is body
    assert redact_body(None, frozenset({"email"})) is None


CHAT_SSE = (b'data: {"choices":[{"delta":{"content":"my SSN is 123"}}]}\n\n'
            b'data: {"choices":[{"delta":{"content":" and more"}}],"id":"c1"}\r\n\r\n'
            b": keep-alive\n\ndata: [DONE]\n\n")


def test_streamed_answers_are_redacted_per_data_line() -> None:
    """Review finding 3: `redact_json_fields: [content]` must not leave a streamed chat
    answer in clear."""
    out = redact_body(CHAT_SSE, frozenset({"content"}))
    assert out is not None and b"SSN" not in out and b"and more" not in out
    assert out.count(REDACTED.encode()) == 2
    assert b": keep-alive\n\ndata: [DONE]\n\n" in out and b'"id":"c1"}\r\n\r\n' in out
    doc = orjson.loads(one_line(
        response_headers=[(b"Content-Type", b"text/event-stream")], response_body=CHAT_SSE,
        redaction=Redaction.of(json_fields=["content"])))
    assert "SSN" not in doc["response_body"]


def test_encoded_bodies_are_dropped_not_kept_when_fields_are_redacted() -> None:
    secret = gzip.compress(b'{"email": "a@b.c"}')
    doc = orjson.loads(one_line(
        response_headers=[(b"Content-Encoding", b"gzip")], response_body=secret,
        request_headers=[], request_body=secret,  # gzip without the header: its magic
        redaction=Redaction.of(json_fields=["email"])))
    assert doc["response_body"] is None and doc["response_body_encoding"] is None
    assert "content-encoding gzip cannot be redacted" in doc["response_body_dropped"]
    assert doc["request_body"] is None and "request_body_dropped" in doc
    assert parse_line(one_line(response_headers=[(b"Content-Encoding", b"br")],
                               response_body=b"\x8b\x00",
                               redaction=Redaction.of(json_fields=["email"]))
                      ).response_body is None
    # Nothing to redact in bodies: an encoded body is kept (base64), as before.
    kept = parse_line(one_line(response_headers=[(b"Content-Encoding", b"gzip")],
                               response_body=secret))
    assert kept.response_body == secret


def test_credential_headers_and_query_parameters_are_redacted_by_default() -> None:
    doc = orjson.loads(one_line(
        target="/infer?model=a&api_key=s3cr3t&Token=t&x=1&access%5Ftoken=z&key",
        request_headers=[(b"X-Api-Key", b"k"), (b"api-key", b"k"),
                         (b"X-Forwarded-For", b"203.0.113.9"), (b"X-Real-IP", b"1.2.3.4"),
                         (b"X-Tenant", b"acme")]))
    assert doc["target"] == ("/infer?model=a&api_key=%5BREDACTED%5D&Token=%5BREDACTED%5D&x=1"
                             "&access%5Ftoken=%5BREDACTED%5D&key")
    headers = dict(map(tuple, doc["request_headers"]))
    assert headers == {"X-Api-Key": REDACTED, "api-key": REDACTED,
                       "X-Forwarded-For": REDACTED, "X-Real-IP": REDACTED, "X-Tenant": "acme"}
    assert redact_target("/p?model=a&tenant=b#f", Redaction.of(query=["TENANT"]).query) == \
        "/p?model=a&tenant=%5BREDACTED%5D#f"
    assert redact_target("/p", frozenset({"key"})) == "/p"
    assert redact_target("/p?a=1", frozenset({"key"})) == "/p?a=1"


def test_read_recording_gzip_or_plain_and_bad_lines_named(tmp_path: Path) -> None:
    good = one_line() + one_line(request_id="r2")
    gz = tmp_path / "r.jsonl.gz"
    gz.write_bytes(gzip.compress(good))
    plain = tmp_path / "r.jsonl"
    plain.write_bytes(good + b"\n")
    for path in (gz, plain):
        assert [c.request_id for c in read_recording(path)] == ["r1", "r2"]
    cases = {
        b"{not json}\n": "line 2: not JSON",
        b'{"version": 9}\n': "line 2: version 9",
        b'[1]\n': "line 2: not a JSON object",
        one_line().replace(b'"status":200', b'"status":"200"'): "status must be a whole",
        one_line().replace(b'"method":"POST",', b""): "missing key 'method'",
        one_line().replace(b'"request_body_encoding":"text"',
                           b'"request_body_encoding":"rot13"'): "unknown body encoding",
    }
    for bad, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_bytes(one_line() + bad)
        with pytest.raises(FormatError, match=message):
            list(read_recording(path))


def exchange(key: str | None, body: bytes = b"{}") -> Exchange:
    ex = Exchange()
    ex.route, ex.backend, ex.request_id = "classifier", "blue", "r"
    ex.method, ex.target, ex.request_headers = "POST", "/x", []
    ex.request_body, ex.response_body = body, b"{}"
    ex.status, ex.latency, ex.started, ex.sticky_key = 200, 0.01, 0.0, key
    return ex


async def test_tap_samples_sticky_per_user_and_caps_requests() -> None:
    rec = Recording("classifier", RecordingSpec(duration=60, sample=30), time.time())
    tap = RecordTap(rec, b"classifier#record")
    users = [f"user-{i}" for i in range(1500)]  # 2 x 30% stays under QUEUE
    for user in users:
        tap(exchange(user))
    first = rec.accepted
    assert 0.25 * len(users) < first < 0.35 * len(users)
    for user in users:  # the same users again: the same decisions
        tap(exchange(user))
    assert rec.accepted == 2 * first and rec.dropped == 0

    capped = Recording("c", RecordingSpec(duration=60, max_requests=3), time.time())
    tap = RecordTap(capped, b"c")
    for _ in range(10):
        tap(exchange(None))
    assert capped.accepted == 3 and capped.dropped == 0
    capped.active = False
    none = Recording("c", RecordingSpec(duration=60), time.time())
    none.active = False
    RecordTap(none, b"c")(exchange(None))
    assert none.accepted == 0


async def test_full_queue_drops_and_counts_never_blocks() -> None:
    rec = Recording("classifier", RecordingSpec(duration=60), time.time())
    tap = RecordTap(rec, b"s")
    for _ in range(QUEUE + 25):
        tap(exchange(None))
    assert rec.queue.qsize() == QUEUE and rec.dropped == 25
    big = Recording("classifier", RecordingSpec(duration=60), time.time())
    RecordTap(big, b"s")(exchange(None, body=b"x" * (33 * 1024 * 1024)))
    assert big.dropped == 1 and big.queue.qsize() == 0


async def test_recording_is_a_valid_gzip_stream_in_pieces() -> None:
    rec = Recording("classifier", RecordingSpec(duration=60), time.time())
    rng = random.Random(3)
    for i in range(3000):
        rec.write(one_line(request_id=f"r{i}", request_body=rng.randbytes(100).hex().encode()))
    rec.close("stopped")
    assert len(rec.pieces) > 1 and rec.compressed == sum(map(len, rec.pieces))
    lines = gzip.decompress(b"".join(rec.pieces)).splitlines()
    assert len(lines) == rec.captured == 3000
    assert parse_line(lines[-1]).request_id == "r2999"
    assert rec.state == "done" and rec.stop_reason == "stopped"


def test_replayed_headers_skip_redacted_and_framing() -> None:
    captured = parse_line(one_line(request_headers=[
        (b"Content-Type", b"application/json"), (b"Authorization", b"Bearer x"),
        (b"Content-Length", b"18"), (b"Connection", b"keep-alive"), (b"X-Request-ID", b"r1")]))
    assert request_headers(captured) == [("Content-Type", "application/json"),
                                         ("X-Request-ID", "r1"), (REPLAY_HEADER, "1")]


async def test_replay_paces_bounds_and_scores_like_shadow_mode() -> None:
    in_flight = peak = 0
    seen: list[bytes] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        seen.append(request.content)
        if request.content == b"fail":
            return httpx.Response(503)
        return httpx.Response(200, content=b'{"outputs":[{"data":["setosa","setosa"]}]}',
                              headers={"content-type": "application/json"})

    exchanges = [parse_line(one_line(request_id=f"r{i}", request_body=b"ok"))
                 for i in range(19)]
    exchanges.append(parse_line(one_line(request_id="bad", request_body=b"fail")))
    comparator = Comparator(CompareConfig())
    done: list[int] = []
    started = time.monotonic()
    tally = await replay(exchanges, "http://candidate", comparator, concurrency=3,
                         rate=100, transport=httpx.MockTransport(handler),
                         progress=lambda d, t: done.append(d))
    elapsed = time.monotonic() - started
    assert elapsed >= 19 / 100  # request i starts no earlier than i / rate
    assert peak <= 3 and len(seen) == 20 and done[-1] == 20
    summary = tally.summary()
    assert summary["mirrored"] == 20 and summary["shadow_errors"] == 1
    assert summary["compared"] == 19 and summary["disagree"] == 19  # virginica vs setosa
    assert summary["confusion"] == {"setosa": {"setosa": 19}, "virginica": {"setosa": 19}}
    assert summary["latency"]["live"]["count"] == 20  # a 503 is an answer too, as in shadow
    assert summary["latency"]["live"]["p50"] >= 0.0123


async def test_an_unsendable_request_scores_as_an_error_and_the_replay_goes_on() -> None:
    """Review finding 4: a non-latin-1 header value makes httpx raise UnicodeEncodeError
    (not an HTTPError); it must not kill the replay."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=KSERVE, headers={"content-type": "application/json"})

    bad = Captured(0.0, "r", "blue", "id", "POST", "/x", [("x-name", "caf\u00e9\u20ac")],
                   b"{}", 200, [], KSERVE, 1.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        answer = await send(client, "http://h", bad)
    assert answer.status is None and answer.error == "unsendable: unicodeencodeerror"
    good = parse_line(one_line())
    tally = await replay([bad, good, bad, good], "http://candidate",
                         Comparator(CompareConfig()), concurrency=2,
                         transport=httpx.MockTransport(handler))
    summary = tally.summary()
    assert summary["mirrored"] == 4 and summary["shadow_errors"] == 2
    assert summary["compared"] == 2 and summary["agree"] == 2


async def test_an_exchange_that_fails_to_encode_does_not_use_up_max_requests(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review finding 8: max_requests counts captured exchanges; one the writer could not
    encode is dropped and leaves room for another."""
    rec = Recording("c", RecordingSpec(duration=60, max_requests=2), time.time())
    tap = RecordTap(rec, b"c")
    writer = Recordings.__new__(Recordings)  # only its writer step: no gateway needed
    writer._captured = {}
    broken = exchange(None)
    broken.request_headers = [("not", "bytes")]  # type: ignore[list-item]
    tap(broken)
    assert writer._write(rec, rec.queue.get_nowait())
    assert (rec.captured, rec.dropped, rec.accepted) == (0, 1, 0)
    assert "could not encode" in caplog.text
    for _ in range(3):
        tap(exchange(None))
    while not rec.queue.empty():
        assert writer._write(rec, rec.queue.get_nowait())
    assert (rec.captured, rec.dropped) == (2, 1)
