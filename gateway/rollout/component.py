"""The rollout component: progressive delivery driven from the gateway's own metrics.

- Rollout state is a JSON document per route in the store (``rollout/<route>``), written with
  compare-and-set, so operators, this process's scheduler and (later) another replica's
  controller never overwrite each other. A cache kept current by the store's watch callback
  answers `describe_route` and tells the scheduler what is active.
- Routing changes go through the `ControlPlane` only: the canary weight by
  ``set_canary(actor="controller")``, promotion by ``switch``, rollback by weight 0 (a canary)
  or a switch back (a bake). Each decision is also a ``rollout_*`` audit event with its
  numbers; a hold is recorded only when the check's verdict changes, so a long step does not
  flood the log.
- One scheduler task ticks every progressing rollout at its own check interval: analyse
  (`analysis.judge` over `analysis.Meter` windows), decide (`controller.advance`, pure), write,
  carry out.
- Sequential mode (`analysis: {mode: sequential}`): each check hands this process's new
  traffic since its last check (`Meter.batch`) to the test, whose evidence rides in the rollout
  document (`RolloutState.evidence`), so a new lease holder continues the same test.
- Guarded blue-green: `guarded_switch` (offered as `Hooks.switch`) checks the target's
  readiness first and can bake the
  switch (watch the same gates, switch back on failure).
- Webhooks: this component owns the `Notifier` (config ``webhooks:``), which gets every audit
  event of the gateway, not only rollout ones.
- Peers through typed hooks only: shadow agreement and firing alarms are read from
  `Hooks`; an operator's canary change or rollback reaches `on_manual_change` through the
  control plane's `before_manual_change` listeners. HTTP lives in `gateway.admin.routes.rollout`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client.core import GaugeMetricFamily, Metric

from gateway.component import Host
from gateway.config import RouteConfig
from gateway.control import check_backend
from gateway.errors import (
    AdminError,
    ConfigError,
    Conflict,
    InvalidRequest,
    LeaseLost,
    NotFound,
    StoreUnavailable,
    VersionConflict,
)
from gateway.notify import DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT, Notifier
from gateway.rollout.analysis import Analysis, Meter, judge, sequential_check
from gateway.rollout.controller import (
    ABORTED,
    BAKE,
    CANARY,
    PAUSED,
    PHASES,
    PROGRESSING,
    PROMOTED,
    Decision,
    RolloutState,
    advance,
)
from gateway.rollout.plan import PLAN_KEYS, RolloutPlan, parse_plan
from gateway.rollout.sequential import Evidence
from gateway.routing import Tap
from gateway.state import RouteState

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

log = logging.getLogger("modelgate.rollout")
ROLLOUT_KEY = "rollout/"
CONTROLLER = "controller"
CAS_ATTEMPTS = 20


def rollout_key(route: str) -> str:
    return ROLLOUT_KEY + route


class Rollouts:
    """Canary rollouts with automatic analysis, guarded blue-green, webhook notifications."""

    name = "rollout"

    def __init__(
        self,
        gateway: Host,
        *,
        notify_timeout: float = DEFAULT_TIMEOUT,
        notify_retries: int = DEFAULT_RETRIES,
        notify_backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self.gateway = gateway
        self.notifier: Notifier | None = None
        if gateway.config.webhooks:
            self.notifier = Notifier(gateway.config.webhooks, notify_timeout, notify_retries,
                                     backoff=notify_backoff)
            gateway.recorder.add_collector("webhooks", self.notifier.collect)
        # route -> (state, plan, version): the last rollout document seen for each route.
        self._docs: dict[str, tuple[RolloutState, RolloutPlan, int]] = {}
        self._meters: dict[str, tuple[float, Meter]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        gateway.store.watch(self._on_store_change)
        gateway.store.on_reset(self._reseed)
        # Only the controller lease holder ticks rollouts; gaining the lease wakes it.
        gateway.lease.on_change(lambda held: self._wake.set())
        gateway.recorder.add_collector("rollout", self._collect)
        gateway.control.before_manual_change(self.on_manual_change)
        gateway.hooks.switch = self.guarded_switch
        gateway.hooks.route_details.append(self.describe_route)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        for key, (doc, version) in (await self.gateway.store.read_all(ROLLOUT_KEY)).items():
            self._on_store_change(key, doc, version)
        if self.notifier is not None:
            self.gateway.control.on_event(self.notifier.offer)
            await self.notifier.start()
        self._task = asyncio.create_task(self._schedule(), name="rollout scheduler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # gather() re-raises if *we* are cancelled, and swallows only the task's own end.
            await asyncio.gather(task, return_exceptions=True)
        if self.notifier is not None:
            await self.notifier.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def tap(self, route: RouteConfig, state: RouteState) -> Tap | None:
        return None  # the gates read BackendStats, which the proxy fills anyway

    # -- the document cache ------------------------------------------------------------------
    def _on_store_change(self, key: str, doc: dict[str, Any] | None, version: int) -> None:
        if not key.startswith(ROLLOUT_KEY):
            return
        route = key[len(ROLLOUT_KEY):]
        if doc is None:
            self._docs.pop(route, None)
            self._wake.set()
            return
        cached = self._docs.get(route)
        if cached is not None and cached[2] >= version:
            return
        cfg = self.gateway.config.route(route)
        if cfg is None:
            return
        try:
            state = RolloutState.from_json(doc)
            if cached is not None and cached[1].to_json() == doc.get("plan"):
                plan = cached[1]
            else:
                plan = parse_plan(doc.get("plan") or {}, set(cfg.backends), "plan")
        except (ConfigError, TypeError) as exc:
            log.error("unreadable rollout document for route %s: %s", route, exc)
            return
        self._docs[route] = (state, plan, version)
        self._wake.set()

    async def _load(self, route: str) -> tuple[RolloutState, RolloutPlan, int] | None:
        found = await self.gateway.store.read(rollout_key(route))
        if found is None:
            return None
        self._on_store_change(rollout_key(route), found[0], found[1])
        cached = self._docs.get(route)
        if cached is None or cached[2] != found[1]:
            raise Conflict(f"rollout of route {route!r} is unreadable; see the gateway log")
        return cached

    async def _write(self, state: RolloutState, plan: RolloutPlan, expected: int, *,
                     fenced: bool = False) -> int:
        """CAS-write the rollout document; `fenced` (the controller's own writes): refused
        with `LeaseLost` once this process no longer holds the controller lease."""
        doc = {**state.to_json(), "plan": plan.to_json()}
        fence = self.gateway.lease.fence if fenced else None
        version = await self.gateway.store.write(rollout_key(state.route), doc, expected,
                                                 fence=fence)
        self._on_store_change(rollout_key(state.route), doc, version)
        return version

    async def _reseed(self) -> None:
        """The store lost its data: write back the rollouts this process knows."""
        for route, (state, plan, _) in list(self._docs.items()):
            self._docs[route] = (state, plan, 0)
            try:
                await self._write(state, plan, 0)
            except VersionConflict:
                pass  # another process wrote it back first; its copy comes by the watch

    def _lock(self, route: str) -> asyncio.Lock:
        lock = self._locks.get(route)
        if lock is None:
            lock = self._locks[route] = asyncio.Lock()
        return lock

    # -- the scheduler -----------------------------------------------------------------------
    async def _schedule(self) -> None:
        """Tick each progressing rollout every check interval; missed ticks are skipped, not
        bunched."""
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if not self.gateway.lease.held:
                # Another process decides; a new holder starts each step's window afresh.
                self._due.clear()
                self._meters.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            active = {r: p for r, (s, p, _) in self._docs.items() if s.phase == PROGRESSING}
            for route in list(self._due):
                if route not in active:
                    del self._due[route]
                    self._meters.pop(route, None)  # a resume restarts the step's window
            for route, plan in active.items():
                self._due.setdefault(route, now + plan.check_interval)
            if not self._due:
                await self._wake.wait()
                continue
            first = min(self._due.values())
            if first > now:
                try:
                    async with asyncio.timeout(first - now):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            for route, due in sorted(self._due.items(), key=lambda item: item[1]):
                if due > loop.time() or route not in active or not self.gateway.lease.held:
                    continue
                interval = active[route].check_interval
                nxt = due + interval
                self._due[route] = nxt if nxt > loop.time() else loop.time() + interval
                try:
                    await self.tick(route)
                except LeaseLost:
                    log.info("rollout tick of route %s: lease lost, another process decides",
                             route)
                except StoreUnavailable as exc:
                    log.warning("rollout tick of route %s held: %s", route, exc)
                except Exception:
                    log.exception("rollout tick of route %s failed", route)

    async def tick(self, route: str) -> Decision | None:
        """One check of one rollout: analyse, decide, store, carry out."""
        async with self._lock(route):
            found = await self._load(route)
            if found is None:
                return None
            state, plan, version = found
            if state.phase != PROGRESSING:
                return None
            now = self.gateway.clock()
            routing = self.gateway.control.state(route)
            expected_live = state.baseline if state.kind == CANARY else state.backend
            if routing.live != expected_live:
                if state.kind == CANARY and routing.live == state.backend:
                    # The promotion's switch happened but its paperwork did not (lease or
                    # store lost in between): finish it rather than call it an abort.
                    action, reason = "rollout_promote", "promoted (switch already made)"
                    new = state.evolve(phase=PROMOTED, reason=reason, finished=now)
                else:
                    action = "rollout_abort"
                    reason = (f"stopped: the live backend became {routing.live!r} outside "
                              f"the rollout (expected {expected_live!r})")
                    new = state.evolve(phase=ABORTED, reason=reason, finished=now)
                try:
                    await self._write(new, plan, version, fenced=True)
                except VersionConflict:
                    return None
                await self._event(route, CONTROLLER, action, state, new, plan, reason)
                return None
            analysis = self._analyze(state, plan, now)
            decision = advance(state, analysis, now, plan)
            # Traffic first, then the paperwork: a stored decision whose routing change then
            # failed would never be carried out (only progressing rollouts are ticked), while
            # a routing change whose paperwork fails is simply made again (a no-op) by the
            # next tick, on this process or the next lease holder.
            carried = await self._carry_out(decision, plan)
            if carried is None:
                return None  # the control plane refused: the rollout was stopped
            try:
                await self._write(decision.state, plan, version, fenced=True)
            except VersionConflict:
                return None  # an operator acted meanwhile: the next tick reads their change
            if carried != "hold":
                await self._event(route, CONTROLLER, carried, state, decision.state, plan,
                                  decision.reason)
            return decision

    def _meter(self, state: RolloutState, plan: RolloutPlan) -> Meter:
        found = self._meters.get(state.route)
        if found is not None and found[0] == state.started:
            return found[1]
        # The cluster's totals with the Redis store: the canary is judged on all its traffic.
        metrics = self.gateway.metrics
        meter = Meter({b: metrics.backend(state.route, b) for b in {state.backend, state.baseline}},
                      plan.analysis_window)
        self._meters[state.route] = (state.started, meter)
        return meter

    def _analyze(self, state: RolloutState, plan: RolloutPlan, now: float) -> Analysis:
        meter = self._meter(state, plan)
        backends = (state.backend, state.baseline)
        seconds, windows = meter.windows(now, state.step_started, backends)
        sequential = None
        if plan.analysis.sequential and state.kind == CANARY:
            # This process's new traffic since its last check, added to the evidence the
            # rollout document carries (so a new lease holder goes on with the same test).
            batch = meter.batch(backends)
            sequential = sequential_check(plan.analysis, Evidence.from_json(state.evidence),
                                          batch[state.backend], batch[state.baseline])
        return judge(plan.gates, windows[state.backend], windows[state.baseline], seconds,
                     shadow=self._shadow(state, plan, seconds), alarms=self._alarms(state, plan),
                     sequential=sequential)

    def _shadow(self, state: RolloutState, plan: RolloutPlan, seconds: float
                ) -> tuple[int, float | None] | None:
        if plan.gates.min_shadow_agreement is None:
            return None
        agreement = self.gateway.hooks.shadow_agreement
        # Only the candidate's own comparison counts: a shadow of another backend says
        # nothing about it (then the gate is skipped).
        if agreement is None or self.gateway.control.state(state.route).shadow != state.backend:
            return None
        try:
            pairs, rate = agreement(state.route, seconds)
        except Exception:
            log.exception("shadow agreement of route %s failed", state.route)
            return None
        return int(pairs), None if rate is None else float(rate)

    def _alarms(self, state: RolloutState, plan: RolloutPlan) -> list[str] | None:
        if not plan.gates.no_firing_alarms:
            return None
        firing = self.gateway.hooks.firing_alarms
        if firing is None:
            return None
        try:
            return [str(name) for name in firing(state.route, state.backend)]
        except Exception:
            log.exception("firing alarms of route %s failed", state.route)
            return None

    async def _carry_out(self, decision: Decision, plan: RolloutPlan) -> str | None:
        """Make the routing change a decision calls for; returns the audit action for it
        (``hold``: none was needed), or None when the control plane refused it."""
        state = decision.state
        route = state.route
        control = self.gateway.control
        fence = self.gateway.lease.fence
        if decision.action == "hold":
            return "rollout_check" if decision.verdict_changed else "hold"
        try:
            if decision.action == "rollback":
                # Unfenced: moving traffic back to the known-good version is safe even if
                # the lease just moved on; every millisecond here sends users to a failure.
                if state.kind == BAKE:
                    await control.switch(route, state.baseline, actor=CONTROLLER,
                                         reason=decision.reason)
                else:
                    await control.set_canary(route, state.backend, 0, actor=CONTROLLER,
                                             reason=decision.reason)
                return "rollout_rollback"
            if decision.action == "advance":
                self._meter(state, plan).mark(state.step_started, force=True)
                await control.set_canary(route, state.backend, plan.steps[state.step],
                                         actor=CONTROLLER, reason=decision.reason, fence=fence)
                return "rollout_step"
            if state.kind == CANARY:
                await control.switch(route, state.backend, actor=CONTROLLER,
                                     reason=decision.reason, fence=fence)
            return "rollout_promote"
        except AdminError as exc:
            await self._routing_refused(state, plan, exc)
            return None

    async def _routing_refused(self, state: RolloutState, plan: RolloutPlan,
                               exc: AdminError) -> None:
        """The control plane refused the change (the route moved under us): stop, loudly."""
        reason = f"stopped: routing change refused: {exc.message}"
        log.warning("rollout of route %s %s", state.route, reason)
        found = await self._load(state.route)
        if found is None:
            return
        current, _, version = found
        new = current.evolve(phase=ABORTED, reason=reason,
                             finished=current.finished or self.gateway.clock())
        try:
            await self._write(new, plan, version)
        except VersionConflict:
            return
        await self._event(state.route, CONTROLLER, "rollout_abort", current, new, plan, reason)

    async def _event(self, route: str, actor: str, action: str, old: RolloutState | None,
                     new: RolloutState, plan: RolloutPlan, reason: str | None,
                     extra: dict[str, Any] | None = None) -> None:
        after = self._brief(new, plan)
        if new.last_check is not None and action != "rollout_start":
            after["analysis"] = new.last_check
        if extra:
            after.update(extra)
        before = self._brief(old, plan) if old is not None else None
        await self.gateway.control.record(route, actor, action, before, after, reason)

    # -- operator actions --------------------------------------------------------------------
    async def _transition(
        self, route: str, actor: str, action: str, reason: str | None,
        change: Callable[[RolloutState, RolloutPlan], RolloutState],
        effect: Callable[[RolloutState, RolloutState, RolloutPlan], Awaitable[None]] | None = None,
    ) -> RolloutState:
        """CAS-change the rollout document, apply its routing effect, record the event."""
        self.gateway.control.route_config(route)
        async with self._lock(route):
            for _ in range(CAS_ATTEMPTS):
                found = await self._load(route)
                if found is None:
                    raise NotFound(f"no rollout on route {route!r}")
                state, plan, version = found
                new = change(state, plan)
                try:
                    await self._write(new, plan, version)
                except VersionConflict:
                    await asyncio.sleep(0)
                    continue
                if effect is not None:
                    await effect(state, new, plan)
                await self._event(route, actor, action, state, new, plan, reason)
                self._wake.set()
                return new
        raise Conflict(f"rollout of route {route!r} is changing too fast; try again")

    async def start_rollout(self, route: str, overrides: dict[str, Any] | None = None, *,
                            actor: str, force: bool = False, reason: str | None = None
                            ) -> RolloutState:
        """Start a canary ramp: the route's config plan with `overrides` (plan document keys,
        as in the config's ``rollout:`` section) on top; `force` skips the readiness check."""
        cfg = self.gateway.control.route_config(route)
        plan = self.plan_from_body(cfg, overrides or {})
        if plan.backend is None:
            raise InvalidRequest("backend: required (the route's config names no rollout "
                                 "backend)")
        routing = self.gateway.control.state(route)
        if plan.backend == routing.live:
            raise InvalidRequest(f"backend: {plan.backend!r} is already live on route {route!r}")
        current = self._docs.get(route)
        if current is not None and current[0].active:
            raise Conflict(_busy(current[0]))
        if not force:
            problem = await self.check_ready(cfg, plan.backend, plan)
            if problem is not None:
                raise Conflict(f"backend {plan.backend!r} is not ready: {problem}; "
                               "pass force to start anyway")
        async with self._lock(route):
            found = await self.gateway.store.read(rollout_key(route))
            if found is not None and found[0].get("phase") in (PROGRESSING, PAUSED):
                raise Conflict(_busy(RolloutState.from_json(found[0])))
            now = self.gateway.clock()
            routing = self.gateway.control.state(route)
            state = RolloutState(route=route, backend=plan.backend, baseline=routing.live,
                                 started=now, step_started=now, started_by=actor)
            try:
                await self._write(state, plan, found[1] if found else 0)
            except VersionConflict:
                raise Conflict(f"another rollout of route {route!r} started meanwhile") from None
            self._meter(state, plan).mark(now, force=True)
            reason = (f"rollout started by {actor}: step 1/{len(plan.steps)} → "
                      f"{plan.steps[0]:g}%")
            try:
                await self.gateway.control.set_canary(route, plan.backend, plan.steps[0],
                                                      actor=CONTROLLER, reason=reason)
            except AdminError as exc:
                await self._routing_refused(state, plan, exc)
                raise
            await self._event(route, actor, "rollout_start", None, state, plan,
                              reason, {"plan": plan.to_json()})
            self._wake.set()
            return state

    def plan_from_body(self, cfg: RouteConfig, data: dict[str, Any]) -> RolloutPlan:
        """The route's config plan overlaid with the body's keys (`gates` replace whole)."""
        body = {k: v for k, v in data.items() if k in PLAN_KEYS}
        base = cfg.rollout.to_json() if cfg.rollout is not None else {}
        if any(k in body for k in ("steps", "step", "max_weight")):
            base.pop("steps", None)
        return parse_plan({**base, **body}, set(cfg.backends))

    async def pause(self, route: str, actor: str, reason: str | None = None) -> RolloutState:
        def change(state: RolloutState, plan: RolloutPlan) -> RolloutState:
            if state.phase != PROGRESSING:
                raise Conflict(f"rollout of route {route!r} is {state.phase}; only a "
                               "progressing one can be paused")
            return state.evolve(phase=PAUSED, paused_at=self.gateway.clock(),
                                reason=reason or f"paused by {actor}")

        return await self._transition(route, actor, "rollout_pause", reason, change)

    async def resume(self, route: str, actor: str, reason: str | None = None) -> RolloutState:
        """Continue a paused rollout: the step's bake starts over (the time paused, and any
        manual weight meanwhile, are no evidence) and the step's weight is applied again."""
        routing = self.gateway.control.state(route)

        def change(state: RolloutState, plan: RolloutPlan) -> RolloutState:
            if state.phase != PAUSED:
                raise Conflict(f"rollout of route {route!r} is {state.phase}; only a paused "
                               "one can be resumed")
            live = state.baseline if state.kind == CANARY else state.backend
            if routing.live != live:
                raise Conflict(f"the live backend is now {routing.live!r}, not {live!r}: "
                               "abort this rollout and start a new one")
            now = self.gateway.clock()
            return state.evolve(phase=PROGRESSING, paused_at=None, step_started=now,
                                failures=0, last_verdict=None, reason=None)

        async def effect(old: RolloutState, new: RolloutState, plan: RolloutPlan) -> None:
            self._meter(new, plan).mark(new.step_started, force=True)
            if new.kind != CANARY:
                return
            weight = plan.steps[new.step]
            now_state = self.gateway.control.state(route)
            if now_state.canary != new.backend or now_state.canary_weight != weight:
                await self.gateway.control.set_canary(
                    route, new.backend, weight, actor=CONTROLLER,
                    reason=f"rollout resumed by {actor}: step {new.step + 1}/"
                           f"{len(plan.steps)} → {weight:g}%")

        return await self._transition(route, actor, "rollout_resume", reason, change, effect)

    async def promote(self, route: str, actor: str, reason: str | None = None) -> RolloutState:
        """Skip the remaining steps: the candidate becomes live now (a bake just ends)."""

        def change(state: RolloutState, plan: RolloutPlan) -> RolloutState:
            _must_be_active(route, state, "promoted")
            return state.evolve(phase=PROMOTED, finished=self.gateway.clock(),
                                reason=reason or f"promoted by {actor}",
                                step=len(plan.steps) - 1 if state.kind == CANARY else 0)

        async def effect(old: RolloutState, new: RolloutState, plan: RolloutPlan) -> None:
            if new.kind == CANARY:
                await self.gateway.control.switch(
                    route, new.backend, actor=actor,
                    reason=reason or f"rollout promoted by {actor} at step {old.step + 1}/"
                                     f"{len(plan.steps)}")

        return await self._transition(route, actor, "rollout_promote", reason, change, effect)

    async def abort(self, route: str, actor: str, reason: str | None = None) -> RolloutState:
        """Roll back now: canary weight to 0 (a bake: switch back to the old live backend)."""

        def change(state: RolloutState, plan: RolloutPlan) -> RolloutState:
            _must_be_active(route, state, "aborted")
            return state.evolve(phase=ABORTED, finished=self.gateway.clock(),
                                reason=reason or f"aborted by {actor}")

        async def effect(old: RolloutState, new: RolloutState, plan: RolloutPlan) -> None:
            why = reason or f"rollout aborted by {actor}"
            if new.kind == CANARY:
                await self.gateway.control.set_canary(route, new.backend, 0, actor=actor,
                                                      reason=why)
            elif self.gateway.control.state(route).live == new.backend:
                await self.gateway.control.switch(route, new.baseline, actor=actor, reason=why)

        return await self._transition(route, actor, "rollout_abort", reason, change, effect)

    async def _stop_for(self, route: str, actor: str, why: str, *, pause: bool) -> None:
        """A manual routing change takes over from the controller (no routing change here)."""
        cached = self._docs.get(route)
        if cached is None or not cached[0].active:
            return

        def change(state: RolloutState, plan: RolloutPlan) -> RolloutState:
            if pause:
                if state.phase != PROGRESSING:
                    return state
                return state.evolve(phase=PAUSED, paused_at=self.gateway.clock(), reason=why)
            if not state.active:
                return state
            return state.evolve(phase=ABORTED, finished=self.gateway.clock(), reason=why)

        if pause and cached[0].phase != PROGRESSING:
            return
        await self._transition(route, actor, "rollout_pause" if pause else "rollout_abort", why,
                               change)

    # -- hooks the core calls ----------------------------------------------------------------
    async def on_manual_change(self, route: str, actor: str, stop: bool) -> None:
        """Before a manual canary change (pause the rollout) or rollback (abort it; the core
        then does the rollback itself, so nothing is routed here)."""
        if stop:
            await self._stop_for(route, actor, f"manual rollback by {actor}", pause=False)
        else:
            await self._stop_for(route, actor, f"manual canary change by {actor}", pause=True)

    async def guarded_switch(self, route: str, to: str, *, actor: str, force: bool = False,
                             bake: float | None = None, reason: str | None = None) -> None:
        """Blue-green switch that first checks the target is ready (409 unless `force`) and
        optionally bakes: watches the gates for `bake` seconds and switches back on failure."""
        cfg = self.gateway.control.route_config(route)
        check_backend(cfg, to, "to")
        routing = self.gateway.control.state(route)
        plan = cfg.rollout or RolloutPlan()
        if to == routing.live:
            if bake is not None:
                raise Conflict(f"{to!r} is already live on route {route!r}: nothing to bake")
        elif not force:
            problem = await self.check_ready(cfg, to, plan)
            if problem is not None:
                raise Conflict(f"backend {to!r} is not ready: {problem}; pass force to "
                               "switch anyway")
        await self._stop_for(route, actor, f"superseded by a manual switch to {to!r} by {actor}",
                             pause=False)
        before = routing.live
        await self.gateway.control.switch(route, to, actor=actor, reason=reason)
        if bake is not None:
            await self._start_bake(cfg, to, before, bake, plan, actor)

    async def _start_bake(self, cfg: RouteConfig, backend: str, baseline: str, bake: float,
                          base: RolloutPlan, actor: str) -> None:
        route = cfg.name
        # The route's plan (gates, window, threshold, health check) as one 100 % step.
        plan = dataclasses.replace(base, backend=backend, steps=(100.0,), interval=bake,
                                   check_interval=min(base.check_interval, bake))
        async with self._lock(route):
            found = await self.gateway.store.read(rollout_key(route))
            now = self.gateway.clock()
            state = RolloutState(route=route, backend=backend, baseline=baseline, started=now,
                                 step_started=now, kind=BAKE, started_by=actor)
            try:
                await self._write(state, plan, found[1] if found else 0)
            except VersionConflict:
                raise Conflict(f"route {route!r} changed during the switch; the switch is done "
                               "but the bake did not start") from None
            self._meter(state, plan).mark(now, force=True)
            await self._event(route, actor, "rollout_start", None, state, plan,
                              f"bake of {bake:g}s after switching to {backend!r}",
                              {"plan": plan.to_json()})
            self._wake.set()

    async def check_ready(self, cfg: RouteConfig, backend: str, plan: RolloutPlan
                          ) -> str | None:
        """None if every URL of `backend` answers the smoke request (when configured) or its
        health path with 2xx; else what went wrong."""
        session = self._session
        if session is None:
            return "the rollout component is not running"
        timeout = aiohttp.ClientTimeout(total=plan.health_timeout)
        smoke = plan.smoke
        for url in cfg.backends[backend].urls:
            if smoke is not None:
                method, target, body, want = smoke.method, url + smoke.path, smoke.body, \
                    smoke.status
            else:
                method, target, body, want = "GET", url + plan.health_path, None, None
            try:
                async with session.request(method, target, json=body, timeout=timeout) as resp:
                    await resp.read()
                    ok = resp.status == want if want is not None else 200 <= resp.status < 300
                    if not ok:
                        expected = want if want is not None else "2xx"
                        return f"{method} {target} answered {resp.status} (expected {expected})"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return f"{method} {target} failed: {type(exc).__name__} {exc}".rstrip()
        return None

    # -- views -------------------------------------------------------------------------------
    def _brief(self, state: RolloutState, plan: RolloutPlan) -> dict[str, Any]:
        return {
            "kind": state.kind,
            "backend": state.backend,
            "baseline": state.baseline,
            "phase": state.phase,
            "step": state.step,
            "steps": list(plan.steps),
            "weight": state.weight(plan),
            "failures": state.failures,
            "reason": state.reason,
        }

    def view(self, route: str) -> dict[str, Any]:
        self.gateway.control.route_config(route)
        cached = self._docs.get(route)
        if cached is None:
            raise NotFound(f"no rollout on route {route!r}")
        state, plan, version = cached
        now = self.gateway.clock()
        out = self._brief(state, plan)
        out.update({
            "route": route,
            "time_in_step": round(state.time_in_step(now), 3),
            "interval": plan.interval,
            "check_interval": plan.check_interval,
            "failure_threshold": plan.failure_threshold,
            "started": state.started,
            "started_by": state.started_by,
            "step_started": state.step_started,
            "paused_at": state.paused_at,
            "finished": state.finished,
            "checks": state.checks,
            "last_verdict": state.last_verdict,
            "last_check_time": state.last_check_time,
            "last_check": state.last_check,
            "plan": plan.to_json(),
            "version": version,
        })
        return out

    def describe_route(self, name: str) -> dict[str, Any]:
        cached = self._docs.get(name)
        if cached is None:
            return {"rollout": None}
        state, plan, _ = cached
        brief = self._brief(state, plan)
        brief["time_in_step"] = round(state.time_in_step(self.gateway.clock()), 3)
        brief["last_verdict"] = state.last_verdict
        return {"rollout": brief}

    def _collect(self) -> Iterator[Metric]:
        weight = GaugeMetricFamily("modelgate_rollout_weight",
                                   "Canary weight the rollout controller has set, percent.",
                                   labels=["route", "backend"])
        step = GaugeMetricFamily("modelgate_rollout_step", "Current step index (0-based).",
                                 labels=["route"])
        failures = GaugeMetricFamily("modelgate_rollout_failed_checks",
                                     "Consecutive failed checks of the current rollout.",
                                     labels=["route"])
        phase = GaugeMetricFamily("modelgate_rollout_phase",
                                  "1 for the rollout's current phase.",
                                  labels=["route", "phase"])
        for route, (state, plan, _) in list(self._docs.items()):
            weight.add_metric([route, state.backend], state.weight(plan))
            step.add_metric([route], state.step)
            failures.add_metric([route], state.failures)
            for name in PHASES:
                phase.add_metric([route, name], 1.0 if state.phase == name else 0.0)
        yield weight
        yield step
        yield failures
        yield phase


def _busy(state: RolloutState) -> str:
    return (f"a rollout of {state.backend!r} on route {state.route!r} is {state.phase}: "
            "promote or abort it first")


def _must_be_active(route: str, state: RolloutState, verb: str) -> None:
    if not state.active:
        raise Conflict(f"rollout of route {route!r} is already {state.phase}; it cannot be "
                       f"{verb}")
