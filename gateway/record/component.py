"""Recordings: capture a sample of a route's live exchanges into a gzip JSON-lines file.

How an exchange is captured, and why the client never notices:

1. While a recording runs on a route, `Recordings.tap()` gives the route a `RecordTap`
   (the route pays nothing otherwise). The sample (sticky per user key, like the shadow
   sample, with a salt of its own) is decided when the proxy plans the request
   (`body_sample`, `Exchange.sampled`): only sampled requests buffer their bodies or keep a
   copy of a streamed answer, so a 5 % recording costs the other 95 % nothing but the
   decision. The proxy runs the tap after the client has its answer; it puts the exchange
   on the recording's bounded queue with `put_nowait`. A full queue (exchanges or body
   bytes) drops the exchange and counts it.
2. One writer task per recording takes exchanges off the queue, redacts them, encodes one
   JSON line each (gateway.record.format) and compresses it into the recording's gzip
   stream. It ends the recording when the duration is over, `max_requests` are captured or
   the next line would pass `max_bytes`; then the route's tap goes away.

Recordings live in memory, compressed: at most `MAX_KEPT` per process (the oldest finished one
is evicted to make room), each at most `max_bytes` of JSON lines (≤ `MAX_BYTES`), so memory
is bounded by MAX_KEPT × max_bytes. They are per process: the admin API of a process records
that process's traffic (with ``serve --workers N`` each worker has its own admin port and
recordings; SO_REUSEPORT spreads connections over workers, so one worker sees about 1/N).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.component import Host
from gateway.config import RouteConfig
from gateway.errors import Conflict, NotFound
from gateway.record.format import Redaction, line
from gateway.routing import Exchange, Tap, in_sample, threshold
from gateway.state import RouteState

log = logging.getLogger("modelgate.record")

MAX_KEPT = 4  # recordings kept in memory per process, finished ones included
MAX_BYTES = 256 * 1024 * 1024  # the largest max_bytes a recording may ask for
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_REQUESTS = 100_000
MAX_DURATION = 24 * 3600.0
QUEUE = 1000  # exchanges waiting for the writer; more are dropped and counted
QUEUE_BYTES = 32 * 1024 * 1024  # ... and body bytes waiting
PIECE = 64 * 1024  # compressed bytes per piece kept (and per write of a download)


@dataclass(frozen=True, slots=True)
class RecordingSpec:
    """What to record: validated by the admin API's model (gateway.admin.models)."""

    duration: float
    sample: float = 100.0
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_bytes: int = DEFAULT_MAX_BYTES
    redact_headers: tuple[str, ...] = ()
    redact_json_fields: tuple[str, ...] = ()
    redact_query_params: tuple[str, ...] = ()


class Recording:
    """One recording: its bounded queue, counters, and the compressed file so far."""

    def __init__(self, route: str, spec: RecordingSpec, now: float) -> None:
        self.id = secrets.token_hex(8)
        self.route = route
        self.spec = spec
        self.redaction = Redaction.of(spec.redact_headers, spec.redact_json_fields,
                                      spec.redact_query_params)
        self.started = now
        self.deadline = time.monotonic() + spec.duration
        self.ended: float | None = None
        self.stop_reason: str | None = None
        self.active = True  # the tap queues only while this holds
        self.accepted = 0  # exchanges queued (never more than max_requests)
        self.captured = 0
        self.dropped = 0
        self.bytes = 0  # JSON-lines bytes, before compression
        self.queue: asyncio.Queue[tuple[Exchange, float, int]] = asyncio.Queue(QUEUE)
        self.queued_bytes = 0
        self.pieces: list[bytes] = []
        self.compressed = 0
        self._pending = bytearray()
        self._gzip = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip container
        self.task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        return "recording" if self.ended is None else "done"

    def write(self, data: bytes) -> None:
        self._add(self._gzip.compress(data))
        self.bytes += len(data)
        self.captured += 1

    def _add(self, out: bytes) -> None:
        pending = self._pending
        pending += out
        while len(pending) >= PIECE:
            self.pieces.append(bytes(pending[:PIECE]))
            del pending[:PIECE]
        self.compressed = len(self.pieces) * PIECE + len(pending)

    def close(self, reason: str) -> None:
        """The end: no more exchanges, the gzip stream finished, the queue emptied."""
        if self.ended is not None:
            return
        self.active = False
        self.stop_reason = reason
        self.ended = time.time()
        self._add(self._gzip.flush())
        if self._pending:
            self.pieces.append(bytes(self._pending))
            self._pending.clear()
        while not self.queue.empty():
            self.queue.get_nowait()
            self.dropped += 1
        self.queued_bytes = 0

    def view(self, member: str) -> dict[str, Any]:
        spec = self.spec
        return {
            "id": self.id, "route": self.route, "state": self.state,
            "stop_reason": self.stop_reason, "process": member,
            "started": self.started, "ends_at": self.started + spec.duration,
            "ended": self.ended, "duration_s": spec.duration, "sample_percent": spec.sample,
            "max_requests": spec.max_requests, "max_bytes": spec.max_bytes,
            "redact_headers": sorted(self.redaction.headers),
            "redact_json_fields": sorted(self.redaction.json_fields),
            "redact_query_params": sorted(self.redaction.query),
            "captured": self.captured, "dropped": self.dropped,
            "queued": self.queue.qsize(), "bytes": self.bytes,
            "compressed_bytes": self.compressed,
        }


