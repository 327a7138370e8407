"""The gateway's config file: one YAML document, validated once at load into frozen objects.

The models below are pydantic dataclasses: the same classes check the document, describe it
in the JSON Schema (``modelgate config-schema``) and are what the rest of the code reads.
Where the document's shape differs from what the code reads, the document's form is the field
and the code's form a property: ``match: {path_prefix}`` → `RouteConfig.path_prefix`,
``canary: {backend, weight}`` → `.canary` / `.canary_weight`, ``sticky: {header: x}`` →
`.sticky` (a `StickyKey`). Errors name the key path and the problem
(``routes[0].backends.green.url: not an http(s) URL``) so ``modelgate check-config`` points at
the line to fix. ``${ENV_VAR}`` (or ``${ENV_VAR:-default}``) anywhere in a string is replaced
from the environment before validation; an unset variable with no default is an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass as plain_dataclass
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, field_validator
from pydantic import model_validator as model_check
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from gateway.errors import ConfigError
from gateway.monitoring.config import AlarmRule, ProbesConfig, check_alarms
from gateway.resilience.config import HealthCheck, Limits, OutlierDetection, RetryBudget
from gateway.rollout.plan import RolloutPlan
from gateway.rules import RuleList
from gateway.schema import (
    MODEL,
    NAME_RE,
    Address,
    Addresses,
    Duration,
    Flag,
    HttpUrl,
    LowerText,
    Name,
    Networks,
    Size,
    Text,
    UrlPath,
    config_error,
    duration,
    integer,
    nonempty,
    number,
    problem,
    size,
    text,
    typed,
    unknown_backend,
    validate,
    weight,
)
from gateway.shadow.config import ShadowConfig

DEFAULT_LISTEN = ("127.0.0.1", 8000)
DEFAULT_ADMIN_LISTEN = ("127.0.0.1", 8001)
DEFAULT_MAX_BODY = 10 * 1024 * 1024
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

BackendName = Annotated[str, text(
    lambda v: None if NAME_RE.match(v) else f"not a valid backend name: {v!r}",
    pattern=NAME_RE.pattern)]


def _store(value: Any) -> str:
    if value != "memory" and not (isinstance(value, str) and value.startswith(
            ("redis://", "rediss://", "unix://"))):
        raise problem(f"expected 'memory' or a redis:// URL, got {value!r}")
    return str(value)


MIN_TOKEN_LENGTH = 16
Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")


def secret_problem(value: Any) -> str | None:
    """Why `value` cannot be an admin token (config or `MODELGATE_ADMIN_TOKEN`), or None."""
    if not isinstance(value, str):
        return "expected a string"
    if len(value) < MIN_TOKEN_LENGTH:
        return f"token must be a string of at least {MIN_TOKEN_LENGTH} characters"
    return None


def _secret(value: Any) -> str:
    if (found := secret_problem(value)) is not None:
        raise problem(found)
    return str(value)


def _optional_secret(value: Any) -> str | None:
    # ``token: ${MODELGATE_ADMIN_TOKEN:-}``: empty means "not configured here"
    return None if value is None or value == "" else _secret(value)


Share = Annotated[float, weight()]  # percent, in steps of 0.01
Store = Annotated[str, typed(_store, {"anyOf": [
    {"const": "memory"}, {"type": "string", "pattern": "^(rediss?|unix)://"}]})]
Secret = Annotated[str, typed(_secret, {"type": "string", "minLength": MIN_TOKEN_LENGTH})]
OptionalSecret = Annotated[str | None, typed(_optional_secret, {"anyOf": [
    {"type": "string", "minLength": MIN_TOKEN_LENGTH}, {"const": ""}, {"type": "null"}]})]


@dataclass(frozen=True, slots=True, config=MODEL)
class BackendConfig:
    """A named version of the model: one or more URLs serving it, balanced round-robin.
    The document gives ``url`` or ``urls``; the code reads `urls`."""

    urls: Annotated[tuple[HttpUrl, ...], nonempty("needs at least one URL")] = ()
    url: HttpUrl | None = None
    # Ejection of a failing URL among several (gateway/resilience/outlier.py).
    outlier_detection: OutlierDetection = Field(default_factory=OutlierDetection)
    limits: Limits | None = None  # concurrency limit of this backend (per process)
    health_check: HealthCheck | None = None  # active checks (gateway/resilience/health.py)
    name: SkipJsonSchema[str] = Field(default="", init=False)  # the key in `backends`

    @model_check(mode="before")
    @classmethod
    def _one_of(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("url") is None) == (data.get("urls") is None):
            raise problem("give exactly one of 'url' or 'urls'")
        return data

    def __post_init__(self) -> None:
        if self.url is not None:
            object.__setattr__(self, "urls", (self.url,))


@plain_dataclass(frozen=True, slots=True)
class StickyKey:
    """Where the user key comes from; the same key always lands on the same backend."""

    source: Literal["header", "cookie", "query"]
    name: str


@dataclass(frozen=True, slots=True, config=MODEL)
class Sticky:
    """The document's ``sticky:`` section: exactly one of header, cookie, query."""

    header: LowerText | None = None
    cookie: Text | None = None
    query: Text | None = None

    @model_check(mode="after")
    def _exactly_one(self) -> Sticky:
        if sum(v is not None for v in (self.header, self.cookie, self.query)) != 1:
            raise problem("give exactly one of 'header', 'cookie', 'query'")
        return self

    def key(self) -> StickyKey:
        if self.header is not None:
            return StickyKey("header", self.header)
        if self.cookie is not None:
            return StickyKey("cookie", self.cookie)
        return StickyKey("query", self.query or "")


