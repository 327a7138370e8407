"""Prediction-level comparison of a live and a shadow response.

`Comparator` is built once per route config. `extract()` pulls the prediction out of a response
body with the compiled JSON path (an OpenAI SSE stream is first folded back into one message;
the ``auto`` preset picks kserve_v2 / tf_serving / openai_chat by the body's top-level key
``outputs`` / ``predictions`` / ``choices``, else takes the whole body); `compare()` walks both
predictions side by side:

- lists compare element by element, objects key by key (a missing counterpart disagrees);
- **labels** (strings in ``strings: label`` mode, booleans, integers, null) must be equal, and
  each pair is counted in the confusion counts (live label x shadow label), so a batch of 8
  rows gives 8 label pairs;
- **numbers** (a float on either side) agree within ``abs_tol`` / ``rel_tol``; their absolute
  delta is recorded (mean and max in the report);
- **text** (strings in ``strings: text`` mode) is equal, or similar enough: lowercased,
  whitespace collapsed, `difflib.SequenceMatcher` ratio >= ``min_similarity``;
- anything else (a list against a number, a string against null...) is a **mismatch**: it
  disagrees and is counted apart.

A pair agrees when every element that decides agrees (``agree_on: all``: every element;
``agree_on: labels``: labels and mismatches only, numbers and text are still reported;
``agree_on: auto``, the default: like ``labels`` when the pair has labels, else like ``all``,
so a classifier is judged by its labels and a regressor by its numbers).
"""

from __future__ import annotations

import asyncio
import difflib
import math
from typing import Any, NamedTuple

import orjson

from gateway.jsonpath import MISSING, JsonPath, compile_path
from gateway.shadow.config import AUTO, PRESETS, CompareConfig

MAX_LABEL_CHARS = 64
# SequenceMatcher is quadratic: longer texts are compared word by word, and only so far.
MAX_TEXT_CHARS = 2_000
MAX_TEXT_WORDS = 5_000
_DELTA_PATH = compile_path("choices[0].delta.content")
_AUTO_KEYS: tuple[tuple[str, str, JsonPath], ...] = tuple(
    (key, preset, compile_path(PRESETS[preset])) for key, preset in
    (("outputs", "kserve_v2"), ("predictions", "tf_serving"), ("choices", "openai_chat")))
_WHOLE = compile_path("$")


class Comparison:
    """What one live/shadow pair of predictions had in common."""

    __slots__ = (
        "labels", "labels_agree", "confusion", "numbers", "numbers_agree", "delta_sum",
        "delta_max", "texts", "texts_agree", "similarity_sum", "mismatched", "agree_on",
    )

    def __init__(self, agree_on: str = "auto") -> None:
        self.agree_on = agree_on
        self.labels = 0
        self.labels_agree = 0
        self.confusion: list[tuple[str, str]] = []
        self.numbers = 0
        self.numbers_agree = 0
        self.delta_sum = 0.0
        self.delta_max = 0.0
        self.texts = 0
        self.texts_agree = 0
        self.similarity_sum = 0.0
        self.mismatched = 0

    @property
    def by_labels(self) -> bool:
        """Whether only labels decide (``labels``; ``auto`` when the pair has labels)."""
        return self.agree_on == "labels" or (self.agree_on == "auto" and self.labels > 0)

    @property
    def elements(self) -> int:
        """Elements that decide agreement."""
        if self.by_labels:
            return self.labels + self.mismatched
        return self.labels + self.numbers + self.texts + self.mismatched

    @property
    def elements_agree(self) -> int:
        if self.by_labels:
            return self.labels_agree
        return self.labels_agree + self.numbers_agree + self.texts_agree

    @property
    def agree(self) -> bool:
        return self.elements_agree == self.elements

    def __repr__(self) -> str:
        return (f"Comparison(agree={self.agree}, elements={self.elements_agree}/"
                f"{self.elements}, labels={self.labels_agree}/{self.labels}, "
                f"numbers={self.numbers_agree}/{self.numbers}, "
                f"texts={self.texts_agree}/{self.texts}, mismatched={self.mismatched})")


