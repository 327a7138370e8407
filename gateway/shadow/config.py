"""The ``shadow`` section of a route: what to mirror, how to compare, where to log.

Everything here is validated and compiled once when the config loads (JSON paths included),
so the senders do no per-copy setup. A section without ``backend`` is valid: it configures the
comparison and the log for a shadow that an operator turns on at run time
(``PUT /admin/routes/{route}/shadow`` or ``modelgate shadow ROUTE --backend B``).

    shadow:
      backend: green            # optional: mirror from start-up
      sample: 100               # percent of requests, sticky by the route's user key
      timeout: 5s               # the copies' read timeout
      window: 5m                # the report's sliding window (1s .. 1h)
      queue: 1000               # copies waiting for a sender; more are dropped and counted
      queue_bytes: 64MiB        # ... and at most this many body bytes waiting
      senders: 16               # copies in flight at once
      compare:
        preset: kserve_v2       # auto (default), kserve_v2, tf_serving, openai_chat,
                                # or path: "outputs[0].data" (a JSON path; "$": whole body)
        strings: auto           # label (exact, confusion counts), text (exact/similarity),
                                # auto: text for chat replies, else label
        agree_on: auto          # labels decide if there are any, else all (or: all, labels)
        numbers: {abs_tol: 1e-6, rel_tol: 0}
        text: {mode: exact, min_similarity: 0.9}
      log:
        path: .state/shadow.jsonl
        max_bytes: 10MiB
        backups: 3
        redact_bodies: false
        body_limit: 64KiB
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator
from pydantic import model_validator as model_check
from pydantic.dataclasses import dataclass

from gateway.errors import ConfigError
from gateway.jsonpath import JsonPath, compile_path
from gateway.schema import (
    MODEL,
    Flag,
    Text,
    duration,
    integer,
    known_backend,
    number,
    problem,
    size,
    typed,
    validate,
)

PRESETS: dict[str, str] = {
    "kserve_v2": "outputs[*].data",
    "tf_serving": "predictions",
    "openai_chat": "choices[0].message.content",
}
AUTO = "auto"  # pick the preset by the body's top-level key: outputs / predictions / choices
MAX_WINDOW = 3600.0


def _json_path(value: Any) -> JsonPath:
    if isinstance(value, JsonPath):
        return value
    try:
        return compile_path(value)
    except ConfigError as exc:
        raise problem(exc.problem) from None


# A JSON path in the document (``outputs[0].data``; ``$``: the whole body), compiled at load.
JsonPathText = Annotated[JsonPath, typed(_json_path, {"type": "string", "minLength": 1},
                                         env=False)]


@dataclass(frozen=True, slots=True, config=MODEL)
class NumberTolerance:
    """Two numbers agree when ``|a - b| <= max(abs_tol, rel_tol * max(|a|, |b|))``."""

    abs_tol: Annotated[float, number(0, 1e300)] = 1e-6
    rel_tol: Annotated[float, number(0, 1)] = 0.0


@dataclass(frozen=True, slots=True, config=MODEL)
class TextCompare:
    """``exact``: identical strings; ``similarity``: normalized difflib ratio >= threshold."""

    mode: Literal["exact", "similarity"] = "exact"
    min_similarity: Annotated[float, number(0, 1)] = 0.9


@dataclass(frozen=True, slots=True, config=MODEL)
class CompareConfig:
    """`preset` None means `path` was given; `auto` detects the preset per response and
    compares strings as text only for chat replies (unless `strings` says otherwise)."""

    preset: Literal["auto", "kserve_v2", "tf_serving", "openai_chat"] | None = "auto"
    path: JsonPathText | None = None
    strings: Literal["label", "text", "auto"] = "auto"
    agree_on: Literal["auto", "all", "labels"] = "auto"
    numbers: NumberTolerance = Field(default_factory=NumberTolerance)
    text: TextCompare = Field(default_factory=TextCompare)

    @model_check(mode="before")
    @classmethod
    def _preset_or_path(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("preset") is not None and data.get("path") is not None:
            raise problem("give either 'preset' or 'path', not both")
        preset = None if data.get("path") is not None else data.get("preset", AUTO)
        default_strings = {None: "label", AUTO: "auto", "openai_chat": "text"}.get(preset,
                                                                                   "label")
        return {"strings": default_strings, **data}

    @model_check(mode="after")
    def _compile_preset(self) -> CompareConfig:
        if self.path is not None and self.preset == AUTO:
            object.__setattr__(self, "preset", None)
        elif self.path is None and self.preset not in (None, AUTO):
            object.__setattr__(self, "path", compile_path(PRESETS[str(self.preset)]))
        return self

    def describe(self) -> dict[str, object]:
        return {
            "preset": self.preset,
            "path": self.path.text if self.path is not None else None,
            "strings": self.strings,
            "agree_on": self.agree_on,
            "numbers": {"abs_tol": self.numbers.abs_tol, "rel_tol": self.numbers.rel_tol},
            "text": {"mode": self.text.mode, "min_similarity": self.text.min_similarity},
        }


@dataclass(frozen=True, slots=True, config=MODEL)
class LogConfig:
    path: Text
    max_bytes: Annotated[int, size(1024, "1KiB")] = 10 * 1024 * 1024
    backups: Annotated[int, integer(0, 100)] = 3
    redact_bodies: Flag = False
    body_limit: Annotated[int, size()] = 64 * 1024


@dataclass(frozen=True, slots=True, config=MODEL)
class ShadowConfig:
    backend: Text | None = None
    sample: Annotated[float, number(0, 100)] = 0.0  # percent; 100 when `backend` is given
    timeout: Annotated[float, duration(positive=True)] = 5.0
    window: Annotated[float, duration(1, MAX_WINDOW)] = 300.0
    queue: Annotated[int, integer(1, 1_000_000)] = 1000
    queue_bytes: Annotated[int, size(1)] = 64 * 1024 * 1024
    senders: Annotated[int, integer(1, 1024)] = 16
    compare: CompareConfig = Field(default_factory=CompareConfig)
    log: LogConfig | None = None

    @model_check(mode="before")
    @classmethod
    def _sample_follows_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") and data.get("sample") is None:
            return {**data, "sample": 100.0}
        return data

    @field_validator("backend", mode="after")
    @classmethod
    def _known_backend(cls, backend: str | None, info: ValidationInfo) -> str | None:
        return known_backend(backend, info)


SHADOW = TypeAdapter(ShadowConfig)
COMPARE = TypeAdapter(CompareConfig)


def parse_shadow(data: Any, backends: set[str], path: str = "") -> ShadowConfig:
    return validate(SHADOW, data, path, context={"backends": backends})


def parse_compare(data: Any, path: str = "") -> CompareConfig:
    return validate(COMPARE, data, path)
