"""Webhook notifications: every audit event POSTed as JSON to the configured URLs.

`Notifier.offer()` is what `ControlPlane.on_event` calls: it only puts the event on a bounded
queue per URL and returns, so a slow or hanging receiver never delays the controller or an
admin call. One sender task per URL (a hanging receiver does not hold up the others) posts
with a timeout and a few retries with exponential backoff; a full queue drops the event and
counts it. The body is the event (`Event.to_json()`) plus ``kind`` (``rollout``, ``alarm``,
``routing``, ...) and ``source: "modelgate"``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.state import Event

log = logging.getLogger("modelgate.notify")

DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5
DEFAULT_QUEUE_SIZE = 1000
ROUTING_ACTIONS = frozenset({"canary", "switch", "rollback", "shadow", "shadow_off"})


def event_kind(action: str) -> str:
    """What a receiver filters on: ``rollout`` for rollout_*, ``alarm`` for alarm_*..."""
    if action in ROUTING_ACTIONS:
        return "routing"
    return action.split("_", 1)[0]


def payload(event: Event) -> bytes:
    body = event.to_json()
    body["kind"] = event_kind(event.action)
    body["source"] = "modelgate"
    return orjson.dumps(body)


@dataclass(slots=True)
class Counts:
    sent: int = 0
    failed: int = 0  # gave up after the retries
    dropped: int = 0  # queue full
    retries: int = 0


@dataclass(slots=True)
class _Target:
    url: str
    queue: asyncio.Queue[bytes]
    label: str = ""  # what logs and /metrics show: webhook URLs often carry a secret
    counts: Counts = field(default_factory=Counts)
    task: asyncio.Task[None] | None = None


def redacted(url: str, index: int) -> str:
    """``https://hooks.example.com/…#2``: scheme and host only, never path, query or login."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}/…#{index}"


class Notifier:
    """Posts events to webhook URLs without ever blocking whoever produced the event."""

    def __init__(
        self,
        urls: Iterable[str],
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        *,
        backoff: float = DEFAULT_BACKOFF,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._targets = [_Target(url, asyncio.Queue(maxsize=queue_size), redacted(url, i))
                         for i, url in enumerate(urls, start=1)]
        self._session: aiohttp.ClientSession | None = None
        self._open = False

    def counts(self) -> dict[str, Counts]:
        return {t.url: t.counts for t in self._targets}

    def offer(self, event: Event) -> None:
        """Queue `event` for every URL; never waits (an `on_event` listener)."""
        if not self._open:
            return
        body = payload(event)
        for target in self._targets:
            try:
                target.queue.put_nowait(body)
            except asyncio.QueueFull:
                target.counts.dropped += 1
                if target.counts.dropped in (1, 10, 100) or target.counts.dropped % 1000 == 0:
                    log.warning("webhook %s is behind: %d events dropped", target.label,
                                target.counts.dropped)

    async def start(self) -> None:
        if not self._targets or self._open:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"Content-Type": "application/json", "User-Agent": "modelgate-webhook"},
        )
        for target in self._targets:
            target.task = asyncio.create_task(self._send_loop(target),
                                              name=f"webhook {target.label}")
        self._open = True

    async def stop(self) -> None:
        """Stop at once: events still queued are dropped (counted), in-flight posts cancelled."""
        self._open = False
        tasks = [t.task for t in self._targets if t.task is not None]
        for task in tasks:
            task.cancel()
        for target in self._targets:
            target.task = None
        await asyncio.gather(*tasks, return_exceptions=True)
        for target in self._targets:
            target.counts.dropped += target.queue.qsize()
            while not target.queue.empty():
                target.queue.get_nowait()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send_loop(self, target: _Target) -> None:
        while True:
            body = await target.queue.get()
            try:
                await self._deliver(target, body)
            except Exception:  # a bug or odd URL must not end deliveries for good
                target.counts.failed += 1
                log.exception("webhook %s: delivery crashed", target.label)

    async def _deliver(self, target: _Target, body: bytes) -> None:
        assert self._session is not None
        delay = self.backoff
        for attempt in range(self.retries + 1):
            if attempt:
                target.counts.retries += 1
                await asyncio.sleep(delay)
                delay *= 2
            try:
                async with self._session.post(target.url, data=body) as resp:
                    await resp.read()
                    if resp.status < 300:
                        target.counts.sent += 1
                        return
                    problem = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        break  # the receiver refuses this event: retrying will not help
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # The class only: aiohttp's messages can quote the URL, and with it its secret.
                problem = type(exc).__name__
        target.counts.failed += 1
        log.warning("webhook %s failed after %d attempts: %s", target.label, attempt + 1,
                    problem)

    def collect(self) -> Iterator[Metric]:
        """Prometheus families (registered by the component that owns the notifier)."""
        total = CounterMetricFamily("modelgate_webhook_events",
                                    "Webhook deliveries by URL and result.",
                                    labels=["url", "result"])
        queued = GaugeMetricFamily("modelgate_webhook_queue_depth",
                                   "Events waiting to be posted, by URL.", labels=["url"])
        for target in self._targets:
            c = target.counts
            for result, n in (("sent", c.sent), ("failed", c.failed), ("dropped", c.dropped),
                              ("retried", c.retries)):
                total.add_metric([target.label, result], n)
            queued.add_metric([target.label], target.queue.qsize())
        yield total
        yield queued