def label_text(value: Any) -> str:
    """How a label shows in the confusion counts (bounded length)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def normalize_text(text: str) -> str:
    return " ".join(text.lower().split())


def similarity(a: str, b: str) -> float:
    """Normalized similarity 0..1 of two texts (1.0: equal after normalizing).

    difflib ratio over the characters of the normalized texts; over their words when either
    is longer than MAX_TEXT_CHARS (the first MAX_TEXT_WORDS), to bound the quadratic cost.
    """
    na, nb = normalize_text(a), normalize_text(b)
    if na == nb:
        return 1.0
    if len(na) <= MAX_TEXT_CHARS and len(nb) <= MAX_TEXT_CHARS:
        return difflib.SequenceMatcher(None, na, nb, autojunk=False).ratio()
    wa, wb = na.split(" ")[:MAX_TEXT_WORDS], nb.split(" ")[:MAX_TEXT_WORDS]
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def _leaves(value: Any) -> int:
    if isinstance(value, list):
        return sum(_leaves(v) for v in value) or 1
    if isinstance(value, dict):
        return sum(_leaves(v) for v in value.values()) or 1
    return 1


def is_event_stream(body: bytes, content_type: str | None) -> bool:
    if content_type is not None and content_type.lower().startswith("text/event-stream"):
        return True
    return body[:5] == b"data:"


def fold_sse(body: bytes) -> Any:
    """The assistant text of an OpenAI chat SSE stream: the `delta.content` of every event,
    joined, wrapped as a non-streamed response so the same path applies. MISSING when no
    event carries content."""
    parts: list[str] = []
    seen = False
    for raw in body.split(b"\n"):
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        content = _DELTA_PATH.get(event)
        if isinstance(content, str):
            parts.append(content)
            seen = True
    if not seen:
        return MISSING
    return {"choices": [{"message": {"content": "".join(parts)}}]}


class Comparator:
    """Extract and compare predictions the way one route's config says."""

    __slots__ = ("config", "path", "auto", "abs_tol", "rel_tol", "text_mode",
                 "min_similarity", "strings", "sse", "slow")

    def __init__(self, config: CompareConfig) -> None:
        self.config = config
        self.auto = config.preset == AUTO
        self.path = config.path if config.path is not None else _WHOLE
        self.abs_tol = config.numbers.abs_tol
        self.rel_tol = config.numbers.rel_tol
        self.text_mode = config.text.mode
        self.min_similarity = config.text.min_similarity
        self.strings = config.strings
        self.sse = config.preset in ("openai_chat", AUTO)
        # Text similarity can take tens of milliseconds: run it off the event loop.
        self.slow = self.strings != "label" and self.text_mode == "similarity"

    def extract(self, body: bytes | None, content_type: str | None = None
                ) -> tuple[Any, str | None]:
        """(the prediction in `body` or MISSING, the preset used). MISSING: no body, not
        JSON, or the path is absent."""
        if not body:
            return MISSING, None
        if self.sse and is_event_stream(body, content_type):
            doc = fold_sse(body)
            if doc is MISSING:
                return MISSING, None
        else:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                return MISSING, None
        if self.auto:
            if isinstance(doc, dict):
                for key, preset, path in _AUTO_KEYS:
                    if key in doc:
                        return path.get(doc), preset
            return doc, None
        return self.path.get(doc), self.config.preset

    def text_strings(self, preset: str | None) -> bool:
        """Whether strings are text (similarity) rather than labels, for this preset."""
        if self.strings == "auto":
            return preset == "openai_chat"
        return self.strings == "text"

    def compare(self, live: Any, shadow: Any, text_strings: bool | None = None) -> Comparison:
        """Compare two predictions; `text_strings` defaults to the configured `strings`."""
        result = Comparison(self.config.agree_on)
        if text_strings is None:
            text_strings = self.strings == "text"
        self._walk(live, shadow, result, text_strings)
        return result

    def _walk(self, a: Any, b: Any, out: Comparison, text: bool) -> None:
        if isinstance(a, list) and isinstance(b, list):
            common = min(len(a), len(b))
            for i in range(common):
                self._walk(a[i], b[i], out, text)
            for extra in a[common:] or b[common:]:
                out.mismatched += _leaves(extra)
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key, value in a.items():
                if key in b:
                    self._walk(value, b[key], out, text)
                else:
                    out.mismatched += _leaves(value)
            for key, value in b.items():
                if key not in a:
                    out.mismatched += _leaves(value)
            return
        self._leaf(a, b, out, text)

    def _leaf(self, a: Any, b: Any, out: Comparison, text: bool) -> None:
        a_float, b_float = type(a) is float, type(b) is float
        if (a_float or b_float) and _is_number(a) and _is_number(b):
            delta = abs(a - b)
            if math.isnan(delta):
                agree = math.isnan(a) and math.isnan(b)
                delta = 0.0 if agree else math.inf
            else:
                agree = delta <= max(self.abs_tol, self.rel_tol * max(abs(a), abs(b)))
            out.numbers += 1
            out.numbers_agree += agree
            if math.isfinite(delta):
                out.delta_sum += delta
                if delta > out.delta_max:
                    out.delta_max = delta
            return
        if text and isinstance(a, str) and isinstance(b, str):
            out.texts += 1
            if self.text_mode == "exact":
                out.texts_agree += a == b
            else:
                ratio = similarity(a, b)
                out.similarity_sum += ratio
                out.texts_agree += ratio >= self.min_similarity
            return
        if _is_label(a, text) and _is_label(b, text):
            out.labels += 1
            out.labels_agree += type(a) is type(b) and a == b
            out.confusion.append((label_text(a), label_text(b)))
            return
        out.mismatched += max(_leaves(a), _leaves(b))


