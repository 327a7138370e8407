"""Concurrency gates: at most N requests in flight per route and per backend.

A request over a gate's limit is refused at once (503 + Retry-After): nothing queues, so
an admitted request waits only for its backend. The counts are this process's; with
several workers each enforces its own share.
"""

from __future__ import annotations

from gateway.resilience.config import Limits


class Gate:
    __slots__ = ("limit", "retry_after", "retry_after_header", "count", "rejected")

    def __init__(self, limits: Limits) -> None:
        self.limit = limits.max_concurrency
        self.retry_after = limits.retry_after
        self.retry_after_header = b"%d" % limits.retry_after
        self.count = 0
        self.rejected = 0  # total refusals, for the metrics

    def full(self) -> bool:
        return self.count >= self.limit


def gate(limits: Limits | None) -> Gate | None:
    return Gate(limits) if limits is not None else None


def admit(route_gate: Gate | None, backend_gate: Gate | None) -> Gate | None:
    """Count a request into the route's and the backend's gates; or, when one is full,
    count a refusal there and return it (nothing else changes)."""
    if route_gate is not None and route_gate.count >= route_gate.limit:
        route_gate.rejected += 1
        return route_gate
    if backend_gate is not None and backend_gate.count >= backend_gate.limit:
        backend_gate.rejected += 1
        return backend_gate
    if route_gate is not None:
        route_gate.count += 1
    if backend_gate is not None:
        backend_gate.count += 1
    return None


def force(route_gate: Gate | None, backend_gate: Gate | None) -> None:
    """Count a request into gates whatever their limit (it was admitted before: the fast
    path's exchange handed on, or a fallback moving to live)."""
    if route_gate is not None:
        route_gate.count += 1
    if backend_gate is not None:
        backend_gate.count += 1


def full(route_gate: Gate | None, backend_gate: Gate | None) -> bool:
    """Whether `admit` would refuse (nothing counted)."""
    return (route_gate is not None and route_gate.count >= route_gate.limit) or (
        backend_gate is not None and backend_gate.count >= backend_gate.limit)


def leave(route_gate: Gate | None, backend_gate: Gate | None) -> None:
    """The request counted by `admit` is over."""
    if route_gate is not None:
        route_gate.count -= 1
    if backend_gate is not None:
        backend_gate.count -= 1


__all__ = ["Gate", "admit", "force", "full", "gate", "leave"]
