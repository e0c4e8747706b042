"""The 'rebond' SQLite VFS (store/_walvfs.c): a commit's WAL frames gathered into one write, nothing else changed.

What must hold: it is built and used; every commit is in the file before anyone can see it and
survives a kill -9; big transactions (pages spilled and rewritten in place) read back exactly.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from rebond.store import open_store
from rebond.store.sqlite import SQLiteStore


def _walvfs_counts() -> dict[str, int]:
    from rebond.store import _walvfs

    return _walvfs.counts()


def _plain(path: Path) -> sqlite3.Connection:
    """A connection on SQLite's own VFS, as another program reading the file would have."""
    return sqlite3.connect(path, isolation_level=None, timeout=30)


def test_the_store_uses_the_rebond_vfs_and_gathers_a_commits_frames(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}", site_id="central")
    try:
        assert isinstance(store, SQLiteStore) and store.vfs == "rebond", "the C VFS was not built (make: libsqlite3-dev, gcc)"
        before = _walvfs_counts()
        store.create({"resourceType": "Patient", "name": [{"family": "Martin"}],
                      "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.1", "value": "IPP001"}]})
        after = _walvfs_counts()
        gathered = after["gathered_writes"] - before["gathered_writes"]
        flushes = after["flushes"] - before["flushes"]
        # a patient's commit is dozens of frames (two writes each) written out in a handful of calls
        assert gathered >= 20 and 1 <= flushes <= gathered // 10
    finally:
        store.close()


def test_every_connection_of_a_store_syncs_its_commits(tmp_path: Path) -> None:
    """The VFS writes a commit's gathered frames at the sync SQLite asks for (synchronous=FULL), where a failed write
    fails the commit; with NORMAL the frames would be written at the wal-index barrier, which cannot report a failure
    (a full disk): the commit would return as done (store/_walvfs.c)."""
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}", site_id="central")
    try:
        assert isinstance(store, SQLiteStore)
        store.for_small_commits()  # as the intake writer's
        store.for_reads_between_commits()  # as the drafting thread's
        created = store.create({"resourceType": "Patient", "name": [{"family": "Martin"}]}).stored
        assert store.read("Patient", created.id) is not None  # this thread's connection, opened
        levels = [conn.execute("PRAGMA synchronous").fetchone()[0] for conn in store._all]
        assert len(levels) >= 3 and set(levels) == {2}, levels  # the writer, the checkpointer, this thread's reads
    finally:
        store.close()


WRITER = """
import sys
from rebond.store import open_store
store = open_store(sys.argv[1], site_id="central")
n = 0
while True:
    n += 1
    store.create({"resourceType": "Observation", "status": "final", "code": {"text": f"result {n}"}}, resource_id=f"obs-{n}")
    print(n, flush=True)  # said only once the commit has returned
"""


def test_every_commit_is_visible_to_another_process_and_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, f"sqlite:///{path}"], stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout is not None
    acknowledged = 0
    try:
        with closing(_plain(path)) as other:
            for line in writer.stdout:
                acknowledged = int(line)
                if acknowledged % 50 == 0:
                    # a commit that returned is in the file for a reader on the default VFS, at once
                    seen = other.execute("SELECT count(*) FROM resources WHERE res_type = 'Observation'").fetchone()[0]
                    assert seen >= acknowledged
                if acknowledged >= 400:
                    break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    with closing(_plain(path)) as after:
        assert after.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {row[0] for row in after.execute("SELECT res_id FROM resources WHERE res_type = 'Observation'")}
    assert {f"obs-{n}" for n in range(1, acknowledged + 1)} <= ids


