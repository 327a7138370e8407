"""A route's live routing state: the one thing operators and the controller change at run time.

The config file gives each route's starting state; from then on the store holds the truth and
every change is a compare-and-set on `version` plus an audit event.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from gateway.logs import utc_text

WEIGHT_SCALE = 100  # weight percent × 100 = buckets out of 10,000 (0.01% resolution)
BUCKETS = 100 * WEIGHT_SCALE


def weight_problem(value: Any, minimum: float = 0.0) -> str | None:
    """Why `value` is not a traffic share (percent, in 0.01 steps), or None when it is one.

    One rule for the config file, the admin API and rollout plans; each says it its way."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"expected a number, got {value!r}"
    if not minimum <= value <= 100:
        return f"must be a number from {minimum:g} to 100, got {value!r}"
    scaled = value * WEIGHT_SCALE
    if abs(round(scaled) - scaled) > 1e-6 or 0 < value < 1 / WEIGHT_SCALE:
        return f"resolution is 0.01, got {value!r}"
    return None


RULE_SOURCES = ("header", "cookie", "query", "body")
RULE_OPS = ("exact", "prefix", "regex", "one_of")


@dataclass(frozen=True, slots=True)
class Rule:
    """A match rule as a route's state holds it: if the request's `source` `key` (a header,
    cookie or query parameter name, or a JSON path into the body) matches `value` by `op`,
    the request goes to `backend`. Checked and compiled by `gateway.rules`; its JSON form is
    the document's (``{"name", "header": "x-tenant", "exact": "acme", "backend"}``)."""

    name: str
    backend: str
    source: str  # one of RULE_SOURCES
    key: str
    op: str  # one of RULE_OPS
    value: str | tuple[str, ...]  # a tuple for one_of

    def to_json(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"name": self.name, self.source: self.key, self.op: value,
                "backend": self.backend}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rule:
        """From the document form as stored (already validated when it was written)."""
        source = next(s for s in RULE_SOURCES if s in data)
        op = next(o for o in RULE_OPS if o in data)
        value = data[op]
        return cls(str(data["name"]), str(data["backend"]), source, str(data[source]), op,
                   tuple(value) if isinstance(value, list | tuple) else str(value))


@dataclass(frozen=True, slots=True)
class RouteState:
    live: str
    previous: str | None = None
    canary: str | None = None
    canary_weight: float = 0.0
    shadow: str | None = None
    shadow_sample: float = 0.0
    version: int = 0
    # Match rules, in order, evaluated before the weighted split (gateway/rules.py).
    rules: tuple[Rule, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rules"] = [rule.to_json() for rule in self.rules]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouteState:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "rules" in fields:
            fields["rules"] = tuple(Rule.from_json(r) for r in fields["rules"] or ())
        return cls(**fields)

    def evolve(self, **changes: Any) -> RouteState:
        return replace(self, **changes)

    def traffic(self) -> dict[str, float]:
        """Share of traffic per backend, in percent."""
        share = {self.live: 100.0}
        if self.canary and self.canary_weight > 0:
            share[self.canary] = self.canary_weight
            share[self.live] = 100.0 - self.canary_weight
        return share


OPERATOR = "operator"
VIEWER = "viewer"


class Actor(str):
    """An admin token's name (what the audit log's `actor` is) that also carries the token's
    role. A `str`, so it goes through every ``actor: str`` parameter unchanged, and the
    control plane writes `role` into the audit event; the controllers' own actors are plain
    strings (role None)."""

    role: str

    def __new__(cls, name: str, role: str) -> Actor:
        actor = super().__new__(cls, name)
        actor.role = role
        return actor

    def __reduce__(self) -> tuple[Any, ...]:  # copies and pickles keep the role
        return Actor, (str(self), self.role)


def role_of(actor: str) -> str | None:
    """The role of an admin token's `actor`; None for the controllers' own actors."""
    return actor.role if isinstance(actor, Actor) else None


@dataclass(frozen=True, slots=True)
class Event:
    """One audited state change: who did what, to which route, from what to what, and why."""

    id: int
    time: float
    route: str | None
    actor: str
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None = None
    # The admin token's role ("operator"); None for the controllers' events and for events
    # stored before roles existed.
    role: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["timestamp"] = utc_text(self.time)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
