"""Population stability index over the probes' binned counters.

Probes count predicted labels (``label:<value>``), score bins (``score_bucket:<i>``) and
numeric feature bins (``feature:<name>:<i>``) per backend and second. Drift compares two such
count vectors -- a backend's last window against the live backend's, or against a baseline
snapshot -- with PSI = Σ (aᵢ − eᵢ) · ln(aᵢ / eᵢ) over the shares of each bin. Rule of thumb:
below 0.1 stable, 0.1–0.25 moderate shift, above 0.25 a real change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PSI_EPSILON = 1e-4  # share given to an empty bin so ln() stays finite
LABEL = "label:"
SCORE = "score_bucket:"
FEATURE = "feature:"


def psi(expected: Mapping[str, float], actual: Mapping[str, float],
        epsilon: float = PSI_EPSILON) -> float:
    """PSI of `actual` counts against `expected` counts over the union of their bins.

    >>> psi({"a": 50, "b": 50}, {"a": 50, "b": 50})
    0.0
    """
    e_total = sum(expected.values())
    a_total = sum(actual.values())
    if e_total <= 0 or a_total <= 0:
        raise ValueError("psi needs at least one observation on each side")
    total = 0.0
    for key in set(expected) | set(actual):
        e = max(expected.get(key, 0.0) / e_total, epsilon)
        a = max(actual.get(key, 0.0) / a_total, epsilon)
        total += (a - e) * math.log(a / e)
    return total


def family(counters: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The counters under `prefix` (e.g. all ``label:`` ones), keyed by what follows it."""
    n = len(prefix)
    return {k[n:]: v for k, v in counters.items() if k.startswith(prefix) and v}


def families(counters: Mapping[str, float], features: Iterable[str]) -> dict[str, dict[str, float]]:
    """``labels``, ``scores`` and ``feature:<name>`` count vectors out of a window's counters."""
    out = {"labels": family(counters, LABEL), "scores": family(counters, SCORE)}
    for name in features:
        out[f"feature:{name}"] = family(counters, f"{FEATURE}{name}:")
    return out


def compare(expected: Mapping[str, float], actual: Mapping[str, float],
            min_samples: int) -> float | None:
    """PSI, or None when either side has fewer than `min_samples` observations."""
    need = max(min_samples, 1)
    if sum(expected.values()) < need or sum(actual.values()) < need:
        return None
    return round(psi(expected, actual), 6)


@dataclass(slots=True)
class Baseline:
    """Per-backend count vectors frozen at one moment: what "normal" looked like."""

    taken_at: float
    source: str  # "auto" (the first minutes after start) or the operator who took it
    window: float
    live: str
    counts: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def reference(self, backend: str, family_name: str, min_samples: int
                  ) -> dict[str, float] | None:
        """The backend's own baseline; else the then-live backend's (a new canary has none)."""
        for name in (backend, self.live):
            found = self.counts.get(name, {}).get(family_name)
            if found and sum(found.values()) >= min_samples:
                return found
        return None

    def to_doc(self) -> dict[str, Any]:
        """Everything, counts included: the store keeps it so every process (and the next
        controller after a failover) compares against the same reference."""
        return {"taken_at": self.taken_at, "source": self.source, "window": self.window,
                "live": self.live, "counts": self.counts}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Baseline:
        return cls(taken_at=float(doc["taken_at"]), source=str(doc["source"]),
                   window=float(doc["window"]), live=str(doc["live"]),
                   counts={str(b): {str(f): {str(k): float(v) for k, v in c.items()}
                                    for f, c in fams.items()}
                           for b, fams in doc.get("counts", {}).items()})

    def to_json(self) -> dict[str, object]:
        return {
            "taken_at": self.taken_at, "source": self.source, "window": self.window,
            "live": self.live,
            "samples": {b: {f: sum(c.values()) for f, c in fams.items()}
                        for b, fams in self.counts.items()},
        }
