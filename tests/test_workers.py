"""`modelgate serve --workers N`: the supervisor with fake workers (restart, crash budget,
signal forwarding, SIGKILL of stragglers, start failures, token files), then the real thing
end to end: N gateway processes on one port sharing a real Redis, one SIGKILLed and
restarted, a switch made through one worker's admin port seen on the other's, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.admin.auth import STATE_DIR_ENV, TOKEN_ENV, token_file
from gateway.cli import main
from gateway.cluster.workers import (
    SOCKETS_ENV,
    CrashBudget,
    Supervisor,
    WorkerSpec,
    admin_port_for,
    exit_text,
    worker_config,
)
from gateway.config import parse_config
from gateway.serve import NEEDS_SHARED_STORE, check_options
from tests.helpers import (
    INFER,
    ModelServer,
    classifier_config,
    infer_body,
    refusing_port,
    wait_for,
)
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
ROW = [[6.1, 2.8, 4.7, 1.2]]


# -- options and pure pieces ---------------------------------------------------------------------
def test_workers_need_a_shared_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    memory = parse_config({})
    assert check_options(memory, 2, "fast") == NEEDS_SHARED_STORE
    assert "store: redis://" in NEEDS_SHARED_STORE and "\n" not in NEEDS_SHARED_STORE
    assert check_options(parse_config({"store": "redis://127.0.0.1:1/0"}), 4, "fast") is None
    assert check_options(memory, 1, "fast") is None

    path = tmp_path / "gw.yaml"
    path.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n")
    assert main(["serve", "-c", str(path), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "store: redis://" in err


def test_admin_port_shift_and_worker_config() -> None:
    config = parse_config({"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:8101"}})
    assert [admin_port_for(config, i) for i in range(3)] == [8101, 8102, 8103]
    shifted = worker_config(config, 2, [("127.0.0.1", 4242)])
    assert shifted.admin.listen == ("127.0.0.1", 8103)
    assert shifted.listen == (("127.0.0.1", 4242),)
    any_port = parse_config({"admin": {"listen": "127.0.0.1:0"}})
    assert admin_port_for(any_port, 3) == 0  # 0 stays "any free port"


def test_worker_spec_round_trip() -> None:
    spec = WorkerSpec(listen=(("127.0.0.1", 8000),), ready_fd=7, socket_fds=(9,))
    assert WorkerSpec.from_json(spec.to_json()) == spec
    for bad in ("", "{}", '{"listen": [["h"]]}', "[1]"):
        with pytest.raises(ValueError, match="--worker-spec"):
            WorkerSpec.from_json(bad)


def test_crash_budget_backs_off_then_gives_up() -> None:
    now = [0.0]
    budget = CrashBudget(limit=5, window=60, first=0.5, cap=4, clock=lambda: now[0])
    delays = []
    for _ in range(5):
        delays.append(budget.crash())
        now[0] += 1
    assert delays == [0.5, 1, 2, 4, 4]
    assert budget.crash() is None  # the 6th within 60 s
    now[0] += 120  # a quiet minute later the budget is whole again
    assert budget.crash() == 0.5


def test_exit_text() -> None:
    assert exit_text(3) == "exited with code 3"
    assert exit_text(-signal.SIGKILL) == "was killed by SIGKILL"


# -- the supervisor with fake workers ------------------------------------------------------------
FAKE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path

    index, spec = int(sys.argv[1]), json.loads(sys.argv[2])
    out = Path(os.environ["FAKE_DIR"])
    mode = os.environ.get(f"FAKE_MODE_{index}", "serve")
    starts = out / f"starts-{index}"
    n = int(starts.read_text()) + 1 if starts.exists() else 1
    starts.write_text(str(n))
    fd = spec["ready_fd"]
    if mode == "fail":
        os.write(fd, json.dumps({"error": "cannot listen: fake trouble"}).encode() + b"\\n")
        sys.exit(1)
    if mode == "die-early":
        sys.exit(4)
    terms = []
    def on_term(sig, frame):
        terms.append(sig)
        with open(out / f"signals-{index}", "a") as f:
            f.write(signal.Signals(sig).name + "\\n")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    os.write(fd, json.dumps({"ready": True, "proxy": "http://127.0.0.1:1",
                             "admin": f"http://127.0.0.1:{50000 + index}",
                             "admin_port": 50000 + index}).encode() + b"\\n")
    os.close(fd)
    if mode == "crash" or (mode == "crash-once" and n == 1):
        sys.exit(3)
    need = {"serve": 1, "crash-once": 1, "two-signals": 2}.get(mode, 10**9)  # "stubborn": never
    while len(terms) < need:
        time.sleep(0.01)
    sys.exit(0)
""")


