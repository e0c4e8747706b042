"""The embedded engine: one SQLite file in WAL mode, every commit on disk before it returns."""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import quote

from rebond.durable import replace_durably
from rebond.store.base import Session, StoreError, Unavailable
from rebond.store.schema import DROPPED_INDEXES, SCHEMA_VERSION, Types, added_columns, ddl
from rebond.store.sql import Cursor, SQLSession, SQLStore
from rebond.store.upgrade import check_schema, drop_joined_rows, has_joined_rows, has_numbered_rows, schema_of, upgrade_index

if TYPE_CHECKING:
    from rebond.store import StoreFacts

log = logging.getLogger("rebond.store")
PAGE_SIZE = 2048
# Python's sqlite3 binds an int, a float or a str as it is, but sends a None or a bytes through its adaptation
# protocol first, where each misses twice (an AttributeError formatted, then cleared): about 0.7 µs a parameter, and a
# lab panel's commit binds some 110 of them (the NULL parts of index rows, the bodies). Adapters registered for their
# exact types answer from the registry at once, with the same value: None (NULL), the same bytes (a BLOB).
_NOTHING: dict[None, None] = {}
sqlite3.register_adapter(type(None), _NOTHING.get)  # a builtin: no Python frame a parameter
sqlite3.register_adapter(bytes, bytes)
_TYPES = Types(serial_pk="INTEGER PRIMARY KEY AUTOINCREMENT", bigint="INTEGER", real="REAL", blob="BLOB", clustered=" WITHOUT ROWID")
_PRAGMAS = (
    # a new store's pages (an existing one keeps its own): a commit writes each page it changed whole to the WAL and
    # fsyncs it, and a lab result changes a row or two in each of some 80 B-trees; in pages of 2 KiB instead of 4 it
    # writes 35 % fewer bytes for the same rows (docs/benchmarks.md, stop 23)
    f"PRAGMA page_size={PAGE_SIZE}",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",  # the WAL is fsynced at every commit: an acknowledged write survives a power cut
    "PRAGMA busy_timeout=30000",
    "PRAGMA cache_size=-65536",
    "PRAGMA temp_store=MEMORY",
    "PRAGMA mmap_size=268435456",
)
#: past this size the writer itself waits for a full checkpoint (a checkpointer starved by long readers)
WAL_HARD_LIMIT = 512 * 1024 * 1024
#: a WAL started over keeps its file up to this size (the hard limit, and what a checkpoint may lag behind it):
#: the commits after write over blocks the file has, instead of appending blocks that each commit's fdatasync must
#: also record in the file system's journal (the intake writer's commit 9 % faster: bench/wal_reuse.py). Only where
#: the log's length can be read from the wal-index (`_log_frames`): elsewhere the file's size is all there is to go
#: by, and a file kept long would look like a long log at every commit
WAL_KEPT = WAL_HARD_LIMIT + 64 * 1024 * 1024
#: where the log's length is known from the file's size alone, the file is cut back to this when the log starts over
WAL_CUT_BACK = 64 * 1024 * 1024


GROUP_COMMIT_MAX = 64
#: the writer's page cache when its commits are many and small (`for_small_commits`)
SMALL_COMMITS_CACHE_KIB = 2048
ANALYZE_MIN_WRITES = 2000
#: the writer's own commits remembered for the drafts made before them (`_OwnCommits`): a few seconds of the intake's
OWN_COMMITS_KEPT = 512
#: the sp_token_texts rows the writer remembers as committed (`_KnownTexts`): a group's codes with their texts
KNOWN_TEXTS_KEPT = 65536
#: the checkpointer copies the WAL into the database this often while writes come in (seconds)
CHECKPOINT_EVERY = 0.25
T = TypeVar("T")


