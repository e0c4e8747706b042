"""The production engine: PostgreSQL through psycopg 3, with a change feed that never skips a commit.

Sequence numbers are handed out when a version is inserted, but transactions
commit in any order: a follower that has read seq 11 may later see seq 10 appear.
The feed therefore only moves past a gap in the sequence once every transaction
that could still hold the missing number has ended (see `changes`).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from rebond.store.base import Change, ChangePage, Session, Unavailable
from rebond.store.schema import INDEX_TABLES, SCHEMA_VERSION, Types, added_columns, ddl
from rebond.store.sql import Cursor, SQLSession, SQLStore, stored_from_row

_TYPES = Types(serial_pk="BIGSERIAL PRIMARY KEY", bigint="BIGINT", real="DOUBLE PRECISION", blob="BYTEA", text='TEXT COLLATE "C"')
_PLACEHOLDER = re.compile(r"\?")
SMALL_INDEX_WRITE = 500  # index rows up to which one INSERT statement beats COPY


class _PgCursor(Cursor):
    """psycopg's cursor with the `?` placeholders the shared SQL is written in."""

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


class PostgresStore(SQLStore):
    for_update = " FOR UPDATE"
    for_update_current = " FOR UPDATE OF r"
    txid_sql = "pg_current_xact_id()::text::bigint"

    def __init__(self, url: str, site_id: str, pool_size: int = 16) -> None:
        super().__init__(site_id)
        self.url = url
        try:
            self._pool = ConnectionPool(
                url,
                min_size=2,
                max_size=pool_size,
                kwargs={"autocommit": True, "options": "-c synchronous_commit=on"},
                open=True,
                timeout=30,
            )
            self._pool.wait(timeout=30)
            with self._pool.connection() as conn:
                conn.execute("SELECT pg_advisory_lock(4242)")  # two servers starting at once create the schema once
                try:
                    for statement in ddl(_TYPES):
                        conn.execute(statement)
                    for table, column, kind in added_columns(_TYPES):  # a database made by an earlier Rebond
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
                    conn.execute(
                        "INSERT INTO rebond_meta (name, value) VALUES ('schema', %s)"
                        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                        (str(SCHEMA_VERSION),),
                    )
                finally:
                    conn.execute("SELECT pg_advisory_unlock(4242)")
        except (psycopg.Error, Exception) as err:
            if isinstance(err, Unavailable):
                raise
            raise Unavailable(f"cannot reach PostgreSQL: {err}") from err

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
        if total <= SMALL_INDEX_WRITE:
            parts: list[str] = []
            params: list[Any] = []
            for n, (table, rows) in enumerate(by_table.items()):
                columns = ("rid", "key", *INDEX_TABLES[table])
                row_sql = "(" + ", ".join("%s" for _ in columns) + ")"
                parts.append(f"t{n} AS (INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join(row_sql for _ in rows)})")
                params.extend(v for row in rows for v in row)
            if parts:
                cur.raw.execute("WITH " + ", ".join(parts) + " SELECT 1", params)
            return
        for table, rows in by_table.items():
            column_list = ", ".join(("rid", "key", *INDEX_TABLES[table]))
            with cur.raw.copy(f"COPY {table} ({column_list}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    def lock_key(self, cur: Cursor, key: str) -> None:
        digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        cur.execute("SELECT pg_advisory_xact_lock(?)", (digest,))

    @contextmanager
    def reader(self) -> Iterator[Cursor]:
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield _PgCursor(cur)
        except psycopg.OperationalError as err:
            raise Unavailable(f"PostgreSQL unavailable: {err}") from err

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as raw:
                cur = _PgCursor(raw)
                # an xid before any sequence number: the feed relies on it (see `changes`)
                cur.execute("SELECT pg_current_xact_id()")
                session = SQLSession(self, cur)
                yield session
                session.flush()
        except psycopg.errors.SerializationFailure as err:
            raise Unavailable(f"concurrent update, retry: {err}") from err
        except psycopg.OperationalError as err:
            raise Unavailable(f"PostgreSQL unavailable: {err}") from err

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
        """
        pos = FeedPosition.parse(after)
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                with conn.cursor() as raw:
                    cur = _PgCursor(raw)
                    cur.execute("SELECT pg_current_snapshot()::text")
                    xmin, _xmax, _xip = _parse_snapshot(cur.fetchone()[0])
                    rows = self._change_rows(cur, pos.seq, count)
                    accepted, next_pos = self._walk(cur, pos, rows, xmin)
        except psycopg.OperationalError as err:
            raise Unavailable(f"PostgreSQL unavailable: {err}") from err
        return ChangePage(accepted, str(next_pos))

    @staticmethod
    def _walk(cur: Cursor, pos: FeedPosition, rows: list[Any], xmin: int) -> tuple[list[Change], FeedPosition]:
        accepted: list[Change] = []
        expected = pos.seq + 1
        next_pos = FeedPosition(pos.seq)
        for row in rows:
            seq = int(row[6])
            if seq > expected:  # numbers expected .. seq-1 are not visible
                waiting_here = expected == pos.seq + 1 and pos.horizon is not None
                if waiting_here:
                    settled = xmin >= (pos.horizon or 0) and seq <= (pos.resume or 0)
                    if not settled:
                        return accepted, pos
                else:
                    cur.execute("SELECT pg_current_xact_id()::text")
                    horizon = int(cur.fetchone()[0])
                    return accepted, FeedPosition(expected - 1, horizon, seq)
            accepted.append(Change(seq, stored_from_row(row)))
            expected = seq + 1
            next_pos = FeedPosition(seq)
        return accepted, next_pos

    def optimize(self) -> None:
        """ANALYZE now; autovacuum keeps the statistics fresh afterwards."""
        with self._pool.connection() as conn:
            conn.execute("ANALYZE")

    def close(self) -> None:
        self._pool.close()
