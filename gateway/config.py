"""The gateway's config file: one YAML document, validated once at load into frozen objects.

Errors name the key path and the problem (``routes[0].backends.green.url: not an http(s)
URL``) so ``modelgate check-config`` points at the line to fix. ``${ENV_VAR}`` (or
``${ENV_VAR:-default}``) anywhere in a string is replaced from the environment before
validation; an unset variable with no default is an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.errors import ConfigError
from gateway.monitoring.config import (
    AlarmRule,
    ProbesConfig,
    parse_alarms,
    parse_probes,
)
from gateway.rollout.plan import RolloutPlan, parse_plan
from gateway.schema import NAME_RE, Node, check_http_url, parse_address
from gateway.shadow.config import ShadowConfig, parse_shadow
from gateway.state import weight_problem

DEFAULT_LISTEN = ("127.0.0.1", 8000)
DEFAULT_ADMIN_LISTEN = ("127.0.0.1", 8001)
DEFAULT_MAX_BODY = 10 * 1024 * 1024
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """A named version of the model: one or more URLs serving it, balanced round-robin."""

    name: str
    urls: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StickyKey:
    """Where the user key comes from; the same key always lands on the same backend."""

    source: Literal["header", "cookie", "query"]
    name: str


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 2.0
    read: float = 30.0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    path_prefix: str
    host: str | None
    backends: dict[str, BackendConfig]
    live: str
    canary: str | None = None
    canary_weight: float = 0.0
    sticky: StickyKey | None = None
    override_header: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_body_bytes: int = DEFAULT_MAX_BODY
    shadow: ShadowConfig | None = None
    rollout: RolloutPlan | None = None
    probes: ProbesConfig | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: tuple[str, int] = DEFAULT_ADMIN_LISTEN
    # token name -> secret; the name is the actor recorded in audit events.
    tokens: dict[str, str] = field(default_factory=dict)


# -- issue #9 (perf): the proxy port's server. Kept separate for the port onto typed models. --
@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The client-facing server: which one, its limits and timeouts, TLS."""

    kind: Literal["fast", "aiohttp"] = "fast"
    header_timeout: float = 10.0  # from a message's first byte to its last header (slowloris)
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this
    body_timeout: float = 60.0  # longest silence of a client sending a body or reading ours
    max_request_line: int = 8192  # bytes of request target (414 beyond)
    max_headers: int = 100  # header lines (431 beyond)
    max_header_bytes: int = 64 * 1024  # names + values (431 beyond)
    tls_cert: str | None = None
    tls_key: str | None = None


def _parse_server(top: Node) -> ServerConfig:
    """`server: fast|aiohttp` (a name) or a mapping with `kind` and the limits below."""
    raw = top.raw("server", None)
    if raw is None:
        return ServerConfig()
    if isinstance(raw, str):
        raw = {"kind": raw}
    node = Node(raw, "server")
    kind = node.str("kind", "fast")
    if kind not in ("fast", "aiohttp"):
        raise ConfigError("server.kind", f"expected 'fast' or 'aiohttp', got {kind!r}")
    tls = node.child("tls", None)
    cert = key = None
    if tls is not None:
        cert = tls.str("cert")
        key = tls.str("key", None)
        tls.done()
    config = ServerConfig(
        kind=kind,
        header_timeout=node.duration("header_timeout", 10.0),
        keepalive_timeout=node.duration("keepalive_timeout", 75.0),
        body_timeout=node.duration("body_timeout", 60.0),
        max_request_line=node.int("max_request_line", 8192, lo=64),
        max_headers=node.int("max_headers", 100, lo=1),
        max_header_bytes=node.size("max_header_bytes", 64 * 1024),
        tls_cert=cert,
        tls_key=key,
    )
    node.done()
    return config
