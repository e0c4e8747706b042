"""Idle CPUs kept polling while the HL7 intake is busy, instead of halting between two messages.

A message crosses three processes (the sender, the server, the intake writer) and each hop wakes one of them. On a
virtual machine an idle CPU halts and hands its time back to the host; waking it for the next hop goes through the
host, and on this project's 2-core machine the processes also spent more CPU on the same work after such wake-ups
(11 % more a lab panel on average over ten runs, up to half more). Measured with four connections, `bench/hl7_bench.py`
both ways in each of ten runs: 826-1,042 lab panels a second with the CPUs kept polling, against 693-1,020 with them
halting (docs/benchmarks.md, stop 33).

Linux lets a process ask for that through PM QoS: while `/dev/cpu_dma_latency` is held open with 0 written to it, an
idle CPU polls (it spins, checking whether it has work) instead of halting; closing it withdraws the request. That
costs the CPU time the host would otherwise get back, so it is asked only while messages come in at BUSY_RATE a
second or more (a lab engine handling a million messages a day averages 12), and withdrawn once they have stayed
under it for CALM_AFTER seconds. The device is root's by default; without the right to open it, nothing changes but
the speed, and the status says why (docs/operations.md: the udev rule that gives it to Rebond's account).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from typing import Any

from rebond.moments import utc_second

log = logging.getLogger("rebond.ops")

DEVICE = "/dev/cpu_dma_latency"
#: messages a second from which the CPUs are kept polling
BUSY_RATE = 100.0
#: seconds under BUSY_RATE after which they may halt again
CALM_AFTER = 5.0
#: seconds between two looks at the rate
TICK = 0.5


def ask_cpus_to_poll(device: str = DEVICE) -> int:
    """Ask that idle CPUs wake up at once (0 µs: the kernel's idle loop polls); the request holds until the returned
    descriptor is closed, by `os.close` or by the process's end. OSError when the device cannot be had."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, struct.pack("i", 0))
    except BaseException:
        os.close(fd)
        raise
    return fd


class AwakeWhileBusy:
    """Counts the messages (`note`) and holds the PM QoS request while they come in fast; runs in an event loop."""

    def __init__(self, *, device: str = DEVICE, busy_rate: float = BUSY_RATE, calm_after: float = CALM_AFTER,
                 tick: float = TICK) -> None:
        self.device = device
        self.busy_rate = busy_rate
        self.calm_after = calm_after
        self.tick = tick
        self.messages = 0
        self.times_held = 0
        self.looks = 0  # at the rate: none while no message comes in
        self.problem: str | None = None  # why the request cannot be made here; then it is not tried again
        self._fd: int | None = None
        self._held_since: float | None = None
        self._last_busy = 0.0
        self._seen = 0
        self._seen_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def note(self) -> None:
        """One message taken in; from the event loop. The rate is looked at every `tick` while messages come in or the
        request is held, and not at all on a quiet server."""
        self.messages += 1
        if self._timer is None and self._loop is not None:
            self._seen, self._seen_at = self.messages - 1, time.monotonic()
            self._timer = self._loop.call_later(self.tick, self._look)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None
        self._let_go()

    def _look(self) -> None:
        self._timer = None
        self.looks += 1
        now = time.monotonic()
        came = self.messages - self._seen
        rate = came / max(now - self._seen_at, 1e-6)
        self._seen, self._seen_at = self.messages, now
        if rate >= self.busy_rate:
            self._last_busy = now
            if self._fd is None and self.problem is None:
                self._hold(rate)
        elif self._fd is not None and now - self._last_busy >= self.calm_after:
            self._let_go()
        if (came or self._fd is not None) and self._loop is not None:
            self._timer = self._loop.call_later(self.tick, self._look)

    def _hold(self, rate: float) -> None:
        try:
            self._fd = ask_cpus_to_poll(self.device)
        except OSError as err:
            self.problem = f"{self.device} cannot be opened ({err.strerror or err}): the CPUs halt between messages"
            log.info("MLLP busy (%.0f messages/s), idle CPUs not kept polling: %s", rate, self.problem)
            return
        self._held_since = time.time()
        self.times_held += 1
        log.info("MLLP busy (%.0f messages/s): idle CPUs kept polling until it calms down", rate)

    def _let_go(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        self._held_since = None
        log.info("MLLP calm again: idle CPUs may halt")

    def status(self) -> dict[str, Any]:
        return {"held": self.held, "held_since": utc_second(self._held_since), "times_held": self.times_held,
                "busy_rate": self.busy_rate, "problem": self.problem}