def test_a_transaction_far_over_the_gathering_limit_with_pages_rewritten_reads_back(tmp_path: Path) -> None:
    _walvfs_counts()  # the VFS is registered
    path = tmp_path / "big.db"
    blob = bytes(range(256)) * 16  # 4 KiB
    with closing(sqlite3.connect(f"file:{path}?vfs=rebond", uri=True, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA cache_size=50")  # a tiny cache: pages spill into the WAL mid-transaction, then change again
        conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, body BLOB, note TEXT)")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t VALUES (?, ?, '')", ((n, blob) for n in range(6000)))  # ~25 MiB
        conn.execute("UPDATE t SET note = 'seen ' || n WHERE n % 3 = 0")
        conn.execute("COMMIT")
        with closing(_plain(path)) as other:
            assert other.execute("SELECT count(*), sum(length(body)) FROM t").fetchone() == (6000, 6000 * 4096)
            assert other.execute("SELECT count(*) FROM t WHERE note = 'seen ' || n").fetchone()[0] == 2000
        # a commit without its own sync (synchronous=NORMAL) is still in the file before another connection can see it
        conn.execute("PRAGMA synchronous=NORMAL")
        with closing(_plain(path)) as other:
            for n in range(6000, 6040):
                conn.execute("INSERT INTO t VALUES (?, ?, 'late')", (n, blob))
                assert other.execute("SELECT body FROM t WHERE n = ?", (n,)).fetchone() == (blob,)
    with closing(_plain(path)) as again:
        assert again.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert again.execute("SELECT count(*) FROM t").fetchone()[0] == 6040


def test_the_log_length_is_read_from_the_wal_index_a_connection_maps(tmp_path: Path) -> None:
    """`log_frames` counts the WAL's frames as SQLite does, whoever committed them, from memory this process has
    mapped: never by opening the -shm file, whose closing would drop SQLite's POSIX locks on it."""
    from rebond.store import _walvfs

    path = tmp_path / "frames.db"
    assert _walvfs.log_frames(str(path)) is None, "no connection: nothing to read"
    with closing(sqlite3.connect(f"file:{path}?vfs=rebond", uri=True, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, body BLOB)")
        conn.execute("INSERT INTO t VALUES (1, zeroblob(10000))")
        with closing(_plain(path)) as other:  # another connection, on SQLite's own VFS, commits too
            other.execute("INSERT INTO t VALUES (2, zeroblob(50000))")
            conn.execute("SELECT count(*) FROM t").fetchone()
            frames = _walvfs.log_frames(str(path))
            assert frames is not None and frames > 10
            assert _walvfs.log_frames(os.path.relpath(path)) == frames, "the same file, however it is named"
            _busy, logged, _copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert frames == logged
    assert _walvfs.log_frames(str(path)) is None, "closed: forgotten"


def test_without_the_vfs_a_wal_started_over_is_cut_back_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the wal-index to read the log's length from, the file's size is the log's: a file kept long would
    look like a log over the hard limit at every commit."""
    from rebond.store import sqlite as engine

    monkeypatch.setenv("REBOND_SQLITE_VFS", "default")
    engine._wal_vfs.cache_clear()  # read once a process
    try:
        store = open_store(f"sqlite:///{tmp_path / 'plain.db'}")
        try:
            assert isinstance(store, SQLiteStore) and store.vfs is None
            assert store._writer.execute("PRAGMA journal_size_limit").fetchone()[0] == engine.WAL_CUT_BACK
            store.create({"resourceType": "Patient"})
        finally:
            store.close()
    finally:
        monkeypatch.delenv("REBOND_SQLITE_VFS")
        engine._wal_vfs.cache_clear()
    store = open_store(f"sqlite:///{tmp_path / 'plain.db'}")
    try:
        assert store._writer.execute("PRAGMA journal_size_limit").fetchone()[0] == engine.WAL_KEPT
    finally:
        store.close()


def test_wal_reads_through_the_map_see_every_commit_of_another_connection_and_a_log_started_over(tmp_path: Path) -> None:
    """Pages read from the WAL are copied out of a map of the file (store/_walvfs.c wRead): what a reader gets is what
    the other connection committed, the same as through a read() each, before and after the log is truncated and
    started again, and a 2 KiB page at a time as in Rebond's stores."""
    from rebond.store import _walvfs

    path = tmp_path / "mapped.db"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{path}?vfs=rebond", uri=True, isolation_level=None, timeout=30)
        conn.execute("PRAGMA page_size=2048")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    with closing(connect()) as writer, closing(connect()) as reader, closing(_plain(path)) as checkpointer:
        writer.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, body TEXT NOT NULL)")

        def write(first: int, count: int) -> None:
            writer.execute("BEGIN IMMEDIATE")
            writer.executemany("INSERT INTO t VALUES (?, ?)", ((n, f"result {n} " * 40) for n in range(first, first + count)))
            writer.execute("COMMIT")

        def read_back(upto: int) -> None:
            rows = reader.execute("SELECT n, body FROM t ORDER BY n").fetchall()
            assert rows == [(n, f"result {n} " * 40) for n in range(upto)]

        for map_on in (True, False):
            was = _walvfs.read_through_map(map_on)
            try:
                checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                assert (path.parent / "mapped.db-wal").stat().st_size == 0
                writer.execute("DELETE FROM t")
                before = _walvfs.counts()["mapped_reads"]
                for start in range(0, 600, 50):  # each commit changes pages the reader's cache then no longer trusts
                    write(start, 50)
                    read_back(start + 50)
                mapped = _walvfs.counts()["mapped_reads"] - before
                assert mapped > 100 if map_on else mapped == 0
                # the log copied into the database and started over: shorter than before, then written again
                assert checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
                write(600, 10)
                read_back(610)
                writer.execute("DELETE FROM t WHERE n >= 600")
            finally:
                _walvfs.read_through_map(was)
    with closing(_plain(path)) as after:
        assert after.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_rebond_wal_reads_pread_turns_the_map_off_for_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch an IT team uses to rule the map out, and bench/hl7_bench.py --wal-reads to measure it: read once, when
    the process's first store opens."""
    from rebond.store import _walvfs
    from rebond.store.sqlite import _wal_vfs

    monkeypatch.setenv("REBOND_WAL_READS", "pread")
    _wal_vfs.cache_clear()
    try:
        store = open_store(f"sqlite:///{tmp_path / 'r.db'}", site_id="central")
        store.close()
        assert isinstance(store, SQLiteStore) and store.vfs == "rebond"  # the rest of the VFS is still used
    finally:
        _wal_vfs.cache_clear()
        assert _walvfs.read_through_map(True) is False  # it was off; back on for the tests after this one


