"""`modelgate serve --workers N`: one supervisor and N gateway processes on one proxy port.

The supervisor handles no request. It reserves the proxy address, starts N fresh interpreters
(``python -m gateway serve … --worker-index I --worker-spec JSON``; never a fork of a running
event loop), waits until each reports ready on an inherited pipe, prints one ready line, and
from then on:

- restarts a worker that exits, after a backoff that doubles with each recent crash; more
  than `CRASH_LIMIT` exits within `CRASH_WINDOW` seconds (all workers together) stop the
  others and exit 1;
- forwards SIGTERM / SIGINT to every worker (each drains its requests in flight; a second
  signal is forwarded too and cuts the drain short), SIGKILLs a worker still running
  ``drain_timeout`` + `STOP_MARGIN` seconds later, removes its token files and exits 0.

A worker that fails to start (cannot listen, store unreachable, …) makes the supervisor stop
the others and exit 1 with that worker's message. Workers run in their own session, so the
terminal's Ctrl-C reaches the supervisor only (which forwards it once), and they stop by
themselves if the supervisor disappears (`--supervisor-pid`).

**One port.** On Linux every worker binds the proxy port with SO_REUSEPORT and the kernel
spreads connections across them. Elsewhere (macOS and the BSDs accept SO_REUSEPORT but do not
balance it) the supervisor listens once and every worker accepts on the inherited socket.
``MODELGATE_WORKER_SOCKETS=reuseport|inherit`` overrides the choice. A proxy port 0 is
resolved once by the supervisor so that all workers share it.

**Admin.** Worker i serves the admin API on the configured admin port + i (port 0 stays 0: any
free port). Each answer is cluster-wide (state from the shared store); /metrics is per process,
so Prometheus scrapes every worker's admin port. Without a configured token and without
``MODELGATE_ADMIN_TOKEN`` the supervisor generates one token, hands it to every worker in
that variable and writes the CLI's token file for every worker's admin port (removed on stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from gateway.admin.auth import TOKEN_ENV, token_file, write_token_file
from gateway.config import GatewayConfig
from gateway.signals import StopSignals

CRASH_LIMIT = 5
CRASH_WINDOW = 60.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
START_TIMEOUT = 60.0
STOP_MARGIN = 5.0
SOCKETS_ENV = "MODELGATE_WORKER_SOCKETS"
SHARE_MODES = ("reuseport", "inherit")


def share_mode() -> str:
    """How workers share the proxy port: ``reuseport`` (Linux) or ``inherit`` (elsewhere)."""
    forced = os.environ.get(SOCKETS_ENV, "").strip().lower()
    if forced in SHARE_MODES:
        return forced
    if sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT"):
        return "reuseport"
    return "inherit"


def admin_port_for(config: GatewayConfig, index: int) -> int:
    """Worker `index`'s admin port: the configured one + index (0 stays 0: any free port)."""
    port = config.admin.listen[1]
    return port + index if port else 0


def worker_config(config: GatewayConfig, index: int,
                  listen: Sequence[tuple[str, int]] | None = None) -> GatewayConfig:
    """The config worker `index` runs: its admin port shifted, the proxy port resolved."""
    admin = replace(config.admin, listen=(config.admin.listen[0], admin_port_for(config, index)))
    return replace(config, admin=admin,
                   listen=tuple(listen) if listen is not None else config.listen)


# -- the worker's side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells a worker on its command line (``--worker-spec``, JSON)."""

    listen: tuple[tuple[str, int], ...]
    ready_fd: int = -1
    socket_fds: tuple[int, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"listen": [list(a) for a in self.listen], "ready_fd": self.ready_fd,
                           "socket_fds": list(self.socket_fds)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Raises ValueError on anything malformed."""
        try:
            data = json.loads(text)
            listen = tuple((str(h), int(p)) for h, p in data["listen"])
            return cls(listen=listen, ready_fd=int(data.get("ready_fd", -1)),
                       socket_fds=tuple(int(fd) for fd in data.get("socket_fds", ())))
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"bad --worker-spec: {exc}") from None


class WorkerRole:
    """A worker process's view of its supervisor: its index, the shared proxy sockets (inherit
    mode) and the pipe on which it reports "ready" or why it could not start."""

    def __init__(self, index: int, spec: WorkerSpec) -> None:
        self.index = index
        self.spec = spec

    @property
    def name(self) -> str:
        return f"worker {self.index}"

    @property
    def reuse_port(self) -> bool:
        return not self.spec.socket_fds

    def config(self, config: GatewayConfig) -> GatewayConfig:
        return worker_config(config, self.index, self.spec.listen)

    def sockets(self) -> list[socket.socket]:
        """Inherit mode: the supervisor's listening sockets (none with SO_REUSEPORT)."""
        return [socket.socket(fileno=fd) for fd in self.spec.socket_fds]

    def report(self, message: dict[str, Any]) -> None:
        """Tell the supervisor (once): ``{"ready": true, …}`` or ``{"error": "…"}``."""
        fd = self.spec.ready_fd
        if fd < 0:
            return
        object.__setattr__(self.spec, "ready_fd", -1)
        with contextlib.suppress(OSError):
            os.write(fd, json.dumps(message).encode() + b"\n")
        with contextlib.suppress(OSError):
            os.close(fd)