@functools.cache
def _wal_vfs() -> str | None:
    """The VFS that writes a commit's WAL frames in one call (store/_walvfs.c), if it was built and not turned off.

    REBOND_SQLITE_VFS=default turns it off, and REBOND_WAL_READS=pread its reads of the WAL through a map and the
    databases' maps it keeps alone (to rule them out when looking into a problem, or to measure the difference:
    bench/hl7_bench.py --wal-reads).
    """
    if os.environ.get("REBOND_SQLITE_VFS", "").lower() in ("default", "unix", "off"):
        return None
    try:
        from rebond.store import _walvfs
    except ImportError as err:
        log.warning("SQLite commits write their pages one by one: the 'rebond' VFS is not built (%s)", err)
        return None
    if os.environ.get("REBOND_WAL_READS", "").lower() == "pread":
        _walvfs.read_through_map(False)
    return str(_walvfs.NAME)


def _walvfs_reads_through_map() -> bool:
    """Whether the 'rebond' VFS reads WALs through a map and keeps databases' maps (REBOND_WAL_READS turns it off)."""
    from rebond.store import _walvfs

    return _walvfs.reads_through_map()


def stop_counting_memory() -> bool:
    """SQLite stops counting the memory it holds, in this process: every allocation and free took a global mutex for
    it, 6 % of the intake writer's instructions. Possible only before the process's first connection, from its only
    thread (store/_walvfs.c); False when it could not be done (a connection is open, or the VFS is not built)."""
    try:
        from rebond.store import _walvfs
    except ImportError:
        return False
    return _walvfs.stop_counting_memory()


class _Work:
    __slots__ = ("fn", "result", "error", "done", "journaled", "rerunnable")

    def __init__(self, fn: Callable[[Session], Any], rerunnable: bool = False) -> None:
        self.fn = fn
        self.rerunnable = rerunnable  # it may be run again from its start (it keeps nothing outside the transaction)
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.journaled: list[int] = []


def _disk_full(err: BaseException) -> Unavailable | None:
    """A write refused for want of room on the disk, said so: nothing of it was written, and it may be sent again."""
    if isinstance(err, sqlite3.Error) and getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return Unavailable(f"the disk of the store is full: nothing was written ({err}); send it again once room has been made")
    return None


class _OwnCommits:
    """What the writer's connection has itself committed since another connection last committed, commit by commit: a
    draft (store/draft.py) whose state is later than that other commit, and whose reads none of these commits touched,
    still holds, and nothing it read needs reading again under the lock.

    SQLite commits one transaction at a time, and a version's seq is above every seq committed before it. `PRAGMA
    data_version`, on the writer's connection, changes when any other connection has committed. So at the start of
    each write transaction: if it changed, everything up to the highest seq then stored (`after`) may be someone
    else's, and the commits kept are dropped; the commits made since are this connection's, each kept with the highest
    seq it wrote and the resources and resource types it wrote. A draft whose state's highest seq (its mark) is above
    `after` saw every other connection's commit, so what was committed after its state is in the commits kept here
    whose highest seq is above its mark, and in the transaction under way.
    """

    def __init__(self) -> None:
        self.data_version: int | None = None
        self.after: int | None = None  # None: nothing known yet
        self.commits: deque[tuple[int, frozenset[tuple[str, str]], frozenset[str]]] = deque()
        # the transaction under way: what it wrote, its highest seq, a version rewritten in place (its seq is old)
        self.keys: set[tuple[str, str]] = set()
        self.types: set[str] = set()
        self.top = 0
        self.in_place = False

    def begin(self, cur: sqlite3.Cursor) -> float | None:
        """At the start of a write transaction: the latest lastUpdated stored when another connection has committed
        since the last one (None when none has)."""
        self.keys.clear()
        self.types.clear()
        self.top, self.in_place = 0, False
        version = cur.execute("PRAGMA data_version").fetchone()[0]
        if version == self.data_version:
            return None
        self.data_version = version
        top, latest = cur.execute("SELECT (SELECT max(seq) FROM versions), (SELECT max(lu) FROM versions)").fetchone()
        self.after = int(top or 0)
        self.commits.clear()
        return float(latest) if latest is not None else None

    def wrote(self, resource_type: str, resource_id: str, seq: int | None) -> None:
        """A version written in the transaction under way; seq None: an earlier version rewritten in place."""
        self.keys.add((resource_type, resource_id))
        self.types.add(resource_type)
        if seq is None:
            self.in_place = True
        elif seq > self.top:
            self.top = seq

    def forget(self) -> None:
        """A commit that failed, or may not have, or that changed a version in place: nothing is known until the next
        transaction looks again."""
        self.data_version = None

    def committed(self) -> None:
        if self.in_place:  # a seq below others' marks changed
            self.forget()
        elif self.keys:
            self.commits.append((self.top, frozenset(self.keys), frozenset(self.types)))
            if len(self.commits) > OWN_COMMITS_KEPT:
                self.after = self.commits.popleft()[0]

    def untouched(self, mark: int | None, keys: Collection[tuple[str, str]], types: Collection[str]) -> bool:
        """Nothing committed after the state whose highest seq is `mark`, nor written so far in the transaction under
        way, is one of these resources or of these types."""
        if mark is None or self.after is None or mark <= self.after:
            return False
        if not self.keys.isdisjoint(keys) or not self.types.isdisjoint(types):
            return False
        for top, written, written_types in reversed(self.commits):
            if top <= mark:
                return True
            if not written.isdisjoint(keys) or not written_types.isdisjoint(types):
                return False
        return True


