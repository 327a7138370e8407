"""Probe and alarm config: parsed and compiled once at load, never per request.

A route's ``probes:`` section says which parts of its requests and responses to look at
(JSON paths compiled here); the top-level ``alarms:`` list holds threshold rules over the
per-backend windows. Errors name the key path (``routes[0].probes.output.prediction: ...``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ConfigError
from gateway.jsonpath import JsonPath, compile_path
from gateway.schema import Node, type_name

DEFAULT_SCORE_EDGES = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 10 bins over [0, 1]
DEFAULT_MAX_LABELS = 32
DEFAULT_LEARN = 200
MAX_EDGES = 100
OTHER_LABEL = "__other__"

# Alarm metrics, and what each needs from the route's probes (None: nothing).
ALARM_METRICS: dict[str, str | None] = {
    "error_rate": None,          # 5xx (backend or gateway on its behalf) / requests
    "rps": None,                 # requests per second over the window
    "p50_ms": None,
    "p90_ms": None,
    "p99_ms": None,
    "null_rate": "output.prediction",       # output_null / output_total
    "error_body_rate": "output",            # output_error / responses probed
    "missing_rate": "input.missing",        # input_missing / input_values
    "schema_error_rate": "input",           # input_schema_errors / input_total
    "psi_labels": "output.prediction",
    "psi_scores": "output.score",
    "psi_features": "input.features",       # the largest PSI among the route's features
}
OPS = (">", ">=", "<", "<=")
BACKEND_SELECTORS = ("live", "canary", "any")


@dataclass(frozen=True, slots=True)
class FeatureProbe:
    """A numeric input feature binned for drift; `edges` None means learned from traffic."""

    name: str
    path: JsonPath
    edges: tuple[float, ...] | None
    learn: int = DEFAULT_LEARN


@dataclass(frozen=True, slots=True)
class InputProbes:
    length: JsonPath | None = None
    missing: tuple[JsonPath, ...] = ()
    required: tuple[JsonPath, ...] = ()
    features: tuple[FeatureProbe, ...] = ()


@dataclass(frozen=True, slots=True)
class OutputProbes:
    prediction: JsonPath | None = None
    score: JsonPath | None = None
    score_edges: tuple[float, ...] = DEFAULT_SCORE_EDGES
    error_body: JsonPath | None = None
    labels: tuple[str, ...] | None = None  # known labels; others count as OTHER_LABEL
    max_labels: int = DEFAULT_MAX_LABELS


@dataclass(frozen=True, slots=True)
class DriftConfig:
    window: float = 300.0     # the sliding window compared ("now")
    baseline: float = 300.0   # auto baseline: the first N seconds after start (0: off)
    min_samples: int = 50     # fewer observations on either side: no PSI (None)


@dataclass(frozen=True, slots=True)
class ProbesConfig:
    sample: float = 1.0
    methods: frozenset[str] = frozenset({"POST"})
    path_suffix: str | None = None
    input: InputProbes | None = None
    output: OutputProbes | None = None
    drift: DriftConfig = field(default_factory=DriftConfig)

    def has(self, need: str | None) -> bool:
        """Whether the probes measure what an alarm metric needs (``output.prediction``...)."""
        if need is None:
            return True
        section, _, item = need.partition(".")
        found = self.input if section == "input" else self.output
        if found is None:
            return False
        if not item:
            return True
        value = getattr(found, item)
        return bool(value) if isinstance(value, tuple) else value is not None


@dataclass(frozen=True, slots=True)
class AlarmRule:
    """`metric` of `backend` on `route` over `window` seconds compared with `op threshold`;
    firing once it has held for `for_` seconds."""

    name: str
    route: str = ""
    metric: str = "error_rate"
    backend: str = "live"  # live | canary | any | a backend name
    window: float = 60.0
    op: str = ">"
    threshold: float = 0.0
    for_: float = 0.0
    min_samples: int = 10
    against: str = "baseline"  # psi metrics: compare with "baseline" or "live"
    description: str | None = None


# -- probes -----------------------------------------------------------------------------------
def parse_probes(node: Node) -> ProbesConfig:
    sample = node.number("sample", 1.0, lo=0, hi=1)
    methods_raw = node.list("methods", ["POST"])
    methods = set()
    for i, m in enumerate(methods_raw):
        if not isinstance(m, str) or not m.isalpha():
            raise ConfigError(f"{node.key_path('methods')}[{i}]", f"not an HTTP method: {m!r}")
        methods.add(m.upper())
    suffix = node.str("path_suffix", None)
    input_node = node.child("input", None)
    output_node = node.child("output", None)
    drift_node = node.child("drift", None)
    inputs = _parse_input(input_node) if input_node is not None else None
    outputs = _parse_output(output_node) if output_node is not None else None
    drift = _parse_drift(drift_node) if drift_node is not None else DriftConfig()
    node.done()
    if inputs is None and outputs is None:
        raise ConfigError(node.path, "give 'input', 'output' or both")
    return ProbesConfig(sample=sample, methods=frozenset(methods), path_suffix=suffix,
                        input=inputs, output=outputs, drift=drift)


def _path_list(node: Node, key: str) -> tuple[JsonPath, ...]:
    raw = node.raw(key, [])
    if isinstance(raw, str):
        return (compile_path(raw, node.key_path(key)),)
    if not isinstance(raw, list):
        raise ConfigError(node.key_path(key), f"expected a path or a list of paths, got "
                                              f"{type_name(raw)}")
    return tuple(compile_path(p, f"{node.key_path(key)}[{i}]") for i, p in enumerate(raw))


def _optional_path(node: Node, key: str) -> JsonPath | None:
    raw = node.raw(key, None)
    return None if raw is None else compile_path(raw, node.key_path(key))


def _parse_input(node: Node) -> InputProbes:
    length = _optional_path(node, "length")
    missing = _path_list(node, "missing")
    required = _path_list(node, "required")
    features = tuple(_parse_feature(name, raw, path) for name, raw, path in node.items("features"))
    node.done()
    return InputProbes(length=length, missing=missing, required=required, features=features)


def _parse_feature(name: str, raw: Any, path: str) -> FeatureProbe:
    if isinstance(raw, str):
        return FeatureProbe(name, compile_path(raw, path), None)
    fnode = Node(raw, path)
    jpath = compile_path(fnode.raw("path"), fnode.key_path("path"))
    learn = fnode.int("learn", DEFAULT_LEARN, lo=10, hi=100_000)
    edges: tuple[float, ...] | None = None
    if fnode.has("edges"):
        if fnode.has("range") or fnode.has("bins"):
            raise ConfigError(path, "give 'edges' or 'range' with 'bins', not both")
        edges = parse_edges(fnode.raw("edges"), fnode.key_path("edges"))
    elif fnode.has("range") or fnode.has("bins"):
        edges = _range_edges(fnode)
    fnode.done()
    return FeatureProbe(name, jpath, edges, learn)


def _range_edges(node: Node) -> tuple[float, ...]:
    rng = node.list("range")
    bins = node.int("bins", 10, lo=1, hi=MAX_EDGES)
    if (len(rng) != 2 or any(isinstance(v, bool) or not isinstance(v, int | float)
                             or not math.isfinite(v) for v in rng) or rng[0] >= rng[1]):
        raise ConfigError(node.key_path("range"), f"expected [low, high] with low < high, "
                                                  f"got {rng!r}")
    lo, hi = float(rng[0]), float(rng[1])
    step = (hi - lo) / bins
    return tuple(lo + step * i for i in range(1, bins))


def parse_edges(raw: Any, path: str) -> tuple[float, ...]:
    """Strictly increasing finite numbers: the inner bin boundaries of a histogram."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, "expected a non-empty list of increasing numbers")
    if len(raw) > MAX_EDGES:
        raise ConfigError(path, f"at most {MAX_EDGES} edges")
    out: list[float] = []
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{path}[{i}]", f"expected a number, got {v!r}")
        if out and v <= out[-1]:
            raise ConfigError(f"{path}[{i}]", "edges must be strictly increasing")
        out.append(float(v))
    return tuple(out)


