"""How many client connections the proxy port holds at once, shared by both servers.

Why: every open socket is a file descriptor, and the admin port, probes, backend connections
and the log all draw from the same per-process table. When the proxy port takes the last
one, `accept()` fails for everyone, `/healthz` included. So the proxy port stops at a cap
below the fd limit: a connection beyond it is answered 503 at once and closed (its fd is
free again a moment later), and what is left of the table stays for the rest.

The cap is `server.max_connections`, or when that is 0 (the default) derived from
RLIMIT_NOFILE: `(soft limit - FD_RESERVE) // 2`, since each proxied connection may hold one
backend connection too. Refusals are counted (`modelgate_connections_refused_total`) and
logged at WARNING at most once per `LOG_EVERY` seconds with the number since the last line.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterable

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("modelgate.server")

FD_RESERVE = 128  # descriptors kept for admin, probes, logs, Redis and the like
MIN_CAP = 16
LOG_EVERY = 10.0

_REFUSED_BODY = orjson.dumps({"error": "too_many_connections",
                              "message": "the gateway holds too many connections; retry later"})
# Sent before any request was read, as nginx sends its 408/503: a client that writes a
# request next reads this answer.
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
           % (len(_REFUSED_BODY), _REFUSED_BODY))


def nofile_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def auto_cap(nofile: int) -> int:
    """The connection cap for a process allowed `nofile` descriptors.

    >>> auto_cap(1024)
    448
    """
    return max(MIN_CAP, (nofile - FD_RESERVE) // 2)


class ConnectionLimit:
    """The cap, the refusal count and its rate-limited log line, for one proxy server."""

    __slots__ = ("cap", "refused", "timeouts", "_clock", "_logged_at", "_unlogged", "_open")

    def __init__(self, configured: int, open_count: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic, nofile: int | None = None) -> None:
        self.cap = configured or auto_cap(nofile_limit() if nofile is None else nofile)
        self.refused = 0
        # Connections cut by a client-side timeout, by kind (header, body, write).
        self.timeouts: dict[str, int] = {}
        self._clock = clock
        self._logged_at = -LOG_EVERY
        self._unlogged = 0
        self._open = open_count

    def admit(self, open_now: int) -> bool:
        """Whether one more connection may stay, `open_now` being held already."""
        if open_now < self.cap:
            return True
        self.refused += 1
        self._unlogged += 1
        now = self._clock()
        if now - self._logged_at >= LOG_EVERY:
            log.warning("proxy port at its connection cap (%d): refused %d connection(s)",
                        self.cap, self._unlogged)
            self._logged_at = now
            self._unlogged = 0
        return False

    def timed_out(self, kind: str) -> None:
        self.timeouts[kind] = self.timeouts.get(kind, 0) + 1

    def metrics(self) -> Iterable[Metric]:
        """For the recorder's gauges: open connections, the cap, refusals, timeouts."""
        open_ = GaugeMetricFamily("modelgate_client_connections",
                                  "Client connections open on the proxy port.")
        open_.add_metric([], self._open())
        cap = GaugeMetricFamily("modelgate_client_connections_limit",
                                "Client connections the proxy port holds at most.")
        cap.add_metric([], self.cap)
        refused = CounterMetricFamily(
            "modelgate_connections_refused",
            "Client connections refused (503, closed) at the connection cap.")
        refused.add_metric([], self.refused)
        timeouts = CounterMetricFamily(
            "modelgate_client_timeouts",
            "Client connections cut by a timeout: header, body (silent upload) or write "
            "(answer left unread).", labels=["kind"])
        for kind, n in sorted(self.timeouts.items()):
            timeouts.add_metric([kind], n)
        return (open_, cap, refused, timeouts)


__all__ = ["FD_RESERVE", "REFUSED", "ConnectionLimit", "auto_cap", "nofile_limit"]
