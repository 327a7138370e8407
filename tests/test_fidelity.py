"""Exact message fidelity, byte for byte, through the fast server and upstream.

For each case a raw-socket client sends the same bytes to a raw-socket backend directly and
through the gateway. What the backend receives and what the client gets must be equal, but
for the documented differences: the gateway adds X-Forwarded-For/-Proto/-Host and
X-Request-ID to the request and X-Request-ID to the response, drops hop-by-hop headers
(Connection and the headers it lists) both ways, and answers `Expect` itself. A backend's
interim heads (103 Early Hints) reach the client before the final one, compared with it as
one run of bytes (the aiohttp server cannot write them: a documented limit, and these cases
run on the fast server only). Chunked bodies are compared decoded (chunk boundaries are the
transport's business); everything else, header order, case, repeats and empty values
included, byte for byte.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from tests.helpers import running_gateway

KiB = 1024
MiB = 1024 * KiB
BINARY = bytes(range(256)) * 4


@dataclass
class Case:
    name: str
    request: bytes  # with {host} for the backend's host:port; body included
    response: bytes  # what the raw backend answers
    method: str = "POST"
    expect_continue: bool = False
    chunked_request: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def head(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def req(method: str, target: str, headers: list[str], body: bytes = b"") -> bytes:
    return head([f"{method} {target} HTTP/1.1", "Host: {host}", *headers]) + body


def resp(status: str, headers: list[str], body: bytes = b"") -> bytes:
    return head([f"HTTP/1.1 {status}", *headers]) + body


def big(n: int) -> bytes:
    return (os.urandom(64) * (n // 64 + 1))[:n]


B64K, B2M = big(64 * KiB), big(2 * MiB)
CASES = [
    Case("repeated, case, empty",
         req("POST", "/a/b?x=1&y=%2F", ["X-Dup: one", "x-dup: two", "X-MiXeD-CaSe: V  v",
                                         "X-Empty: ", "Content-Type: text/plain",
                                         "Content-Length: 3"], b"abc"),
         resp("200 OK", ["Set-Cookie: a=1", "X-Empty: ", "set-cookie: b=2",
                         "Content-Length: 2", "X-After-Length: yes"], b"ok")),
    Case("binary bodies",
         req("PUT", "/bin", [f"Content-Length: {len(BINARY)}"], BINARY),
         resp("200 OK", ["Content-Type: application/octet-stream",
                         f"Content-Length: {len(BINARY)}"], BINARY[::-1])),
    Case("empty body", req("POST", "/empty", ["Content-Length: 0"]),
         resp("200 OK", ["Content-Length: 0"])),
    Case("64 KiB", req("POST", "/64k", [f"Content-Length: {len(B64K)}"], B64K),
         resp("200 OK", [f"Content-Length: {len(B64K)}"], B64K)),
    Case("2 MiB streamed keeps Content-Length",
         req("POST", "/2m", ["X-Before: 1", f"Content-Length: {len(B2M)}", "X-After: 2"], B2M),
         resp("200 OK", [f"Content-Length: {len(B2M)}"], B2M)),
    Case("chunked both ways",
         req("POST", "/chunked", ["Transfer-Encoding: chunked"],
             b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
         resp("200 OK", ["Content-Type: text/plain", "Transfer-Encoding: chunked"],
              b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"),
         chunked_request=True),
    Case("HEAD", req("HEAD", "/doc", []),
         resp("200 OK", ["Content-Type: text/html", "Content-Length: 1234"]), method="HEAD"),
    Case("204", req("DELETE", "/x", []), resp("204 No Content", ["X-Gone: yes"]),
         method="DELETE"),
    Case("304", req("GET", "/etag", ['If-None-Match: "v1"']),
         resp("304 Not Modified", ['ETag: "v1"', "Cache-Control: max-age=60"]), method="GET"),
    Case("418 without a body", req("GET", "/teapot", []),
         resp("418 I'm a teapot", ["Content-Length: 0"]), method="GET"),
    Case("1xx: 100-continue",
         req("POST", "/continue", ["Expect: 100-continue", "Content-Length: 5"], b"hello"),
         resp("201 Created", ["Content-Length: 4"], b"made"), expect_continue=True),
    Case("1xx: 103 Early Hints", req("GET", "/hints", []),
         b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
         + resp("200 OK", ["Content-Type: text/html", "Content-Length: 5"], b"<p>.."),
         method="GET"),
    Case("Connection-listed headers",
         req("GET", "/hop", ["Connection: X-Hop", "X-Hop: secret", "X-Kept: 1"]),
         resp("200 OK", ["Connection: X-Back", "X-Back: hop", "X-Kept: 2", "Content-Length: 1"],
              b"."), method="GET"),
]


# -- raw HTTP/1.1 on both ends ---------------------------------------------------------------


async def read_body(reader: asyncio.StreamReader, head_bytes: bytes, bodiless: bool,
                    response: bool) -> bytes:
    fields = {}
    for line in head_bytes.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    if bodiless:
        return b""
    if "content-length" in fields:
        return await reader.readexactly(int(fields["content-length"]))
    if fields.get("transfer-encoding", "").endswith("chunked"):
        raw = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            raw += await reader.readexactly(size + 2)
            if size == 0:
                return raw
    return await reader.read() if response else b""


def dechunk(raw: bytes) -> bytes:
    out, rest = b"", raw
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2:]


@asynccontextmanager
async def raw_backend(cases: dict[str, Case], seen: list[tuple[bytes, bytes]]
                      ) -> AsyncIterator[int]:
    """A backend that records each request's exact bytes and answers the case's bytes."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            while True:
                try:
                    head_bytes = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                case = cases[head_bytes.split(b" ", 2)[1].decode().split("?")[0]]
                if b"\r\nexpect: 100-continue" in head_bytes.lower():
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await read_body(reader, head_bytes, False, False)
                seen.append((head_bytes, body))
                writer.write(case.response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await server.wait_closed()


async def exchange(port: int, case: Case, host: str) -> tuple[bytes, bytes]:
    """Send the case's request on a fresh connection; the client's (head, raw body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = case.request.replace(b"{host}", host.encode())
        if case.expect_continue:
            cut = data.index(b"\r\n\r\n") + 4
            writer.write(data[:cut])
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(data[cut:])
        else:
            writer.write(data)
        await writer.drain()
        bodiless = case.method == "HEAD" or b" 204 " in case.response[:16] \
            or b" 304 " in case.response[:16]
        # Interim heads, then the final one: (all the heads' bytes, the final's raw body).
        heads = b""
        while True:
            one = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            heads += one
            if not one.startswith(b"HTTP/1.1 1"):
                break
        body = await asyncio.wait_for(read_body(reader, one, bodiless, True), 20)
        return heads, body
    finally:
        writer.close()


def without(head_bytes: bytes, names: set[str]) -> bytes:
    lines = head_bytes.split(b"\r\n")
    return b"\r\n".join(line for line in lines
                        if line.split(b":", 1)[0].strip().lower().decode() not in names)


def hop_names(head_bytes: bytes) -> set[str]:
    names = {"connection", "keep-alive", "expect"}
    for line in head_bytes.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection":
            names |= {t.strip().lower().decode() for t in value.split(b",")}
    return names


ADDED_TO_REQUEST = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_byte_for_byte_through_the_gateway_and_directly(case: Case) -> None:
    cases = {c.request.split(b" ", 2)[1].decode().split("?")[0]: c for c in CASES}
    seen: list[tuple[bytes, bytes]] = []
    async with raw_backend(cases, seen) as port:
        host = f"127.0.0.1:{port}"
        direct_client = await exchange(port, case, host)
        direct_backend = seen.pop()
        cfg = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
               "routes": [{"name": "r", "match": {"path_prefix": "/"},
                           "backends": {"main": {"url": f"http://{host}"}}, "live": "main"}]}
        async with running_gateway(cfg, server_kind="fast") as gw:
            proxied_client = await exchange(gw.gateway.addresses[0][1], case, host)
        proxied_backend = seen.pop()

    # What the backend received.
    want_head = without(direct_backend[0], hop_names(direct_backend[0]))
    got_head = without(proxied_backend[0], ADDED_TO_REQUEST)
    assert got_head == want_head
    if case.chunked_request:
        assert dechunk(proxied_backend[1]) == dechunk(direct_backend[1])
    else:
        assert proxied_backend[1] == direct_backend[1]
    # The gateway added exactly these, once each.
    added = [line.split(b":", 1)[0].lower().decode()
             for line in proxied_backend[0].split(b"\r\n")
             if line.split(b":", 1)[0].strip().lower().decode() in ADDED_TO_REQUEST]
    assert sorted(added) == sorted(ADDED_TO_REQUEST)

    # What the client got.
    want_head = without(direct_client[0], hop_names(direct_client[0]))
    assert without(proxied_client[0], {"x-request-id"}) == want_head
    assert proxied_client[0].lower().count(b"\r\nx-request-id: ") == 1
    if b"transfer-encoding: chunked" in direct_client[0].lower():
        assert dechunk(proxied_client[1]) == dechunk(direct_client[1])
    else:
        assert proxied_client[1] == direct_client[1]
