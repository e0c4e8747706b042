"""Which B-trees the WAL pages of a lab panel's commit belong to: what each index costs every commit in bytes written,
fsynced and later copied back into the file (docs/benchmarks.md, stop 26).

    .venv/bin/python bench/wal_pages.py [--commits 100] [--per-commit 2]

On the store of bench/intake_instructions.py (the demo group and 300 admissions), lab panels are drafted and written
as the server and the intake writer do, `--per-commit` a commit (2: as with 4 connections). After a warm-up, each
commit's frames are read from the WAL's frame headers and their pages named by SQLite's `dbstat` table. The WAL is
checkpointed every 10 commits from the same thread, not by a timed thread, so that the counts do not depend on the
machine's speed. Baseline: the same raw messages inserted into a plain table, as many a commit, in the same file.
"""
from __future__ import annotations

import argparse
import collections
import pickle
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

from common import SCRATCH, machine
from intake_instructions import fresh_copy, intake_stores, prepared_store

WARM_UP = 50  # commits
CHECKPOINT_EVERY = 10  # commits
_WAL_HEADER, _FRAME_HEADER = 32, 24


def _frame_count(wal: Path, page_size: int) -> int:
    return max(0, (wal.stat().st_size - _WAL_HEADER) // (_FRAME_HEADER + page_size)) if wal.exists() else 0


def _pages(wal: Path, page_size: int, since: int) -> list[int]:
    """The page numbers of the WAL's frames after the first `since`."""
    pages = []
    with wal.open("rb") as f:
        for frame in range(since, _frame_count(wal, page_size)):
            f.seek(_WAL_HEADER + frame * (_FRAME_HEADER + page_size))
            pages.append(struct.unpack(">I", f.read(4))[0])
    return pages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--per-commit", type=int, default=2)
    args = parser.parse_args()
    from rebond.hl7.intake import prepare, receive_many, unpack

    print(f"machine: {machine()}")
    source, messages_path = prepared_store()
    messages: list[bytes] = pickle.loads(messages_path.read_bytes())
    needed = (WARM_UP + args.commits) * args.per_commit
    if needed > len(messages):
        raise SystemExit(f"--commits × --per-commit: at most {len(messages) // args.per_commit - WARM_UP} commits")
    work = SCRATCH / "wal-pages.db"
    fresh_copy(source, work)
    wal = Path(f"{work}-wal")
    server, writer = intake_stores(work)
    look = sqlite3.connect(work, isolation_level=None)
    page_size = int(look.execute("PRAGMA page_size").fetchone()[0])
    look.execute("CREATE TABLE IF NOT EXISTS bench_raw_messages (id INTEGER PRIMARY KEY, raw BLOB NOT NULL)")
    look.execute("PRAGMA synchronous=FULL")

    def panels(commit: int) -> list[bytes]:
        return messages[commit * args.per_commit:(commit + 1) * args.per_commit]

    def counted(write: Callable[[list[bytes]], None]) -> collections.Counter[str]:
        by_tree: collections.Counter[str] = collections.Counter()
        frames = 0
        for commit in range(WARM_UP + args.commits):
            if commit % CHECKPOINT_EVERY == 0:
                look.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            before = _frame_count(wal, page_size)
            write(panels(commit))
            if commit < WARM_UP:
                continue
            pages = _pages(wal, page_size, before)
            frames += len(pages)
            marks = ",".join(str(p) for p in set(pages))
            owner = dict(look.execute(f"SELECT pageno, name FROM dbstat WHERE pageno IN ({marks})").fetchall())
            by_tree.update(owner.get(page, "?") for page in pages)
        by_tree["(all)"] = frames
        return by_tree

    def intake(raws: list[bytes]) -> None:
        drafts = []
        for raw in raws:
            prepared = prepare(server, raw)
            assert prepared is not None
            drafts.append((raw, unpack(prepared.packed())))
        assert all(answer.code == "AA" for answer in receive_many(writer, drafts))

    def baseline(raws: list[bytes]) -> None:
        look.execute("BEGIN")
        look.executemany("INSERT INTO bench_raw_messages (raw) VALUES (?)", [(raw,) for raw in raws])
        look.execute("COMMIT")

    rebond = counted(intake)
    messages = messages[needed:] + messages[:needed]  # other panels' bytes for the baseline: the same sizes
    raw = counted(baseline)
    server.close()
    writer.close()
    look.close()
    per = args.commits
    print(f"\nWAL pages of {page_size // 1024} KiB a commit of {args.per_commit} lab panels ({args.commits} commits):")
    print(f"  rebond    {rebond['(all)'] / per:7.1f}   {rebond['(all)'] / max(raw['(all)'], 1):6.1f} × the baseline")
    print(f"  baseline  {raw['(all)'] / per:7.1f}   (the raw messages inserted into a plain table)")
    print("\nby B-tree (rebond):")
    for name, count in rebond.most_common():
        if name != "(all)":
            print(f"  {count / per:7.1f}  {name}")


if __name__ == "__main__":
    main()
