"""Every error modelgate raises, and how each is shown at the edge.

    ModelgateError
    ├── ConfigError            bad config file: names the key path (exit 2 / refused at load)
    ├── AdminError             bad admin call, carries the HTTP status
    │   ├── InvalidRequest     400: bad body, unknown backend, value out of range
    │   ├── Unauthorized       401
    │   ├── NotFound           404
    │   └── Conflict           409: state does not allow it (nothing to roll back, ...)
    ├── StoreError             the routing-state store failed
    │   ├── VersionConflict    compare-and-set lost a race: re-read and try again
    │   ├── StoreUnavailable   the store cannot be reached (Redis down)  → 503 on writes
    │   └── LeaseLost          a fenced write by a process that no longer holds the lease
    └── UpstreamError          a backend call failed before the response started
        ├── UpstreamConnectError   refused / unreachable   → 502
        ├── UpstreamResetError     reset / closed early    → 502
        ├── UpstreamTimeout        connect or read timeout → 504
        └── UpstreamPoolTimeout    no free connection to the backend in time → 503
                                   (the gateway's own queue: not the backend's error)

Foreign exceptions (aiohttp, OSError, asyncio.TimeoutError) are translated into these in one
place per component (`raise ... from exc`); the proxy and the admin API map them to responses.
"""

from __future__ import annotations


class ModelgateError(Exception):
    """Base of every error modelgate raises on purpose."""


class ConfigError(ModelgateError):
    """A config value is wrong; `path` is the key path, e.g. ``routes[0].backends.green.url``."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class AdminError(ModelgateError):
    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class InvalidRequest(AdminError):
    status = 400
    code = "invalid_request"


class Unauthorized(AdminError):
    status = 401
    code = "unauthorized"


class Forbidden(AdminError):
    status = 403
    code = "forbidden"


class NotFound(AdminError):
    status = 404
    code = "not_found"


class Conflict(AdminError):
    status = 409
    code = "conflict"


class StoreError(ModelgateError):
    """The store could not be read or written."""


class VersionConflict(StoreError):
    """A compare-and-set write saw a newer version than expected."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now: routing goes on from the last snapshot, writes
    are refused (503) until it is back."""


class LeaseLost(StoreError):
    """A write fenced by a lease was refused: this process no longer holds that lease, so
    another one decides now."""


class UpstreamError(ModelgateError):
    """A backend call failed before any byte of its response reached the client."""

    status = 502
    kind = "error"


class UpstreamConnectError(UpstreamError):
    status = 502
    kind = "refused"


class UpstreamResetError(UpstreamError):
    status = 502
    kind = "reset"


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "timeout"


class UpstreamPoolTimeout(UpstreamError):
    """Every connection of the pool stayed busy for the connect timeout. The backend was
    never called: gates, alarms and the backend's error counters do not see it."""

    status = 503
    kind = "pool_timeout"
