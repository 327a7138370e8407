"""Match rules of a route: read them with their recent hits, replace them (audited)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from gateway.admin.endpoint import Call, Endpoint
from gateway.admin.models import RULES, RulesChange, RulesView
from gateway.component import Host
from gateway.rules import HIT_PREFIX

HIT_WINDOWS = (("1m", 60.0), ("15m", 900.0))


def rule_hits(host: Host, route: str) -> dict[str, dict[str, float]]:
    """Hits per rule of `route` over the last minute and 15 minutes, summed over the route's
    backends (a rule may have changed target); with the Redis store, every process's."""
    cfg = host.control.route_config(route)
    state = host.control.state(route)
    views = [host.metrics.backend(route, b) for b in cfg.backends]
    out: dict[str, dict[str, float]] = {}
    for label, seconds in HIT_WINDOWS:
        windows = [v.window(seconds) for v in views]
        for rule in state.rules:
            key = HIT_PREFIX + rule.name
            out.setdefault(rule.name, {})[label] = sum(w.counter(key) for w in windows)
    return out


def rules_view(host: Host, route: str) -> dict[str, Any]:
    state = host.control.state(route)
    hits = rule_hits(host, route)
    return {"route": route, "version": state.version,
            "rules": [{**rule.to_json(), "hits": hits[rule.name]} for rule in state.rules]}


def endpoints(host: Host) -> list[Endpoint]:
    async def get_rules(call: Call) -> Any:
        return rules_view(host, call.route)

    async def put_rules(call: Call) -> Any:
        body: RulesChange = call.body
        await host.control.set_rules(call.route, tuple(r.spec() for r in body.rules),
                                     actor=call.actor, reason=body.reason)
        return rules_view(host, call.route)

    path = "/admin/routes/{route}/rules"
    view = TypeAdapter(RulesView)
    return [
        Endpoint("GET", path, "The route's match rules, in order, with their recent hits",
                 get_rules, response=view),
        Endpoint("PUT", path, "Replace the route's match rules ([] clears them); rules are "
                 "evaluated before the weighted split, the first match decides", put_rules,
                 body=RULES, response=view, errors=(409, 503)),
    ]
