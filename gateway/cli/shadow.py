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
    """Columns (the window, if any, then since start) of the main figures, then the
    confusion counts. A replay report (``modelgate replay``) has no window: one column."""
    replayed = report.get("replay")
    state = report.get("shadow")
    if replayed:
        head = (f"replay of {replayed['file']}: route {report['route']}, recorded live "
                f"{report['live']}, candidate {report['backend']}")
    elif state:
        head = (f"route {report['route']}: live {report['live']}, shadow {state['backend']} "
                f"at {state['sample']:g}%")
    else:
        head = f"route {report['route']}: live {report['live']}, shadow off"
    compare = report["compare"]
    how = compare["preset"] or f"path {compare['path']}"
    console.print(f"{head}; comparing {how}")
    window, total = report.get("window"), report.get("total")
    if total is None or (window is None and not replayed):
        console.print("no mirrored requests yet")
        return
    if report.get("backend") and not replayed and (
            not state or state["backend"] != report["backend"]):
        console.print(f"(figures for backend {report['backend']})")

    columns: list[tuple[str, dict[str, Any]]] = []
    if window is not None:
        columns.append((f"last {window['seconds']:g}s", window))
    columns.append(("replayed" if replayed else "since start", total))
    side = "candidate" if replayed else "shadow"
    table = Table(title=f"{'replay' if replayed else 'shadow'} report: {report['route']} -> "
                        f"{report['backend']}")
    table.add_column("")
    for title, _ in columns:
        table.add_column(title, justify="right")

    def add(label: str, cell: Any) -> None:
        table.add_row(label, *(cell(data) for _, data in columns))

    add("pairs compared", lambda d: str(d["compared"]))
    add("agreement", lambda d: _pct(d["agreement_rate"]))
    add("pairs in full agreement", lambda d: _pct(d["pair_agreement_rate"]))
    add("elements compared", lambda d: str(d["elements"]["compared"]))
    add("disagreeing pairs", lambda d: str(d["disagree"]))
    if not replayed:
        add("copies dropped", lambda d: str(d["dropped"]))
        add("  of which shadow down", lambda d: str(d["dropped_shadow_down"]))
    add(f"{side} errors", lambda d: str(d["shadow_errors"]))
    add(f"{side} timeouts", lambda d: str(d["shadow_timeouts"]))
    add("live errors", lambda d: str(d["live_errors"]))
    add("unparsed", lambda d: str(d["unparsed"]))
    if total["numbers"]["compared"]:
        add("numbers within tolerance",
            lambda d: f"{d['numbers']['within_tolerance']}/{d['numbers']['compared']}")
        add("mean |delta|", lambda d: _num(d["numbers"]["mean_delta"]))
        add("max |delta|", lambda d: _num(d["numbers"]["max_delta"]))
    if total["text"]["compared"]:
        add("texts agreeing", lambda d: f"{d['text']['agree']}/{d['text']['compared']}")
        if total["text"]["mean_similarity"] is not None:
            add("mean similarity", lambda d: _num(d["text"]["mean_similarity"]))
    for who, key in (("live", "live"), (side, "shadow")):
        for q in ("p50", "p99"):
            add(f"{who} latency {q}", lambda d, k=key, q=q: _ms(d["latency"][k][q]))
    console.print(table)

    which, matrix = columns[-1][0], total["confusion"]
    if window is not None and window["confusion"]:
        which, matrix = columns[0][0], window["confusion"]
    if matrix:
        shadow_labels = sorted({s for row in matrix.values() for s in row})
        conf = Table(title=f"confusion counts ({which}): rows live, columns {side}")
        conf.add_column(f"live \\ {side}")
        for label in shadow_labels:
            conf.add_column(label, justify="right")
        for live in sorted(matrix):
            conf.add_row(live, *(str(matrix[live].get(s, 0)) for s in shadow_labels))
        console.print(conf)
    if replayed:
        rate = f", at most {replayed['rate']:g}/s" if replayed["rate"] else ""
        console.print(f"{replayed['requests']} requests replayed in {replayed['elapsed_s']:g}s, "
                      f"{replayed['concurrency']} at a time{rate}; timeout "
                      f"{report['timeout']:g}s")
        return
    queue = report["queue"]
    console.print(f"queue {queue['depth']}/{queue['capacity']} copies, "
                  f"{queue['senders']} senders; timeout {report['timeout']:g}s")
    if report.get("log"):
        lg = report["log"]
        console.print(f"comparison log {lg['path']}: {lg['written']} lines written, "
                      f"{lg['dropped']} dropped"
                      + (" (bodies redacted)" if lg["redact_bodies"] else ""))
