"""The intake writer's CPU a lab panel with page caches of several sizes, alternated batch by batch in one process.

The same drafted panels are written into copies of one store, one copy a cache size, each batch to every copy in
turn (the order reversed every other batch), so that every size meets the same minutes of this machine. Only the
writing is timed, in the thread's CPU time. The first size given is the baseline of the ratios.

    .venv/bin/python bench/writer_cache.py [--kib 8192 2048 1024] [--batch 2] [--panels 800]

Uses the store and panels of bench/intake_instructions.py (made once, on its first run).
"""
from __future__ import annotations

import argparse
import pickle
import sqlite3
import time

from common import machine
from intake_instructions import SCRATCH, fresh_copy, intake_stores, prepared_store

CHECKPOINT_EVERY = 40  # panels, as bench/intake_instructions.py


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kib", type=int, nargs="+", default=[8192, 2048])
    parser.add_argument("--batch", type=int, default=2, help="panels a commit (2: as with 4 connections)")
    parser.add_argument("--panels", type=int, default=800)
    args = parser.parse_args()
    from rebond.hl7.intake import prepare, receive_many, unpack
    from rebond.store.sqlite import stop_counting_memory

    assert stop_counting_memory()  # as the intake writer's process, before its first connection
    print(f"machine: {machine()}")
    source, messages_path = SCRATCH / "instructions.db", SCRATCH / "instructions-messages.pickle"
    if not source.exists() or not messages_path.exists():
        source, messages_path = prepared_store()
    messages = pickle.loads(messages_path.read_bytes())[:args.panels]
    copies = []
    for kib in args.kib:
        path = SCRATCH / f"writer-cache-{kib}.db"
        fresh_copy(source, path)
        server, writer = intake_stores(path)
        writer._writer.execute(f"PRAGMA cache_size=-{kib}")  # what for_small_commits sets
        copies.append((kib, server, writer, sqlite3.connect(path)))
    drafts = [prepare(copies[0][1], raw) for raw in messages]  # made once, on the state all copies start from
    packed = [(raw, draft.packed()) for raw, draft in zip(messages, drafts, strict=True) if draft is not None]
    spent = dict.fromkeys(args.kib, 0.0)
    for number, start in enumerate(range(0, len(packed), args.batch)):
        for kib, _server, writer, checkpoints in copies if number % 2 == 0 else copies[::-1]:
            batch = [(raw, unpack(blob)) for raw, blob in packed[start:start + args.batch]]
            began = time.thread_time()
            answers = receive_many(writer, batch)
            spent[kib] += time.thread_time() - began
            assert all(answer.code == "AA" for answer in answers), answers
            if (start + args.batch) // CHECKPOINT_EVERY != start // CHECKPOINT_EVERY:
                checkpoints.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    baseline = spent[args.kib[0]]
    print(f"\nthe intake writer's CPU a lab panel ({len(packed)} panels, {args.batch} a commit):")
    for kib, seconds in spent.items():
        print(f"  cache {kib:6d} KiB   {seconds / len(packed) * 1000:6.3f} ms   {seconds / baseline:5.3f} × the first")
    for _kib, server, writer, checkpoints in copies:
        checkpoints.close()
        server.close()
        writer.close()


if __name__ == "__main__":
    main()
