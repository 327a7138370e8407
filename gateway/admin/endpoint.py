"""One admin endpoint as data: method, path, the models of its body, query and answer, and
the typed call it makes. `gateway.admin.app` registers each with aiohttp through `handler()`
and `gateway.admin.openapi` describes the same list, so an endpoint cannot be served without
being documented, nor documented with other bounds than it enforces."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from gateway.admin.http import ACTOR_KEY, Handler, json_response, read_body, read_query
from gateway.config import RouteConfig


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler gets: the checked route (for ``{route}`` paths), body and query."""

    request: web.Request
    route: str
    body: Any
    query: Any

    @property
    def actor(self) -> str:
        """The admin token's name (the actor in audit events)."""
        return self.request[ACTOR_KEY]

    def param(self, name: str) -> str:
        return self.request.match_info[name]


Run = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    summary: str
    run: Run  # returns JSON data (answered with `status`) or a ready response
    body: TypeAdapter[Any] | None = None
    query: TypeAdapter[Any] | None = None
    response: TypeAdapter[Any] | None = None
    status: int = 200
    auth: bool = True
    errors: tuple[int, ...] = ()  # beyond what the path, body and auth imply (409, 503)
    content: str = "application/json"
    # More validation context for a ``{route}`` path than the route's backends.
    context: Callable[[RouteConfig], dict[str, Any]] | None = None


def handler(endpoint: Endpoint, route_config: Callable[[str], RouteConfig]) -> Handler:
    """The aiohttp handler of `endpoint`: an unknown ``{route}`` is a 404 before anything is
    read; then the query and body through their models (400), then the call."""

    async def handle(request: web.Request) -> web.StreamResponse:
        route = request.match_info.get("route")
        context: dict[str, Any] | None = None
        if route is not None:
            cfg = route_config(route)
            context = {"backends": set(cfg.backends)}
            if endpoint.context is not None:
                context.update(endpoint.context(cfg))
        query = (read_query(request.query, endpoint.query, context)
                 if endpoint.query is not None else None)
        body = (await read_body(request, endpoint.body, context)
                if endpoint.body is not None else None)
        result = await endpoint.run(Call(request, route or "", body, query))
        if isinstance(result, web.StreamResponse):
            return result
        return json_response(result, endpoint.status)

    return handle
