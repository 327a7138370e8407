"""`modelgate shadow` and `modelgate shadow-report` against a running gateway."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.cli import main
from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    RunningGateway,
    classifier_config,
    infer_body,
    running_gateway,
    wait_for,
)


async def cli(gw: RunningGateway, *args: str) -> int:
    return await asyncio.to_thread(main, [*args, "--admin", gw.admin_url, "--token", TOKEN])


async def test_shadow_on_report_and_off(blue: ModelServer, green: ModelServer,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = classifier_config(blue.url, green.url, shadow={
        "compare": {"preset": "kserve_v2", "numbers": {"abs_tol": 0.01}}})
    async with running_gateway(config) as gw:
        assert await cli(gw, "shadow", "classifier") == 0
        assert "shadow off (live: blue)" in capsys.readouterr().out

        assert await cli(gw, "shadow", "classifier", "--backend", "green", "--sample", "100",
                         "--reason", "check v2") == 0
        assert "mirroring 100% of requests to green" in capsys.readouterr().out
        events = (await gw.admin.get("/admin/events")).json()["events"]
        assert events[-1]["reason"] == "check v2" and events[-1]["actor"] == "admin"

        rows = [[5.1, 3.5, 1.4, 0.2], [6.0, 2.7, 5.0, 1.6], [6.3, 3.3, 6.0, 2.5]]
        for _ in range(3):
            r = await gw.client.post(INFER, json=infer_body(rows))
            assert r.status_code == 200

        async def counted() -> bool:
            rep = (await gw.admin.get("/admin/routes/classifier/shadow")).json()
            return rep["total"] is not None and rep["total"]["mirrored"] == 3

        await wait_for(counted, message="3 mirrored pairs")

        assert await cli(gw, "shadow-report", "classifier") == 0
        out = capsys.readouterr().out
        assert "shadow report: classifier -> green" in out
        assert "pairs compared" in out and "agreement" in out
        assert "confusion counts" in out and "setosa" in out
        assert "live latency p99" in out and "max |delta|" in out

        assert await cli(gw, "shadow-report", "classifier", "--json", "--window", "60s") == 0
        data = orjson.loads(capsys.readouterr().out)
        assert data["window"]["seconds"] == 60
        assert data["total"]["compared"] == 3
        assert data["total"]["elements"]["compared"] == 9

        assert await cli(gw, "shadow", "classifier", "--off", "--json") == 0
        assert orjson.loads(capsys.readouterr().out)["shadow"] is None
        assert gw.gateway.control.state("classifier").shadow is None


async def test_cli_errors(blue: ModelServer, green: ModelServer,
                          capsys: pytest.CaptureFixture[str]) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        assert await cli(gw, "shadow", "classifier", "--backend", "red") == 1
        assert "unknown backend 'red'" in capsys.readouterr().err
        assert await cli(gw, "shadow", "classifier", "--off", "--backend", "green") == 2
        assert "--off" in capsys.readouterr().err
        assert await cli(gw, "shadow", "classifier", "--sample", "5") == 2
        assert await cli(gw, "shadow-report", "nope") == 1
        assert "no route named 'nope'" in capsys.readouterr().err
        assert await cli(gw, "shadow-report", "classifier") == 0
        assert "no mirrored requests yet" in capsys.readouterr().out
        code = await asyncio.to_thread(main, ["shadow-report", "classifier", "--admin",
                                              gw.admin_url, "--token", "wrong-token"])
        assert code == 1
        assert "HTTP 401" in capsys.readouterr().err
