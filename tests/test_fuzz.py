"""Issue #11 item 9: property tests (hypothesis) of the config loader and of the HTTP message
path. The admin API has its schema-driven fuzzer in tests/test_admin_fuzz.py.

- Config: a valid document with one random change (a value replaced by any JSON/YAML value,
  a key removed or an unknown one added), or random YAML text, is either a config or a
  `ConfigError` naming a key path; nothing else escapes the loader.
- Message path: random methods, targets, header sets and bodies sent as raw bytes through a
  gateway (each proxy server) reach the echo backend unchanged (method, target, headers in
  order, body digest), with no 5xx and no traceback logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig, load_config, parse_config
from gateway.errors import ConfigError
from tests.helpers import running_gateway
from tests.test_proxy import Echo, config, route

# -- the config loader ---------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "admin": {"listen": "127.0.0.1:0"},
    "server": {"kind": "fast", "header_timeout": "5s", "max_connections": 100},
    "trusted_proxies": ["10.0.0.0/8"],
    "routes": [{
        "name": "classifier",
        "match": {"path_prefix": "/v2/models/classifier"},
        "backends": {"blue": {"url": "http://127.0.0.1:9001"},
                     "green": {"url": "http://127.0.0.1:9002"}},
        "live": "blue",
        "sticky": {"header": "x-user-id"},
        "timeouts": {"connect": "1s", "read": "5s"},
        "canary": {"backend": "green", "weight": 10},
    }],
}

SCALARS = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["", "0", "-1", "1e309", "10ms", "1h", "http://x", "blue",
                              "green", "127.0.0.1:0", "::1", "${UNSET}", "${X:-1}", "/"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=3), max_leaves=8)


def key_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from key_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from key_paths(value, (*prefix, i))


PATHS = sorted(key_paths(BASE), key=repr)


def loads_or_names_the_key(doc: Any) -> None:
    try:
        result = parse_config(doc, env={})
    except ConfigError as exc:
        assert isinstance(exc.path, str) and exc.problem
    else:
        assert isinstance(result, GatewayConfig)


def test_the_base_document_is_valid() -> None:
    assert parse_config(BASE, env={}).server.max_connections == 100


@settings(max_examples=200, deadline=None, derandomize=True)
@given(path=st.sampled_from(PATHS), value=VALUES, action=st.sampled_from(["set", "del", "add"]))
def test_config_with_one_random_change_loads_or_names_the_key(
        path: tuple[Any, ...], value: Any, action: str) -> None:
    doc = copy.deepcopy(BASE)
    parent: Any = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "set":
        parent[last] = value
    elif action == "del":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"unknown_{value!r}"[:40]] = value
    else:
        parent.append(value)
    loads_or_names_the_key(doc)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200) | VALUES.map(lambda v: yaml.safe_dump(v)))
def test_random_yaml_text_loads_or_names_the_problem(tmp_path: Path, text: str) -> None:
    file = tmp_path / "gateway.yaml"
    file.write_text(text, encoding="utf-8")
    try:
        result = load_config(file, env={})
    except ConfigError as exc:
        assert isinstance(exc.path, str)
    else:
        assert isinstance(result, GatewayConfig)


# -- the HTTP message path ----------------------------------------------------------------------

# Headers the gateway owns or rewrites on the way (framing, hop-by-hop, forwarding, id).
OWNED = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
         "trailer", "upgrade", "proxy-connection", "proxy-authorization",
         "proxy-authenticate", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
         "forwarded", "x-request-id", "expect"}
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
names = st.text(TCHAR, min_size=1, max_size=24).filter(lambda n: n.lower() not in OWNED)
values = st.builds(lambda a, b: (a + b).strip(" \t"), st.text(VCHAR, max_size=40),
                   st.text(VCHAR + " \t", max_size=40))
headers = st.lists(st.tuples(names, values), max_size=30)
segments = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~%20",
                   max_size=12)
targets = st.builds(
    # Under /fuzz/: the echo backend's /blob/ and /status/ paths answer otherwise.
    lambda segs, query: "/fuzz/" + "/".join(s.replace("%", "%25").replace("%2520", "%20")
                                        for s in segs) + (f"?{query}" if query else ""),
    st.lists(segments.filter(lambda s: s not in (".", "..")), max_size=4),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789=&-_.~", max_size=30))
# Small bodies (read whole) and, more rarely, ones over 64 KiB (streamed to the backend).
bodies = st.one_of(st.binary(max_size=2048), st.binary(max_size=2048),
                   st.integers(1, 400).map(lambda n: bytes(range(256)) * n))


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _GatewayThread:
    """An echo backend and a gateway on a loop of their own, so that hypothesis (which runs
    synchronous examples) can send to it from the test's thread."""

    def __init__(self, server_kind: str) -> None:
        self.server_kind = server_kind
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start()/close()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        echo = Echo()
        await echo.start()
        try:
            async with running_gateway(config(route("echo", "/", echo.url)),
                                       server_kind=self.server_kind) as gw:
                self.port = gw.gateway.addresses[0][1]
                self._ready.set()
                await self._stop.wait()
        finally:
            await echo.close()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "the gateway thread did not start"
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error


