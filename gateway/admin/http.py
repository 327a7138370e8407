"""The admin API's HTTP helpers: JSON replies, errors, auth, and reading bodies and query
strings through their models. A leaf: it knows aiohttp, the error tree and `gateway.schema`,
nothing of the gateway or its components.

Errors are JSON ``{"error": code, "message": ...}`` with a 4xx status and change nothing; an
unexpected exception is a 500 with no traceback in the body (it goes to the log). A body or
query value the model refuses is a 400 naming its key path and the problem in one line
(``weight: resolution is 0.01, got 10.001``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from gateway.admin.auth import actor_for, may
from gateway.errors import AdminError, ConfigError, Forbidden, InvalidRequest, ModelgateError
from gateway.schema import config_error
from gateway.state import Actor

log = logging.getLogger("modelgate.admin")
T = TypeVar("T")
ACTOR_KEY = web.RequestKey("actor", str)
TOKENS_KEY: web.AppKey[dict[str, str]] = web.AppKey("tokens", dict)
ROLES_KEY: web.AppKey[dict[str, str]] = web.AppKey("roles", dict)  # absent: operator
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
        content_type="application/json",
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": code, "message": message}, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AdminError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except ConfigError as exc:  # a value checked by a model shared with the config file
        return error_response(400, "invalid_request", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"),
                              f"{exc.reason}: {request.method} {request.path}")
    except ModelgateError as exc:
        log.warning("admin %s %s failed: %s", request.method, request.path, exc)
        return error_response(503, "unavailable", str(exc))
    except Exception:
        log.exception("admin %s %s crashed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the gateway log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/admin/"):
        name = actor_for(request.headers.get("Authorization"), request.app[TOKENS_KEY])
        role = request.app[ROLES_KEY].get(name, "operator")
        if not may(role, request.method):
            raise Forbidden(f"token {name!r} has the role {role!r}, which may only read "
                            f"(GET); {request.method} {request.path} needs an operator token")
        request[ACTOR_KEY] = Actor(name, role)
    return await handler(request)


# -- bodies and query strings through their models ------------------------------------------------
def checked(adapter: TypeAdapter[T], data: Any, what: str,
            context: dict[str, Any] | None = None) -> T:
    """`data` (a JSON body or a query string's parameters) validated by `adapter`; a refusal
    is `InvalidRequest` naming the key path (`what` is "body" or "query")."""
    try:
        return adapter.validate_python(data, context=context)
    except ValidationError as exc:
        raise InvalidRequest(_problem(exc, adapter, what)) from None


def _problem(exc: ValidationError, adapter: TypeAdapter[Any], what: str) -> str:
    error = exc.errors(include_url=False)[0]
    loc, kind = error["loc"], error["type"]
    word = "field" if what == "body" else "parameter"
    if kind in ("unexpected_keyword_argument", "extra_forbidden") and len(loc) == 1:
        allowed = ", ".join(sorted(adapter.json_schema().get("properties", {})))
        return f"unknown {word} {loc[0]!r} (allowed: {allowed})"
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument") \
            and len(loc) == 1:
        return f"missing {word} {loc[0]!r}"
    found = config_error(exc)
    if found.path == "(top)" and kind in ("dataclass_type", "dict_type", "model_type",
                                          "dataclass_exact_type"):
        return f"{what} must be a JSON object"
    return str(found)


async def read_body(request: web.Request, adapter: TypeAdapter[T],
                    context: dict[str, Any] | None = None) -> T:
    """The request's JSON body (an empty body is ``{}``) as `adapter`'s model."""
    raw = await request.read()
    data: Any = {}
    if raw.strip():
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    return checked(adapter, data, "body", context)


def read_query(query: Mapping[str, str], adapter: TypeAdapter[T],
               context: dict[str, Any] | None = None) -> T:
    """The query string's parameters (the first of repeated ones) as `adapter`'s model."""
    return checked(adapter, {k: query[k] for k in query}, "query", context)