async def exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """SIGTERM ourselves (a graceful stop) once `parent` is no longer our parent process."""
    while os.getppid() == parent:
        await asyncio.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)


# -- the supervisor's side -----------------------------------------------------------------------
class Signals(Protocol):
    async def wait(self) -> str: ...


class CrashBudget:
    """Unexpected worker exits: the backoff before the next restart, or None when more than
    `limit` happened within `window` seconds."""

    def __init__(self, limit: int = CRASH_LIMIT, window: float = CRASH_WINDOW,
                 first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.first, self.cap = limit, window, first, cap
        self.clock = clock
        self.times: deque[float] = deque()

    def crash(self) -> float | None:
        now = self.clock()
        self.times.append(now)
        while self.times and self.times[0] < now - self.window:
            self.times.popleft()
        if len(self.times) > self.limit:
            return None
        return float(min(self.cap, self.first * 2 ** (len(self.times) - 1)))


class WorkerFailed(Exception):
    """A worker could not start, or the workers keep crashing: the supervisor's exit 1."""


def exit_text(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    admin_url: str = ""
    proxy_url: str = ""
    token_path: Path | None = None
    starts: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    reaper: asyncio.Task[None] | None = None
    spawning: bool = False
    was_ready: bool = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


Command = Callable[[int, WorkerSpec], list[str]]


class Supervisor:
    """Runs `count` workers built by `command(index, spec)` until a signal; see the module
    docstring. `run` returns the exit code."""

    def __init__(self, config: GatewayConfig, count: int, command: Command, *,
                 env: dict[str, str] | None = None, budget: CrashBudget | None = None,
                 start_timeout: float = START_TIMEOUT, stop_margin: float = STOP_MARGIN,
                 mode: str | None = None) -> None:
        self.config = config
        self.workers = [Worker(i) for i in range(count)]
        self.command = command
        self.env = dict(os.environ if env is None else env)
        self.budget = budget or CrashBudget()
        self.start_timeout = start_timeout
        self.stop_timeout = config.drain_timeout + stop_margin
        self.mode = mode or share_mode()
        self.stopping = False
        self.stop_signal: int | None = None
        self._exits = asyncio.Event()  # set whenever a worker process ends
        self.listen: tuple[tuple[str, int], ...] = config.listen
        self._sockets: list[socket.socket] = []
        self._ready = asyncio.Event()
        self.token: str | None = None
        if not config.admin.tokens and not self.env.get(TOKEN_ENV, "").strip():
            self.token = secrets.token_urlsafe(32)
            self.env[TOKEN_ENV] = self.token

    # -- the proxy address --------------------------------------------------------------------
    def reserve(self) -> None:
        """Inherit mode: listen once. Reuseport mode: make sure nobody else holds the port
        (a SO_REUSEPORT group would silently take us in) and resolve port 0, keeping a bound
        (never listening, so never served) placeholder that holds the port for the workers."""
        listen: list[tuple[str, int]] = []
        for host, port in self.config.listen:
            if self.mode == "inherit":
                sock = socket.create_server((host, port), backlog=1024)
                sock.set_inheritable(True)
            else:
                family, _, _, _, addr = socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
                if port:
                    with socket.socket(family, socket.SOCK_STREAM) as probe:
                        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        probe.bind(addr)  # no SO_REUSEPORT: fails if anyone listens there
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(addr)
            self._sockets.append(sock)
            listen.append((host, int(sock.getsockname()[1])))
        self.listen = tuple(listen)

    def release(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    # -- one worker ----------------------------------------------------------------------------
    async def _spawn(self, worker: Worker) -> dict[str, Any]:
        """Start `worker` and wait for its report; WorkerFailed if it does not get ready."""
        read_fd, write_fd = os.pipe()
        fds = tuple(s.fileno() for s in self._sockets) if self.mode == "inherit" else ()
        spec = WorkerSpec(listen=self.listen, ready_fd=write_fd, socket_fds=fds)
        worker.exited = asyncio.Event()
        worker.proc = None
        worker.spawning = True
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *self.command(worker.index, spec), env=self.env, pass_fds=(write_fd, *fds),
                start_new_session=True)
        except OSError as exc:
            os.close(read_fd)
            raise WorkerFailed(f"worker {worker.index}: cannot start: {exc}") from None
        finally:
            worker.spawning = False
            os.close(write_fd)
        if self.stop_signal is not None:  # a stop began while it was being started
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(self.stop_signal)
        worker.starts += 1
        worker.reaper = asyncio.create_task(self._reap(worker, worker.proc))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb"))
        try:
            line = await asyncio.wait_for(reader.readline(), self.start_timeout)
        except TimeoutError:
            line = b""
            if worker.running:
                await self._kill(worker)
                raise WorkerFailed(f"worker {worker.index}: not ready after "
                                   f"{self.start_timeout:g}s") from None
        finally:
            transport.close()
        try:
            report = json.loads(line) if line.strip() else {}
        except ValueError:
            report = {}
        if report.get("ready"):
            return dict(report)
        error = report.get("error")
        await worker.exited.wait()  # a worker that could not start exits by itself
        assert worker.proc is not None
        detail = error or f"{exit_text(worker.proc.returncode)} before it was ready"
        raise WorkerFailed(f"worker {worker.index}: {detail}")

    async def _reap(self, worker: Worker, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        if worker.proc is proc:
            worker.exited.set()
        self._exits.set()

    async def _kill(self, worker: Worker) -> None:
        """SIGKILL the worker if it runs, and wait until it is reaped."""
        if worker.proc is None:
            return
        if worker.running:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        await worker.exited.wait()

    def _on_ready(self, worker: Worker, report: dict[str, Any]) -> None:
        worker.admin_url = str(report.get("admin", ""))
        worker.proxy_url = str(report.get("proxy", ""))
        port = int(report.get("admin_port", 0) or 0)
        if self.token is not None and port:
            if worker.token_path is not None and worker.token_path != token_file(port):
                self._remove_token(worker)
            worker.token_path = write_token_file(port, self.token)
        if self._ready.is_set():
            assert worker.proc is not None
            print(f"modelgate: worker {worker.index} restarted (pid {worker.proc.pid}), "
                  f"ready again", file=sys.stderr, flush=True)
        elif all(w.admin_url and w.running for w in self.workers):
            self._ready.set()

    def _remove_token(self, worker: Worker) -> None:
        path, worker.token_path = worker.token_path, None
        if path is None:
            return
        with contextlib.suppress(OSError):
            if path.read_text().strip() == self.token:
                path.unlink()

    async def _keep(self, worker: Worker) -> None:
        """Run one worker slot: start, wait for its exit, restart with backoff."""
        while not self.stopping:
            try:
                report = await self._spawn(worker)
            except WorkerFailed as exc:
                if not worker.was_ready or self.stopping:
                    raise  # it never got ready: the config or the machine is at fault
                what = str(exc)
            else:
                if self.stopping:
                    return
                worker.was_ready = True
                self._on_ready(worker, report)
                await worker.exited.wait()
                if self.stopping:
                    return
                assert worker.proc is not None
                what = (f"worker {worker.index} (pid {worker.proc.pid}) "
                        f"{exit_text(worker.proc.returncode)}")
            delay = self.budget.crash()
            if delay is None:
                raise WorkerFailed(f"{what}; workers keep crashing (more than "
                                   f"{self.budget.limit} exits in {self.budget.window:g}s), "
                                   f"giving up")
            print(f"modelgate: {what}; restarting it in {delay:g}s", file=sys.stderr,
                  flush=True)
            await asyncio.sleep(delay)

    # -- all of them ---------------------------------------------------------------------------
    def ready_line(self) -> str:
        admins = " ".join(w.admin_url for w in self.workers)
        proxy = self.workers[0].proxy_url
        return (f"modelgate ready: proxy {proxy}  admin {admins}  ({len(self.workers)} "
                f"workers, worker i on admin port + i; Ctrl-C to stop)")

    async def _forward(self, sig: int) -> None:
        self.stop_signal = sig
        for worker in self.workers:
            if worker.running:
                assert worker.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    def _stopping_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.running or w.spawning]

    async def _stop_all(self, sig: int, signals: Signals) -> None:
        """Forward `sig`, wait for every worker (a second signal is forwarded too), SIGKILL
        the ones still running after the stop timeout."""
        self.stopping = True
        await self._forward(sig)
        deadline = time.monotonic() + self.stop_timeout
        again = asyncio.create_task(signals.wait())
        try:
            while self._stopping_workers():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._exits.clear()
                exits = asyncio.create_task(self._exits.wait())
                waiting: set[asyncio.Future[Any]] = {exits, again}
                await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                exits.cancel()
                if again.done():
                    name = again.result()
                    again = asyncio.create_task(signals.wait())
                    print(f"modelgate: {name} again: workers stop without waiting for "
                          f"requests in flight", file=sys.stderr, flush=True)
                    await self._forward(signal.Signals[name])
        finally:
            again.cancel()
            await asyncio.gather(again, return_exceptions=True)
        for worker in self._stopping_workers():
            if worker.proc is not None:
                print(f"modelgate: worker {worker.index} (pid {worker.proc.pid}) still running "
                      f"after {self.stop_timeout:g}s: SIGKILL", file=sys.stderr, flush=True)
                await self._kill(worker)

    async def run(self, signals: Signals) -> int:
        try:
            self.reserve()
        except OSError as exc:
            where = ", ".join(f"{h}:{p}" for h, p in self.config.listen)
            print(f"modelgate: cannot listen on {where}: {exc.strerror or exc}",
                  file=sys.stderr, flush=True)
            self.release()
            return 1
        slots = [asyncio.create_task(self._keep(w)) for w in self.workers]
        ready = asyncio.create_task(self._ready.wait())
        stop = asyncio.create_task(signals.wait())
        pending: set[asyncio.Future[Any]] = {*slots, ready, stop}
        code: int | None = None
        try:
            while code is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if ready in done:
                    self._print_ready()
                if stop in done:
                    name = stop.result()
                    print(f"modelgate: {name}: stopping {len(self.workers)} workers (each "
                          f"drains its requests in flight)", flush=True)
                    await self._stop_all(signal.Signals[name], signals)
                    code = 0
                    break
                for task in done:
                    failure = task.exception() if task in slots else None
                    if failure is not None:
                        if not isinstance(failure, WorkerFailed):
                            raise failure
                        print(f"modelgate: {failure}", file=sys.stderr, flush=True)
                        await self._stop_all(signal.SIGTERM, signals)
                        code = 1
                        break
        finally:
            self.stopping = True
            for task in (*slots, ready, stop):
                task.cancel()
            await asyncio.gather(*slots, ready, stop, return_exceptions=True)
            for worker in self.workers:
                await self._kill(worker)
                self._remove_token(worker)
            self.release()
        print("modelgate: stopped" if code == 0 else "modelgate: stopped (a worker failed)",
              flush=True)
        return code

    def _print_ready(self) -> None:
        if self.token is not None:
            files = ", ".join(str(w.token_path) for w in self.workers if w.token_path)
            print(f"admin token generated: {files} (the modelgate CLI on this host reads "
                  f"it; set {TOKEN_ENV} to choose one)", flush=True)
        print(self.ready_line(), flush=True)


def worker_command(config_path: str, upstream: str, log_level: str,
                   log_format: str) -> Command:
    """`python -m gateway serve …` for worker `index`, told about its supervisor (us)."""
    supervisor = os.getpid()

    def command(index: int, spec: WorkerSpec) -> list[str]:
        return [sys.executable, "-m", "gateway", "serve", "-c", config_path,
                "--upstream", upstream, "--log-level", log_level, "--log-format", log_format,
                "--worker-index", str(index), "--worker-spec", spec.to_json(),
                "--supervisor-pid", str(supervisor)]

    return command


async def supervise(config_path: str, config: GatewayConfig, count: int, upstream: str,
                    log_level: str, log_format: str) -> int:
    """`modelgate serve --workers N` (N > 1): the supervisor's exit code."""
    supervisor = Supervisor(config, count,
                            worker_command(config_path, upstream, log_level, log_format))
    with StopSignals() as signals:
        return await supervisor.run(signals)
