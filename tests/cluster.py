"""Gateway processes for the scale-out tests: `modelgate serve` subprocesses sharing one
redis-server, each on free ports, killed and reaped whatever happens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.admin.auth import STATE_DIR_ENV, TOKEN_ENV
from tests.helpers import TOKEN, wait_for

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(rb"modelgate ready: proxy (\S+)\s+admin (\S+)")


class GatewayProcess:
    """One `modelgate serve` process; `url` and `admin_url` once it printed its ready line."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.config = config
        self.preexec_fn = preexec_fn  # run in the child before exec (e.g. a lower RLIMIT)
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin_url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return "".join((self.dir / f).read_text(errors="replace")
                       for f in ("stdout", "stderr") if (self.dir / f).exists())

    async def start(self, *extra: str, timeout: float = 30) -> None:
        config_file = self.dir / "gateway.yaml"
        config_file.write_bytes(orjson.dumps(self.config))
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        env[TOKEN_ENV] = TOKEN
        env[STATE_DIR_ENV] = str(self.dir / "state")
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config_file),
                "--log-level", "warning", *extra]
        with open(self.dir / "stdout", "wb") as out, open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err,
                                         preexec_fn=self.preexec_fn)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n"
                                     f"{self.output()}")
            found = READY.search((self.dir / "stdout").read_bytes())
            if found is None:
                return False
            self.url, self.admin_url = found.group(1).decode(), found.group(2).decode()
            return True

        await wait_for(ready, timeout=timeout, interval=0.05,
                       message=f"{self.name} to print its ready line")

    def kill(self) -> None:
        """SIGKILL: no drain, no lease release, no goodbye to the member list."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: self.proc is not None and self.proc.poll() is not None,
                       timeout=timeout, interval=0.05, message=f"{self.name} to exit")
        return int(self.proc.returncode)

    def close(self) -> None:
        self.kill()


@asynccontextmanager
async def gateway_processes(config: dict[str, Any], workdir: Path, count: int = 2
                            ) -> AsyncIterator[list[GatewayProcess]]:
    """`count` gateway processes of the same config (ports 0: each picks its own)."""
    async with AsyncExitStack() as stack:
        procs = [GatewayProcess(config, workdir, f"gw{i}") for i in range(count)]
        for proc in procs:
            stack.callback(proc.close)
        for proc in procs:
            await proc.start()
        yield procs


def admin_client(proc: GatewayProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=proc.admin_url, timeout=10,
                             headers={"Authorization": f"Bearer {TOKEN}"})
