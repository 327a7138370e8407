"""`modelgate rollout start|pause|resume|promote|abort|status ROUTE`: steer canary rollouts.

``start`` builds the API body from ``--plan-file`` (JSON, the same keys as the config's
``rollout:`` section) overlaid with the flags; with neither, the route's config plan is used.
``status --watch`` redraws a live view (step bar, weight, time in step, each gate's value and
verdict; in sequential mode the test's verdict, p-values and the samples behind them, and
what the p-values assume: independent requests, rule-routed ones left out) until
the rollout ends; its exit code is 0 when promoted, 1 when rolled back or aborted.
Every command takes --admin/--token/--json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from gateway.cli.client import (
    AdminClient,
    CliError,
    add_client_arguments,
    console,
    print_json,
)

TERMINAL = frozenset({"promoted", "rolled_back", "aborted"})
VERDICT_STYLE = {"pass": "green", "fail": "bold red", "no_data": "yellow", "skipped": "dim",
                 "worse": "bold red", "not_worse": "green", "pending": "yellow"}
PHASE_STYLE = {"progressing": "cyan", "paused": "yellow", "promoted": "green",
               "rolled_back": "bold red", "aborted": "red"}
GATE_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("max_error_rate", float, "max 5xx fraction of the candidate, e.g. 0.01"),
    ("max_error_rate_ratio", float, "max candidate/live error-rate ratio, e.g. 2"),
    ("max_p99_ms", float, "max candidate p99 latency in ms"),
    ("max_p99_ratio", float, "max candidate/live p99 ratio, e.g. 1.5"),
    ("max_null_rate", float, "max null-output fraction (needs output probes)"),
    ("min_shadow_agreement", float, "min shadow agreement rate (when shadowing)"),
    ("max_ttft_p99_ms", float, "max candidate p99 time to first event of streamed answers, ms"),
    ("max_ttft_p99_ratio", float, "max candidate/live p99 time-to-first-event ratio"),
    ("min_requests", int, "requests in the window before a gate may pass or fail"),
)

SEQUENTIAL_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("alpha", float, "sequential: false-alarm bound, e.g. 0.05"),
    ("margin", float, "sequential: error-rate margin of 'not worse', e.g. 0.01"),
    ("min_samples", int, "sequential: candidate requests before any verdict (and per step)"),
    ("latency_ms", float, "sequential: also test the share of requests slower than this"),
)


def register(sub: Any) -> None:
    """Add ``modelgate rollout ...`` to the top-level parser's subparsers."""
    parser = sub.add_parser(
        "rollout", help="progressive delivery: canary ramps judged by live gates",
        description="Start and steer canary rollouts; watch their progress.",
    )
    actions = parser.add_subparsers(dest="rollout_action", metavar="ACTION", required=True)

    p = actions.add_parser("start", help="start a rollout (flags override --plan-file and "
                                         "the route's config plan)")
    p.add_argument("route")
    p.add_argument("--backend", help="the candidate backend")
    p.add_argument("--steps", help="weights in percent, comma-separated: 10,50,100")
    p.add_argument("--step", type=float, help="linear ramp: weight step (with --max-weight)")
    p.add_argument("--max-weight", type=float, help="linear ramp: last weight (default 100)")
    p.add_argument("--interval", help="bake time of each step: 500ms, 30s, 2m")
    p.add_argument("--check-interval", help="how often the gates are checked")
    p.add_argument("--window", help="analysis window (default: the interval)")
    p.add_argument("--failure-threshold", type=int,
                   help="consecutive failed checks that roll back")
    for name, kind, text in GATE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    p.add_argument("--analysis", choices=("fixed", "sequential"),
                   help="sequential: an always-valid test against live stops the rollout "
                        "early (roll back when worse, advance when not worse by --margin)")
    for name, kind, text in SEQUENTIAL_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    p.add_argument("--no-firing-alarms", action="store_true",
                   help="fail a check while a monitoring alarm of the route fires")
    p.add_argument("--plan-file", help="JSON file with the plan (config keys); gate flags "
                                       "override its gates one by one")
    p.add_argument("--force", action="store_true", help="skip the candidate readiness check")
    p.add_argument("--reason", help="why (kept in the audit log)")
    add_client_arguments(p)
    p.set_defaults(func=cmd_start)

    for action, text in (("pause", "hold the current weight"),
                         ("resume", "continue a paused rollout (the step bakes anew)"),
                         ("promote", "skip to 100%%: the candidate becomes live now"),
                         ("abort", "roll back now: canary weight to 0")):
        p = actions.add_parser(action, help=text)
        p.add_argument("route")
        p.add_argument("--reason", help="why (kept in the audit log)")
        add_client_arguments(p)
        p.set_defaults(func=cmd_action, action=action)

    p = actions.add_parser("status", help="phase, step, weight and gates of a rollout")
    p.add_argument("route")
    p.add_argument("--watch", action="store_true",
                   help="redraw until the rollout ends (exit 0 promoted, 1 otherwise)")
    p.add_argument("--every", type=float, default=1.0,
                   help="seconds between refreshes with --watch (default %(default)s)")
    add_client_arguments(p)
    p.set_defaults(func=cmd_status)


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST body from --plan-file and flags (flags win; gate flags merge into gates)."""
    body: dict[str, Any] = {}
    if args.plan_file:
        try:
            loaded = orjson.loads(Path(args.plan_file).read_bytes())
        except OSError as exc:
            raise CliError(f"cannot read {args.plan_file}: {exc.strerror or exc}") from None
        except orjson.JSONDecodeError as exc:
            raise CliError(f"{args.plan_file}: not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise CliError(f"{args.plan_file}: must hold a JSON object")
        body.update(loaded)
    if args.steps is not None:
        try:
            body["steps"] = [_number(s) for s in args.steps.split(",") if s.strip()]
        except ValueError:
            raise CliError(f"--steps: expected numbers like 10,50,100, got {args.steps!r}") \
                from None
        body.pop("step", None)
        body.pop("max_weight", None)
    if args.step is not None or args.max_weight is not None:
        body.pop("steps", None)
        if args.step is not None:
            body["step"] = args.step
        if args.max_weight is not None:
            body["max_weight"] = args.max_weight
    for key in ("backend", "interval", "check_interval", "window", "failure_threshold",
                "reason"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    gates = dict(body.get("gates") or {})
    for name, _, _ in GATE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            gates[name] = value
    if args.no_firing_alarms:
        gates["no_firing_alarms"] = True
    if gates:
        body["gates"] = gates
    analysis = dict(body.get("analysis") or {})
    if args.analysis is not None:
        analysis["mode"] = args.analysis
    for name, _, _ in SEQUENTIAL_FLAGS:
        value = getattr(args, name)
        if value is not None:
            analysis[name] = value
    if analysis:
        body["analysis"] = analysis
    if args.force:
        body["force"] = True
    return body


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() else value


def _path(route: str) -> str:
    return f"/admin/routes/{route}/rollout"


def cmd_start(args: argparse.Namespace) -> int:
    body = build_body(args)
    client = AdminClient.from_args(args)
    try:
        view = client.post(_path(args.route), body)
    finally:
        client.close()
    _show(args, view)
    return 0


def cmd_action(args: argparse.Namespace) -> int:
    client = AdminClient.from_args(args)
    body = {"reason": args.reason} if args.reason else {}
    try:
        view = client.post(f"{_path(args.route)}/{args.action}", body)
    finally:
        client.close()
    _show(args, view)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = AdminClient.from_args(args)
    try:
        if not args.watch:
            _show(args, client.get(_path(args.route)))
            return 0
        return _watch(args, client)
    finally:
        client.close()


def _watch(args: argparse.Namespace, client: AdminClient) -> int:
    every = max(0.05, args.every)
    view = client.get(_path(args.route))
    if args.json:
        # One JSON line per refresh: easy to pipe into jq or a log.
        while True:
            print(orjson.dumps(view).decode(), flush=True)
            if view.get("phase") in TERMINAL:
                break
            time.sleep(every)
            view = client.get(_path(args.route))
    else:
        with Live(render(view), console=console(), refresh_per_second=8,
                  auto_refresh=False) as live:
            while view.get("phase") not in TERMINAL:
                time.sleep(every)
                view = client.get(_path(args.route))
                live.update(render(view), refresh=True)
    return 0 if view.get("phase") == "promoted" else 1


def _show(args: argparse.Namespace, view: dict[str, Any]) -> None:
    if args.json:
        print_json(view)
    else:
        console().print(render(view))


def step_bar(steps: list[float], step: int, phase: str) -> Text:
    """``10% ━ [50%] ─ 100%``: done steps green, the current one highlighted."""
    text = Text()
    for i, weight in enumerate(steps):
        if i:
            text.append(" ━ " if i <= step else " ─ ", style="green" if i <= step else "dim")
        label = f"{weight:g}%"
        if i < step or phase == "promoted":
            text.append(label, style="green")
        elif i == step:
            style = PHASE_STYLE.get(phase, "bold")
            text.append(f"[{label}]", style=f"bold {style}")
        else:
            text.append(label, style="dim")
    if phase == "promoted":
        text.append("  ✔ live", style="bold green")
    return text


def render(view: dict[str, Any]) -> RenderableType:
    """The rollout's progress view (used by `status` and `status --watch`)."""
    phase = str(view.get("phase"))
    kind = view.get("kind", "canary")
    head = Text()
    head.append(f"route {view.get('route')}: ", style="bold")
    what = "bake of" if kind == "bake" else "canary"
    head.append(f"{what} {view.get('backend')!r} over {view.get('baseline')!r}  ")
    head.append(phase, style=PHASE_STYLE.get(phase, "bold"))

    steps = [float(s) for s in view.get("steps") or []]
    step = int(view.get("step") or 0)
    weight = float(view.get("weight") or 0)
    interval = float(view.get("interval") or 0)
    in_step = float(view.get("time_in_step") or 0)
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold")
    rows.add_column()
    if kind != "bake":
        rows.add_row("steps", step_bar(steps, step, phase))
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=100, completed=weight, width=30), Text(f"{weight:g}%"))
    rows.add_row("weight", bar)
    rows.add_row("time in step", f"{in_step:.1f}s of {interval:g}s bake"
                 + (f" (step {step + 1}/{len(steps)})" if steps and kind != "bake" else ""))
    threshold = view.get("failure_threshold")
    rows.add_row("failed checks", f"{view.get('failures', 0)} in a row (rollback at "
                                  f"{threshold})")
    check = view.get("last_check") or {}
    if check:
        cand, live = check.get("candidate") or {}, check.get("live") or {}
        verdict = str(check.get("verdict"))
        line = Text()
        line.append(verdict, style=VERDICT_STYLE.get(verdict, ""))
        line.append(f"  window {check.get('window', 0):.2f}s · candidate "
                    f"{cand.get('requests', 0)} req {cand.get('errors', 0)} err · live "
                    f"{live.get('requests', 0)} req {live.get('errors', 0)} err")
        rows.add_row("last check", line)
    if view.get("reason"):
        rows.add_row("reason", Text(str(view["reason"]), style=PHASE_STYLE.get(phase, "")))

    gates = Table(title=None, show_edge=False, header_style="bold")
    gates.add_column("gate")
    gates.add_column("value", justify="right")
    gates.add_column("limit", justify="right")
    gates.add_column("verdict")
    gates.add_column("detail", overflow="fold")
    for gate in check.get("gates", []):
        verdict = str(gate.get("verdict"))
        gates.add_row(str(gate.get("name")), _fmt(gate.get("value")), _fmt(gate.get("limit")),
                      Text(verdict, style=VERDICT_STYLE.get(verdict, "")),
                      str(gate.get("detail") or ""))
    parts: list[RenderableType] = [head, rows]
    if check.get("gates"):
        parts.append(gates)
    sequential = check.get("sequential")
    if sequential:
        parts.append(sequential_table(sequential))
    return Group(*parts)


