"""A backend's interim (1xx) answers: which go on to the client, and with which headers.

RFC 9110 §15.2: a proxy MUST forward 1xx responses unless it asked for them itself, and a
server MUST NOT send one to an HTTP/1.0 client. What that means here:

- `100 Continue` is not forwarded: the gateway answers a client's `Expect: 100-continue`
  itself and never sends `Expect` upstream, so a backend's 100 is not one the client asked
  for. `101 Switching Protocols` never gets this far (the upstream refuses an upgrade it did
  not ask for). Every other 1xx (`102 Processing`, `103 Early Hints`, ...) is forwarded.
- Its hop-by-hop headers are dropped like the final answer's (`Proxy._response_headers`):
  the fixed set and the ones its `Connection` header names. So are framing headers: a 1xx
  ends with its head (RFC 9110 §8.6, RFC 9112 §6.1 forbid them there).
- No `X-Request-ID` is added: the final answer carries it (that is what logs and clients
  correlate), an interim head is advisory and may be dropped by any hop, and adding one
  would make every hint a line longer than the backend wrote it (the gateway's only added
  response header stays on the answer itself). A backend's own X-Request-ID is kept.

The HTTP/1.1-only rule, "never after the final head" and "never to a client gone" are the
server's to keep (gateway/server/fast.py `_Connection.interim`): it knows the connection.
"""

from __future__ import annotations

from gateway.proxy import end_to_end_headers
from gateway.upstream import Headers

_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def interim_headers(status: int, headers: Headers) -> Headers | None:
    """The headers of a backend's interim head as they go on to the client, or None when
    that status is not forwarded (see the module docstring).

    >>> interim_headers(103, [(b"Link", b"</a.css>; rel=preload"), (b"Connection", b"x"),
    ...                       (b"X", b"hop")])
    [(b'Link', b'</a.css>; rel=preload')]
    >>> interim_headers(100, []) is None
    True
    """
    if status < 102 or status > 199:
        return None
    out, _, framed = end_to_end_headers(headers)
    if framed:  # no body follows a 1xx: its framing headers go too
        out = [(n, v) for n, v in out if n.lower() not in _FRAMING]
    return out


__all__ = ["interim_headers"]
