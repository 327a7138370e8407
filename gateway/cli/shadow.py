"""`modelgate shadow` (turn mirroring on/off) and `modelgate shadow-report` (the comparison).

    modelgate shadow classifier --backend green --sample 50
    modelgate shadow classifier --off
    modelgate shadow classifier                 # show the current setting
    modelgate shadow-report classifier [--window 60s] [--json]
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from gateway.cli.client import (
    AdminClient,
    CliError,
    add_client_arguments,
    console,
    print_json,
)


def register(sub: Any) -> None:
    """Add this feature's subcommands to the top-level parser's subparsers."""
    p = sub.add_parser(
        "shadow", help="mirror a sample of a route's requests to another backend (or stop)",
        description="Mirror a sample of ROUTE's requests to BACKEND and compare its "
        "predictions with the live backend's. Clients only ever see the live answer.")
    p.add_argument("route")
    p.add_argument("--backend", help="the backend to mirror to")
    p.add_argument("--sample", type=float, default=None,
                   help="percent of requests to mirror, 0-100 (default 100); sticky per "
                   "user key when the route has one")
    p.add_argument("--off", action="store_true", help="stop mirroring")
    p.add_argument("--reason", help="why (kept in the audit event)")
    add_client_arguments(p)
    p.set_defaults(func=shadow)

    r = sub.add_parser(
        "shadow-report", help="how the shadow's predictions compare with the live ones",
        description="Agreement, confusion counts (live label x shadow label), numeric "
        "deltas, errors, drops and latency of live vs shadow, over the window and since start.")
    r.add_argument("route")
    r.add_argument("--window", default=None,
                   help="sliding window, e.g. 60s (default: the route's shadow.window)")
    r.add_argument("--backend", default=None,
                   help="report on a past shadow backend (default: the current or last one)")
    add_client_arguments(r)
    r.set_defaults(func=shadow_report)


def shadow(args: argparse.Namespace) -> int:
    if args.off and (args.backend is not None or args.sample is not None):
        raise CliError("--off takes no --backend or --sample", exit_code=2)
    if args.sample is not None and args.backend is None:
        raise CliError("--sample needs --backend", exit_code=2)
    client = AdminClient.from_args(args)
    try:
        path = f"/admin/routes/{args.route}/shadow"
        if args.off:
            view = client.delete(path)
        elif args.backend is not None:
            body: dict[str, Any] = {"backend": args.backend}
            if args.sample is not None:
                body["sample"] = args.sample
            if args.reason:
                body["reason"] = args.reason
            view = client.put(path, body)
        else:
            view = client.get(f"/admin/routes/{args.route}")
    finally:
        client.close()
    if args.json:
        print_json(view)
        return 0
    current = view.get("shadow")
    if current:
        print(f"route {view['name']}: mirroring {current['sample']:g}% of requests to "
              f"{current['backend']} (live: {view['live']})")
    else:
        print(f"route {view['name']}: shadow off (live: {view['live']})")
    return 0


def shadow_report(args: argparse.Namespace) -> int:
    client = AdminClient.from_args(args)
    try:
        report = client.get(f"/admin/routes/{args.route}/shadow", window=args.window,
                            backend=args.backend)
    finally:
        client.close()
    if args.json:
        print_json(report)
        return 0
    render_report(report, console())
    return 0


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def render_report(report: dict[str, Any], console: Console) -> None:
    """Two columns (window, since start) of the main figures, then the confusion counts."""
    state = report.get("shadow")
    if state:
        head = (f"route {report['route']}: live {report['live']}, shadow {state['backend']} "
                f"at {state['sample']:g}%")
    else:
        head = f"route {report['route']}: live {report['live']}, shadow off"
    compare = report["compare"]
    how = compare["preset"] or f"path {compare['path']}"
    console.print(f"{head}; comparing {how}")
    window, total = report.get("window"), report.get("total")
    if window is None or total is None:
        console.print("no mirrored requests yet")
        return
    if report.get("backend") and (not state or state["backend"] != report["backend"]):
        console.print(f"(figures for backend {report['backend']})")

    table = Table(title=f"shadow report: {report['route']} -> {report['backend']}")
    table.add_column("")
    table.add_column(f"last {window['seconds']:g}s", justify="right")
    table.add_column("since start", justify="right")
    rows: list[tuple[str, str, str]] = [
        ("pairs compared", str(window["compared"]), str(total["compared"])),
        ("agreement", _pct(window["agreement_rate"]), _pct(total["agreement_rate"])),
        ("pairs in full agreement", _pct(window["pair_agreement_rate"]),
         _pct(total["pair_agreement_rate"])),
        ("elements compared", str(window["elements"]["compared"]),
         str(total["elements"]["compared"])),
        ("disagreeing pairs", str(window["disagree"]), str(total["disagree"])),
        ("copies dropped", str(window["dropped"]), str(total["dropped"])),
        ("  of which shadow down", str(window["dropped_shadow_down"]),
         str(total["dropped_shadow_down"])),
        ("shadow errors", str(window["shadow_errors"]), str(total["shadow_errors"])),
        ("shadow timeouts", str(window["shadow_timeouts"]), str(total["shadow_timeouts"])),
        ("live errors", str(window["live_errors"]), str(total["live_errors"])),
        ("unparsed", str(window["unparsed"]), str(total["unparsed"])),
    ]
    if total["numbers"]["compared"]:
        rows += [
            ("numbers within tolerance",
             f"{window['numbers']['within_tolerance']}/{window['numbers']['compared']}",
             f"{total['numbers']['within_tolerance']}/{total['numbers']['compared']}"),
            ("mean |delta|", _num(window["numbers"]["mean_delta"]),
             _num(total["numbers"]["mean_delta"])),
            ("max |delta|", _num(window["numbers"]["max_delta"]),
             _num(total["numbers"]["max_delta"])),
        ]
    if total["text"]["compared"]:
        rows.append(("texts agreeing", f"{window['text']['agree']}/{window['text']['compared']}",
                     f"{total['text']['agree']}/{total['text']['compared']}"))
        if total["text"]["mean_similarity"] is not None:
            rows.append(("mean similarity", _num(window["text"]["mean_similarity"]),
                         _num(total["text"]["mean_similarity"])))
    for side in ("live", "shadow"):
        for q in ("p50", "p99"):
            rows.append((f"{side} latency {q}", _ms(window["latency"][side][q]),
                         _ms(total["latency"][side][q])))
    for row in rows:
        table.add_row(*row)
    console.print(table)

    matrix: dict[str, dict[str, int]] = window["confusion"] or total["confusion"]
    if matrix:
        which = f"last {window['seconds']:g}s" if window["confusion"] else "since start"
        shadow_labels = sorted({s for row in matrix.values() for s in row})
        conf = Table(title=f"confusion counts ({which}): rows live, columns shadow")
        conf.add_column("live \\ shadow")
        for label in shadow_labels:
            conf.add_column(label, justify="right")
        for live in sorted(matrix):
            conf.add_row(live, *(str(matrix[live].get(s, 0)) for s in shadow_labels))
        console.print(conf)
    queue = report["queue"]
    console.print(f"queue {queue['depth']}/{queue['capacity']} copies, "
                  f"{queue['senders']} senders; timeout {report['timeout']:g}s")
    if report.get("log"):
        lg = report["log"]
        console.print(f"comparison log {lg['path']}: {lg['written']} lines written, "
                      f"{lg['dropped']} dropped"
                      + (" (bodies redacted)" if lg["redact_bodies"] else ""))
