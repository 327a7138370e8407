"""The admin app: every endpoint of the admin API in one list, served and documented.

The core endpoints (routes, routing changes, events, cluster, probes, metrics) are always
there; each feature's endpoints are there when its component runs. The OpenAPI document is
generated once from the same list (`gateway.admin.openapi`).
"""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web

from gateway.admin import dashboard
from gateway.admin.endpoint import Call, Endpoint, handler
from gateway.admin.host import AdminHost
from gateway.admin.http import ROLES_KEY, TOKENS_KEY, auth_middleware, error_middleware
from gateway.admin.openapi import openapi_document
from gateway.admin.routes import core, monitoring, record, rollout, rules, shadow
from gateway.config import AdminConfig

MAX_BODY = 1024 * 1024


def admin_endpoints(host: AdminHost, app: web.Application) -> list[Endpoint]:
    """Every endpoint `host` serves (the document's own included)."""
    found = core.endpoints(host) + rules.endpoints(host)
    if host.shadowing is not None:
        found += shadow.endpoints(host.shadowing)
    if host.rollouts is not None:
        found += rollout.endpoints(host.rollouts)
    if host.monitoring is not None:
        found += monitoring.endpoints(host.monitoring)
    if host.recordings is not None:
        found += record.endpoints(host.recordings)
    found += dashboard.install(app, host)
    document: dict[str, Any] = {}

    async def openapi(call: Call) -> Any:
        return document

    found.append(Endpoint("GET", "/admin/openapi.json", "This document", openapi))
    document.update(openapi_document(found))
    return found


def build_admin_app(host: AdminHost) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=MAX_BODY)
    app[TOKENS_KEY] = host.tokens
    app[ROLES_KEY] = host.roles
    for endpoint in admin_endpoints(host, app):
        app.router.add_route(endpoint.method, endpoint.path,
                             handler(endpoint, host.control.route_config))
    return app


def admin_tls_context(config: AdminConfig) -> ssl.SSLContext | None:
    """The admin server's TLS context (``admin.tls``), or None: plain HTTP."""
    if config.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context
