"""The split and route matching, as pure functions: no sockets, no event loop.

What must hold: the bucket of a key never changes (across processes, restarts and releases),
raising a weight only moves users stable → canary, the share matches the weight, and the
longest matching prefix (host-specific first) wins without crossing a path segment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, MultiDict

from gateway.app import Gateway
from gateway.config import StickyKey, parse_config
from gateway.routing import (
    CompiledRoute,
    RoutingTable,
    bucket_of,
    in_sample,
    sticky_key_of,
    threshold,
)
from gateway.state import BUCKETS, RouteState

KEYS = [f"user-{i}" for i in range(20_000)]


def route_dict(name: str = "classifier", prefix: str = "/v2/models/classifier",
               host: str | None = None, **extra: Any) -> dict[str, Any]:
    match: dict[str, Any] = {"path_prefix": prefix}
    if host is not None:
        match["host"] = host
    return {
        "name": name,
        "match": match,
        "backends": {"blue": {"url": "http://127.0.0.1:9"}, "green": {"url": "http://127.0.0.1:10"},
                     "red": {"url": "http://127.0.0.1:11"}},
        "live": "blue",
        "sticky": {"header": "x-user-id"},
        **extra,
    }


def compile_routes(*routes: dict[str, Any], states: dict[str, RouteState] | None = None
                   ) -> dict[str, CompiledRoute]:
    """Compile routes the way the gateway does (same salts), without starting anything."""
    gateway = Gateway(parse_config({"routes": list(routes)}), components=[])
    gateway._build_static()
    states = states or {}
    return {
        r["name"]: gateway.compile_route(r["name"], states.get(r["name"], RouteState(live="blue")))
        for r in routes
    }


def compiled(state: RouteState, **extra: Any) -> CompiledRoute:
    return compile_routes(route_dict(**extra), states={"classifier": state})["classifier"]


def canary_set(route: CompiledRoute) -> set[str]:
    return {k for k in KEYS if route.pick(k).name == route.state.canary}


# -- the hash ----------------------------------------------------------------------------------


def test_bucket_of_is_a_fixed_function() -> None:
    # Pinned values: a change of hash, salt derivation or bucket count moves every user.
    assert bucket_of(b"classifier", "alice") == 2335
    assert bucket_of(b"classifier", "bob") == 6058
    assert bucket_of(b"classifier", "user-1") == 3623
    assert bucket_of(b"classifier", "") == 9194
    assert bucket_of(b"other", "alice") == 3053
    assert all(0 <= bucket_of(b"classifier", k) < BUCKETS for k in KEYS[:1000])


def test_bucket_of_is_salted_by_route() -> None:
    a = [bucket_of(b"classifier", k) for k in KEYS[:2000]]
    b = [bucket_of(b"other", k) for k in KEYS[:2000]]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert same < 10  # independent: ~2000/10000 = 0.2 expected by chance


def test_gateway_salts_by_route_name() -> None:
    routes = compile_routes(route_dict("a", "/a"), route_dict("b", "/b"))
    assert routes["a"].static.salt == b"a"
    assert routes["b"].static.salt == b"b"
    assert routes["a"].static.shadow_salt != routes["a"].static.salt


def test_processes_agree_on_buckets() -> None:
    """Another interpreter with another hash seed computes the same buckets."""
    code = ("from gateway.routing import bucket_of;"
            "print(','.join(str(bucket_of(b'classifier', f'user-{i}')) for i in range(50)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60, cwd=Path(__file__).parent.parent)
    here = [bucket_of(b"classifier", f"user-{i}") for i in range(50)]
    assert out.stdout.strip() == ",".join(map(str, here))


def test_threshold_resolution_is_a_hundredth_of_a_percent() -> None:
    assert threshold(0) == 0
    assert threshold(0.01) == 1
    assert threshold(0.05) == 5
    assert threshold(10) == 1000
    assert threshold(33.33) == 3333
    assert threshold(100) == BUCKETS
    assert threshold(-5) == 0 and threshold(150) == BUCKETS


# -- the split -----------------------------------------------------------------------------------


def test_ten_percent_of_20000_keys_within_one_percent() -> None:
    route = compiled(RouteState(live="blue", canary="green", canary_weight=10))
    share = len(canary_set(route)) / len(KEYS)
    assert 0.09 <= share <= 0.11, share


def test_same_key_same_backend_every_time() -> None:
    route = compiled(RouteState(live="blue", canary="green", canary_weight=50))
    for key in KEYS[:500]:
        first = route.pick(key).name
        assert all(route.pick(key).name == first for _ in range(5))


def test_ramp_is_monotone() -> None:
    """Raising the weight only moves users stable → canary, at every step of a ramp."""
    previous: set[str] = set()
    for weight in (1, 5, 10, 25, 50, 100):
        route = compiled(RouteState(live="blue", canary="green", canary_weight=weight))
        now = canary_set(route)
        assert previous <= now, f"keys left the canary going to {weight}%"
        share = len(now) / len(KEYS) * 100
        assert abs(share - weight) <= 1.0, (weight, share)
        previous = now
    assert previous == set(KEYS)


def test_ten_to_twenty_five_keeps_every_canary_key() -> None:
    at10 = canary_set(compiled(RouteState(live="blue", canary="green", canary_weight=10)))
    at25 = canary_set(compiled(RouteState(live="blue", canary="green", canary_weight=25)))
    assert at10 and at10 <= at25
    assert 0.24 <= len(at25) / len(KEYS) <= 0.26


def test_weight_resolution_0_01() -> None:
    route = compiled(RouteState(live="blue", canary="green", canary_weight=0.01))
    expected = {k for k in KEYS if bucket_of(route.static.salt, k) < 1}
    assert canary_set(route) == expected
    finer = compiled(RouteState(live="blue", canary="green", canary_weight=0.02))
    assert canary_set(route) <= canary_set(finer)
    assert route.canary_threshold == 1 and finer.canary_threshold == 2


def test_weight_zero_and_hundred() -> None:
    zero = compiled(RouteState(live="blue", canary="green", canary_weight=0))
    assert {zero.pick(k).name for k in KEYS[:2000]} == {"blue"}
    assert {zero.pick(None).name for _ in range(500)} == {"blue"}
    full = compiled(RouteState(live="blue", canary="green", canary_weight=100))
    assert {full.pick(k).name for k in KEYS[:2000]} == {"green"}
    assert {full.pick(None).name for _ in range(500)} == {"green"}


def test_no_key_is_a_random_draw_per_request() -> None:
    route = compiled(RouteState(live="blue", canary="green", canary_weight=30))
    draws = [route.pick(None).name for _ in range(10_000)]
    share = draws.count("green") / len(draws)
    assert 0.28 <= share <= 0.32, share  # ±4 standard deviations


def test_override_forces_a_known_backend() -> None:
    route = compiled(RouteState(live="blue", canary="green", canary_weight=0),
                     override_header="X-Modelgate-Backend")
    assert route.override_header == "x-modelgate-backend"
    assert route.pick("alice", "red").name == "red"
    assert route.pick(None, "green").name == "green"
    assert route.pick("alice", "no-such-backend").name == "blue"  # unknown: normal split


def test_override_header_is_off_unless_configured() -> None:
    route = compiled(RouteState(live="blue"))
    assert route.override_header is None


def mirrored(route: CompiledRoute, sample: float, key: str | None) -> bool:
    """What the shadow tap decides: the route's shadow salt, the sample as a threshold."""
    return in_sample(threshold(sample), route.static.shadow_salt, key)


