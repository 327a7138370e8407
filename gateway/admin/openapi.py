"""The OpenAPI 3 document of the admin API, assembled from the core and each component."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import __version__

if TYPE_CHECKING:
    from gateway.app import Gateway

_ROUTE = {"name": "route", "in": "path", "required": True, "schema": {"type": "string"}}
_ERROR = {"description": "JSON error", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}


def _op(summary: str, body: dict[str, Any] | None = None, route: bool = True,
        auth: bool = True, query: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK"}, "400": _ERROR, "401": _ERROR,
                      "404": _ERROR},
    }
    params = [_ROUTE] if route else []
    params += query or []
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "additionalProperties": False, **body}}}}
    if not auth:
        op["security"] = []
        op["responses"] = {"200": {"description": "OK"}}
    return op


_REASON = {"reason": {"type": "string", "description": "why (kept in the audit event)"}}

CORE_PATHS: dict[str, Any] = {
    "/healthz": {"get": _op("Liveness: the process answers", route=False, auth=False)},
    "/readyz": {"get": _op("Readiness: 503 while starting or draining", route=False,
                           auth=False)},
    "/metrics": {"get": _op("Prometheus metrics", route=False, auth=False)},
    "/admin/openapi.json": {"get": _op("This document", route=False)},
    "/admin/routes": {"get": _op("All routes with their routing state", route=False)},
    "/admin/routes/{route}": {"get": _op("One route: state, backends and their URLs")},
    "/admin/routes/{route}/canary": {
        "put": _op("Set the canary backend and weight (0-100, 0.01 steps); pauses a rollout",
                   {"required": ["weight"], "properties": {
                       "backend": {"type": "string"},
                       "weight": {"type": "number", "minimum": 0, "maximum": 100},
                       **_REASON}}),
        "delete": _op("Canary weight to 0"),
    },
    "/admin/routes/{route}/switch": {
        "post": _op("Blue-green: all traffic to another backend at once",
                    {"required": ["to"], "properties": {
                        "to": {"type": "string"},
                        "force": {"type": "boolean", "description": "skip the readiness check"},
                        "bake": {"type": "string", "description": "watch gates for this long "
                                 "after the switch and switch back on failure, e.g. '30s'"},
                        **_REASON}}),
    },
    "/admin/routes/{route}/rollback": {
        "post": _op("Back to the last known-good backend (canary to 0, else previous live)",
                    {"properties": {**_REASON}}),
    },
    "/admin/routes/{route}/shadow": {
        "put": _op("Mirror a sample of requests to a backend",
                   {"required": ["backend"], "properties": {
                       "backend": {"type": "string"},
                       "sample": {"type": "number", "minimum": 0, "maximum": 100},
                       **_REASON}}),
        "delete": _op("Stop mirroring"),
    },
    "/dashboard": {"get": _op("The live monitoring dashboard (HTML; asks for the token)",
                              route=False, auth=False)},
    "/admin/dashboard/data": {"get": _op("Dashboard series, route states, alarms and events",
                                         route=False, query=[
        {"name": "minutes", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                      "maximum": 15}},
        {"name": "step", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                   "maximum": 60}},
        {"name": "route", "in": "query", "schema": {"type": "string"}}])},
    "/admin/events": {"get": _op("Audit events, newest last (with since: the first limit "
                                 "events after that id, a cursor)", route=False, query=[
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                    "maximum": 10000}},
        {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        {"name": "route", "in": "query", "schema": {"type": "string"}}])},
    "/admin/cluster": {"get": _op("The gateway processes sharing the store, their last "
                                  "heartbeat, and which one holds the controller lease",
                                  route=False)},
}


def openapi_document(gateway: Gateway) -> dict[str, Any]:
    paths: dict[str, Any] = {k: dict(v) for k, v in CORE_PATHS.items()}
    for comp in gateway.components:
        extra = getattr(comp, "openapi_paths", None)
        if extra is not None:
            for path, ops in extra().items():
                paths.setdefault(path, {}).update(ops)
    return {
        "openapi": "3.0.3",
        "info": {"title": "modelgate admin API", "version": __version__},
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error", "message"],
                                  "properties": {"error": {"type": "string"},
                                                 "message": {"type": "string"}}}},
        },
    }
