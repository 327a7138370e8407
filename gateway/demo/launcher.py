"""`modelgate demo`: two versions of the demo classifier behind one gateway, in one process.

blue (v1) and green (v2) model servers start first (on ``MODELGATE_BLUE_PORT`` /
``MODELGATE_GREEN_PORT`` when set, which must then be free; else on 9001/9002 when free, else
any free port, so two demos run side by side), then the gateway from configs/demo.yaml with
their ports filled in through those two variables. Ctrl-C or SIGTERM stops the gateway
(draining requests in flight) and then the model servers.

``--store redis://…`` keeps the routing state in that Redis (``MODELGATE_STORE``); ``--store
redis`` starts a throw-away redis-server (no persistence) on a free port and stops it at the
end. ``--replicas N`` (N > 1, needs one of those) runs N gateways as separate ``modelgate
serve`` processes sharing the store and the two model servers: replica i on proxy port
``--port`` + i and admin port ``--admin-port`` + i, where the admin ports start at 8100 by
default (8000, 8001 … are the proxies'). One generated admin token serves them all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.admin.auth import TOKEN_ENV
from gateway.config import GatewayConfig, load_config
from gateway.demo.model_server import start_model_server
from gateway.errors import AdminError, ConfigError
from gateway.logs import add_log_arguments, setup_logging
from gateway.serve import (
    AdminToken,
    describe_addresses,
    env_tokens,
    run_async,
    stop_gracefully,
)
from gateway.signals import StopSignals

DEFAULT_PORT = 8000
DEFAULT_ADMIN_PORT = 8001
REPLICA_ADMIN_PORT = 8100  # --replicas > 1: proxies on 8000, 8001 …, admin APIs on 8100, 8101 …
STOP_MARGIN = 5.0
START_TIMEOUT = 60.0
MODEL_PORTS = {"blue": ("v1", 9001), "green": ("v2", 9002)}
DEMO_ROUTE = "classifier"
INFER_PATH = "/v2/models/classifier/infer"
SAMPLE_BODY = (
    '{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP32",'
    '"data":[[6.1,2.8,4.7,1.2]]}]}'
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="gateway (proxy) port on 127.0.0.1 (default %(default)s)")
    parser.add_argument("--admin-port", type=int, default=None,
                        help=f"admin API port on 127.0.0.1 (default {DEFAULT_ADMIN_PORT}; "
                             f"{REPLICA_ADMIN_PORT} with --replicas > 1)")
    parser.add_argument("--store", default=None, metavar="memory|redis|redis://…",
                        help="where routing state lives: memory (default), redis (start a "
                             "local redis-server for the demo) or a redis:// URL")
    parser.add_argument("--replicas", type=int, default=1,
                        help="gateway processes sharing the store and the model servers: "
                             "replica i on --port + i and --admin-port + i (default 1)")
    parser.add_argument("--shadow", action="store_true",
                        help="also mirror all traffic to green (shadow mode) from the start")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="gateway config (default: configs/demo.yaml)")
    add_log_arguments(parser, default_format="text")


@contextlib.contextmanager
def demo_config_file(explicit: str | None = None) -> Iterator[Path]:
    """configs/demo.yaml of a source checkout, else the copy shipped inside the package."""
    if explicit is not None:
        yield Path(explicit)
        return
    checkout = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    if checkout.is_file():
        yield checkout
        return
    with resources.as_file(resources.files("gateway.demo").joinpath("demo.yaml")) as packaged:
        yield packaged


def demo_env(port: int, admin_port: int, model_ports: dict[str, int],
             store: str = "memory") -> dict[str, str]:
    """The environment demo.yaml is read with: ours on top of the process's."""
    env = dict(os.environ)
    env["MODELGATE_LISTEN"] = f"127.0.0.1:{port}"
    env["MODELGATE_ADMIN_LISTEN"] = f"127.0.0.1:{admin_port}"
    env["MODELGATE_STORE"] = store
    for name, bound in model_ports.items():
        env[f"MODELGATE_{name.upper()}_PORT"] = str(bound)
    return env


def load_demo_config(explicit: str | None, env: dict[str, str]) -> GatewayConfig:
    with demo_config_file(explicit) as path:
        return load_config(path, env=env)


