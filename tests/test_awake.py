"""Idle CPUs kept polling while the MLLP intake is busy (ops/awake.py): the kernel's own PM QoS device, read back."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import struct
import threading
import time

from rebond.hl7.mllp import send_messages
from rebond.hl7.simulate import Traffic
from rebond.ops.awake import DEVICE, TICK, AwakeWhileBusy
from tests.pg_harness import free_port
from tests.server import RebondServer


def wake_up_latency() -> int:
    """What the kernel holds as the CPUs' allowed wake-up latency (µs): the least of every request open."""
    fd = os.open(DEVICE, os.O_RDONLY)
    try:
        return int(struct.unpack("i", os.read(fd, 4))[0])
    finally:
        os.close(fd)


async def traffic(awake: AwakeWhileBusy, rate: float, seconds: float) -> None:
    """Messages noted at `rate` a second for `seconds`, by steps of 10 ms, as many as the time passed calls for."""
    started = time.monotonic()
    noted = 0
    while (passed := time.monotonic() - started) < seconds:
        while noted < rate * passed:
            awake.note()
            noted += 1
        await asyncio.sleep(0.01)


def test_the_cpus_are_kept_polling_while_messages_come_fast_and_let_go_once_they_calm() -> None:
    before = wake_up_latency()
    assert before > 0, "another process holds the CPUs polling: this test cannot see its own request"
    seen: list[tuple[str, bool, int]] = []

    async def run() -> None:
        awake = AwakeWhileBusy(busy_rate=100, calm_after=1.0, tick=0.05)
        awake.start()
        try:
            await traffic(awake, 30, 0.3)  # a lab's usual pace: nothing asked
            seen.append(("slow", awake.held, wake_up_latency()))
            await traffic(awake, 1000, 0.3)  # a backlog replayed after a downtime
            seen.append(("busy", awake.held, wake_up_latency()))
            await traffic(awake, 30, 0.2)  # calmer, but not for long enough yet
            seen.append(("calming", awake.held, wake_up_latency()))
            await traffic(awake, 30, 1.2)
            seen.append(("calm", awake.held, wake_up_latency()))
            await traffic(awake, 1000, 0.3)
            seen.append(("busy again", awake.held, wake_up_latency()))
            assert awake.times_held == 2 and awake.problem is None
            assert awake.status()["held"] is True and awake.status()["held_since"].endswith("Z")
            await asyncio.sleep(1.3)  # no message at all: let go after calm_after, then no more looks at the rate
            seen.append(("quiet", awake.held, wake_up_latency()))
            looks = awake.looks
            await asyncio.sleep(0.3)
            assert awake.looks == looks, "a quiet server is not woken up to look at a rate of nothing"
        finally:
            awake.stop()
        seen.append(("stopped", awake.held, wake_up_latency()))

    asyncio.run(run())
    assert seen == [("slow", False, before), ("busy", True, 0), ("calming", True, 0), ("calm", False, before),
                    ("busy again", True, 0), ("quiet", False, before), ("stopped", False, before)]


def test_without_the_right_to_the_device_nothing_changes_but_the_status_says_why() -> None:
    async def run() -> AwakeWhileBusy:
        awake = AwakeWhileBusy(device="/nonexistent/cpu_dma_latency", tick=0.05)
        awake.start()
        try:
            await traffic(awake, 1000, 0.3)
        finally:
            awake.stop()
        return awake

    awake = asyncio.run(run())
    assert not awake.held and awake.times_held == 0
    assert awake.problem is not None and "/nonexistent/cpu_dma_latency cannot be opened" in awake.problem
    assert awake.status()["problem"] == awake.problem


def test_a_busy_mllp_listener_keeps_the_cpus_polling_unless_told_not_to(demo_db: str) -> None:
    for args, polls in (((), True), (("--no-poll-when-busy",), False)):
        port = free_port()
        server = RebondServer(demo_db, "--mllp-port", str(port), *args).start()
        try:
            admissions = Traffic(seed=3)
            now = dt.datetime.now(dt.UTC)
            batches = [[admissions.admission(now).encode() for _ in range(150)] for _ in range(2)]
            senders = [threading.Thread(target=send_messages, args=("127.0.0.1", port, batch)) for batch in batches]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
            # the rate is looked at every TICK: the request follows within one, and stays for CALM_AFTER
            deadline = time.monotonic() + 4 * TICK
            while True:
                facts = server.status()["mllp"]
                if facts.get("cpus_polling", {}).get("held") or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            latency = wake_up_latency()
        finally:
            server.stop()
        if polls:
            assert facts["cpus_polling"]["held"] is True and facts["cpus_polling"]["times_held"] == 1, facts
            assert latency == 0
            assert wake_up_latency() > 0, "the request goes with the server"
        else:
            assert "cpus_polling" not in facts and latency > 0