@dataclass(frozen=True, slots=True, config=MODEL)
class Timeouts:
    connect: Annotated[float, duration(positive=True)] = 2.0
    read: Annotated[float, duration(positive=True)] = 30.0


@dataclass(frozen=True, slots=True, config=MODEL)
class Match:
    path_prefix: UrlPath
    host: LowerText | None = None


@dataclass(frozen=True, slots=True, config=MODEL)
class CanaryStart:
    backend: Text
    weight: Share = 0.0


@dataclass(frozen=True, slots=True, config=MODEL)
class RouteConfig:
    name: Name
    match: Match
    backends: Annotated[dict[BackendName, BackendConfig], nonempty("needs at least one backend")]
    live: Text
    canary_start: CanaryStart | None = Field(default=None, alias="canary")
    sticky_section: Sticky | None = Field(default=None, alias="sticky")
    override_header: LowerText | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_body_bytes: Size = DEFAULT_MAX_BODY
    shadow: ShadowConfig | None = None
    rollout: RolloutPlan | None = None
    probes: ProbesConfig | None = None
    # Match rules evaluated before the weighted split (gateway/rules.py); the starting set,
    # changed at run time through the admin API like the rest of the routing state.
    rules: RuleList = ()
    # Requests here may be sent twice (inference): turns `fallback` on by default.
    side_effect_free: Flag = False
    # A request to the canary that failed before any byte reached the client (refused,
    # reset or timeout before the status line, or a 503) is retried once on live.
    fallback_section: Flag | None = Field(default=None, alias="fallback")
    limits: Limits | None = None  # concurrency limit of the route (per process)
    retry_budget: RetryBudget = Field(default_factory=RetryBudget)

    @property
    def fallback(self) -> bool:
        return self.side_effect_free if self.fallback_section is None else self.fallback_section

    @model_check(mode="after")
    def _backends_named(self) -> RouteConfig:
        for name, backend in self.backends.items():
            object.__setattr__(backend, "name", name)
        if self.live not in self.backends:
            raise problem(f"unknown backend {self.live!r}", "live")
        if self.canary_start is not None:
            if self.canary_start.backend not in self.backends:
                raise problem(f"unknown backend {self.canary_start.backend!r}",
                              "canary", "backend")
            if self.canary_start.backend == self.live:
                raise problem("canary must differ from live", "canary", "backend")
        for section in ("shadow", "rollout"):
            found = getattr(self, section)
            if found is not None and (why := unknown_backend(found.backend,
                                                             set(self.backends))):
                raise problem(why, section, "backend")
        for i, rule in enumerate(self.rules):
            if why := unknown_backend(rule.backend, set(self.backends)):
                raise problem(why, "rules", i, "backend")
        return self

    @property
    def path_prefix(self) -> str:
        return self.match.path_prefix

    @property
    def host(self) -> str | None:
        return self.match.host

    @property
    def canary(self) -> str | None:
        return self.canary_start.backend if self.canary_start is not None else None

    @property
    def canary_weight(self) -> float:
        return self.canary_start.weight if self.canary_start is not None else 0.0

    @property
    def sticky(self) -> StickyKey | None:
        return self.sticky_section.key() if self.sticky_section is not None else None


@dataclass(frozen=True, slots=True, config=MODEL)
class TlsFiles:
    cert: Text
    key: Text | None = None  # None: the key is in the cert file


@dataclass(frozen=True, slots=True, config=MODEL)
class AdminToken:
    """A named admin token with its role: ``viewer`` may only read (GET/HEAD), ``operator``
    may also change things. A token given as a plain string is an operator's."""

    token: Secret
    role: Role = "operator"


_ADMIN_TOKEN = TypeAdapter(AdminToken)


def _token_entry(value: Any) -> str | AdminToken:
    """A plain secret (an operator's token) or ``{token, role}``."""
    if isinstance(value, AdminToken):
        return value
    if not isinstance(value, dict):
        return _secret(value)
    try:
        return _ADMIN_TOKEN.validate_python(value)
    except ValidationError as exc:
        found = config_error(exc)
        raise problem(found.problem, *(p for p in found.path.split(".") if p != "(top)")
                      ) from None


TokenEntry = Annotated[str | AdminToken, typed(_token_entry, {"anyOf": [
    {"type": "string", "minLength": MIN_TOKEN_LENGTH}, {
        "type": "object", "additionalProperties": False, "required": ["token"],
        "properties": {"token": {"type": "string", "minLength": MIN_TOKEN_LENGTH},
                       "role": {"enum": list(ROLES)}}}]})]