class RecordTap:
    """Queues sampled exchanges of one route for its running recording; never waits."""

    __slots__ = ("needs_request_body", "needs_response_body", "recording", "threshold",
                 "salt", "body_sample")

    def __init__(self, recording: Recording, salt: bytes) -> None:
        self.needs_request_body = True
        self.needs_response_body = True
        self.recording = recording
        self.threshold = threshold(recording.spec.sample)
        self.salt = salt
        # The proxy decides the sample when it plans a request, so only sampled requests
        # buffer their bodies (gateway.routing.CompiledRoute.sampled).
        self.body_sample = (self.threshold, salt)

    def __call__(self, exchange: Exchange) -> None:
        rec = self.recording
        if not rec.active or rec.accepted >= rec.spec.max_requests:
            return
        decided = exchange.sampled  # decided at plan time (same key, threshold and salt)
        if decided is None:
            decided = in_sample(self.threshold, self.salt, exchange.sticky_key)
        if not decided:
            return
        size = len(exchange.request_body or b"") + len(exchange.response_body or b"")
        if rec.queue.full() or rec.queued_bytes + size > QUEUE_BYTES:
            rec.dropped += 1
            return
        rec.queue.put_nowait((exchange, time.time() - exchange.latency, size))
        rec.queued_bytes += size
        rec.accepted += 1


