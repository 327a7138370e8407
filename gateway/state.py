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


@dataclass(frozen=True, slots=True)
class RouteState:
    live: str
    previous: str | None = None
    canary: str | None = None
    canary_weight: float = 0.0
    shadow: str | None = None
    shadow_sample: float = 0.0
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouteState:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

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
