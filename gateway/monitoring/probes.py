"""Input and output probes: a tap that reads a finished exchange's bodies and counts.

Runs synchronously after the client has its response, so it must stay cheap: the sample
rate bounds how often it runs, each body is parsed once with orjson, JSON paths and counter
names are compiled at config time, and the counts go into the backend's `BackendStats` in
one `add_many()` call. Everything is counted per backend so canary and live compare.

Counters written (see gateway/metrics.py for their Prometheus names):
``input_total``, ``input_values``, ``input_missing``, ``input_schema_errors``,
``input_length_sum``, ``request_bytes_sum``, ``feature:<name>:<bin>``;
``output_responses``, ``output_total``, ``output_null``, ``output_error``,
``label:<value>``, ``score_bucket:<bin>``.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from gateway.jsonpath import MISSING, WILDCARD, JsonPath
from gateway.monitoring.config import (
    OTHER_LABEL,
    FeatureProbe,
    InputProbes,
    OutputProbes,
    ProbesConfig,
)
from gateway.monitoring.drift import FEATURE, LABEL, SCORE
from gateway.routing import Exchange

if TYPE_CHECKING:
    from gateway.config import RouteConfig
    from gateway.metrics import BackendStats, Recorder

log = logging.getLogger("modelgate.monitoring")

Counts = list[tuple[str, float]]
_ONE = 1.0
INPUT_TOTAL = ("input_total", _ONE)
SCHEMA_ERROR = ("input_schema_errors", _ONE)
OUTPUT_RESPONSES = ("output_responses", _ONE)
OUTPUT_TOTAL = ("output_total", _ONE)
OUTPUT_NULL = ("output_null", _ONE)
OUTPUT_ERROR = ("output_error", _ONE)
_NAN_STRINGS = frozenset({"nan", "NaN", "NAN", "null", ""})
_INVALID: Any = object()  # a body that is not JSON
_NOWHERE = JsonPath("$.__modelgate_unset__", ("\x00unset",))  # a path that never matches
MAX_LABEL_CHARS = 100
LABEL_CACHE = 1024
LENGTH_EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
BYTES_EDGES = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)


class Histogram:
    """Cumulative counts over fixed edges (``le`` semantics), for Prometheus only."""

    __slots__ = ("edges", "counts", "sum")

    def __init__(self, edges: tuple[float, ...]) -> None:
        self.edges = edges
        self.counts = [0] * (len(edges) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.edges, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        return cumulative_buckets(self.edges, self.counts)


def cumulative_buckets(edges: Sequence[float], counts: Sequence[float]
                       ) -> list[tuple[str, float]]:
    """Prometheus buckets (upper edge, cumulative count; +Inf last) from per-bin counts,
    where ``counts[i]`` is the bin below ``edges[i]`` and ``counts[-1]`` the overflow."""
    out: list[tuple[str, float]] = []
    running = 0.0
    for edge, n in zip(edges, counts, strict=False):
        running += n
        out.append((f"{edge:g}", running))
    out.append(("+Inf", running + counts[-1]))
    return out


class ProbeTotals:
    """Per-backend histograms that only Prometheus needs (windows use the counters)."""

    __slots__ = ("length", "request_bytes", "score_sum")

    def __init__(self) -> None:
        self.length = Histogram(tuple(float(e) for e in LENGTH_EDGES))
        self.request_bytes = Histogram(tuple(float(e) for e in BYTES_EDGES))
        self.score_sum = 0.0


def is_missing(value: Any) -> bool:
    """null, NaN (a float or the strings clients send for it) or absent."""
    if value is None or value is MISSING:
        return True
    cls = value.__class__
    if cls is float:
        return bool(value != value)
    return cls is str and value in _NAN_STRINGS


def count_missing(value: Any) -> tuple[int, int]:
    """(values, missing) among the leaves of `value` (nested lists are flattened)."""
    if not isinstance(value, list):
        return 1, int(is_missing(value))
    n = m = 0
    for item in value:
        if isinstance(item, list):
            a, b = count_missing(item)
            n += a
            m += b
        else:
            n += 1
            if is_missing(item):
                m += 1
    return n, m


def is_null_prediction(value: Any) -> bool:
    """Absent, null, empty, or a batch with a null or empty element."""
    if value is None or value is MISSING:
        return True
    if isinstance(value, list | str | dict) and not value:
        return True
    if isinstance(value, list):
        for item in value:
            if item is None or (isinstance(item, list | str | dict) and not item):
                return True
    return False


def _number(value: Any) -> float | None:
    cls = value.__class__
    if cls is float:
        return float(value) if math.isfinite(value) else None
    if cls is int:
        return float(value)
    return None


def decile_edges(values: list[float]) -> tuple[float, ...]:
    """Inner edges at the deciles of `values` (duplicates dropped: a constant has one edge)."""
    ordered = sorted(values)
    n = len(ordered)
    edges: list[float] = []
    for i in range(1, 10):
        edge = ordered[min(n - 1, (i * n) // 10)]
        if not edges or edge > edges[-1]:
            edges.append(edge)
    return tuple(edges)


def _plain(node: Any, steps: tuple[Any, ...]) -> Any:
    """Walk steps without wildcards (orjson gives exact dicts and lists: class checks do)."""
    for step in steps:
        if step.__class__ is str:
            if node.__class__ is not dict:
                return MISSING
            node = node.get(step, MISSING)
            if node is MISSING:
                return MISSING
        else:
            if node.__class__ is not list or not -len(node) <= step < len(node):
                return MISSING
            node = node[step]
    return node


class PathSet:
    """Several JSON paths read from one document, compiled together at config time so the
    plain prefixes they share are walked once per document (``inputs[0].data`` once for the
    length, missing-values and feature probes)."""

    __slots__ = ("_prefixes", "_plans")

    def __init__(self, paths: Sequence[JsonPath]) -> None:
        heads: list[tuple[Any, ...]] = []
        plans: list[tuple[int, JsonPath | None]] = []
        for path in paths:
            steps = path.steps
            cut = next((i for i, s in enumerate(steps) if s is WILDCARD), len(steps))
            head = steps[:cut]
            if head not in heads:
                heads.append(head)
            rest = JsonPath(path.text, steps[cut:]) if cut < len(steps) else None
            plans.append((heads.index(head), rest))
        # Each head is walked from the longest earlier head it extends (or from the root).
        order = sorted(range(len(heads)), key=lambda i: len(heads[i]))
        position = {i: n for n, i in enumerate(order)}
        prefixes: list[tuple[int, tuple[Any, ...]]] = []
        for i in order:
            head = heads[i]
            parent = -1
            for j in order[: position[i]]:
                if heads[j] == head[: len(heads[j])] and (
                    parent < 0 or len(heads[j]) > len(heads[order[parent]])
                ):
                    parent = position[j]
            start = len(heads[order[parent]]) if parent >= 0 else 0
            prefixes.append((parent, head[start:]))
        self._prefixes = prefixes
        self._plans = [(position[h], rest) for h, rest in plans]

    def resolve(self, doc: Any) -> list[Any]:
        """The value at each path, in the order given (`MISSING` where absent)."""
        bases: list[Any] = []
        for parent, steps in self._prefixes:
            node = doc if parent < 0 else bases[parent]
            bases.append(node if node is MISSING else _plain(node, steps))
        out: list[Any] = []
        for index, rest in self._plans:
            base = bases[index]
            out.append(base if rest is None or base is MISSING else rest.get(base))
        return out


class FeatureBins:
    """One numeric feature's binning; edges come from config or from the first values seen."""

    __slots__ = ("probe", "prefix", "edges", "names", "_learning")

    def __init__(self, probe: FeatureProbe) -> None:
        self.probe = probe
        self.prefix = f"{FEATURE}{probe.name}:"
        self.edges: tuple[float, ...] | None = None
        self.names: tuple[str, ...] = ()
        self._learning: list[float] | None = None
        if probe.edges is not None:
            self._set_edges(probe.edges)
        else:
            self._learning = []

    def _set_edges(self, edges: tuple[float, ...]) -> None:
        self.names = tuple(f"{self.prefix}{i}" for i in range(len(edges) + 1))
        self.edges = edges

    def count(self, value: Any, out: Counts) -> None:
        values = value if isinstance(value, list) else (value,)
        edges = self.edges
        if edges is None:
            self._learn(values)
            return
        names = self.names
        for v in values:
            x = _number(v)
            if x is not None:
                out.append((names[bisect.bisect_left(edges, x)], _ONE))

    def _learn(self, values: Any) -> None:
        learning = self._learning
        assert learning is not None
        for v in values:
            x = _number(v)
            if x is not None:
                learning.append(x)
        if len(learning) >= self.probe.learn:
            self._set_edges(decile_edges(learning))
            self._learning = None
            log.info("feature %s: learned bin edges %s", self.probe.name, self.edges,
                     extra={"event": "feature_edges"})


