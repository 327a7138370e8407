"""Canary rollouts: start, status, pause, resume, promote, abort."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import TypeAdapter

from gateway.admin.endpoint import Call, Endpoint, Run
from gateway.admin.models import BECAUSE, ROLLOUT_START, Because, RolloutView, StartOptions
from gateway.rollout.component import Rollouts
from gateway.rollout.controller import RolloutState

VIEW = TypeAdapter(RolloutView)
Action = Callable[[str, str, str | None], Awaitable[RolloutState]]


def endpoints(rollouts: Rollouts) -> list[Endpoint]:
    async def start(call: Call) -> Any:
        body: StartOptions = call.body
        await rollouts.start_rollout(call.route, body.overrides(), actor=call.actor,
                                     force=body.force, reason=body.reason)
        return rollouts.view(call.route)

    async def get(call: Call) -> Any:
        return rollouts.view(call.route)

    def action(run: Action) -> Run:
        async def act(call: Call) -> Any:
            body: Because = call.body
            await run(call.route, call.actor, body.reason)
            return rollouts.view(call.route)

        return act

    base = "/admin/routes/{route}/rollout"
    steps = (409, 503)
    return [
        Endpoint("POST", base, "Start a canary rollout; {} uses the route's config plan, "
                 "given keys override it", start, body=ROLLOUT_START, response=VIEW,
                 status=201, errors=steps),
        Endpoint("GET", base, "Rollout status: phase, step, weight, time in step, each gate's "
                 "last value and verdict, reason, plan", get, response=VIEW),
        Endpoint("POST", base + "/pause", "Pause: hold the current weight",
                 action(rollouts.pause), body=BECAUSE, response=VIEW, errors=steps),
        Endpoint("POST", base + "/resume", "Resume a paused rollout (the step bakes anew)",
                 action(rollouts.resume), body=BECAUSE, response=VIEW, errors=steps),
        Endpoint("POST", base + "/promote", "Skip to 100%: the candidate becomes live",
                 action(rollouts.promote), body=BECAUSE, response=VIEW, errors=steps),
        Endpoint("POST", base + "/abort", "Roll back now (canary weight 0)",
                 action(rollouts.abort), body=BECAUSE, response=VIEW, errors=steps),
    ]
