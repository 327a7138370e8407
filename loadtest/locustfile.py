"""Locust scenarios for operators: realistic traffic through modelgate, watched in Locust's UI.

    modelgate demo          # gateway on 127.0.0.1:8000, blue (v1) and green (v2) behind it
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 1m

Three kinds of user (pick some by naming them: ``locust -f ... ClassifierUser BatchUser``):

- `ClassifierUser`: one iris-like row per request to the KServe V2 infer endpoint, a stable
  ``x-user-id`` per simulated user from a pool (so the sticky canary split sees real users),
  and now and then a row with missing (null) features, like a lax client.
- `BatchUser`: fewer, heavier requests of 16-64 rows.
- `ChatUser`: an OpenAI-style ``/v1/chat/completions`` call with ``"stream": true``; the
  server-sent events are read as they arrive and timed to the first token and to the end.
  The demo config has no route for that path: against it, chat users notice the gateway's 404
  once, say so, and stop; point ``--host`` at a model server, or add a route (README).

A 200 whose prediction is null (``outputs[0].data: null``, the model servers' ``null_rate``
fault) counts as a failure, so a misbehaving version shows in Locust's failures table.

Knobs (environment): MODELGATE_INFER_PATH, MODELGATE_CHAT_PATH, MODELGATE_USERS (pool size,
default 1000), MODELGATE_NULL_FEATURE_RATE (default 0.02), MODELGATE_STREAM_DELAY_MS (the demo
model's delay between streamed tokens, default 5).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any

from locust import HttpUser, between, task
from locust.exception import StopUser

INFER_PATH = os.environ.get("MODELGATE_INFER_PATH", "/v2/models/classifier/infer")
CHAT_PATH = os.environ.get("MODELGATE_CHAT_PATH", "/v1/chat/completions")
USER_POOL = max(1, int(os.environ.get("MODELGATE_USERS", "1000")))
NULL_FEATURE_RATE = float(os.environ.get("MODELGATE_NULL_FEATURE_RATE", "0.02"))
STREAM_DELAY_MS = float(os.environ.get("MODELGATE_STREAM_DELAY_MS", "5"))

# Per-species feature means and spreads (sepal length/width, petal length/width, cm), close to
# the iris data set, so requests land in all three classes and near their borders.
SPECIES = (
    ((5.01, 3.43, 1.46, 0.25), (0.35, 0.38, 0.17, 0.11)),
    ((5.94, 2.77, 4.26, 1.33), (0.52, 0.31, 0.47, 0.20)),
    ((6.59, 2.97, 5.55, 2.03), (0.64, 0.32, 0.55, 0.27)),
)
PROMPTS = (
    "Summarise the canary results for the classifier",
    "Is the green model better than the blue one",
    "Explain shadow traffic in one sentence",
    "What does a sticky split guarantee",
)

log = logging.getLogger("modelgate.locust")
_warned: set[str] = set()


def iris_row(rng: random.Random, null_rate: float = NULL_FEATURE_RATE) -> list[float | None]:
    """One plausible flower; with probability `null_rate` one feature is missing (null)."""
    means, spreads = rng.choice(SPECIES)
    row: list[float | None] = [
        round(max(0.1, rng.gauss(m, s)), 1) for m, s in zip(means, spreads, strict=True)
    ]
    if rng.random() < null_rate:
        row[rng.randrange(len(row))] = None
    return row


def infer_body(rows: list[list[float | None]]) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [len(rows), 4], "datatype": "FP32",
                        "data": rows}]}


def check_prediction(payload: Any, n_rows: int) -> str | None:
    """Why a V2 infer answer is not a usable prediction, or None when it is."""
    try:
        outputs = payload["outputs"]
        data = outputs[0]["data"]
    except (KeyError, IndexError, TypeError):
        return "no outputs[0].data in the answer"
    if data is None:
        return "null output: outputs[0].data is null"
    if not isinstance(data, list) or len(data) != n_rows:
        return f"expected {n_rows} predictions, got {data!r:.80}"
    return None


class _ModelgateUser(HttpUser):
    abstract = True

    def on_start(self) -> None:
        # One identity per simulated user for its whole life: sticky routing keeps it on one
        # backend, as a real user would be.
        self.rng = random.Random()
        self.user_id = f"user-{self.rng.randrange(USER_POOL)}"

    def infer(self, rows: list[list[float | None]], name: str) -> None:
        with self.client.post(INFER_PATH, json=infer_body(rows), name=name,
                              headers={"x-user-id": self.user_id},
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:120]}")
                return
            try:
                payload = resp.json()
            except ValueError:
                resp.failure("answer is not JSON")
                return
            problem = check_prediction(payload, len(rows))
            if problem is not None:
                resp.failure(problem)


class ClassifierUser(_ModelgateUser):
    """Interactive traffic: one row at a time, a short think time between requests."""

    weight = 8
    wait_time = between(0.05, 0.5)

    @task
    def classify(self) -> None:
        self.infer([iris_row(self.rng)], "infer (1 row)")


class BatchUser(_ModelgateUser):
    """Batch scoring: fewer, heavier requests."""

    weight = 2
    wait_time = between(0.5, 2.0)

    @task
    def classify_batch(self) -> None:
        rows = [iris_row(self.rng) for _ in range(self.rng.randint(16, 64))]
        self.infer(rows, "infer (batch)")


class ChatUser(_ModelgateUser):
    """A streaming chat client: reads server-sent events as they arrive."""

    weight = 1
    wait_time = between(1.0, 3.0)

    def on_start(self) -> None:
        super().on_start()
        # The demo routes only the classifier; say so once instead of failing every request.
        with self.client.post(CHAT_PATH, json=self._body(stream=False), name="chat (probe)",
                              headers={"x-user-id": self.user_id}, catch_response=True) as resp:
            missing = resp.status_code == 404
            if missing:
                resp.success()  # a finding about the set-up, reported below, not a failure
            elif resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
        self.no_route = missing
        if missing and (self.host or "") not in _warned:
            _warned.add(self.host or "")
            log.warning("no route for %s at %s: chat users stop (see loadtest/README.md)",
                        CHAT_PATH, self.host)

    def _body(self, stream: bool) -> dict[str, Any]:
        return {
            "model": "chat",
            "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
            "stream": stream,
            "stream_delay_ms": STREAM_DELAY_MS,
        }

    @task
    def chat_stream(self) -> None:
        if self.no_route:
            raise StopUser  # from a task, Locust stops the user quietly
        started = time.perf_counter()
        first: float | None = None
        events = 0
        size = 0
        done = False
        error: str | None = None
        with self.client.post(CHAT_PATH, json=self._body(stream=True), name="chat (stream)",
                              headers={"x-user-id": self.user_id, "Accept": "text/event-stream"},
                              stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                resp.failure(f"not an event stream: {resp.headers.get('Content-Type')}")
                return
            buffer = b""
            try:
                # chunk_size=None: yield bytes as they arrive, not in fixed-size blocks.
                for chunk in resp.iter_content(chunk_size=None):
                    size += len(chunk)
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        data = event.removeprefix(b"data: ").strip()
                        if data == b"[DONE]":
                            done = True
                            continue
                        if first is None:
                            first = time.perf_counter()
                        events += 1
                        json.loads(data)
            except (ValueError, OSError) as exc:  # bad JSON event, connection cut mid-stream
                error = f"stream broke after {events} events: {exc}"
            if error is None and not done:
                error = f"stream ended after {events} events without [DONE]"
            if error is not None:
                resp.failure(error)
            else:
                resp.success()
        fire = self.environment.events.request.fire
        end = time.perf_counter()
        if first is not None:
            fire(request_type="SSE", name="chat: first token",
                 response_time=(first - started) * 1000, response_length=0,
                 exception=None, context={})
        fire(request_type="SSE", name="chat: whole stream",
             response_time=(end - started) * 1000, response_length=size,
             exception=None if error is None else RuntimeError(error), context={})
