"""`modelgate record` (capture a route's live exchanges) and `modelgate replay` (judge a
candidate on them).

    modelgate record classifier --duration 10m --sample 5 -o yesterday.jsonl.gz
    modelgate replay yesterday.jsonl.gz --backend green [--rate 50] [--concurrency 8]
    modelgate replay yesterday.jsonl.gz --url http://10.0.0.7:9000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from gateway.cli.client import (
    AdminClient,
    CliError,
    add_client_arguments,
    console,
    print_json,
)
from gateway.cli.shadow import render_report
from gateway.record.format import FormatError, read_recording
from gateway.record.replay import replay, report
from gateway.schema import config_error
from gateway.shadow.compare import Comparator
from gateway.shadow.config import COMPARE, CompareConfig


def register(sub: Any) -> None:
    p = sub.add_parser(
        "record", help="capture a sample of a route's live exchanges to a file",
        description="Record a sample of ROUTE's exchanges (request, live response, latency) "
        "on the gateway process behind --admin, then download them as gzip JSON lines. "
        "Ctrl-C stops early and still downloads what was captured.")
    p.add_argument("route")
    p.add_argument("--duration", required=True, help="how long, e.g. 10m (1s to 24h)")
    p.add_argument("--sample", type=float, default=100.0,
                   help="percent of requests to capture (default 100); sticky per user key")
    p.add_argument("--max-requests", type=int, default=None, help="stop after this many")
    p.add_argument("--max-bytes", default=None,
                   help="stop before this many JSON-lines bytes, e.g. 64MiB")
    p.add_argument("--redact-header", action="append", default=[], metavar="NAME",
                   help="a header whose value is not kept (repeatable; Authorization, Cookie, "
                   "X-Api-Key, X-Forwarded-For and other credentials always are)")
    p.add_argument("--redact-field", action="append", default=[], metavar="KEY",
                   help="a JSON key blanked at any depth of the bodies (repeatable)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="file to write (default ROUTE-ID.jsonl.gz)")
    p.add_argument("--redact-query", action="append", default=[], metavar="NAME",
                   help="a query parameter whose value is blanked in the target (repeatable; "
                   "api_key, key, token, access_token, password, signature … always are)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between progress updates")
    p.add_argument("--keep", action="store_true",
                   help="leave the recording on the gateway after downloading it (by default "
                   "it is discarded once the file is written: it holds real traffic)")
    add_client_arguments(p)
    p.set_defaults(func=record)

    r = sub.add_parser(
        "replay", help="send recorded requests to a backend and compare with the live answers",
        description="Send every request of FILE to a backend (by name, resolved through the "
        "admin API) or a URL (works offline), compare each answer with the recorded live "
        "one like shadow mode does, and print the same report.")
    r.add_argument("file", type=Path)
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--backend", help="a backend of the recording's route (needs --admin)")
    where.add_argument("--url", help="a base URL to send to (no admin API needed)")
    r.add_argument("--route", default=None,
                   help="route whose backend --backend names (default: the recording's)")
    r.add_argument("--rate", type=float, default=None, help="at most N requests a second")
    r.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    r.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    r.add_argument("--preset", choices=["auto", "kserve_v2", "tf_serving", "openai_chat"],
                   default=None, help="prediction to compare (default: the route's shadow "
                   "compare setting when the admin API answers, else auto)")
    r.add_argument("--path", default=None, help="JSON path of the prediction instead")
    r.add_argument("--abs-tol", type=float, default=None, help="numeric tolerance")
    add_client_arguments(r)
    r.set_defaults(func=replay_command)


# -- record ------------------------------------------------------------------------------------
def record(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"duration_s": args.duration, "sample_percent": args.sample}
    if args.max_requests is not None:
        body["max_requests"] = args.max_requests
    if args.max_bytes is not None:
        body["max_bytes"] = args.max_bytes
    if args.redact_header:
        body["redact_headers"] = args.redact_header
    if args.redact_field:
        body["redact_json_fields"] = args.redact_field
    if args.redact_query:
        body["redact_query_params"] = args.redact_query
    out = sys.stderr
    client = AdminClient.from_args(args)
    try:
        view = client.post(f"/admin/routes/{args.route}/recordings", body)
        rid = view["id"]
        print(f"recording {rid} on route {args.route}: {view['sample_percent']:g}% for "
              f"{view['duration_s']:g}s (Ctrl-C stops early)", file=out)
        try:
            while view["state"] == "recording":
                _pause(args.poll)
                view = client.get(f"/admin/recordings/{rid}")
                print(_progress(view), file=out, flush=True)
        except KeyboardInterrupt:
            print("stopping…", file=out)
            view = client.delete(f"/admin/recordings/{rid}")
        path = args.output or Path(f"{args.route}-{rid}.jsonl.gz")
        written = client.download(f"/admin/recordings/{rid}/download", path)
        if not args.keep:
            client.delete(f"/admin/recordings/{rid}")  # finished: DELETE discards it
    finally:
        client.close()
    if args.json:
        print_json({**view, "file": str(path), "file_bytes": written})
    else:
        print(f"{view['captured']} exchanges ({view['dropped']} dropped, ended by "
              f"{view['stop_reason']}) written to {path} ({written} bytes)")
    return 0


def _pause(seconds: float) -> None:
    """Between progress updates (where Ctrl-C usually lands; tests replace it)."""
    time.sleep(seconds)


def _progress(view: dict[str, Any]) -> str:
    left = max(0.0, view["ends_at"] - time.time()) if view["state"] == "recording" else 0.0
    return (f"  {view['captured']} captured, {view['dropped']} dropped, {view['bytes']} bytes"
            + (f", {left:.0f}s left" if left else ""))


# -- replay ------------------------------------------------------------------------------------
def replay_command(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1", exit_code=2)
    if args.rate is not None and args.rate <= 0:
        raise CliError("--rate must be more than 0", exit_code=2)
    try:
        exchanges = list(read_recording(args.file))
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc}") from None
    except FormatError as exc:
        raise CliError(str(exc)) from None
    if not exchanges:
        raise CliError(f"{args.file} holds no exchanges")
    routes = sorted({e.route for e in exchanges})
    compare: dict[str, Any] | None = None
    if args.url is not None:
        url, candidate = args.url, args.url
    else:
        route = args.route or routes[0]
        if args.route is None and len(routes) > 1:
            raise CliError(f"the recording holds routes {', '.join(routes)}: name one with "
                           "--route", exit_code=2)
        url, compare = _resolve(args, route)
        candidate = args.backend
    comparator = Comparator(_compare_config(args, compare))

    err = Console(stderr=True, highlight=False)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 0.5:
            last[0] = now
            err.print(f"replayed {done}/{total}", highlight=False)

    started = time.monotonic()
    tally = asyncio.run(replay(exchanges, url, comparator, concurrency=args.concurrency,
                               rate=args.rate, timeout=args.timeout, progress=progress))
    data = report(tally, comparator, source=str(args.file), routes=routes,
                  live=sorted({e.backend for e in exchanges}), candidate=candidate,
                  elapsed=time.monotonic() - started, concurrency=args.concurrency,
                  rate=args.rate, timeout=args.timeout, requests=len(exchanges))
    if args.json:
        print_json(data)
    else:
        render_report(data, console())
    return 0


def _resolve(args: argparse.Namespace, route: str) -> tuple[str, dict[str, Any] | None]:
    """The backend's URL from the route's view, and the route's shadow comparison setting
    (None when the route has no shadow report)."""
    client = AdminClient.from_args(args)
    try:
        view = client.get(f"/admin/routes/{route}")
        backends: dict[str, Any] = view.get("backends") or {}
        if args.backend not in backends:
            raise CliError(f"route {route!r} has no backend {args.backend!r} (it has "
                           f"{', '.join(sorted(backends))})", exit_code=2)
        try:
            compare = client.get(f"/admin/routes/{route}/shadow").get("compare")
        except CliError:  # no shadow component: compare as the flags say
            compare = None
    finally:
        client.close()
    return str(backends[args.backend]["url"]), compare


def _compare_config(args: argparse.Namespace, route: dict[str, Any] | None) -> CompareConfig:
    doc: dict[str, Any] = {}
    if route is not None:
        doc = {k: v for k, v in route.items() if v is not None}
        if doc.get("preset") is not None:
            doc.pop("path", None)  # a preset's path is derived from it
    if args.preset is not None:
        doc["preset"] = args.preset
        doc.pop("path", None)
    if args.path is not None:
        doc["path"] = args.path
        doc.pop("preset", None)
    if args.abs_tol is not None:
        doc["numbers"] = {**doc.get("numbers", {}), "abs_tol": args.abs_tol}
    try:
        return COMPARE.validate_python(doc)
    except ValidationError as exc:
        raise CliError(f"comparison setting: {config_error(exc)}", exit_code=2) from None

