#!/usr/bin/env python3
"""What match rules cost on the hot path: `Proxy.plan` timed with 0 and 5 rules.

    python loadtest/rules_cost.py [--calls 50000] [--rounds 7] [--json out.json]

In this process, no sockets: one route (sticky on x-user-id, a canary at 10 %) and a typical
client request (8 headers including a Cookie, a query string). Cases:

- ``0 rules``: the route has none (one attribute check);
- ``5 rules, none match``: header exact, cookie exact, query one-of, header regex, header
  prefix, all evaluated (the worst case for requests that take the split: the Cookie header
  and the query string are parsed once each);
- ``5 rules, first matches``: the request carries ``x-tenant: acme`` (the split is still
  computed first, the rule's hit counted).

Each case runs `--calls` calls per round (the cases take turns), timed in this process's CPU
time; the figure is the best round's ns per call (the machine is shared: the minimum is the
least disturbed), and the extra cost over 0 rules.
Bounds: a few seconds of one core.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import parse_config  # noqa: E402
from gateway.metrics import Recorder  # noqa: E402
from gateway.proxy import Plan, Proxy, ProxyRequest  # noqa: E402
from gateway.routing import Backend, CompiledRoute, RoutingTable, StaticRoute  # noqa: E402
from gateway.state import RouteState  # noqa: E402
from gateway.upstream.mock import MockUpstream  # noqa: E402

RULES: list[dict[str, Any]] = [
    {"name": "acme", "header": "x-tenant", "exact": "acme", "backend": "green"},
    {"name": "beta", "cookie": "beta", "exact": "1", "backend": "green"},
    {"name": "variant", "query": "model-variant", "one_of": ["c", "d"], "backend": "green"},
    {"name": "bots", "header": "user-agent", "regex": "^canary-bot/", "backend": "green"},
    {"name": "eu", "header": "x-region", "prefix": "eu-", "backend": "green"},
]
HEADERS = [
    (b"Host", b"models.example.com"), (b"User-Agent", b"python-httpx/0.27"),
    (b"Accept", b"*/*"), (b"Accept-Encoding", b"gzip, deflate"),
    (b"Connection", b"keep-alive"), (b"Content-Type", b"application/json"),
    (b"X-User-Id", b"user-1234"), (b"Cookie", b"session=abc123; theme=dark"),
]
TARGET = "/v2/models/classifier/infer?trace=0"


def build(rules: list[dict[str, Any]]) -> Proxy:
    cfg = parse_config({"routes": [{
        "name": "classifier", "match": {"path_prefix": "/v2/models/classifier"},
        "backends": {"blue": {"url": "http://127.0.0.1:9"}, "green": {"url": "http://127.0.0.1:9"}},
        "live": "blue", "canary": {"backend": "green", "weight": 10},
        "sticky": {"header": "x-user-id"}, "rules": rules}]})
    route = cfg.routes[0]
    recorder = Recorder()
    stats = {n: recorder.stats(route.name, n) for n in route.backends}
    upstream = MockUpstream(lambda request: None)  # never called: plan() only picks
    static = StaticRoute(route, {n: Backend(n, [upstream], stats[n]) for n in route.backends},
                         stats, b"classifier", b"classifier#shadow")
    state = RouteState(live="blue", canary="green", canary_weight=10.0,
                       rules=tuple(r.spec() for r in route.rules))
    proxy = Proxy(recorder)
    proxy.table = RoutingTable([CompiledRoute(static, state, ())])
    return proxy


def timed(cases: list[tuple[str, Proxy, list[tuple[bytes, bytes]], str]], calls: int,
          rounds: int) -> dict[str, float]:
    """Best ns per call of each case; the cases take turns within each round, so a busy
    moment of the shared machine does not land on one case only."""
    requests = []
    for _name, proxy, headers, expect in cases:
        request = ProxyRequest("POST", TARGET, headers, None, "127.0.0.1", False, True)
        plan = proxy.plan(request)
        assert isinstance(plan, Plan) and plan.backend.name == expect, plan
        requests.append(request)
    best = {name: float("inf") for name, *_ in cases}
    gc.disable()
    try:
        for _ in range(rounds):
            for (name, proxy, _h, _e), request in zip(cases, requests, strict=True):
                plan = proxy.plan
                started = time.process_time_ns()
                for _ in range(calls):
                    plan(request)
                best[name] = min(best[name], (time.process_time_ns() - started) / calls)
    finally:
        gc.enable()
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    acme = [*HEADERS, (b"X-Tenant", b"acme")]
    cases = [("0 rules", build([]), HEADERS, "blue"),
             ("5 rules, none match", build(RULES), HEADERS, "blue"),
             ("5 rules, first matches", build(RULES), acme, "green")]
    results = timed(cases, args.calls, args.rounds)
    base = results["0 rules"]
    print(f"Proxy.plan, best of {args.rounds} rounds x {args.calls} calls:")
    for name, ns in results.items():
        extra = "" if name == "0 rules" else f"  (+{ns - base:,.0f} ns)"
        print(f"  {name:<24} {ns:>8,.0f} ns/call{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ns_per_call": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
