"""Issue #11 (reliability and security), end to end over real sockets, on both proxy-port
servers: what reaches the backend of the request target and the forwarding headers, and
what a malformed request gets back (and leaves in the log)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests import helpers
from tests.helpers import (
    each_server,  # noqa: F401  (the fixture `server`: every test runs over each proxy server)
    running_gateway,
    wait_for,
)
from tests.test_proxy import Echo, config, headers_of, route


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    backend = Echo()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def base_gateway(echo: Echo, **top: Any) -> Any:
    """Echo behind a route whose backend URL has a base path (`/base`)."""
    return running_gateway({**config(route("echo", "/", echo.url + "/base")), **top})


async def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` on a fresh connection, read until the gateway closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await reader.read()  # every request here says or gets Connection: close
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def port_of(gw: helpers.RunningGateway) -> int:
    return gw.gateway.addresses[0][1]


# -- 1. absolute-form targets and fragments ------------------------------------------------------


@pytest.mark.parametrize("target", ["http://evil.example/x", "https://127.0.0.1/x",
                                    "http://localhost/x?a=1"])
async def test_absolute_form_target_is_a_json_400(echo: Echo, target: str) -> None:
    async with base_gateway(echo) as gw:
        status, headers, body = await raw_exchange(
            port_of(gw), f"GET {target} HTTP/1.1\r\nHost: localhost\r\n"
                         "Connection: close\r\n\r\n".encode())
        assert status == 400, body
        assert headers["content-type"].startswith("application/json")
        report = orjson.loads(body)
        assert report["error"] == "bad_target"
        assert "evil" not in body.decode()
        # Nothing reached the backend: the next request's echo is the first it saw.
        r = await gw.client.get("/ok")
        assert r.json()["target"] == "/base/ok"


@pytest.mark.parametrize("target, sent", [("/x#frag", "/base/x"),
                                          ("/x?a=1#frag?b=2", "/base/x?a=1"),
                                          ("/p/q#", "/base/p/q")])
async def test_fragment_is_not_forwarded(echo: Echo, target: str, sent: str) -> None:
    async with base_gateway(echo) as gw:
        for extra in ("", "Content-Length: 3\r\n"):  # the fast path and the Task path
            body = b"abc" if extra else b""
            status, _, answer = await raw_exchange(
                port_of(gw), f"POST {target} HTTP/1.1\r\nHost: localhost\r\n{extra}"
                             "Connection: close\r\n\r\n".encode() + body)
            assert status == 200, answer
            report = orjson.loads(answer)
            assert report["target"] == sent
            assert report["length"] == len(body)


# -- 2. a client's X-Forwarded-* / Forwarded are trusted only from `trusted_proxies` -------------

CLIENT_FORWARDING = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.2"),
                     ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "admin.internal"),
                     ("Forwarded", "for=203.0.113.7;proto=https;host=admin.internal")]


@pytest.mark.parametrize("trusted", [None, [], ["10.0.0.0/8", "::1/128"]])
async def test_untrusted_client_forwarding_headers_are_dropped(
        echo: Echo, trusted: list[str] | None) -> None:
    top = {} if trusted is None else {"trusted_proxies": trusted}
    async with base_gateway(echo, **top) as gw:
        r = await gw.client.get("/fwd", headers=[*CLIENT_FORWARDING, ("Host", "api.example.com")])
        got = headers_of(r.json())
        assert got["x-forwarded-for"] == ["127.0.0.1"]  # the peer, and only the peer
        assert got["x-forwarded-proto"] == ["http"]
        assert got["x-forwarded-host"] == ["api.example.com"]
        assert "forwarded" not in got


async def test_trusted_proxy_forwarding_headers_are_kept_and_appended(echo: Echo) -> None:
    async with base_gateway(echo, trusted_proxies=["192.0.2.0/24", "127.0.0.1"]) as gw:
        r = await gw.client.get("/fwd", headers=[*CLIENT_FORWARDING, ("Host", "api.example.com")])
        got = headers_of(r.json())
        assert got["x-forwarded-for"] == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
        assert got["x-forwarded-proto"] == ["https"]
        assert got["x-forwarded-host"] == ["admin.internal"]
        assert got["forwarded"] == ["for=203.0.113.7;proto=https;host=admin.internal"]


def test_trusted_proxies_are_parsed_once_by_the_config() -> None:
    parsed = parse_config({**config(), "trusted_proxies": ["10.0.0.0/8", "::1", "192.0.2.1/24"]})
    assert [str(n) for n in parsed.trusted_proxies] == ["10.0.0.0/8", "::1/128", "192.0.2.0/24"]
    assert parse_config(config()).trusted_proxies == ()
    with pytest.raises(ConfigError, match="trusted_proxies"):
        parse_config({**config(), "trusted_proxies": ["10.0.0.0/33"]})


# -- 3. a malformed request: a JSON 400 that echoes nothing, logged without the raw line ----------

SECRET = "s3cr3t-t0ken-abcdef"
MALFORMED = {
    "no-colon": f"Authorization Bearer {SECRET}\r\n",
    "control-char": f"Authorization: Bearer {SECRET}\x01\r\n",
    "space-before-colon": f"Authorization : Bearer {SECRET}\r\n",
    "bad-name": f"Auth(orization): Bearer {SECRET}\r\n",
}


@pytest.mark.parametrize("line", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_header_is_a_json_400_that_leaks_nothing(
        echo: Echo, line: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with base_gateway(echo) as gw:
        status, headers, body = await raw_exchange(
            port_of(gw), f"GET /x HTTP/1.1\r\nHost: localhost\r\n{line}"
                         "Connection: close\r\n\r\n".encode("latin-1"))
        assert status == 400, body
        assert headers["content-type"].startswith("application/json"), headers
        assert orjson.loads(body)["error"] == "bad_request"
        assert SECRET not in body.decode("latin-1")
        assert "Bearer" not in body.decode("latin-1")
        await wait_for(lambda: any("rejected a request" in r.getMessage()
                                   for r in caplog.records), message="the rejection logged")
    logged = [r for r in caplog.records if r.levelno >= logging.INFO]
    text = "\n".join(caplog.text.splitlines() + [repr(r.__dict__) for r in logged])
    assert SECRET not in text


# -- 4. a client that hangs up mid-upload is not a backend error ----------------------------------


async def test_client_aborts_are_not_backend_errors(
        echo: Echo, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelgate.access")
    async with running_gateway({**config(route("echo", "/", echo.url)),
                                "access_log_sample": 1.0}) as gw:
        recorder = gw.gateway.recorder
        head = (b"POST /stream-upload HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 200000\r\n\r\n")
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
            writer.write(head + b"x" * 70_000)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        await wait_for(lambda: recorder.client_aborts.get("echo") == 20,
                       message="20 client aborts counted")
        await wait_for(lambda: recorder.in_flight.get("echo") == 0, message="nothing in flight")
        stats = recorder.stats("echo", "main")
        assert stats.status_totals[5] == 0
        assert not any(stats.error_totals.values()), stats.error_totals
        scrape = (await gw.admin.get("/metrics")).text
        assert 'modelgate_client_aborts_total{route="echo"} 20.0' in scrape
        assert 'status_class="5xx"' not in scrape
        logged = [getattr(r, "status", None) for r in caplog.records
                  if r.name == "modelgate.access"]
        assert logged == [499] * 20, logged
        # The backend is fine, and so is the gateway: a whole upload goes through.
        r = await gw.client.post("/stream-upload", content=b"y" * 200_000)
        assert r.status_code == 200 and r.json()["length"] == 200_000
