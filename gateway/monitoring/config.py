"""Probe and alarm config (stub: filled in by the monitoring work)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.schema import Node


@dataclass(frozen=True, slots=True)
class ProbesConfig:
    sample: float = 1.0


@dataclass(frozen=True, slots=True)
class AlarmRule:
    name: str


def parse_probes(node: Node) -> ProbesConfig:
    config = ProbesConfig(sample=node.number("sample", 1.0, lo=0, hi=1))
    node.done()
    return config


def parse_alarms(items: list[Any], path: str, routes: dict[str, Any]) -> list[AlarmRule]:
    return []
