"""The admin API: JSON in and out, bearer token on every /admin/ path.

/healthz, /readyz and /metrics answer without a token (kubelet probes, Prometheus scrapers).
Errors are JSON ``{"error": code, "message": ...}`` with a 4xx status and change nothing.
Feature components add their own endpoints through `Component.add_admin_routes`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__
from gateway.admin.auth import actor_for
from gateway.admin.dashboard import add_dashboard_routes
from gateway.admin.openapi import openapi_document
from gateway.control import canary_change, rollback_change
from gateway.errors import AdminError, ConfigError, InvalidRequest, ModelgateError, StoreError
from gateway.state import RouteState

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("modelgate.admin")
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
ACTOR_KEY = web.RequestKey("actor", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
        content_type="application/json",
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": code, "message": message}, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AdminError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except ConfigError as exc:  # a body or query value parsed with the config readers
        return error_response(400, "invalid_request", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"),
                              f"{exc.reason}: {request.method} {request.path}")
    except ModelgateError as exc:
        log.warning("admin %s %s failed: %s", request.method, request.path, exc)
        return error_response(503, "unavailable", str(exc))
    except Exception:
        log.exception("admin %s %s crashed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the gateway log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/admin/"):
        gateway = request.app[GATEWAY_KEY]
        request[ACTOR_KEY] = actor_for(request.headers.get("Authorization"), gateway.tokens)
    return await handler(request)


async def read_json(request: web.Request, allowed: set[str],
                    required: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The request's JSON object; unknown or missing keys are a 400."""
    raw = await request.read()
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )
    missing = sorted(required - set(data))
    if missing:
        raise InvalidRequest(f"missing field {missing[0]!r}")
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise InvalidRequest("reason: must be a string")
    return data


def route_view(gateway: Gateway, name: str) -> dict[str, Any]:
    cfg = gateway.control.route_config(name)
    state: RouteState = gateway.control.state(name)
    view: dict[str, Any] = {
        "name": name,
        "match": {"path_prefix": cfg.path_prefix, "host": cfg.host},
        "live": state.live,
        "previous": state.previous,
        "canary": (
            {"backend": state.canary, "weight": state.canary_weight} if state.canary else None
        ),
        "shadow": (
            {"backend": state.shadow, "sample": state.shadow_sample} if state.shadow else None
        ),
        "traffic": state.traffic(),
        "version": state.version,
        "backends": {
            b.name: {"url": b.urls[0], "urls": list(b.urls)} for b in cfg.backends.values()
        },
        "sticky": {cfg.sticky.source: cfg.sticky.name} if cfg.sticky else None,
        "override_header": cfg.override_header,
        "timeouts": {"connect": cfg.timeouts.connect, "read": cfg.timeouts.read},
        "max_body_bytes": cfg.max_body_bytes,
    }
    for comp in gateway.components:
        describe = getattr(comp, "describe_route", None)
        if describe is not None:
            extra = describe(name)
            if extra:
                view.update(extra)
    return view


def store_kind(gateway: Gateway) -> str:
    return "redis" if gateway.store.shared else "memory"


async def cluster_view(gateway: Gateway) -> dict[str, Any]:
    """The processes sharing this gateway's store and which one holds the controller lease.

    Answers during a store outage too, with what this process knows (itself)."""
    lease = gateway.lease
    view: dict[str, Any] = {
        "self": gateway.member_id,
        "store": {"kind": store_kind(gateway), "url": redacted_store_url(gateway.config.store),
                  "up": gateway.store.up},
        "lease": {"name": lease.name, "holder": None, "held_here": lease.held},
        "members": [],
    }
    try:
        view["lease"]["holder"] = await gateway.store.lease_holder(lease.name)
        members = await gateway.store.members()
    except StoreError as exc:
        view["error"] = f"store unavailable: {exc}"
        members = [dict(gateway.member_info(), id=gateway.member_id, heartbeat=None)]
    holder = view["lease"]["holder"]
    view["members"] = sorted(
        ({**m, "leader": m.get("id") == holder} for m in members),
        key=lambda m: (str(m.get("host")), m.get("worker") or 0, int(m.get("pid") or 0)),
    )
    return view


