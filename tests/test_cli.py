"""The `modelgate` CLI: operator commands against a real gateway, check-config, and `serve`.

Operator commands run in-process through `gateway.cli.main` on a worker thread (the CLI's
httpx client is synchronous, and the gateway under test must keep serving on this loop).
`serve` runs as a real subprocess so its signal handling and drain are the real thing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
from aiohttp import web

from gateway.admin.auth import STATE_DIR_ENV, TOKEN_ENV, generate_token_file, token_file
from gateway.cli import main
from gateway.cli.core import change_summary, pct, rollout_text, state_line
from gateway.config import parse_config
from gateway.serve import NEEDS_SHARED_STORE, AdminToken, check_options, env_tokens
from tests.helpers import (
    INFER,
    TOKEN,
    ModelServer,
    RunningGateway,
    classifier_config,
    free_port,
    infer_body,
    refusing_port,
    running_gateway,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
ROW = [[6.1, 2.8, 4.7, 1.2]]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The operator's own token, admin URL or token files must not leak into these tests."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv("MODELGATE_ADMIN_URL", raising=False)
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def admin_args(gw: RunningGateway, token: str = TOKEN) -> list[str]:
    return ["--admin", gw.admin_url, "--token", token]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


# -- pure helpers ------------------------------------------------------------------------------
def test_change_summary() -> None:
    base = {"live": "blue", "previous": None, "canary": None, "canary_weight": 0.0,
            "shadow": None, "shadow_sample": 0.0, "version": 1}
    assert change_summary(base, {**base, "live": "green", "previous": "blue",
                                 "version": 2}) == "live blue→green"
    assert change_summary(base, {**base, "canary": "green",
                                 "canary_weight": 10.0}) == "canary none→green 10%"
    canary = {**base, "canary": "green", "canary_weight": 12.5}
    assert change_summary(canary, {**canary, "canary_weight": 0.0}) == "canary green 12.5%→none"
    assert change_summary(canary, {**base, "live": "green"}) == (
        "live blue→green, canary green 12.5%→none")
    assert change_summary(base, {**base, "shadow": "green", "shadow_sample": 100.0}) == (
        "shadow none→green 100%")
    assert change_summary(None, {"phase": "step", "weight": 5}) == "phase=step, weight=5"
    assert change_summary({"phase": "a"}, {"phase": "b"}) == "phase a→b"
    assert change_summary(None, None) == ""


def test_rollout_text_and_quiet_analysis() -> None:
    assert rollout_text({"rollout": None}) == "-"
    view = {"rollout": {"phase": "progressing", "step": 1, "steps": [10, 50, 100],
                        "backend": "green", "weight": 50}}
    assert rollout_text(view) == "progressing 2/3 green 50%"
    # A rollout event's gate analysis stays out of the table's change column.
    before = {"weight": 10, "analysis": {"gates": []}}
    after = {"weight": 50, "analysis": {"gates": [{"name": "max_error_rate"}]}}
    assert change_summary(before, after) == "weight 10→50"


def test_pct_and_state_line() -> None:
    assert pct(10.0) == "10%" and pct(0.25) == "0.25%" and pct(100) == "100%"
    view = {"live": "blue", "traffic": {"blue": 90.0, "green": 10.0}, "version": 3,
            "shadow": None}
    assert state_line(view) == "live blue; traffic blue 90%, green 10% (version 3)"


# -- operator commands against a real gateway --------------------------------------------------
async def test_operator_commands(blue: ModelServer, green: ModelServer,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        args = admin_args(gw)
        control = gw.gateway.control

        assert await cli("status", *args) == 0
        out = capsys.readouterr().out
        assert "classifier" in out and "blue" in out and "version" in out

        assert await cli("status", "classifier", *args) == 0
        out = capsys.readouterr().out
        assert blue.url in out and green.url in out
        assert "100%" in out and "sticky on header x-user-id" in out

        assert await cli("canary", "classifier", "--backend", "green", "--weight", "10",
                         "--reason", "try v2", *args) == 0
        assert "blue 90%, green 10%" in capsys.readouterr().out
        state = control.state("classifier")
        assert (state.canary, state.canary_weight) == ("green", 10.0)
        # Users land where `status` says: the split is live on the proxy.
        versions = set()
        for i in range(200):
            r = await gw.client.post(INFER, json=infer_body(ROW), headers={"x-user-id": f"u{i}"})
            assert r.status_code == 200
            versions.add(r.json()["model_version"])
        assert versions == {"v1", "v2"}

        assert await cli("status", "classifier", "--json", *args) == 0
        view = orjson.loads(capsys.readouterr().out)
        assert view["canary"] == {"backend": "green", "weight": 10.0}
        assert view["backends"]["green"]["url"] == green.url

        assert await cli("canary", "classifier", "--weight", "25", *args) == 0  # keeps green
        assert control.state("classifier").canary_weight == 25.0
        capsys.readouterr()

        assert await cli("switch", "classifier", "green", "--reason", "v2 is good", *args) == 0
        assert "switched: live green" in capsys.readouterr().out
        state = control.state("classifier")
        assert (state.live, state.previous, state.canary_weight) == ("green", "blue", 0.0)
        r = await gw.client.post(INFER, json=infer_body(ROW), headers={"x-user-id": "u1"})
        assert r.json()["model_version"] == "v2"

        assert await cli("rollback", "classifier", "--json", *args) == 0
        assert orjson.loads(capsys.readouterr().out)["live"] == "blue"
        assert control.state("classifier").live == "blue"

        assert await cli("events", *args) == 0
        out = capsys.readouterr().out
        for text in ("canary none→green 10%", "live blue→green", "live green→blue",
                     "try v2", "v2 is good", "rollback", "admin"):
            assert text in out, text

        assert await cli("events", "--route", "classifier", "--limit", "2", "--json",
                         *args) == 0
        found = orjson.loads(capsys.readouterr().out)["events"]
        assert [e["action"] for e in found] == ["switch", "rollback"]


async def test_operator_errors(blue: ModelServer, green: ModelServer,
                               capsys: pytest.CaptureFixture[str]) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        args = admin_args(gw)
        version = gw.gateway.control.state("classifier").version
        cases: list[tuple[list[str], str]] = [
            (["status", "nope", *args], "no route named 'nope' (HTTP 404)"),
            (["canary", "nope", "--backend", "green", "--weight", "5", *args], "HTTP 404"),
            (["canary", "classifier", "--backend", "green", "--weight", "150", *args],
             "weight: must be a number from 0 to 100"),
            (["canary", "classifier", "--backend", "purple", "--weight", "5", *args],
             "unknown backend 'purple'"),
            (["switch", "classifier", "purple", *args], "unknown backend 'purple'"),
            (["rollback", "classifier", *args], "nothing to roll back"),
            (["events", "--route", "nope", *args], "HTTP 404"),
            (["status", *admin_args(gw, token="wrong-token")], "invalid token (HTTP 401)"),
        ]
        for argv, expected in cases:
            assert await cli(*argv) == 1, argv
            captured = capsys.readouterr()
            assert expected in one_line(captured.err), (argv, captured.err)
            assert captured.out == ""
        assert gw.gateway.control.state("classifier").version == version  # nothing changed

        # No --token and no env: the CLI reads the token file for that admin port.
        port = gw.gateway.admin_address[1] if gw.gateway.admin_address else 0
        assert await cli("status", "--admin", gw.admin_url) == 1
        assert str(token_file(port)) in one_line(capsys.readouterr().err)
        token, _ = generate_token_file(port)
        gw.gateway.tokens["file"] = token
        assert await cli("status", "--admin", gw.admin_url, "--json") == 0
        assert orjson.loads(capsys.readouterr().out)["routes"][0]["name"] == "classifier"

    async with refusing_port() as nowhere:
        assert await cli("status", "--admin", nowhere, "--token", "x") == 1
    assert "cannot reach the admin API" in one_line(capsys.readouterr().err)


# -- check-config --------------------------------------------------------------------------------
def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "configs" / "demo.yaml")]) == 0
    assert "OK (2 routes)" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "routes:\n  - name: classifier\n    match: {path_prefix: /v2}\n    backends:\n"
        "      blue: {url: 'http://127.0.0.1:9001'}\n      green: {url: 'ftp://nope'}\n"
        "    live: blue\n"
    )
    assert main(["check-config", str(bad)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "routes[0].backends.green.url" in err

    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in one_line(capsys.readouterr().err)


# -- serve -----------------------------------------------------------------------------------------
def test_serve_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "gw.yaml"
    good.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n")
    assert main(["serve", "-c", str(good), "--workers", "2"]) == 2
    assert one_line(capsys.readouterr().err) == f"modelgate: {NEEDS_SHARED_STORE}"

    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: nowhere\n")
    assert main(["serve", "-c", str(bad)]) == 2
    assert "listen" in one_line(capsys.readouterr().err)

    config = parse_config({})
    assert check_options(config, 1, "aiohttp") is None
    assert check_options(config, 0, "aiohttp") is not None


def test_admin_token_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert env_tokens() == {}
    monkeypatch.setenv(TOKEN_ENV, "from-the-env-token")
    assert env_tokens() == {"admin": "from-the-env-token"}

    configured = {"ops": "configured-token"}
    assert AdminToken().ensure(configured, 1234) is None  # a configured token: no file
    tokens: dict[str, str] = {}
    holder = AdminToken()
    path = holder.ensure(tokens, 1234)
    assert path == token_file(1234) and path.read_text().strip() == tokens["admin"]
    assert path.stat().st_mode & 0o777 == 0o600
    holder.remove()
    assert not path.exists()


@contextmanager
def spawned(argv: list[str], env: dict[str, str],
            out_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m gateway ARGV` with output to files; killed and reaped whatever happens."""
    with open(out_dir / "stdout", "wb") as out, open(out_dir / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", *argv], cwd=REPO, env=env,
                                stdout=out, stderr=err)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


