"""Instructions a lab panel costs the HL7 intake, counted by valgrind's callgrind: the same for the same code and
data, where this machine's seconds move by half from one minute to the next (docs/benchmarks.md, stop 24).

    .venv/bin/python bench/intake_instructions.py [--panels 100]

Makes a store once (the demo group and 300 admissions, as bench/hl7_bench.py), then runs each part in a child
process under callgrind twice, counting and not, after the same warm-up, and prints the difference divided by the
panels:
- draft: the server's part, each panel decoded, mapped, validated, indexed and packed for the writer;
- write: the intake writer's part, the drafts made beforehand (in both runs), unpacked and written two a commit, as
  with 4 connections;
- baseline: the raw messages inserted into a SQLite table of the same durability, two a commit: the least a durable
  intake executes for a panel.
PYTHONHASHSEED is fixed and the WAL is checkpointed every 40 panels from the same thread (not by the store's timed
checkpointer), so that nothing timed changes what is executed. Needs valgrind (Debian's package).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import ROOT, SCRATCH, machine

WARM_UP = 20
CHECKPOINT_EVERY = 40  # panels


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def fresh_copy(source: Path, target: Path) -> None:
    """`target` made again as a copy of the store `source` (its WAL and shared memory left behind removed)."""
    _remove(target)
    shutil.copy(source, target)


def intake_stores(path: Path) -> tuple[Any, Any]:
    """Two stores on the SQLite file `path`, the server's drafting one and the intake writer's, tuned as they are in
    `rebond serve`; their timed checkpointers stopped, so that the caller checkpoints at fixed points from its own
    thread and nothing the machine's speed moves changes what is executed or written."""
    from rebond.store import open_store

    url = f"sqlite:///{path}"
    server, writer = open_store(url, site_id="bench"), open_store(url, site_id="bench")
    writer.for_small_commits()
    server.for_reads_between_commits()  # as the server's drafting connection reads
    for store in (server, writer):
        timed = getattr(store, "_checkpointer", None)
        if timed is not None:
            store._checkpointer = None
            timed.stop()
    return server, writer


def _part(part: str, store_path: Path, messages: list[bytes], panels: int, counting: bool) -> None:
    """In the child, under callgrind: the warm-up, then `panels` panels of `part` if `counting`."""
    from rebond.hl7.intake import prepare, receive_many, unpack
    from rebond.store.sqlite import stop_counting_memory

    if part == "write":  # as the intake writer's process does, before its first connection
        assert stop_counting_memory()
    work = SCRATCH / f"instructions-{part}.db"
    fresh_copy(store_path, work)
    checkpoints = sqlite3.connect(work)
    if part == "baseline":
        table = sqlite3.connect(work, isolation_level=None)
        table.execute("PRAGMA journal_mode=WAL")
        table.execute("PRAGMA synchronous=FULL")
        table.execute("CREATE TABLE raw_messages (id INTEGER PRIMARY KEY, raw BLOB NOT NULL)")
        rows = messages[:WARM_UP] + (messages[WARM_UP:WARM_UP + panels] if counting else [])
        for i in range(0, len(rows), 2):
            table.execute("BEGIN")
            table.executemany("INSERT INTO raw_messages (raw) VALUES (?)", [(raw,) for raw in rows[i:i + 2]])
            table.execute("COMMIT")
            if (i + 2) % CHECKPOINT_EVERY == 0:
                checkpoints.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return
    server, writer = intake_stores(work)

    def drafted(raws: list[bytes]) -> list[tuple[bytes, bytes]]:
        out = []
        for raw in raws:
            prepared = prepare(server, raw)
            assert prepared is not None
            out.append((raw, prepared.packed()))
        return out

    def write(batch: list[tuple[bytes, bytes]]) -> None:
        for i in range(0, len(batch), 2):
            answers = receive_many(writer, [(raw, unpack(blob)) for raw, blob in batch[i:i + 2]])
            assert all(a.code == "AA" and not a.redone for a in answers), answers
            if (i + 2) % CHECKPOINT_EVERY == 0:
                checkpoints.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    write(drafted(messages[:WARM_UP]))
    # RESTART, not TRUNCATE: a log truncated by another connection counts as that connection's commit for the writer's
    # `PRAGMA data_version`, and the drafts made after it would all be checked as if others had written (store/sqlite.py
    # _OwnCommits); the server's checkpointer never truncates
    checkpoints.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    measured = messages[WARM_UP:WARM_UP + panels]
    if part == "draft":
        if counting:
            drafted(measured)
    else:
        ready = drafted(measured)  # in both runs: only the writing differs
        if counting:
            write(ready)


def _count(part: str, store_path: Path, messages_path: Path, panels: int, counting: bool) -> int:
    out = SCRATCH / f"callgrind-{part}-{int(counting)}.out"
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'bench'}"}
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__, "--child", part,
                    "--store", str(store_path), "--messages", str(messages_path), "--panels", str(panels),
                    *(["--counting"] if counting else [])], env=env, check=True, capture_output=True)
    summary = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True, check=True).stdout
    total = re.search(r"([\d,]+) \([^)]*\)\s+PROGRAM TOTALS", summary)
    if total is None:
        raise SystemExit(f"no total in {out}")
    return int(total.group(1).replace(",", ""))


def prepared_store() -> tuple[Path, Path]:
    """The demo group with 300 admitted patients, and lab panels for them (not timed)."""
    from rebond.hl7.intake import receive
    from rebond.hl7.simulate import Traffic
    from rebond.seed.demo import seed_demo
    from rebond.store import open_store

    SCRATCH.mkdir(parents=True, exist_ok=True)
    path = SCRATCH / "instructions.db"
    _remove(path)
    store = open_store(f"sqlite:///{path}", site_id="seed")
    try:
        seed_demo(store)
        traffic = Traffic(seed=7)
        now = dt.datetime.now(dt.UTC)
        for _ in range(300):
            assert receive(store, traffic.admission(now).encode()).code == "AA"
        store.optimize()
        messages = [traffic.result(now).encode() for _ in range(WARM_UP + 1000)]
    finally:
        store.close()
    messages_path = SCRATCH / "instructions-messages.pickle"
    messages_path.write_bytes(pickle.dumps(messages))
    return path, messages_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--panels", type=int, default=100)
    parser.add_argument("--child", choices=("draft", "write", "baseline"))
    parser.add_argument("--store", type=Path)
    parser.add_argument("--messages", type=Path)
    parser.add_argument("--counting", action="store_true")
    args = parser.parse_args()
    if args.child:
        _part(args.child, args.store, pickle.loads(args.messages.read_bytes()), args.panels, args.counting)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("bench/intake_instructions.py needs valgrind: apt-get install valgrind")
    print(f"machine: {machine()}")
    store_path, messages_path = prepared_store()
    per_panel = {}
    for part in ("draft", "write", "baseline"):
        counted = _count(part, store_path, messages_path, args.panels, True)
        idle = _count(part, store_path, messages_path, args.panels, False)
        per_panel[part] = (counted - idle) / args.panels
    print(f"\ninstructions a lab panel (callgrind, {args.panels} panels, the difference of two runs):")
    for part, count in per_panel.items():
        print(f"  {part:9s} {count / 1e6:6.2f} M   {count / per_panel['baseline']:6.1f} × the baseline")
    print("(draft: the server's part; write: the intake writer's; baseline: the raw bytes inserted and committed, two a commit)")


if __name__ == "__main__":
    main()
