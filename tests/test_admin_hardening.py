"""Admin hardening (issue #11, item 7): token length, viewer/operator roles and the role in
audit events, bounded reasons on every endpoint that takes one, and the admin listen address
(loopback, TLS, or --insecure-admin). Over real sockets and a real `modelgate serve`."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.admin.auth import STATE_DIR_ENV, TOKEN_ENV
from gateway.admin.models import MAX_REASON
from gateway.cli import main
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.serve import admin_listen_problem, is_loopback
from tests.helpers import (
    TOKEN,
    ModelServer,
    RunningGateway,
    classifier_config,
    free_port,
    running_gateway,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
VIEWER = "viewer-token-0123456789"
OPERATOR = "alice-operator-token"


def config_with_roles(blue: ModelServer, green: ModelServer) -> dict[str, Any]:
    cfg = classifier_config(blue.url, green.url)
    cfg["admin"]["tokens"] = {"ci": {"token": VIEWER, "role": "viewer"}, "alice": OPERATOR}
    return cfg


def admin_routes(gw: RunningGateway) -> list[tuple[str, str]]:
    """(method, concrete path) of every /admin/ endpoint the admin app serves."""
    apps = [r.app for r in gw.gateway._runners if isinstance(r, web.AppRunner)]
    found = set()
    for route in apps[0].router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/admin/") and route.method != "HEAD":
            path = path.replace("{route}", "classifier").replace("{name}", "errors")
            found.add((route.method, path))
    return sorted(found)


# -- token length --------------------------------------------------------------------------------
@pytest.mark.parametrize("admin", [
    {"token": "x"},                                   # a 1-character token was accepted
    {"token": "x" * 15},
    {"tokens": {"ci": "y" * 15}},
    {"tokens": {"ci": {"token": "z" * 15, "role": "viewer"}}},
])
def test_tokens_shorter_than_16_are_config_errors(admin: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"admin": admin})
    assert caught.value.path.startswith(("admin.token", "admin.tokens.ci"))
    assert "at least 16 characters" in str(caught.value)


def test_token_forms_and_roles() -> None:
    config = parse_config({"admin": {"token": "a" * 16, "tokens": {
        "alice": "b" * 16, "ci": {"token": "c" * 16, "role": "viewer"},
        "bot": {"token": "d" * 16}}}})
    assert config.admin.secrets() == {"admin": "a" * 16, "alice": "b" * 16, "ci": "c" * 16,
                                      "bot": "d" * 16}
    assert config.admin.roles() == {"admin": "operator", "alice": "operator", "ci": "viewer",
                                    "bot": "operator"}
    assert parse_config({"admin": {"token": ""}}).admin.tokens == {}  # ${VAR:-}: not set here
    with pytest.raises(ConfigError, match=r"admin\.tokens\.ci\.role: "):
        parse_config({"admin": {"tokens": {"ci": {"token": "c" * 16, "role": "root"}}}})


def test_generated_and_test_tokens_are_long_enough() -> None:
    import secrets

    assert len(secrets.token_urlsafe(32)) >= 16 and len(TOKEN) >= 16


def test_serve_refuses_a_short_env_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n")
    monkeypatch.setenv(TOKEN_ENV, "x")
    assert main(["serve", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"modelgate: {TOKEN_ENV}: token must be a string of at least 16 characters"


# -- roles ---------------------------------------------------------------------------------------
async def test_viewer_reads_everything_and_changes_nothing(blue: ModelServer,
                                                           green: ModelServer) -> None:
    async with running_gateway(config_with_roles(blue, green)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url, timeout=30,
                              headers={"Authorization": f"Bearer {VIEWER}"}) as viewer:
        routes = admin_routes(gw)
        reads = [p for m, p in routes if m == "GET"]
        changes = [(m, p) for m, p in routes if m != "GET"]
        assert "/admin/dashboard/data" in reads and "/admin/events" in reads
        assert len(changes) >= 10
        before = (await gw.admin.get("/admin/routes/classifier")).json()
        for path in reads:
            r = await viewer.get(path)
            assert r.status_code not in (401, 403), (path, r.text)
        r = await viewer.get("/dashboard")
        assert r.status_code == 200
        for method, path in changes:
            r = await viewer.request(method, path, json={"backend": "green", "weight": 10,
                                                         "to": "green", "threshold": 0.9})
            assert r.status_code == 403, (method, path, r.text)
            body = r.json()
            assert body["error"] == "forbidden" and "viewer" in body["message"], body
        assert (await gw.admin.get("/admin/routes/classifier")).json() == before
        assert (await gw.admin.get("/admin/events")).json()["events"] == []


async def test_audit_events_carry_the_role(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(config_with_roles(blue, green)) as gw, \
            httpx.AsyncClient(base_url=gw.admin_url, timeout=30,
                              headers={"Authorization": f"Bearer {OPERATOR}"}) as alice:
        r = await alice.put("/admin/routes/classifier/canary",
                            json={"backend": "green", "weight": 10, "reason": "try it"})
        assert r.status_code == 200, r.text
        r = await gw.admin.post("/admin/routes/classifier/switch", json={"to": "green"})
        assert r.status_code == 200, r.text
        events = (await gw.admin.get("/admin/events")).json()["events"]
        assert [(e["actor"], e["role"], e["action"]) for e in events] == [
            ("alice", "operator", "canary"), ("admin", "operator", "switch")]
        # the controllers' own events have no role
        await gw.gateway.control.record("classifier", "rollout-controller", "note", None, None)
        last = (await gw.admin.get("/admin/events")).json()["events"][-1]
        assert last["actor"] == "rollout-controller" and last["role"] is None


def test_events_stored_before_roles_read_as_null() -> None:
    from gateway.state import Event

    old = {"id": 1, "time": 0.0, "route": "r", "actor": "admin", "action": "switch",
           "before": None, "after": None, "reason": None}
    assert Event.from_json(old).to_json()["role"] is None


# -- bounded reasons -----------------------------------------------------------------------------
async def test_every_reason_is_capped_at_1_kib(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(config_with_roles(blue, green)) as gw:
        document = (await gw.admin.get("/admin/openapi.json")).json()
        with_reason = []
        for path, item in document["paths"].items():
            for method, op in item.items():
                schema = (op.get("requestBody", {}).get("content", {})
                          .get("application/json", {}).get("schema"))
                if schema is None:
                    continue
                if "$ref" in schema:
                    schema = document["components"]["schemas"][schema["$ref"].split("/")[-1]]
                if "reason" in schema.get("properties", {}):
                    concrete = path.replace("{route}", "classifier").replace("{name}", "errors")
                    with_reason.append((method.upper(), concrete))
        assert len(with_reason) >= 11, with_reason  # canary, switch, rollback, shadow, ...
        before = (await gw.admin.get("/admin/routes/classifier")).json()
        for method, path in with_reason:
            for reason in ("r" * (MAX_REASON + 1), "r" * 900_000):
                r = await gw.admin.request(method, path, json={
                    "backend": "green", "weight": 10, "to": "green", "threshold": 0.9,
                    "rules": [], "reason": reason})
                assert r.status_code == 400, (method, path, r.status_code, r.text[:200])
                assert r.json()["message"].startswith("reason:"), r.text[:200]
        assert (await gw.admin.get("/admin/routes/classifier")).json() == before
        assert (await gw.admin.get("/admin/events")).json()["events"] == []
        r = await gw.admin.put("/admin/routes/classifier/canary",
                               json={"backend": "green", "weight": 10,
                                     "reason": "r" * MAX_REASON})
        assert r.status_code == 200, r.text


# -- the admin listen address --------------------------------------------------------------------
def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.9.8.7", "::1", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.1", "192.168.1.2", "example.com"):
        assert not is_loopback(host), host


def test_non_loopback_admin_needs_tls_or_insecure_admin() -> None:
    public = parse_config({"admin": {"listen": "0.0.0.0:8001"}})
    problem = admin_listen_problem(public)
    assert problem is not None
    assert "admin.listen" in problem and "admin.tls" in problem \
        and "--insecure-admin" in problem and "\n" not in problem
    assert admin_listen_problem(public, insecure_admin=True) is None
    tls = parse_config({"admin": {"listen": "0.0.0.0:8001", "tls": {"cert": "c.pem"}}})
    assert admin_listen_problem(tls) is None
    assert admin_listen_problem(parse_config({})) is None


def test_serve_refuses_a_public_admin_port(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("listen: 127.0.0.1:0\nadmin: {listen: '0.0.0.0:0'}\n")
    assert main(["serve", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modelgate: admin.listen 0.0.0.0:0 is not a loopback address") \
        and "--insecure-admin" in err


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env[STATE_DIR_ENV] = str(tmp_path / "state")
    env[TOKEN_ENV] = TOKEN
    return env


async def _serve_until_ready(tmp_path: Path, config: str, extra: list[str], url: str,
                             verify: Any) -> httpx.Response:
    """`modelgate serve` as a subprocess: wait for `url` to answer, GET /admin/routes with
    the token, then SIGTERM and wait for exit 0."""
    path = tmp_path / "gw.yaml"
    path.write_text(config)
    out, err = open(tmp_path / "stdout", "wb"), open(tmp_path / "stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path),
                             *extra], cwd=REPO, env=_env(tmp_path), stdout=out, stderr=err)
    try:
        async with httpx.AsyncClient(verify=verify, timeout=30) as client:
            async def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError((tmp_path / "stderr").read_text())
                try:
                    return (await client.get(url + "/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(up, timeout=30, interval=0.1, message="serve to be ready")
            answer = await client.get(url + "/admin/routes",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: proc.poll() is not None, timeout=30, interval=0.05,
                       message="serve to exit")
        assert proc.returncode == 0, (tmp_path / "stderr").read_text()
        return answer
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        out.close()
        err.close()


async def test_insecure_admin_serves_on_all_interfaces(tmp_path: Path) -> None:
    port = free_port()
    r = await _serve_until_ready(
        tmp_path, f"listen: 127.0.0.1:0\nadmin: {{listen: '0.0.0.0:{port}'}}\n",
        ["--insecure-admin"], f"http://127.0.0.1:{port}", True)
    assert r.status_code == 200, r.text


async def test_admin_over_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    context = ssl.create_default_context(cafile=str(cert))
    r = await _serve_until_ready(
        tmp_path, f"listen: 127.0.0.1:0\nadmin: {{listen: '0.0.0.0:{port}', "
                  f"tls: {{cert: '{cert}', key: '{key}'}}}}\n",
        [], f"https://127.0.0.1:{port}", context)
    assert r.status_code == 200, r.text
    assert "admin https://" in (tmp_path / "stdout").read_text()


async def test_rollout_plan_paths_are_bounded(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(config_with_roles(blue, green)) as gw:
        for body in ({"backend": "green", "health_path": "/" + "h" * 2000},
                     {"backend": "green", "smoke": {"path": "/" + "s" * 2000}}):
            r = await gw.admin.post("/admin/routes/classifier/rollout", json=body)
            assert r.status_code == 400, r.text[:200]
            assert "at most 1024 characters" in r.json()["message"], r.text[:200]
        assert (await gw.admin.get("/admin/events")).json()["events"] == []
