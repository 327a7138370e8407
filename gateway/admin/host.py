"""What the admin API uses of the running gateway (`gateway.app.Gateway` is one).

A protocol, so the admin package never imports `gateway.app` (which starts it): the
dependency goes one way, app → admin → components."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from gateway.component import Host

if TYPE_CHECKING:
    from gateway.monitoring.component import Monitoring
    from gateway.record.component import Recordings
    from gateway.rollout.component import Rollouts
    from gateway.shadow.component import Shadowing


class AdminHost(Host, Protocol):
    tokens: dict[str, str]
    roles: dict[str, str]  # token name -> role; absent: operator
    ready: bool
    draining: bool
    member_id: str
    rollouts: Rollouts | None
    shadowing: Shadowing | None
    monitoring: Monitoring | None
    recordings: Recordings | None

    def member_info(self) -> dict[str, Any]: ...
