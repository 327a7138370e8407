"""How many client connections the proxy port holds at once, shared by both servers.

Why: every open socket is a file descriptor, and the admin port, probes, backend connections
and the log all draw from the same per-process table. When the proxy port takes the last
one, `accept()` fails for everyone, `/healthz` included. So the proxy port stops at a cap
below the fd limit, and what is left of the table stays for the rest. At the cap a new
connection first takes the place of an idle one (no request in flight: a keep-alive
connection between requests, or one that has not sent a whole head yet), like nginx reusing
its idle connections: idle sockets, however many, cannot lock real clients out. Only when
every connection is busy is the new one answered 503 at once and closed (its fd is free again
a moment later).

The cap is `server.max_connections`, or when that is 0 (the default) derived from
RLIMIT_NOFILE: `(soft limit - FD_RESERVE) // 2`, since each proxied connection may hold one
backend connection too. Evictions and refusals are counted
(`modelgate_connections_evicted_total`, `modelgate_connections_refused_total`) and logged at
WARNING at most once per `LOG_EVERY` seconds, with the numbers since the last line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
IO_MMAP_THRESHOLD = 128 * 1024


def return_io_buffers_to_the_os() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (True if set; False off glibc).

    Socket reads and streamed chunks are bytes objects of 64-400 KiB. glibc raises its mmap
    threshold to the largest block freed (up to 32 MiB), after which such buffers come from
    the heap, and a burst of slow clients leaves tens of MB of free but fragmented heap that
    is never given back (measured: 200 non-reading clients, RSS stayed +30-50 MB after they
    left). Fixed at 128 KiB, every such buffer is its own mapping, unmapped when freed."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, IO_MMAP_THRESHOLD))


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

    __slots__ = ("cap", "refused", "evicted", "timeouts", "_clock", "_logged_at", "_logged",
                 "_open")

    def __init__(self, configured: int, open_count: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic, nofile: int | None = None) -> None:
        self.cap = configured or auto_cap(nofile_limit() if nofile is None else nofile)
        self.refused = 0
        self.evicted = 0
        # Connections cut by a client-side timeout, by kind (header, body, write).
        self.timeouts: dict[str, int] = {}
        self._clock = clock
        self._logged_at = -LOG_EVERY
        self._logged = (0, 0)  # evicted, refused at the last log line
        self._open = open_count

    def admit(self, open_now: int, evict_idle: Callable[[], bool]) -> bool:
        """Whether one more connection may stay, `open_now` being held already; at the cap
        `evict_idle()` closes an idle connection to make room, if it finds one."""
        if open_now < self.cap:
            return True
        admitted = evict_idle()
        if admitted:
            self.evicted += 1
        else:
            self.refused += 1
        now = self._clock()
        if now - self._logged_at >= LOG_EVERY:
            evicted, refused = self._logged
            log.warning("proxy port at its connection cap (%d): %d idle connection(s) closed "
                        "to make room, %d refused since the last report", self.cap,
                        self.evicted - evicted, self.refused - refused)
            self._logged_at = now
            self._logged = (self.evicted, self.refused)
        return admitted

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
        evicted = CounterMetricFamily(
            "modelgate_connections_evicted",
            "Idle client connections closed at the connection cap to make room for a new one.")
        evicted.add_metric([], self.evicted)
        timeouts = CounterMetricFamily(
            "modelgate_client_timeouts",
            "Client connections cut by a timeout: header, body (silent upload) or write "
            "(answer left unread).", labels=["kind"])
        for kind, n in sorted(self.timeouts.items()):
            timeouts.add_metric([kind], n)
        return (open_, cap, refused, evicted, timeouts)


__all__ = ["FD_RESERVE", "REFUSED", "ConnectionLimit", "auto_cap", "nofile_limit",
           "return_io_buffers_to_the_os"]
