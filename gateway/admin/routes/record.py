"""Recordings: start one on a route, read its status, download it, stop or discard it.

Starting, stopping and discarding are audit events (``recording_start``, ``recording_stop``,
``recording_discard``) like every other admin change. A recording holds real traffic, so
downloading it needs an operator token; a viewer may read its status."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from gateway.admin.endpoint import Call, Endpoint
from gateway.admin.models import (
    RECORDING_START,
    RecordingList,
    RecordingStart,
    RecordingView,
)
from gateway.errors import Conflict, Forbidden
from gateway.record.component import Recordings, RecordingSpec
from gateway.state import OPERATOR

VIEW = TypeAdapter(RecordingView)


def endpoints(recordings: Recordings) -> list[Endpoint]:
    async def start(call: Call) -> Any:
        body: RecordingStart = call.body
        rec = recordings.begin(call.route, RecordingSpec(
            duration=body.duration_s, sample=body.sample_percent,
            max_requests=body.max_requests, max_bytes=body.max_bytes,
            redact_headers=body.redact_headers, redact_json_fields=body.redact_json_fields,
            redact_query_params=body.redact_query_params))
        view = recordings.view(rec)
        await recordings.gateway.control.record(call.route, call.actor, "recording_start",
                                                None, _audited(view), None)
        return view

    async def list_all(call: Call) -> Any:
        return {"recordings": [recordings.view(r) for r in recordings.all()]}

    async def status(call: Call) -> Any:
        return recordings.view(recordings.get(call.param("id")))

    async def download(call: Call) -> Any:
        rec = recordings.get(call.param("id"))
        if getattr(call.actor, "role", OPERATOR) != OPERATOR:
            raise Forbidden(f"token {call.actor!r} may read a recording's status but not "
                            f"download it (recorded traffic): use an operator token")
        if rec.ended is None:
            raise Conflict(f"recording {rec.id} is still running: stop it first "
                           f"(DELETE /admin/recordings/{rec.id}) or wait until it ends")
        resp = web.StreamResponse(headers={
            "Content-Type": "application/gzip",
            "Content-Disposition": f'attachment; filename="{rec.route}-{rec.id}.jsonl.gz"'})
        resp.content_length = rec.compressed
        await resp.prepare(call.request)
        for piece in rec.pieces:  # the list is final once the recording ended
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def stop(call: Call) -> Any:
        rec = recordings.get(call.param("id"))
        action = "recording_stop" if rec.ended is None else "recording_discard"
        view = recordings.view(await recordings.end(rec.id))
        await recordings.gateway.control.record(rec.route, call.actor, action, None,
                                                _audited(view), None)
        return view

    one = "/admin/recordings/{id}"
    return [
        Endpoint("POST", "/admin/routes/{route}/recordings", "Start recording a sample of "
                 "the route's exchanges (on this process)", start, body=RECORDING_START,
                 response=VIEW, status=201, errors=(409,)),
        Endpoint("GET", "/admin/recordings", "This process's recordings, oldest first",
                 list_all, response=TypeAdapter(RecordingList)),
        Endpoint("GET", one, "A recording's status and counts", status, response=VIEW,
                 errors=(404,)),
        Endpoint("GET", one + "/download", "The finished recording: gzip JSON lines",
                 download, content="application/gzip", errors=(403, 404, 409)),
        Endpoint("DELETE", one, "Stop a running recording (what was captured is kept); "
                 "discard a finished one", stop, response=VIEW, errors=(404,)),
    ]


def _audited(view: dict[str, Any]) -> dict[str, Any]:
    """What an audit event keeps of a recording: what it is and what it captured."""
    keys = ("id", "route", "state", "stop_reason", "process", "duration_s", "sample_percent",
            "max_requests", "max_bytes", "redact_headers", "redact_json_fields",
            "redact_query_params", "captured", "dropped")
    return {k: view[k] for k in keys if k in view}
