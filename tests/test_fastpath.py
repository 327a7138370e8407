"""The fast path (gateway/server/fastpath.py): taken for the common exchange, and every way
out of it behaves like the Task path: a silent backend is a 504 at the route's read timeout
(no timer: the pool's sweep), a stale idle connection is retried, a streamed response is
handed to the Task. The fast server + fast upstream only: the path exists nowhere else."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.server import fastpath
from tests import helpers
from tests.helpers import running_gateway, wait_for
from tests.test_proxy import assert_json_error, config, raw_server, read_head, route

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


@pytest.fixture(autouse=True)
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Which of the fast exchange's callbacks ran, by name."""
    monkeypatch.setattr(helpers, "DEFAULT_SERVER", "fast")
    seen: Counter[str] = Counter()
    for name in ("response_head", "response_done", "response_failed"):
        original = getattr(fastpath.FastExchange, name)

        def spy(self: Any, *args: Any, _name: str = name, _original: Callable[..., Any] = original
                ) -> Any:
            seen[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(fastpath.FastExchange, name, spy)
    return seen


def nth_request(answers: list[Callable[[asyncio.StreamWriter], Any] | None]) -> Any:
    """A backend connection handler answering its requests in turn; None: never answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            head = await read_head(reader)
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if answer is None:
                await reader.read()  # until the gateway gives up and closes
                return
            result = answer(writer)
            if asyncio.iscoroutine(result):
                await result
            await writer.drain()

    return handler


def ok(writer: asyncio.StreamWriter) -> None:
    writer.write(OK)


async def test_common_exchange_takes_the_fast_path(calls: Counter[str]) -> None:
    async with raw_server(nth_request([ok] * 5)) as url, \
            running_gateway(config(route("r", "/", url))) as gw:
        for i in range(5):
            r = await gw.client.post("/x", content=b'{"n":%d}' % i,
                                     headers={"X-Request-ID": f"id-{i}"})
            assert r.status_code == 200 and r.json() == {"ok": True}
            assert r.headers["x-request-id"] == f"id-{i}"
    # The first request opened the connection (Task path); the others reused it.
    assert calls["response_done"] >= 3
    assert calls["response_failed"] == 0


async def test_silent_backend_is_504_at_the_read_timeout(calls: Counter[str]) -> None:
    cfg = config(route("slow", "/", "http://unused", timeouts={"read": "300ms"}))
    async with raw_server(nth_request([ok, None])) as url:
        cfg["routes"][0]["backends"]["main"]["url"] = url
        async with running_gateway(cfg) as gw:
            assert (await gw.client.post("/x", content=b"{}")).status_code == 200
            started = time.monotonic()
            body = assert_json_error(await gw.client.post("/x", content=b"{}"), 504,
                                     "upstream_timeout")
            elapsed = time.monotonic() - started
            assert 0.25 <= elapsed < 3, elapsed
            assert body["backend"] == "main"
            assert calls["response_failed"] == 1  # answered by the fast path
            # The silent connection was dropped: the next request gets a new one.
            assert (await gw.client.post("/x", content=b"{}")).status_code == 200
            stats = gw.gateway.proxy.table.by_name["slow"].live.stats
            assert stats.status_totals[5] == 1 and stats.error_totals["timeout"] == 1


async def test_stale_idle_connection_is_retried_for_an_idempotent_request(
    calls: Counter[str],
) -> None:
    async def close(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()  # closed as the request arrives: nothing came back

    async with raw_server(nth_request([ok, close])) as url, \
            running_gateway(config(route("r", "/", url))) as gw:
        assert (await gw.client.put("/x", content=b"{}")).status_code == 200
        r = await gw.client.put("/x", content=b'{"again":1}')
        assert r.status_code == 200 and r.json() == {"ok": True}
        assert calls["response_failed"] == 1  # the fast path handed it to the Task


async def test_a_post_the_backend_may_have_processed_is_never_sent_again() -> None:
    """RFC 9110 §9.2.2: the backend read the POST, then died without answering. Resending it
    could run it twice (it did, three times: fast path, Task, fresh connection)."""
    posts = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        while True:
            try:
                head = await read_head(reader)
            except asyncio.IncompleteReadError:
                return  # the gateway closed its idle connection
            if head.startswith(b"POST"):
                posts += 1
                await reader.readexactly(2)
                writer.transport.abort()  # processed, then gone without an answer
                return
            ok(writer)
            await writer.drain()

    async with raw_server(handler) as url, \
            running_gateway(config(route("r", "/", url))) as gw:
        await asyncio.gather(*(gw.client.get("/warm") for _ in range(2)))  # idle conns
        r = await gw.client.post("/x", content=b"{}")
        assert r.status_code == 502
    assert posts == 1


async def test_streamed_response_is_handed_to_the_task(calls: Counter[str]) -> None:
    def chunked(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"".join(b"%x\r\n%s\r\n" % (1000, b"x" * 1000) for _ in range(3))
                     + b"0\r\n\r\n")

    async with raw_server(nth_request([ok, chunked, ok])) as url, \
            running_gateway(config(route("r", "/", url))) as gw:
        assert (await gw.client.post("/x", content=b"{}")).status_code == 200
        r = await gw.client.post("/x", content=b"{}")
        assert r.status_code == 200 and r.content == b"x" * 3000
        assert r.headers["transfer-encoding"] == "chunked"
        r = await gw.client.post("/x", content=b"{}")
        assert r.status_code == 200 and r.json() == {"ok": True}
    assert calls["response_head"] >= 2 and calls["response_done"] >= 1


async def test_client_gone_before_the_answer_leaves_the_gateway_serving(
        calls: Counter[str]) -> None:
    async def slow_ok(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        writer.write(OK)

    async with raw_server(nth_request([ok, slow_ok, ok, ok])) as url, \
            running_gateway(config(route("r", "/", url))) as gw:
        assert (await gw.client.post("/x", content=b"{}")).status_code == 200
        port = gw.gateway.addresses[0][1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.transport.abort()  # gone while the backend thinks
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=gw.url) as other:
            assert (await other.post("/x", content=b"{}")).status_code == 200
        assert gw.gateway.proxy.in_flight == 0


async def test_a_stream_handed_over_after_the_client_left_frees_its_backend_connection() -> None:
    """The client resets before the backend's (streamed) head arrives: the hand-over to the
    Task finds nobody to answer, and must close the backend response, not hold it for ever."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await read_head(reader)
                if b"/warm" in head:
                    ok(writer)
                    await writer.drain()
                    continue
                await asyncio.sleep(0.3)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"x" * 65536
                for _ in range(2000):  # a long stream (bounded)
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return

    async with raw_server(handler) as url, \
            running_gateway(config(route("r", "/", url, timeouts={"read": "1s"}))) as gw:
        assert (await gw.client.get("/warm")).status_code == 200
        port = gw.gateway.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, before the backend's head arrives
        upstream = next(iter(gw.gateway._upstreams.values()))
        await wait_for(lambda: upstream._active, timeout=5, message="the backend call")
        await wait_for(lambda: not upstream._active, timeout=10,
                       message="the backend connection to be released")
        assert (await gw.client.get("/warm")).status_code == 200


async def test_bytes_after_a_connection_close_request_do_not_lose_its_answer() -> None:
    """llhttp refuses data after `Connection: close`: the request before it is already at
    the backend (a POST may have run) and its answer must still reach the client."""
    async with raw_server(nth_request([ok, ok])) as url, \
            running_gateway(config(route("r", "/", url))) as gw:
        port = gw.gateway.addresses[0][1]
        for warm in (False, True):
            if warm:
                assert (await gw.client.get("/warm")).status_code == 200
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                         b"Connection: close\r\n\r\n1GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout=10)  # until the close
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert answer.count(b"HTTP/1.1 ") == 1


async def test_a_pipelined_connection_close_lets_the_requests_before_it_be_answered() -> None:
    async with raw_server(nth_request([ok, ok, ok, ok])) as url, \
            running_gateway(config(route("r", "/", url))) as gw:
        port = gw.gateway.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answers = await asyncio.wait_for(reader.read(), timeout=10)  # until the close
        writer.close()
        assert answers.count(b"HTTP/1.1 200") == 3, answers


async def test_the_http_version_decides_keep_alive_on_the_fast_path(calls: Counter[str]) -> None:
    """The server reads the version only when keep-alive can't tell it (a Connection header,
    or no keep-alive): 1.1 stays open; 1.0 closes unless it asks for keep-alive, and then
    hears `Connection: keep-alive` back; a 1.1 `Connection: close` closes."""
    async with raw_server(nth_request([ok] * 8)) as url, \
            running_gateway(config(route("r", "/", url))) as gw:
        assert (await gw.client.get("/warm")).status_code == 200  # the backend connection
        port = gw.gateway.addresses[0][1]

        async def exchange(writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                           request: bytes) -> bytes:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(read_head(reader), timeout=10)
            await asyncio.wait_for(reader.readexactly(11), timeout=10)
            return head

        post = b"POST /a HTTP/%s\r\nHost: x\r\nContent-Length: 1\r\n%s\r\n1"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # 1.1 without a Connection header: kept open, no header added
            head = await exchange(writer, reader, post % (b"1.1", b""))
            assert head.startswith(b"HTTP/1.1 200") and b"connection:" not in head.lower()
        head = await exchange(writer, reader, post % (b"1.1", b"Connection: close\r\n"))
        assert b"Connection: close" in head
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # 1.0 asking for keep-alive: told so, kept open
            head = await exchange(writer, reader, post % (b"1.0", b"Connection: keep-alive\r\n"))
            assert b"Connection: keep-alive" in head, head
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = await exchange(writer, reader, post % (b"1.0", b""))  # plain 1.0: closed
        assert b"Connection: close" in head
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()
    assert calls["response_done"] >= 5
