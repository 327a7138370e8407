"""Streamed answers (chunked, server-sent events: LLM token streams) measured as they pass.

The proxy writes every chunk of a streamed answer to the client first and only then hands it
to a `StreamMeter`, which never holds a chunk back: it notes the time the chunk arrived and,
for ``text/event-stream``, finds where events end. Per exchange it measures

- time to first byte (TTFB): from the request sent to the first body chunk;
- time to first event (TTFT): to the first complete event with data (SSE dispatches
  nothing else), counted when that event arrives, not when the stream ends;
- the events, the gaps between consecutive events and the first-to-last-event span
  (events per second = gaps / span);
- token counts from an event carrying OpenAI-style ``usage`` (only an event containing
  ``"usage"`` is JSON-parsed).

At the end of the stream the other numbers go to the backend's `StreamStats` (cumulative:
Prometheus) and into its one-second slots as named counters (`COUNTERS`, ``ttft:<bucket>``):
windows, the rollout gates, the dashboard and the cluster sums (gateway.cluster.metrics
publishes slot counters as they are) read them with the code they already have, and the TTFT
histogram merges exactly across processes because its buckets are the fixed latency buckets.

A leaf module: it imports nothing of the gateway but the histogram buckets.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import orjson
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from gateway.histogram import FINE_BOUNDS, N_BUCKETS, prom_buckets, quantile

# Slot counter names (BackendStats.add_many): stable, the cluster publishes them by name.
STREAMS = "stream:n"  # streamed answers whose body began
EVENTS = "stream:events"  # SSE events (not comments)
SPAN = "stream:span"  # seconds from first to last event, summed over streams
PROMPT_TOKENS = "stream:prompt_tokens"
COMPLETION_TOKENS = "stream:completion_tokens"
TTFT_PREFIX = "ttft:"
TTFT_KEYS = tuple(f"{TTFT_PREFIX}{i}" for i in range(N_BUCKETS))
_TTFT_INDEX = {key: i for i, key in enumerate(TTFT_KEYS)}

# An event longer than this is counted but not parsed for `usage` (it is never buffered for
# the client either way: only the meter's view of it is bounded).
MAX_EVENT = 64 * 1024
_USAGE = b'"usage"'
_EVENT_STREAM = b"text/event-stream"


class StreamStats:
    """One backend's streamed answers in this process, cumulative (Prometheus)."""

    __slots__ = ("streams", "ttfb_hist", "ttfb_sum", "ttft_hist", "ttft_sum", "gap_hist",
                 "gap_sum", "events", "prompt_tokens", "completion_tokens")

    def __init__(self) -> None:
        self.streams = 0
        self.ttfb_hist = [0] * N_BUCKETS
        self.ttfb_sum = 0.0
        self.ttft_hist = [0] * N_BUCKETS
        self.ttft_sum = 0.0
        self.gap_hist = [0] * N_BUCKETS
        self.gap_sum = 0.0
        self.events = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0


class CounterSink(Protocol):
    """Where a finished stream's window numbers go: `BackendStats.add_many`."""

    def add_many(self, items: Iterable[tuple[str, float]]) -> None: ...


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the response's Content-Type is ``text/event-stream`` (parameters ignored)."""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == _EVENT_STREAM
    return False


def _is_event(block: bytes) -> bool:
    """Whether a blank-line-terminated block (LF line ends) is dispatched as an event: per
    the SSE spec only a block with a ``data`` field is (``data:…`` or a bare ``data`` line);
    one of only ``retry:``, ``event:``, ``id:`` or comments sets state and dispatches
    nothing, so it is no first token."""
    if block.startswith(b"data") and block[4:5] in (b":", b"\n", b""):
        return True
    return b"\ndata:" in block or block.endswith(b"\ndata") or b"\ndata\n" in block


