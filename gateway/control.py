"""The control plane: the only code that changes routing state.

The admin API, the CLI (through the API) and the rollout controller all call these methods.
Each one is a compare-and-set loop on the route's document in the store followed by an audit
event, so concurrent writers never lose each other's changes and every change is explained.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import GatewayConfig, RouteConfig
from gateway.errors import Conflict, InvalidRequest, NotFound, StoreError, VersionConflict
from gateway.rules import check_rules
from gateway.state import Event, RouteState, Rule, role_of, weight_problem
from gateway.store import Fence, Store

log = logging.getLogger("modelgate.control")
ROUTE_KEY = "route/"
CAS_ATTEMPTS = 20

Listener = Callable[[str, RouteState], None]
EventListener = Callable[[Event], None]
# (route, actor, stop): awaited before an operator's canary change (stop=False) or rollback
# (stop=True) is written; the rollout component pauses or aborts its rollout here.
ManualChangeListener = Callable[[str, str, bool], Awaitable[None]]


def route_key(name: str) -> str:
    return ROUTE_KEY + name


class ControlPlane:
    def __init__(self, config: GatewayConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self._routes = {r.name: r for r in config.routes}
        self._states: dict[str, RouteState] = {}
        self._listeners: list[Listener] = []
        self._event_listeners: list[EventListener] = []
        self._manual_listeners: list[ManualChangeListener] = []
        store.watch(self._on_store_change)
        store.on_reset(self._reseed)

    # -- reading -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Seed each route's state from config where the store has none yet."""
        for route in self.config.routes:
            initial = RouteState(
                live=route.live,
                canary=route.canary,
                canary_weight=route.canary_weight if route.canary else 0.0,
                shadow=route.shadow.backend if route.shadow else None,
                shadow_sample=route.shadow.sample if route.shadow and route.shadow.backend else 0.0,
                rules=tuple(rule.spec() for rule in route.rules),
            )
            found = await self.store.read(route_key(route.name))
            if found is None:
                try:
                    await self.store.write(route_key(route.name), initial.to_json(), 0)
                except VersionConflict:
                    pass  # another replica seeded it first
                found = await self.store.read(route_key(route.name))
            if found is not None:
                self._accept(route.name, found[0], found[1])

    async def _reseed(self) -> None:
        """The store lost its data (a Redis restarted without persistence): write back the
        state this process routes on, so traffic stays where it is rather than jumping back
        to the config's starting state; the first replica to write wins, the others take its
        copy. Versions start again at 1, so the old ones are forgotten first."""
        failed: StoreError | None = None
        for name, state in list(self._states.items()):
            self._states[name] = state.evolve(version=0)
            event = _event_doc(name, "gateway", "reseed", None, state.to_json(),
                               "the store lost its data; seeded from the last routing state")
            try:
                try:
                    await self.store.commit(route_key(name), state.evolve(version=0).to_json(),
                                            0, event)
                except VersionConflict:
                    pass  # another process seeded it first (or the store has a copy): take it
                found = await self.store.read(route_key(name))
            except StoreError as exc:
                failed = exc  # go on with the other routes; the store runs the reset again
                continue
            if found is not None:
                self._accept(name, found[0], found[1])
        if failed is not None:
            raise failed
        log.warning("store lost its data: routing state seeded again",
                    extra={"event": "store_reseeded"})

    def route_config(self, name: str) -> RouteConfig:
        route = self._routes.get(name)
        if route is None:
            raise NotFound(f"no route named {name!r}")
        return route

    def state(self, name: str) -> RouteState:
        """The last state this process saw (what it routes on right now)."""
        self.route_config(name)
        return self._states[name]

    def states(self) -> dict[str, RouteState]:
        return dict(self._states)

    def find_state(self, name: str) -> RouteState | None:
        """The state this process routes on, or None for an unknown route (no copy)."""
        return self._states.get(name)

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_event(self, listener: EventListener) -> None:
        self._event_listeners.append(listener)

    def before_manual_change(self, listener: ManualChangeListener) -> None:
        """Call `listener` before an operator's canary change or rollback is written."""
        self._manual_listeners.append(listener)

    async def manual_change(self, name: str, actor: str, *, stop: bool = False) -> None:
        """Tell the listeners an operator is about to change `name` (`stop`: a rollback).
        The caller has validated the change (`preview`): a refused call reaches nobody."""
        for listener in self._manual_listeners:
            await listener(name, actor, stop)

    def _on_store_change(self, key: str, doc: dict[str, Any] | None, version: int) -> None:
        if key.startswith(ROUTE_KEY) and doc is not None:
            self._accept(key[len(ROUTE_KEY):], doc, version)

    def _accept(self, name: str, doc: dict[str, Any], version: int) -> None:
        if name not in self._routes:
            return
        old = self._states.get(name)
        if old is not None and old.version >= version:
            return
        state = RouteState.from_json(doc).evolve(version=version)
        self._states[name] = state
        for listener in self._listeners:
            try:
                listener(name, state)
            except Exception:
                log.exception("routing listener failed for route %s", name)

    # -- writing -----------------------------------------------------------------------------
    async def mutate(
        self,
        name: str,
        change: Callable[[RouteState, RouteConfig], RouteState],
        *,
        actor: str,
        action: str,
        reason: str | None = None,
        fence: Fence | None = None,
    ) -> RouteState:
        """Apply `change` with compare-and-set, retrying on a lost race; the change and its
        audit event are one atomic commit. `fence` (the controller's lease) makes a process
        that lost its lease fail with `LeaseLost` instead of writing.

        `change` validates against the current state and raises `InvalidRequest`/`Conflict`
        to refuse; then nothing is written.
        """
        route = self.route_config(name)
        for _ in range(CAS_ATTEMPTS):
            found = await self.store.read(route_key(name))
            if found is None:
                raise NotFound(f"route {name!r} has no state in the store")
            current = RouteState.from_json(found[0]).evolve(version=found[1])
            new = change(current, route)
            if new == current:
                return current
            after = new.evolve(version=current.version + 1).to_json()
            event = _event_doc(name, actor, action, current.to_json(), after, reason)
            try:
                version, stored = await self.store.commit(
                    route_key(name), new.evolve(version=0).to_json(), found[1], event,
                    fence=fence,
                )
            except VersionConflict:
                await asyncio.sleep(0)
                continue
            new = new.evolve(version=version)
            self._accept(name, new.to_json(), version)
            self._announce(Event.from_json(stored))
            return new
        raise Conflict(f"route {name!r} is changing too fast; try again")

    async def record(
        self,
        route: str | None,
        actor: str,
        action: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        reason: str | None = None,
    ) -> Event:
        """Append an audit event (also for things that are not state writes, e.g. alarms)."""
        stored = await self.store.append_event(
            _event_doc(route, actor, action, before, after, reason))
        event = Event.from_json(stored)
        self._announce(event)
        return event

    def _announce(self, event: Event) -> None:
        for listener in self._event_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    async def events(self, limit: int = 100, route: str | None = None,
                     since: int | None = None) -> list[Event]:
        return [Event.from_json(e) for e in await self.store.events(limit, route, since)]

    # -- the operations ------------------------------------------------------------------------
    async def set_canary(
        self, name: str, backend: str | None, weight: float, *, actor: str,
        reason: str | None = None, fence: Fence | None = None,
    ) -> RouteState:
        check_weight(weight, "weight")
        return await self.mutate(name, lambda state, route: canary_change(
            state, route, backend, weight), actor=actor, action="canary", reason=reason,
            fence=fence)

    def preview(self, name: str, change: Callable[[RouteState, RouteConfig], RouteState]
                ) -> RouteState:
        """Validate `change` against this process's current state without writing: callers
        with side effects of their own (pausing a rollout) refuse bad calls first."""
        return change(self.state(name), self.route_config(name))

    async def switch(
        self, name: str, to: str, *, actor: str, reason: str | None = None,
        fence: Fence | None = None,
    ) -> RouteState:
        """Blue-green: all traffic to `to` at once; the old live backend becomes the rollback
        target. Any canary split is cleared (the new live version takes everything)."""

        def change(state: RouteState, route: RouteConfig) -> RouteState:
            check_backend(route, to, "to")
            if to == state.live:
                if state.canary_weight == 0:
                    return state
                return state.evolve(canary=None, canary_weight=0.0)
            return state.evolve(live=to, previous=state.live, canary=None, canary_weight=0.0)

        return await self.mutate(name, change, actor=actor, action="switch", reason=reason,
                                 fence=fence)

    async def rollback(self, name: str, *, actor: str, reason: str | None = None) -> RouteState:
        """All traffic back to the last known-good version (see `rollback_change`)."""
        return await self.mutate(name, rollback_change, actor=actor, action="rollback",
                                 reason=reason)

    async def set_shadow(
        self, name: str, backend: str | None, sample: float, *, actor: str,
        reason: str | None = None,
    ) -> RouteState:
        def change(state: RouteState, route: RouteConfig) -> RouteState:
            if backend is None:
                return state.evolve(shadow=None, shadow_sample=0.0)
            check_backend(route, backend, "backend")
            check_weight(sample, "sample")
            if backend == state.live:
                raise InvalidRequest(f"backend {backend!r} is live; a shadow must be another one")
            return state.evolve(shadow=backend, shadow_sample=float(sample))

        action = "shadow" if backend is not None else "shadow_off"
        return await self.mutate(name, change, actor=actor, action=action, reason=reason)

    async def set_rules(
        self, name: str, rules: tuple[Rule, ...], *, actor: str, reason: str | None = None,
    ) -> RouteState:
        """Replace the route's match rules (an empty tuple clears them). Rules survive
        switches, rollbacks and rollouts: they are the operator's explicit intent."""

        def change(state: RouteState, route: RouteConfig) -> RouteState:
            if (why := check_rules(rules, set(route.backends))) is not None:
                raise InvalidRequest(why)
            return state.evolve(rules=rules)

        return await self.mutate(name, change, actor=actor, action="rules", reason=reason)


