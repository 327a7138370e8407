"""`modelgate demo --store redis --replicas 2`: two gateway processes sharing a Redis the demo
started and the two model servers; a change made through one replica's admin port is seen on
the other's; SIGTERM stops everything (replicas, model servers, redis-server)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.admin.auth import STATE_DIR_ENV, TOKEN_ENV, token_file
from gateway.cli import build_parser, main
from gateway.demo.launcher import (
    DEFAULT_ADMIN_PORT,
    REPLICA_ADMIN_PORT,
    demo_env,
    demo_problem,
    load_demo_config,
)
from tests.helpers import INFER, infer_body, wait_for
from tests.test_workers import alive, children, consecutive_free_ports

REPO = Path(__file__).resolve().parents[1]


def demo_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["demo", *argv])


def test_replica_ports_and_store_checks() -> None:
    args = demo_args()
    assert demo_problem(args) is None
    assert (args.port, args.admin_port, args.replicas) == (8000, DEFAULT_ADMIN_PORT, 1)

    args = demo_args("--replicas", "2", "--store", "redis")
    assert demo_problem(args) is None
    assert (args.port, args.admin_port) == (8000, REPLICA_ADMIN_PORT)  # 8000-8001, 8100-8101

    problem = demo_problem(demo_args("--replicas", "2"))
    assert problem is not None and "--store redis" in problem
    problem = demo_problem(demo_args("--replicas", "3", "--store", "redis",
                                     "--admin-port", "8002"))
    assert problem is not None and "overlap" in problem
    problem = demo_problem(demo_args("--replicas", "2", "--store", "redis", "--port", "0"))
    assert problem is not None and "not 0" in problem
    problem = demo_problem(demo_args("--store", "mysql://x"))
    assert problem is not None and "--store" in problem
    assert demo_problem(demo_args("--store", "redis://127.0.0.1:6379/0")) is None


def test_demo_refuses_replicas_without_a_shared_store(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--store redis" in err


def test_demo_config_store_comes_from_the_environment() -> None:
    ports = {"blue": 9101, "green": 9102}
    assert load_demo_config(None, demo_env(8000, 8001, ports)).store == "memory"
    env = demo_env(8000, 8001, ports, "redis://127.0.0.1:6390/2")
    assert load_demo_config(None, env).store == "redis://127.0.0.1:6390/2"


def test_store_redis_without_redis_server_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["PATH"] = str(tmp_path)  # no redis-server here
    env[STATE_DIR_ENV] = str(tmp_path / "state")
    done = subprocess.run([sys.executable, "-m", "gateway", "demo", "--store", "redis",
                           "--port", "0", "--admin-port", "0"], cwd=REPO, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 1
    assert "--store redis needs redis-server on the PATH" in done.stderr.decode()


async def test_demo_two_replicas_share_redis(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    port, admin = consecutive_free_ports(2), consecutive_free_ports(2)
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "MODELGATE_ADMIN_URL")}
    env[STATE_DIR_ENV] = str(tmp_path / "state")
    argv = [sys.executable, "-m", "gateway", "demo", "--store", "redis", "--replicas", "2",
            "--port", str(port), "--admin-port", str(admin), "--log-level", "warning"]
    seen: set[int] = set()
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err)
    try:
        def running() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"demo exited {proc.returncode}: {stderr.read_text()}")
            return "modelgate demo is running" in stdout.read_text()

        await wait_for(running, timeout=60, interval=0.05, message="the demo to be ready")
        seen.update(children(proc.pid))
        assert len(seen) == 3  # redis-server and two `modelgate serve`
        printed = stdout.read_text()
        for url in (f"gateway http://127.0.0.1:{port}", f"gateway http://127.0.0.1:{port + 1}",
                    f"admin API http://127.0.0.1:{admin}",
                    f"admin API http://127.0.0.1:{admin + 1}",
                    f"modelgate status classifier --admin http://127.0.0.1:{admin + 1}"):
            assert url in printed, url
        token = token_file(admin).read_text().strip()
        assert token_file(admin + 1).read_text().strip() == token

        # The CLI switches through replica 0 …
        switched = subprocess.run(
            [sys.executable, "-m", "gateway", "switch", "classifier", "green", "--admin",
             f"http://127.0.0.1:{admin}"], cwd=REPO, env=env, capture_output=True, timeout=60)
        assert switched.returncode == 0, switched.stderr.decode()
        # … and replica 1 follows: its admin view, then its traffic.
        async with httpx.AsyncClient(timeout=10) as client:
            auth = {"Authorization": f"Bearer {token}"}

            async def follows() -> bool:
                r = await client.get(f"http://127.0.0.1:{admin + 1}/admin/routes/classifier",
                                     headers=auth)
                return bool(r.status_code == 200 and r.json()["live"] == "green")

            await wait_for(follows, timeout=10, message="replica 1 to see the switch")
            r = await client.post(f"http://127.0.0.1:{port + 1}{INFER}",
                                  json=infer_body([[6.1, 2.8, 4.7, 1.2]]),
                                  headers={"x-user-id": "alice"})
            assert r.status_code == 200 and r.json()["model_version"] == "v2"

        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: proc.poll() is not None, timeout=30, interval=0.05,
                       message="the demo to exit after SIGTERM")
        assert proc.returncode == 0, stderr.read_text()
        assert not any(alive(pid) for pid in seen)  # replicas and redis-server are gone
        text = stdout.read_text()
        assert "[replica 1] stopped" in text and "modelgate: demo stopped" in text
        assert not token_file(admin).exists() and not token_file(admin + 1).exists()
    finally:
        seen.update(children(proc.pid))
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