# -- end issue #9 --


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: tuple[tuple[str, int], ...] = (DEFAULT_LISTEN,)
    admin: AdminConfig = field(default_factory=AdminConfig)
    store: str = "memory"
    drain_timeout: float = 10.0
    routes: tuple[RouteConfig, ...] = ()
    alarms: tuple[AlarmRule, ...] = ()
    webhooks: tuple[str, ...] = ()
    access_log_sample: float = 0.0
    source: str = "<dict>"
    server: ServerConfig = field(default_factory=ServerConfig)  # issue #9

    def route(self, name: str) -> RouteConfig | None:
        for route in self.routes:
            if route.name == name:
                return route
        return None


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> GatewayConfig:
    """Read, substitute and validate a config file; raises `ConfigError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: not valid YAML: {exc}") from None
    return parse_config(data if data is not None else {}, env=env, source=str(path))


def parse_config(
    data: Any, env: dict[str, str] | None = None, source: str = "<dict>"
) -> GatewayConfig:
    data = substitute_env(data, os.environ if env is None else env, "")
    top = Node(data)
    listen_raw = top.raw("listen", None)
    if listen_raw is None:
        listen: tuple[tuple[str, int], ...] = (DEFAULT_LISTEN,)
    elif isinstance(listen_raw, list):
        if not listen_raw:
            raise ConfigError("listen", "needs at least one address")
        listen = tuple(parse_address(v, f"listen[{i}]") for i, v in enumerate(listen_raw))
    else:
        listen = (parse_address(listen_raw, "listen"),)

    admin = _parse_admin(top.child("admin", None))
    store = top.str("store", "memory")
    if store != "memory" and not store.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("store", f"expected 'memory' or a redis:// URL, got {store!r}")

    routes_raw = top.list("routes", [])
    routes: list[RouteConfig] = []
    for i, item in enumerate(routes_raw):
        routes.append(_parse_route(Node(item, f"routes[{i}]")))
    _check_unique(routes)

    alarms = parse_alarms(top.list("alarms", []), "alarms", {r.name: r for r in routes})
    webhooks = tuple(
        check_http_url(url, f"webhooks[{i}]") for i, url in enumerate(top.list("webhooks", []))
    )
    config = GatewayConfig(
        listen=listen,
        admin=admin,
        store=store,
        drain_timeout=top.duration("drain_timeout", 10.0),
        routes=tuple(routes),
        alarms=tuple(alarms),
        webhooks=webhooks,
        access_log_sample=top.number("access_log_sample", 0.0, lo=0, hi=1),
        source=source,
        server=_parse_server(top),  # issue #9
    )
    top.done()
    return config


def substitute_env(value: Any, env: Any, path: str) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return str(env[name])
            if default is not None:
                return default
            raise ConfigError(path or "(top)", f"environment variable {name} is not set")

        return _ENV.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: substitute_env(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [substitute_env(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _parse_admin(node: Node | None) -> AdminConfig:
    if node is None:
        return AdminConfig()
    listen = parse_address(node.raw("listen", "127.0.0.1:8001"), node.key_path("listen"))
    tokens: dict[str, str] = {}
    token = node.raw("token", None)
    if token is not None:
        if not isinstance(token, str):
            raise ConfigError(node.key_path("token"), "expected a string")
        if token:  # an empty ${VAR:-} means "not configured here"
            tokens["admin"] = token
    for name, secret, path in node.items("tokens"):
        if not isinstance(secret, str) or len(secret) < 8:
            raise ConfigError(path, "token must be a string of at least 8 characters")
        tokens[name] = secret
    node.done()
    return AdminConfig(listen=listen, tokens=tokens)


def _parse_route(node: Node) -> RouteConfig:
    name = node.name("name")
    match = node.child("match")
    prefix = match.str("path_prefix")
    if not prefix.startswith("/"):
        raise ConfigError(match.key_path("path_prefix"), "must start with '/'")
    host = match.str("host", None)
    match.done()

    backends: dict[str, BackendConfig] = {}
    for bname, braw, bpath in node.items("backends"):
        bnode = Node(braw, bpath)
        if bnode.has("url") == bnode.has("urls"):
            raise ConfigError(bpath, "give exactly one of 'url' or 'urls'")
        if bnode.has("url"):
            urls: tuple[str, ...] = (check_http_url(bnode.raw("url"), bnode.key_path("url")),)
        else:
            raw_urls = bnode.list("urls")
            if not raw_urls:
                raise ConfigError(bnode.key_path("urls"), "needs at least one URL")
            urls = tuple(
                check_http_url(u, f"{bnode.key_path('urls')}[{i}]") for i, u in enumerate(raw_urls)
            )
        bnode.done()
        if not _name_ok(bname):
            raise ConfigError(bpath, f"not a valid backend name: {bname!r}")
        backends[bname] = BackendConfig(name=bname, urls=urls)
    if not backends:
        raise ConfigError(node.key_path("backends"), "needs at least one backend")

    live = node.str("live")
    if live not in backends:
        raise ConfigError(node.key_path("live"), f"unknown backend {live!r}")

    canary: str | None = None
    weight = 0.0
    canary_node = node.child("canary", None)
    if canary_node is not None:
        canary = canary_node.str("backend")
        if canary not in backends:
            raise ConfigError(canary_node.key_path("backend"), f"unknown backend {canary!r}")
        if canary == live:
            raise ConfigError(canary_node.key_path("backend"), "canary must differ from live")
        raw_weight = canary_node.raw("weight", 0.0)
        if (problem := weight_problem(raw_weight)) is not None:
            raise ConfigError(canary_node.key_path("weight"), problem)
        weight = float(raw_weight)
        canary_node.done()

    sticky: StickyKey | None = None
    sticky_node = node.child("sticky", None)
    if sticky_node is not None:
        given = [s for s in ("header", "cookie", "query") if sticky_node.has(s)]
        if len(given) != 1:
            raise ConfigError(sticky_node.path, "give exactly one of 'header', 'cookie', 'query'")
        key_name = sticky_node.str(given[0])
        sticky = StickyKey(given[0], key_name.lower() if given[0] == "header" else key_name)  # type: ignore[arg-type]
        sticky_node.done()

    timeouts_node = node.child("timeouts", None)
    timeouts = Timeouts()
    if timeouts_node is not None:
        # Defaults from an instance: on a slots dataclass `Timeouts.read` is a descriptor.
        timeouts = Timeouts(
            connect=timeouts_node.duration("connect", timeouts.connect),
            read=timeouts_node.duration("read", timeouts.read),
        )
        timeouts_node.done()
        for key, value in (("connect", timeouts.connect), ("read", timeouts.read)):
            if value <= 0:
                raise ConfigError(timeouts_node.key_path(key), "must be > 0")

    override = node.str("override_header", None)
    max_body = node.size("max_body_bytes", DEFAULT_MAX_BODY)
    shadow_node = node.child("shadow", None)
    shadow = parse_shadow(shadow_node, set(backends)) if shadow_node is not None else None
    rollout_node = node.child("rollout", None)
    rollout = parse_plan(rollout_node, set(backends)) if rollout_node is not None else None
    probes_node = node.child("probes", None)
    probes = parse_probes(probes_node) if probes_node is not None else None
    node.done()
    return RouteConfig(
        name=name,
        path_prefix=prefix,
        host=host.lower() if host else None,
        backends=backends,
        live=live,
        canary=canary,
        canary_weight=weight,
        sticky=sticky,
        override_header=override.lower() if override else None,
        timeouts=timeouts,
        max_body_bytes=max_body,
        shadow=shadow,
        rollout=rollout,
        probes=probes,
    )


def _name_ok(name: str) -> bool:
    return bool(NAME_RE.match(name))


def _check_unique(routes: list[RouteConfig]) -> None:
    names: set[str] = set()
    matches: set[tuple[str | None, str]] = set()
    for i, route in enumerate(routes):
        if route.name in names:
            raise ConfigError(f"routes[{i}].name", f"duplicate route name {route.name!r}")
        names.add(route.name)
        key = (route.host, route.path_prefix)
        if key in matches:
            raise ConfigError(f"routes[{i}].match", "another route has the same host and prefix")
        matches.add(key)
