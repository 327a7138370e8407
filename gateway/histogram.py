"""Latency histograms: fixed log-spaced buckets shared by every number modelgate keeps.

Request metrics, shadow comparisons and the cluster sums all count latencies into the same
buckets, so any two histograms merge exactly (bucket by bucket) and the Prometheus buckets are
exact sums of fine ones. A leaf module: it imports nothing of the gateway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# Prometheus histogram buckets (seconds) -- dashboards and alert rules rely on these.
PROM_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _fine_bounds() -> tuple[float, ...]:
    """Log-spaced bounds (×1.2, 50 µs … 120 s) merged with PROM_BOUNDS: quantiles from the
    windows are within ~10%, and the Prometheus buckets are exact sums of fine ones."""
    bounds = set(PROM_BOUNDS)
    b = 0.00005
    while b < 120:
        bounds.add(round(b, 7))
        b *= 1.2
    return tuple(sorted(bounds))


FINE_BOUNDS = _fine_bounds()
N_BUCKETS = len(FINE_BOUNDS) + 1  # the last one is +Inf
_PROM_INDEX = tuple(FINE_BOUNDS.index(b) for b in PROM_BOUNDS)
def quantile(hist: Sequence[int], q: float) -> float | None:
    """Upper bound (seconds) of the fine bucket holding the q-quantile; None without data."""
    total = sum(hist)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return FINE_BOUNDS[min(i, len(FINE_BOUNDS) - 1)]
    return FINE_BOUNDS[-1]


def dense(hist: Mapping[int, int]) -> list[int]:
    """A sparse {bucket: count} histogram as the dense list the functions here take."""
    return [hist.get(i, 0) for i in range(N_BUCKETS)]


def prom_buckets(fine: list[int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets (PROM_BOUNDS and +Inf) from a fine histogram."""
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    prev = 0
    for bound, idx in zip(PROM_BOUNDS, _PROM_INDEX, strict=True):
        cumulative += sum(fine[prev : idx + 1])
        prev = idx + 1
        buckets.append((f"{bound:g}", cumulative))
    buckets.append(("+Inf", sum(fine)))
    return buckets