def _event_doc(route: str | None, actor: str, action: str, before: dict[str, Any] | None,
               after: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    return {"time": time.time(), "route": route, "actor": str(actor), "role": role_of(actor),
            "action": action, "before": before, "after": after, "reason": reason}


def canary_change(
    state: RouteState, route: RouteConfig, backend: str | None, weight: float
) -> RouteState:
    """Canary `backend` (default: the current one) at `weight` percent."""
    check_weight(weight, "weight")
    target = backend or state.canary
    if weight == 0 and target is None:
        return state.evolve(canary=None, canary_weight=0.0)
    if target is None:
        raise InvalidRequest("no canary backend given and none is set")
    check_backend(route, target, "backend")
    if target == state.live:
        raise InvalidRequest(f"backend {target!r} is already live; pick another")
    return state.evolve(canary=target, canary_weight=float(weight))


def rollback_change(state: RouteState, route: RouteConfig) -> RouteState:
    """With canary traffic flowing, the last known-good version is the live backend (canary
    weight → 0). Without, it is the previous live backend (undo the last switch)."""
    if state.canary and state.canary_weight > 0:
        return state.evolve(canary_weight=0.0)
    if state.previous is None:
        raise Conflict("nothing to roll back: no canary traffic and no previous backend")
    return state.evolve(live=state.previous, previous=state.live, canary=None,
                        canary_weight=0.0)


def check_backend(route: RouteConfig, backend: str, field: str) -> None:
    if backend not in route.backends:
        known = ", ".join(sorted(route.backends))
        raise InvalidRequest(
            f"{field}: unknown backend {backend!r} (route {route.name!r} has {known})"
        )


def check_weight(value: Any, field: str) -> None:
    problem = weight_problem(value)
    if problem is not None:
        raise InvalidRequest(f"{field}: {problem}")
