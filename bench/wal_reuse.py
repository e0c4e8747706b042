"""What the intake writer's commit costs when the WAL is written over blocks its file already has, against appended to
a file that grows (docs/benchmarks.md, stop 27: why a WAL started over keeps its file, store/sqlite.py WAL_KEPT).

    .venv/bin/python bench/wal_reuse.py [--commits 250] [--rounds 3]

On the store of bench/intake_instructions.py, lab panels are drafted and written as the server and the intake writer
do, two a commit, and only the writer's commit is timed (wall and CPU). Baseline, alternated with it in each round:
the WAL cut back to nothing at each checkpoint, so that every commit appends to the file, as a WAL cut back to 64 MiB
(Rebond until stop 26) did once it had passed that size. Measured: the WAL's file kept long (filled beforehand), and
started over at each checkpoint, so that every commit writes over blocks already there. Checkpoints every 25 commits,
from the same thread, in both.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sqlite3
import statistics
import time
from pathlib import Path

from common import SCRATCH, machine
from intake_instructions import fresh_copy, intake_stores, prepared_store

PER_COMMIT = 2
CHECKPOINT_EVERY = 25  # commits
KEPT = 400 << 20  # bytes of WAL file written over


def one_run(source: Path, messages: list[bytes], commits: int, kept: bool) -> tuple[float, float]:
    """(wall, CPU) ms a commit of the writer."""
    from rebond.hl7.intake import prepare, receive_many, unpack

    work = SCRATCH / "wal-reuse.db"
    fresh_copy(source, work)
    server, writer = intake_stores(work)
    look = sqlite3.connect(work, isolation_level=None)
    wal = Path(f"{work}-wal")
    if kept:  # the file a long log left behind; SQLite writes its frames from the start again, over these blocks
        look.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()  # an empty log first: the zeros go from its start
        with wal.open("r+b") as f:
            for _ in range(KEPT // (4 << 20)):
                f.write(bytes(4 << 20))
            f.flush()
            os.fsync(f.fileno())
    wall = cpu = 0.0
    try:
        for commit in range(commits):
            if commit % CHECKPOINT_EVERY == 0:
                look.execute(f"PRAGMA wal_checkpoint({'RESTART' if kept else 'TRUNCATE'})").fetchone()
            drafts = []
            for raw in messages[commit * PER_COMMIT:(commit + 1) * PER_COMMIT]:
                prepared = prepare(server, raw)
                assert prepared is not None
                drafts.append((raw, unpack(prepared.packed())))
            started, spent = time.perf_counter(), time.process_time()
            answers = receive_many(writer, drafts)
            wall += time.perf_counter() - started
            cpu += time.process_time() - spent
            assert all(answer.code == "AA" for answer in answers)
        if kept:
            assert wal.stat().st_size >= KEPT, "the WAL's file was cut back"
    finally:
        server.close()
        writer.close()
        look.close()
    return wall * 1000 / commits, cpu * 1000 / commits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    source, messages_path = prepared_store()
    messages: list[bytes] = pickle.loads(messages_path.read_bytes())
    if args.commits * PER_COMMIT > len(messages):
        raise SystemExit(f"--commits: at most {len(messages) // PER_COMMIT}")
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    print(f"\nthe intake writer's commit of {PER_COMMIT} lab panels, ms (wall, CPU), {args.commits} commits a run:")
    for round_ in range(1, args.rounds + 1):
        for kept in (False, True):
            wall, cpu = one_run(source, messages, args.commits, kept)
            runs[kept].append((wall, cpu))
            print(f"  round {round_}  {'written over' if kept else 'appended (baseline)':<20} {wall:6.2f} {cpu:6.2f}", flush=True)
    base_wall, base_cpu = (statistics.mean(r[i] for r in runs[False]) for i in (0, 1))
    kept_wall, kept_cpu = (statistics.mean(r[i] for r in runs[True]) for i in (0, 1))
    print(f"\nmeans: appended {base_wall:.2f} / {base_cpu:.2f}, written over {kept_wall:.2f} / {kept_cpu:.2f}"
          f"  (wall {kept_wall / base_wall:.2f} ×, CPU {kept_cpu / base_cpu:.2f} ×)")


if __name__ == "__main__":
    main()
