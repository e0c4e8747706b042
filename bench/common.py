"""What the benchmarks share: where Synthea is, a scratch folder, a PostgreSQL when asked for, the machine."""
from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYNTHEA = ROOT.parent / "shared" / "data" / "synthea"
SCRATCH = ROOT / "var" / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def machine() -> str:
    cpus = os.cpu_count()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return f"{platform.machine()}, {cpus} cores{mem}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


@contextmanager
def database(engine: str, name: str) -> Iterator[str]:
    """A fresh database URL on `engine` (sqlite or postgres) for one benchmark."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    if engine == "sqlite":
        path = SCRATCH / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        yield f"sqlite:///{path}"
        return
    from tests.pg_harness import PostgresServer

    server = PostgresServer().start()
    try:
        yield server.create_database(name)
    finally:
        server.stop()


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of some latencies; 0 for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else 0.0


def pace_ms() -> float:
    """How long this machine takes, now, for a fixed piece of interpreted work (ms, the median of five).

    The figures of a benchmark on a shared virtual machine swing with the host: the same instructions take up to
    twice as long in some minutes as in others, with the machine idle (bench/hl7_bench.py prints it beside each
    phase). A phase's figures are comparable with another's only at a like pace."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(60_000):
            total += i * i % 7
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[2]


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) clock ticks of the machine's CPUs so far (/proc/stat): the share the host gave to others."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return (0, 0)
    return sum(fields), fields[7]


def stolen_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share (%) of the CPUs' time the host took for others between two `cpu_ticks`."""
    every, stolen = after[0] - before[0], after[1] - before[1]
    return 100 * stolen / every if every > 0 else 0.0
