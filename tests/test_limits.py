"""Issue #11 items 1-2 (client timeouts and limits, bounded memory per connection) and the
pool-wait outcome, on both proxy-port servers: the pure pieces directly, then each finding
end to end over real sockets with the demo model server (or a raw backend where the test
needs a response of a given shape), and the two process-level findings (RSS with 200
non-reading clients; 2,000 idle sockets under a 1,024-descriptor limit) against a
`modelgate serve` subprocess."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.server.limits import (
    FD_RESERVE,
    ConnectionLimit,
    auto_cap,
    return_io_buffers_to_the_os,
)
from gateway.upstream import aiohttp_client, fastpool
from tests import helpers
from tests.cluster import GatewayProcess, admin_client
from tests.helpers import (
    INFER,
    ModelServer,
    classifier_config,
    each_server,  # noqa: F401  (the fixture `server`: every test runs over each proxy server)
    infer_body,
    running_gateway,
    wait_for,
)
from tests.test_proxy import config, raw_server, read_head, route

SHORT = {"header_timeout": "500ms", "keepalive_timeout": "500ms", "body_timeout": "500ms",
         "write_timeout": "500ms"}
READY = "/v2/models/classifier/ready"




def port_of(gw: helpers.RunningGateway) -> int:
    return gw.gateway.addresses[0][1]


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything until the gateway closes the connection (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def metric(gw: helpers.RunningGateway, name: str, labels: str = "") -> float:
    text = (await gw.admin.get("/metrics")).text
    return metric_in(text, name, labels)


def metric_in(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") and labels in line
                or not labels and line.startswith(name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- pure ------------------------------------------------------------------------------------


def test_auto_cap_keeps_a_reserve_and_two_descriptors_per_connection() -> None:
    assert auto_cap(1024) == (1024 - FD_RESERVE) // 2 == 448
    assert auto_cap(20000) == 9936
    assert auto_cap(100) == 16  # never below the minimum
    limit = ConnectionLimit(0, lambda: 0, nofile=256)
    assert limit.cap == 64
    assert ConnectionLimit(10, lambda: 0, nofile=256).cap == 10  # configured wins


def test_admit_evicts_idle_then_refuses_and_logs_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limit = ConnectionLimit(2, lambda: 2, clock=lambda: now[0])
    idle = [True]
    with caplog.at_level(logging.WARNING, "modelgate.server"):
        assert limit.admit(1, lambda: pytest.fail("no eviction below the cap"))
        assert limit.admit(2, lambda: idle[0])
        idle[0] = False
        for _ in range(5):
            assert not limit.admit(2, lambda: idle[0])
        now[0] += 11
        assert not limit.admit(2, lambda: idle[0])
    assert (limit.evicted, limit.refused) == (1, 6)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "proxy port at its connection cap (2): 1 idle connection(s) closed to make room, "
        "0 refused since the last report",
        "proxy port at its connection cap (2): 0 idle connection(s) closed to make room, "
        "6 refused since the last report",
    ]
    text = "".join(f"{s.name} {s.labels} {s.value}\n" for m in limit.metrics()
                   for s in m.samples)
    assert "modelgate_connections_refused_total {} 6" in text


def test_io_buffers_are_mmapped_so_they_go_back_to_the_os() -> None:
    assert return_io_buffers_to_the_os()  # glibc (Linux): the threshold is fixed


def test_config_limits_defaults_and_errors() -> None:
    cfg = parse_config({"server": {"write_timeout": "2s", "max_connections": 100}})
    assert (cfg.server.write_timeout, cfg.server.max_connections) == (2.0, 100)
    default = parse_config({}).server
    assert (default.header_timeout, default.body_timeout, default.write_timeout,
            default.keepalive_timeout, default.max_connections) == (10.0, 60.0, 60.0, 75.0, 0)
    with pytest.raises(ConfigError) as err:
        parse_config({"server": {"max_connections": -1}})
    assert err.value.path == "server.max_connections"
    with pytest.raises(ConfigError) as err:
        parse_config({"server": {"write_timeout": "0s"}})
    assert err.value.path == "server.write_timeout"


# -- finding 1: client timeouts ----------------------------------------------------------------


def short_gateway(blue: ModelServer, **server: Any) -> Any:
    cfg = classifier_config(blue.url, blue.url)
    cfg["server"] = {**SHORT, **server}
    return running_gateway(cfg)


async def test_idle_connection_and_idle_keep_alive_are_closed(blue: ModelServer) -> None:
    async with short_gateway(blue, keepalive_timeout="60s") as gw:
        # A new connection that sends nothing has the header timeout, not the keep-alive one.
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        assert await read_until_closed(reader, 10) == b""  # nothing sent, nothing said
        assert 0.4 <= time.monotonic() - started < 5
        writer.close()
        assert await metric(gw, "modelgate_client_timeouts_total") == 0  # idle, not a timeout
    async with short_gateway(blue) as gw:
        # After an answer, the keep-alive connection is closed when idle.
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        writer.write(f"GET {READY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(read_head(reader), 10)
        assert head.startswith(b"HTTP/1.1 200")
        await read_until_closed(reader, 10)
        writer.close()
        # The gateway still serves.
        assert (await gw.client.get(READY)).status_code == 200


async def test_slowloris_headers_get_408_at_the_header_timeout(blue: ModelServer) -> None:
    async with short_gateway(blue, keepalive_timeout="60s") as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))

        async def dribble() -> None:
            writer.write(f"GET {READY} HTTP/1.1\r\n".encode())
            with suppress(ConnectionError):
                for i in range(100):  # a header line every 0.1 s: never a whole head
                    writer.write(b"X-%d: 1\r\n" % i)
                    await writer.drain()
                    await asyncio.sleep(0.1)

        task = asyncio.create_task(dribble())
        try:
            started = time.monotonic()
            answer = await read_until_closed(reader, 10)
            assert time.monotonic() - started < 5
        finally:
            task.cancel()
            await asyncio.wait({task})
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
        assert await metric(gw, "modelgate_client_timeouts_total", 'kind="header"') == 1


async def test_silent_uploads_are_cut_and_free_the_backend_connections(
        blue: ModelServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 1 scaled down: as many idle chunked uploads as the backend has connections.
    Before, they held every one of them and the next client got a 504 after the connect
    wait; now each is cut at the body timeout and the next client is served."""
    monkeypatch.setattr(fastpool, "MAX_ACTIVE", 3)
    async with short_gateway(blue) as gw:
        conns = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
            writer.write(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         "\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\n".encode())
            conns.append((reader, writer))
        # All three are at the backend (their bodies streaming), then cut.
        for reader, writer in conns:
            await read_until_closed(reader, 10)
            writer.close()
        assert await metric(gw, "modelgate_client_timeouts_total", 'kind="body"') == 3
        r = await gw.client.post(INFER, json=infer_body([[1, 2, 3, 4]]))
        assert r.status_code == 200, r.text
        stats = gw.gateway.proxy.table.by_name["classifier"].live.stats
        assert stats.status_totals[5] == 0 and not any(stats.error_totals.values())