async def ready(client: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes],
                out_dir: Path) -> None:
    async def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {(out_dir / 'stderr').read_text()}")
        try:
            return (await client.get(url)).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(check, timeout=30, interval=0.1, message=f"{url} to be ready")


async def test_serve_drains_then_exits(tmp_path: Path, green: ModelServer) -> None:
    """SIGTERM: readyz turns 503, the request in flight still succeeds, then exit 0."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow_infer(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await release.wait()
        return web.json_response({"model_version": "held"})

    app = web.Application()
    app.router.add_post(INFER, slow_infer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    held_url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    port, admin_port = free_port(), free_port()
    config = classifier_config(held_url, green.url, drain_timeout="20s")
    config["listen"] = f"127.0.0.1:{port}"
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    path = tmp_path / "gw.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env[STATE_DIR_ENV] = str(tmp_path / "state")

    try:
        async with httpx.AsyncClient(timeout=30) as client:
            with spawned(["serve", "-c", str(path)], env, tmp_path) as proc:
                await ready(client, f"http://127.0.0.1:{admin_port}/readyz", proc, tmp_path)
                stdout = (tmp_path / "stdout").read_text()
                assert f"proxy http://127.0.0.1:{port}" in stdout
                assert str(token_file(admin_port)) in stdout
                token = token_file(admin_port).read_text().strip()
                routes = await client.get(f"http://127.0.0.1:{admin_port}/admin/routes",
                                          headers={"Authorization": f"Bearer {token}"})
                assert routes.status_code == 200

                in_flight = asyncio.create_task(client.post(
                    f"http://127.0.0.1:{port}{INFER}", json=infer_body(ROW)))
                await wait_for(arrived.is_set, timeout=10, message="the request to arrive")
                proc.send_signal(signal.SIGTERM)

                async def draining() -> bool:
                    r = await client.get(f"http://127.0.0.1:{admin_port}/readyz")
                    return r.status_code == 503 and r.json()["reason"] == "draining"

                await wait_for(draining, timeout=10, message="readyz to report draining")
                release.set()
                response = await in_flight
                assert response.status_code == 200
                assert response.json() == {"model_version": "held"}
                await wait_for(lambda: proc.poll() is not None, timeout=20,
                               message="serve to exit")
                assert proc.returncode == 0, (tmp_path / "stderr").read_text()
        assert "stopped" in (tmp_path / "stdout").read_text()
        assert not token_file(admin_port).exists()  # the generated token goes with it
    finally:
        release.set()
        await runner.cleanup()



def test_every_core_command_is_registered() -> None:
    from gateway.cli import build_parser
    from gateway.demo import launcher, model_server

    parser = build_parser()
    args = parser.parse_args(["model-server", "--version", "v2", "--port", "0"])
    assert args.func is model_server.run and args.version == "v2"
    args = parser.parse_args(["demo", "--port", "8100", "--admin-port", "8101", "--shadow"])
    assert args.func is launcher.run_demo and (args.port, args.admin_port) == (8100, 8101)
    args = parser.parse_args(["serve", "-c", "x.yaml", "--upstream", "fast", "--workers", "1"])
    assert (args.config, args.upstream, args.workers) == ("x.yaml", "fast", 1)
    for argv in (["status"], ["canary", "r", "--weight", "5"], ["switch", "r", "green"],
                 ["rollback", "r"], ["events"], ["check-config", "f"]):
        assert callable(parser.parse_args(argv).func)
