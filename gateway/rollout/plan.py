"""Rollout plan (stub: filled in by the progressive-delivery work)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.schema import Node


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    backend: str


def parse_plan(node: Node, backends: set[str]) -> RolloutPlan:
    plan = RolloutPlan(backend=node.str("backend"))
    node.done()
    return plan
