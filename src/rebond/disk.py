"""The disks a node writes to: how much room is left, how fast it goes, and when to worry.

A full disk does not lose anything already acknowledged (a commit that finds no room fails
whole: the FHIR API answers 503, the HL7 listener AE, and the sender tries again), but from
then on nothing new is written: no admission, no result, no downtime pack. It comes slowly and
it can be seen coming. Each disk the node writes to (its SQLite store, its downtime packs) is
looked at every minute; `GET /status` and the status page say how much room is left and, from
the last hour, when it would be full at the rate it is being used. The log says it once each
time a disk changes level, and every page tells the staff when writes are about to be refused.

Levels: `full` under 64 MiB free (a commit may not fit), `critical` under 1 GiB or full within
a day, `low` under a tenth of the disk or full within a week, `ok` otherwise.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rebond.disk")

MIB = 1 << 20
GIB = 1 << 30
FULL_BELOW = 64 * MIB
CRITICAL_BELOW = 1 * GIB
LOW_BELOW_SHARE = 0.10
CRITICAL_WITHIN_HOURS = 24.0
LOW_WITHIN_HOURS = 7 * 24.0
#: the rate of use is read over this much of the past (seconds), and only once this much is known
WINDOW = 3600.0
MIN_SPAN = 600.0
LEVELS = ("ok", "low", "critical", "full")


def level_of(free: int, total: int, full_in_hours: float | None) -> str:
    """`ok`, `low`, `critical` or `full` for a disk with `free` of `total` bytes left, full in so many hours (None: not
    filling, or not known yet)."""
    soon = full_in_hours if full_in_hours is not None else float("inf")
    if free < FULL_BELOW:
        return "full"
    if free < CRITICAL_BELOW or soon < CRITICAL_WITHIN_HOURS:
        return "critical"
    if free < total * LOW_BELOW_SHARE or soon < LOW_WITHIN_HOURS:
        return "low"
    return "ok"


def hours_until_full(samples: list[tuple[float, int]], min_span: float = MIN_SPAN) -> float | None:
    """From (time, free bytes) samples, oldest first: hours until fewer than FULL_BELOW bytes are free at the rate of
    the whole span; None when the span is too short to tell or the disk is not filling."""
    if len(samples) < 2:
        return None
    (start, free_then), (end, free_now) = samples[0], samples[-1]
    if end - start < min_span or free_now >= free_then:
        return None
    per_second = (free_then - free_now) / (end - start)
    return max(free_now - FULL_BELOW, 0) / per_second / 3600


@dataclass
class _Disk:
    """One file system, and what the node keeps on it."""

    path: Path  # the first place found on it
    holds: list[str]
    history: collections.deque[tuple[float, int]]  # (time, free bytes) once a period, oldest first
    free: int = 0
    total: int = 0
    full_in_hours: float | None = None
    level: str = "unknown"
    problem: str = ""

    def facts(self) -> dict[str, Any]:
        known = self.level != "unknown"
        return {"holds": self.holds, "path": str(self.path), "level": self.level,
                "free_bytes": self.free if known else None, "total_bytes": self.total if known else None,
                "free_percent": round(100 * self.free / self.total, 1) if known and self.total else None,
                "full_in_hours": round(self.full_in_hours, 1) if self.full_in_hours is not None else None,
                "problem": self.problem}


class DiskWatch:
    """The file systems under `places` (what is kept there → a folder or file): looked at whenever asked (a statvfs
    costs microseconds), and their free space recorded every `every` seconds to tell how fast it goes."""

    def __init__(self, places: Mapping[str, str | Path], *, every: float = 60.0, window: float = WINDOW,
                 min_span: float = MIN_SPAN, clock: Callable[[], float] = time.time) -> None:
        self.every = every
        self.min_span = min_span
        self.clock = clock
        self._disks: dict[int, _Disk] = {}
        self._unplaced: dict[str, str] = {}
        self._places = {what: Path(where) for what, where in places.items()}
        self._keep = max(int(window / every) + 1, 2)
        self._task: asyncio.Task[None] | None = None
        self._looked_at = float("-inf")
        self._lock = threading.Lock()  # pages are rendered in threads too (the banner looks)

    def _place(self, what: str, where: Path) -> None:
        """Watch the file system `where` is on (its nearest existing parent's: a folder not made yet is watched too)."""
        place = where.resolve()
        while not place.exists() and place != place.parent:
            place = place.parent
        try:
            device = place.stat().st_dev
        except OSError as err:
            self._unplaced[what] = f"{where}: {err.strerror or err}"
            return
        self._unplaced.pop(what, None)
        disk = self._disks.get(device)
        if disk is None:
            disk = self._disks[device] = _Disk(place if place.is_dir() else place.parent, [], collections.deque(maxlen=self._keep))
        if what not in disk.holds:
            disk.holds.append(what)

    def look(self, *, record: bool = False) -> None:
        """Look at every disk now (`record`: and keep its free space for the rate); log each change of level."""
        with self._lock:
            self._look(record)

    def _look(self, record: bool) -> None:
        now = self._looked_at = self.clock()
        for what, where in self._places.items():
            self._place(what, where)
        for disk in self._disks.values():
            try:
                facts = os.statvfs(disk.path)
            except OSError as err:
                disk.problem, level = err.strerror or str(err), "unknown"
            else:
                disk.free, disk.total = facts.f_bavail * facts.f_frsize, facts.f_blocks * facts.f_frsize
                disk.problem = "" if disk.total else "not a disk (no size)"
                if record or not disk.history:
                    disk.history.append((now, disk.free))
                disk.full_in_hours = hours_until_full([*disk.history, (now, disk.free)], self.min_span)
                level = level_of(disk.free, disk.total, disk.full_in_hours) if disk.total else "unknown"
            if level != disk.level:
                said = log.info if level == "ok" else log.warning
                said("disk for %s (%s): %s, %s free of %s%s", ", ".join(disk.holds), disk.path, level, _size(disk.free),
                     _size(disk.total), f" ({disk.problem})" if disk.problem else "")
                disk.level = level

    def status(self) -> dict[str, Any]:
        """Every disk as it is now, and the worst level of them."""
        with self._lock:
            self._look(record=False)
            disks = [disk.facts() for disk in self._disks.values()]
            disks += [{"holds": [what], "path": None, "level": "unknown", "problem": problem}
                      for what, problem in self._unplaced.items()]
            return {"level": self._worst() if self._disks else "unknown", "disks": disks}

    def level_now(self, max_age: float = 5.0) -> str:
        """The worst level ("ok" before any look), looked at again if the last look is older than `max_age` seconds."""
        with self._lock:
            if self.clock() - self._looked_at >= max_age:
                self._look(record=False)
            return self._worst()

    def _worst(self) -> str:
        known = [disk.level for disk in self._disks.values() if disk.level in LEVELS]
        return max(known, key=LEVELS.index, default="ok")

    async def start(self) -> None:
        self.look(record=True)

        async def watch() -> None:
            while True:
                await asyncio.sleep(self.every)
                try:
                    self.look(record=True)
                except Exception:  # a look that fails must not end the watch
                    log.exception("looking at the disks failed")

        self._task = asyncio.get_running_loop().create_task(watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"