class BlockBackend:
    """A raw backend answering every request with `size` bytes written from one shared
    block (its own memory stays flat), counting connections and bytes sent."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.block = b"x" * (256 * 1024)
        self.sent: dict[int, int] = {}
        self.open = 0
        self.requests = 0
        self.completed = 0
        self._next = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        key = self._next = self._next + 1
        try:
            while True:  # keep-alive: one request after the other
                await read_head(reader)
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % self.size)
                left = self.size
                self.sent[key] = 0
                while left > 0:
                    n = min(left, len(self.block))
                    writer.write(self.block[:n] if n < len(self.block) else self.block)
                    await writer.drain()
                    left -= n
                    self.sent[key] += n
                self.completed += 1
        finally:
            self.sent.pop(key, None)
            self.open -= 1

    def stalled(self, previous: dict[int, int]) -> bool:
        """True when no connection sent anything since `previous` (updated in place)."""
        now = dict(self.sent)
        same = now == previous
        previous.clear()
        previous.update(now)
        return same


def non_reading_client(port: int, target: str) -> socket.socket:
    """A client that asks for `target` and never reads: a tiny receive buffer, no recv()."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def test_client_that_reads_nothing_is_cut_and_its_backend_released() -> None:
    backend = BlockBackend(64 * 1024 * 1024)
    async with raw_server(backend.handle) as url, \
            running_gateway({**config(route("big", "/", url)), "server": SHORT}) as gw:
        sock = non_reading_client(port_of(gw), "/big")
        try:
            await wait_for(lambda: backend.requests == 1, message="the backend request")
            await wait_for(lambda: backend.open == 0, timeout=10,
                           message="the backend connection to be released")
            assert await metric(gw, "modelgate_client_timeouts_total", 'kind="write"') == 1
            assert await metric(gw, "modelgate_client_connections") == 0
            assert backend.completed == 0  # cut midway, not sent whole
        finally:
            sock.close()
        r = await gw.client.get("/big")  # still serving
        assert r.status_code == 200 and len(r.content) == 64 * 1024 * 1024


# -- header limits (431) -------------------------------------------------------------------------


