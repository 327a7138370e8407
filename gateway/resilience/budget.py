"""The retry budget of one backend: retries at most `percent` of its requests.

A ring of one-second slots over the last `WINDOW` seconds counts the requests the backend
answered and the retries sent to it; a retry is allowed while the retries in the window are
fewer than max(`min_retries`, `percent` % of the requests). The floor lets a quiet backend
retry at all; the percentage keeps a failing one from doubling its load.

    >>> b = RetryBudget(RetryBudgetConfig(percent=10, min_retries=1))
    >>> for _ in range(20): b.note_request(now=0.5)
    >>> b.try_retry(now=0.6), b.try_retry(now=0.7), b.try_retry(now=0.8)
    (True, True, False)
"""

from __future__ import annotations

from gateway.resilience.config import RetryBudget as RetryBudgetConfig

WINDOW = 10  # seconds


class RetryBudget:
    __slots__ = ("percent", "min_retries", "_requests", "_retries", "_second", "retried",
                 "exhausted")

    def __init__(self, config: RetryBudgetConfig) -> None:
        self.percent = config.percent
        self.min_retries = config.min_retries
        self._requests = [0] * WINDOW
        self._retries = [0] * WINDOW
        self._second = 0  # the second of the newest slot
        self.retried = 0  # totals, for the metrics
        self.exhausted = 0

    def note_request(self, now: float) -> None:
        """The backend answered a request (any outcome)."""
        second = int(now)
        if second != self._second:
            self._advance(second)
        self._requests[second % WINDOW] += 1

    def try_retry(self, now: float) -> bool:
        """Whether one more retry may go to this backend now; counts it when it may."""
        second = int(now)
        if second != self._second:
            self._advance(second)
        allowed = max(self.min_retries, sum(self._requests) * self.percent / 100.0)
        if sum(self._retries) >= allowed:
            self.exhausted += 1
            return False
        self._retries[second % WINDOW] += 1
        self.retried += 1
        return True

    def _advance(self, second: int) -> None:
        # Clear the slots of the seconds that passed since the newest one (all of them after
        # a pause of a window or more); a clock going back (never with monotonic) only ages.
        gap = second - self._second
        if gap > 0:
            for s in range(self._second + 1, self._second + 1 + min(gap, WINDOW)):
                self._requests[s % WINDOW] = 0
                self._retries[s % WINDOW] = 0
            self._second = second


__all__ = ["RetryBudget", "WINDOW"]
