"""Match rules (issue #13, item 1): compilation and evaluation directly, config and admin
validation, the CLI, and end to end over real sockets with the demo model servers, on both
proxy servers, plus a rule change applied by a second gateway process through Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.admin.auth import STATE_DIR_ENV, TOKEN_ENV
from gateway.cli import main
from gateway.cli.core import change_summary
from gateway.cli.rules import condition_text
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.metrics import BackendStats
from gateway.routing import Backend
from gateway.rules import (
    NOT_READ,
    RULED_ERRORS,
    RULED_REQUESTS,
    RuleConfig,
    compile_rules,
    hit_totals,
)
from gateway.schema import validate
from gateway.state import RouteState, Rule
from tests.cluster import GatewayProcess, admin_client
from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    model_server,
    running_gateway,
    server_fixture,  # noqa: F401  (the fixture `server`: tests asking for it run over each proxy server)
    wait_for,
)
from tests.redis_server import RedisServer

ROUTE = "classifier"
ROW = [[6.1, 2.8, 4.7, 1.2]]
BODY = orjson.dumps(infer_body(ROW))
ACME = {"name": "acme", "header": "x-tenant", "exact": "acme", "backend": "green"}
RULES_PATH = f"/admin/routes/{ROUTE}/rules"


# -- compilation and evaluation (pure) -----------------------------------------------------------
def spec(**doc: Any) -> Rule:
    from pydantic import TypeAdapter

    return validate(TypeAdapter(RuleConfig), doc).spec()


def backends(*names: str) -> dict[str, Backend]:
    return {n: Backend(n, [], BackendStats(ROUTE, n)) for n in names}


def H(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").title().encode(), v.encode()) for k, v in headers.items()]


def pick(rules: list[Rule], headers: list[tuple[bytes, bytes]] | None = None,
         target: str = "/x", body: Any = NOT_READ) -> str | int | None:
    compiled = compile_rules(rules, backends("blue", "green", "purple"))
    assert compiled is not None
    hit = compiled.pick(headers or [], target, target.find("?"), body)
    return hit if hit is None or isinstance(hit, int) else hit.name


def test_each_condition_kind() -> None:
    exact = spec(name="a", header="X-Tenant", exact="acme", backend="green")
    assert exact.key == "x-tenant"  # header names fold to lower case
    assert pick([exact], H(x_tenant="acme")) == "green"
    assert pick([exact], H(x_tenant="acme2")) is None
    assert pick([exact], H(x_other="acme")) is None

    prefix = spec(name="p", header="x-tenant", prefix="acme-", backend="green")
    assert pick([prefix], H(x_tenant="acme-eu")) == "green"
    assert pick([prefix], H(x_tenant="acme")) is None

    regex = spec(name="r", header="user-agent", regex=r"^canary/\d+$", backend="purple")
    assert pick([regex], H(user_agent="canary/42")) == "purple"
    assert pick([regex], H(user_agent="canary/x")) is None
    found = spec(name="f", header="user-agent", regex="bot", backend="purple")
    assert pick([found], H(user_agent="a bot here")) == "purple"  # anywhere unless anchored

    one_of = spec(name="o", query="model-variant", one_of=["c", "d"], backend="purple")
    assert one_of.value == ("c", "d")
    assert pick([one_of], target="/x?a=1&model-variant=d") == "purple"
    assert pick([one_of], target="/x?model-variant=e") is None
    assert pick([one_of], target="/x") is None

    cookie = spec(name="beta", cookie="beta", exact=1, backend="green")  # YAML's 1 is "1"
    assert cookie.value == "1"
    assert pick([cookie], H(cookie='session=abc; beta="1"')) == "green"
    assert pick([cookie], H(cookie="session=abc; beta=0")) is None
    assert pick([cookie], H(cookie="nobeta=1")) is None


def test_query_and_cookie_reading_agree_with_the_standard_parsers() -> None:
    from urllib.parse import parse_qsl

    from gateway.rules import _cookies, _query

    for query in ("a=1&b=2", "a=1&a=2", "a&b=", "x=%2Fp%C3%A9+q&y=a+b", "&&a=1&", "",
                  "a=1=2", "%61=1", "a=%ZZ"):
        target = "/p?" + query
        first: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            first.setdefault(name, value)
        assert _query(target, 2) == first, query
    assert _query("/p", -1) == {}
    header = 'a=1; b="two"; c; =x; a=3; d = 4 '
    assert _cookies(header, frozenset({"a", "b", "c", "d"})) == {"a": "1", "b": "two",
                                                                "d": "4"}
    assert _cookies(header, frozenset({"b"})) == {"b": "two"}


def test_repeated_headers_the_first_value_counts() -> None:
    rule = spec(name="a", header="x-tenant", exact="acme", backend="green")
    assert pick([rule], H(x_tenant="acme") + H(x_tenant="other")) == "green"
    assert pick([rule], H(x_tenant="other") + H(x_tenant="acme")) is None


def test_body_rules_wait_for_the_body_then_read_json_fields() -> None:
    tier = spec(name="gold", body="parameters.tier", one_of=["gold", "platinum"],
                backend="green")
    big = spec(name="big", body="inputs[0].shape[0]", exact=8, backend="purple")
    flag = spec(name="flag", body="parameters.beta", exact=True, backend="purple")
    header = spec(name="h", header="x-tenant", exact="acme", backend="blue")
    rules = [header, tier, big, flag]
    # Before the body is read: rules up to the first body rule, then where to go on from.
    assert pick(rules, H(x_tenant="acme")) == "blue"
    assert pick(rules, H(x_tenant="other")) == 1
    doc = {"parameters": {"tier": "gold"}, "inputs": [{"shape": [8, 4]}]}
    assert pick(rules, body=orjson.dumps(doc)) == "green"
    assert pick(rules, body=orjson.dumps({"inputs": [{"shape": [8, 4]}]})) == "purple"
    assert pick(rules, body=b'{"parameters": {"beta": true}}') == "purple"
    for nothing in (None, b"", b"not json", b'{"parameters": {"tier": null}}',
                    b'{"parameters": {"tier": ["gold"]}}', b"[1, 2]"):
        assert pick(rules, body=nothing) is None, nothing


def test_first_match_wins_and_hits_are_counted_on_the_target() -> None:
    bs = backends("blue", "green", "purple")
    rules = [spec(name="one", header="x-a", exact="1", backend="green"),
             spec(name="two", header="x-b", regex=".", backend="purple")]
    compiled = compile_rules(rules, bs)
    assert compiled is not None and compiled.names() == ["one", "two"]
    assert not compiled.needs_body
    both = H(x_a="1", x_b="y")
    for _ in range(3):
        hit = compiled.pick(both, "/", -1)
        assert hit is bs["green"]
    assert compiled.pick(H(x_b="y"), "/", -1) is bs["purple"]
    assert bs["green"].stats.counter_totals == {"rule:one": 3.0}
    assert hit_totals(b.stats for b in bs.values()) == {"one": 3.0, "two": 1.0}
    assert compile_rules([], bs) is None  # a route without rules pays one check


@pytest.mark.parametrize(("doc", "where", "why"), [
    ({"header": "x", "exact": "a", "backend": "green"}, "name", "required"),
    ({"name": "n", "exact": "a", "backend": "green"}, "(top)", "exactly one of 'header'"),
    ({"name": "n", "header": "x", "cookie": "c", "exact": "a", "backend": "green"}, "(top)",
     "exactly one of 'header'"),
    ({"name": "n", "header": "x", "backend": "green"}, "(top)", "exactly one of 'exact'"),
    ({"name": "n", "header": "x", "exact": "a", "prefix": "b", "backend": "green"}, "(top)",
     "exactly one of 'exact'"),
    ({"name": "n", "header": "x", "regex": "(unclosed", "backend": "green"}, "regex",
     "not a valid regular expression"),
    ({"name": "n", "body": "inputs[*].data", "exact": "a", "backend": "green"}, "body",
     "no [*]"),
    ({"name": "n", "body": "in puts", "exact": "a", "backend": "green"}, "body",
     "not a JSON path"),
    ({"name": "n", "header": "x", "one_of": [], "backend": "green"}, "one_of", ""),
    ({"name": "n", "header": "x", "exact": "", "backend": "green"}, "exact", "non-empty"),
    ({"name": "n", "header": "x", "exact": {"a": 1}, "backend": "green"}, "exact", ""),
    ({"name": "n", "header": "x", "exact": "a", "backend": "green", "op": "eq"}, "op",
     "unknown key"),
])
def test_a_bad_rule_is_an_error_naming_its_key(doc: dict[str, Any], where: str,
                                               why: str) -> None:
    from pydantic import TypeAdapter

    with pytest.raises(ConfigError) as info:
        validate(TypeAdapter(RuleConfig), doc)
    assert info.value.path == where and why in info.value.problem


def test_rules_in_the_state_document_round_trip() -> None:
    rules = (spec(**ACME), spec(name="v", query="variant", one_of=["a", "b"],
                                backend="purple"))
    state = RouteState(live="blue", rules=rules)
    doc = orjson.loads(orjson.dumps(state.to_json()))
    assert doc["rules"][0] == ACME
    assert doc["rules"][1] == {"name": "v", "query": "variant", "one_of": ["a", "b"],
                               "backend": "purple"}
    assert RouteState.from_json(doc) == state
    assert RouteState.from_json({"live": "blue"}).rules == ()  # a document from before rules
    assert condition_text(doc["rules"][1]) == "query variant one-of a, b"
    assert change_summary({**doc, "rules": []}, doc) == "rules none→acme,v"


def test_the_rules_cost_script_times_what_it_claims() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "loadtest" / "rules_cost.py"
    loaded = importlib.util.spec_from_file_location("rules_cost", path)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    acme = [*module.HEADERS, (b"X-Tenant", b"acme")]
    # `timed` checks each case's pick before timing it: the 5 rules really are evaluated.
    found = module.timed([("none", module.build([]), module.HEADERS, "blue"),
                          ("miss", module.build(module.RULES), module.HEADERS, "blue"),
                          ("hit", module.build(module.RULES), acme, "green")], 10, 1)
    assert set(found) == {"none", "miss", "hit"} and all(v > 0 for v in found.values())


# -- config --------------------------------------------------------------------------------------
def config(**route: Any) -> dict[str, Any]:
    return classifier_config("http://127.0.0.1:1", "http://127.0.0.1:2", **route)


def test_config_rules_are_checked_with_their_key_path() -> None:
    cfg = parse_config(config(rules=[ACME, {"name": "beta", "cookie": "beta", "exact": 1,
                                            "backend": "green"}]))
    assert [r.spec().name for r in cfg.routes[0].rules] == ["acme", "beta"]
    for rules, where, why in [
        ([{**ACME, "backend": "purple"}], "routes[0].rules[0].backend", "unknown backend"),
        ([ACME, ACME], "routes[0].rules[1].name", "duplicate rule name"),
        ([{**ACME, "regex": "a(", "exact": None}], "routes[0].rules[0].regex",
         "not a valid regular expression"),
        ([{**ACME, "name": f"r{i}"} for i in range(65)], "routes[0].rules", "at most 64"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(config(rules=rules))
        assert info.value.path == where and why in info.value.problem, info.value


# -- admin API -----------------------------------------------------------------------------------
async def test_admin_rules_put_get_audit_and_refusals(blue: ModelServer,
                                                      green: ModelServer) -> None:
    cfg = classifier_config(blue.url, green.url)
    cfg["admin"]["tokens"] = {"ci": {"token": "viewer-token-0123456789", "role": "viewer"}}
    async with running_gateway(cfg) as gw:
        r = await gw.admin.get(RULES_PATH)
        assert r.status_code == 200 and r.json() == {"route": ROUTE, "version": 1, "rules": []}
        r = await gw.admin.put(RULES_PATH, json={"rules": [ACME], "reason": "acme trial"})
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["version"] == 2
        assert view["rules"] == [{**ACME, "hits": {"1m": 0.0, "15m": 0.0}}]
        assert (await gw.admin.get(f"/admin/routes/{ROUTE}")).json()["rules"] == [ACME]
        events = (await gw.admin.get("/admin/events", params={"route": ROUTE})).json()["events"]
        last = events[-1]
        assert (last["action"], last["actor"], last["reason"], last["role"]) == (
            "rules", "admin", "acme trial", "operator")
        assert last["before"]["rules"] == [] and last["after"]["rules"] == [ACME]

        # Bad input: a JSON 400 naming the key path, and nothing changes.
        for body, where in [
            ({"rules": [{**ACME, "backend": "purple"}]}, "rules[0].backend: unknown backend"),
            ({"rules": [{**ACME, "regex": "(", "exact": None}]}, "rules[0].regex: not a valid"),
            ({"rules": [ACME, ACME]}, "rules[1].name: duplicate rule name"),
            ({"rules": "acme"}, "rules: expected a list"),
            ({}, "missing field 'rules'"),
        ]:
            r = await gw.admin.put(RULES_PATH, json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "invalid_request"
            assert r.json()["message"].startswith(where), r.json()
        r = await gw.admin.put("/admin/routes/nope/rules", json={"rules": []})
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = await gw.admin.put(RULES_PATH, json={"rules": []},
                               headers={"Authorization": "Bearer viewer-token-0123456789"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert gw.gateway.control.state(ROUTE).version == 2
        assert [r.name for r in gw.gateway.control.state(ROUTE).rules] == ["acme"]
        paths = (await gw.admin.get("/admin/openapi.json")).json()["paths"]
        assert set(paths["/admin/routes/{route}/rules"]) == {"get", "put"}

        # Clearing is a change like any other: audited, applied.
        r = await gw.admin.put(RULES_PATH, json={"rules": []})
        assert r.status_code == 200 and r.json()["rules"] == []
        assert gw.gateway.table.by_name[ROUTE].rules is None


# -- end to end, both proxy servers --------------------------------------------------------------


@pytest.fixture
async def purple() -> AsyncIterator[ModelServer]:
    """A third backend (the demo has two model versions: told apart by the gateway's count
    of what each backend served)."""
    async with model_server("v1") as found:
        yield found


def served(gw: RunningGateway, backend: str) -> int:
    return sum(gw.gateway.recorder.stats(ROUTE, backend).status_totals)


async def version_of(client: httpx.AsyncClient, user: str | None = None,
                     body: bytes | Any = BODY, target: str = INFER, **headers: str) -> str:
    if user is not None:
        headers["x-user-id"] = user
    r = await client.post(target, content=body, headers={"content-type": "application/json",
                                                         **headers})
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


async def test_acme_goes_to_green_at_weight_0_while_others_stay_sticky_on_their_split(
    server: str, blue: ModelServer, green: ModelServer, purple: ModelServer,
) -> None:
    cfg = classifier_config(blue.url, green.url, canary={"backend": "green", "weight": 0})
    cfg["routes"][0]["backends"]["purple"] = {"url": purple.url}
    async with running_gateway(cfg) as gw:
        users = [f"user-{i}" for i in range(24)]
        before = {u: await version_of(gw.client, u) for u in users}
        assert set(before.values()) == {"v1"}  # weight 0: everyone on blue
        r = await gw.admin.put(RULES_PATH, json={"rules": [
            ACME,
            {"name": "beta", "cookie": "beta", "exact": 1, "backend": "green"},
            {"name": "variant", "query": "model-variant", "one_of": ["c"], "backend": "purple"},
        ], "reason": "acme on v2"})
        assert r.status_code == 200, r.text
        # acme users go to green whoever they are, with the canary at weight 0
        for u in users[:10]:
            assert await version_of(gw.client, u, **{"x-tenant": "acme"}) == "v2"
        assert await version_of(gw.client, None, **{"x-tenant": "acme"}) == "v2"
        assert await version_of(gw.client, "user-1", cookie="a=b; beta=1") == "v2"
        assert await version_of(gw.client, "user-1",
                                target=INFER + "?model-variant=c") == "v1"
        assert served(gw, "purple") == 1
        assert await version_of(gw.client, "user-1", **{"x-tenant": "other"}) == "v1"
        assert served(gw, "purple") == 1
        # The others keep their split, and stay sticky as the canary grows.
        assert {u: await version_of(gw.client, u) for u in users} == before
        r = await gw.admin.put(f"/admin/routes/{ROUTE}/canary",
                               json={"backend": "green", "weight": 50})
        assert r.status_code == 200, r.text
        route = gw.gateway.table.by_name[ROUTE]
        first = {u: await version_of(gw.client, u) for u in users}
        assert first == {u: "v2" if route.pick(u).name == "green" else "v1" for u in users}
        assert {"v1", "v2"} == set(first.values())
        assert {u: await version_of(gw.client, u) for u in users} == first
        # A switch does not move rule traffic: rules keep pointing to their backend.
        r = await gw.admin.post(f"/admin/routes/{ROUTE}/switch", json={"to": "green",
                                                                        "force": True})
        assert r.status_code == 200, r.text
        assert await version_of(gw.client, "user-1",
                                target=INFER + "?model-variant=c") == "v1"
        assert served(gw, "purple") == 2
        # Hits: the API, Prometheus and the dashboard.
        hits = (await gw.admin.get(RULES_PATH)).json()["rules"]
        assert [(h["name"], h["hits"]["1m"]) for h in hits] == [
            ("acme", 11.0), ("beta", 1.0), ("variant", 2.0)]
        metrics = (await gw.admin.get("/metrics")).text
        assert 'modelgate_rule_hits_total{route="classifier",rule="acme"} 11.0' in metrics
        assert 'modelgate_rule_hits_total{route="classifier",rule="variant"} 2.0' in metrics
        ruled = {b: gw.gateway.recorder.stats(ROUTE, b).counter_totals.get(RULED_REQUESTS)
                 for b in ("blue", "green", "purple")}
        assert ruled == {"blue": None, "green": 12.0, "purple": 2.0}

        async def dashboard_hits() -> bool:  # whole seconds only: wait for the last one
            data = (await gw.admin.get("/admin/dashboard/data",
                                       params={"minutes": 2, "step": 1})).json()
            rows = {r["name"]: r for r in data["routes"][0]["rules"]}
            return bool(rows["acme"]["hits"] == 11 and sum(
                v for v in rows["acme"]["series"] if v is not None) == 11)

        await wait_for(dashboard_hits, timeout=5, interval=0.2,
                       message="the dashboard to show the rule hits")


async def test_body_rules_on_small_chunked_and_non_json_bodies(
    server: str, blue: ModelServer, green: ModelServer,
) -> None:
    cfg = classifier_config(blue.url, green.url, rules=[
        {"name": "gold", "body": "parameters.tier", "exact": "gold", "backend": "green"}])
    async with running_gateway(cfg) as gw:
        gold = orjson.dumps({**infer_body(ROW), "parameters": {"tier": "gold"}})
        silver = orjson.dumps({**infer_body(ROW), "parameters": {"tier": "silver"}})
        assert await version_of(gw.client, "u", body=gold) == "v2"  # whole: the fast path
        assert await version_of(gw.client, "u", body=silver) == "v1"

        async def chunks(data: bytes) -> AsyncIterator[bytes]:  # no Content-Length
            for i in range(0, len(data), 16):
                yield data[i:i + 16]
                await asyncio.sleep(0)

        assert await version_of(gw.client, "u", body=chunks(gold)) == "v2"
        assert await version_of(gw.client, "u", body=chunks(silver)) == "v1"
        # A body that is not JSON matches no body rule; the backend answers as it would.
        r = await gw.client.post(INFER, content=b"gold", headers={"x-user-id": "u"})
        assert r.status_code == 400 and r.headers["x-model-version"] == "v1"
        r = await gw.client.get("/v2/models/classifier", headers={"x-user-id": "u"})
        assert r.status_code == 200 and r.headers["x-model-version"] == "v1"  # no body
        assert gw.gateway.recorder.stats(ROUTE, "green").counter_totals["rule:gold"] == 2
        # Rule-routed requests are marked for the sequential test to leave out (both paths).
        green = gw.gateway.recorder.stats(ROUTE, "green").counter_totals
        assert (green[RULED_REQUESTS], green[RULED_ERRORS]) == (2, 0)
        assert RULED_REQUESTS not in gw.gateway.recorder.stats(ROUTE, "blue").counter_totals


# -- CLI -----------------------------------------------------------------------------------------
async def test_cli_show_set_clear(blue: ModelServer, green: ModelServer, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        args = ["--admin", gw.admin_url, "--token", TOKEN]

        async def cli(*argv: str) -> int:
            return await asyncio.to_thread(main, list(argv))

        rules_file = tmp_path / "rules.yaml"
        rules_file.write_text("rules:\n  - {name: beta, cookie: beta, exact: 1, "
                              "backend: green}\n")
        assert await cli("rules", "set", ROUTE, "--file", str(rules_file), *args) == 0
        assert await cli("rules", "set", ROUTE, "--name", "acme", "--header", "x-tenant",
                         "--one-of", "acme,acme-eu", "--backend", "green", "--reason", "trial",
                         *args) == 0
        capsys.readouterr()
        assert await cli("rules", "show", ROUTE, *args) == 0
        out = capsys.readouterr().out
        assert "cookie beta exact 1" in out and "header x-tenant one-of acme, acme-eu" in out
        assert [r.name for r in gw.gateway.control.state(ROUTE).rules] == ["beta", "acme"]
        assert await cli("status", ROUTE, *args) == 0
        assert "rules beta, acme" in capsys.readouterr().out  # green's role
        assert await version_of(gw.client, "u", **{"x-tenant": "acme-eu"}) == "v2"
        # Same name: replaced in place; --json prints the API's answer.
        assert await cli("rules", "set", ROUTE, "--name", "beta", "--cookie", "beta",
                         "--exact", "2", "--backend", "green", "--json", *args) == 0
        shown = orjson.loads(capsys.readouterr().out)
        assert [r["name"] for r in shown["rules"]] == ["beta", "acme"]
        assert shown["rules"][0]["exact"] == "2"
        # Refusals: one line on stderr, non-zero, nothing changed.
        assert await cli("rules", "set", ROUTE, "--name", "x", "--header", "h", "--exact", "1",
                         "--backend", "purple", *args) == 1
        assert "unknown backend 'purple'" in capsys.readouterr().err
        assert await cli("rules", "set", ROUTE, "--name", "x", *args) == 2
        assert await cli("rules", "clear", ROUTE, "--reason", "over", *args) == 0
        assert gw.gateway.control.state(ROUTE).rules == ()
        events = (await gw.admin.get("/admin/events")).json()["events"]
        assert [e["action"] for e in events if e["action"] == "rules"] == ["rules"] * 4
        capsys.readouterr()
        assert await cli("events", *args) == 0
        assert "rules beta,acme→none" in capsys.readouterr().out


# -- two processes sharing Redis -----------------------------------------------------------------
async def test_a_rule_put_on_one_process_is_applied_by_the_other(
    blue: ModelServer, green: ModelServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    cfg = classifier_config(blue.url, green.url, store=redis_server.url,
                            canary={"backend": "green", "weight": 0})
    one, two = GatewayProcess(cfg, tmp_path, "one"), GatewayProcess(cfg, tmp_path, "two")
    try:
        await asyncio.gather(one.start(), two.start())  # side by side: half the wait
        async with admin_client(one) as admin_one, admin_client(two) as admin_two, \
                httpx.AsyncClient(base_url=two.url, timeout=10) as proxy_two:
            assert await version_of(proxy_two, "u", **{"x-tenant": "acme"}) == "v1"
            r = await admin_one.put(RULES_PATH, json={"rules": [ACME], "reason": "trial"})
            assert r.status_code == 200, r.text
            version = r.json()["version"]

            async def applied() -> bool:
                view = (await admin_two.get(f"/admin/routes/{ROUTE}")).json()
                return bool(view["version"] == version and view["rules"] == [ACME])

            await wait_for(applied, timeout=5, message="the other process to apply the rule")
            assert await version_of(proxy_two, "u", **{"x-tenant": "acme"}) == "v2"
            assert await version_of(proxy_two, "u") == "v1"
            events = (await admin_two.get("/admin/events")).json()["events"]
            assert [e["action"] for e in events][-1] == "rules"
    finally:
        one.close()
        two.close()