def redacted_store_url(url: str) -> str:
    """The store URL without its password (``redis://:secret@host`` → ``redis://***@host``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def build_admin_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=1024 * 1024)
    app[GATEWAY_KEY] = gateway
    control = gateway.control

    async def healthz(request: web.Request) -> web.Response:
        # Alive whatever the store does: a store outage degrades control, not routing, and
        # a liveness probe that failed on it would restart every replica at once.
        store_up = gateway.store.up
        return json_response({"status": "ok" if store_up else "degraded",
                              "version": __version__,
                              "store": {"kind": store_kind(gateway), "up": store_up}})

    async def readyz(request: web.Request) -> web.Response:
        if gateway.ready:
            return json_response({"ready": True})
        reason = "draining" if gateway.draining else "starting"
        return json_response({"ready": False, "reason": reason}, 503)

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(gateway.recorder.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def cluster(request: web.Request) -> web.Response:
        return json_response(await cluster_view(gateway))

    async def list_routes(request: web.Request) -> web.Response:
        return json_response({"routes": [route_view(gateway, r.name)
                                         for r in gateway.config.routes]})

    async def get_route(request: web.Request) -> web.Response:
        return json_response(route_view(gateway, request.match_info["route"]))

    async def put_canary(request: web.Request) -> web.Response:
        name = request.match_info["route"]
        control.route_config(name)
        data = await read_json(request, {"backend", "weight", "reason"}, {"weight"})
        backend = data.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise InvalidRequest("backend: must be a string")
        await _canary(name, backend, data["weight"], request[ACTOR_KEY], data.get("reason"))
        return json_response(route_view(gateway, name))

    async def delete_canary(request: web.Request) -> web.Response:
        name = request.match_info["route"]
        control.route_config(name)
        await _canary(name, None, 0, request[ACTOR_KEY], None)
        return json_response(route_view(gateway, name))

    async def _canary(name: str, backend: str | None, weight: Any, actor: str,
                      reason: str | None) -> None:
        # Refuse bad input before the hook, and change nothing for a no-op: a refused or
        # empty call must not pause a rollout (or a blue-green bake) either.
        current = control.state(name)
        if control.preview(name, lambda st, cfg: canary_change(st, cfg, backend, weight)) \
                == current:
            return
        await _before_manual_change(gateway, name, actor)
        await control.set_canary(name, backend, weight, actor=actor, reason=reason)

    async def switch(request: web.Request) -> web.Response:
        name = request.match_info["route"]
        control.route_config(name)
        data = await read_json(request, {"to", "reason", "force", "bake"}, {"to"})
        if not isinstance(data["to"], str):
            raise InvalidRequest("to: must be a backend name")
        guard = getattr(gateway.find_component("rollout"), "guarded_switch", None)
        if guard is not None:
            await guard(name, data, request[ACTOR_KEY])
        else:
            await control.switch(name, data["to"], actor=request[ACTOR_KEY],
                                 reason=data.get("reason"))
        return json_response(route_view(gateway, name))

    async def rollback(request: web.Request) -> web.Response:
        name = request.match_info["route"]
        control.route_config(name)
        data = await read_json(request, {"reason"})
        control.preview(name, rollback_change)  # a refused rollback must not abort a rollout
        await _before_manual_change(gateway, name, request[ACTOR_KEY], stop=True)
        await control.rollback(name, actor=request[ACTOR_KEY], reason=data.get("reason"))
        return json_response(route_view(gateway, name))

    async def put_shadow(request: web.Request) -> web.Response:
        name = request.match_info["route"]
        control.route_config(name)
        data = await read_json(request, {"backend", "sample", "reason"}, {"backend"})
        if not isinstance(data["backend"], str):
            raise InvalidRequest("backend: must be a backend name")
        await control.set_shadow(name, data["backend"], data.get("sample", 100),
                                 actor=request[ACTOR_KEY], reason=data.get("reason"))
        return json_response(route_view(gateway, name))

    async def delete_shadow(request: web.Request) -> web.Response:
        name = request.match_info["route"]
        control.route_config(name)
        await control.set_shadow(name, None, 0, actor=request[ACTOR_KEY])
        return json_response(route_view(gateway, name))

    async def events(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise InvalidRequest("limit: must be a whole number") from None
        if not 1 <= limit <= 10_000:
            raise InvalidRequest("limit: must be from 1 to 10000")
        since: int | None = None
        if "since" in request.query:
            try:
                since = int(request.query["since"])
            except ValueError:
                raise InvalidRequest("since: must be a whole number (an event id)") from None
            if since < 0:
                raise InvalidRequest("since: must be 0 or more")
        route = request.query.get("route")
        if route is not None:
            control.route_config(route)
        found = await control.events(limit, route, since)
        return json_response({"events": [e.to_json() for e in found]})

    async def openapi(request: web.Request) -> web.Response:
        return json_response(openapi_document(gateway))

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/openapi.json", openapi)
    app.router.add_get("/admin/routes", list_routes)
    app.router.add_get("/admin/routes/{route}", get_route)
    app.router.add_put("/admin/routes/{route}/canary", put_canary)
    app.router.add_delete("/admin/routes/{route}/canary", delete_canary)
    app.router.add_post("/admin/routes/{route}/switch", switch)
    app.router.add_post("/admin/routes/{route}/rollback", rollback)
    app.router.add_put("/admin/routes/{route}/shadow", put_shadow)
    app.router.add_delete("/admin/routes/{route}/shadow", delete_shadow)
    app.router.add_get("/admin/events", events)
    app.router.add_get("/admin/cluster", cluster)
    for comp in gateway.components:
        comp.add_admin_routes(app)
    add_dashboard_routes(app, gateway)
    return app


async def _before_manual_change(gateway: Gateway, route: str, actor: str,
                                stop: bool = False) -> None:
    """A manual canary change pauses a running rollout; a manual rollback aborts it."""
    hook = getattr(gateway.find_component("rollout"), "on_manual_change", None)
    if hook is not None:
        await hook(route, actor, stop)