def sequential_table(result: dict[str, Any]) -> RenderableType:
    """The sequential test: its verdict, and per metric the samples, p-values and e-values."""
    verdict = str(result.get("verdict"))
    title = Text()
    title.append("sequential test: ", style="bold")
    title.append(verdict, style=VERDICT_STYLE.get(verdict, ""))
    title.append(f"  (step: {result.get('step_requests', 0)} candidate requests, "
                 f"min_samples {result.get('min_samples')})")
    table = Table(show_edge=False, header_style="bold")
    for name, justify in (("metric", "left"), ("candidate", "right"), ("live", "right"),
                          ("p worse", "right"), ("p not worse", "right"),
                          ("e worse", "right"), ("verdict", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for m in result.get("metrics") or []:
        what = "err" if m.get("metric") == "errors" else "slow"
        cand, live = m.get("candidate") or {}, m.get("live") or {}
        mv = str(m.get("verdict"))
        table.add_row(
            str(m.get("metric")),
            f"{cand.get('hits', 0)} {what} / {cand.get('requests', 0)}",
            f"{live.get('hits', 0)} {what} / {live.get('requests', 0)}",
            f"{_fmt(m.get('p_worse'))} (α {_fmt(m.get('alpha_worse'))})",
            f"{_fmt(m.get('p_not_worse'))} (α {_fmt(m.get('alpha_not_worse'))})",
            _fmt(m.get("e_worse")),
            Text(mv, style=VERDICT_STYLE.get(mv, "")),
        )
    return Group(title, table, Text(ASSUMPTION, style="dim"))


# What the p-values assume, shown under the table (README: "What always valid assumes").
ASSUMPTION = ("p-values assume independent requests: rule-routed requests are left out of the "
              "error test; errors clustered by user (sticky split) make 'worse' come easier")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
