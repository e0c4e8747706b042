"""Sustained ORU^R01 ingest over MLLP with durable acknowledgement, against Rebond and a raw-append baseline.

Seeds the default demo group into a scratch SQLite store, starts `rebond serve --mllp-port`
(with the drafts made by the server process, the default on 2 cores, then by one worker process),
admits the simulator's patients (not timed), then sends lab results over 4 and 32
connections, each connection one message at a time (send, wait for the ACK, send the next),
for a fixed time. Latency is from sending a message to reading its ACK. The baseline, in the
same run, is bench/hl7_baseline.py: the message bytes appended to a file with fsync, then
acknowledged — the least any durable acknowledgement costs.

    .venv/bin/python bench/hl7_bench.py [--seconds 20] [--mllp-workers 0 1] [--wal-reads map pread] [--cpus poll halt]

`--cpus`: Rebond keeps idle CPUs polling while its MLLP intake is busy (ops/awake.py, the default) or lets them halt
(`--no-poll-when-busy`); the baseline is measured both ways too, this script holding the same request for its "poll"
phases, so that each ratio compares like with like.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import ROOT, SCRATCH, cpu_ticks, database, machine, pace_ms, percentile, stolen_share

from rebond.hl7.mllp import END, START, ack_code, send_messages
from rebond.hl7.simulate import Traffic
from rebond.ops.awake import ask_cpus_to_poll
from rebond.seed.demo import seed_demo
from rebond.store import open_store
from tests.pg_harness import free_port
from tests.server import RebondServer


def load(port: int, batches: list[list[bytes]], seconds: float) -> tuple[float, list[float], int]:
    """Closed loop on each connection; returns (messages/s, latencies in ms, negative acks)."""
    latencies: list[float] = []
    refused = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(messages: list[bytes]) -> None:
        mine: list[float] = []
        bad = 0
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            for message in messages:
                if time.monotonic() >= stop_at:
                    break
                started = time.perf_counter()
                conn.sendall(START + message + END)
                data = b""
                while END not in data:
                    data += conn.recv(65536)
                mine.append((time.perf_counter() - started) * 1000)
                bad += ack_code(data) not in ("AA", "CA")
        with lock:
            latencies.extend(mine)
            refused[0] += bad

    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return len(latencies) / elapsed, latencies, refused[0]


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, parent, …); none for a process gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = _stat(pid)
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) / tick, int(fields[12]) / tick) if fields else (0.0, 0.0)


def process_cpu(server: RebondServer) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds so far of the server process, its intake writer and its draft workers (Linux /proc)."""
    assert server.proc is not None
    writer = (server.status().get("mllp") or {}).get("workers", {}).get("writer", {}).get("pid")  # type: ignore[union-attr]
    children = [int(entry.name) for entry in Path("/proc").iterdir()
                if entry.name.isdigit() and (fields := _stat(entry.name)) and int(fields[1]) == server.proc.pid]
    workers = [_cpu_seconds(c) for c in children if c != writer]
    return {"server": _cpu_seconds(server.proc.pid), "writer": _cpu_seconds(writer) if writer else (0.0, 0.0),
            "workers": (sum(u for u, _s in workers), sum(s for _u, s in workers))}


def writer_counts(server: RebondServer) -> tuple[int, int]:
    """(messages written, commits) of the intake writer so far (/status)."""
    writer = (server.status().get("mllp") or {}).get("workers", {}).get("writer", {})  # type: ignore[union-attr]
    return int(writer.get("written") or 0), int(writer.get("batches") or 0)


def timed_load(port: int, batches: list[list[bytes]], seconds: float) -> tuple[tuple[float, list[float], int], str]:
    """`load`, and the machine's state around it: its pace just before and after (`pace_ms`), the share stolen meanwhile."""
    pace_before, ticks_before = pace_ms(), cpu_ticks()
    outcome = load(port, batches, seconds)
    ticks_after, pace_after = cpu_ticks(), pace_ms()
    return outcome, f"{pace_before:5.1f} {pace_after:5.1f} {stolen_share(ticks_before, ticks_after):7.1f}"


@contextlib.contextmanager
def cpus_polling(poll: bool) -> Iterator[None]:
    """The CPUs kept polling when idle while inside (the PM QoS request `rebond serve` makes when busy), or left alone."""
    if not poll:
        yield
        return
    fd = ask_cpus_to_poll()
    try:
        yield
    finally:
        os.close(fd)


