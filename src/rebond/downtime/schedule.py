"""Regenerating every ward's pack on a schedule, beside `rebond serve` and `rebond site`.

Each round runs in a child process at low priority (`python -m rebond.downtime.regenerate`),
so laying out a hundred pages never holds the server's interpreter while a nurse opens a chart,
and a failure there cannot take the server down.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from rebond.downtime.library import PackLibrary
from rebond.durable import write_atomically

log = logging.getLogger("rebond.downtime")
#: in the packs' folder, the schedule's status as its process publishes it for the others (`rebond serve --workers N`)
STATUS_FILE = ".schedule.json"


class PackSchedule(Protocol):
    """What the web app shows of the schedule: the packs kept, and how the rounds went."""

    library: PackLibrary

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class PackScheduler:
    def __init__(self, db_url: str, site_id: str, library: PackLibrary, every_minutes: float,
                 source: Callable[[], dict[str, Any]], language: str = "fr") -> None:
        self.db_url = db_url
        self.site_id = site_id
        self.library = library
        self.every = max(every_minutes, 0.01) * 60
        self.source = source
        self.language = language
        self._task: asyncio.Task[None] | None = None
        self.last_started: float | None = None
        self.last_finished: float | None = None
        self.last_outcome: dict[str, Any] | None = None
        self.rounds = 0

    async def start(self) -> None:
        self._publish()
        self._task = asyncio.create_task(self._loop())

    def run_in_thread(self) -> Callable[[], None]:
        """Run the schedule on an event loop of its own, in a thread (the parent process of `rebond serve --workers N`,
        whose web processes show it through `ScheduleView`); returns what stops it."""
        loop = asyncio.new_event_loop()
        running = threading.Event()

        async def main() -> None:
            await self.start()
            running.set()
            try:
                await asyncio.Event().wait()  # until stopped
            finally:
                await self.stop()  # a round in progress ends with it: its child is killed

        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main_task)

        main_task = loop.create_task(main())
        thread = threading.Thread(target=run, name="downtime-packs", daemon=True)
        thread.start()
        running.wait(10)

        def stop() -> None:
            loop.call_soon_threadsafe(main_task.cancel)
            thread.join(timeout=15)

        return stop

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("downtime packs: a round failed")
            await asyncio.sleep(max(1.0, self.every - (time.monotonic() - started)))

    async def run_once(self) -> dict[str, Any]:
        """One round in a child process; returns what it reported ({"written": n, "failed": n, "seconds": s})."""
        self.last_started = time.time()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rebond.downtime.regenerate", "--site-id", self.site_id,
            "--dir", str(self.library.root), "--keep", str(self.library.keep), "--lang", self.language,
            "--source", orjson.dumps(self.source()).decode(),
            env={**os.environ, "REBOND_DB": self.db_url},  # not on the command line, where `ps` shows a password
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await child.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            raise
        try:
            outcome = orjson.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        except orjson.JSONDecodeError:
            outcome = {}
        if child.returncode != 0:
            outcome = {**outcome, "error": err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["exit " + str(child.returncode)]}
            log.warning("downtime packs: the round ended with code %s: %s", child.returncode, outcome["error"])
        self.last_finished = time.time()
        self.last_outcome = outcome
        self.rounds += 1
        self._publish()
        return outcome

    def status(self) -> dict[str, Any]:
        return {"every_minutes": round(self.every / 60, 2), "keep": self.library.keep, "rounds": self.rounds,
                "last_started": self.last_started, "last_finished": self.last_finished, "last_outcome": self.last_outcome}

    def _publish(self) -> None:
        """The status beside the packs, replaced whole, for the server's other processes."""
        try:
            write_atomically(self.library.root / STATUS_FILE, orjson.dumps(self.status()))
        except OSError as err:
            log.warning("downtime packs: the schedule's status could not be written (%s)", err)


class ScheduleView:
    """The schedule as a web process of `rebond serve --workers N` sees it: the packs on disk, and the status that the
    process running the schedule publishes beside them."""

    def __init__(self, library: PackLibrary) -> None:
        self.library = library

    async def start(self) -> None:
        return None  # the schedule runs in the process that publishes it

    async def stop(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        try:
            return dict(orjson.loads((self.library.root / STATUS_FILE).read_bytes()))
        except (OSError, orjson.JSONDecodeError, TypeError, ValueError):
            return {"every_minutes": None, "keep": self.library.keep, "rounds": 0, "last_started": None, "last_finished": None,
                    "last_outcome": None}
