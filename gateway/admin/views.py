"""Read-only views the admin API and the dashboard share: a route, the cluster."""

from __future__ import annotations

from typing import Any

from gateway.admin.host import AdminHost
from gateway.component import Host
from gateway.errors import StoreError
from gateway.store.url import redacted_url


def route_view(host: Host, name: str) -> dict[str, Any]:
    """``GET /admin/routes/{route}``: routing state, backends, and each component's details
    (`Hooks.route_details`)."""
    cfg = host.control.route_config(name)
    state = host.control.state(name)
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
        "rules": [rule.to_json() for rule in state.rules],
    }
    for details in host.hooks.route_details:
        view.update(details(name))
    return view


def store_kind(host: Host) -> str:
    return "redis" if host.store.shared else "memory"


async def cluster_view(host: AdminHost) -> dict[str, Any]:
    """The processes sharing this gateway's store and which one holds the controller lease.

    Answers during a store outage too, with what this process knows (itself)."""
    lease = host.lease
    view: dict[str, Any] = {
        "self": host.member_id,
        "store": {"kind": store_kind(host), "url": redacted_url(host.config.store),
                  "up": host.store.up},
        "lease": {"name": lease.name, "holder": None, "held_here": lease.held},
        "members": [],
    }
    try:
        view["lease"]["holder"] = await host.store.lease_holder(lease.name)
        members = await host.store.members()
    except StoreError as exc:
        view["error"] = f"store unavailable: {exc}"
        members = [dict(host.member_info(), id=host.member_id, heartbeat=None)]
    holder = view["lease"]["holder"]
    view["members"] = sorted(
        ({**m, "leader": m.get("id") == holder} for m in members),
        key=lambda m: (str(m.get("host")), m.get("worker") or 0, int(m.get("pid") or 0)),
    )
    return view

