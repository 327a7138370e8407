"""Probe and alarm config: validated and compiled once at load, never per request.

A route's ``probes:`` section says which parts of its requests and responses to look at
(JSON paths compiled here); the top-level ``alarms:`` list holds threshold rules over the
per-backend windows. Errors name the key path (``routes[0].probes.output.prediction: ...``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter
from pydantic import model_validator as model_check
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from gateway.jsonpath import JsonPath
from gateway.schema import (
    MODEL,
    Name,
    Text,
    duration,
    each,
    integer,
    number,
    problem,
    typed,
    validate,
)
from gateway.shadow.config import JsonPathText, _json_path

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




def _path_list(value: Any) -> tuple[JsonPath, ...]:
    """One JSON path or a list of them."""
    if isinstance(value, str | JsonPath):
        return (_json_path(value),)
    if not isinstance(value, list | tuple):
        raise problem("expected a path or a list of paths, got "
                      f"{'a mapping' if isinstance(value, dict) else type(value).__name__}")
    return each(value, _json_path)


PathList = Annotated[tuple[JsonPath, ...], typed(_path_list, {"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}, env=False)]


def _edges(value: Any) -> tuple[float, ...]:
    """Strictly increasing finite numbers: the inner bin boundaries of a histogram."""
    if not isinstance(value, list | tuple) or not value:
        raise problem("expected a non-empty list of increasing numbers")
    if len(value) > MAX_EDGES:
        raise problem(f"at most {MAX_EDGES} edges")
    out: list[float] = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v or abs(v) == float(
                "inf"):
            raise problem(f"expected a number, got {v!r}", i)
        if out and v <= out[-1]:
            raise problem("edges must be strictly increasing", i)
        out.append(float(v))
    return tuple(out)


Edges = Annotated[tuple[float, ...], typed(_edges, {
    "type": "array", "minItems": 1, "maxItems": MAX_EDGES, "items": {"type": "number"}},
    env=False)]
Finite = Annotated[float, number()]


def _labels(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value or not all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        raise problem("expected a list of label names")
    return tuple(str(v) for v in value)


Labels = Annotated[tuple[str, ...], typed(_labels, {
    "type": "array", "minItems": 1, "items": {"type": ["string", "integer"]}}, env=False)]


@dataclass(frozen=True, slots=True, config=MODEL)
class FeatureProbe:
    """A numeric input feature binned for drift; `edges` None means learned from traffic.
    The document gives a path, or ``{path, edges | range + bins, learn}``."""

    path: JsonPathText
    edges: Edges | None = None
    learn: Annotated[int, integer(10, 100_000)] = DEFAULT_LEARN
    range: tuple[Finite, Finite] | None = None
    bins: Annotated[int, integer(1, MAX_EDGES)] | None = None
    name: SkipJsonSchema[str] = Field(default="", init=False)  # the key in `features`

    @model_check(mode="before")
    @classmethod
    def _path_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("edges") is not None and (
                data.get("range") is not None or data.get("bins") is not None):
            raise problem("give 'edges' or 'range' with 'bins', not both")
        return data

    @model_check(mode="after")
    def _range_edges(self) -> FeatureProbe:
        if self.range is None and self.bins is None:
            return self
        if self.range is None or self.range[0] >= self.range[1]:
            raise problem(f"expected [low, high] with low < high, got {self.range!r}", "range")
        lo, hi = self.range
        bins = self.bins if self.bins is not None else 10
        step = (hi - lo) / bins
        object.__setattr__(self, "edges", tuple(lo + step * i for i in range(1, bins)))
        return self


# A feature is a JSON path, or ``{path, edges | range + bins, learn}``.
Feature = Annotated[FeatureProbe, BeforeValidator(
    lambda v: {"path": v} if isinstance(v, str) else v, json_schema_input_type=str | FeatureProbe)]


@dataclass(frozen=True, slots=True, config=MODEL)
class InputProbes:
    length: JsonPathText | None = None
    missing: PathList = ()
    required: PathList = ()
    feature_map: dict[str, Feature] = Field(default_factory=dict, alias="features")

    @model_check(mode="after")
    def _name_features(self) -> InputProbes:
        for name, feature in self.feature_map.items():
            object.__setattr__(feature, "name", name)
        return self

    @property
    def features(self) -> tuple[FeatureProbe, ...]:
        return tuple(self.feature_map.values())


@dataclass(frozen=True, slots=True, config=MODEL)
class OutputProbes:
    prediction: JsonPathText | None = None
    score: JsonPathText | None = None
    score_edges: Edges = DEFAULT_SCORE_EDGES
    error_body: JsonPathText | None = None
    labels: Labels | None = None  # known labels; others count as OTHER_LABEL
    max_labels: Annotated[int, integer(1, 1000)] = DEFAULT_MAX_LABELS
    score_bins: Annotated[int, integer(2, MAX_EDGES)] | None = None  # read into score_edges

    @model_check(mode="before")
    @classmethod
    def _edges_or_bins(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("score_edges") is not None and data.get(
                "score_bins") is not None:
            raise problem("give 'score_edges' or 'score_bins', not both")
        return data

    @model_check(mode="after")
    def _something_probed(self) -> OutputProbes:
        if self.prediction is None and self.score is None and self.error_body is None:
            raise problem("give at least one of 'prediction', 'score', 'error_body'")
        if self.score_bins is not None:
            bins = self.score_bins
            object.__setattr__(self, "score_edges", tuple(i / bins for i in range(1, bins)))
        return self


@dataclass(frozen=True, slots=True, config=MODEL)
class DriftConfig:
    window: Annotated[float, duration(1, 900)] = 300.0  # the sliding window compared ("now")
    # auto baseline: the first N seconds after start (0: off)
    baseline: Annotated[float, duration(hi=900)] = 300.0
    # fewer observations on either side: no PSI (None)
    min_samples: Annotated[int, integer(1)] = 50


def _method(value: Any) -> str:
    if not isinstance(value, str) or not value.isalpha():
        raise problem(f"not an HTTP method: {value!r}")
    return value.upper()


@dataclass(frozen=True, slots=True, config=MODEL)
class ProbesConfig:
    sample: Annotated[float, number(0, 1)] = 1.0
    methods: frozenset[Annotated[str, typed(_method, {"type": "string"}, env=False)]] = (
        frozenset({"POST"}))
    path_suffix: Text | None = None
    input: InputProbes | None = None
    output: OutputProbes | None = None
    drift: DriftConfig = Field(default_factory=DriftConfig)

    @model_check(mode="after")
    def _input_or_output(self) -> ProbesConfig:
        if self.input is None and self.output is None:
            raise problem("give 'input', 'output' or both")
        return self

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


def _metric(value: Any) -> str:
    if value not in ALARM_METRICS:
        raise problem(f"unknown metric {value!r} (one of {', '.join(ALARM_METRICS)})")
    return str(value)


@dataclass(frozen=True, slots=True, config=ConfigDict(**MODEL, validate_by_name=True))
class AlarmRule:
    """`metric` of `backend` on `route` over `window` seconds compared with `op threshold`;
    firing once it has held for `for_` seconds (``for`` in the document)."""

    name: Name
    route: Text = ""
    metric: Annotated[str, typed(_metric, {"enum": list(ALARM_METRICS)}, env=False)] = (
        "error_rate")
    backend: Text = "live"  # live | canary | any | a backend name
    window: Annotated[float, duration(1, 900)] = 60.0
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: Finite = 0.0
    for_: Annotated[float, duration()] = Field(default=0.0, alias="for")
    min_samples: Annotated[int, integer(0)] = 10
    against: Literal["baseline", "live"] = "baseline"  # psi metrics: vs baseline or live
    description: Text | None = None

    @model_check(mode="before")
    @classmethod
    def _required_in_document(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("route", "metric", "threshold"):
                if data.get(key) is None:
                    raise problem("required", key)
            if data.get("against") is not None and not str(data.get("metric")).startswith(
                    "psi_"):
                raise problem("only for psi_* metrics", "against")
        return data


def check_alarms(rules: tuple[AlarmRule, ...], routes: dict[str, Any]) -> None:
    """Cross-checks of the top-level ``alarms:`` list against the routes (`RouteConfig`s)."""
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise problem(f"duplicate alarm name {rule.name!r}", "alarms", i, "name")
        seen.add(rule.name)
        route = routes.get(rule.route)
        if route is None:
            known = ", ".join(sorted(routes)) or "none"
            raise problem(f"unknown route {rule.route!r} (routes: {known})", "alarms", i,
                          "route")
        need = ALARM_METRICS[rule.metric]
        probes: ProbesConfig | None = route.probes
        if need is not None and (probes is None or not probes.has(need)):
            raise problem(f"{rule.metric} needs probes.{need} on route {rule.route!r}",
                          "alarms", i, "metric")
        if rule.backend not in BACKEND_SELECTORS and rule.backend not in route.backends:
            raise problem(f"expected live, canary, any or a backend of route {rule.route!r} "
                          f"({', '.join(sorted(route.backends))}), got {rule.backend!r}",
                          "alarms", i, "backend")


PROBES = TypeAdapter(ProbesConfig)


def parse_probes(data: Any, path: str = "") -> ProbesConfig:
    return validate(PROBES, data, path)