def test_shadow_is_sticky_and_independent_of_the_canary_split() -> None:
    state = RouteState(live="blue", canary="green", canary_weight=50)
    route = compiled(state)
    shadowed = {k for k in KEYS if mirrored(route, 50, k)}
    canary = canary_set(route)
    assert all(mirrored(route, 50, k) for k in list(shadowed)[:500])  # sticky
    assert 0.48 <= len(shadowed) / len(KEYS) <= 0.52
    both = len(shadowed & canary) / len(KEYS)
    assert 0.235 <= both <= 0.265, both  # independent: 50% × 50%


def test_sample_edges_and_no_key() -> None:
    route = compiled(RouteState(live="blue"))
    assert not any(mirrored(route, 0, k) for k in KEYS[:1000])
    assert all(mirrored(route, 100, k) for k in KEYS[:1000])
    draws = [mirrored(route, 50, None) for _ in range(10_000)]
    assert 0.47 <= sum(draws) / len(draws) <= 0.53


# -- the user key --------------------------------------------------------------------------------


def test_sticky_key_from_header_cookie_query() -> None:
    headers = CIMultiDict({"X-User-Id": "alice", "Cookie": "session=s1; uid=bob"})
    query = MultiDict({"user": "carol"})
    assert sticky_key_of(StickyKey("header", "x-user-id"), headers, query) == "alice"
    assert sticky_key_of(StickyKey("cookie", "uid"), headers, query) == "bob"
    assert sticky_key_of(StickyKey("query", "user"), headers, query) == "carol"
    assert sticky_key_of(None, headers, query) is None
    empty: CIMultiDict[str] = CIMultiDict()
    assert sticky_key_of(StickyKey("header", "x-user-id"), empty, MultiDict()) is None
    assert sticky_key_of(StickyKey("cookie", "uid"), empty, MultiDict()) is None
    assert sticky_key_of(StickyKey("query", "user"), empty, MultiDict({"user": ""})) is None