def _is_number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def _is_label(value: Any, strings_are_text: bool) -> bool:
    kind = type(value)
    return value is None or kind is bool or kind is int or (kind is str and not strings_are_text)


class Judgement(NamedTuple):
    """How one live/shadow pair came out: the outcome (one of `stats.OUTCOMES`), the
    comparison (None unless both answered 2xx with a prediction) and both predictions
    (MISSING where there is none)."""

    outcome: str
    comparison: Comparison | None
    live_prediction: Any
    shadow_prediction: Any


async def judge(comparator: Comparator, live_status: int, live_body: bytes | None,
                live_type: str | None, status: int | None, body: bytes | None,
                body_type: str | None, error: str | None) -> Judgement:
    """The outcome of one pair, shadow mode's rules: a shadow that timed out or failed
    (`error`: "timeout" or another kind) is that, then a live non-2xx, then a shadow non-2xx,
    then no prediction on either side (unparsed), else agree/disagree by `compare()`. Shared
    by the shadow senders and `modelgate replay`, so both report the same thing."""
    if error == "timeout":
        return Judgement("shadow_timeout", None, MISSING, MISSING)
    if error is not None:
        return Judgement("shadow_error", None, MISSING, MISSING)
    if not 200 <= live_status < 300:
        return Judgement("live_error", None, MISSING, MISSING)
    if status is None or not 200 <= status < 300:
        return Judgement("shadow_error", None, MISSING, MISSING)
    live_pred, preset = comparator.extract(live_body, live_type)
    shadow_pred, _ = comparator.extract(body, body_type)
    if live_pred is MISSING or shadow_pred is MISSING:
        return Judgement("unparsed", None, live_pred, shadow_pred)
    text = comparator.text_strings(preset)
    if text and comparator.slow:  # similarity can take tens of ms: off the event loop
        comparison = await asyncio.to_thread(comparator.compare, live_pred, shadow_pred, text)
    else:
        comparison = comparator.compare(live_pred, shadow_pred, text)
    return Judgement("agree" if comparison.agree else "disagree", comparison, live_pred,
                     shadow_pred)
