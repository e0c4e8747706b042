"""The production engine: PostgreSQL through psycopg 3, with a change feed that never skips a commit.

Sequence numbers are handed out when a version is inserted, but transactions
commit in any order: a follower that has read seq 11 may later see seq 10 appear.
The feed therefore only moves past a gap in the sequence once every transaction
that could still hold the missing number has ended (see `changes`).
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from rebond.store.base import Change, ChangePage, Session, Unavailable
from rebond.store.schema import DROPPED_INDEXES, SCHEMA_VERSION, Types, added_columns, ddl, index_columns
from rebond.store.sql import INSERT_TOKEN_TEXT, Cursor, SQLSession, SQLStore, stored_from_row, token_texts
from rebond.store.upgrade import LaterSchema, check_schema, drop_joined_rows, has_joined_rows, has_numbered_rows, schema_of, upgrade_index

if TYPE_CHECKING:
    from rebond.store import StoreFacts

_TYPES = Types(serial_pk="BIGSERIAL PRIMARY KEY", bigint="BIGINT", real="DOUBLE PRECISION", blob="BYTEA", text='TEXT COLLATE "C"')
_PLACEHOLDER = re.compile(r"\?")
SMALL_INDEX_WRITE = 500  # index rows up to which one INSERT statement beats COPY
log = logging.getLogger("rebond.store")

#: how a connection notices a database server gone, unless the URL says otherwise: a connection attempt gives up
#: after 5 s, an idle connection is probed after 10 s (3 probes, 3 s apart), and data unacknowledged for 15 s ends it
#: (a server lost in a power cut sends no reset: without these, a request would wait on it for the kernel's minutes)
CONNECTION_DEFAULTS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
                       "keepalives_count": 3, "tcp_user_timeout": 15_000}


class _PgCursor:
    """psycopg's cursor with the `?` placeholders the shared SQL is written in (a `Cursor`, store/sql.py's protocol)."""

    _cache: dict[str, str] = {}

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    @property
    def raw(self) -> psycopg.Cursor[Any]:
        return self._cur

    def _sql(self, sql: str) -> str:
        out = self._cache.get(sql)
        if out is None:
            out = _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
            self._cache[sql] = out
        return out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(self._sql(sql), list(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._cur.executemany(self._sql(sql), [list(r) for r in rows])

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()


@dataclass(frozen=True)
class FeedPosition:
    """Where a follower stands: after `seq`; and, while waiting at a gap, what it waits for."""

    seq: int
    horizon: int | None = None  # the first xid not yet started when the gap was seen
    resume: int | None = None  # the first seq visible after the gap at that moment

    @classmethod
    def parse(cls, token: str | None) -> FeedPosition:
        if not token:
            return cls(0)
        parts = token.split("~")
        if len(parts) == 3:
            return cls(int(parts[0]), int(parts[1]), int(parts[2]))
        return cls(int(parts[0]))

    def __str__(self) -> str:
        if self.horizon is None:
            return str(self.seq)
        return f"{self.seq}~{self.horizon}~{self.resume}"


def _parse_snapshot(text: str) -> tuple[int, int, list[int]]:
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), [int(x) for x in xip.split(",") if x]


def connection_string(url: str) -> str:
    """The URL with CONNECTION_DEFAULTS for what it does not set; given several servers (`host1:port1,host2:port2`,
    a Patroni cluster's nodes), libpq tries them in turn and keeps the one that takes writes (target_session_attrs)."""
    given = conninfo_to_dict(url)
    defaults: dict[str, Any] = dict(CONNECTION_DEFAULTS)
    if "," in str(given.get("host", "")):
        defaults["target_session_attrs"] = "read-write"
    return make_conninfo(url, **{name: value for name, value in defaults.items() if name not in given})


def standby_connection_string(url: str) -> str | None:
    """For reading while no primary answers (a failover under way): the same servers, a standby preferred; None
    when the URL names one server only (behind HAProxy: Rebond knows no standby then)."""
    given = conninfo_to_dict(url)
    if "," not in str(given.get("host", "")):
        return None
    return connection_string(make_conninfo(url, target_session_attrs="prefer-standby"))


def inspect(url: str) -> StoreFacts:
    """The store in this database, read-only: its schema and its size."""
    from rebond.store import StoreFacts

    try:
        with psycopg.connect(connection_string(url), autocommit=True) as conn:
            where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
            schema = stored_schema(conn)
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    except psycopg.Error as err:
        raise Unavailable(f"cannot reach PostgreSQL: {err}") from None
    return StoreFacts("postgresql", where, schema, int(row[0]) if row else 0)


def stored_schema(conn: psycopg.Connection[Any]) -> int | None:
    """The schema of the store in this connection's database (None: no store there yet)."""
    tables = {row[0] for row in conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                                              " AND table_name IN ('resources', 'rebond_meta')")}
    stamped = conn.execute("SELECT value FROM rebond_meta WHERE name = 'schema'").fetchone() if "rebond_meta" in tables else None
    return schema_of(tables, stamped[0] if stamped else None)


