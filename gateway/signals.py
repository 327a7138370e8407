"""Stop signals as awaitable events (`modelgate serve` and the `--workers` supervisor)."""

from __future__ import annotations

import asyncio
import contextlib
import signal


class StopSignals:
    """SIGINT and SIGTERM as awaitable events: the first asks for a graceful stop, the second
    for a quick one. Handlers are installed on enter and removed on exit."""

    def __init__(self) -> None:
        self._received: asyncio.Queue[int] = asyncio.Queue(maxsize=8)
        self._installed: list[int] = []

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, int(sig))
            except (NotImplementedError, RuntimeError):  # Windows / not the main thread
                continue
            self._installed.append(int(sig))
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    def _on_signal(self, sig: int) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._received.put_nowait(sig)

    async def wait(self) -> str:
        """The name of the next signal received."""
        return signal.Signals(await self._received.get()).name
