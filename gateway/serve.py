"""`modelgate serve`: run one gateway process from a config file until SIGINT/SIGTERM.

The pieces the demo launcher reuses live here too: the event loop (uvloop when installed),
logging, admin-token set-up and the graceful stop (drain, then close). The first SIGINT or
SIGTERM drains in-flight requests (readyz answers 503 meanwhile) for up to ``drain_timeout``;
a second one cuts the drain short.

``--workers N`` (N > 1) starts a supervisor instead (gateway/cluster/workers.py): N processes
of this same command, each a worker of `serve` here (`WorkerRole`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.admin.auth import TOKEN_ENV, generate_token_file
from gateway.config import GatewayConfig, load_config, secret_problem
from gateway.errors import ConfigError, ModelgateError
from gateway.logs import setup_logging
from gateway.signals import StopSignals

if TYPE_CHECKING:
    from gateway.cluster.workers import WorkerRole

log = logging.getLogger("modelgate")

UPSTREAM_KINDS = ("aiohttp", "fast")
NEEDS_SHARED_STORE = (
    "--workers > 1 needs a shared store: set store: redis://… in the config (with store: memory "
    "every worker would route on its own state)"
)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (the default on Linux/macOS), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            return runner.run(main)
        except KeyboardInterrupt:  # no signal handlers (e.g. Windows): Ctrl-C ends here
            return 130


def env_tokens() -> dict[str, str]:
    """``MODELGATE_ADMIN_TOKEN`` adds (or replaces) the token named "admin"."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    return {"admin": token} if token else {}


def env_token_problem() -> str | None:
    """Why ``MODELGATE_ADMIN_TOKEN`` (when set) cannot be a token, or None."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and (found := secret_problem(token)) is not None:
        return f"{TOKEN_ENV}: {found}"
    return None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; anything else (0.0.0.0, "", a name) is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def admin_listen_problem(config: GatewayConfig, insecure_admin: bool = False) -> str | None:
    """Why the admin API may not listen where the config says, or None: beyond loopback its
    bearer tokens would cross the network in clear text, unless it is served over TLS
    (``admin.tls``) or the operator says TLS terminates elsewhere (``--insecure-admin``)."""
    host = config.admin.listen[0]
    if is_loopback(host) or config.admin.tls is not None or insecure_admin:
        return None
    shown = f"[{host}]" if ":" in host else (host or "*")
    return (f"admin.listen {shown}:{config.admin.listen[1]} is not a loopback address: "
            f"configure admin.tls (cert, key) or pass --insecure-admin (TLS terminated or "
            f"the port kept private elsewhere)")


def check_options(config: GatewayConfig, workers: int, upstream: str) -> str | None:
    """The reason these command-line options cannot run this config, or None."""
    if workers < 1:
        return "--workers must be at least 1"
    if workers > 1 and config.store == "memory":
        return NEEDS_SHARED_STORE
    if upstream not in UPSTREAM_KINDS:
        return f"--upstream must be one of {', '.join(UPSTREAM_KINDS)}"
    if upstream == "fast":
        try:
            import gateway.upstream.fastpool  # noqa: F401
        except ImportError:
            return "--upstream fast is not available in this build (gateway.upstream.fastpool)"
    return None


class AdminToken:
    """The admin token of a gateway without a configured one: generated at start, written to
    a 0600 file named by the admin port (where the CLI looks), removed again on stop."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._token: str | None = None

    def ensure(self, tokens: dict[str, str], admin_port: int) -> Path | None:
        """Generate and add a token if `tokens` is empty; returns the file written, if any."""
        if tokens:
            return None
        self._token, self.path = generate_token_file(admin_port)
        tokens["admin"] = self._token
        return self.path

    def remove(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            if self.path.read_text().strip() == self._token:
                self.path.unlink()
        self.path = None


def describe_addresses(gateway: Any) -> tuple[str, str]:
    """The proxy and admin base URLs a started gateway listens on."""
    proxy = ", ".join(f"http://{_host(h)}:{p}" for h, p in gateway.addresses)
    admin = ""
    if gateway.admin_address is not None:
        host, port = gateway.admin_address
        scheme = "https" if gateway.config.admin.tls is not None else "http"
        admin = f"{scheme}://{_host(host)}:{port}"
    return proxy, admin


def _host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def stop_gracefully(gateway: Any, signals: StopSignals) -> None:
    """Drain in-flight requests (bounded by drain_timeout); a second signal ends the drain."""
    drain = asyncio.create_task(gateway.drain())
    again = asyncio.create_task(signals.wait())
    try:
        done, _ = await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        if again in done:
            print("modelgate: second signal: stopping without waiting for requests in flight",
                  file=sys.stderr, flush=True)
    finally:
        for task in (drain, again):
            task.cancel()
        await asyncio.gather(drain, again, return_exceptions=True)
    await gateway.stop(drain_timeout=0)


async def serve(config: GatewayConfig, upstream: str = "fast", role: WorkerRole | None = None,
                supervisor_pid: int | None = None) -> int:
    """Start a gateway, print where it listens, run until a signal, then stop it cleanly.

    As worker `role` of `serve --workers N` it shares the proxy port with the other workers
    and reports "ready" (or why it cannot start) to the supervisor instead of printing it."""
    who = "modelgate" if role is None else f"modelgate {role.name}"

    def fail(message: str, code: int) -> int:
        if role is not None:
            role.report({"error": message})
        else:
            print(f"modelgate: {message}", file=sys.stderr, flush=True)
        return code

    from gateway.server.limits import return_io_buffers_to_the_os

    return_io_buffers_to_the_os()  # a burst of slow clients' buffers goes back to the OS
    with StopSignals() as signals:
        watchdog = None
        if supervisor_pid is not None:
            from gateway.cluster.workers import exit_with_parent

            watchdog = asyncio.create_task(exit_with_parent(supervisor_pid))
        try:
            return await _serve(config, upstream, role, signals, fail, who)
        finally:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)


