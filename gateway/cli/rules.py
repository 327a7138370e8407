"""`modelgate rules show|set|clear ROUTE`: a route's match rules (thin client of the API).

    modelgate rules show classifier
    modelgate rules set classifier --file rules.yaml       # replace the list (YAML or JSON)
    modelgate rules set classifier --name acme --header x-tenant --exact acme --backend green
    modelgate rules clear classifier --reason "tenant trial over"

``set`` with flags adds one rule, or replaces the rule of that name where it stands; with
``--file`` the file's list (or its ``rules:`` key) replaces every rule. Every command takes
--admin/--token/--json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from rich.table import Table

from gateway.cli.client import (
    AdminClient,
    CliError,
    add_client_arguments,
    console,
    print_json,
)
from gateway.state import RULE_OPS, RULE_SOURCES


def register(sub: Any) -> None:
    """Add ``modelgate rules ...`` to the top-level parser's subparsers."""
    parser = sub.add_parser(
        "rules", help="match rules: send requests by header, cookie, query or body field to "
                      "a named backend, before the weighted split",
        description="Show and change a route's match rules (the first match decides).")
    actions = parser.add_subparsers(dest="rules_action", metavar="ACTION", required=True)

    p = actions.add_parser("show", help="the route's rules, in order, with their hits")
    p.add_argument("route")
    add_client_arguments(p)
    p.set_defaults(func=cmd_show)

    p = actions.add_parser("set", help="replace the rules (--file), or add/replace one rule "
                                       "(flags)")
    p.add_argument("route")
    p.add_argument("--file", help="YAML or JSON: a list of rules, or a mapping with 'rules'")
    p.add_argument("--name", help="the rule's name (a rule of that name is replaced in place)")
    for source in RULE_SOURCES:
        p.add_argument("--" + source, help=f"match on this {_WHAT[source]}")
    for op in RULE_OPS:
        p.add_argument("--" + op.replace("_", "-"), dest=op, help=_HOW[op])
    p.add_argument("--backend", help="the backend matching requests go to")
    p.add_argument("--reason", help="why (kept in the audit event)")
    add_client_arguments(p)
    p.set_defaults(func=cmd_set)

    p = actions.add_parser("clear", help="remove every rule of the route")
    p.add_argument("route")
    p.add_argument("--reason", help="why (kept in the audit event)")
    add_client_arguments(p)
    p.set_defaults(func=cmd_clear)


_WHAT = {"header": "request header", "cookie": "cookie", "query": "query parameter",
         "body": "JSON body field (a JSON path, e.g. parameters.tier)"}
_HOW = {"exact": "the value equals this", "prefix": "the value starts with this",
        "regex": "the value matches this regular expression (anywhere unless anchored)",
        "one_of": "the value is one of these (comma-separated)"}


def _path(route: str) -> str:
    return f"/admin/routes/{quote(route, safe='')}/rules"


def condition_text(rule: dict[str, Any]) -> str:
    """``header x-tenant exact acme`` for a rule document."""
    source = next((s for s in RULE_SOURCES if s in rule), "?")
    op = next((o for o in RULE_OPS if o in rule), "?")
    value = rule.get(op)
    shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"{source} {rule.get(source)} {op.replace('_', '-')} {shown}"


def rules_table(view: dict[str, Any]) -> Table:
    table = Table(title=f"{view.get('route')}: match rules (first match wins; version "
                        f"{view.get('version')})", title_justify="left")
    for col in ("#", "name", "condition", "backend", "hits 1m", "hits 15m"):
        table.add_column(col, justify="right" if col in ("#", "hits 1m", "hits 15m")
                         else "left")
    for i, rule in enumerate(view.get("rules") or [], start=1):
        hits = rule.get("hits") or {}
        table.add_row(str(i), str(rule.get("name")), condition_text(rule),
                      str(rule.get("backend")), f"{hits.get('1m', 0):g}",
                      f"{hits.get('15m', 0):g}")
    if not view.get("rules"):
        table.caption = "no rules: every request takes the weighted split"
    return table


def _print(args: argparse.Namespace, view: dict[str, Any]) -> int:
    if args.json:
        print_json(view)
    else:
        console().print(rules_table(view))
    return 0


def _call(args: argparse.Namespace, method: str, body: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    client = AdminClient.from_args(args)
    try:
        found: dict[str, Any] = client.request(method, _path(args.route), body)
        return found
    finally:
        client.close()


def cmd_show(args: argparse.Namespace) -> int:
    return _print(args, _call(args, "GET"))


def cmd_clear(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"rules": []}
    if args.reason:
        body["reason"] = args.reason
    return _print(args, _call(args, "PUT", body))


def rule_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """One rule document from the flags (the API checks it; this only assembles it)."""
    sources = [s for s in RULE_SOURCES if getattr(args, s) is not None]
    ops = [o for o in RULE_OPS if getattr(args, o) is not None]
    if not args.name or not args.backend or len(sources) != 1 or len(ops) != 1:
        raise CliError("a rule needs --name, --backend, one of --header/--cookie/--query/"
                       "--body and one of --exact/--prefix/--regex/--one-of", exit_code=2)
    value: Any = getattr(args, ops[0])
    if ops[0] == "one_of":
        value = [v.strip() for v in value.split(",") if v.strip()]
    return {"name": args.name, sources[0]: getattr(args, sources[0]), ops[0]: value,
            "backend": args.backend}


def rules_from_file(name: str) -> list[Any]:
    try:
        loaded = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"{name}: not valid YAML or JSON: {exc}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("rules"), list):
        loaded = loaded["rules"]
    if not isinstance(loaded, list):
        raise CliError(f"{name}: expected a list of rules (or a mapping with 'rules')")
    return loaded


def cmd_set(args: argparse.Namespace) -> int:
    flags = [f for f in ("name", "backend", *RULE_SOURCES, *RULE_OPS)
             if getattr(args, f) is not None]
    if args.file is not None and flags:
        raise CliError("give --file or the flags of one rule, not both", exit_code=2)
    if args.file is not None:
        rules = rules_from_file(args.file)
    else:
        rule = rule_from_flags(args)
        current = [{k: v for k, v in r.items() if k != "hits"}
                   for r in _call(args, "GET").get("rules") or []]
        at = next((i for i, r in enumerate(current) if r.get("name") == rule["name"]), None)
        if at is None:
            current.append(rule)
        else:
            current[at] = rule
        rules = current
    body: dict[str, Any] = {"rules": rules}
    if args.reason:
        body["reason"] = args.reason
    return _print(args, _call(args, "PUT", body))