def _parse_output(node: Node) -> OutputProbes:
    prediction = _optional_path(node, "prediction")
    score = _optional_path(node, "score")
    error_body = _optional_path(node, "error_body")
    if node.has("score_edges") and node.has("score_bins"):
        raise ConfigError(node.path, "give 'score_edges' or 'score_bins', not both")
    if node.has("score_edges"):
        score_edges = parse_edges(node.raw("score_edges"), node.key_path("score_edges"))
    elif node.has("score_bins"):
        bins = node.int("score_bins", lo=2, hi=MAX_EDGES)
        score_edges = tuple(i / bins for i in range(1, bins))
    else:
        score_edges = DEFAULT_SCORE_EDGES
    labels_raw = node.list("labels", None)
    labels: tuple[str, ...] | None = None
    if labels_raw is not None:
        if not labels_raw or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                     for v in labels_raw):
            raise ConfigError(node.key_path("labels"), "expected a list of label names")
        labels = tuple(str(v) for v in labels_raw)
    max_labels = node.int("max_labels", DEFAULT_MAX_LABELS, lo=1, hi=1000)
    node.done()
    if prediction is None and score is None and error_body is None:
        raise ConfigError(node.path, "give at least one of 'prediction', 'score', 'error_body'")
    return OutputProbes(prediction=prediction, score=score, score_edges=score_edges,
                        error_body=error_body, labels=labels, max_labels=max_labels)


