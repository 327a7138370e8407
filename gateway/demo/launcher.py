"""`modelgate demo`: two versions of the demo classifier behind one gateway, in one process.

blue (v1) and green (v2) model servers start first (on 9001/9002 when free, else any free
port), then the gateway from configs/demo.yaml with their ports filled in through
``MODELGATE_BLUE_PORT``/``MODELGATE_GREEN_PORT``. Ctrl-C or SIGTERM stops the gateway
(draining requests in flight) and then the model servers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from aiohttp import web

from gateway.admin.auth import TOKEN_ENV
from gateway.config import GatewayConfig, load_config
from gateway.demo.model_server import start_model_server
from gateway.errors import AdminError, ConfigError
from gateway.logs import setup_logging
from gateway.serve import (
    AdminToken,
    StopSignals,
    describe_addresses,
    env_tokens,
    run_async,
    stop_gracefully,
)

DEFAULT_PORT = 8000
DEFAULT_ADMIN_PORT = 8001
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
    parser.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT,
                        help="admin API port on 127.0.0.1 (default %(default)s)")
    parser.add_argument("--shadow", action="store_true",
                        help="also mirror all traffic to green (shadow mode) from the start")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="gateway config (default: configs/demo.yaml)")
    from gateway.cli.core import add_log_arguments

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


def demo_env(port: int, admin_port: int, model_ports: dict[str, int]) -> dict[str, str]:
    """The environment demo.yaml is read with: ours on top of the process's."""
    env = dict(os.environ)
    env["MODELGATE_LISTEN"] = f"127.0.0.1:{port}"
    env["MODELGATE_ADMIN_LISTEN"] = f"127.0.0.1:{admin_port}"
    for name, bound in model_ports.items():
        env[f"MODELGATE_{name.upper()}_PORT"] = str(bound)
    return env


def load_demo_config(explicit: str | None, env: dict[str, str]) -> GatewayConfig:
    with demo_config_file(explicit) as path:
        return load_config(path, env=env)


def instructions(proxy_url: str, admin_url: str, model_urls: dict[str, str],
                 token_note: str, shadow: bool) -> str:
    """What the demo prints once everything is up: where things are, and lines to paste."""
    admin_flag = "" if admin_url == f"http://127.0.0.1:{DEFAULT_ADMIN_PORT}" else (
        f" --admin {admin_url}"
    )
    curl = (f"curl -s -H 'content-type: application/json' -H 'x-user-id: alice' "
            f"-d {shlex.quote(SAMPLE_BODY)} {proxy_url}{INFER_PATH}")
    lines = [
        "",
        "modelgate demo is running",
        f"  gateway    {proxy_url}  (route {DEMO_ROUTE}: {INFER_PATH}, sticky on x-user-id)",
        f"  admin API  {admin_url}",
        f"  dashboard  {admin_url}/dashboard",
    ]
    for name, url in model_urls.items():
        lines.append(f"  {name:<10} {url}  (model {MODEL_PORTS[name][0]})")
    lines.append(f"  token      {token_note}")
    if shadow:
        lines.append("  shadow     green receives a copy of all traffic (its answers are compared, "
                     "never returned)")
    lines += [
        "",
        "Send a request:",
        f"  {curl}",
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


async def _start_model(version: str, preferred: int) -> tuple[web.AppRunner, int]:
    """On the well-known port when it is free (handy for curl), else on any free port."""
    try:
        return await start_model_server(version, "127.0.0.1", preferred)
    except OSError:
        return await start_model_server(version, "127.0.0.1", 0)


async def demo(args: argparse.Namespace) -> int:
    from gateway.app import Gateway

    async with contextlib.AsyncExitStack() as stack:
        signals = stack.enter_context(StopSignals())
        model_ports: dict[str, int] = {}
        for name, (version, preferred) in MODEL_PORTS.items():
            try:
                runner, port = await _start_model(version, preferred)
            except OSError as exc:
                print(f"modelgate: cannot start the {name} model server: {exc}", file=sys.stderr)
                return 1
            stack.push_async_callback(runner.cleanup)
            model_ports[name] = port

        env = demo_env(args.port, args.admin_port, model_ports)
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
    print("modelgate: demo stopped", flush=True)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`modelgate demo`: the exit code (0 after Ctrl-C/SIGTERM)."""
    setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    return run_async(demo(args))