class InputProbe:
    __slots__ = ("paths", "n_required", "has_length", "missing_wild", "features")

    def __init__(self, config: InputProbes) -> None:
        length = (config.length,) if config.length is not None else ()
        self.n_required = len(config.required)
        self.has_length = bool(length)
        # For missing-value paths: with a wildcard, absent means "nothing to enumerate".
        self.missing_wild = tuple(p.has_wildcard for p in config.missing)
        self.features = tuple(FeatureBins(f) for f in config.features)
        self.paths = PathSet([*config.required, *length, *config.missing,
                              *(f.path for f in config.features)])

    def __call__(self, body: bytes | None, out: Counts, totals: ProbeTotals) -> None:
        out.append(INPUT_TOTAL)
        size = len(body) if body else 0
        out.append(("request_bytes_sum", float(size)))
        totals.request_bytes.observe(size)
        if not body:
            out.append(SCHEMA_ERROR)
            return
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            out.append(SCHEMA_ERROR)
            return
        found = self.paths.resolve(doc)
        i = self.n_required
        for value in found[:i]:
            if value is MISSING or value is None:
                out.append(SCHEMA_ERROR)
                break
        if self.has_length:
            value = found[i]
            i += 1
            if isinstance(value, list | str | dict):
                n = len(value)
                out.append(("input_length_sum", float(n)))
                totals.length.observe(n)
        if self.missing_wild:
            values = missing = 0
            for wild in self.missing_wild:
                value = found[i]
                i += 1
                if value is MISSING and wild:
                    continue  # nothing to enumerate; `required` reports absent containers
                a, b = count_missing(value)
                values += a
                missing += b
            out.append(("input_values", float(values)))
            out.append(("input_missing", float(missing)))
        for feature in self.features:
            value = found[i]
            i += 1
            if value is not MISSING:
                feature.count(value, out)


