"""`modelgate demo` as the operator runs it: a subprocess on free ports, driven over HTTP and
through the CLI (also a subprocess), stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admin.auth import STATE_DIR_ENV, TOKEN_ENV
from gateway.demo.launcher import demo_config_file, demo_env, instructions, load_demo_config
from tests.helpers import INFER, free_port, infer_body, wait_for

REPO = Path(__file__).resolve().parents[1]


def cli_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (TOKEN_ENV, "MODELGATE_ADMIN_URL")}
    env[STATE_DIR_ENV] = str(state_dir)
    return env


@contextmanager
def demo_process(tmp_path: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], int,
                                                                 int]]:
    """The demo on free ports, output to files; killed and reaped whatever happens."""
    port, admin_port = free_port(), free_port()
    argv = [sys.executable, "-m", "gateway", "demo", "--port", str(port),
            "--admin-port", str(admin_port), *extra]
    with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(tmp_path / "state"), stdout=out,
                                stderr=err)
        try:
            yield proc, port, admin_port
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


async def wait_ready(client: httpx.AsyncClient, admin_port: int, proc: subprocess.Popen[bytes],
                     tmp_path: Path) -> None:
    async def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"demo exited {proc.returncode}: {(tmp_path / 'stderr').read_text()}")
        try:
            r = await client.get(f"http://127.0.0.1:{admin_port}/readyz")
        except httpx.TransportError:
            return False
        return r.status_code == 200

    await wait_for(check, timeout=30, interval=0.1, message="the demo to be ready")


async def stop_demo(proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: proc.poll() is not None, timeout=20, interval=0.05,
                   message="the demo to exit after SIGTERM")
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()


async def test_demo_end_to_end(tmp_path: Path) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        with demo_process(tmp_path) as (proc, port, admin_port):
            await wait_ready(client, admin_port, proc, tmp_path)
            token_path = tmp_path / "state" / f"admin-token-{admin_port}"
            assert token_path.stat().st_mode & 0o777 == 0o600
            token = token_path.read_text().strip()

            printed = (tmp_path / "stdout").read_text()
            admin = f"http://127.0.0.1:{admin_port}"
            for line in (f"http://127.0.0.1:{port}{INFER}", "-H 'x-user-id: alice'",
                         f"modelgate status --admin {admin}",
                         f"modelgate canary classifier --backend green --weight 10 --admin {admin}",
                         f"modelgate switch classifier green --admin {admin}",
                         f"modelgate rollback classifier --admin {admin}",
                         f"modelgate events --admin {admin}", f"{admin}/dashboard",
                         str(token_path)):
                assert line in printed, line

            r = await client.post(f"http://127.0.0.1:{port}{INFER}",
                                  json=infer_body([[6.1, 2.8, 4.7, 1.2]]),
                                  headers={"x-user-id": "alice"})
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == "v1"

            r = await client.get(f"{admin}/admin/routes/classifier",
                                 headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
            view = r.json()
            assert view["live"] == "blue" and view["sticky"] == {"header": "x-user-id"}
            for name in ("blue", "green"):
                url = view["backends"][name]["url"]
                assert url.startswith("http://127.0.0.1:")
                health = await client.get(f"{url}/v2/health/ready")  # the URL is the real one
                assert health.status_code == 200

            # The demo's streaming chat route: TTFT p50/p99 per backend on the dashboard.
            assert f"http://127.0.0.1:{port}/v1/chat/completions" in printed
            auth = {"Authorization": f"Bearer {token}"}
            r = await client.put(f"{admin}/admin/routes/chat/canary", headers=auth,
                                 json={"backend": "green", "weight": 50})
            assert r.status_code == 200, r.text
            for i in range(8):
                r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                      headers={"x-user-id": f"user-{i}"}, json={
                                          "stream": True, "stream_delay_ms": 1,
                                          "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")

            async def ttft() -> dict[str, Any] | None:
                r = await client.get(f"{admin}/admin/dashboard/data", headers=auth,
                                     params={"route": "chat"})
                summary: dict[str, Any] = r.json()["routes"][0]["summary"]
                seen = all(summary[b]["ttft_p99_ms"] is not None for b in ("blue", "green"))
                return summary if seen else None

            summary = await wait_for(ttft, timeout=10, interval=0.2, message="TTFT per backend")
            assert all(0 < summary[b]["ttft_p50_ms"] <= summary[b]["ttft_p99_ms"]
                       for b in ("blue", "green"))

            # The CLI, as a separate process, finds the generated token by the admin port.
            status = subprocess.run(
                [sys.executable, "-m", "gateway", "status", "--admin", admin],
                cwd=REPO, env=cli_env(tmp_path / "state"), capture_output=True, timeout=60,
            )
            assert status.returncode == 0, status.stderr.decode()
            assert "classifier" in status.stdout.decode()

            await stop_demo(proc, tmp_path)
        assert "demo stopped" in (tmp_path / "stdout").read_text()
        assert not token_path.exists()


async def test_demo_shadow_flag(tmp_path: Path) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        with demo_process(tmp_path, "--shadow") as (proc, _port, admin_port):
            await wait_ready(client, admin_port, proc, tmp_path)
            token = (tmp_path / "state" / f"admin-token-{admin_port}").read_text().strip()
            auth = {"Authorization": f"Bearer {token}"}
            admin = f"http://127.0.0.1:{admin_port}"
            view = (await client.get(f"{admin}/admin/routes/classifier", headers=auth)).json()
            assert view["shadow"] == {"backend": "green", "sample": 100.0}
            events = (await client.get(f"{admin}/admin/events", headers=auth)).json()["events"]
            assert ("demo", "shadow") in [(e["actor"], e["action"]) for e in events]
            await stop_demo(proc, tmp_path)


def test_demo_config_is_shipped_with_the_package() -> None:
    with demo_config_file() as path:
        assert path == REPO / "configs" / "demo.yaml"
    packaged = resources.files("gateway.demo").joinpath("demo.yaml").read_text()
    assert packaged == (REPO / "configs" / "demo.yaml").read_text()


def test_demo_env_fills_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELGATE_LISTEN", "0.0.0.0:1")  # the flags win over the shell
    env = demo_env(8100, 8101, {"blue": 9101, "green": 9102})
    config = load_demo_config(None, {**env, TOKEN_ENV: "t" * 16})
    assert config.listen == (("127.0.0.1", 8100),)
    assert config.admin.listen == ("127.0.0.1", 8101)
    assert config.admin.tokens == {"admin": "t" * 16}
    route = config.route("classifier")
    assert route is not None
    assert route.backends["green"].urls == ("http://127.0.0.1:9102",)


def test_instructions_name_the_admin_url_only_when_not_default() -> None:
    models = {"blue": "http://127.0.0.1:9001", "green": "http://127.0.0.1:9002"}
    text = instructions("http://127.0.0.1:8000", "http://127.0.0.1:8001", models, "env", False)
    assert "\n  modelgate status\n" in text and "--admin" not in text
    assert "http://127.0.0.1:8001/dashboard" in text
    text = instructions("http://127.0.0.1:8000", "http://127.0.0.1:9999", models, "env", True)
    assert "modelgate rollback classifier --admin http://127.0.0.1:9999" in text
    assert "shadow" in text


def model_ports_of(admin_port: int, token: str) -> dict[str, int]:
    r = httpx.get(f"http://127.0.0.1:{admin_port}/admin/routes/classifier",
                  headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    urls = {name: b["urls"][0] for name, b in r.json()["backends"].items()}
    return {name: int(url.rsplit(":", 1)[1].rstrip("/")) for name, url in urls.items()}


async def test_two_demos_side_by_side_and_chosen_model_ports(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Two demos at once both start (the second's model servers move to free ports), and
    MODELGATE_BLUE_PORT / MODELGATE_GREEN_PORT put them where asked."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    blue, green = free_port(), free_port()
    monkeypatch.setenv("MODELGATE_BLUE_PORT", str(blue))
    monkeypatch.setenv("MODELGATE_GREEN_PORT", str(green))
    async with httpx.AsyncClient(timeout=30) as client:
        with demo_process(first) as (proc_a, _, admin_a):
            await wait_ready(client, admin_a, proc_a, first)
            monkeypatch.delenv("MODELGATE_BLUE_PORT")
            monkeypatch.delenv("MODELGATE_GREEN_PORT")
            with demo_process(second) as (proc_b, _, admin_b):
                await wait_ready(client, admin_b, proc_b, second)
                ports_a = model_ports_of(admin_a, token_of(first, admin_a))
                ports_b = model_ports_of(admin_b, token_of(second, admin_b))
                assert ports_a == {"blue": blue, "green": green}
                assert not set(ports_a.values()) & set(ports_b.values())
                await stop_demo(proc_b, second)
            await stop_demo(proc_a, first)


def token_of(tmp_path: Path, admin_port: int) -> str:
    return (tmp_path / "state" / f"admin-token-{admin_port}").read_text().strip()


async def test_demo_refuses_a_taken_chosen_model_port(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("MODELGATE_BLUE_PORT", str(port))
        with demo_process(tmp_path) as (proc, _, _):
            await wait_for(lambda: proc.poll() is not None, timeout=30, interval=0.05,
                           message="the demo to give up")
            assert proc.returncode == 1
            err = (tmp_path / "stderr").read_text()
            assert f"MODELGATE_BLUE_PORT={port}" in err, err