class _KnownTexts:
    """The rows of sp_token_texts (a code's text, store/schema.py) the writer's connection knows to be committed. The
    table only grows: a row known there is not offered again. A lab panel offered some 7 rows, nearly always there
    already, each a probe of the table's index under the lock (2 % of the intake writer's instructions).

    Rows offered by a transaction are known once it has committed: a rolled-back one, or a work rolled back to its
    savepoint, may have been the one that inserted them (then all the transaction's are let go: it happens rarely)."""

    def __init__(self) -> None:
        self.known: set[tuple[str, str, str]] = set()
        self.offered: set[tuple[str, str, str]] = set()

    def unknown(self, texts: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        new = [text for text in texts if text not in self.known]
        self.offered.update(new)
        return new

    def committed(self) -> None:
        if len(self.known) + len(self.offered) > KNOWN_TEXTS_KEPT:
            self.known.clear()
        self.known |= self.offered
        self.offered.clear()

    def let_go(self) -> None:
        self.offered.clear()


class SQLiteStore(SQLStore):
    """Writers take turns on one connection; each reading thread has its own connection."""

    local_reads = True

    def __init__(self, path: str, site_id: str) -> None:
        super().__init__(site_id)
        self.path = path
        self._absolute = os.path.abspath(path)  # as the connections open it, and as SQLite names it (no link on the way)
        #: the SQLite VFS of every connection: 'rebond' (commits written in one call) or None (SQLite's default)
        self.vfs = _wal_vfs() if path != ":memory:" else None
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        # writers in other processes (MLLP workers, `rebond serve --workers`, a CLI import) queue on this file lock
        # rather than on SQLite's busy handler, which polls with sleeps of up to 100 ms
        self._file_lock = os.open(path + "-writer.lock", os.O_RDWR | os.O_CREAT, 0o600) if path != ":memory:" else None
        self._queue_lock = threading.Lock()
        self._queue: list[_Work] = []
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._checkpointer: _Checkpointer | None = None
        self._own = _OwnCommits()
        self._texts = _KnownTexts()
        self._writer = self._connect()
        self._frame_bytes = int(self._writer.execute("PRAGMA page_size").fetchone()[0]) + 24  # a page and its header
        try:
            self.schema_found = stored_schema(self._writer)
            check_schema(self.schema_found)
        except StoreError:
            self.close()
            raise
        for statement in ddl(_TYPES):
            self._writer.execute(statement)
        self._add_columns()
        self._upgrade_index()
        self._upgrade(lambda: not has_joined_rows(self._writer.cursor()), lambda: drop_joined_rows(self._writer.cursor()))
        self._drop_indexes()
        # a store made by an earlier Rebond has had its new tables made above, and its new columns added: it is of this schema
        self._writer.execute(
            "INSERT INTO rebond_meta (name, value) VALUES ('schema', ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value"
            " WHERE CAST(rebond_meta.value AS INTEGER) < CAST(excluded.value AS INTEGER)", (str(SCHEMA_VERSION),)
        )
        self._writes_since_analyze = 0
        self._rows_at_analyze = self._row_estimate()
        if self._rows_at_analyze and self._writer.execute("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone()[0] == 0:
            self._analyze()
        if path != ":memory:":
            # a commit only appends to the WAL and fsyncs it; copying pages back into the database (a
            # checkpoint) happens beside, on another connection, off the path of acknowledged writes
            self._writer.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = _Checkpointer(self._connect())

    def _missing_columns(self) -> list[tuple[str, str, str]]:
        added = added_columns(_TYPES)
        present = {(table, row[1]) for table in {t for t, _c, _k in added}
                   for row in self._writer.execute(f"PRAGMA table_info({table})")}
        return [(table, column, kind) for table, column, kind in added if (table, column) not in present]

    def _add_columns(self) -> None:
        """A store made by an earlier Rebond gets the columns added since (schema.ADDED_COLUMNS)."""
        def add() -> None:
            for table, column, kind in self._missing_columns():
                self._writer.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

        self._upgrade(lambda: not self._missing_columns(), add)

    def _present_dropped_indexes(self) -> list[str]:
        return [row[0] for row in self._writer.execute(
            f"SELECT name FROM sqlite_master WHERE type = 'index' AND name IN ({', '.join('?' * len(DROPPED_INDEXES))})",
            DROPPED_INDEXES)]

    def _drop_indexes(self) -> None:
        """A store made by an earlier Rebond loses the indexes no longer kept up (schema.DROPPED_INDEXES)."""
        def drop() -> None:
            for index in self._present_dropped_indexes():
                log.info("dropping the index %s, no longer kept up", index)
                self._writer.execute(f"DROP INDEX IF EXISTS {index}")

        self._upgrade(lambda: not self._present_dropped_indexes(), drop)

    def _upgrade_index(self) -> None:
        """A store made before schema 4: its index tables made again (store/upgrade.py)."""
        def current() -> bool:
            return has_numbered_rows([row[1] for row in self._writer.execute("PRAGMA table_info(sp_token)")])

        self._upgrade(current, lambda: upgrade_index(self._writer.cursor(), _TYPES))

    def _upgrade(self, done: Callable[[], bool], work: Callable[[], None]) -> None:
        """Bring a store made by an earlier Rebond to this schema, unless `done` says it is: `work` and the schema's
        number in one transaction, under the writers' file lock, so that the other processes starting with this one
        (`--workers`, the MLLP writer) wait for as long as it takes, where SQLite's own lock would give up after its
        busy timeout; `done` is asked again under the lock, since another process may have done it meanwhile."""
        if done():
            return
        with self._across_processes():
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                if not done():
                    work()
                    self._writer.execute("UPDATE rebond_meta SET value = ? WHERE name = 'schema'", (str(SCHEMA_VERSION),))
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.vfs is None:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            else:
                target = f"file:{quote(self._absolute)}?vfs={self.vfs}"
                conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=30, uri=True)
            for pragma in _PRAGMAS:
                conn.execute(pragma)
            conn.execute(f"PRAGMA journal_size_limit={WAL_CUT_BACK if self.vfs is None else WAL_KEPT}")
        except sqlite3.Error as err:
            raise Unavailable(f"cannot open the SQLite database {self.path}: {err}") from err
        self._all.append(conn)
        return conn

    def insert_new(self, cur: Cursor, version_row: tuple[Any, ...]) -> tuple[int, int] | None:
        """The version first, then the resource row pointing at it: two statements instead of three (no pointer to
        fix afterwards), as for several (`insert_many_new`). An id that exists already conflicts with its version 1,
        or with its resource row (then the version just written goes)."""
        return self.insert_many_new(cur, [version_row]).get((version_row[0], version_row[1]))

    def insert_many_new(self, cur: Cursor, version_rows: list[tuple[Any, ...]]) -> dict[tuple[str, str], tuple[int, int]]:
        """As `insert_new`, two statements for all of them (up to 100) instead of two each: the versions, then the
        resource rows pointing at them, each statement's rows told apart by their type and id (RETURNING gives them
        in no set order). A lab panel's seven or so resources took 14 statements."""
        made: dict[tuple[str, str], tuple[int, int]] = {}
        for start in range(0, len(version_rows), 100):
            part = version_rows[start:start + 100]
            values = ", ".join([f"(?, ?, ?, ?, ?, ?, {self.txid_sql}, ?)"] * len(part))
            cur.execute(f"INSERT INTO versions (res_type, res_id, version, lu, method, site_id, txid, body) VALUES {values}"
                        " ON CONFLICT (res_type, res_id, version) DO NOTHING RETURNING res_type, res_id, seq",
                        [value for row in part for value in row])
            seqs = {(rtype, rid): int(seq) for rtype, rid, seq in cur.fetchall()}
            if not seqs:
                continue
            pointing = [(rtype, rid, seqs[(rtype, rid)], lu) for rtype, rid, _version, lu, *_rest in part if (rtype, rid) in seqs]
            cur.execute(f"INSERT INTO resources (res_type, res_id, version, seq, lu, deleted) VALUES"
                        f" {', '.join(['(?, ?, 1, ?, ?, 0)'] * len(pointing))}"
                        " ON CONFLICT (res_type, res_id) DO NOTHING RETURNING res_type, res_id, rid",
                        [value for row in pointing for value in row])
            for rtype, rid, internal in cur.fetchall():
                seq = seqs.pop((rtype, rid))
                made[(rtype, rid)] = (int(internal), seq)
                self._own.wrote(rtype, rid, seq)
            for orphan in seqs.values():  # a resource row there without its first version: the version goes again
                cur.execute("DELETE FROM versions WHERE seq = ?", (orphan,))
        return made

    def record_version(self, cur: Cursor, internal: int, version_row: tuple[Any, ...]) -> int:
        seq = super().record_version(cur, internal, version_row)
        self._own.wrote(version_row[0], version_row[1], seq)
        return seq

    def lock_key(self, cur: Cursor, key: str) -> None:
        """Nothing to do: SQLite write transactions already run one at a time."""

    def _thread_connection(self) -> sqlite3.Connection:
        """This thread's connection for reads, opened at its first."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    @contextmanager
    def reader(self) -> Iterator[Cursor]:
        cur = self._thread_connection().cursor()
        try:
            yield cur
        finally:
            cur.close()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction on this thread's connection: one state throughout, and SQLite takes a read lock on the
        WAL and looks whether the log has moved once, not at every statement; after another connection's commit, that
        look empties the connection's page cache, and a draft's six statements could see it more than once."""
        conn = self._thread_connection()
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:  # never left in it: this thread's later reads would all see this state
                conn.execute("ROLLBACK")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._write_lock, self._across_processes():
            cur = self._writer.cursor()
            self._begin(cur)
            try:
                session = SQLSession(self, cur)
                yield session
                session.flush()
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                try:
                    cur.execute("COMMIT")
                except BaseException:
                    self._own.forget()
                    raise
                self._committed(session.writes)
            finally:
                cur.close()

    @contextmanager
    def _across_processes(self) -> Iterator[None]:
        if self._file_lock is None:
            yield
            return
        fcntl.flock(self._file_lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._file_lock, fcntl.LOCK_UN)

    def _begin(self, cur: sqlite3.Cursor) -> None:
        cur.execute("BEGIN IMMEDIATE")
        latest = self._own.begin(cur)
        self._texts.let_go()  # what an earlier transaction that did not commit offered
        # another connection may have committed a later instant: versions keep increasing times across processes
        if latest is not None and latest > self._last_clock:
            self._last_clock = latest

    def commit_mark(self) -> int | None:
        row = self._thread_connection().execute("SELECT max(seq) FROM versions").fetchone()
        return int(row[0] or 0)

    def rewrote(self, resource_type: str, resource_id: str) -> None:
        self._own.wrote(resource_type, resource_id, None)

    def draft_holds(self, mark: int | None, keys: Collection[tuple[str, str]], types: Collection[str]) -> bool:
        return self._own.untouched(mark, keys, types)

    def unknown_texts(self, texts: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        return self._texts.unknown(texts)

    def write(self, work: Callable[[Session], T]) -> T:
        """Group commit: concurrent writers queue their work; whoever holds the write lock runs
        everything queued in one transaction, each piece under its own savepoint (a failing piece
        rolls back alone), and one fsync'd COMMIT makes them all durable before any returns."""
        item = _Work(work)
        self._commit([item])
        if item.error is not None:
            raise item.error
        return cast(T, item.result)

    def write_many(self, works: Sequence[Callable[[Session], T]], *, rerunnable: bool = False) -> list[T | BaseException]:
        """Several works queued at once, so that they share commits (each under its own savepoint).

        `rerunnable`: each work may be run a second time from its start. A batch made only of such works
        is first run without savepoints (a savepoint copies every page it touches: about 5 % of a lab
        result's commit); if one of them fails, all of it is rolled back and run again, each work under
        its savepoint, so that the failing one fails alone.
        """
        items = [_Work(work, rerunnable) for work in works]
        self._commit(items)
        return [item.error if item.error is not None else cast(T, item.result) for item in items]

    def _commit(self, items: list[_Work]) -> None:
        """Queue the items and return once all are committed or failed; whoever holds the lock commits for all."""
        with self._queue_lock:
            self._queue.extend(items)
        for item in items:
            while not item.done:
                with self._write_lock:
                    if item.done:
                        break
                    with self._queue_lock:
                        batch = self._queue[:GROUP_COMMIT_MAX]
                        del self._queue[:GROUP_COMMIT_MAX]
                    with self._across_processes():
                        self._run_batch(batch)
        journaled = [seq for item in items if item.error is None for seq in item.journaled]
        if journaled and self.after_journal is not None:
            self.after_journal(journaled)

    def _run_batch(self, batch: list[_Work]) -> None:
        # savepoints copy every page they touch to a sub-journal: only worth it when works share the batch, and
        # works that may run again go first without them, then, if one of them failed, again each under its own
        together = len(batch) == 1 or all(item.rerunnable for item in batch)
        try:
            if not self._run(batch, isolate=not together) and len(batch) > 1:
                self._run(batch, isolate=True)
        finally:
            for item in batch:
                item.done = True

    def _run(self, batch: list[_Work], *, isolate: bool) -> bool:
        """The batch in one transaction, each work under its savepoint if `isolate`; False if, without, it did not commit."""
        written = 0
        cur = self._writer.cursor()
        try:
            self._begin(cur)
            for item in batch:
                item.error, item.journaled = None, []
                if isolate:
                    cur.execute("SAVEPOINT work")
                try:
                    session = SQLSession(self, cur)
                    item.result = item.fn(session)
                    session.flush()
                    written += session.writes
                    item.journaled = session.journaled
                except Exception as err:
                    item.error = _disk_full(err) or err
                    if not isolate:
                        cur.execute("ROLLBACK")
                        return False
                    cur.execute("ROLLBACK TO work")
                    self._texts.let_go()
                if isolate:
                    cur.execute("RELEASE work")
            cur.execute("COMMIT")
            self._committed(written)
            return True
        except BaseException as err:  # the batch did not commit: nothing of it is durable
            self._own.forget()
            if self._writer.in_transaction:
                cur.execute("ROLLBACK")
            for item in batch:
                item.error = item.error or _disk_full(err) or Unavailable(f"the SQLite commit failed: {err}")
            if not isinstance(err, Exception):
                raise
            return isolate
        finally:
            cur.close()

    def for_small_commits(self) -> None:
        """A smaller page cache for the writer: at every commit SQLite 3.40 walks the whole cache when a page split
        renumbered a page past the end of the file (a lab panel's commit nearly always has one), and walking 16,000
        pages cost ~5 % of the intake writer against ~1.5 % for 2,000 (perf); the pages it writes stay cached, the
        file's others are mapped (mmap_size). The walk misses the CPU's caches page after page: 2 MiB (some 900 pages)
        took 4–8 % less of the writer's CPU than 8 MiB with one to four lab panels a commit, and as much or a little
        less with sixteen (bench/writer_cache.py, docs/benchmarks.md stop 30); 1 MiB was no surer a gain with two a
        commit (6 % less to 2 % more than 2 MiB), and up to 16 % more than 8 MiB with sixteen, whose pages no longer fit."""
        self._writer.execute(f"PRAGMA cache_size=-{SMALL_COMMITS_CACHE_KIB}")

    def checkpoint_elsewhere(self) -> None:
        """The intake writer leaves its checkpoints to the server process (`committed_elsewhere` there): the writer is
        the busier of the two, and checkpointing took 6 % of a core beside it (top -H) at 4 connections. A commit
        that finds the log over WAL_HARD_LIMIT still checkpoints it at once, here."""
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()

    def committed_elsewhere(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wake()

    def for_reads_between_commits(self) -> None:
        """This thread's reads come just after another connection's commits (the server's drafts, after the intake
        writer's). SQLite then unmaps the whole file at the next read transaction and maps it again: every page read
        is mapped again, a page fault each, 8 % of the server's CPU (perf, stop 25). The 'rebond' VFS keeps the map
        while the file has not grown much (store/_walvfs.c, pUnfetch): then nothing is to be done, and the drafts read
        through it (bench/draft_reads.py: as fast as past it, or a little faster; docs/benchmarks.md, stop 32).
        Without it, this thread reads past the map, with pread(): a draft took 10–25 % less CPU so (stop 25). Other
        threads keep the map either way."""
        if self.vfs is not None and _walvfs_reads_through_map():
            return
        with self.reader() as cur:
            cur.execute("PRAGMA mmap_size=0").fetchall()

    def optimize(self) -> None:
        with self._write_lock, self._across_processes():
            self._analyze()

    def _analyze(self) -> None:
        # a sampled ANALYZE takes milliseconds; without statistics SQLite scans a whole resource type
        # instead of starting from the index rows a search names
        self._writer.execute("PRAGMA analysis_limit=1000")
        self._writer.execute("ANALYZE")
        self._rows_at_analyze = max(self._row_estimate(), 1)
        self._writes_since_analyze = 0

    def _row_estimate(self) -> int:
        row = self._writer.execute("SELECT max(seq) FROM versions").fetchone()
        return int(row[0] or 0)

    def _committed(self, count: int) -> None:
        """After a COMMIT that returned, of `count` writes: what the writer now knows committed, and the analysis."""
        self._own.committed()
        self._texts.committed()
        self._note_writes(count)

    def _note_writes(self, count: int) -> None:
        """Called under the write lock after a commit: re-analyze when the data has grown by a fifth."""
        if count and self.path != ":memory:":
            if self._checkpointer is not None:
                self._checkpointer.wake()
            frames = _log_frames(self._absolute) if self.vfs is not None else None
            if (frames * self._frame_bytes if frames is not None else _size(self.path + "-wal")) > WAL_HARD_LIMIT:
                self._writer.execute("PRAGMA wal_checkpoint(RESTART)")
        self._writes_since_analyze += count
        if self._writes_since_analyze > max(ANALYZE_MIN_WRITES, self._rows_at_analyze // 5):
            self._analyze()

    def local_file(self) -> str | None:
        return None if self.path == ":memory:" else self.path

    def database(self) -> dict[str, Any]:
        """One file on this machine, each commit fsynced; its copies are the site nodes' and the backups."""
        return {"engine": "sqlite", "file": self.local_file(), "problem": None}

    def backup(self, target: str) -> dict[str, int]:
        """Copy the whole store into `target` as of its last commit, while it serves, and check the copy.

        One read transaction copies every page (SQLite's online backup, in one step: a copy made in
        steps starts over whenever someone commits meanwhile). Writers go on; the WAL grows a little
        until the copy ends. The copy is written aside, checked (`quick_check`), synced, then renamed:
        `target` is whole or absent. Returns what the copy holds.
        """
        if self.path == ":memory:":
            raise StoreError("a store in memory has nothing on disk to back up")
        partial = target + ".partial"
        _remove_aside(partial)
        source = self._connect()
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            source.backup(copy)
            check = copy.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"the copy does not check out ({check}): nothing was kept")
            counts = {
                "resources": copy.execute("SELECT count(*) FROM resources WHERE deleted = 0").fetchone()[0],
                "versions": copy.execute("SELECT count(*) FROM versions").fetchone()[0],
                "journal_pending": copy.execute("SELECT count(*) FROM journal WHERE status IN ('pending', 'conflict')").fetchone()[0],
                "messages": copy.execute("SELECT count(*) FROM inbox").fetchone()[0],
            }
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, whatever opens it next
        except BaseException as err:
            copy.close()
            _remove_aside(partial)
            if isinstance(err, sqlite3.Error):  # a full disk, an unreadable page: said in one line by the caller
                raise StoreError(f"the copy failed: {err}") from err
            raise
        finally:
            source.close()
            with suppress(ValueError):
                self._all.remove(source)
        copy.close()
        replace_durably(partial, target)
        counts["bytes"] = os.path.getsize(target)
        return counts

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        for conn in self._all:
            with suppress(sqlite3.Error):
                conn.close()
        self._all.clear()
        if self._file_lock is not None:
            os.close(self._file_lock)
            self._file_lock = None


def inspect(path: str) -> StoreFacts:
    """The store in this file, read-only: its schema, its size, its page size; no file is made where there is none."""
    from rebond.store import StoreFacts

    if path == ":memory:" or not os.path.exists(path):
        return StoreFacts("sqlite", path, None, 0)
    try:
        with closing(sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=30)) as conn:
            schema = stored_schema(conn)
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path} cannot be read as a SQLite store: {err}") from None
    size = _size(path) + _size(path + "-wal")
    return StoreFacts("sqlite", path, schema, size, page_size)


def stored_schema(conn: sqlite3.Connection) -> int | None:
    """The schema of the store on this connection (None: no store in the file yet)."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    stamped = conn.execute("SELECT value FROM rebond_meta WHERE name = 'schema'").fetchone() if "rebond_meta" in tables else None
    return schema_of(tables, stamped[0] if stamped else None)


def _remove_aside(partial: str) -> None:
    """A copy being made aside, and SQLite's files beside it."""
    for leftover in (partial, partial + "-wal", partial + "-shm", partial + "-journal"):
        with suppress(FileNotFoundError):
            os.remove(leftover)


def _log_frames(path: str) -> int | None:
    """The frames in the WAL of the store at `path`, from the wal-index a connection of this process maps (through
    the 'rebond' VFS: store/_walvfs.c); None when it cannot be read."""
    from rebond.store import _walvfs

    return _walvfs.log_frames(path)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _Checkpointer:
    """A thread that copies committed WAL pages into the database file while the writer goes on.

    SQLite's own automatic checkpoint runs inside the COMMIT that crosses its threshold, so one
    acknowledgement in a few hundred waited for thousands of page writes and an fsync of the
    database. Here a PASSIVE checkpoint (it never blocks the writer nor readers) runs at most every
    CHECKPOINT_EVERY seconds after commits; the sqlite3 module lets go of the GIL meanwhile.
    When a checkpoint has copied everything, the next commit starts the WAL over from its beginning.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wanted.wait()
            if self._stopping:
                return
            self._wanted.clear()
            try:
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as err:  # busy or closing: the next commit wakes it again
                log.debug("checkpoint skipped: %s", err)
            time.sleep(CHECKPOINT_EVERY)

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join(timeout=5)
        with suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
