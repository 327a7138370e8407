"""`modelgate` subcommands of the monitoring feature: alarms, drift, probes.

    modelgate alarms [--json]                       rules, state, last value
    modelgate alarms set NAME --threshold X         run-time threshold (audited)
    modelgate alarms reset NAME                     back to the config's threshold
    modelgate drift ROUTE [--window 5m] [--json]    PSI per backend vs live and vs baseline
    modelgate drift ROUTE --baseline [--window 5m]  take the baseline from the last window
    modelgate probes ROUTE [--window 1m] [--json]   null / missing / schema rates per backend
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
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


def register(sub: Any) -> None:
    """Add this feature's subcommands to the top-level parser's subparsers."""
    p = sub.add_parser("alarms", help="alarm rules and their state; change thresholds",
                       description="List alarm rules (state, last value, since when), or "
                                   "change one's threshold at run time.")
    add_client_arguments(p)
    p.set_defaults(func=list_alarms)
    alarm_sub = p.add_subparsers(dest="alarms_command", metavar="ACTION")
    s = alarm_sub.add_parser("set", help="change an alarm's threshold (audited)")
    s.add_argument("name")
    s.add_argument("--threshold", type=float, required=True, help="the new threshold")
    s.add_argument("--reason", help="why (kept in the audit event)")
    add_client_arguments(s)
    s.set_defaults(func=set_threshold)
    s = alarm_sub.add_parser("reset", help="back to the threshold in the config file")
    s.add_argument("name")
    s.add_argument("--reason", help="why (kept in the audit event)")
    add_client_arguments(s)
    s.set_defaults(func=reset_threshold)

    p = sub.add_parser("drift", help="prediction and input drift (PSI) per backend",
                       description="PSI of predicted labels, scores and numeric features per "
                                   "backend, against the live backend and against a baseline.")
    p.add_argument("route")
    p.add_argument("--window", help="sliding window, e.g. 5m (default: the route's drift "
                                    "window)")
    p.add_argument("--baseline", action="store_true",
                   help="take a new baseline from the last window first")
    p.add_argument("--reason", help="why (with --baseline; kept in the audit event)")
    add_client_arguments(p)
    p.set_defaults(func=drift)

    p = sub.add_parser("probes", help="input/output probe rates per backend")
    p.add_argument("route")
    p.add_argument("--window", default="1m", help="window (default %(default)s)")
    add_client_arguments(p)
    p.set_defaults(func=probes)


def _with_client(args: argparse.Namespace, action: Callable[[AdminClient], Any]) -> Any:
    client = AdminClient.from_args(args)
    try:
        return action(client)
    finally:
        client.close()


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return NONE
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _duration(seconds: Any) -> str:
    s = float(seconds)
    if s >= 60 and s % 60 == 0:
        return f"{s / 60:g}m"
    return f"{s:g}s"


def _ago(since: Any) -> str:
    if not isinstance(since, int | float):
        return NONE
    delta = max(0.0, time.time() - since)
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


_STATE_STYLE = {"firing": "bold red", "pending": "yellow", "ok": "green"}


def list_alarms(args: argparse.Namespace) -> int:
    data = _with_client(args, lambda c: c.get("/admin/alarms"))
    if args.json:
        print_json(data)
        return 0
    alarms = data.get("alarms", [])
    if not alarms:
        print("no alarm rules configured (top-level 'alarms:' in the config file)")
        return 0
    table = Table("alarm", "route", "backend", "condition", "window", "for", "state", "value",
                  "since")
    for a in alarms:
        threshold = _num(a["threshold"])
        if a.get("config_threshold") is not None and a["config_threshold"] != a["threshold"]:
            threshold += f" (config {_num(a['config_threshold'])})"
        backend = a["backend"]
        if a.get("value_backend") and a["value_backend"] != backend:
            backend += f" ({a['value_backend']})"
        style = _STATE_STYLE.get(a["state"], "")
        table.add_row(a["name"], a["route"], backend, f"{a['metric']} {a['comparison']} "
                      f"{threshold}", _duration(a["window"]), _duration(a["for"]),
                      f"[{style}]{a['state']}[/]", _num(a.get("value")), _ago(a.get("since")))
    console().print(table)
    return 0


def _put_threshold(args: argparse.Namespace, threshold: float | None) -> int:
    body: dict[str, Any] = {"threshold": threshold}
    if args.reason:
        body["reason"] = args.reason
    path = f"/admin/alarms/{quote(args.name, safe='')}"
    data = _with_client(args, lambda c: c.put(path, body))
    if args.json:
        print_json(data)
    else:
        print(f"{data['name']}: {data['metric']} {data['comparison']} {_num(data['threshold'])} "
              f"(config {_num(data['config_threshold'])}); state {data['state']}")
    return 0


def set_threshold(args: argparse.Namespace) -> int:
    if args.threshold != args.threshold or args.threshold in (float("inf"), float("-inf")):
        raise CliError("--threshold must be a finite number")
    return _put_threshold(args, args.threshold)


def reset_threshold(args: argparse.Namespace) -> int:
    return _put_threshold(args, None)


def drift(args: argparse.Namespace) -> int:
    route = quote(args.route, safe="")

    def call(client: AdminClient) -> Any:
        if args.baseline:
            body: dict[str, Any] = {}
            if args.window:
                body["window"] = args.window
            if args.reason:
                body["reason"] = args.reason
            client.post(f"/admin/routes/{route}/drift/baseline", body)
        return client.get(f"/admin/routes/{route}/drift", window=args.window)

    data = _with_client(args, call)
    if args.json:
        print_json(data)
        return 0
    if not data.get("probes"):
        print(f"route {args.route} has no probes: no drift to show")
        return 0
    base = data.get("baseline")
    con = console()
    con.print(f"route {data['route']}, live {data['live']}, window {_duration(data['window'])}; "
              + (f"baseline taken {_ago(base['taken_at'])} by {base['source']} over "
                 f"{_duration(base['window'])}" if base else "no baseline yet"))
    table = Table("backend", "family", "samples", "PSI vs live", "PSI vs baseline")
    for backend, row in data["backends"].items():
        vs_live = row.get("vs_live") or {}
        vs_base = row.get("vs_baseline") or {}
        families = [("labels", "labels"), ("scores", "scores")]
        families += [(f"feature {f}", f"feature:{f}") for f in vs_base.get("features", {})]
        name = backend + (" (live)" if row.get("live") else "")
        for label, key in families:
            if key.startswith("feature:"):
                feature = key.split(":", 1)[1]
                lv = (vs_live.get("features") or {}).get(feature)
                bv = (vs_base.get("features") or {}).get(feature)
            else:
                lv, bv = vs_live.get(key), vs_base.get(key)
            samples = row.get("samples", {}).get(key, 0)
            if not samples:
                continue
            table.add_row(name, label, _num(samples), _num(lv), _num(bv))
            name = ""
    con.print(table)
    return 0


def probes(args: argparse.Namespace) -> int:
    route = quote(args.route, safe="")
    data = _with_client(args, lambda c: c.get(f"/admin/routes/{route}/probes",
                                              window=args.window))
    if args.json:
        print_json(data)
        return 0
    table = Table("backend", "requests", "error rate", "null rate", "missing rate",
                  "schema errors", "error bodies", "mean length")
    for backend, row in data["backends"].items():
        table.add_row(backend, _num(row["requests"]), _num(row.get("error_rate")),
                      _num(row.get("null_rate")), _num(row.get("missing_rate")),
                      _num(row.get("schema_error_rate")), _num(row.get("error_body_rate")),
                      _num(row.get("mean_input_length")))
    console().print(f"route {data['route']}, last {_duration(data['window'])}")
    console().print(table)
    return 0
