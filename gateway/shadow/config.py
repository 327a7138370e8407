"""Shadow section of a route's config (stub: filled in by the shadow-mode work)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ConfigError
from gateway.schema import Node


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    backend: str | None = None
    sample: float = 0.0
    timeout: float = 5.0


def parse_shadow(node: Node, backends: set[str]) -> ShadowConfig:
    backend = node.str("backend", None)
    if backend is not None and backend not in backends:
        raise ConfigError(node.key_path("backend"), f"unknown backend {backend!r}")
    config = ShadowConfig(
        backend=backend,
        sample=node.number("sample", 100.0 if backend else 0.0, lo=0, hi=100),
        timeout=node.duration("timeout", 5.0),
    )
    node.done()
    return config