CHAT_BODY = '{"stream": true, "messages": [{"role": "user", "content": "hello there"}]}'


def _curl(proxy_url: str) -> str:
    return (f"curl -s -H 'content-type: application/json' -H 'x-user-id: alice' "
            f"-d {shlex.quote(SAMPLE_BODY)} {proxy_url}{INFER_PATH}")


def _model_lines(model_urls: dict[str, str], token_note: str, shadow: bool) -> list[str]:
    """The part of the banner every demo shape shares: model servers, token, shadow."""
    lines = [f"  {name:<10} {url}  (model {MODEL_PORTS[name][0]})"
             for name, url in model_urls.items()]
    lines.append(f"  token      {token_note}")
    if shadow:
        lines.append("  shadow     green receives a copy of all traffic (its answers are compared, "
                     "never returned)")
    return lines


def instructions(proxy_url: str, admin_url: str, model_urls: dict[str, str],
                 token_note: str, shadow: bool) -> str:
    """What the demo prints once everything is up: where things are, and lines to paste."""
    admin_flag = "" if admin_url == f"http://127.0.0.1:{DEFAULT_ADMIN_PORT}" else (
        f" --admin {admin_url}"
    )
    curl = _curl(proxy_url)
    lines = [
        "",
        "modelgate demo is running",
        f"  gateway    {proxy_url}  (route {DEMO_ROUTE}: {INFER_PATH}, sticky on x-user-id)",
        f"  admin API  {admin_url}",
        f"  dashboard  {admin_url}/dashboard",
    ]
    lines += _model_lines(model_urls, token_note, shadow)
    lines += [
        "",
        "Send a request:",
        f"  {curl}",
        "",
        "Stream a chat answer (route chat; time to first token per backend on the dashboard):",
        f"  curl -sN -H 'x-user-id: alice' -d '{CHAT_BODY}' {proxy_url}/v1/chat/completions",
        "",
        "Steer traffic (in another terminal, with the venv active):",
        f"  modelgate status{admin_flag}",
        f"  modelgate canary {DEMO_ROUTE} --backend green --weight 10{admin_flag}",
        f"  modelgate switch {DEMO_ROUTE} green{admin_flag}",
        f"  modelgate rollback {DEMO_ROUTE}{admin_flag}",
        f"  modelgate events{admin_flag}",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def model_port_var(name: str) -> str:
    return f"MODELGATE_{name.upper()}_PORT"


def chosen_model_port(name: str, env: Mapping[str, str]) -> int | None:
    """The port ``MODELGATE_<NAME>_PORT`` asks for (None: unset); ValueError if not a port."""
    raw = env.get(model_port_var(name), "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ValueError(f"{model_port_var(name)}: not a port: {raw!r}")
    return int(raw)


async def _start_model(version: str, preferred: int,
                       chosen: int | None = None) -> tuple[web.AppRunner, int]:
    """On the `chosen` port (from the environment; it must be free), else on the well-known
    port when it is free (handy for curl), else on any free port."""
    if chosen is not None:
        return await start_model_server(version, "127.0.0.1", chosen)
    try:
        return await start_model_server(version, "127.0.0.1", preferred)
    except OSError:
        return await start_model_server(version, "127.0.0.1", 0)


def demo_problem(args: argparse.Namespace) -> str | None:
    """Why these flags cannot run, or None; fills in the default admin port."""
    replicas = getattr(args, "replicas", 1)
    store = getattr(args, "store", None) or "memory"
    if args.admin_port is None:
        args.admin_port = DEFAULT_ADMIN_PORT if replicas == 1 else REPLICA_ADMIN_PORT
    if replicas < 1:
        return "--replicas must be at least 1"
    if store not in ("memory", "redis") and not store.startswith(("redis://", "rediss://",
                                                                  "unix://")):
        return f"--store must be memory, redis or a redis:// URL, got {store!r}"
    if replicas > 1 and store == "memory":
        return (f"--replicas {replicas} needs a shared store: add --store redis (starts a "
                f"local redis-server) or --store redis://HOST:PORT/DB")
    if replicas > 1:
        proxies = set(range(args.port, args.port + replicas))
        admins = set(range(args.admin_port, args.admin_port + replicas))
        if 0 in proxies | admins:
            return "--replicas > 1 needs fixed ports (not 0): replica i uses --port + i"
        if proxies & admins:
            return (f"proxy ports {args.port}-{args.port + replicas - 1} and admin ports "
                    f"{args.admin_port}-{args.admin_port + replicas - 1} overlap: pick "
                    f"--admin-port further away")
    return None


class LocalRedis:
    """`--store redis`: a redis-server for the demo only, on a free loopback port, without
    persistence; stopped (by its PID) and its directory removed at the end."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("--store redis needs redis-server on the PATH (e.g. apt-get "
                               "install redis-server), or give --store redis://HOST:PORT/DB")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.dir = Path(tempfile.mkdtemp(prefix="modelgate-demo-redis-"))
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--logfile",
            str(self.dir / "redis.log"), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not await self._pong():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log")
                detail = log.read_text()[-300:].strip() if log.exists() else ""
                await self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: "
                                   f"{detail or 'no answer'}")
            await asyncio.sleep(0.02)

    async def _pong(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return (await asyncio.wait_for(reader.readline(), 1)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@dataclass
class Replica:
    index: int
    proc: asyncio.subprocess.Process
    proxy_url: str = ""
    admin_url: str = ""
    ready: asyncio.Event | None = None
    output: asyncio.Task[None] | None = None


_READY = re.compile(r"^modelgate ready: proxy (\S+)\s+admin (\S+)")


async def _relay(replica: Replica) -> None:
    """The replica's stdout: spot its ready line, pass the rest on with its name."""
    assert replica.proc.stdout is not None and replica.ready is not None
    async for raw in replica.proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        found = _READY.match(line)
        if found and not replica.ready.is_set():
            replica.proxy_url, replica.admin_url = found.group(1), found.group(2)
            replica.ready.set()
        elif line:
            print(f"[replica {replica.index}] {line.removeprefix('modelgate: ')}", flush=True)


async def _spawn_replica(index: int, config_path: Path, env: dict[str, str],
                         args: argparse.Namespace) -> Replica:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "-c", str(config_path),
        "--log-level", args.log_level, "--log-format", args.log_format,
        "--supervisor-pid", str(os.getpid()), env=env, stdout=asyncio.subprocess.PIPE,
        start_new_session=True)  # Ctrl-C reaches the launcher only, which forwards it once
    replica = Replica(index, proc, ready=asyncio.Event())
    replica.output = asyncio.create_task(_relay(replica))
    return replica


async def _wait_ready(replica: Replica, timeout: float = START_TIMEOUT) -> str | None:
    """None once ready, else why not."""
    assert replica.ready is not None
    ready = asyncio.create_task(replica.ready.wait())
    exited = asyncio.create_task(replica.proc.wait())
    try:
        await asyncio.wait({ready, exited}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ready, exited):
            task.cancel()
    if replica.ready.is_set():
        return None
    if replica.proc.returncode is not None:
        return (f"replica {replica.index} exited with code {replica.proc.returncode} before "
                f"it was ready (its error is above)")
    return f"replica {replica.index} was not ready after {timeout:g}s"


async def _stop_replicas(replicas: list[Replica], sig: int, timeout: float,
                         signals: StopSignals) -> None:
    """Signal every replica (each drains; a second Ctrl-C is passed on and cuts that short),
    SIGKILL those still running after `timeout`."""

    def send(sig: int) -> None:
        for replica in replicas:
            if replica.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    replica.proc.send_signal(sig)

    send(sig)
    waits = asyncio.gather(*(r.proc.wait() for r in replicas))
    again = asyncio.create_task(signals.wait())
    deadline = time.monotonic() + timeout
    try:
        while not waits.done() and time.monotonic() < deadline:
            pending: set[asyncio.Future[Any]] = {waits, again}
            await asyncio.wait(pending, timeout=deadline - time.monotonic(),
                               return_when=asyncio.FIRST_COMPLETED)
            if again.done():
                send(signal.Signals[again.result()])
                again = asyncio.create_task(signals.wait())
    finally:
        again.cancel()
        waits.cancel()
        await asyncio.gather(again, waits, return_exceptions=True)
    for replica in replicas:
        if replica.proc.returncode is None:
            print(f"modelgate: replica {replica.index} (pid {replica.proc.pid}) still running "
                  f"after {timeout:g}s: SIGKILL", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                replica.proc.kill()
            await replica.proc.wait()
        if replica.output is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(replica.output, 5)


def replica_instructions(replicas: list[Replica], model_urls: dict[str, str], store: str,
                         token_note: str, shadow: bool) -> str:
    first, other = replicas[0].admin_url, replicas[-1].admin_url
    curl = _curl(replicas[0].proxy_url)
    lines = ["", f"modelgate demo is running: {len(replicas)} gateway replicas sharing {store}"]
    for r in replicas:
        lines.append(f"  replica {r.index}  gateway {r.proxy_url}  admin API {r.admin_url}  "
                     f"(dashboard {r.admin_url}/dashboard, pid {r.proc.pid})")
    lines += _model_lines(model_urls, token_note, shadow)
    lines += [
        "",
        "Send a request (any replica's gateway port):",
        f"  {curl}",
        "",
        f"Change the route through replica 0 and watch replica {replicas[-1].index} follow "
        "(in another terminal, with the venv active):",
        f"  modelgate switch {DEMO_ROUTE} green --admin {first}",
        f"  modelgate status {DEMO_ROUTE} --admin {other}",
        f"  modelgate rollback {DEMO_ROUTE} --admin {other}",
        f"  modelgate events --admin {first}",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


async def demo_replicas(args: argparse.Namespace, store: str, model_ports: dict[str, int],
                        signals: StopSignals, stack: contextlib.AsyncExitStack) -> int:
    """`--replicas N`: N `modelgate serve` processes on the demo config, sharing `store`."""
    from gateway.admin.auth import write_token_file

    config_path = stack.enter_context(demo_config_file(args.config))
    env_token = env_tokens().get("admin")
    token = env_token or secrets.token_urlsafe(32)
    token_files: list[Path] = []

    def remove_tokens() -> None:
        for path in token_files:
            with contextlib.suppress(OSError):
                if path.read_text().strip() == token:
                    path.unlink()

    stack.callback(remove_tokens)
    replicas: list[Replica] = []
    drain = 10.0
    try:
        config = load_demo_config(args.config, demo_env(args.port, args.admin_port,
                                                        model_ports, store))
        drain = config.drain_timeout
    except ConfigError as exc:
        print(f"modelgate: {args.config or 'demo config'}: {exc}", file=sys.stderr)
        return 2
    try:
        for i in range(args.replicas):
            env = demo_env(args.port + i, args.admin_port + i, model_ports, store)
            env[TOKEN_ENV] = token
            replicas.append(await _spawn_replica(i, config_path, env, args))
        for replica in replicas:
            problem = await _wait_ready(replica)
            if problem is not None:
                print(f"modelgate: {problem}; stopping the demo", file=sys.stderr, flush=True)
                return 1
        if env_token is None:
            for i in range(args.replicas):
                token_files.append(write_token_file(args.admin_port + i, token))
        token_note = (f"generated, in {', '.join(map(str, token_files))} (the CLI reads it)"
                      if token_files else f"from ${TOKEN_ENV}")
        if args.shadow:
            import httpx

            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.put(
                    f"{replicas[0].admin_url}/admin/routes/{DEMO_ROUTE}/shadow",
                    json={"backend": "green", "sample": 100,
                          "reason": "modelgate demo --shadow"},
                    headers={"Authorization": f"Bearer {token}"})
            if r.status_code != 200:
                print(f"modelgate: --shadow: {r.text}", file=sys.stderr)
                return 1
        model_urls = {name: f"http://127.0.0.1:{port}" for name, port in model_ports.items()}
        print(replica_instructions(replicas, model_urls, store, token_note, args.shadow),
              flush=True)
        stop = asyncio.create_task(signals.wait())
        died = [asyncio.create_task(r.proc.wait()) for r in replicas]
        await asyncio.wait({stop, *died}, return_when=asyncio.FIRST_COMPLETED)
        for task in died:
            task.cancel()
        if not stop.done():
            stop.cancel()
            gone = next(r for r in replicas if r.proc.returncode is not None)
            print(f"modelgate: replica {gone.index} exited with code {gone.proc.returncode}; "
                  f"stopping the demo", file=sys.stderr, flush=True)
            return 1
        print(f"modelgate: {stop.result()}: stopping the gateway replicas, then the model "
              f"servers", flush=True)
        return 0
    finally:
        await _stop_replicas(replicas, signal.SIGTERM, drain + STOP_MARGIN, signals)


async def demo(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        signals = stack.enter_context(StopSignals())
        store = args.store or "memory"
        if store == "redis":
            redis = LocalRedis()
            try:
                await redis.start()
            except (RuntimeError, OSError) as exc:
                print(f"modelgate: {exc}", file=sys.stderr)
                return 1
            stack.push_async_callback(redis.stop)  # the last thing to stop
            store = redis.url
            print(f"modelgate: started redis-server for the demo: {store} (pid "
                  f"{redis.proc.pid if redis.proc else '?'}, no persistence)", flush=True)
        model_ports: dict[str, int] = {}
        for name, (version, preferred) in MODEL_PORTS.items():
            try:
                chosen = chosen_model_port(name, os.environ)
                runner, port = await _start_model(version, preferred, chosen)
            except ValueError as exc:
                print(f"modelgate: {exc}", file=sys.stderr)
                return 2
            except OSError as exc:
                where = f" on {model_port_var(name)}={chosen}" if chosen is not None else ""
                print(f"modelgate: cannot start the {name} model server{where}: "
                      f"{exc.strerror or exc}", file=sys.stderr)
                return 1
            stack.push_async_callback(runner.cleanup)
            model_ports[name] = port
        if args.replicas > 1:
            code = await demo_replicas(args, store, model_ports, signals, stack)
        else:
            code = await demo_one(args, store, model_ports, signals, stack)
        if code != 0:
            return code
    print("modelgate: demo stopped", flush=True)
    return 0


async def demo_one(args: argparse.Namespace, store: str, model_ports: dict[str, int],
                   signals: StopSignals, stack: contextlib.AsyncExitStack) -> int:
    """One gateway in this process (the demo as it always was)."""
    from gateway.app import Gateway

    env = demo_env(args.port, args.admin_port, model_ports, store)
    try:
        config = load_demo_config(args.config, env)
        gateway = Gateway(config, admin_token=env_tokens())
    except ConfigError as exc:
        print(f"modelgate: {args.config or 'demo config'}: {exc}", file=sys.stderr)
        return 2
    try:
        await gateway.start()
    except BaseException as exc:
        await gateway.stop(drain_timeout=0)
        if not isinstance(exc, OSError):
            raise
        print(f"modelgate: cannot listen: {exc.strerror or exc} (ports {args.port} and "
              f"{args.admin_port}; pick others with --port/--admin-port)", file=sys.stderr)
        return 1
    token = AdminToken()
    stopped = False

    async def stop_gateway() -> None:
        # Runs on error paths; the signal path below already stopped the gateway.
        if not stopped:
            await gateway.stop(drain_timeout=0)

    stack.push_async_callback(stop_gateway)
    stack.callback(token.remove)
    assert gateway.admin_address is not None
    written = token.ensure(gateway.tokens, gateway.admin_address[1])
    token_note = (f"generated, in {written} (the CLI reads it)" if written is not None
                  else f"from ${TOKEN_ENV} or the config")

    if args.shadow:
        try:
            await gateway.control.set_shadow(DEMO_ROUTE, "green", 100, actor="demo",
                                             reason="modelgate demo --shadow")
        except AdminError as exc:
            print(f"modelgate: --shadow: {exc}", file=sys.stderr)
            return 1

    proxy_url, admin_url = describe_addresses(gateway)
    model_urls = {name: f"http://127.0.0.1:{port}" for name, port in model_ports.items()}
    print(instructions(proxy_url, admin_url, model_urls, token_note, args.shadow),
          flush=True)
    name = await signals.wait()
    print(f"modelgate: {name}: stopping the gateway, then the model servers", flush=True)
    await stop_gracefully(gateway, signals)
    stopped = True
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`modelgate demo`: the exit code (0 after Ctrl-C/SIGTERM)."""
    problem = demo_problem(args)
    if problem is not None:
        print(f"modelgate: {problem}", file=sys.stderr)
        return 2
    setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    return run_async(demo(args))