class FakeSignals:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    async def wait(self) -> str:
        return await self.queue.get()

    def send(self, name: str = "SIGTERM") -> None:
        self.queue.put_nowait(name)


def fake_supervisor(tmp_path: Path, count: int, modes: dict[int, str] | None = None, *,
                    budget: CrashBudget | None = None, drain: str = "5s",
                    token: str | None = "fake-token") -> Supervisor:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["FAKE_DIR"] = str(tmp_path)
    env[STATE_DIR_ENV] = str(tmp_path / "state")
    for index, mode in (modes or {}).items():
        env[f"FAKE_MODE_{index}"] = mode
    if token:
        env[TOKEN_ENV] = token
    config = parse_config({"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
                           "drain_timeout": drain})

    def command(index: int, spec: WorkerSpec) -> list[str]:
        return [sys.executable, str(script), str(index), spec.to_json()]

    return Supervisor(config, count, command, env=env,
                      budget=budget or CrashBudget(first=0.01, cap=0.05), stop_margin=0.5)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def test_supervisor_ready_line_tokens_and_sigterm(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    signals = FakeSignals()
    supervisor = fake_supervisor(tmp_path, 3, token=None)
    run = asyncio.create_task(supervisor.run(signals))
    await wait_for(lambda: "modelgate ready" in capsys.readouterr().out or run.done(),
                   timeout=20, message="the ready line")
    assert not run.done()
    # One generated token, in the CLI's file for every worker's admin port.
    token = supervisor.token
    assert token
    for index in range(3):
        path = token_file(50000 + index)
        assert path.read_text().strip() == token and path.stat().st_mode & 0o777 == 0o600
    assert supervisor.env[TOKEN_ENV] == token  # what every worker was started with
    assert "http://127.0.0.1:50000 http://127.0.0.1:50001 http://127.0.0.1:50002" \
        in supervisor.ready_line()

    signals.send("SIGTERM")
    assert await asyncio.wait_for(run, 20) == 0
    for index in range(3):
        assert lines(tmp_path / f"signals-{index}") == ["SIGTERM"]  # forwarded once
        assert not token_file(50000 + index).exists()
    assert all(w.proc is not None and w.proc.returncode == 0 for w in supervisor.workers)


async def test_supervisor_keeps_a_configured_token(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    signals = FakeSignals()
    supervisor = fake_supervisor(tmp_path, 2, token="t" * 20)
    assert supervisor.token is None
    run = asyncio.create_task(supervisor.run(signals))
    await wait_for(supervisor._ready.is_set, timeout=20, message="ready")
    assert not token_file(50000).exists()
    signals.send("SIGINT")
    assert await asyncio.wait_for(run, 20) == 0
    assert lines(tmp_path / "signals-0") == ["SIGINT"]  # the signal received is forwarded


async def test_a_crashed_worker_is_restarted(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    signals = FakeSignals()
    supervisor = fake_supervisor(tmp_path, 2, {1: "crash-once"})
    run = asyncio.create_task(supervisor.run(signals))
    await wait_for(lambda: lines(tmp_path / "starts-1") == ["2"] and supervisor.workers[1].running
                   and supervisor._ready.is_set(), timeout=20, message="worker 1 restarted")
    err = capsys.readouterr().err
    assert "worker 1 (pid" in err and "exited with code 3; restarting it in" in err
    signals.send()
    assert await asyncio.wait_for(run, 20) == 0
    assert lines(tmp_path / "starts-0") == ["1"]


async def test_workers_that_keep_crashing_stop_the_supervisor(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signals = FakeSignals()
    budget = CrashBudget(limit=3, window=60, first=0.01, cap=0.02)
    supervisor = fake_supervisor(tmp_path, 2, {0: "crash"}, budget=budget)
    assert await asyncio.wait_for(supervisor.run(signals), 30) == 1
    assert lines(tmp_path / "starts-0") == ["4"]  # the first start and 3 restarts
    assert not supervisor.workers[1].running  # the healthy one was stopped too
    err = capsys.readouterr().err
    assert "workers keep crashing (more than 3 exits in 60s), giving up" in err


@pytest.mark.parametrize("mode, message", [
    ("fail", "modelgate: worker 1: cannot listen: fake trouble"),
    ("die-early", "modelgate: worker 1: exited with code 4 before it was ready"),
])
async def test_a_worker_that_cannot_start_stops_everything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, message: str) -> None:
    supervisor = fake_supervisor(tmp_path, 2, {1: mode})
    assert await asyncio.wait_for(supervisor.run(FakeSignals()), 30) == 1
    err = capsys.readouterr().err
    assert message in err.splitlines()
    assert lines(tmp_path / "starts-1") == ["1"]  # not retried: the config is at fault
    await wait_for(lambda: not supervisor.workers[0].running, timeout=10, message="worker 0 gone")


async def test_second_signal_is_forwarded_and_stragglers_are_killed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signals = FakeSignals()
    supervisor = fake_supervisor(tmp_path, 2, {0: "two-signals", 1: "stubborn"}, drain="0.5s")
    run = asyncio.create_task(supervisor.run(signals))
    await wait_for(supervisor._ready.is_set, timeout=20, message="ready")
    signals.send("SIGTERM")
    await wait_for(lambda: lines(tmp_path / "signals-1") == ["SIGTERM"], timeout=10,
                   message="the first SIGTERM")
    signals.send("SIGTERM")
    assert await asyncio.wait_for(run, 20) == 0
    assert lines(tmp_path / "signals-0") == ["SIGTERM", "SIGTERM"]
    assert supervisor.workers[0].proc and supervisor.workers[0].proc.returncode == 0
    assert supervisor.workers[1].proc and supervisor.workers[1].proc.returncode == -9
    err = capsys.readouterr().err
    assert "worker 1 (pid" in err and "still running after 1s: SIGKILL" in err


# -- the real thing: gateway workers on a real Redis ---------------------------------------------
def consecutive_free_ports(count: int) -> int:
    """A port p such that p … p+count-1 are free right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            held = []
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise AssertionError("no run of free ports")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (TOKEN_ENV, "MODELGATE_ADMIN_URL", SOCKETS_ENV)}
    env[STATE_DIR_ENV] = str(tmp_path / "state")
    env.update(extra)
    return env


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def serve_workers(tmp_path: Path, config: dict[str, Any], workers: int,
                  env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`modelgate serve --workers N`; on the way out the supervisor and every worker it had
    are killed and reaped whatever happened."""
    path = tmp_path / "gw.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    argv = [sys.executable, "-m", "gateway", "serve", "-c", str(path), "--workers",
            str(workers), "--log-format", "text", "--log-level", "warning"]
    seen: set[int] = set()
    with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err)
        proc.seen = seen  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            seen.update(children(proc.pid))
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            for pid in seen:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


async def wait_ready_line(proc: subprocess.Popen[bytes], tmp_path: Path,
                          timeout: float = 60) -> str:
    def check() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: "
                                 f"{(tmp_path / 'stderr').read_text()}")
        for line in (tmp_path / "stdout").read_text().splitlines():
            if line.startswith("modelgate ready:"):
                return line
        return None

    return str(await wait_for(check, timeout=timeout, interval=0.05,
                              message="the supervisor's ready line"))