def test_cookie_key_survives_malformed_neighbours() -> None:
    sticky = StickyKey("cookie", "uid")

    def key(cookie: str) -> str | None:
        return sticky_key_of(sticky, CIMultiDict({"Cookie": cookie}), MultiDict())

    # A malformed cookie before ours must not hide it (SimpleCookie stops at the first one).
    assert key('theme="unterminated; ;;==; uid=bob') == "bob"
    assert key('uid="quoted value"') == "quoted value"
    assert key("uid=; other=1") is None
    assert key("xuid=1; uidx=2") is None
    # A stray quote is part of the value: still the same key every time for that client.
    assert key('uid="unterminated') == '"unterminated'
    # The crafted header that made SimpleCookie quadratic parses like any other.
    assert key('uid="' + "\\" * 4000) == '"' + "\\" * 4000


def test_sticky_header_name_is_case_insensitive_in_config() -> None:
    route = compiled(RouteState(live="blue"), sticky={"header": "X-User-ID"})
    assert route.sticky == StickyKey("header", "x-user-id")


# -- matching ------------------------------------------------------------------------------------


def table(*routes: dict[str, Any]) -> RoutingTable:
    return RoutingTable(list(compile_routes(*routes).values()))


def test_longest_prefix_wins() -> None:
    t = table(route_dict("root", "/"), route_dict("models", "/v2/models"),
              route_dict("classifier", "/v2/models/classifier"))
    assert t.match(None, "/v2/models/classifier/infer").name == "classifier"  # type: ignore[union-attr]
    assert t.match(None, "/v2/models/other/infer").name == "models"  # type: ignore[union-attr]
    assert t.match(None, "/healthz").name == "root"  # type: ignore[union-attr]


def test_prefix_matches_on_segment_boundaries_only() -> None:
    t = table(route_dict("classifier", "/v2/models/classifier"))
    assert t.match(None, "/v2/models/classifier") is not None
    assert t.match(None, "/v2/models/classifier/") is not None
    assert t.match(None, "/v2/models/classifier/infer") is not None
    assert t.match(None, "/v2/models/classifier2") is None
    assert t.match(None, "/v2/models/classifier2/infer") is None
    assert t.match(None, "/v2/models/classifie") is None
    assert t.match(None, "/v2/models") is None


def test_prefix_with_trailing_slash() -> None:
    t = table(route_dict("api", "/api/"))
    assert t.match(None, "/api/x") is not None
    assert t.match(None, "/apix") is None


def test_host_specific_route_wins_for_its_host() -> None:
    t = table(route_dict("generic", "/v2/models/classifier"),
              route_dict("tenant", "/v2/models/classifier", host="Tenant.Example.com"))
    assert t.match("tenant.example.com", "/v2/models/classifier/infer").name == "tenant"  # type: ignore[union-attr]
    assert t.match("TENANT.example.com:8000", "/v2/models/classifier/infer").name == "tenant"  # type: ignore[union-attr]
    assert t.match("other.example.com", "/v2/models/classifier/infer").name == "generic"  # type: ignore[union-attr]
    assert t.match(None, "/v2/models/classifier/infer").name == "generic"  # type: ignore[union-attr]


def test_host_only_route_does_not_match_other_hosts() -> None:
    t = table(route_dict("tenant", "/v2", host="tenant.example.com"))
    assert t.match("tenant.example.com", "/v2/x") is not None
    assert t.match("evil.example.com", "/v2/x") is None
    assert t.match(None, "/v2/x") is None


def test_replace_swaps_one_route_and_leaves_the_old_table_alone() -> None:
    routes = compile_routes(route_dict("a", "/a"), route_dict("b", "/b"))
    old = RoutingTable(list(routes.values()))
    moved = compile_routes(route_dict("a", "/a"),
                           states={"a": RouteState(live="green", version=2)})["a"]
    new = old.replace(moved)
    assert new.by_name["a"].live.name == "green"
    assert old.by_name["a"].live.name == "blue"  # a request holding `old` is unaffected
    assert new.by_name["b"] is old.by_name["b"]
