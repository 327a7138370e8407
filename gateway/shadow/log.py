"""The comparison log: JSON lines, size-rotated, written off the event loop.

`write()` never blocks: it appends the line to a bounded in-memory queue (lines and bytes) or,
when the disk cannot keep up, drops it and counts it. One writer task drains the queue in
batches and hands each batch to a thread, which opens the file, appends, rotates when the
next line would pass ``max_bytes`` (``path`` -> ``path.1`` -> ... ``path.<backups>``) and
closes it again, so no file handle is shared between the thread and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from pathlib import Path

from gateway.shadow.config import LogConfig

log = logging.getLogger("modelgate.shadow")

MAX_QUEUED_LINES = 10_000
MAX_QUEUED_BYTES = 32 * 1024 * 1024
BATCH_LINES = 1_000
FLUSH_TIMEOUT = 5.0


class ComparisonLog:
    def __init__(self, config: LogConfig, *, max_lines: int = MAX_QUEUED_LINES,
                 max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.config = config
        self.path = Path(config.path)
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self._lines: deque[bytes] = deque()
        self._queued_bytes = 0
        self._size: int | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._last_error = 0.0

    @property
    def queued(self) -> int:
        return len(self._lines)

    def write(self, line: bytes) -> bool:
        """Queue one line (ending in a newline); False if it was dropped."""
        if (self._closing or len(self._lines) >= self.max_lines
                or self._queued_bytes + len(line) > self.max_bytes):
            self.dropped += 1
            return False
        self._lines.append(line)
        self._queued_bytes += len(line)
        self._wake.set()
        return True

    async def start(self) -> None:
        """Create the directory now, so a bad path fails at start-up, not at the first pair."""
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"shadow-log:{self.path}")

    async def stop(self) -> None:
        """Flush what is queued (bounded by FLUSH_TIMEOUT), then end the writer."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(task, FLUSH_TIMEOUT)  # cancels and awaits it on timeout
        except TimeoutError:
            self.dropped += len(self._lines)
            self._lines.clear()
            self._queued_bytes = 0

    async def _run(self) -> None:
        while True:
            if not self._lines:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            n = min(len(self._lines), BATCH_LINES)
            batch = [self._lines.popleft() for _ in range(n)]
            self._queued_bytes -= sum(len(line) for line in batch)
            try:
                await asyncio.to_thread(self._write_batch, batch)
                self.written += len(batch)
            except OSError as exc:
                self.errors += 1
                self.dropped += len(batch)
                now = time.monotonic()
                if now - self._last_error > 60:
                    self._last_error = now
                    log.warning("shadow comparison log %s: cannot write: %s", self.path, exc)

    def _write_batch(self, lines: list[bytes]) -> None:
        """Runs in a worker thread."""
        limit = self.config.max_bytes
        if self._size is None:
            try:
                self._size = self.path.stat().st_size
            except FileNotFoundError:
                self._size = 0
        size = self._size
        out = None
        try:
            for line in lines:
                if size > 0 and size + len(line) > limit:
                    if out is not None:
                        out.close()
                        out = None
                    self._rotate()
                    size = 0
                if out is None:
                    # 0600: the lines may hold request and response bodies (personal data).
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    out = os.fdopen(fd, "ab")
                out.write(line)
                size += len(line)
        except OSError:
            self._size = None  # re-read the size next time: the file may have changed
            raise
        finally:
            if out is not None:
                out.close()
        self._size = size

    def _rotate(self) -> None:
        backups = self.config.backups
        base = str(self.path)
        if backups == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(base)
            return
        for i in range(backups - 1, 0, -1):
            src = f"{base}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{base}.{i + 1}")
        os.replace(base, f"{base}.1")
