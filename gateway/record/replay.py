"""Replay a recording against a candidate and compare, exactly as shadow mode does.

Each captured request is sent to the candidate (a base URL) with its recorded method, target,
headers and body; the recorded live response and the candidate's answer go through the shadow
comparison (`gateway.shadow.compare.judge`) into one `Tally` (`gateway.shadow.stats`), so the
report has the same figures as ``modelgate shadow-report``: outcomes, agreement, confusion
counts, numeric deltas, latency of live (as recorded: the gateway's total) and candidate.

Sending is bounded: at most `concurrency` requests in flight, and with `rate` at most that many
started per second (request i starts no earlier than i / rate seconds after the first).
Headers that were redacted when recording are not sent, nor hop-by-hop ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.record.format import REDACTED, Captured
from gateway.shadow.compare import Comparator, judge
from gateway.shadow.stats import Tally

REPLAY_HEADER = "X-Modelgate-Replay"
# Not sent again: hop-by-hop, framing (httpx frames the body itself) and the host.
_SKIP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                   "transfer-encoding", "upgrade", "content-length", "host", "expect",
                   REPLAY_HEADER.lower()})

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True, slots=True)
class Answer:
    """The candidate's answer to one replayed request (or why there is none)."""

    status: int | None
    body: bytes | None
    content_type: str | None
    latency: float
    error: str | None  # "timeout" or another failure kind


def request_headers(captured: Captured) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in captured.request_headers
               if k.lower() not in _SKIP and v != REDACTED]
    headers.append((REPLAY_HEADER, "1"))
    return headers


async def send(client: httpx.AsyncClient, base_url: str, captured: Captured) -> Answer:
    started = time.perf_counter()
    try:
        resp = await client.request(captured.method, base_url.rstrip("/") + captured.target,
                                    headers=request_headers(captured),
                                    content=captured.request_body)
    except httpx.TimeoutException:
        return Answer(None, None, None, time.perf_counter() - started, "timeout")
    except httpx.HTTPError as exc:
        return Answer(None, None, None, time.perf_counter() - started,
                      type(exc).__name__.lower())
    except (ValueError, TypeError) as exc:
        # A request httpx cannot even build (a header value outside latin-1 raises
        # UnicodeEncodeError, a bad target InvalidURL): that exchange scores as an error,
        # the rest of the replay goes on. (CancelledError is no Exception: it still ends it.)
        return Answer(None, None, None, time.perf_counter() - started,
                      f"unsendable: {type(exc).__name__.lower()}")
    return Answer(resp.status_code, resp.content, resp.headers.get("content-type"),
                  time.perf_counter() - started, None)


async def score(tally: Tally, comparator: Comparator, captured: Captured,
                answer: Answer) -> None:
    """Judge one (recorded live, candidate) pair into `tally`, as a shadow sender would."""
    outcome, comparison, _, _ = await judge(
        comparator, captured.status, captured.response_body, captured.header("content-type"),
        answer.status, answer.body, answer.content_type, answer.error)
    answered = answer.error is None
    tally.add(outcome, captured.latency_ms / 1000 if answered else None,
              answer.latency if answered else None, comparison)


async def replay(exchanges: Sequence[Captured], base_url: str, comparator: Comparator, *,
                 concurrency: int = 8, rate: float | None = None, timeout: float = 30.0,
                 progress: Progress | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> Tally:
    """Send every exchange's request to `base_url` and tally the comparisons."""
    tally = Tally()
    total = len(exchanges)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    next_index = 0
    done = 0
    started = time.monotonic()

    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport,
                                 follow_redirects=False) as client:
        async def worker() -> None:
            nonlocal next_index, done
            while next_index < total:
                i = next_index
                next_index += 1
                if rate:
                    wait = started + i / rate - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)  # pacing to the requested rate
                answer = await send(client, base_url, exchanges[i])
                await score(tally, comparator, exchanges[i], answer)
                done += 1
                if progress is not None:
                    progress(done, total)

        workers = [asyncio.create_task(worker()) for _ in range(max(1, min(concurrency,
                                                                         total)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    return tally


def report(tally: Tally, comparator: Comparator, *, source: str, routes: list[str],
           live: list[str], candidate: str, elapsed: float, concurrency: int,
           rate: float | None, timeout: float, requests: int) -> dict[str, Any]:
    """The replay report: the shadow report's shape (``total`` is the same summary), with
    ``window`` null and a ``replay`` section."""
    with_text = comparator.config.text.mode == "similarity"
    return {
        "route": ",".join(routes) or "-",
        "live": ",".join(live) or "-",
        "shadow": None,
        "backend": candidate,
        "timeout": timeout,
        "compare": comparator.config.describe(),
        "queue": None,
        "log": None,
        "window": None,
        "total": {"since": time.time() - elapsed, **tally.summary(with_text)},
        "replay": {"file": source, "requests": requests, "elapsed_s": round(elapsed, 3),
                   "concurrency": concurrency, "rate": rate},
    }