async def _serve(config: GatewayConfig, upstream: str, role: WorkerRole | None,
                 signals: StopSignals, fail: Callable[[str, int], int], who: str) -> int:
    from gateway.app import Gateway

    try:
        gateway = Gateway(config, admin_token=env_tokens(), upstream_kind=upstream,
                                reuse_port=role is not None and role.reuse_port,
                                worker=None if role is None else role.index)
    except ConfigError as exc:  # e.g. a store this build cannot open
        return fail(f"{config.source}: {exc}", 2)
    token = AdminToken()
    try:
        try:
            await gateway.start(sockets=role.sockets() if role is not None else ())
        except BaseException as exc:
            await gateway.stop(drain_timeout=0)  # close whatever did start
            if isinstance(exc, OSError):
                return fail(f"cannot listen: {exc.strerror or exc}", 1)
            # e.g. the store is unreachable: one line, not a traceback (a worker reports any
            # failure to its supervisor the same way)
            if isinstance(exc, ModelgateError) or role is not None and isinstance(exc, Exception):
                return fail(f"cannot start: {exc}", 1)
            raise
        assert gateway.admin_address is not None
        written = token.ensure(gateway.tokens, gateway.admin_address[1])
        if written is not None:
            print(f"admin token generated: {written} (the modelgate CLI on this host "
                  f"reads it; set {TOKEN_ENV} to choose one)", flush=True)
        proxy_url, admin_url = describe_addresses(gateway)
        if role is not None:
            role.report({"ready": True, "proxy": proxy_url, "admin": admin_url,
                         "admin_port": gateway.admin_address[1], "pid": os.getpid()})
        else:
            print(f"modelgate ready: proxy {proxy_url}  admin {admin_url}  (Ctrl-C to stop)",
                  flush=True)
        name = await signals.wait()
        print(f"{who}: {name}: draining requests in flight, then stopping", flush=True)
        await stop_gracefully(gateway, signals)
    finally:
        token.remove()
    print(f"{who}: stopped", flush=True)
    return 0


def run_server(config_path: str, workers: int = 1, upstream: str = "fast",
               log_level: str = "info", log_format: str = "json",
               worker_index: int | None = None, worker_spec: str | None = None,
               supervisor_pid: int | None = None, insecure_admin: bool = False) -> int:
    """`modelgate serve`: the exit code (2: bad config or options; 1: cannot listen).

    ``--workers N`` (N > 1) runs a supervisor (gateway/cluster/workers.py) that starts N
    processes of this same command with the hidden ``--worker-index``/``--worker-spec``."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"modelgate: {config_path}: {exc}", file=sys.stderr)
        return 2
    problem = check_options(config, workers, upstream) or env_token_problem()
    if problem is None and worker_index is None:  # a worker's supervisor checked already
        problem = admin_listen_problem(config, insecure_admin)
    if problem is not None:
        print(f"modelgate: {problem}", file=sys.stderr)
        return 2
    setup_logging(log_level, log_format)
    if workers > 1:
        from gateway.cluster.workers import supervise

        return run_async(supervise(config_path, config, workers, upstream, log_level,
                                   log_format))
    role = None
    if worker_index is not None:
        from gateway.cluster.workers import WorkerRole, WorkerSpec

        try:
            spec = WorkerSpec.from_json(worker_spec or "")
        except ValueError as exc:
            print(f"modelgate: {exc}", file=sys.stderr)
            return 2
        role = WorkerRole(worker_index, spec)
        config = role.config(config)
    return run_async(serve(config, upstream, role, supervisor_pid))
