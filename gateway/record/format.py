"""The recording file: gzip-compressed JSON lines, one captured exchange per line.

Pure functions only (no I/O but reading a given file), so the format is tested directly.
A line (``FORMAT_VERSION`` 1)::

    {"version": 1, "ts": 1767225600.123, "route": "classifier", "backend": "blue",
     "request_id": "…", "method": "POST", "target": "/v2/models/classifier/infer",
     "request_headers": [["Content-Type", "application/json"], ["Authorization", "[REDACTED]"]],
     "request_body": "{\"inputs\": …}", "request_body_encoding": "text",
     "status": 200, "response_headers": [["Content-Type", "application/json"]],
     "response_body": "{\"outputs\": …}", "response_body_encoding": "text",
     "latency_ms": 1.234}

- ``ts``: wall-clock time the request started (seconds since the epoch).
- headers: the request as forwarded to the backend (with X-Forwarded-*, X-Request-ID) and the
  backend's response headers, as [name, value] pairs in order, latin-1 text; redacted values
  read ``[REDACTED]``.
- bodies: ``text`` (UTF-8) or ``base64`` (anything else), or null with a null encoding when
  absent (no body, a HEAD, or a streamed response over the route's ``max_body_bytes``) or
  dropped: with JSON fields to redact, a body that cannot be searched for them (a
  Content-Encoding such as gzip) is left out and ``request_body_dropped`` /
  ``response_body_dropped`` says why. Server-sent-event bodies are redacted per ``data:``
  line.
- ``target``: the values of credential-like query parameters (`DEFAULT_REDACT_QUERY` and
  any the operator adds) read ``[REDACTED]``.
- ``latency_ms``: the gateway's total latency of the live request, as the shadow report's
  "live" latency.

Readers must ignore keys they do not know; a new key does not change the version.
"""

from __future__ import annotations

import base64
import binascii
import gzip
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson

from gateway.upstream import Headers

FORMAT_VERSION = 1
REDACTED = "[REDACTED]"
# Always redacted, whatever the operator adds: credentials have no place in a recording.
DEFAULT_REDACT_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
    "x-auth-token", "x-access-token", "x-amz-security-token", "x-goog-api-key",
    "ocp-apim-subscription-key",
    # who the client is: personal data as much as a credential
    "x-forwarded-for", "x-real-ip", "forwarded", "true-client-ip", "cf-connecting-ip"})
# Query parameters (compared lower-case) whose values are always redacted from the target.
DEFAULT_REDACT_QUERY = frozenset({
    "api_key", "apikey", "api-key", "key", "token", "access_token", "id_token",
    "refresh_token", "auth", "authorization", "password", "secret", "client_secret",
    "signature", "sig", "x-amz-signature", "x-amz-security-token", "code"})
_IDENTITY = frozenset({"", "identity"})


class FormatError(ValueError):
    """A recording line that is not what this module writes; names the line number."""


@dataclass(frozen=True, slots=True)
class Redaction:
    """What to blank out: header names (lower-case; the defaults always included) and JSON
    object keys at any depth of a request or response body."""

    headers: frozenset[str] = DEFAULT_REDACT_HEADERS
    json_fields: frozenset[str] = frozenset()
    query: frozenset[str] = DEFAULT_REDACT_QUERY

    @classmethod
    def of(cls, headers: Collection[str] = (), json_fields: Collection[str] = (),
           query: Collection[str] = ()) -> Redaction:
        return cls(DEFAULT_REDACT_HEADERS | {h.lower() for h in headers},
                   frozenset(json_fields), DEFAULT_REDACT_QUERY | {q.lower() for q in query})


def redact_target(target: str, names: frozenset[str]) -> str:
    """`target` with the values of the query parameters `names` (lower-case) redacted; the
    rest of the target is kept byte for byte."""
    if "?" not in target:
        return target
    path, _, query = target.partition("?")
    query, hash_, fragment = query.partition("#")
    parts = query.split("&")
    changed = False
    for i, part in enumerate(parts):
        name, eq, _ = part.partition("=")
        decoded = parse_qsl(name, keep_blank_values=True)
        key = (decoded[0][0] if decoded else name).lower()
        if eq and key in names:
            parts[i] = f"{name}={quote(REDACTED)}"
            changed = True
    if not changed:
        return target
    return f"{path}?{'&'.join(parts)}{hash_}{fragment}"


def redact_headers(headers: Headers, names: frozenset[str]) -> list[list[str]]:
    """Headers as [name, value] text pairs, the values of `names` (lower-case) redacted."""
    out = []
    for name, value in headers:
        text = name.decode("latin-1")
        out.append([text, REDACTED if text.lower() in names else value.decode("latin-1")])
    return out


def _blank(doc: Any, fields: frozenset[str]) -> bool:
    """Redact the keys `fields` of every object in `doc` in place; whether any was."""
    found = False
    if isinstance(doc, dict):
        for key in doc:
            if key in fields:
                doc[key] = REDACTED
                found = True
            elif _blank(doc[key], fields):
                found = True
    elif isinstance(doc, list):
        for item in doc:
            found = _blank(item, fields) or found
    return found


def redact_body(body: bytes | None, fields: frozenset[str]) -> bytes | None:
    """`body` with the JSON keys `fields` redacted at any depth: a JSON document, or a
    server-sent-event stream whose ``data:`` lines are JSON (each line on its own). A body
    that is neither is kept as is (there is no field to find); one without those keys keeps
    its bytes. (Encoded bodies never get here: `redact_payload`.)"""
    if not body or not fields:
        return body
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _redact_sse(body, fields)
    return orjson.dumps(doc) if _blank(doc, fields) else body


