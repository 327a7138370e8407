"""The rollout component (stub: filled in by its issue)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.config import RouteConfig
from gateway.routing import Tap
from gateway.state import RouteState

if TYPE_CHECKING:
    from gateway.app import Gateway


class Rollouts:
    name = "rollout"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def tap(self, route: RouteConfig, state: RouteState) -> Tap | None:
        return None

    def add_admin_routes(self, app: web.Application) -> None:
        return None
