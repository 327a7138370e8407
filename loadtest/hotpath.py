#!/usr/bin/env python3
"""The gateway's own Python cost per proxied request, without sockets.

    python loadtest/hotpath.py [--requests 50000] [--rounds 5] [--config canary|plain|shadow]

Drives the fast server's protocol object and the fast upstream's connection object with
in-memory transports: the benchmark request goes in as bytes, the pool's connection "sends"
it, the benchmark response is fed back, and the client's answer is taken. What is timed is
exactly the Python (and C-extension) work of one exchange on the fast path: parsing both
ways, routing, the sticky split, metrics, request id, header rewriting, no syscalls and no
event-loop wake-ups. It is the part of `bench.py`'s CPU µs/request this project controls, and
it is far less noisy than a socket benchmark, so it is the number to watch between commits.
Prints the median over rounds of µs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import prototype_proxy  # noqa: E402

from gateway.app import Gateway  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.server.fast import FastServer, _Connection  # noqa: E402
from gateway.store.memory import InMemoryStore  # noqa: E402
from gateway.upstream.fastpool import _IDLE, FastUpstream, _Conn  # noqa: E402

BACKEND = "http://127.0.0.1:9"  # never connected: the transports are in memory
BODY = (
    b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP32",'
    b'"data":[[5.1,3.5,1.4,0.2]]}],"id":"bench-request-0001"}'
)
RESPONSE_BODY = (
    b'{"model_name":"classifier","model_version":"v1",'
    b'"outputs":[{"name":"label","datatype":"BYTES","shape":[1],"data":["setosa"]}]}'
)
# What nginx answers in bench.py (the same header set).
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 01:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
    % (len(RESPONSE_BODY), RESPONSE_BODY)
)
USERS = 1000

CONFIGS = {
    "plain": "",
    "canary": "    canary:\n      backend: canary\n      weight: 10\n"
              "    sticky:\n      header: x-user-id\n",
}


def config_text(kind: str) -> str:
    return (
        "listen: 127.0.0.1:0\n"
        "admin:\n  listen: 127.0.0.1:0\n"
        "routes:\n"
        "  - name: bench\n"
        "    match:\n      path_prefix: /\n"
        "    backends:\n"
        f"      stable:\n        url: {BACKEND}\n"
        f"      canary:\n        url: {BACKEND}\n"
        "    live: stable\n" + CONFIGS[kind]
    )


def requests() -> list[bytes]:
    return [
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        b"x-user-id: user-%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (i, len(BODY), BODY) for i in range(USERS)
    ]


class _Transport(asyncio.Transport):
    """Takes writes into a list; never pauses, never closes."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.out.append(b"".join(list_of_data))

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


async def measure(kind: str, count: int, rounds: int,
                  block: int = 1000) -> list[tuple[float, float]]:
    """Per round: (µs per request of modelgate's fast path, of the bare prototype), timed in
    alternating blocks of `block` requests so that both see the same machine."""
    gateway = Gateway(parse_config(_yaml(config_text(kind))), store=InMemoryStore())
    await gateway.start(serve_proxy=False, serve_admin=False)
    try:
        server = FastServer(gateway.proxy, gateway.config.server)
        client = _Connection(server)
        client_transport = _Transport()
        client.connection_made(client_transport)
        pool = gateway._upstream(BACKEND)
        assert isinstance(pool, FastUpstream)
        upstream = _Conn(pool, asyncio.get_running_loop())
        upstream_transport = _Transport()
        upstream.connection_made(upstream_transport)
        upstream.state = _IDLE
        pool._idle.append(upstream)
        # The yardstick: loadtest/prototype_proxy.py's protocols (bench.py's `prototype`
        # target), on the same in-memory transports.
        ref_client, ref_backend = _Transport(), _Transport()
        ref_down = prototype_proxy.Client(backend_port=0)
        ref_down.transport = ref_client
        ref_up = ref_down.backend = prototype_proxy.Backend(ref_down)
        ref_up.transport = ref_backend
        reqs = requests()
        results = []
        gc.collect()
        gc.freeze()
        clock = time.perf_counter
        for _ in range(rounds):
            ours = ref = 0.0
            done = 0
            while done < count:
                n = min(block, count - done)
                start = clock()
                for i in range(done, done + n):
                    client.data_received(reqs[i % USERS])
                    upstream.data_received(RESPONSE)
                middle = clock()
                for i in range(done, done + n):
                    ref_down.data_received(reqs[i % USERS])
                    ref_up.data_received(RESPONSE)
                ours += middle - start
                ref += clock() - middle
                done += n
            assert len(client_transport.out) == count, len(client_transport.out)
            last = client_transport.out[-1]
            assert last.startswith(b"HTTP/1.1 200") and last.endswith(RESPONSE_BODY), last
            assert len(upstream_transport.out) == count and len(ref_client.out) == count
            for transport in (client_transport, upstream_transport, ref_client, ref_backend):
                transport.out.clear()
            results.append((ours / count * 1e6, ref / count * 1e6))
        return results
    finally:
        gc.unfreeze()
        await gateway.stop()


def _yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--config", choices=sorted(CONFIGS), default="canary")
    args = p.parse_args(argv)
    import uvloop

    results = uvloop.run(measure(args.config, args.requests, args.rounds))
    ours = statistics.median(r[0] for r in results)
    ref = statistics.median(r[1] for r in results)
    ratio = statistics.median(r[0] / r[1] for r in results)
    print(f"{args.config}: {ours:.1f} µs/request on the fast path; the bare prototype "
          f"{ref:.1f}; ratio {ratio:.2f}× (medians of {args.rounds} rounds × "
          f"{args.requests} requests, alternating blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
