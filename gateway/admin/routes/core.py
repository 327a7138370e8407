"""Probes, metrics, routes and their routing state, the audit log, the cluster."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter

from gateway import __version__
from gateway.admin.endpoint import Call, Endpoint
from gateway.admin.host import AdminHost
from gateway.admin.http import json_response
from gateway.admin.models import (
    BECAUSE,
    CANARY,
    EVENTS_QUERY,
    SHADOW,
    SWITCH,
    Because,
    CanaryChange,
    ClusterView,
    EventList,
    EventsQuery,
    Health,
    Ready,
    RouteList,
    RouteView,
    ShadowChange,
    Switch,
)
from gateway.admin.views import cluster_view, route_view, store_kind
from gateway.control import canary_change, rollback_change

ROUTE_VIEW = TypeAdapter(RouteView)
CONFLICT = (409, 503)


def endpoints(host: AdminHost) -> list[Endpoint]:
    control = host.control

    async def healthz(call: Call) -> Any:
        # Alive whatever the store does: a store outage degrades control, not routing, and
        # a liveness probe that failed on it would restart every replica at once.
        store_up = host.store.up
        return {"status": "ok" if store_up else "degraded", "version": __version__,
                "store": {"kind": store_kind(host), "up": store_up}}

    async def readyz(call: Call) -> Any:
        if host.ready:
            return {"ready": True}
        reason = "draining" if host.draining else "starting"
        return json_response({"ready": False, "reason": reason}, 503)

    async def metrics(call: Call) -> Any:
        body = generate_latest(host.recorder.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_routes(call: Call) -> Any:
        return {"routes": [route_view(host, r.name) for r in host.config.routes]}

    async def get_route(call: Call) -> Any:
        return route_view(host, call.route)

    async def put_canary(call: Call) -> Any:
        body: CanaryChange = call.body
        await _canary(call.route, body.backend, body.weight, call.actor, body.reason)
        return route_view(host, call.route)

    async def delete_canary(call: Call) -> Any:
        await _canary(call.route, None, 0, call.actor, None)
        return route_view(host, call.route)

    async def _canary(name: str, backend: str | None, weight: float, actor: str,
                      reason: str | None) -> None:
        # Refuse bad input before the listeners, and change nothing for a no-op: a refused
        # or empty call must not pause a rollout (or a blue-green bake) either.
        current = control.state(name)
        if control.preview(name, lambda st, cfg: canary_change(st, cfg, backend, weight)) \
                == current:
            return
        await control.manual_change(name, actor)
        await control.set_canary(name, backend, weight, actor=actor, reason=reason)

    async def switch(call: Call) -> Any:
        body: Switch = call.body
        guarded = host.hooks.switch
        if guarded is not None:
            await guarded(call.route, body.to, actor=call.actor, force=body.force,
                          bake=body.bake, reason=body.reason)
        else:
            await control.switch(call.route, body.to, actor=call.actor, reason=body.reason)
        return route_view(host, call.route)

    async def rollback(call: Call) -> Any:
        body: Because = call.body
        control.preview(call.route, rollback_change)  # refused: must not abort a rollout
        await control.manual_change(call.route, call.actor, stop=True)
        await control.rollback(call.route, actor=call.actor, reason=body.reason)
        return route_view(host, call.route)

    async def put_shadow(call: Call) -> Any:
        body: ShadowChange = call.body
        await control.set_shadow(call.route, body.backend, body.sample, actor=call.actor,
                                 reason=body.reason)
        return route_view(host, call.route)

    async def delete_shadow(call: Call) -> Any:
        await control.set_shadow(call.route, None, 0, actor=call.actor)
        return route_view(host, call.route)

    async def events(call: Call) -> Any:
        query: EventsQuery = call.query
        if query.route is not None:
            control.route_config(query.route)  # 404
        found = await control.events(query.limit, query.route, query.since)
        return {"events": [e.to_json() for e in found]}

    async def cluster(call: Call) -> Any:
        return await cluster_view(host)

    route = "/admin/routes/{route}"
    return [
        Endpoint("GET", "/healthz", "Liveness: the process answers", healthz, auth=False,
                 response=TypeAdapter(Health)),
        Endpoint("GET", "/readyz", "Readiness: 503 while starting or draining", readyz,
                 auth=False, response=TypeAdapter(Ready), errors=(503,)),
        Endpoint("GET", "/metrics", "Prometheus metrics (text format)", metrics, auth=False,
                 content="text/plain"),
        Endpoint("GET", "/admin/routes", "All routes with their routing state", list_routes,
                 response=TypeAdapter(RouteList)),
        Endpoint("GET", route, "One route: state, backends and their URLs", get_route,
                 response=ROUTE_VIEW),
        Endpoint("PUT", route + "/canary", "Set the canary backend and weight (0-100, 0.01 "
                 "steps); pauses a rollout", put_canary, body=CANARY, response=ROUTE_VIEW,
                 errors=CONFLICT),
        Endpoint("DELETE", route + "/canary", "Canary weight to 0", delete_canary,
                 response=ROUTE_VIEW, errors=CONFLICT),
        Endpoint("POST", route + "/switch", "Blue-green: all traffic to another backend at "
                 "once", switch, body=SWITCH, response=ROUTE_VIEW, errors=CONFLICT),
        Endpoint("POST", route + "/rollback", "Back to the last known-good backend (canary to "
                 "0, else previous live)", rollback, body=BECAUSE, response=ROUTE_VIEW,
                 errors=CONFLICT),
        Endpoint("PUT", route + "/shadow", "Mirror a sample of requests to a backend",
                 put_shadow, body=SHADOW, response=ROUTE_VIEW, errors=CONFLICT),
        Endpoint("DELETE", route + "/shadow", "Stop mirroring", delete_shadow,
                 response=ROUTE_VIEW, errors=CONFLICT),
        Endpoint("GET", "/admin/events", "Audit events, newest last (with since: the first "
                 "limit events after that id, a cursor)", events, query=EVENTS_QUERY,
                 response=TypeAdapter(EventList), errors=(404, 503)),
        Endpoint("GET", "/admin/cluster", "The gateway processes sharing the store, their "
                 "last heartbeat, and which one holds the controller lease", cluster,
                 response=TypeAdapter(ClusterView)),
    ]
