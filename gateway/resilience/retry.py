"""Whether a request that failed before any byte reached the client goes again, and where:
to another URL of its backend, or from a canary to live (the route's `fallback`). One
function for both ways a request is answered (the Task path's `Proxy._send` and the fast
path's `FastExchange`), so both servers behave the same."""

from __future__ import annotations

import time
from typing import Protocol

from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamResetError
from gateway.resilience.budget import WINDOW as BUDGET_WINDOW
from gateway.resilience.limits import force, leave
from gateway.routing import Backend, CompiledRoute
from gateway.upstream import Upstream

RETRIED_URL = 1  # sent again to another URL of the backend
FELL_BACK = 2  # a canary's failure sent again to live
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Attempt(Protocol):
    """What a retry reads and changes of a request's plan (`gateway.proxy.Plan`)."""

    route: CompiledRoute
    backend: Backend
    upstream: Upstream
    started: float
    retried: int


def may_resend(plan: Attempt, method: str, exc: UpstreamError) -> bool:
    """Whether a request whose call failed with `exc` before the status line may go to
    another URL: always when the connection was refused (nothing was sent); after a reset
    only when the method is idempotent or the route is side-effect free (RFC 9110 §9.2.2)."""
    if isinstance(exc, UpstreamConnectError):
        return True
    return isinstance(exc, UpstreamResetError) and (
        method in IDEMPOTENT or plan.route.retry_safe)


def may_fall_back(plan: Attempt, method: str, exc: UpstreamError) -> bool:
    """Whether a canary's request that failed with `exc` before the status line may go to
    live: when the connection was refused (nothing was sent); after a reset or a timeout
    (its bytes may have reached the canary, which may have run it) only when the method is
    idempotent or the route is side-effect free (issue 11 item 4). A canary's 503 always may:
    it answered, declining the work."""
    return isinstance(exc, UpstreamConnectError) or method in IDEMPOTENT or (
        plan.route.retry_safe)


def _budget_allows(backend: Backend, now: float) -> bool:
    """Whether `backend`'s retry budget takes one more retry now (counting it if so), its
    requests read from the backend's own per-second metrics."""
    budget = backend.budget
    return budget is not None and budget.try_retry(
        now, backend.stats.recent_requests(BUDGET_WINDOW))


def retry(plan: Attempt, status: int, kind: str, resend: bool, fall_back: bool) -> bool:
    """Whether a request that failed on `plan.upstream` before any byte reached the client
    goes again, and where (`plan` is changed to say so):

    - `resend` (`may_resend`: refused, or reset when that is safe): once to another URL of
      the backend that is not ejected;
    - on the route's canary with `fallback` on and `fall_back` (`may_fall_back`, or True for
      a 503): once to live (after a failure `kind` before the status line, or a `status`
      503). The failure is charged to the canary first, so
      its gates and alarms see it as they would without fallback.

    Each retry must fit the budget of the backend it goes to. The caller makes sure the body
    can be sent again (buffered, not streamed)."""
    backend = plan.backend
    now = time.perf_counter()
    if resend and not plan.retried & RETRIED_URL:
        other = backend.other_upstream(plan.upstream)
        if other is not None and _budget_allows(backend, now):
            backend.stats.upstream_error(kind)  # a failed call; the request goes on
            plan.upstream = other
            plan.retried |= RETRIED_URL
            return True
    route = plan.route
    if not (fall_back and route.fallback and backend is route.canary) or (
            plan.retried & FELL_BACK):
        return False
    live = route.live
    if live.gate is not None and live.gate.full():
        return False
    if not _budget_allows(live, now):
        return False
    stats = backend.stats
    if kind:
        stats.upstream_error(kind)
    stats.observe(status, now - plan.started)
    if backend.gate is not None or live.gate is not None:
        leave(None, backend.gate)
        force(None, live.gate)
    plan.backend = live
    plan.upstream = live.upstream()
    plan.retried |= FELL_BACK
    return True


__all__ = ["FELL_BACK", "IDEMPOTENT", "RETRIED_URL", "may_fall_back", "may_resend", "retry"]