class OutputProbe:
    __slots__ = ("prediction", "score", "score_edges", "score_names", "error_body", "paths",
                 "_known", "_cache", "_open", "_other")

    def __init__(self, config: OutputProbes) -> None:
        self.prediction = config.prediction
        self.score = config.score
        self.score_edges = config.score_edges
        self.score_names = tuple(f"{SCORE}{i}" for i in range(len(config.score_edges) + 1))
        self.error_body = config.error_body
        # Always three slots (an unset path reads as MISSING): error body, prediction, score.
        self.paths = PathSet([p if p is not None else _NOWHERE
                              for p in (config.error_body, config.prediction, config.score)])
        # Label text -> counter name. Bounded: once `max_labels` distinct values have their own
        # counter (or a fixed list was given), new values count as OTHER_LABEL.
        self._known: dict[str, str] = {}
        self._open = config.max_labels
        if config.labels is not None:
            self._known = {v: f"{LABEL}{v}" for v in config.labels}
            self._open = 0
        self._other = f"{LABEL}{OTHER_LABEL}"
        self._cache: dict[Any, str] = {}  # raw JSON value -> counter name, bounded

    def label_name(self, value: Any) -> str:
        found = self._cache.get(value)
        if found is not None:
            return found
        text = value if value.__class__ is str else str(value)
        text = text[:MAX_LABEL_CHARS]
        found = self._known.get(text)
        if found is None:
            if self._open > 0:
                self._open -= 1
                found = self._known[text] = f"{LABEL}{text}"
            else:
                found = self._other
        if len(self._cache) < LABEL_CACHE:
            self._cache[value] = found
        return found

    def __call__(self, status: int, body: bytes | None, out: Counts,
                 totals: ProbeTotals) -> None:
        if body is None:
            if status >= 400:
                out.append(OUTPUT_RESPONSES)
                out.append(OUTPUT_ERROR)
            return  # not captured (streamed past the limit): nothing to judge
        out.append(OUTPUT_RESPONSES)
        if status >= 400:
            out.append(OUTPUT_ERROR)
            return
        try:
            doc = orjson.loads(body) if body else _INVALID
        except orjson.JSONDecodeError:
            doc = _INVALID
        if doc is _INVALID:  # no prediction can be read from it: a null output
            err = pred = score = MISSING
        else:
            err, pred, score = self.paths.resolve(doc)
        if err is not MISSING and err is not None and err is not False:
            out.append(OUTPUT_ERROR)
            return
        out.append(OUTPUT_TOTAL)
        if self.prediction is not None:
            if is_null_prediction(pred):
                out.append(OUTPUT_NULL)
            self._labels(pred, out)
        if score is not MISSING:
            self._scores(score, out, totals)

    def _labels(self, pred: Any, out: Counts) -> None:
        items = pred if isinstance(pred, list) else (pred,)
        for item in items:
            if item is None or item is MISSING or isinstance(item, list | dict):
                continue
            out.append((self.label_name(item), _ONE))

    def _scores(self, found: Any, out: Counts, totals: ProbeTotals) -> None:
        items = found if isinstance(found, list) else (found,)
        edges = self.score_edges
        names = self.score_names
        for item in items:
            if isinstance(item, list):  # per-class probabilities: the confidence is the max
                numbers = [x for x in map(_number, item) if x is not None]
                x = max(numbers) if numbers else None
            else:
                x = _number(item)
            if x is not None:
                out.append((names[bisect.bisect_left(edges, x)], _ONE))
                totals.score_sum += x


