"""A loop a node runs beside its web server (following the central site, sending its journal, following the PACS)."""
from __future__ import annotations

import asyncio
import contextlib


class BackgroundLoop:
    """A loop a node runs beside its web server, started and stopped with it."""

    _task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