@pytest.fixture(scope="module", params=["fast", "aiohttp"])
def gateway_port(request: pytest.FixtureRequest) -> Iterator[int]:
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    thread = _GatewayThread(request.param)
    thread.start()
    try:
        yield thread.port
    finally:
        thread.close()
        logging.getLogger().removeHandler(errors)
    assert not [r.getMessage() for r in errors.records], "errors logged"
    assert not [r for r in errors.records if r.exc_info], "tracebacks logged"


def exchange(port: int, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
       target=targets, sent_headers=headers, body=bodies)
def test_random_messages_reach_the_backend_unchanged(
        gateway_port: int, method: str, target: str, sent_headers: list[tuple[str, str]],
        body: bytes) -> None:
    lines = [f"{method} {target} HTTP/1.1", "Host: fuzz.example"]
    lines += [f"{name}: {value}" for name, value in sent_headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    status, answer = exchange(gateway_port, data)
    assert status == 200, answer[:300]
    report = orjson.loads(answer)
    assert report["method"] == method
    assert report["target"] == target
    got = [(n, v) for n, v in report["headers"] if n.lower() not in OWNED]
    assert got == sent_headers
    assert report["length"] == len(body)
    assert report["sha256"] == hashlib.sha256(body).hexdigest()


def answer_to_junk(port: int, data: bytes) -> int | None:
    """The status the gateway answers `data` with (the client then half-closes), or None
    if it closes without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return None
    assert raw.startswith(b"HTTP/1."), raw[:100]
    return int(raw.split(b" ", 2)[1])


junk_heads = st.builds(
    lambda line, fields, body: line + b"".join(fields) + b"\r\n" + body,
    st.sampled_from([b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"GET /a HTTP/1.0\r\n"])
    | st.binary(max_size=60).map(lambda b: b + b"\r\n"),
    st.lists(st.binary(max_size=40).map(lambda b: b + b"\r\n")
             | st.sampled_from([b"Content-Length: 5\r\n", b"Content-Length: -1\r\n",
                                b"Transfer-Encoding: chunked\r\n", b"Host: a\r\n",
                                b"Content-Length: 1\r\nContent-Length: 2\r\n",
                                b"Expect: 100-continue\r\n", b" folded\r\n"]), max_size=6),
    st.binary(max_size=40))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=junk_heads | st.binary(max_size=200))
# Found by this test: a chunked body broken mid-way held its request until body_timeout.
@example(data=b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nx")
@example(data=b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
              b"hello world")
def test_malformed_requests_never_get_a_5xx(gateway_port: int, data: bytes) -> None:
    status = answer_to_junk(gateway_port, data)
    assert status is None or status < 500, status