class RouteProbes:
    """The probes tap of one route (the `Tap` protocol of gateway.routing)."""

    __slots__ = ("route", "config", "sample", "methods", "suffix", "stats", "totals",
                 "input", "output", "needs_request_body", "needs_response_body")

    def __init__(self, route: RouteConfig, config: ProbesConfig, recorder: Recorder) -> None:
        self.route = route.name
        self.config = config
        self.sample = config.sample
        self.methods = config.methods
        self.suffix = config.path_suffix
        self.stats: dict[str, BackendStats] = {
            b: recorder.stats(route.name, b) for b in route.backends
        }
        self.totals = {b: ProbeTotals() for b in route.backends}
        self.input = InputProbe(config.input) if config.input is not None else None
        self.output = OutputProbe(config.output) if config.output is not None else None
        self.needs_request_body = self.input is not None
        self.needs_response_body = self.output is not None

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.probe.name for f in self.input.features) if self.input else ()

    def __call__(self, exchange: Exchange) -> None:
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        if exchange.method not in self.methods:
            return
        suffix = self.suffix
        if suffix is not None:
            target = exchange.target
            query = target.find("?")
            if not (target if query < 0 else target[:query]).endswith(suffix):
                return
        stats = self.stats.get(exchange.backend)
        if stats is None:
            return
        totals = self.totals[exchange.backend]
        out: Counts = []
        if self.input is not None:
            self.input(exchange.request_body, out, totals)
        if self.output is not None:
            self.output(exchange.status, exchange.response_body, out, totals)
        stats.add_many(out)
