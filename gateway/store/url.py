"""Store URLs as they may be shown: logs, errors, `/admin/cluster`."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_PARAMS = frozenset({"password", "username"})


def redacted_url(url: str) -> str:
    """`url` without its password, wherever redis-py would read one: in the user part
    (``redis://:secret@host``) or in the query (``redis://host/0?password=secret``)."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[-1]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        parts = parts._replace(netloc=user + host)
    if parts.query:
        query = [(k, "***" if k.lower() in _SECRET_PARAMS else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)