async def requests_by_worker(client: httpx.AsyncClient, admin_ports: list[int],
                             token: str) -> list[float]:
    """Each worker's count of answered requests, from its own /metrics."""
    counts = []
    for port in admin_ports:
        r = await client.get(f"http://127.0.0.1:{port}/metrics",
                             headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        counts.append(sum(float(m) for m in re.findall(
            r'^modelgate_requests_total\{[^}]*route="classifier"[^}]*\} (\S+)$', r.text,
            re.M)))
    return counts


async def infer_new_connection(port: int) -> httpx.Response:
    # A new connection each time, so the kernel spreads them across the workers.
    async with httpx.AsyncClient(timeout=10) as fresh:
        return await fresh.post(f"http://127.0.0.1:{port}{INFER}", json=infer_body(ROW),
                                headers={"x-user-id": "alice"})


def worker_config_file(blue: ModelServer, green: ModelServer, redis: RedisServer, port: int,
                       admin_port: int) -> dict[str, Any]:
    config = classifier_config(blue.url, green.url, store=redis.url, drain_timeout="5s")
    config["listen"] = f"127.0.0.1:{port}"
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    return config


async def test_serve_workers_end_to_end(tmp_path: Path, blue: ModelServer, green: ModelServer,
                                        redis_server: RedisServer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))  # where token_file() looks
    port, admin = consecutive_free_ports(1), consecutive_free_ports(2)
    config = worker_config_file(blue, green, redis_server, port, admin)
    admins = [admin, admin + 1]
    async with httpx.AsyncClient(timeout=10) as client:
        with serve_workers(tmp_path, config, 2, clean_env(tmp_path)) as proc:
            line = await wait_ready_line(proc, tmp_path)
            assert f"proxy http://127.0.0.1:{port}" in line
            assert f"admin http://127.0.0.1:{admin} http://127.0.0.1:{admin + 1}" in line
            token = token_file(admin).read_text().strip()
            assert token_file(admin + 1).read_text().strip() == token  # one token, two files
            workers = children(proc.pid)
            assert len(workers) == 2

            # One port, both workers answer: each one's own /metrics counts some requests.
            async def both_served() -> bool:
                r = await infer_new_connection(port)
                assert r.status_code == 200 and r.json()["model_version"] == "v1"
                return all(n > 0 for n in await requests_by_worker(client, admins, token))

            await wait_for(both_served, timeout=20, interval=0,
                           message="requests on both workers")

            # A switch through worker 0's admin port is seen on worker 1's (cluster-wide).
            auth = {"Authorization": f"Bearer {token}"}
            r = await client.post(f"http://127.0.0.1:{admin}/admin/routes/classifier/switch",
                                  json={"to": "green", "force": True}, headers=auth)
            assert r.status_code == 200, r.text

            async def follows() -> bool:
                r = await client.get(f"http://127.0.0.1:{admin + 1}/admin/routes/classifier",
                                     headers=auth)
                return bool(r.json()["live"] == "green")

            await wait_for(follows, timeout=10, message="worker 1 to see the switch")

            # SIGKILL one worker: traffic keeps flowing, the supervisor starts a new one.
            os.kill(workers[0], signal.SIGKILL)
            # Until it is gone its listening socket may still take a connection, then reset it.
            await wait_for(lambda: not alive(workers[0]), timeout=10, message="worker 0 gone")
            for _ in range(10):
                r = await infer_new_connection(port)
                assert r.status_code == 200
            await wait_for(lambda: "worker 0 restarted" in (tmp_path / "stderr").read_text(),
                           timeout=30, interval=0.05, message="worker 0 to be restarted")
            proc.seen.update(children(proc.pid))  # type: ignore[attr-defined]
            assert len(children(proc.pid)) == 2 and workers[0] not in children(proc.pid)
            r = await client.get(f"http://127.0.0.1:{admin}/admin/routes/classifier",
                                 headers=auth)
            assert r.json()["live"] == "green"  # the new worker 0 reads the shared state
            assert (await infer_new_connection(port)).json()["model_version"] == "v2"

            everyone = set(children(proc.pid)) | {workers[1]}
            proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: proc.poll() is not None, timeout=30, interval=0.05,
                           message="the supervisor to exit after SIGTERM")
            assert proc.returncode == 0, (tmp_path / "stderr").read_text()
            assert not any(alive(pid) for pid in everyone)
        stdout = (tmp_path / "stdout").read_text()
        assert "modelgate worker 1: stopped" in stdout and "modelgate: stopped" in stdout
        assert not token_file(admin).exists() and not token_file(admin + 1).exists()


