"""The retry budget of one backend: retries at most `percent` of its requests.

A ring of one-second slots over the last `WINDOW` seconds counts the retries sent to the
backend; a retry is allowed while they are fewer than max(`min_retries`, `percent` % of the
requests the backend answered in that window). The floor lets a quiet backend retry at all;
the percentage keeps a failing one from doubling its load. The requests are the backend's
own per-second metrics (`BackendStats.recent_requests`), read only when a retry is asked
for: the hot path counts nothing here.

    >>> b = RetryBudget(RetryBudgetConfig(percent=10, min_retries=1))
    >>> b.try_retry(0.6, requests=20), b.try_retry(0.7, requests=20), b.try_retry(0.8, 20)
    (True, True, False)
"""

from __future__ import annotations

from gateway.resilience.config import RetryBudget as RetryBudgetConfig

WINDOW = 10  # seconds


class RetryBudget:
    __slots__ = ("percent", "min_retries", "_retries", "_second", "retried", "exhausted")

    def __init__(self, config: RetryBudgetConfig) -> None:
        self.percent = config.percent
        self.min_retries = config.min_retries
        self._retries = [0] * WINDOW
        self._second = 0  # the second of the newest slot
        self.retried = 0  # totals, for the metrics
        self.exhausted = 0

    def try_retry(self, now: float, requests: int) -> bool:
        """Whether one more retry may go to this backend now, `requests` being what it
        answered over the last `WINDOW` seconds; counts the retry when it may."""
        second = int(now)
        if second != self._second:
            self._advance(second)
        allowed = max(self.min_retries, requests * self.percent / 100.0)
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
                self._retries[s % WINDOW] = 0
            self._second = second


__all__ = ["RetryBudget", "WINDOW"]
