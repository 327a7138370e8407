"""Passive outlier ejection of the URLs inside one backend (Envoy-style, pure state).

Each answer of a URL is reported: a status, or a failure kind (refused, reset, timeout).
Consecutive failures eject the URL; `pick` skips ejected URLs, and an ejected URL comes back
by itself when its time is up (checked lazily, no timer). Ejection time grows with the
number of ejections (`base × n`, at most `max`); a URL back for a full base time without
being ejected again has its count lowered by one per base time, as Envoy does per interval.

Never all URLs: an ejection that would leave fewer than one URL in, or more than
`max_ejection_percent` of them out (at least one may always be out), does not happen; the
URL's counters are reset and it stays in.

    >>> o = Outliers(["http://a", "http://b"], OutlierDetection(consecutive_gateway_failure=2))
    >>> o.failure(0, "refused", now=0.0); o.failure(0, "refused", now=0.1)
    False
    True
    >>> o.pick(0, now=1.0)   # URL 0 is out: round-robin lands on 1
    1
"""

from __future__ import annotations

import math

from gateway.resilience.config import OutlierDetection

GATEWAY_FAILURE_STATUS = frozenset({502, 503, 504})


class UrlHealth:
    """What is known of one URL of a backend."""

    __slots__ = ("url", "consecutive_5xx", "consecutive_gateway", "ejected_until", "ejections",
                 "returned_at", "total_ejections", "unhealthy")

    def __init__(self, url: str) -> None:
        self.url = url
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejected_until = 0.0  # > now: out
        self.ejections = 0  # the multiplier of the ejection time
        self.returned_at = 0.0
        self.total_ejections = 0  # for the counter metric
        self.unhealthy = False  # failed its active health checks: out until it passes


class Outliers:
    """The outlier state of one backend's URLs (index = position in the backend's list)."""

    __slots__ = ("settings", "urls", "ejected")

    def __init__(self, urls: list[str], settings: OutlierDetection) -> None:
        self.settings = settings
        self.urls = [UrlHealth(u) for u in urls]
        self.ejected = 0  # URLs out right now (as of the last look at the clock)

    def pick(self, start: int, now: float) -> int:
        """The first URL in from `start` on (round-robin order); `start` itself when all
        are in, which is the common case and costs one comparison."""
        if not self.ejected:
            return start
        self._return_due(now)
        urls = self.urls
        n = len(urls)
        for step in range(n):
            i = (start + step) % n
            if urls[i].ejected_until <= now:
                return i
        return start  # unreachable: one URL always stays in

    def other(self, failed: int, now: float) -> int | None:
        """A URL in other than `failed` (for a retry), or None."""
        self._return_due(now)
        urls = self.urls
        n = len(urls)
        for step in range(1, n):
            i = (failed + step) % n
            if urls[i].ejected_until <= now:
                return i
        return None

    def success(self, i: int) -> None:
        """URL `i` answered with a status below 500."""
        health = self.urls[i]
        health.consecutive_5xx = 0
        health.consecutive_gateway = 0

    def status(self, i: int, status: int, now: float) -> bool:
        """URL `i` answered `status`; True when this ejected it."""
        if status < 500:
            self.success(i)
            return False
        return self._bad(i, status in GATEWAY_FAILURE_STATUS, now)

    def failure(self, i: int, kind: str, now: float) -> bool:
        """Calling URL `i` failed (refused, reset, timeout): a gateway failure and a 5xx.
        True when this ejected it."""
        return self._bad(i, True, now)

    def set_healthy(self, i: int, healthy: bool, now: float) -> bool:
        """The active health checks' verdict on URL `i`; True when it changed what is
        picked. An unhealthy URL is out until it is healthy again (no ejection time), but
        never the last one in: then it stays in and is marked again at the next verdict."""
        health = self.urls[i]
        if healthy == (not health.unhealthy):
            return False
        self._return_due(now)
        if healthy:
            health.unhealthy = False
            health.ejected_until = 0.0
            health.consecutive_5xx = health.consecutive_gateway = 0
            self.ejected = sum(1 for h in self.urls if h.ejected_until > now)
            return True
        if health.ejected_until <= now and self.ejected >= len(self.urls) - 1:
            return False  # the last one in
        if health.ejected_until <= now:
            self.ejected += 1
        health.unhealthy = True
        health.ejected_until = math.inf
        return True

    def is_ejected(self, i: int, now: float) -> bool:
        return self.urls[i].ejected_until > now

    def ejected_now(self, now: float) -> int:
        self._return_due(now)
        return self.ejected

    # --------------------------------------------------------------------------------------

    def _bad(self, i: int, gateway: bool, now: float) -> bool:
        s = self.settings
        health = self.urls[i]
        if health.ejected_until > now:
            return False  # already out (a request picked before the ejection)
        health.consecutive_5xx += 1
        health.consecutive_gateway = health.consecutive_gateway + 1 if gateway else 0
        if not ((s.consecutive_5xx and health.consecutive_5xx >= s.consecutive_5xx) or (
                s.consecutive_gateway_failure
                and health.consecutive_gateway >= s.consecutive_gateway_failure)):
            return False
        health.consecutive_5xx = health.consecutive_gateway = 0
        self._return_due(now)
        n = len(self.urls)
        # At least one URL may be out whatever the percentage, but never the last one in.
        allowed = max(1, int(n * s.max_ejection_percent / 100.0)) if n > 1 else 0
        if self.ejected >= min(allowed, n - 1):
            return False
        if health.ejections and health.returned_at:
            # Envoy lowers the multiplier for every interval a host was not ejected.
            healthy_for = now - health.returned_at
            health.ejections = max(0, health.ejections - int(healthy_for // s.base_ejection_time))
        health.ejections += 1
        health.total_ejections += 1
        health.ejected_until = now + min(s.base_ejection_time * health.ejections,
                                         s.max_ejection_time)
        self.ejected += 1
        return True

    def _return_due(self, now: float) -> None:
        if not self.ejected:
            return
        out = 0
        for health in self.urls:
            if health.ejected_until:
                if health.ejected_until <= now:
                    health.returned_at = health.ejected_until
                    health.ejected_until = 0.0
                else:
                    out += 1
        self.ejected = out


__all__ = ["GATEWAY_FAILURE_STATUS", "Outliers", "UrlHealth"]