def test_a_databases_map_is_kept_between_reads_until_the_file_grows_and_shows_every_commit(tmp_path: Path) -> None:
    """SQLite drops a database's map at each read transaction after another connection's commit; the VFS keeps it
    while the file grew by less than 16 MiB (store/_walvfs.c pUnfetch). The reader sees every commit copied into the
    file, pages past the kept map included, and the map is let go once the file has grown past it."""
    from rebond.store import _walvfs

    path = tmp_path / "kept.db"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{path}?vfs=rebond", uri=True, isolation_level=None, timeout=30)
        for pragma in ("page_size=2048", "journal_mode=WAL", "synchronous=FULL", "wal_autocheckpoint=0", "mmap_size=268435456"):
            conn.execute(f"PRAGMA {pragma}")
        return conn

    blob = bytes(range(256)) * 8  # 2 KiB
    with closing(connect()) as writer, closing(connect()) as reader:
        writer.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        before = _walvfs.counts()
        for step in range(40):  # 40 × 500 rows of 2 KiB: some 40 MiB, the map let go twice on the way
            writer.execute("BEGIN IMMEDIATE")
            writer.executemany("INSERT INTO t VALUES (?, ?)", ((n, blob + n.to_bytes(4, "big")) for n in range(step * 500, step * 500 + 500)))
            writer.execute("COMMIT")
            # copied into the database: the reader's next pages come from the file, through its map or past it
            assert writer.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
            rows = step * 500 + 500
            assert reader.execute("SELECT count(*), sum(length(body)) FROM t").fetchone() == (rows, rows * 2052)
            for n in (0, rows // 2, rows - 1):
                assert reader.execute("SELECT body FROM t WHERE n = ?", (n,)).fetchone()[0] == blob + n.to_bytes(4, "big")
        after = _walvfs.counts()
        assert after["maps_kept"] - before["maps_kept"] >= 30
        assert after["maps_let_go"] - before["maps_let_go"] >= 3
    with closing(_plain(path)) as again:
        assert again.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
