"""A small JSON path, compiled once at config time and applied per request.

Syntax: ``outputs[0].data``, ``$.choices[0].message.content``, ``outputs[*].data``,
``inputs[-1]``, ``meta["odd key"]``. A path with ``[*]`` returns a list of what each
element yields (elements where the rest is absent are skipped). Absent → `MISSING`
(distinct from a JSON null, which is ``None``).
"""

from __future__ import annotations

import re
from typing import Any, Final

from gateway.errors import ConfigError


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final[Any] = _Missing()
WILDCARD: Final = object()
_TOKEN = re.compile(
    r"""\.?(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)|\[(?P<index>-?\d+)\]|\[(?P<star>\*)\]"""
    r"""|\[(?P<quote>["'])(?P<qname>(?:(?!(?P=quote)).)*)(?P=quote)\]"""
)


class JsonPath:
    __slots__ = ("text", "steps", "has_wildcard")

    def __init__(self, text: str, steps: tuple[Any, ...]) -> None:
        self.text = text
        self.steps = steps
        self.has_wildcard = any(s is WILDCARD for s in steps)

    def __repr__(self) -> str:
        return f"JsonPath({self.text!r})"

    def get(self, doc: Any) -> Any:
        return _walk(doc, self.steps, 0)


def _walk(node: Any, steps: tuple[Any, ...], i: int) -> Any:
    n = len(steps)
    while i < n:
        step = steps[i]
        if step is WILDCARD:
            if isinstance(node, list):
                items = node
            elif isinstance(node, dict):
                items = list(node.values())
            else:
                return MISSING
            out = []
            for item in items:
                value = _walk(item, steps, i + 1)
                if value is not MISSING:
                    out.append(value)
            return out
        if isinstance(step, str):
            if not isinstance(node, dict) or step not in node:
                return MISSING
            node = node[step]
        else:
            if not isinstance(node, list) or not -len(node) <= step < len(node):
                return MISSING
            node = node[step]
        i += 1
    return node


def compile_path(text: str, path: str = "") -> JsonPath:
    """Compile `text`; a bad path is a `ConfigError` at `path` (the config key)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(path, f"not a JSON path: {text!r}")
    rest = text.strip()
    if rest == "$":
        return JsonPath(text, ())
    if rest.startswith("$"):
        rest = rest[1:]
    steps: list[Any] = []
    pos = 0
    while pos < len(rest):
        m = _TOKEN.match(rest, pos)
        if m is None or m.end() == pos or (m.group("name") and pos > 0 and rest[pos] != "."):
            raise ConfigError(path, f"not a JSON path: {text!r} (at {rest[pos:]!r})")
        if m.group("name") is not None:
            steps.append(m.group("name"))
        elif m.group("index") is not None:
            steps.append(int(m.group("index")))
        elif m.group("star") is not None:
            steps.append(WILDCARD)
        else:
            steps.append(m.group("qname"))
        pos = m.end()
    if not steps:
        raise ConfigError(path, f"not a JSON path: {text!r}")
    return JsonPath(text, tuple(steps))
