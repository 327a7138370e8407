"""Core subcommands: serve, check-config, config-schema, model-server, demo, and the operator
commands status, canary, switch, rollback and events (thin clients of the admin API).

Operator commands print rich tables or one summary line by default and the API's JSON with
``--json``; every failure is a `CliError` (one line on stderr, exit 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.table import Table

from gateway.cli.client import (
    NONE,
    AdminClient,
    CliError,
    add_client_arguments,
    console,
    print_json,
)
from gateway.errors import ConfigError
from gateway.logs import add_log_arguments


def register(sub: Any) -> None:
    from gateway.demo import launcher, model_server
    from gateway.serve import UPSTREAM_KINDS

    p = sub.add_parser("serve", help="run the gateway from a config file",
                       description="Run the gateway until SIGINT/SIGTERM (then drain and stop).")
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="config file (YAML)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes on the same port, supervised (more than 1 needs a "
                        "shared store: store: redis://…); worker i serves the admin API on "
                        "the admin port + i")
    p.add_argument("--upstream", choices=UPSTREAM_KINDS, default="fast",
                   help="upstream client: fast (httptools keep-alive pool, default) or aiohttp")
    p.add_argument("--insecure-admin", action="store_true",
                   help="allow admin.listen on a non-loopback address without admin.tls (TLS "
                        "terminates elsewhere, or the network keeps the port private)")
    add_log_arguments(p, default_format="json")
    # Set by the --workers supervisor (gateway/cluster/workers.py) and the demo's replicas.
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=serve)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=check_config)

    p = sub.add_parser("config-schema", help="print the JSON Schema of the config file "
                       "(for editors: # yaml-language-server: $schema=...)")
    p.add_argument("-o", "--output", default=None, help="write it to this file instead")
    p.set_defaults(func=config_schema)

    p = sub.add_parser("model-server", help="run the demo model server (KServe V2 classifier)")
    model_server.add_arguments(p)
    p.set_defaults(func=model_server.run)

    p = sub.add_parser("demo", help="run the demo: blue and green model servers behind the gateway")
    launcher.add_arguments(p)
    p.set_defaults(func=launcher.run_demo)

    p = sub.add_parser("status", help="routes and their routing state")
    p.add_argument("route", nargs="?", help="show this route's backends and traffic shares")
    add_client_arguments(p)
    p.set_defaults(func=status)

    p = sub.add_parser("canary", help="send a share of a route's traffic to a canary backend")
    p.add_argument("route")
    p.add_argument("--backend", help="canary backend (default: the route's current canary)")
    p.add_argument("--weight", type=float, required=True,
                   help="percent of traffic, 0-100 in 0.01 steps (0 stops the canary)")
    p.add_argument("--reason", help="why (kept in the audit event)")
    add_client_arguments(p)
    p.set_defaults(func=canary)

    p = sub.add_parser("switch", help="blue-green: make another backend live at once")
    p.add_argument("route")
    p.add_argument("to", help="the backend to make live")
    p.add_argument("--force", action="store_true", help="switch even if a guard objects")
    p.add_argument("--bake", help="watch the rollout gates this long after the switch and "
                                  "switch back on failure, e.g. 5m")
    p.add_argument("--reason", help="why (kept in the audit event)")
    add_client_arguments(p)
    p.set_defaults(func=switch)

    p = sub.add_parser("rollback", help="all traffic back to the last known-good backend")
    p.add_argument("route")
    p.add_argument("--reason", help="why (kept in the audit event)")
    add_client_arguments(p)
    p.set_defaults(func=rollback)

    p = sub.add_parser("events", help="the audit log: who changed what, when and why")
    p.add_argument("--route", help="only this route's events")
    p.add_argument("--limit", type=int, default=50, help="newest N events (default %(default)s)")
    add_client_arguments(p)
    p.set_defaults(func=events)


# -- local commands ----------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    from gateway.serve import run_server

    return run_server(args.config, workers=args.workers, upstream=args.upstream,
                      log_level=args.log_level, log_format=args.log_format,
                      worker_index=args.worker_index, worker_spec=args.worker_spec,
                      supervisor_pid=args.supervisor_pid, insecure_admin=args.insecure_admin)


def check_config(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"modelgate: {args.file}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK ({len(config.routes)} routes)")
    return 0


def config_schema(args: argparse.Namespace) -> int:
    import json

    from gateway.config import config_schema as schema

    text = json.dumps(schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


# -- operator commands -------------------------------------------------------------------------
def _with_client(args: argparse.Namespace, action: Callable[[AdminClient], Any]) -> Any:
    client = AdminClient.from_args(args)
    try:
        return action(client)
    finally:
        client.close()


def _route_path(route: str, suffix: str = "") -> str:
    return f"/admin/routes/{quote(route, safe='')}{suffix}"


def pct(value: Any) -> str:
    return f"{float(value):g}%"


def _split_text(part: Any, key: str) -> str:
    if not isinstance(part, dict) or not part.get("backend"):
        return NONE
    return f"{part['backend']} {pct(part.get(key, 0))}"


def traffic_text(view: dict[str, Any]) -> str:
    traffic = view.get("traffic") or {}
    return ", ".join(f"{name} {pct(share)}" for name, share in traffic.items())


def state_line(view: dict[str, Any]) -> str:
    """One line for a route after a change: what is live and who gets what."""
    line = f"live {view['live']}; traffic {traffic_text(view)}"
    if view.get("shadow"):
        line += f"; shadow {_split_text(view['shadow'], 'sample')}"
    return f"{line} (version {view.get('version')})"


def rollout_text(view: dict[str, Any]) -> str:
    """``progressing 2/3 green 50%`` for a route with a rollout, else ``-``."""
    rollout = view.get("rollout")
    if not isinstance(rollout, dict) or not rollout.get("phase"):
        return NONE
    steps = rollout.get("steps") or []
    where = f" {int(rollout.get('step', 0)) + 1}/{len(steps)}" if steps else ""
    return (f"{rollout['phase']}{where} {rollout.get('backend') or ''} "
            f"{pct(rollout.get('weight', 0))}").replace("  ", " ")


def routes_table(views: list[dict[str, Any]]) -> Table:
    table = Table(title="routes", title_justify="left")
    for col in ("route", "live", "canary", "shadow", "rollout", "previous", "version"):
        table.add_column(col, justify="right" if col == "version" else "left")
    for v in views:
        table.add_row(v["name"], v["live"], _split_text(v.get("canary"), "weight"),
                      _split_text(v.get("shadow"), "sample"), rollout_text(v),
                      v.get("previous") or NONE, str(v.get("version", "")))
    return table


def backends_table(view: dict[str, Any]) -> Table:
    """Each backend of one route: its role, its share of traffic and its URLs."""
    match = view.get("match") or {}
    where = match.get("path_prefix", "")
    if match.get("host"):
        where = f"{match['host']}{where}"
    sticky = view.get("sticky")
    sticky_text = (", sticky on " + ", ".join(f"{k} {v}" for k, v in sticky.items())
                   if sticky else ", no sticky key")
    table = Table(title=f"{view['name']}: {where}{sticky_text}", title_justify="left")
    for col in ("backend", "role", "traffic", "urls"):
        table.add_column(col, justify="right" if col == "traffic" else "left")
    traffic = view.get("traffic") or {}
    canary_part = view.get("canary") or {}
    shadow_part = view.get("shadow") or {}
    for name, backend in (view.get("backends") or {}).items():
        roles = []
        if name == view.get("live"):
            roles.append("live")
        if name == canary_part.get("backend"):
            roles.append("canary")
        if name == shadow_part.get("backend"):
            roles.append(f"shadow ({pct(shadow_part.get('sample', 0))} copied)")
        if name == view.get("previous"):
            roles.append("previous")
        ruled = [str(r.get("name")) for r in view.get("rules") or []
                 if isinstance(r, dict) and r.get("backend") == name]
        if ruled:
            roles.append(f"rules {', '.join(ruled)}")
        urls = backend.get("urls") or [backend.get("url", "")]
        table.add_row(name, ", ".join(roles) or NONE, pct(traffic.get(name, 0)),
                      " ".join(urls))
    return table


def status(args: argparse.Namespace) -> int:
    def call(client: AdminClient) -> Any:
        if args.route:
            return client.get(_route_path(args.route))
        return {**client.get("/admin/routes"), "cluster": client.get("/admin/cluster")}

    data = _with_client(args, call)
    if args.json:
        print_json(data)
        return 0
    out = console()
    if args.route:
        out.print(routes_table([data]))
        out.print(backends_table(data))
    else:
        out.print(routes_table(data.get("routes", [])))
        out.print(cluster_table(data["cluster"]))
    return 0


def cluster_table(view: dict[str, Any]) -> Table:
    """The gateway processes sharing the store; `*` marks the controller lease holder."""
    store = view.get("store") or {}
    state = "up" if store.get("up") else "DOWN"
    holder = (view.get("lease") or {}).get("holder") or "none"
    table = Table(title=f"cluster: store {store.get('kind')} {store.get('url')} ({state}), "
                        f"controller {holder}", title_justify="left")
    for col in ("process", "host", "pid", "worker", "proxy", "admin", "version", "heartbeat"):
        table.add_column(col)
    now = time.time()
    for m in view.get("members") or []:
        beat = m.get("heartbeat")
        age = f"{max(0.0, now - beat):.1f}s ago" if isinstance(beat, int | float) else NONE
        marker = "*" if m.get("leader") else ""
        table.add_row(f"{marker}{m.get('id')}", str(m.get("host")), str(m.get("pid")),
                      NONE if m.get("worker") is None else str(m["worker"]),
                      ", ".join(m.get("address") or []) or NONE, m.get("admin") or NONE,
                      str(m.get("version")), age)
    if view.get("error"):
        table.caption = view["error"]
    return table


def _change(args: argparse.Namespace, method: str, suffix: str, body: dict[str, Any],
            verb: str) -> int:
    def call(client: AdminClient) -> Any:
        return client.request(method, _route_path(args.route, suffix), body)

    view = _with_client(args, call)
    if args.json:
        print_json(view)
    else:
        print(f"{args.route}: {verb}: {state_line(view)}")
    return 0


def _with_reason(body: dict[str, Any], reason: str | None) -> dict[str, Any]:
    if reason:
        body["reason"] = reason
    return body


def _number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def canary(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"weight": _number(args.weight)}
    if args.backend:
        body["backend"] = args.backend
    verb = "canary stopped" if args.weight == 0 else "canary set"
    return _change(args, "PUT", "/canary", _with_reason(body, args.reason), verb)


def switch(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"to": args.to}
    if args.force:
        body["force"] = True
    if args.bake:
        body["bake"] = args.bake
    return _change(args, "POST", "/switch", _with_reason(body, args.reason), "switched")


def rollback(args: argparse.Namespace) -> int:
    return _change(args, "POST", "/rollback", _with_reason({}, args.reason), "rolled back")


# -- events --------------------------------------------------------------------------------------
_PAIRED = (("canary", "canary_weight"), ("shadow", "shadow_sample"))
# Follow from the other fields, or too long for a table cell (a rollout's gate analysis is in
# the event's reason and in --json).
_QUIET = frozenset({"version", "previous", "analysis"})


def _short(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _split_of(doc: dict[str, Any], key: str, weight_key: str) -> str:
    backend, weight = doc.get(key), doc.get(weight_key) or 0
    if not backend or not weight:
        return "none"
    return f"{backend} {pct(weight)}"


def _rule_names(doc: dict[str, Any]) -> str:
    rules = doc.get("rules") or []
    return _short(",".join(str(r.get("name")) for r in rules if isinstance(r, dict))
                  or None)


def change_summary(before: Any, after: Any) -> str:
    """What an event changed, e.g. ``live blue→green`` or ``canary none→green 10%``."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        doc = after if isinstance(after, dict) else before
        if not isinstance(doc, dict):
            return ""
        return ", ".join(f"{k}={_short(v)}" for k, v in doc.items() if k not in _QUIET)
    parts: list[str] = []
    if before.get("live") != after.get("live"):
        parts.append(f"live {_short(before.get('live'))}→{_short(after.get('live'))}")
    handled = set(_QUIET) | {"live"}
    for key, weight_key in _PAIRED:
        handled |= {key, weight_key}
        old, new = _split_of(before, key, weight_key), _split_of(after, key, weight_key)
        if old != new:
            parts.append(f"{key} {old}→{new}")
    handled.add("rules")
    if before.get("rules") != after.get("rules"):
        parts.append(f"rules {_rule_names(before)}→{_rule_names(after)}")
    for key in [*before, *(k for k in after if k not in before)]:
        if key not in handled and before.get(key) != after.get(key):
            parts.append(f"{key} {_short(before.get(key))}→{_short(after.get(key))}")
    return ", ".join(parts)


def events_table(items: list[dict[str, Any]]) -> Table:
    table = Table(title="events (oldest first)", title_justify="left")
    for col in ("time", "route", "actor", "action", "change", "reason"):
        table.add_column(col)
    for e in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e.get("time", 0))))
        table.add_row(when, e.get("route") or NONE, str(e.get("actor", "")),
                      str(e.get("action", "")), change_summary(e.get("before"), e.get("after")),
                      e.get("reason") or "")
    return table


def events(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    data = _with_client(args, lambda c: c.get("/admin/events", route=args.route,
                                              limit=args.limit))
    if args.json:
        print_json(data)
        return 0
    console().print(events_table(data.get("events", [])))
    return 0
