"""The shadow report."""

from __future__ import annotations

from typing import Any

from gateway.admin.endpoint import Call, Endpoint
from gateway.admin.models import SHADOW_QUERY, ShadowQuery
from gateway.config import RouteConfig
from gateway.shadow.component import Shadowing


def endpoints(shadowing: Shadowing) -> list[Endpoint]:
    async def report(call: Call) -> Any:
        query: ShadowQuery = call.query
        return shadowing.report(call.route, query.window, query.backend)

    def context(cfg: RouteConfig) -> dict[str, Any]:
        return {"max_window": shadowing.window(cfg.name)}

    return [Endpoint(
        "GET", "/admin/routes/{route}/shadow",
        "Shadow report: agreement, confusion counts, numeric delta, errors, drops and live vs "
        "shadow latency, over the window and since start", report, query=SHADOW_QUERY,
        context=context)]