async def test_header_count_and_bytes_over_the_limits_are_431(blue: ModelServer) -> None:
    async with short_gateway(blue, max_headers=20, max_header_bytes="16KiB") as gw:
        many = [(f"X-H{i}", "1") for i in range(21)]
        r = await gw.client.get(READY, headers=many)
        assert r.status_code == 431, r.text
        assert r.json()["error"] in ("too_many_headers", "headers_too_large")
        big = [(f"X-B{i}", "v" * 4000) for i in range(5)]  # 5 x 4 KB: 20 KB > 16 KiB
        r = await gw.client.get(READY, headers=big)
        assert r.status_code == 431 and r.json()["error"] == "headers_too_large"
        r = await gw.client.get(READY, headers=many[:10] + big[:3])
        assert r.status_code == 200


async def test_a_head_over_the_byte_limit_is_431_however_it_is_split_into_reads(
        blue: ModelServer) -> None:
    """The fast server counts header bytes only for a read bigger than the limit or a head
    continued from an earlier read: a head trickled in reads each well under the limit is
    still refused once it is over, and one just under it is served."""
    async with short_gateway(blue, max_header_bytes="2KiB") as gw:
        for lines, expected in ((8, b"HTTP/1.1 431"), (4, b"HTTP/1.1 200")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
            writer.write(f"GET {READY} HTTP/1.1\r\nHost: x\r\n".encode())
            for i in range(lines):  # 400 bytes a line, each its own write
                writer.write(f"X-Pad-{i}: {'p' * 390}\r\n".encode())
                await writer.drain()
                await asyncio.sleep(0.005)  # separate reads are likely (either way: same answer)
            writer.write(b"\r\n")
            await writer.drain()
            head = await asyncio.wait_for(read_head(reader), 10)
            writer.close()
            assert head.startswith(expected), head


# -- the connection cap ----------------------------------------------------------------------


async def test_at_the_cap_the_oldest_idle_connection_goes_on_both_servers(
        blue: helpers.ModelServer) -> None:
    """Both servers evict the same one: the oldest idle connection (accept order), not the
    one nearest its own timeout (here the youngest: a fresh head deadline)."""
    async with running_gateway(
            {**config(route("r", "/", blue.url)),
             "server": {"max_connections": 3, "header_timeout": "5s",
                        "keepalive_timeout": "60s"}}) as gw:
        port = port_of(gw)
        first = await asyncio.open_connection("127.0.0.1", port)
        others = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        reader, writer = first  # answered once: idle with a keep-alive deadline 60 s away
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).status_code < 500
        assert await read_until_closed(reader, 5) == b""  # the oldest went
        for r, w in others:  # the younger ones are still open
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await w.drain()
            assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)).startswith(
                b"HTTP/1.1 ")
            w.close()
        writer.close()