class Recordings:
    """The component: recordings by id, at most one running per route."""

    name = "record"

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        self._recordings: dict[str, Recording] = {}  # oldest first
        self._running: dict[str, Recording] = {}  # route -> its running recording
        self._captured: dict[str, int] = {}  # route -> exchanges captured since start
        self._dropped: dict[str, int] = {}
        self._member = getattr(gateway, "member_id", "")
        gateway.recorder.add_collector("record", self._collect)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for rec in list(self._running.values()):
            await self._end(rec, "shutdown", refresh=False)

    # -- the hot path --------------------------------------------------------------------------
    def tap(self, route: RouteConfig, state: RouteState) -> Tap | None:
        rec = self._running.get(route.name)
        if rec is None:
            return None
        return RecordTap(rec, (route.name + "#record").encode()[:64])

    # -- control -------------------------------------------------------------------------------
    def begin(self, route: str, spec: RecordingSpec) -> Recording:
        """Start recording `route` (one of the config's); `Conflict` when one runs there
        already or MAX_KEPT recordings run at once."""
        self.gateway.control.route_config(route)  # NotFound for an unknown route
        running = self._running.get(route)
        if running is not None:
            raise Conflict(f"recording {running.id} is already running on route {route!r}; "
                           f"stop it first (DELETE /admin/recordings/{running.id})")
        while len(self._recordings) >= MAX_KEPT:
            oldest = next((r for r in self._recordings.values() if r.ended is not None), None)
            if oldest is None:
                raise Conflict(f"{MAX_KEPT} recordings are running: stop one first")
            del self._recordings[oldest.id]
        rec = Recording(route, spec, self.gateway.clock())
        self._recordings[rec.id] = rec
        self._running[route] = rec
        rec.task = asyncio.get_running_loop().create_task(self._writer(rec),
                                                          name=f"recording:{rec.id}")
        self.gateway.refresh_route(route)
        log.info("recording %s started on route %s", rec.id, route)
        return rec

    def get(self, rid: str) -> Recording:
        found = self._recordings.get(rid)
        if found is None:
            raise NotFound(f"no recording {rid!r} on this process (recordings are kept per "
                           f"process, at most {MAX_KEPT})")
        return found

    def all(self) -> list[Recording]:
        return list(self._recordings.values())

    async def end(self, rid: str) -> Recording:
        """Stop a running recording (what is queued is still written); a finished one is
        discarded."""
        rec = self.get(rid)
        if rec.ended is None:
            await self._end(rec, "stopped")
        else:
            del self._recordings[rid]
        return rec

    async def _end(self, rec: Recording, reason: str, refresh: bool = True) -> None:
        if rec.stop_reason is None:
            rec.stop_reason = reason
        rec.active = False
        task = rec.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._finish(rec, reason, refresh)

    def _finish(self, rec: Recording, reason: str, refresh: bool = True) -> None:
        if rec.ended is not None:
            return
        rec.close(rec.stop_reason or reason)
        self._dropped[rec.route] = self._dropped.get(rec.route, 0) + rec.dropped
        if self._running.get(rec.route) is rec:
            del self._running[rec.route]
            if refresh:
                self.gateway.refresh_route(rec.route)
        log.info("recording %s on route %s ended (%s): %d exchanges, %d dropped", rec.id,
                 rec.route, rec.stop_reason, rec.captured, rec.dropped)

    # -- the writer ----------------------------------------------------------------------------
    async def _writer(self, rec: Recording) -> None:
        reason = "duration"
        try:
            while True:
                left = rec.deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(rec.queue.get(), left)
                except TimeoutError:
                    break
                if not self._write(rec, item):
                    reason = rec.stop_reason or "max_bytes"
                    break
                if rec.captured >= rec.spec.max_requests:
                    reason = "max_requests"
                    break
        except asyncio.CancelledError:
            # Stopped (DELETE, shutdown): what the tap queued so far is still written.
            while not rec.queue.empty() and self._write(rec, rec.queue.get_nowait()):
                pass
            raise
        finally:
            if rec.ended is None and rec.stop_reason is None:
                rec.stop_reason = reason
        self._finish(rec, reason)

    def _write(self, rec: Recording, item: tuple[Exchange, float, int]) -> bool:
        """Encode one exchange into the recording; False when it would pass max_bytes."""
        ex, ts, size = item
        rec.queued_bytes -= size
        try:
            data = line(ts=ts, route=ex.route, backend=ex.backend, request_id=ex.request_id,
                        method=ex.method, target=ex.target,
                        request_headers=ex.request_headers, request_body=ex.request_body,
                        status=ex.status, response_headers=ex.response_headers,
                        response_body=ex.response_body, latency=ex.latency,
                        redaction=rec.redaction)
        except Exception:  # a bug must not end the recording silently: count the exchange
            log.exception("recording %s could not encode an exchange", rec.id)
            rec.dropped += 1
            rec.accepted -= 1  # not captured: max_requests counts captured exchanges
            return True
        if rec.bytes + len(data) > rec.spec.max_bytes:
            rec.stop_reason = "max_bytes"
            rec.dropped += 1
            return False
        rec.write(data)
        self._captured[rec.route] = self._captured.get(rec.route, 0) + 1
        return True

    # -- reading -------------------------------------------------------------------------------
    def view(self, rec: Recording) -> dict[str, Any]:
        return rec.view(self._member)

    # -- Prometheus ----------------------------------------------------------------------------
    def _collect(self) -> Iterable[Metric]:
        exchanges = CounterMetricFamily(
            "modelgate_recording_exchanges", "Exchanges of recordings: captured, or dropped "
            "(queue full, over max_bytes, or still queued when the recording ended).",
            labels=["route", "result"])
        running = GaugeMetricFamily("modelgate_recordings_running",
                                    "Recordings running on this process.")
        routes = set(self._captured) | set(self._dropped) | set(self._running)
        for route in sorted(routes):
            live = self._running.get(route)
            exchanges.add_metric([route, "captured"], self._captured.get(route, 0))
            exchanges.add_metric([route, "dropped"], self._dropped.get(route, 0)
                                 + (live.dropped if live is not None else 0))
        running.add_metric([], len(self._running))
        return [exchanges, running]