def _redact_sse(body: bytes, fields: frozenset[str]) -> bytes:
    if b"data:" not in body:
        return body
    lines = body.split(b"\n")
    changed = False
    for i, raw in enumerate(lines):
        if not raw.startswith(b"data:"):
            continue
        cr = raw.endswith(b"\r")
        data = raw[5:-1] if cr else raw[5:]
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue  # "[DONE]", plain text: no field to find
        if _blank(doc, fields):
            lines[i] = b"data: " + orjson.dumps(doc) + (b"\r" if cr else b"")
            changed = True
    return b"\n".join(lines) if changed else body


def content_encoding(headers: Headers) -> str:
    """The Content-Encoding of a message, lower-case ('' when none)."""
    for name, value in headers:
        if name.lower() == b"content-encoding":
            return value.decode("latin-1").strip().lower()
    return ""


def redact_payload(body: bytes | None, headers: Headers, fields: frozenset[str]
                   ) -> tuple[bytes | None, str | None]:
    """(body to record, why it was dropped): with `fields` to redact, an encoded body
    (gzip, br, …) cannot be searched for them, so it is dropped, never kept in clear."""
    if not body or not fields:
        return body, None
    encoding = content_encoding(headers)
    if encoding not in _IDENTITY or body[:2] == b"\x1f\x8b":
        return None, (f"content-encoding {encoding or 'gzip'} cannot be redacted "
                      f"(redact_json_fields is set)")
    return redact_body(body, fields), None


def encode_body(body: bytes | None) -> tuple[str | None, str | None]:
    """(text, encoding): UTF-8 text as ``text``, other bytes as ``base64``, None as None."""
    if body is None:
        return None, None
    try:
        return body.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "base64"


def decode_body(text: str | None, encoding: str | None) -> bytes | None:
    if text is None:
        return None
    if encoding == "text":
        return text.encode("utf-8")
    if encoding == "base64":
        return base64.b64decode(text, validate=True)
    raise ValueError(f"unknown body encoding {encoding!r}")


def line(*, ts: float, route: str, backend: str, request_id: str, method: str, target: str,
         request_headers: Headers, request_body: bytes | None, status: int,
         response_headers: Headers, response_body: bytes | None, latency: float,
         redaction: Redaction) -> bytes:
    """One recording line (with its newline) for a finished exchange, redacted."""
    req, req_dropped = redact_payload(request_body, request_headers, redaction.json_fields)
    resp, resp_dropped = redact_payload(response_body, response_headers,
                                        redaction.json_fields)
    req_text, req_enc = encode_body(req)
    resp_text, resp_enc = encode_body(resp)
    doc: dict[str, Any] = {
        "version": FORMAT_VERSION, "ts": round(ts, 6), "route": route, "backend": backend,
        "request_id": request_id, "method": method,
        "target": redact_target(target, redaction.query),
        "request_headers": redact_headers(request_headers, redaction.headers),
        "request_body": req_text, "request_body_encoding": req_enc,
        "status": status,
        "response_headers": redact_headers(response_headers, redaction.headers),
        "response_body": resp_text, "response_body_encoding": resp_enc,
        "latency_ms": round(latency * 1000, 3),
    }
    if req_dropped:
        doc["request_body_dropped"] = req_dropped
    if resp_dropped:
        doc["response_body_dropped"] = resp_dropped
    return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)


@dataclass(frozen=True, slots=True)
class Captured:
    """One recorded exchange, read back (bodies as bytes, headers as text pairs)."""

    ts: float
    route: str
    backend: str
    request_id: str
    method: str
    target: str
    request_headers: list[tuple[str, str]]
    request_body: bytes | None
    status: int
    response_headers: list[tuple[str, str]]
    response_body: bytes | None
    latency_ms: float

    def header(self, name: str, response: bool = True) -> str | None:
        lower = name.lower()
        for key, value in self.response_headers if response else self.request_headers:
            if key.lower() == lower:
                return value
        return None


def _pairs(raw: Any, key: str) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in raw):
        raise ValueError(f"{key} must be a list of [name, value] text pairs")
    return [(p[0], p[1]) for p in raw]


def parse_line(raw: bytes) -> Captured:
    """One line back into a `Captured`; `ValueError` says which key is wrong."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(f"version {version!r} is not one this modelgate reads "
                         f"({FORMAT_VERSION})")
    try:
        latency = doc["latency_ms"]
        status = doc["status"]
        if not isinstance(status, int) or isinstance(status, bool):
            raise ValueError("status must be a whole number")
        if not isinstance(latency, int | float) or isinstance(latency, bool):
            raise ValueError("latency_ms must be a number")
        strings = {k: doc[k] for k in ("route", "backend", "request_id", "method", "target")}
        for key, value in strings.items():
            if not isinstance(value, str):
                raise ValueError(f"{key} must be text")
        return Captured(
            ts=float(doc["ts"]), route=strings["route"], backend=strings["backend"],
            request_id=strings["request_id"], method=strings["method"],
            target=strings["target"],
            request_headers=_pairs(doc["request_headers"], "request_headers"),
            request_body=decode_body(doc["request_body"], doc["request_body_encoding"]),
            status=status,
            response_headers=_pairs(doc["response_headers"], "response_headers"),
            response_body=decode_body(doc["response_body"], doc["response_body_encoding"]),
            latency_ms=float(latency))
    except KeyError as exc:
        raise ValueError(f"missing key {exc.args[0]!r}") from None
    except (TypeError, binascii.Error) as exc:
        raise ValueError(str(exc)) from None


def read_recording(path: Path) -> Iterator[Captured]:
    """The exchanges of a recording file (gzip, or plain JSON lines); `FormatError` names the
    first bad line."""
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else path.open("rb")) as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                yield parse_line(raw)
            except ValueError as exc:
                raise FormatError(f"{path}: line {number}: {exc}") from None