async def test_at_the_cap_idle_connections_make_room_and_busy_ones_refuse_the_next() -> None:
    release = asyncio.Event()
    answered = 0

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        while True:
            await read_head(reader)
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            answered += 1

    async with raw_server(held) as url, running_gateway(
            {**config(route("r", "/", url, timeouts={"read": "20s"})),
             "server": {"max_connections": 3, "header_timeout": "30s"}}) as gw:
        port = port_of(gw)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        release.set()
        # Three idle sockets fill the cap; a real client still gets in (one idle one goes).
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/a")).status_code == 200
        assert await metric(gw, "modelgate_connections_evicted_total") >= 1
        for _, writer in idle:
            writer.close()
        release.clear()

        async def request() -> int:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         timeout=20) as client:
                return (await client.get("/held")).status_code

        busy = [asyncio.create_task(request()) for _ in range(3)]
        try:
            await wait_for(lambda: gw.gateway.proxy.in_flight == 3, timeout=10,
                           message="three requests in flight")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = await read_until_closed(reader, 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"] == \
                "too_many_connections"
            assert await metric(gw, "modelgate_connections_refused_total") == 1
            # Admin and health are another port: they answer while the proxy is full.
            assert (await gw.admin.get("/healthz")).status_code == 200
        finally:
            release.set()
            statuses = await asyncio.gather(*busy)
        assert statuses == [200, 200, 200]


# -- waiting for a free upstream connection (finding 4, part) -------------------------------------


@pytest.mark.parametrize("kind", ["fast", "aiohttp"])
async def test_no_free_backend_connection_is_503_upstream_busy_not_a_backend_timeout(
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(fastpool, "MAX_ACTIVE", 1)
    monkeypatch.setattr(aiohttp_client, "POOL_LIMIT", 1)
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_server(held) as url, running_gateway(config(
            route("r", "/", url, timeouts={"connect": "300ms", "read": "20s"})),
            upstream_kind=kind) as gw:
        first = asyncio.create_task(gw.client.get("/first"))
        try:
            await wait_for(lambda: gw.gateway.proxy.in_flight == 1, message="the first request")
            started = time.monotonic()
            r = await gw.client.get("/second")
            assert r.status_code == 503 and r.json()["error"] == "upstream_busy", r.text
            assert time.monotonic() - started < 5
        finally:
            release.set()
            assert (await first).status_code == 200
        stats = gw.gateway.proxy.table.by_name["r"].live.stats
        assert stats.status_totals[5] == 0  # gates and alarms see no 5xx
        assert stats.error_totals.get("timeout", 0) == 0
        assert not any(stats.error_totals.values())
        assert await metric(gw, "modelgate_upstream_pool_timeouts_total",
                            'route="r"') == 1


# -- process level: memory of non-reading clients, descriptors of idle sockets -----------------


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@contextmanager
def nofile_at_least(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(n, hard) if hard != resource.RLIM_INFINITY else n
    if want < n:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@asynccontextmanager
async def gateway_process(cfg: dict[str, Any], workdir: Path, server: str,
                          nofile: int | None = None) -> AsyncIterator[GatewayProcess]:
    cfg = {**cfg, "server": {**cfg.get("server", {}), "kind": server}}

    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = GatewayProcess(cfg, workdir, f"gw-{server}", preexec_fn=limit_fds)
    try:
        await proc.start()
        yield proc
    finally:
        proc.close()


async def test_200_clients_that_never_read_cost_under_100_mb(tmp_path: Path, server: str) -> None:
    # Larger than what the kernel buffers of both hops hold (so every stream stalls with the
    # gateway in between), small enough to keep the test quick.
    backend = BlockBackend(16 * 1024 * 1024)
    with nofile_at_least(2048):
        async with raw_server(backend.handle) as url, gateway_process(
                config(route("big", "/", url)), tmp_path, server) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                # Warm: pool, buffers, code paths.
                assert len((await client.get("/big")).content) == backend.size
            baseline = rss_kb(gw.pid)
            socks: list[socket.socket] = []
            try:
                for _ in range(200):
                    socks.append(non_reading_client(port, "/big"))
                await wait_for(lambda: backend.requests >= 201, timeout=30,
                               message="200 backend requests")
                seen: dict[int, int] = {}
                await wait_for(lambda: len(backend.sent) >= 200 and backend.stalled(seen),
                               timeout=30, interval=0.3, message="every stream to stall")
                peak = rss_kb(gw.pid, "VmHWM")
                held = rss_kb(gw.pid)
            finally:
                for sock in socks:
                    sock.close()
            await wait_for(lambda: backend.open == 0, timeout=30,
                           message="the backend connections to be released")
            async with admin_client(gw) as admin:
                await wait_for(lambda: _open_connections(admin), timeout=10,
                               message="the client connections to close")
            # Given back once they are gone (a bounded wait: the allocator may lag a little).
            with suppress(AssertionError):
                await wait_for(lambda: rss_kb(gw.pid) - baseline < 25 * 1024, timeout=5,
                               interval=0.2, message="RSS back near its baseline")
            after = rss_kb(gw.pid)
        growth_mb = (peak - baseline) / 1024
        print(f"{server}: baseline {baseline / 1024:.0f} MB, held {held / 1024:.0f} MB, "
              f"peak +{growth_mb:.0f} MB, after {after / 1024:.0f} MB")
        assert growth_mb < 100, f"200 non-reading clients grew RSS by {growth_mb:.0f} MB"
        assert (after - baseline) / 1024 < 25, "memory not given back after they left"


async def _open_connections(admin: httpx.AsyncClient) -> bool:
    text = (await admin.get("/metrics")).text
    return metric_in(text, "modelgate_client_connections") == 0


async def test_2000_idle_sockets_under_1024_fds_leave_clients_admin_and_healthz_served(
        tmp_path: Path, server: str, blue: ModelServer) -> None:
    with nofile_at_least(2600):
        async with gateway_process(classifier_config(blue.url, blue.url), tmp_path, server,
                                   nofile=1024) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            idle: list[socket.socket] = []
            try:
                for _ in range(2000):
                    sock = socket.socket()
                    sock.connect(("127.0.0.1", port))
                    idle.append(sock)
                async with admin_client(gw) as admin, \
                        httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
                    for _ in range(5):
                        r = await client.post(INFER, json=infer_body([[1, 2, 3, 4]]))
                        assert r.status_code == 200, r.text
                        assert (await admin.get("/healthz")).status_code == 200
                    text = (await admin.get("/metrics")).text
                    assert metric_in(text, "modelgate_client_connections_limit") == 448
                    assert metric_in(text, "modelgate_client_connections") <= 448
                    assert metric_in(text, "modelgate_connections_evicted_total") >= 2000 - 448
            finally:
                for sock in idle:
                    sock.close()
            assert "proxy port at its connection cap (448)" in gw.output()