def usage_of(event: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of an event whose data is a JSON object with an
    OpenAI-style ``usage``; None if it has none (or is not JSON)."""
    data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n")
                      if line.startswith(b"data:"))
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if not (type(prompt) is int and type(completion) is int and prompt >= 0
            and completion >= 0):
        return None
    return prompt, completion


class SseScanner:
    """Finds the ends of server-sent events in a byte stream cut anywhere (CR, LF or CRLF line
    ends, comments, events split over chunks). Keeps only the unfinished event, bounded by
    `MAX_EVENT`. `feed` returns the complete events a chunk finished (LF line ends)."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk if self._pending else chunk
        carry_cr = data[-1:] == b"\r"  # maybe half a CRLF: decide with the next chunk
        if carry_cr:
            data = data[:-1]
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = data.split(b"\n\n")
        rest = blocks.pop()
        if len(rest) > MAX_EVENT:
            # Too long to keep: remember only whether it is an event so far and whether it
            # ends a line; the rest of it is counted, not parsed.
            # (The NUL after "data:" keeps the tail from ever being parsed as JSON.)
            rest = (b"data:\0" if _is_event(rest) else b":") + (b"\n" if rest[-1:] == b"\n"
                                                                else b"")
        self._pending = rest + b"\r" if carry_cr else rest
        return [b for b in blocks if b and _is_event(b)]


class StreamMeter:
    """One streamed answer: `chunk(data, arrived)` after each chunk was written to the client,
    `finish()` once (whatever way the stream ended). Inter-event gaps are counted as they
    come; everything else when the stream ends."""

    __slots__ = ("stats", "counters", "sent", "scanner", "first_byte", "first_event",
                 "last_event", "events", "usage")

    def __init__(self, stats: StreamStats, counters: CounterSink, sent: float,
                 sse: bool) -> None:
        self.stats = stats
        self.counters = counters
        self.sent = sent
        self.scanner = SseScanner() if sse else None
        self.first_byte: float | None = None
        self.first_event: float | None = None
        self.last_event = 0.0
        self.events = 0
        self.usage: tuple[int, int] | None = None

    def chunk(self, data: bytes, arrived: float) -> None:
        if self.first_byte is None:
            self.first_byte = arrived
        scanner = self.scanner
        if scanner is None or not data:
            return
        events = scanner.feed(data)
        if not events:
            return
        # Gaps go straight into the histogram: a long stream costs no memory.
        stats = self.stats
        gap_hist = stats.gap_hist
        if self.first_event is None:
            self.first_event = arrived
            # TTFT goes into the window of its first event, not of the stream's end: a long
            # answer or a hanging stream must not delay (or hide from) the TTFT gates.
            ttft = arrived - self.sent
            i = bisect.bisect_left(FINE_BOUNDS, ttft)
            stats.ttft_hist[i] += 1
            stats.ttft_sum += ttft
            self.counters.add_many(((TTFT_KEYS[i], 1.0),))
        else:
            gap = arrived - self.last_event
            gap_hist[bisect.bisect_left(FINE_BOUNDS, gap)] += 1
            stats.gap_sum += gap
        if len(events) > 1:  # several events in one chunk arrived together: gaps of 0
            gap_hist[0] += len(events) - 1
        self.last_event = arrived
        self.events += len(events)
        for event in events:
            if _USAGE in event:
                found = usage_of(event)
                if found is not None:
                    self.usage = found

    def finish(self) -> None:
        """Record this stream (nothing if its body never began)."""
        if self.first_byte is None:
            return
        stats = self.stats
        ttfb = self.first_byte - self.sent
        stats.streams += 1
        stats.ttfb_hist[bisect.bisect_left(FINE_BOUNDS, ttfb)] += 1
        stats.ttfb_sum += ttfb
        items: list[tuple[str, float]] = [(STREAMS, 1.0)]
        if self.first_event is not None:  # its TTFT was counted at the first event
            stats.events += self.events
            items += ((EVENTS, float(self.events)), (SPAN, self.last_event - self.first_event))
        if self.usage is not None:
            prompt, completion = self.usage
            stats.prompt_tokens += prompt
            stats.completion_tokens += completion
            items += ((PROMPT_TOKENS, float(prompt)), (COMPLETION_TOKENS, float(completion)))
        self.counters.add_many(items)


# -- reading windows (gates, dashboard) ----------------------------------------------------------
def ttft_hist(counters: Mapping[str, float]) -> list[int]:
    """The TTFT histogram of a window, from its slot counters."""
    hist = [0] * N_BUCKETS
    index = _TTFT_INDEX
    for name, value in counters.items():
        i = index.get(name)
        if i is not None:
            hist[i] += int(value)
    return hist


def stream_summary(counters: Mapping[str, float], seconds: float) -> dict[str, float | int | None]:
    """A window's streamed-answer figures (dashboard): TTFT p50/p99 in ms, streams, events,
    events/s within a stream, tokens."""
    hist = ttft_hist(counters)
    with_events = sum(hist)
    events = counters.get(EVENTS, 0.0)
    span = counters.get(SPAN, 0.0)
    p50 = quantile(hist, 0.5)
    p99 = quantile(hist, 0.99)
    return {
        "streams": int(counters.get(STREAMS, 0.0)),
        "ttft_p50_ms": None if p50 is None else round(p50 * 1000, 3),
        "ttft_p99_ms": None if p99 is None else round(p99 * 1000, 3),
        "events": int(events),
        "events_per_s": (round((events - with_events) / span, 3) if span > 0 else None),
        "completion_tokens": int(counters.get(COMPLETION_TOKENS, 0.0)),
        "tokens_per_s": (round(counters.get(COMPLETION_TOKENS, 0.0) / seconds, 3)
                         if seconds > 0 else None),
    }


# -- Prometheus ----------------------------------------------------------------------------------
class HasStream(Protocol):
    @property
    def route(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def stream(self) -> StreamStats: ...


def families(all_stats: Iterable[HasStream]) -> Iterator[Metric]:
    """The streamed-answer families, per route and backend (only backends that streamed)."""
    ttfb = HistogramMetricFamily(
        "modelgate_stream_ttfb_seconds",
        "Streamed answers: time from sending the request to the first body byte.",
        labels=["route", "backend"])
    ttft = HistogramMetricFamily(
        "modelgate_stream_ttft_seconds",
        "Server-sent-event answers: time from sending the request to the first event.",
        labels=["route", "backend"])
    gap = HistogramMetricFamily(
        "modelgate_stream_inter_event_seconds",
        "Server-sent-event answers: time between consecutive events.",
        labels=["route", "backend"])
    events = CounterMetricFamily(
        "modelgate_stream_events", "Server-sent events relayed (comments not counted).",
        labels=["route", "backend"])
    tokens = CounterMetricFamily(
        "modelgate_stream_tokens",
        "Tokens reported by streamed answers' OpenAI-style usage, by kind.",
        labels=["route", "backend", "kind"])
    for stats in all_stats:
        s = stats.stream
        if not s.streams and not any(s.ttft_hist):  # (a first stream may not have ended)
            continue
        labels = [stats.route, stats.backend]
        ttfb.add_metric(labels, prom_buckets(s.ttfb_hist), s.ttfb_sum)
        if any(s.ttft_hist):
            ttft.add_metric(labels, prom_buckets(s.ttft_hist), s.ttft_sum)
            gap.add_metric(labels, prom_buckets(s.gap_hist), s.gap_sum)
            events.add_metric(labels, s.events)
        if s.prompt_tokens or s.completion_tokens:
            tokens.add_metric([*labels, "prompt"], s.prompt_tokens)
            tokens.add_metric([*labels, "completion"], s.completion_tokens)
    yield from (ttfb, ttft, gap, events, tokens)