def results_for(traffic: Traffic, connections: int, per_connection: int) -> list[list[bytes]]:
    return [[traffic.result(dt.datetime.now(dt.UTC)).encode() for _ in range(per_connection)]
            for _ in range(connections)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--mllp-workers", type=int, nargs="+", default=[0, 1],
                        help="rebond serve --mllp-workers values to measure (0: drafts made by the server process, the default on 2 cores)")
    parser.add_argument("--wal-reads", choices=("map", "pread"), nargs="+", default=["map"],
                        help="how the servers read SQLite's WAL and database, each measured in turn: through maps the VFS"
                             " keeps (the default), or a pread() a WAL page and SQLite's own map (REBOND_WAL_READS=pread,"
                             " docs/operations.md)")
    parser.add_argument("--cpus", choices=("poll", "halt"), nargs="+", default=["poll", "halt"],
                        help="idle CPUs kept polling while the intake is busy (the default of rebond serve) or left to halt"
                             " (--no-poll-when-busy), each measured in turn, the baseline too")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with database("sqlite", "hl7") as url:
        store = open_store(url, site_id="seed")
        seed_demo(store)
        store.optimize()
        store.close()
        traffic = Traffic(seed=7)
        rows = []
        cpu: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}  # ms a message, (user, system)
        senders: dict[tuple[str, int], float] = {}  # this process's CPU: the load's senders, on the same two cores
        per_commit: dict[tuple[str, int], float] = {}  # messages the intake writer took into each commit
        states: list[str] = []  # the machine's pace around each phase, and the share the host stole during it
        for workers, reads, cpus in itertools.product(args.mllp_workers, args.wal_reads, args.cpus):
            port = free_port()
            os.environ["REBOND_WAL_READS"] = reads  # the server's processes take it from this one's
            label = f"rebond/{workers}" + ("" if reads == "map" else " pread") + ("" if cpus == "poll" else " halt")
            server = RebondServer(url, "--mllp-port", str(port), "--mllp-workers", str(workers),
                                  *(() if cpus == "poll" else ("--no-poll-when-busy",))).start()
            try:
                if not rows:
                    admissions = [traffic.admission(dt.datetime.now(dt.UTC)).encode() for _ in range(300)]
                    send_messages("127.0.0.1", port, admissions)
                for connections in (4, 32):
                    batches = results_for(traffic, connections, int(args.seconds * 1200 / connections) + 50)
                    before, sent_before, counts_before = process_cpu(server), os.times(), writer_counts(server)
                    (rate, latencies, refused), machine_state = timed_load(port, batches, args.seconds)
                    after, sent_after, counts_after = process_cpu(server), os.times(), writer_counts(server)
                    written, commits = (a - b for a, b in zip(counts_after, counts_before, strict=True))
                    per_commit[(label, connections)] = written / max(1, commits)
                    cpu[(label, connections)] = {k: tuple((a - b) * 1000 / max(1, len(latencies))  # type: ignore[misc]
                                                            for a, b in zip(after[k], before[k], strict=True)) for k in after}
                    senders[(label, connections)] = ((sent_after.user - sent_before.user + sent_after.system - sent_before.system)
                                                       * 1000 / max(1, len(latencies)))
                    rows.append((label, connections, rate, latencies, refused))
                    states.append(machine_state)
            finally:
                server.stop()
        base_port = free_port()
        journal = SCRATCH / "hl7-baseline.log"
        journal.unlink(missing_ok=True)
        baseline = subprocess.Popen([sys.executable, str(ROOT / "bench" / "hl7_baseline.py"), str(journal), str(base_port)])
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", base_port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            for cpus, connections in itertools.product(args.cpus, (4, 32)):
                batches = results_for(traffic, connections, int(args.seconds * 3000 / connections) + 50)
                with cpus_polling(cpus == "poll"):
                    outcome, machine_state = timed_load(base_port, batches, args.seconds)
                rows.append(("baseline" + ("" if cpus == "poll" else " halt"), connections, *outcome))
                states.append(machine_state)
        finally:
            baseline.terminate()
            baseline.wait()
    base = {(who.endswith(" halt"), c): rate for who, c, rate, _l, _r in rows if who.startswith("baseline")}
    print("(rebond/N: rebond serve --mllp-workers N; 0 = the drafts made by the server process; the intake writer is a process;"
          " pread: the SQLite VFS's maps off, REBOND_WAL_READS=pread: the WAL read with a pread() each;"
          " halt: idle CPUs left to halt, --no-poll-when-busy, against the baseline measured so too)")
    print(f"\n{'server':<20} {'conns':>5} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'refused':>8} {'ratio':>6}   pace ms: before after  stolen %")
    for (who, connections, rate, latencies, refused), state in zip(rows, states, strict=True):
        print(f"{who:<20} {connections:>5} {rate:>8.0f} {percentile(latencies, 50):>8.1f} {percentile(latencies, 99):>8.1f}"
              f" {refused:>8} {rate / base[(who.endswith(' halt'), connections)]:>6.2f}            {state}")
    print("(target: >= 500 messages/s with 4 connections, p99 < 50 ms; SQLite, acknowledged after the commit)")
    print("(pace: ms for a fixed piece of interpreted work, the machine idle, just before and after the phase; lower is faster."
          " stolen: the CPUs' time the host gave to others during it)")
    print("\nCPU per message, ms (user + system, the system part in brackets, from /proc;"
          " `senders`: this script's connections, on the same cores):")
    for (label, connections), spent in cpu.items():
        print(f"{label:<20} {connections:>5}   " + "   ".join(f"{k} {u + s:.2f} [{s:.2f}]" for k, (u, s) in spent.items())
              + f"   total {sum(u + s for u, s in spent.values()):.2f}   (senders {senders[(label, connections)]:.2f})"
              + f"   {per_commit[(label, connections)]:.2f} messages a commit")


if __name__ == "__main__":
    main()
