"""What the benchmarks share: where Synthea is, a scratch folder, a PostgreSQL when asked for, the machine."""
from __future__ import annotations

import os
import platform
import sys
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