@dataclass(frozen=True, slots=True, config=MODEL)
class AdminConfig:
    listen: Address = Field(default=DEFAULT_ADMIN_LISTEN,
                            json_schema_extra={"default": "127.0.0.1:8001"})
    # token name -> secret, or {token, role}; the name is the actor recorded in audit events.
    # `token` (the document's secret of the operator token named "admin"; empty = not
    # configured here) joins them.
    tokens: dict[Name, TokenEntry] = Field(default_factory=dict)
    token: OptionalSecret = None
    # Serve the admin API over HTTPS (needed to listen on a non-loopback address unless
    # `modelgate serve --insecure-admin`).
    tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        if self.token:
            object.__setattr__(self, "tokens", {"admin": self.token, **self.tokens})

    def secrets(self) -> dict[str, str]:
        """Token name -> secret."""
        return {name: t if isinstance(t, str) else t.token for name, t in self.tokens.items()}

    def roles(self) -> dict[str, Role]:
        """Token name -> role (a plain-string token is an operator's)."""
        return {name: "operator" if isinstance(t, str) else t.role
                for name, t in self.tokens.items()}


@dataclass(frozen=True, slots=True, config=MODEL)
class ServerConfig:
    """The client-facing server of the proxy port: which one, its limits and timeouts, TLS.

    ``server: fast`` (or ``aiohttp``) alone names the kind and keeps the defaults."""

    kind: Literal["fast", "aiohttp"] = "fast"
    # From a message's first byte to its last header (slowloris).
    header_timeout: Annotated[float, duration(positive=True)] = 10.0
    # An idle keep-alive connection is closed after this.
    keepalive_timeout: Annotated[float, duration(positive=True)] = 75.0
    # Longest silence of a client sending a body.
    body_timeout: Annotated[float, duration(positive=True)] = 60.0
    # Longest a client may leave our answer unread (the socket buffer full): then it is cut
    # and its backend connection released.
    write_timeout: Annotated[float, duration(positive=True)] = 60.0
    # Client connections open at once on the proxy port, per process; at the cap a new one
    # replaces an idle one, or is answered 503 and closed if none is idle. 0: derived from
    # RLIMIT_NOFILE, keeping descriptors for backends, admin and probes (server/limits.py).
    max_connections: Annotated[int, integer(0, 10_000_000)] = 0
    max_request_line: Annotated[int, integer(64, 1 << 20)] = 8192  # 414 beyond
    max_headers: Annotated[int, integer(1, 10_000)] = 100  # header lines; 431 beyond
    max_header_bytes: Annotated[int, size(1024)] = 64 * 1024  # names + values; 431 beyond
    tls: TlsFiles | None = None

    @model_check(mode="before")
    @classmethod
    def _kind_alone(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    @property
    def tls_cert(self) -> str | None:
        return self.tls.cert if self.tls is not None else None

    @property
    def tls_key(self) -> str | None:
        return self.tls.key if self.tls is not None else None


@dataclass(frozen=True, slots=True, config=MODEL)
class GatewayConfig:
    listen: Addresses = Field(default=(DEFAULT_LISTEN,),
                              json_schema_extra={"default": "127.0.0.1:8000"})
    admin: AdminConfig = Field(default_factory=AdminConfig)
    store: Store = "memory"
    drain_timeout: Duration = 10.0
    routes: tuple[RouteConfig, ...] = ()
    alarms: tuple[AlarmRule, ...] = ()
    webhooks: tuple[HttpUrl, ...] = ()
    access_log_sample: Annotated[float, number(0, 1)] = 0.0
    # Peers whose X-Forwarded-*/Forwarded headers are kept (appended to); from any other
    # peer they are dropped and the gateway's own are sent.
    trusted_proxies: Networks = ()
    server: ServerConfig = Field(default_factory=ServerConfig)
    source: SkipJsonSchema[str] = "<dict>"  # the file it came from; not a document key

    @field_validator("source")
    @classmethod
    def _not_a_document_key(cls, value: str, info: ValidationInfo) -> str:
        if info.context and info.context.get("document"):
            raise problem("unknown key")
        return value

    @model_check(mode="after")
    def _unique_and_alarms(self) -> GatewayConfig:
        names: set[str] = set()
        matches: set[tuple[str | None, str]] = set()
        for i, route in enumerate(self.routes):
            if route.name in names:
                raise problem(f"duplicate route name {route.name!r}", "routes", i, "name")
            names.add(route.name)
            key = (route.host, route.path_prefix)
            if key in matches:
                raise problem("another route has the same host and prefix", "routes", i,
                              "match")
            matches.add(key)
        check_alarms(self.alarms, {r.name: r for r in self.routes})
        return self

    def route(self, name: str) -> RouteConfig | None:
        for route in self.routes:
            if route.name == name:
                return route
        return None


CONFIG = TypeAdapter(GatewayConfig)


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the config file, for editors and CI."""
    schema = CONFIG.json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://modelgate.dev/schema/gateway.json",
            "title": "modelgate gateway.yaml", **{k: v for k, v in schema.items()
                                                   if k != "title"}}


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
    config = validate(CONFIG, data, context={"document": True})
    return replace(config, source=source) if source != config.source else config


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