def _parse_drift(node: Node) -> DriftConfig:
    window = node.duration("window", 300.0)
    if not 1 <= window <= 900:
        raise ConfigError(node.key_path("window"), "must be between 1s and 15m")
    baseline = node.duration("baseline", 300.0)
    if baseline > 900:
        raise ConfigError(node.key_path("baseline"), "must be at most 15m")
    config = DriftConfig(window=window, baseline=baseline,
                         min_samples=node.int("min_samples", 50, lo=1))
    node.done()
    return config


# -- alarms -----------------------------------------------------------------------------------
def parse_alarms(items: list[Any], path: str, routes: dict[str, Any]) -> list[AlarmRule]:
    """The top-level ``alarms:`` list; `routes` maps route names to their `RouteConfig`."""
    rules: list[AlarmRule] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        rule = _parse_alarm(Node(item, f"{path}[{i}]"), routes)
        if rule.name in seen:
            raise ConfigError(f"{path}[{i}].name", f"duplicate alarm name {rule.name!r}")
        seen.add(rule.name)
        rules.append(rule)
    return rules


def _parse_alarm(node: Node, routes: dict[str, Any]) -> AlarmRule:
    name = node.name("name")
    route_name = node.str("route")
    route = routes.get(route_name)
    if route is None:
        known = ", ".join(sorted(routes)) or "none"
        raise ConfigError(node.key_path("route"), f"unknown route {route_name!r} "
                                                  f"(routes: {known})")
    metric = node.str("metric")
    if metric not in ALARM_METRICS:
        raise ConfigError(node.key_path("metric"), f"unknown metric {metric!r} (one of "
                                                   f"{', '.join(ALARM_METRICS)})")
    need = ALARM_METRICS[metric]
    probes: ProbesConfig | None = route.probes
    if need is not None and (probes is None or not probes.has(need)):
        raise ConfigError(node.key_path("metric"),
                          f"{metric} needs probes.{need} on route {route_name!r}")
    backend = node.str("backend", "live")
    if backend not in BACKEND_SELECTORS and backend not in route.backends:
        raise ConfigError(node.key_path("backend"),
                          f"expected live, canary, any or a backend of route {route_name!r} "
                          f"({', '.join(sorted(route.backends))}), got {backend!r}")
    window = node.duration("window", 60.0)
    if not 1 <= window <= 900:
        raise ConfigError(node.key_path("window"), "must be between 1s and 15m")
    op = node.str("op", ">")
    if op not in OPS:
        raise ConfigError(node.key_path("op"), f"expected one of {' '.join(OPS)}, got {op!r}")
    threshold = node.number("threshold")
    for_ = node.duration("for", 0.0)
    min_samples = node.int("min_samples", 10, lo=0)
    against = node.str("against", "baseline")
    if against not in ("baseline", "live"):
        raise ConfigError(node.key_path("against"), f"expected baseline or live, got {against!r}")
    if node.has("against") and not metric.startswith("psi_"):
        raise ConfigError(node.key_path("against"), "only for psi_* metrics")
    description = node.str("description", None)
    node.done()
    return AlarmRule(name=name, route=route_name, metric=metric, backend=backend, window=window,
                     op=op, threshold=threshold, for_=for_, min_samples=min_samples,
                     against=against, description=description)