def _servers(conninfo: str) -> list[tuple[str, str]]:
    """The (host, port) of each server a connection string names, in order."""
    given = conninfo_to_dict(conninfo)
    hosts = str(given.get("host", "")).split(",")
    ports = str(given.get("port", "") or "5432").split(",")
    return [(host, ports[n] if n < len(ports) else ports[-1]) for n, host in enumerate(hosts)]


def _primary_timeline(watchers: dict[tuple[str, str], psycopg.Connection[Any]], conninfo: str, server: tuple[str, str]) -> int | None:
    """The timeline of a server that takes writes; None for a standby, or a server that does not answer. The watch's own
    connection to each server is kept between rounds."""
    conn = watchers.get(server)
    try:
        if conn is None or conn.closed:
            conn = watchers[server] = psycopg.connect(make_conninfo(conninfo, host=server[0], port=server[1],
                                                                    target_session_attrs="any", connect_timeout=2),
                                                      autocommit=True, application_name=f"{APPLICATION_NAME}-watch")
        row = conn.execute("SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN 0"
                           " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END").fetchone()
    except psycopg.Error:
        if conn is not None:
            conn.close()
        watchers.pop(server, None)
        return None
    return None if row is None or row[0] else int(row[1])


#: while no primary answers, reads go to a standby this long before the primary is tried again
PRIMARY_RETRY_SECONDS = 2.0
#: a read waits this long for a primary's connection before a standby serves it (writes wait the pool's 10 s)
READ_WAIT_SECONDS = 2.0
#: a lost connection of the pool is tried again for this long, then another request's wait tries afresh
RECONNECT_SECONDS = 2.0

#: with several servers in the URL, how often Rebond looks for a second primary: a server whose Patroni died while its
#: PostgreSQL ran on (no watchdog), still taking connections as a primary after the standby was promoted
TIMELINE_CHECK_SECONDS = 2.0
#: Rebond's sessions say so (pg_stat_activity), so that it ends its own on a primary left behind, and no one else's
APPLICATION_NAME = "rebond"

#: errors after which a pooled connection may be to a server gone or no longer the primary
_LOST = (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction)


