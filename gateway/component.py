"""What a feature component is, what it may use of the gateway, and how components meet.

A leaf of the import graph: `gateway.app` builds components, the components import only this
module (never `gateway.app`), and the admin package reads them through typed attributes.

- `Component`: the lifecycle and per-route tap every feature (shadow, rollout, monitoring)
  implements. Components own no HTTP: `gateway.admin` maps endpoints to their typed methods.
- `Host`: the parts of the running gateway a component may use (config, store, control plane,
  lease, recorder, metrics source, static routes, hooks). `gateway.app.Gateway` is one.
- `Hooks`: the typed meeting points between components. A component that offers something
  (shadow agreement, firing alarms, a guarded switch, details for the route view) sets or
  appends it here when it is built; a consumer reads the hook when it needs it, so neither
  knows the other's class or name, and a gateway without the provider simply has no hook.
  "Before a manual routing change" is a `ControlPlane` listener (`before_manual_change`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.cluster.lease import Lease
    from gateway.cluster.metrics import MetricsSource
    from gateway.config import GatewayConfig, RouteConfig
    from gateway.control import ControlPlane
    from gateway.metrics import Recorder
    from gateway.routing import StaticRoute, Tap
    from gateway.state import RouteState
    from gateway.store import Store


class Component(Protocol):
    """A feature living beside the proxy (shadow, rollout, monitoring).

    `tap()` is asked for each route whenever its routing state changes; a component that
    does not look at that route's traffic returns None, so the route pays nothing for it.
    """

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def tap(self, route: RouteConfig, state: RouteState) -> Tap | None: ...


# (route, seconds) → (pairs compared, agreement rate or None); KeyError: nothing to report.
ShadowAgreement = Callable[[str, float], tuple[int, float | None]]
# (route, backend or None) → names of the alarms firing about it now.
FiringAlarms = Callable[[str, str | None], list[str]]
# Every alarm rule with its state (dashboard).
AlarmsView = Callable[[], list[dict[str, Any]]]
# route → extra keys of ``GET /admin/routes/{route}`` (e.g. {"rollout": {...}}).
RouteDetails = Callable[[str], dict[str, Any]]


class Switcher(Protocol):
    """A blue-green switch with checks of its own (the rollout component's readiness check
    and bake); without one the admin API switches through the control plane directly."""

    def __call__(self, route: str, to: str, *, actor: str, force: bool = False,
                 bake: float | None = None, reason: str | None = None) -> Awaitable[None]: ...


class Hooks:
    """Typed meeting points between components (see the module docstring)."""

    def __init__(self) -> None:
        self.shadow_agreement: ShadowAgreement | None = None
        self.firing_alarms: FiringAlarms | None = None
        self.alarms: AlarmsView | None = None
        self.switch: Switcher | None = None
        self.route_details: list[RouteDetails] = []


class Host(Protocol):
    """What a component may use of the gateway that runs it."""

    config: GatewayConfig
    clock: Callable[[], float]
    store: Store
    lease: Lease
    control: ControlPlane
    recorder: Recorder
    metrics: MetricsSource
    static: dict[str, StaticRoute]
    hooks: Hooks

    def refresh_route(self, name: str) -> None:
        """Recompile route `name`'s snapshot: a component's tap for it changed (a recording
        started or ended)."""


ComponentFactory = Callable[[Any], Component]
