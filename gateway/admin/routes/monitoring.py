"""Alarms (thresholds at run time), drift, probe summaries."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from gateway.admin.endpoint import Call, Endpoint
from gateway.admin.models import (
    BASELINE,
    THRESHOLD,
    WINDOW_QUERY,
    Alarm,
    AlarmList,
    Baseline,
    Threshold,
    WindowQuery,
)
from gateway.monitoring.component import Monitoring

ALARM = TypeAdapter(Alarm)
DEFAULT_BASELINE_WINDOW = 300.0  # a route without probes: refused later, with a 409
PROBE_WINDOW = 60.0


def endpoints(monitoring: Monitoring) -> list[Endpoint]:
    async def list_alarms(call: Call) -> Any:
        return {"alarms": monitoring.alarms_view()}

    async def get_alarm(call: Call) -> Any:
        return monitoring.alarm(call.param("name")).to_json()

    async def put_alarm(call: Call) -> Any:
        body: Threshold = call.body
        status = await monitoring.set_threshold(call.param("name"), body.threshold,
                                                actor=call.actor, reason=body.reason)
        return status.to_json()

    async def get_drift(call: Call) -> Any:
        query: WindowQuery = call.query
        return monitoring.drift(call.route, query.window)

    async def post_baseline(call: Call) -> Any:
        body: Baseline = call.body
        probes = monitoring.probes(call.route)
        window = body.window
        if window is None:
            window = (probes.config.drift.window if probes is not None
                      else DEFAULT_BASELINE_WINDOW)
        await monitoring.take_baseline(call.route, window, actor=call.actor,
                                       reason=body.reason)
        return monitoring.drift(call.route)

    async def get_probes(call: Call) -> Any:
        query: WindowQuery = call.query
        return monitoring.probe_summary(call.route, query.window or PROBE_WINDOW)

    alarm = "/admin/alarms/{name}"
    route = "/admin/routes/{route}"
    return [
        Endpoint("GET", "/admin/alarms", "Alarm rules with state, value, since", list_alarms,
                 response=TypeAdapter(AlarmList)),
        Endpoint("GET", alarm, "One alarm rule", get_alarm, response=ALARM),
        Endpoint("PUT", alarm, "Change the threshold at run time (null: back to config)",
                 put_alarm, body=THRESHOLD, response=ALARM, errors=(409, 503)),
        Endpoint("GET", route + "/drift", "PSI of labels, scores and features per backend vs "
                 "live and vs baseline", get_drift, query=WINDOW_QUERY),
        Endpoint("POST", route + "/drift/baseline", "Take the drift baseline from the last "
                 "window", post_baseline, body=BASELINE, errors=(409, 503)),
        Endpoint("GET", route + "/probes", "Probe rates per backend over a window (null, "
                 "missing, schema)", get_probes, query=WINDOW_QUERY),
    ]
