"""`modelgate rollout ...` against a real gateway under traffic (the CLI runs in a thread, as a
user's shell would run it beside the gateway)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.cli.rollout import render, step_bar
from tests.helpers import TOKEN, ModelServer, classifier_config, running_gateway
from tests.test_rollout_support import ROUTE, Traffic, events, rollout_view, wait_phase


def cli(gw_admin_url: str, *argv: str) -> list[str]:
    return ["rollout", *argv, "--admin", gw_admin_url, "--token", TOKEN]


async def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


async def test_pause_resume_promote_abort_from_the_cli_under_traffic(
    blue: ModelServer, green: ModelServer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        url = gw.admin_url
        async with Traffic(gw.client) as traffic:
            await traffic.more(20)
            code, out, err = await run(capsys, cli(
                url, "start", ROUTE, "--backend", "green", "--steps", "10,50,100",
                "--interval", "30s", "--check-interval", "100ms", "--max-error-rate", "0.05",
                "--min-requests", "5", "--failure-threshold", "3", "--reason", "cli test",
                "--json"))
            assert code == 0, err
            view = json.loads(out)
            assert (view["phase"], view["weight"], view["failure_threshold"]) == (
                "progressing", 10, 3)
            assert view["plan"]["gates"] == {"max_error_rate": 0.05, "min_requests": 5}

            code, out, err = await run(capsys, cli(url, "pause", ROUTE, "--json"))
            assert code == 0, err
            assert json.loads(out)["phase"] == "paused"
            await traffic.more(30)
            assert (await rollout_view(gw))["phase"] == "paused"  # the controller holds off

            code, out, err = await run(capsys, cli(url, "resume", ROUTE))
            assert code == 0, err
            assert "progressing" in out and "10%" in out  # the human view

            code, out, err = await run(capsys, cli(url, "promote", ROUTE, "--reason", "good"))
            assert code == 0, err
            assert "promoted" in out
            state = gw.gateway.control.state(ROUTE)
            assert (state.live, state.previous) == ("green", "blue")
            await traffic.more(30)

            # And back: a rollout of blue over green, aborted from the CLI.
            code, out, err = await run(capsys, cli(
                url, "start", ROUTE, "--backend", "blue", "--step", "25", "--interval", "30s",
                "--check-interval", "100ms", "--json"))
            assert code == 0, err
            assert json.loads(out)["steps"] == [25, 50, 75, 100]
            assert gw.gateway.control.state(ROUTE).canary_weight == 25
            await traffic.more(30)
            code, out, err = await run(capsys, cli(url, "abort", ROUTE, "--json"))
            assert code == 0, err
            assert json.loads(out)["phase"] == "aborted"
            state = gw.gateway.control.state(ROUTE)
            assert (state.live, state.canary_weight) == ("green", 0)
            await traffic.more(30)

            # Errors: one line on stderr, non-zero exit.
            code, out, err = await run(capsys, cli(url, "pause", ROUTE))
            assert code == 1 and "aborted" in err and "HTTP 409" in err
            code, out, err = await run(capsys, cli(url, "start", ROUTE, "--steps", "50,10"))
            assert code == 1 and "steps[1]" in err and "HTTP 400" in err
        assert all(r.status == 200 for r in traffic.results)
        actors = {(e["action"], e["actor"]) for e in await events(gw)}
        assert {("rollout_start", "admin"), ("rollout_pause", "admin"),
                ("rollout_resume", "admin"), ("rollout_promote", "admin"),
                ("rollout_abort", "admin")} <= actors


async def test_status_watch_follows_a_rollout_to_the_end(
    blue: ModelServer, green: ModelServer, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({
        "backend": "green", "steps": [20, 100], "interval": "300ms", "check_interval": "100ms",
        "window": "10s", "gates": {"max_error_rate": 0.05, "min_requests": 50}}))
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        url = gw.admin_url
        async with Traffic(gw.client) as traffic:
            await traffic.more(20)
            # Flags override the file's gates one by one.
            code, _, err = await run(capsys, cli(url, "start", ROUTE, "--plan-file",
                                                 str(plan_file), "--min-requests", "5"))
            assert code == 0, err
            code, out, err = await run(capsys, cli(url, "status", ROUTE, "--watch", "--json",
                                                   "--every", "0.1"))
            assert code == 0, err
            lines = [json.loads(line) for line in out.splitlines()]
            assert lines[-1]["phase"] == "promoted"
            assert lines[-1]["plan"]["gates"]["min_requests"] == 5
            assert {v["weight"] for v in lines} >= {20, 100}

            # The rich view, once more with a new rollout (blue over green), to the end.
            code, _, err = await run(capsys, cli(url, "start", ROUTE, "--backend", "blue",
                                                 "--steps", "50", "--interval", "200ms",
                                                 "--check-interval", "100ms",
                                                 "--window", "10s", "--min-requests", "5"))
            assert code == 0, err
            code, out, err = await run(capsys, cli(url, "status", ROUTE, "--watch",
                                                   "--every", "0.1"))
            assert code == 0, err
            assert "promoted" in out and "min_requests" in out and "weight" in out
        await wait_phase(gw, "promoted")
        assert traffic.count > 0


def test_render_shows_steps_weight_time_and_gates() -> None:
    from rich.console import Console

    view = {
        "route": "classifier", "kind": "canary", "backend": "green", "baseline": "blue",
        "phase": "progressing", "step": 1, "steps": [10, 50, 100], "weight": 50,
        "time_in_step": 12.5, "interval": 30, "failures": 1, "failure_threshold": 2,
        "reason": None,
        "last_check": {"verdict": "fail", "window": 12.5,
                       "candidate": {"requests": 400, "errors": 40},
                       "live": {"requests": 400, "errors": 0},
                       "gates": [{"name": "error_rate", "value": 0.1, "limit": 0.01,
                                  "verdict": "fail", "detail": "error_rate 0.1 > 0.01"},
                                 {"name": "min_requests", "value": 400.0, "limit": 100.0,
                                  "verdict": "pass", "detail": ""}]},
    }
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    console.print(render(view))
    text = console.export_text()
    assert "[50%]" in text and "12.5s of 30s bake" in text and "step 2/3" in text
    assert "error_rate 0.1 > 0.01" in text and "fail" in text
    assert "1 in a row (rollback at 2)" in text
    assert step_bar([10, 50, 100], 2, "promoted").plain == "10% ━ 50% ━ 100%  ✔ live"


async def test_switch_with_bake_from_the_cli(
    blue: ModelServer, green: ModelServer, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = classifier_config(blue.url, green.url, rollout={"check_interval": "100ms"})
    async with running_gateway(cfg) as gw:
        code, _, err = await run(capsys, ["switch", ROUTE, "green", "--bake", "30s",
                                          "--admin", gw.admin_url, "--token", TOKEN])
        assert code == 0, err
        view = await rollout_view(gw)
        assert (view["kind"], view["phase"], view["interval"]) == ("bake", "progressing", 30)
        code, out, err = await run(capsys, cli(gw.admin_url, "status", ROUTE))
        assert code == 0 and "bake of 'green' over 'blue'" in out