async def test_serve_workers_on_an_inherited_socket(
        tmp_path: Path, blue: ModelServer, green: ModelServer,
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-Linux way (one listening socket, inherited), forced here: both workers serve;
    workers whose supervisor was SIGKILLed stop by themselves."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    admin = consecutive_free_ports(2)
    config = worker_config_file(blue, green, redis_server, 0, admin)
    env = clean_env(tmp_path, **{SOCKETS_ENV: "inherit", TOKEN_ENV: "w" * 24})
    async with httpx.AsyncClient(timeout=10) as client:
        with serve_workers(tmp_path, config, 2, env) as proc:
            line = await wait_ready_line(proc, tmp_path)
            port = int(re.search(r"proxy http://127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
            assert port != 0
            assert not token_file(admin).exists()  # the token came from the environment

            async def both_served() -> bool:
                assert (await infer_new_connection(port)).status_code == 200
                counts = await requests_by_worker(client, [admin, admin + 1], "w" * 24)
                return all(n > 0 for n in counts)

            await wait_for(both_served, timeout=20, interval=0,
                           message="requests on both workers")
            # A supervisor that is killed outright leaves no orphans: the workers notice.
            workers = children(proc.pid)
            proc.seen.update(workers)  # type: ignore[attr-defined]
            assert len(workers) == 2
            proc.kill()
            proc.wait(timeout=10)
            await wait_for(lambda: not any(alive(pid) for pid in workers), timeout=15,
                           interval=0.05, message="the orphaned workers to stop")


async def test_a_worker_that_cannot_listen_fails_the_start(
        tmp_path: Path, blue: ModelServer, green: ModelServer,
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    admin = consecutive_free_ports(2)
    config = worker_config_file(blue, green, redis_server, 0, admin)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", admin + 1))  # worker 1's admin port
        taken.listen()
        with serve_workers(tmp_path, config, 2, clean_env(tmp_path)) as proc:
            await wait_for(lambda: proc.poll() is not None, timeout=60, interval=0.05,
                           message="the supervisor to give up")
            assert proc.returncode == 1
            err = (tmp_path / "stderr").read_text()
            assert "modelgate: worker 1: cannot listen:" in err, err
            assert "modelgate ready" not in (tmp_path / "stdout").read_text()
            assert not token_file(admin).exists()


def test_the_supervisor_refuses_a_port_someone_else_holds(tmp_path: Path) -> None:
    """SO_REUSEPORT would let our workers join another program's listeners: refuse."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "gw.yaml"
        path.write_text(json.dumps({"listen": f"127.0.0.1:{port}",
                                    "admin": {"listen": "127.0.0.1:0"},
                                    "store": "redis://127.0.0.1:1/0"}))
        done = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path),
                               "--workers", "2"], cwd=REPO, env=clean_env(tmp_path),
                              capture_output=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr.decode()


async def test_serve_with_an_unreachable_store_says_so_in_one_line(tmp_path: Path) -> None:
    async with refusing_port() as url:
        path = tmp_path / "gw.yaml"
        path.write_text(json.dumps({"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
                                    "store": url.replace("http://", "redis://") + "/0"}))
        done = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                              cwd=REPO, env=clean_env(tmp_path), capture_output=True,
                              timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "cannot start: redis store" in err and "Traceback" not in err
