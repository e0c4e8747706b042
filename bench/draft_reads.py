"""What reading past the file's map saves the server's drafts (`Store.for_reads_between_commits`, docs/hl7.md).

    .venv/bin/python bench/draft_reads.py [--rounds 30] [--per-round 20]

On the store of bench/intake_instructions.py (the demo group and 300 admissions), one connection drafts each lab panel
as the server does and another commits it as the intake writer does, so that every draft reads just after a commit
of another connection. The drafts are made through SQLite's map of the file (the baseline: how they read before
stop 25, and how the server's other threads read) and past it, alternated every `--per-round` drafts, so that both
ways share the same minutes of a machine whose speed moves. Prints the median CPU a draft each way (the drafting
thread's own, `time.thread_time`) and in how many rounds the drafts past the map took less; the first two rounds
are a warm-up, left out.
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import time

from common import SCRATCH, machine
from intake_instructions import fresh_copy, prepared_store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=20)
    args = parser.parse_args()
    from rebond.hl7.intake import prepare, receive_many
    from rebond.store import open_store

    print(f"machine: {machine()}")
    source, messages_path = prepared_store()
    messages = pickle.loads(messages_path.read_bytes())
    work = SCRATCH / "draft-reads.db"
    fresh_copy(source, work)
    url = f"sqlite:///{work}"
    drafting, writing = open_store(url, site_id="bench"), open_store(url, site_id="bench")
    writing.for_small_commits()
    with drafting.reader() as cur:  # this thread's connection, whose map the rounds switch off and on again
        mapped_size = int(cur.execute("PRAGMA mmap_size").fetchone()[0])
    spent: dict[int, list[float]] = {mapped_size: [], 0: []}
    try:
        n = 0
        for round_ in range(args.rounds):
            for mmap_size in sorted(spent, reverse=bool(round_ % 2)):
                with drafting.reader() as cur:
                    cur.execute(f"PRAGMA mmap_size={mmap_size}").fetchall()
                cpu = 0.0
                for _ in range(args.per_round):
                    raw = messages[n % len(messages)]
                    n += 1
                    started = time.thread_time()
                    prepared = prepare(drafting, raw)
                    assert prepared is not None
                    prepared.packed()
                    cpu += time.thread_time() - started
                    answer = receive_many(writing, [(raw, prepared)])[0]
                    assert answer.code == "AA", answer
                spent[mmap_size].append(cpu / args.per_round * 1000)
    finally:
        drafting.close()
        writing.close()
    through, past = spent[mapped_size][2:], spent[0][2:]
    faster = sum(p < t for p, t in zip(past, through, strict=True))
    base = statistics.median(through)
    print(f"\nCPU a draft (ms, median of {len(through)} rounds of {args.per_round} drafts, each just after another connection's commit):")
    print(f"  through the map (baseline) {base:6.3f}   1.00 ×")
    print(f"  past the map               {statistics.median(past):6.3f}   {statistics.median(past) / base:4.2f} ×"
          f"   (less in {faster} rounds of {len(past)})")


if __name__ == "__main__":
    main()
