"""The OpenAPI 3.1 document of the admin API, generated from the endpoints it serves.

Each `Endpoint` names the models of its body, query string and answer; their JSON Schemas
(bounds, enums, descriptions and examples included) are the document's, so the document and
the checks the handlers run are the same objects. Shared definitions go to
``components/schemas``. The config file's field types admit a ``${VAR}`` placeholder (the
config loader substitutes it); API calls do not, so the document leaves that alternative out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter

from gateway import __version__
from gateway.admin.endpoint import Endpoint
from gateway.admin.models import Error
from gateway.schema import ENV_PLACEHOLDER

REF = "#/components/schemas/{model}"
_PATH_PARAM = re.compile(r"\{([^}]+)\}")
_NULL = {"type": "null"}
_ERROR_TEXT = {400: "Invalid request (the key path and the problem)", 401: "No valid token",
               404: "No such route, alarm or rollout", 409: "Conflicts with the current state",
               503: "The store is unavailable; nothing changed"}


def _clean(node: Any, *, nulls: bool = True) -> Any:
    """`node` without the ``${VAR}`` alternative (and without null when not `nulls`)."""
    if isinstance(node, list):
        return [_clean(v, nulls=nulls) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _clean(v, nulls=nulls) for k, v in node.items()}
    options = out.get("anyOf")
    if isinstance(options, list):
        kept = [o for o in options if o != ENV_PLACEHOLDER and (nulls or o != _NULL)]
        if len(kept) == 1 and isinstance(kept[0], dict):
            del out["anyOf"]
            out = {**kept[0], **out}
        else:
            out["anyOf"] = kept
    return out


class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def schema(self, adapter: TypeAdapter[Any], *, mode: str = "validation",
               inline: bool = False) -> dict[str, Any]:
        """`adapter`'s JSON Schema; its definitions go to ``components/schemas``, and so does
        the model itself unless `inline` (request bodies are shown where they are used)."""
        found = adapter.json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        for name, definition in found.pop("$defs", {}).items():
            self.schemas[name] = _clean(definition)
        title = found.get("title")
        if not inline and found.get("type") == "object" and isinstance(title, str):
            self.schemas[title] = _clean(found)
            return {"$ref": REF.format(model=title)}
        return dict(_clean(found))

    def operation(self, ep: Endpoint) -> dict[str, Any]:
        op: dict[str, Any] = {"summary": ep.summary, "operationId": _operation_id(ep)}
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True,
             "schema": {"type": "string", "minLength": 1}}
            for name in _PATH_PARAM.findall(ep.path)
        ]
        if ep.query is not None:
            query = ep.query.json_schema(ref_template=REF)
            required = set(query.get("required", ()))
            for name, prop in query.get("properties", {}).items():
                param: dict[str, Any] = {"name": name, "in": "query",
                                         "required": name in required,
                                         "schema": _clean(prop, nulls=False)}
                if "description" in prop:
                    param["description"] = prop["description"]
                params.append(param)
        if params:
            op["parameters"] = params
        if ep.body is not None:
            raw = ep.body.json_schema(ref_template=REF)
            op["requestBody"] = {"required": bool(raw.get("required")), "content": {
                "application/json": {"schema": self.schema(ep.body, inline=True)}}}
        ok: dict[str, Any] = {"description": "OK"}
        if ep.response is not None:
            ok["content"] = {ep.content: {"schema": self.schema(ep.response,
                                                                  mode="serialization")}}
        op["responses"] = {str(ep.status): ok}
        codes = set(ep.errors)
        if ep.body is not None or ep.query is not None:
            codes.add(400)
        if ep.auth:
            codes.add(401)
        if _PATH_PARAM.search(ep.path):
            codes.add(404)
        for code in sorted(codes):
            op["responses"][str(code)] = {"description": _ERROR_TEXT.get(code, "Error"),
                                          "content": {"application/json": {"schema": {
                                              "$ref": REF.format(model="Error")}}}}
        if not ep.auth:
            op["security"] = []
        return op


def _operation_id(ep: Endpoint) -> str:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", _PATH_PARAM.sub(r"by_\1", ep.path)) if w]
    return "_".join([ep.method.lower(), *words])


def openapi_document(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """The document describing exactly `endpoints`."""
    builder = _Builder()
    builder.schema(TypeAdapter(Error), mode="serialization")
    paths: dict[str, Any] = {}
    for ep in endpoints:
        paths.setdefault(ep.path, {})[ep.method.lower()] = builder.operation(ep)
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelgate admin API", "version": __version__},
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": dict(sorted(builder.schemas.items())),
        },
    }
