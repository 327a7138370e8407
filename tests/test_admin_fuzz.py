"""A schema-driven fuzz run against the live admin API: the OpenAPI document the gateway
serves drives schemathesis, which sends valid (positive) and invalid (negative) calls to every
documented operation of a started gateway with real demo model servers. No call may answer
5xx, every answer must match the response schema the document declares for it, and the log
must hold no traceback. The document and the handlers come from the same models, so a
disagreement between them shows up here."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.helpers import TOKEN, ModelServer, classifier_config, running_gateway

EXAMPLES = 12  # per operation and mode: ~35 operations x 2 modes, well under a minute


def fuzz(document: dict[str, Any], base_url: str) -> tuple[int, list[str]]:
    """Run every operation of `document` against `base_url` (blocking: in a thread, while
    the gateway serves on the test's event loop). Returns (calls, failures)."""
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    calls = [0]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)

                @settings(max_examples=EXAMPLES, deadline=None, database=None,
                          phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def run(case: Any) -> None:
                    response = case.call(base_url=base_url, session=session, headers=headers,
                                         timeout=30)
                    calls[0] += 1
                    try:
                        case.validate_response(response, checks=[
                            not_a_server_error, response_schema_conformance])
                    except Exception as exc:  # recorded, not raised: no shrinking needed
                        failures.append(f"{case.method} {case.formatted_path} "
                                        f"{response.status_code}: {exc}"[:600])

                try:
                    run()
                except Unsatisfiable:
                    pass  # nothing to make invalid (no parameters, no body): negative mode
    return calls[0], failures


@pytest.mark.timeout(240)
async def test_fuzz_the_live_admin_api(blue: ModelServer, green: ModelServer,
                                       caplog: pytest.LogCaptureFixture) -> None:
    config = classifier_config(
        blue.url, green.url, shadow={"window": "1m"},
        probes={"output": {"prediction": "outputs[0].data"}},
        alarms=[{"name": "errors", "route": "classifier", "metric": "error_rate", "op": ">",
                 "threshold": 0.5, "window": "10s"}],
        rollout={"backend": "green", "steps": [10, 100], "interval": "1h"})
    caplog.set_level(logging.WARNING)
    async with running_gateway(config) as gw:
        document = (await gw.admin.get("/admin/openapi.json")).json()
        calls, failures = await asyncio.to_thread(fuzz, document, gw.admin_url)
    print(f"fuzz: {calls} calls")
    assert calls > 300
    assert failures == [], "\n".join(failures[:20])
    tracebacks = [r.getMessage() for r in caplog.records
                  if r.exc_info is not None or "Traceback" in r.getMessage()]
    assert tracebacks == []