class PostgresStore(SQLStore):
    for_update = " FOR UPDATE"
    for_update_current = " FOR UPDATE OF r"
    txid_sql = "pg_current_xact_id()::text::bigint"

    def __init__(self, url: str, site_id: str, pool_size: int = 16) -> None:
        super().__init__(site_id)
        self.url = url
        self._checked_at = 0.0
        self._check_lock = threading.Lock()
        self._standby_conninfo = standby_connection_string(url)
        self._standby_pool: ConnectionPool | None = None
        self._standby_lock = threading.Lock()
        self.primary_lost_at: float | None = None  # time.monotonic() when reads last found no primary; None: it answers
        self._conninfo = connection_string(url)
        self._pool_size = pool_size
        self._servers = _servers(self._conninfo)  # each server of the URL, in the order libpq tries them
        self._closed = threading.Event()
        if len(self._servers) > 1:  # started while a primary left behind still runs: connect to the newer at once
            first_look: dict[tuple[str, str], psycopg.Connection[Any]] = {}
            primaries = self._primaries(first_look)
            if len(primaries) > 1 and self._newer_first(primaries):
                log.error("two PostgreSQL servers take writes: connecting to the one on the newest timeline")
            for conn in first_look.values():
                conn.close()
        try:
            self._pool = self._new_pool(self._conninfo)
            self._pool.wait(timeout=30)
            with self._pool.connection() as conn:
                conn.execute("SELECT pg_advisory_lock(4242)")  # two servers starting at once create the schema once
                try:
                    self.schema_found = stored_schema(conn)
                    check_schema(self.schema_found)
                    for statement in ddl(_TYPES):
                        conn.execute(statement)
                    for table, column, kind in added_columns(_TYPES):  # a database made by an earlier Rebond
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
                    for index in DROPPED_INDEXES:
                        conn.execute(f"DROP INDEX IF EXISTS {index}")
                    columns = conn.execute("SELECT column_name FROM information_schema.columns"
                                           " WHERE table_schema = current_schema() AND table_name = 'sp_token'").fetchall()
                    if not has_numbered_rows([row[0] for row in columns]):  # made before schema 4 (store/upgrade.py)
                        with conn.transaction(), conn.cursor() as cur:
                            upgrade_index(_PgCursor(cur), _TYPES)
                    with conn.cursor() as cur:
                        if has_joined_rows(_PgCursor(cur)):  # made before schema 5 (store/upgrade.py)
                            with conn.transaction():
                                drop_joined_rows(_PgCursor(cur))
                    conn.execute(
                        "INSERT INTO rebond_meta (name, value) VALUES ('schema', %s)"
                        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                        (str(SCHEMA_VERSION),),
                    )
                finally:
                    conn.execute("SELECT pg_advisory_unlock(4242)")
        except (psycopg.Error, Exception) as err:
            if isinstance(err, LaterSchema):
                self._pool.close()
                raise
            if isinstance(err, Unavailable):
                raise
            raise Unavailable(f"cannot reach PostgreSQL: {err}") from err
        if len(self._servers) > 1:
            threading.Thread(target=self._watch_timelines, name="rebond-timelines", daemon=True).start()

    def _new_pool(self, conninfo: str) -> ConnectionPool:
        return ConnectionPool(
            conninfo,
            min_size=2,
            max_size=self._pool_size,
            kwargs={"autocommit": True, "options": "-c synchronous_commit=on", "application_name": APPLICATION_NAME},
            open=True,
            timeout=10,  # a request waits that long for a connection (while a failover elects a new primary)
            # a lost connection is tried again 3 times in 2 s, then its place is freed: the next request that waits
            # tries at once. The pool's own way, tries after 1, 2, 4, 8, 16… s, would leave a new primary unused
            # for as long again as the failover took
            reconnect_timeout=RECONNECT_SECONDS,
        )

    # -- a primary left behind: the newest timeline wins

    def _watch_timelines(self) -> None:
        """With several servers in the URL, every TIMELINE_CHECK_SECONDS: if two take writes, follow the newest."""
        watchers: dict[tuple[str, str], psycopg.Connection[Any]] = {}
        while not self._closed.wait(TIMELINE_CHECK_SECONDS):
            try:
                self._follow_newest_timeline(watchers)
            except Exception:  # the watch itself must never stop; a request's own errors say what is wrong
                log.exception("looking for a primary left behind failed")
        for conn in watchers.values():
            conn.close()

    def _primaries(self, watchers: dict[tuple[str, str], psycopg.Connection[Any]]) -> dict[tuple[str, str], int]:
        """The servers of the URL that take writes, with their timelines."""
        found: dict[tuple[str, str], int] = {}
        for server in self._servers:
            timeline = _primary_timeline(watchers, self._conninfo, server)
            if timeline is not None:
                found[server] = timeline
        return found

    def _newer_first(self, primaries: dict[tuple[str, str], int]) -> bool:
        """When two servers take writes and libpq would take the one on the older timeline first: the servers put in an
        order that leads libpq to the newer; whether the order changed."""
        newest = max(primaries, key=lambda s: primaries[s])
        if next(s for s in self._servers if s in primaries) == newest:  # libpq keeps the first that takes writes
            return False
        self._servers = [newest, *(s for s in self._servers if s != newest)]
        self._conninfo = make_conninfo(self._conninfo, host=",".join(h for h, _p in self._servers),
                                       port=",".join(p for _h, p in self._servers))
        return True

    def _follow_newest_timeline(self, watchers: dict[tuple[str, str], psycopg.Connection[Any]]) -> None:
        primaries = self._primaries(watchers)
        if len(primaries) < 2:
            return
        reordered = self._newer_first(primaries)
        if reordered:
            old, self._pool = self._pool, self._new_pool(self._conninfo)
            threading.Thread(target=old.close, kwargs={"timeout": 30}, daemon=True).start()
        # Rebond's sessions on a primary left behind, whichever order they were opened in: their commits wait there for a
        # standby that has left, and can never be acknowledged. Ended, each request gets its error (503, transient) and is
        # sent again; the pool's new connections go to the newer, first in the order now.
        newest = self._servers[0]
        ended = 0
        for server in primaries:
            if server == newest:
                continue
            try:
                ended += len(watchers[server].execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = current_user"
                    " AND application_name = %s AND pid <> pg_backend_pid()", (APPLICATION_NAME,)).fetchall())
            except psycopg.Error as err:
                log.error("Rebond's sessions on the primary left behind could not be ended: %s", err)
            if reordered or ended:
                log.error("two PostgreSQL servers take writes: %s:%s (timeline %d) was left behind by %s:%s (timeline %d, "
                          "promoted); following the newer, %d Rebond session(s) ended on the other: stop it (its Patroni is "
                          "gone?)", *server, primaries[server], *newest, primaries[newest], ended)
        if ended:
            self._pool.check()  # the ended connections replaced at once, on the newer

    def blob(self, body: bytes | None) -> Any:
        return body

    def record_version(self, cur: Cursor, internal: int, version_row: tuple[Any, ...]) -> int:
        """One round trip: the version row and the resource's pointer to it."""
        _type, _id, version, lu, method, _site, _body = version_row
        cur.execute(
            f"WITH v AS ({self.insert_version} RETURNING seq)"
            " UPDATE resources SET version = ?, seq = (SELECT seq FROM v), lu = ?, deleted = ? WHERE rid = ? RETURNING seq",
            (*version_row, version, lu, 1 if method == "delete" else 0, internal),
        )
        return int(cur.fetchone()[0])

    def insert_new(self, cur: Cursor, version_row: tuple[Any, ...]) -> tuple[int, int] | None:
        """One round trip. The version insert yields to an existing version 1 (ON CONFLICT), so
        a concurrent creator of the same id gets nothing back and carries on as an update."""
        rtype, rid, _version, lu, _method, _site, _body = version_row
        cur.execute(
            f"WITH v AS ({self.insert_version} ON CONFLICT (res_type, res_id, version) DO NOTHING RETURNING seq)"
            " INSERT INTO resources (res_type, res_id, version, seq, lu, deleted) SELECT ?, ?, 1, seq, ?, 0 FROM v"
            " ON CONFLICT (res_type, res_id) DO NOTHING RETURNING rid, seq",
            (*version_row, rtype, rid, lu),
        )
        row = cur.fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def insert_index_rows(self, cur: Cursor, by_table: dict[str, list[tuple[Any, ...]]]) -> None:
        """Few rows (one resource): one statement for every table, one round trip. Many (a Bundle): COPY."""
        assert isinstance(cur, _PgCursor)
        total = sum(len(rows) for rows in by_table.values())
        texts = token_texts(by_table.get("sp_token", ()))
        if total <= SMALL_INDEX_WRITE:
            parts: list[str] = []
            params: list[Any] = []
            for n, (table, rows) in enumerate(by_table.items()):
                columns = index_columns(table)
                row_sql = "(" + ", ".join("%s" for _ in columns) + ")"
                parts.append(f"t{n} AS (INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join(row_sql for _ in rows)})")
                params.extend(v for row in rows for v in row)
            if texts:
                parts.append(f"texts AS (INSERT INTO sp_token_texts (key, text_norm, code) VALUES {', '.join('(%s, %s, %s)' for _ in texts)}"
                             " ON CONFLICT DO NOTHING)")
                params.extend(v for text in texts for v in text)
            if parts:
                cur.raw.execute("WITH " + ", ".join(parts) + " SELECT 1", params)
            return
        for table, rows in by_table.items():
            with cur.raw.copy(f"COPY {table} ({', '.join(index_columns(table))}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        if texts:
            cur.executemany(INSERT_TOKEN_TEXT, texts)

    def lock_key(self, cur: Cursor, key: str) -> None:
        digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        cur.execute("SELECT pg_advisory_xact_lock(?)", (digest,))

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a lost server (gone, or no longer the primary) raises Unavailable, and the pool's
        idle connections are checked then, so that the next requests connect afresh (to the new primary)."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.errors.SerializationFailure as err:
            raise Unavailable(f"concurrent update, retry: {err}") from err
        except _LOST as err:
            self._drop_lost_connections()
            raise Unavailable(f"PostgreSQL unavailable: {err}") from err

    def _drop_lost_connections(self) -> None:
        """Check the idle connections (at most once a second, in one thread): the broken ones are replaced."""
        now = time.monotonic()
        if now - self._checked_at < 1.0 or not self._check_lock.acquire(blocking=False):
            return
        try:
            self._checked_at = now
            log.warning("a PostgreSQL connection was lost: checking the others (a failover?)")
            self._pool.check()
        except psycopg.Error:
            log.exception("checking the PostgreSQL connections failed")
        finally:
            self._check_lock.release()

    @contextmanager
    def reader(self) -> Iterator[Cursor]:
        """A cursor on the primary; while none answers (a failover under way), on a standby when the URL names one:
        what it holds was on the standby's disk before its commit was acknowledged, so it misses nothing acknowledged
        but the last milliseconds' writes, not yet replayed there."""
        pool, conn = self._reading_connection()
        try:
            with conn.cursor() as cur:
                yield _PgCursor(cur)
        except _LOST as err:
            if pool is self._pool:
                self._drop_lost_connections()
            raise Unavailable(f"PostgreSQL unavailable: {err}") from err
        finally:
            if pool is None:
                conn.close()
            else:
                pool.putconn(conn)

    def _reading_connection(self) -> tuple[ConnectionPool | None, psycopg.Connection[Any]]:
        """A pooled connection to the primary; while none comes, a standby's when the URL names one. A pool merely
        busy is no failover: then a connection of the read's own to the primary (pool None: closed after the read)."""
        if self._standby_conninfo is None:
            try:
                return self._pool, self._pool.getconn()
            except psycopg.OperationalError as err:
                raise Unavailable(f"PostgreSQL unavailable: {err}") from err
        lost = self.primary_lost_at
        if lost is not None and time.monotonic() - lost < PRIMARY_RETRY_SECONDS:
            return self._from_standby()
        pool: ConnectionPool | None = self._pool
        try:
            conn = self._pool.getconn(timeout=READ_WAIT_SECONDS if lost is None else 0.5)
        except psycopg.OperationalError:  # PoolTimeout: every connection busy, or none to be had
            try:
                conn, pool = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=2), None
            except psycopg.OperationalError:
                if lost is None:
                    log.warning("no PostgreSQL primary answers: reading from a standby meanwhile")
                self.primary_lost_at = time.monotonic()
                return self._from_standby()
        if lost is not None:
            log.warning("the PostgreSQL primary answers again")
        self.primary_lost_at = None
        return pool, conn

    def _from_standby(self) -> tuple[ConnectionPool, psycopg.Connection[Any]]:
        try:
            standby = self._standby()
            return standby, standby.getconn()
        except psycopg.OperationalError as err:
            raise Unavailable(f"no PostgreSQL server answers: {err}") from err

    def _standby(self) -> ConnectionPool:
        """The pool of reads while no primary answers, opened the first time it is needed."""
        with self._standby_lock:
            if self._standby_pool is None:
                assert self._standby_conninfo is not None
                self._standby_pool = ConnectionPool(self._standby_conninfo, min_size=0, max_size=4, open=True, timeout=5,
                                                    kwargs={"autocommit": True})
            return self._standby_pool

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._connection() as conn, conn.transaction(), conn.cursor() as raw:
            cur = _PgCursor(raw)
            # an xid before any sequence number: the feed relies on it (see `changes`)
            cur.execute("SELECT pg_current_xact_id()")
            session = SQLSession(self, cur)
            yield session
            session.flush()

    def changes(self, after: str | None, count: int = 100) -> ChangePage:
        """Committed versions in seq order, never skipping one that commits late.

        Every writer takes its xid before its sequence number. When seq g is missing
        but a later seq s is visible, g's holder took its xid before s committed,
        hence before this snapshot, hence below any xid handed out after it: the
        feed takes one such xid (the horizon) and waits at g until the oldest
        running xid has passed it. Then g's holder has ended, and if g is still
        absent it never will be (rolled back, or lost to sequence caching after a
        crash). The snapshot's own xmax cannot serve as horizon: PostgreSQL leaves
        running xids at or above it out of the in-progress list.

        After a failover the horizon may come from the lost primary, above every
        xid the new one has handed out (its last xids never reached the standby).
        Waiting for the new primary to pass it would hold every follower at the gap
        until enough writes came, forever on a quiet night; but g's holder was on
        the lost primary, and had it committed, g would be here (synchronous
        replication). So a horizon this server has not reached is passed too. For the same reason the row first seen
        after the gap may be missing on the new primary: the gap then ends further on, and the feed waits there again
        as at a new gap, with a horizon taken here (without this, it would wait for that row for ever).
        """
        pos = FeedPosition.parse(after)
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            with conn.cursor() as raw:
                cur = _PgCursor(raw)
                cur.execute("SELECT pg_current_snapshot()::text")
                xmin, xmax, _xip = _parse_snapshot(cur.fetchone()[0])
                rows = self._change_rows(cur, pos.seq, count)
                accepted, next_pos = self._walk(cur, pos, rows, xmin, xmax)
        return ChangePage(accepted, str(next_pos))

    @staticmethod
    def _walk(cur: Cursor, pos: FeedPosition, rows: list[Any], xmin: int, xmax: int) -> tuple[list[Change], FeedPosition]:
        accepted: list[Change] = []
        expected = pos.seq + 1
        next_pos = FeedPosition(pos.seq)
        for row in rows:
            seq = int(row[6])
            if seq > expected:  # numbers expected .. seq-1 are not visible
                waiting_here = expected == pos.seq + 1 and pos.horizon is not None
                if waiting_here and seq <= (pos.resume or 0):
                    # the horizon passed; or this server never handed it out (xmax <= horizon): it was taken on a primary
                    # lost since, whose writes that did not reach this one never will, so the gap is final
                    horizon = pos.horizon or 0
                    if not (xmin >= horizon or xmax <= horizon):
                        return accepted, pos
                else:
                    # a new gap; or the one waited at now ends past the row seen after it (that row was on a primary lost
                    # since, before reaching this one): wait again, from what this server shows, for a horizon of its own
                    cur.execute("SELECT pg_current_xact_id()::text")
                    horizon = int(cur.fetchone()[0])
                    return accepted, FeedPosition(expected - 1, horizon, seq)
            accepted.append(Change(seq, stored_from_row(row)))
            expected = seq + 1
            next_pos = FeedPosition(seq)
        return accepted, next_pos

    def database(self) -> dict[str, Any]:
        """The server answering (the primary) and its standbys, as PostgreSQL sees them (pg_stat_replication: the
        `rebond` role needs pg_monitor to see more than their names). A commit waits for a `sync` standby's disk:
        such a standby can take over without losing an acknowledged write (Patroni promotes only that one)."""
        facts: dict[str, Any] = {"engine": "postgresql", "server": None, "role": None, "standbys": [], "synchronous": False,
                                 "problem": None}
        try:
            with self.reader() as cur:
                cur.execute("SELECT host(inet_server_addr()), inet_server_port(), pg_is_in_recovery()")
                host, port, recovery = cur.fetchone()
                facts["server"] = f"{host}:{port}" if host else "local socket"
                facts["role"] = "standby" if recovery else "primary"
                if not recovery:
                    cur.execute("SELECT application_name, state, sync_state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn),"
                                " extract(epoch FROM replay_lag) FROM pg_stat_replication ORDER BY application_name")
                    facts["standbys"] = [
                        {"name": name, "state": state, "sync_state": sync, "lag_bytes": None if lag is None else int(lag),
                         "replay_lag_seconds": None if seconds is None else round(float(seconds), 3)}
                        for name, state, sync, lag, seconds in cur.fetchall()]
        except Unavailable as err:
            facts["problem"] = str(err)
            return facts
        if recovery:
            facts["problem"] = "no primary answers: a standby serves reads, writes wait for a new primary"
        facts["synchronous"] = any(s["sync_state"] in ("sync", "quorum") and s["state"] == "streaming" for s in facts["standbys"])
        return facts

    def optimize(self) -> None:
        """ANALYZE now; autovacuum keeps the statistics fresh afterwards."""
        with self._connection() as conn:
            conn.execute("ANALYZE")

    def writes_refused(self) -> bool:
        return self.primary_lost_at is not None

    def close(self) -> None:
        self._closed.set()
        self._pool.close()
        if self._standby_pool is not None:
            self._standby_pool.close()
