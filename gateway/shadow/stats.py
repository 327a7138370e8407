"""What shadow mode measured for one (route, shadow backend): per-second tallies and totals.

Memory is bounded: one `Tally` per second of the configured window (a ring, allocated only
for seconds that saw traffic), one `Tally` since start, and every tally keeps at most
`MAX_CONFUSION` distinct label pairs (the rest are counted under ``(other)``). Latencies go
into the same log-spaced buckets as the request metrics (gateway.histogram.FINE_BOUNDS), so
quantiles are the upper bound of a ~20%-wide bucket.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from typing import Any

from gateway import histogram
from gateway.histogram import FINE_BOUNDS
from gateway.shadow.compare import Comparison

MAX_CONFUSION = 1000
# A second's tally keeps fewer pairs: a window of them is merged on the event loop (for
# /metrics, the report, the rollout gate), and 300 s × 1000 pairs took ~100 ms to merge.
SLOT_CONFUSION = 64
OTHER = "(other)"
OUTCOMES = ("agree", "disagree", "live_error", "shadow_error", "shadow_timeout", "unparsed")


class Tally:
    """Counts for one second (or since start); summed into windows by `merge`."""

    __slots__ = (
        "second", "outcomes", "dropped", "dropped_down", "elements", "elements_agree", "labels",
        "labels_agree", "numbers", "numbers_agree", "delta_sum", "delta_max", "texts",
        "texts_agree", "similarity_sum", "mismatched", "confusion", "live_hist",
        "shadow_hist", "live_sum", "shadow_sum", "max_confusion",
    )

    def __init__(self, second: int = -1, max_confusion: int = MAX_CONFUSION) -> None:
        self.second = second
        self.max_confusion = max_confusion
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.dropped = 0
        self.dropped_down = 0  # of which: not sent because the shadow was down (back-off)
        self.elements = 0
        self.elements_agree = 0
        self.labels = 0
        self.labels_agree = 0
        self.numbers = 0
        self.numbers_agree = 0
        self.delta_sum = 0.0
        self.delta_max = 0.0
        self.texts = 0
        self.texts_agree = 0
        self.similarity_sum = 0.0
        self.mismatched = 0
        self.confusion: dict[tuple[str, str], int] = {}
        self.live_hist: dict[int, int] = {}
        self.shadow_hist: dict[int, int] = {}
        self.live_sum = 0.0
        self.shadow_sum = 0.0

    def _confuse(self, key: tuple[str, str], n: int) -> None:
        confusion = self.confusion
        if key not in confusion and len(confusion) >= self.max_confusion:
            key = (OTHER, OTHER)
        confusion[key] = confusion.get(key, 0) + n

    def add(self, outcome: str, live_latency: float | None, shadow_latency: float | None,
            comparison: Comparison | None) -> None:
        self.outcomes[outcome] += 1
        if live_latency is not None:
            i = bisect.bisect_left(FINE_BOUNDS, live_latency)
            self.live_hist[i] = self.live_hist.get(i, 0) + 1
            self.live_sum += live_latency
        if shadow_latency is not None:
            i = bisect.bisect_left(FINE_BOUNDS, shadow_latency)
            self.shadow_hist[i] = self.shadow_hist.get(i, 0) + 1
            self.shadow_sum += shadow_latency
        c = comparison
        if c is None:
            return
        self.elements += c.elements
        self.elements_agree += c.elements_agree
        self.labels += c.labels
        self.labels_agree += c.labels_agree
        self.numbers += c.numbers
        self.numbers_agree += c.numbers_agree
        self.delta_sum += c.delta_sum
        self.delta_max = max(self.delta_max, c.delta_max)
        self.texts += c.texts
        self.texts_agree += c.texts_agree
        self.similarity_sum += c.similarity_sum
        self.mismatched += c.mismatched
        for key in c.confusion:
            self._confuse(key, 1)

    def merge(self, other: Tally) -> None:
        for name, n in other.outcomes.items():
            self.outcomes[name] += n
        self.dropped += other.dropped
        self.dropped_down += other.dropped_down
        self.elements += other.elements
        self.elements_agree += other.elements_agree
        self.labels += other.labels
        self.labels_agree += other.labels_agree
        self.numbers += other.numbers
        self.numbers_agree += other.numbers_agree
        self.delta_sum += other.delta_sum
        self.delta_max = max(self.delta_max, other.delta_max)
        self.texts += other.texts
        self.texts_agree += other.texts_agree
        self.similarity_sum += other.similarity_sum
        self.mismatched += other.mismatched
        for key, n in other.confusion.items():
            self._confuse(key, n)
        for i, n in other.live_hist.items():
            self.live_hist[i] = self.live_hist.get(i, 0) + n
        for i, n in other.shadow_hist.items():
            self.shadow_hist[i] = self.shadow_hist.get(i, 0) + n
        self.live_sum += other.live_sum
        self.shadow_sum += other.shadow_sum

    @property
    def compared(self) -> int:
        return self.outcomes["agree"] + self.outcomes["disagree"]

    @property
    def agreement_rate(self) -> float | None:
        """Share of compared elements (rows, labels, values) on which both sides agree."""
        return self.elements_agree / self.elements if self.elements else None

    def summary(self, with_text: bool = True) -> dict[str, Any]:
        o = self.outcomes
        compared = self.compared
        matrix: dict[str, dict[str, int]] = {}
        for (live, shadow), n in sorted(self.confusion.items()):
            matrix.setdefault(live, {})[shadow] = n
        return {
            "mirrored": sum(o.values()),
            "compared": compared,
            "agree": o["agree"],
            "disagree": o["disagree"],
            "dropped": self.dropped,
            "dropped_shadow_down": self.dropped_down,
            "live_errors": o["live_error"],
            "shadow_errors": o["shadow_error"],
            "shadow_timeouts": o["shadow_timeout"],
            "unparsed": o["unparsed"],
            "agreement_rate": self.agreement_rate,
            "pair_agreement_rate": o["agree"] / compared if compared else None,
            "elements": {"compared": self.elements, "agree": self.elements_agree},
            "labels": {"compared": self.labels, "agree": self.labels_agree},
            "numbers": {
                "compared": self.numbers,
                "within_tolerance": self.numbers_agree,
                "mean_delta": self.delta_sum / self.numbers if self.numbers else None,
                "max_delta": self.delta_max if self.numbers else None,
            },
            "text": {
                "compared": self.texts,
                "agree": self.texts_agree,
                "mean_similarity": (self.similarity_sum / self.texts
                                    if self.texts and with_text else None),
            },
            "mismatched": self.mismatched,
            "confusion": matrix,
            "latency": {"live": _latency(self.live_hist), "shadow": _latency(self.shadow_hist)},
        }


def quantile(hist: dict[int, int], q: float) -> float | None:
    """Upper bound (seconds) of the bucket holding the q-quantile; None without data."""
    return histogram.quantile(histogram.dense(hist), q)


def _latency(hist: dict[int, int]) -> dict[str, Any]:
    return {"count": sum(hist.values()), "p50": quantile(hist, 0.5), "p99": quantile(hist, 0.99)}


class ShadowStats:
    """One (route, shadow backend): a ring of per-second tallies plus totals since start."""

    __slots__ = ("route", "backend", "clock", "window", "since", "total", "_ring", "_current",
                 "_past", "_past_key")

    def __init__(self, route: str, backend: str, window: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.route = route
        self.backend = backend
        self.clock = clock
        self.window = window
        self.since = clock()
        self.total = Tally()
        self._ring: list[Tally | None] = [None] * max(1, math.ceil(window))
        self._current = Tally()
        # Per window span: its completed seconds, merged once per second (several readers
        # ask for different spans: the report, /metrics, a rollout gate).
        self._past: dict[int, Tally] = {}
        self._past_key = -1

    def _slot(self) -> Tally:
        second = int(self.clock())
        slot = self._current
        if slot.second != second:
            slot = Tally(second, SLOT_CONFUSION)
            self._ring[second % len(self._ring)] = slot
            self._current = slot
        return slot

    def record(self, outcome: str, live_latency: float | None, shadow_latency: float | None,
               comparison: Comparison | None) -> None:
        self._slot().add(outcome, live_latency, shadow_latency, comparison)
        self.total.add(outcome, live_latency, shadow_latency, comparison)

    def drop(self, shadow_down: bool = False) -> None:
        """A copy not sent: queue full, shadow changed, shutdown, or the shadow is down."""
        slot = self._slot()
        slot.dropped += 1
        self.total.dropped += 1
        if shadow_down:
            slot.dropped_down += 1
            self.total.dropped_down += 1

    def slot_at(self, second: int) -> Tally | None:
        """The tally of one second, if it is still in the ring and saw anything."""
        ring = self._ring
        slot = ring[second % len(ring)]
        return slot if slot is not None and slot.second == second else None

    def window_tally(self, seconds: float | None = None) -> Tally:
        """The sum of the last `seconds` (at most the configured window; current second in)."""
        ring = self._ring
        span = min(len(ring), max(1, math.ceil(self.window if seconds is None else seconds)))
        now = int(self.clock())
        if self._past_key != now:
            self._past, self._past_key = {}, now
        past = self._past.get(span)
        if past is None:  # completed seconds do not change: merge them once a second
            past = self._past[span] = Tally()
            for second in range(now - span + 1, now):
                slot = ring[second % len(ring)]
                if slot is not None and slot.second == second:
                    past.merge(slot)
        out = Tally()
        out.merge(past)
        current = ring[now % len(ring)]
        if current is not None and current.second == now:
            out.merge(current)
        return out

    def agreement(self, seconds: float) -> tuple[int, float | None]:
        tally = self.window_tally(seconds)
        return tally.compared, tally.agreement_rate
