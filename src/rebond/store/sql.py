"""The store logic both SQL engines share; each engine supplies connections and dialect."""
from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from rebond.fhir.search import Include, SearchQuery
from rebond.fhir.searchparams import registry
from rebond.store.base import (
    Access,
    Change,
    ChangePage,
    InboxMessage,
    JournalEntry,
    PreconditionFailed,
    SearchResult,
    Session,
    Store,
    Stored,
    StoreError,
    WriteResult,
    message_digest,
)
from rebond.store.draft import Draft, SentWrite, content_of
from rebond.store.indexing import IndexRows, index_resource, table_rows
from rebond.store.query import order_fragment, where_fragment
from rebond.store.schema import INDEX_TABLES, index_columns

MAX_INCLUDED = 1000
#: the INSERT of one row of each index table, its parameters in the order of `index_columns`
INDEX_INSERTS = {
    table: f"INSERT INTO {table} ({', '.join(index_columns(table))}) VALUES ({', '.join('?' for _ in index_columns(table))})"
    for table in INDEX_TABLES
}
INSERT_TOKEN_TEXT = "INSERT INTO sp_token_texts (key, text_norm, code) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
_STORED_COLUMNS = "v.res_type, v.res_id, v.version, v.lu, v.method = 'delete', v.body, v.seq, v.method, v.site_id"


def iso_instant(epoch: float) -> str:
    """`2024-05-01T10:11:12.123456+00:00`: FHIR instant with microseconds, UTC."""
    seconds = int(epoch)
    micros = int(round((epoch - seconds) * 1_000_000))
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}+00:00"


def stored_from_row(row: Sequence[Any]) -> Stored:
    body = row[5]
    return Stored(
        resource_type=row[0],
        id=row[1],
        version=int(row[2]),
        last_updated=float(row[3]),
        deleted=bool(row[4]),
        body=bytes(body) if body is not None else None,
        seq=int(row[6]),
        method=row[7],
        site_id=row[8],
    )


class Cursor(Protocol):
    """The few cursor operations the shared code needs, as either DB-API driver's cursor has them: sqlite3's own, or
    psycopg's behind `postgres._PgCursor`."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


_INBOX_COLUMNS = "id, channel, sender, control_id, received, raw, status, detail, updated, digest"


def _access_from_row(row: Sequence[Any]) -> Access:
    return Access(row[0], float(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], int(row[10]), int(row[11]),
                  tuple(row[12].split()))


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _given(conditions: list[tuple[str, Any]]) -> tuple[list[str], list[Any]]:
    """The SQL conditions whose value is given (not None), and their parameters in the same order."""
    kept = [(sql, value) for sql, value in conditions if value is not None]
    return [sql for sql, _value in kept], [value for _sql, value in kept]


_AUDIT_COLUMNS = "id, recorded, node, agent, role, source, channel, action, what, entity, outcome, patients, listed"


_JOURNAL_COLUMNS = "seq, res_type, res_id, method, base_version, local_version, body, written, status, detail, updated"


def journal_from_row(row: Sequence[Any]) -> JournalEntry:
    return JournalEntry(int(row[0]), row[1], row[2], row[3], int(row[4]), int(row[5]), bytes(row[6]) if row[6] is not None else None,
                        float(row[7]), row[8], row[9], float(row[10]))


def inbox_from_row(row: Sequence[Any]) -> InboxMessage:
    return InboxMessage(int(row[0]), row[1], row[2], row[3], float(row[4]), bytes(row[5]), row[6], row[7], float(row[8]),
                        row[9] or "")


class SQLSession(Session):
    """A write transaction over one connection, in the dialect of its store."""

    def __init__(self, store: SQLStore, cur: Cursor) -> None:
        self.store = store
        self.cur = cur
        # index rows wait here until a search inside the transaction or the commit needs them
        self._pending: dict[int, IndexRows] = {}
        self.writes = 0
        self.journaled: list[int] = []  # journal entries this transaction wrote (a site node's own writes)

    # -- reading inside the transaction

    def read(self, resource_type: str, resource_id: str) -> Stored | None:
        self.cur.execute(
            f"SELECT {_STORED_COLUMNS} FROM resources r JOIN versions v ON v.seq = r.seq"
            f" WHERE r.res_type = ? AND r.res_id = ?{self.store.for_update}",
            (resource_type, resource_id),
        )
        row = self.cur.fetchone()
        return stored_from_row(row) if row else None

    def search_ids(self, query: SearchQuery, limit: int = 2) -> list[str]:
        where = where_fragment(query)
        return self.ids_where(where.sql, where.params, limit)

    def ids_where(self, where: str, params: list[Any], limit: int) -> list[str]:
        self.flush()
        self.cur.execute(f"SELECT r.res_id FROM resources r WHERE {where} LIMIT ?", [*params, limit])
        return [row[0] for row in self.cur.fetchall()]

    def lock(self, key: str) -> None:
        self.store.lock_key(self.cur, key)

    def apply_draft(self, draft: Draft) -> bool:
        """Write what a draft planned if everything it read is as it was; False (nothing written) otherwise."""
        if self.store.draft_holds(draft.mark, draft.seen.keys() | draft.writes.keys(), draft.searched):
            # known unchanged without reading it again: only the resources it writes over are read, for their rows
            currents: dict[tuple[str, str], _Current | None] = dict.fromkeys(draft.writes)
            over = [key for key in draft.writes if draft.seen.get(key)]
            if over:
                currents.update(self._currents(over))
        else:
            currents = self._currents([*draft.seen, *(key for key in draft.writes if key not in draft.seen)])
            for key, seen in draft.seen.items():
                current = currents[key]
                if (0 if current is None or current.deleted else current.version) != seen:
                    return False
            for where, params, limit, ids in draft.searches:
                if self.ids_where(where, params, limit) != ids:
                    return False
        made = self._create_many([(key, planned) for key, planned in draft.writes.items() if currents[key] is None])
        for (rtype, rid), planned in draft.writes.items():
            current = currents[(rtype, rid)]
            result = made.get((rtype, rid)) or self._write(rtype, rid, _planned_resource(planned), "update", if_match=None,
                                                           current=current, rows=planned.rows)
            if self.store.journal_writes:
                base = 0 if current is None or current.deleted else current.version
                self._journal(result, "update" if base else "create", base, planned.resource)
        return True

    def receive_message(self, channel: str, sender: str, control_id: str, raw: bytes, *, status: str = "received",
                        detail: str = "") -> tuple[InboxMessage, bool]:
        now = time.time()
        digest = message_digest(raw)
        self.cur.execute(
            "INSERT INTO inbox (channel, sender, control_id, received, raw, status, detail, updated, digest)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (channel, sender, control_id) DO NOTHING RETURNING id",
            (channel, sender, control_id, now, self.store.blob(raw), status, detail, now, digest),
        )
        row = self.cur.fetchone()
        if row is not None:
            return InboxMessage(int(row[0]), channel, sender, control_id, now, raw, status, detail, now, digest), True
        self.cur.execute(f"SELECT {_INBOX_COLUMNS} FROM inbox WHERE channel = ? AND sender = ? AND control_id = ?",
                         (channel, sender, control_id))
        return inbox_from_row(self.cur.fetchone()), False

    def settle_message(self, message_id: int, status: str, detail: str, raw: bytes | None = None) -> None:
        if raw is None:
            self.cur.execute("UPDATE inbox SET status = ?, detail = ?, updated = ? WHERE id = ?", (status, detail, time.time(), message_id))
        else:
            self.cur.execute("UPDATE inbox SET status = ?, detail = ?, raw = ?, digest = ?, updated = ? WHERE id = ?",
                             (status, detail, self.store.blob(raw), message_digest(raw), time.time(), message_id))

    def clear_message(self, message_id: int, digest: str) -> bool:
        self.cur.execute("UPDATE inbox SET raw = ?, digest = ? WHERE id = ? AND status = 'applied' AND length(raw) > 0 RETURNING id",
                         (self.store.blob(b""), digest, message_id))
        return self.cur.fetchone() is not None

    def record_accesses(self, accesses: Sequence[Access]) -> int:
        """One row per access, and one per patient for them all (a patient read a hundred times in a second: one row);
        an access already kept (a site's lines sent again) is kept once. Returns how many were new.

        Rows go 200 to a statement: one statement per row would hand the interpreter's lock over at each row, and
        the server's event loop, busy answering, would make each hand-over cost more than the row."""
        new = set(self._insert_rows("audit", _AUDIT_COLUMNS, [(*a[:12], " ".join(a.patients)) for a in accesses]))
        whose: dict[str, list[Access]] = {}
        for a in accesses:
            if a.id in new:
                for patient in a.patients:
                    whose.setdefault(patient, []).append(a)
        self._insert_rows("audit_patient", "patient_id, lo, hi, audit_ids",
                          [(patient, min(a.recorded for a in mine), max(a.recorded for a in mine), " ".join(a.id for a in mine))
                           for patient, mine in whose.items()], returning=None)
        return len(new)

    def _insert_rows(self, table: str, columns: str, rows: list[tuple[Any, ...]], per_statement: int = 200,
                     returning: str | None = "id") -> list[Any]:
        """Rows in statements of `per_statement`; with `returning`, those new (a conflict keeps the row there), by that column."""
        new: list[Any] = []
        for start in range(0, len(rows), per_statement):
            part = rows[start:start + per_statement]
            one = "(" + ", ".join("?" * len(part[0])) + ")"
            tail = f" ON CONFLICT DO NOTHING RETURNING {returning}" if returning else ""
            self.cur.execute(f"INSERT INTO {table} ({columns}) VALUES {', '.join([one] * len(part))}{tail}", [v for row in part for v in row])
            if returning:
                new.extend(row[0] for row in self.cur.fetchall())
        return new

    def prune_accesses(self, before: float) -> int:
        self.cur.execute("DELETE FROM audit_patient WHERE hi < ?", (before,))
        self.cur.execute("DELETE FROM audit WHERE id < ? RETURNING id", (f"{int(before * 1_000_000):014x}",))
        return len(self.cur.fetchall())

    def put_state(self, namespace: str, key: str, value: Any) -> None:
        if value is None:
            self.cur.execute("DELETE FROM node_state WHERE ns = ? AND key = ?", (namespace, key))
            return
        self.cur.execute(
            "INSERT INTO node_state (ns, key, value, updated) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
            (namespace, key, orjson.dumps(value).decode(), time.time()),
        )

    def claim_state(self, namespace: str, key: str, value: Any) -> bool:
        self.cur.execute("INSERT INTO node_state (ns, key, value, updated) VALUES (?, ?, ?, ?) ON CONFLICT (ns, key) DO NOTHING"
                         " RETURNING key", (namespace, key, orjson.dumps(value).decode(), time.time()))
        return self.cur.fetchone() is not None

    def lease(self, namespace: str, key: str, owner: str, seconds: float) -> bool:
        now = time.time()
        # the row's `updated` is when the lease lapses
        self.cur.execute("INSERT INTO node_state (ns, key, value, updated) VALUES (?, ?, ?, ?) ON CONFLICT (ns, key) DO UPDATE"
                         " SET value = excluded.value, updated = excluded.updated WHERE node_state.value = excluded.value"
                         " OR node_state.updated < ? RETURNING key", (namespace, key, orjson.dumps(owner).decode(), now + seconds, now))
        return self.cur.fetchone() is not None

    # -- writing

    def create(self, resource: dict[str, Any], *, resource_id: str | None = None) -> WriteResult:
        rid = resource_id or str(uuid.uuid4())
        return self._journal(self._write(resource["resourceType"], rid, resource, "create", if_match=None), "create", 0, resource)

    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any], *, if_match: int | None = None) -> WriteResult:
        current = self._current(resource_type, resource_id)
        unchanged = (
            current is not None and not current.deleted and current.body is not None and if_match in (None, current.version)
            and content_of(orjson.loads(current.body)) == content_of(resource)
        )
        if unchanged and current is not None and current.body is not None:
            # an update that changes nothing makes no version: re-imports and retried replays stay quiet
            stored = Stored(resource_type, resource_id, current.version, current.lu, False, current.body,
                            current.seq, current.method, current.site_id)
            return WriteResult(stored, created=False, unchanged=True)
        result = self._write(resource_type, resource_id, resource, "update", if_match=if_match, current=current)
        base = 0 if current is None or current.deleted else current.version
        return self._journal(result, "update" if base else "create", base, resource)

    def delete(self, resource_type: str, resource_id: str, *, if_match: int | None = None) -> WriteResult | None:
        current = self._current(resource_type, resource_id)
        if current is None or current.deleted:
            if if_match is not None:
                raise PreconditionFailed(f"{resource_type}/{resource_id} has no current version {if_match}")
            return None
        return self._journal(self._write(resource_type, resource_id, None, "delete", if_match=if_match, current=current),
                             "delete", current.version, None)

    def _current(self, resource_type: str, resource_id: str) -> _Current | None:
        """The current version's row, locked against concurrent writers until this transaction ends."""
        self.cur.execute(
            f"SELECT {_CURRENT_COLUMNS} FROM resources r LEFT JOIN versions v ON v.seq = r.seq"
            f" WHERE r.res_type = ? AND r.res_id = ?{self.store.for_update_current}",
            (resource_type, resource_id),
        )
        row = self.cur.fetchone()
        return _current_from_row(row) if row is not None else None

    def _currents(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], _Current | None]:
        """`_current` of several resources in one statement per 100 (a message's resources: one), locked in rid order."""
        found: dict[tuple[str, str], _Current | None] = dict.fromkeys(keys)
        query = (f"SELECT r.res_type, r.res_id, {_CURRENT_COLUMNS} FROM k JOIN resources r ON r.res_type = k.t AND r.res_id = k.i"
                 f" LEFT JOIN versions v ON v.seq = r.seq ORDER BY r.rid{self.store.for_update_current}")
        for row in _rows_for_keys(self.cur, keys, query):
            found[(row[0], row[1])] = _current_from_row(row[2:])
        return found

    def _write(
        self,
        resource_type: str,
        resource_id: str,
        resource: dict[str, Any] | SentWrite | None,
        method: str,
        *,
        if_match: int | None,
        current: _Current | None = None,
        rows: IndexRows | None = None,
    ) -> WriteResult:
        """Write a new version (`resource` None: a deletion); a `SentWrite` comes serialised, with its `rows`."""
        store = self.store
        self.writes += 1
        if current is None:
            if if_match is not None:
                raise PreconditionFailed(f"{resource_type}/{resource_id} does not exist; If-Match cannot hold")
            assert resource is not None
            first, body = self._first_version(resource_type, resource_id, resource, method)
            created = store.insert_new(self.cur, first)
            if created is not None:
                return self._created(first, body, created, resource, rows)
            # a concurrent writer created this id first: ours becomes the next version of theirs
            current = self._current(resource_type, resource_id)
            assert current is not None
        now = store.clock()
        site = self.origin or store.site_id
        version = current.version
        if if_match is not None and if_match != version:
            raise PreconditionFailed(
                f"{resource_type}/{resource_id} is at version {version}, not {if_match}: reload it and apply your change again"
            )
        if method == "create" and not current.deleted:
            raise PreconditionFailed(f"{resource_type}/{resource_id} already exists")
        if self.guard is not None:
            self.guard(resource_type, None if resource is None else _as_dict(resource), None if current.deleted else current.body)
        new_version = version + 1
        new_body = _versioned_body(resource, resource_type, resource_id, new_version, now) if resource is not None else None
        seq = store.record_version(
            self.cur, current.internal, (resource_type, resource_id, new_version, now, method, site, store.blob(new_body))
        )
        if not current.deleted:
            self._drop_index(current.internal)
        if resource is not None:
            self._pending[current.internal] = rows if rows is not None else index_resource(_as_dict(resource))
        stored = Stored(resource_type, resource_id, new_version, now, resource is None, new_body, seq, method, site)
        return WriteResult(stored, created=current.deleted)

    def _first_version(self, resource_type: str, resource_id: str, resource: dict[str, Any] | SentWrite,
                       method: str) -> tuple[tuple[Any, ...], bytes]:
        """A new resource's first version, checked by the guard, stamped and serialised: its row for `insert_new`, and
        its body."""
        store = self.store
        now = store.clock()
        if self.guard is not None:
            self.guard(resource_type, _as_dict(resource), None)
        body = _versioned_body(resource, resource_type, resource_id, 1, now)
        return (resource_type, resource_id, 1, now, method, self.origin or store.site_id, store.blob(body)), body

    def _created(self, first: tuple[Any, ...], body: bytes, created: tuple[int, int], resource: dict[str, Any] | SentWrite,
                 rows: IndexRows | None) -> WriteResult:
        resource_type, resource_id, _version, now, method, site, _blob = first
        internal, seq = created
        self._pending[internal] = rows if rows is not None else index_resource(_as_dict(resource))
        return WriteResult(Stored(resource_type, resource_id, 1, now, False, body, seq, method, site), created=True)

    def _create_many(self, new: list[tuple[tuple[str, str], Any]]) -> dict[tuple[str, str], WriteResult]:
        """The resources a draft creates (none of them there when it was read), in as few statements as the engine can
        (`insert_many_new`): a lab panel's seven or so. One found there after all is left out, for `_write`."""
        if len(new) < 2:
            return {}
        firsts = [(key, planned, *self._first_version(*key, _planned_resource(planned), "update")) for key, planned in new]
        created = self.store.insert_many_new(self.cur, [first for _key, _planned, first, _body in firsts])
        made: dict[tuple[str, str], WriteResult] = {}
        for key, planned, first, body in firsts:
            if key in created:
                self.writes += 1
                made[key] = self._created(first, body, created[key], _planned_resource(planned), planned.rows)
        return made

    def _journal(self, result: WriteResult, method: str, base_version: int, resource: dict[str, Any] | None) -> WriteResult:
        if self.store.journal_writes and not result.unchanged:
            now = time.time()
            body = orjson.dumps(resource) if resource is not None else None
            self.cur.execute(
                "INSERT INTO journal (res_type, res_id, method, base_version, local_version, body, written, status, detail, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', '', ?) RETURNING seq",
                (result.stored.resource_type, result.stored.id, method, base_version, result.stored.version,
                 self.store.blob(body), now, now),
            )
            self.journaled.append(int(self.cur.fetchone()[0]))
        return result

    def settle_journal(self, seq: int, status: str, detail: str) -> None:
        self.cur.execute("UPDATE journal SET status = ?, detail = ?, updated = ? WHERE seq = ?", (status, detail, time.time(), seq))

    def replicate(self, copy: Stored) -> bool:
        current = self._current(copy.resource_type, copy.id)
        if current is not None and current.version == copy.version and current.body != copy.body:
            # the upstream's version of a number this node wrote itself: the upstream one is the truth (this node's own
            # is kept in its journal, and shown as a conflict if it was not the same change)
            self._overwrite(current, copy)
            return True
        if current is not None and current.version >= copy.version:
            return False  # already here: the feed is applied idempotently
        store = self.store
        method = copy.method or ("delete" if copy.deleted else "update")
        row = (copy.resource_type, copy.id, copy.version, copy.last_updated, method, copy.site_id or "central",
               store.blob(copy.body))
        if current is None:
            created = store.insert_new(self.cur, row)
            if created is None:
                raise StoreError(f"{copy.resource_type}/{copy.id} appeared while its copy was being written")
            internal = created[0]
            self.cur.execute("UPDATE resources SET version = ?, deleted = ? WHERE rid = ?",
                             (copy.version, 1 if copy.deleted else 0, internal))
        else:
            internal = current.internal
            store.record_version(self.cur, internal, row)
            if not current.deleted:
                self._drop_index(internal)
        if copy.body is not None and not copy.deleted:
            self._pending[internal] = index_resource(orjson.loads(copy.body))
        self.writes += 1
        return True

    def _overwrite(self, current: _Current, copy: Stored) -> None:
        """Replace, in place, this node's own version `current` by the upstream's version of the same number."""
        self.store.rewrote(copy.resource_type, copy.id)
        self.cur.execute("UPDATE versions SET lu = ?, method = ?, site_id = ?, body = ? WHERE seq = ?",
                         (copy.last_updated, copy.method or "update", copy.site_id or "central", self.store.blob(copy.body), current.seq))
        self.cur.execute("UPDATE resources SET lu = ?, deleted = ? WHERE rid = ?", (copy.last_updated, 1 if copy.deleted else 0,
                                                                                     current.internal))
        if not current.deleted:
            self._drop_index(current.internal)
        if copy.body is not None and not copy.deleted:
            self._pending[current.internal] = index_resource(orjson.loads(copy.body))
        self.writes += 1

    def _drop_index(self, internal: int) -> None:
        if self._pending.pop(internal, None) is None:
            for table in INDEX_TABLES:
                self.cur.execute(f"DELETE FROM {table} WHERE rid = ?", (internal,))

    def flush(self) -> None:
        """Write the index rows gathered so far, one bulk insert per table."""
        if not self._pending:
            return
        by_table = table_rows(self._pending)
        self._pending.clear()
        self.store.insert_index_rows(self.cur, by_table)


def token_texts(rows: Sequence[tuple[Any, ...]]) -> list[tuple[str, str, str]]:
    """(key, text, code) of the token rows (rid, key, system, code, text, n) that have both a code and a text, each once."""
    return list(dict.fromkeys((row[1], row[4], row[3]) for row in rows if row[4] is not None and row[3] is not None))


_CURRENT_COLUMNS = "r.rid, r.version, r.deleted, r.seq, r.lu, v.body, v.method, v.site_id"


def _rows_for_keys(cur: Cursor, keys: list[tuple[str, str]], query: str) -> list[Sequence[Any]]:
    """The rows of `query`, which reads the keys as a table `k (t, i)` of resource types and ids: one statement per 100."""
    rows: list[Sequence[Any]] = []
    for start in range(0, len(keys), 100):
        part = keys[start:start + 100]
        cur.execute(f"WITH k (t, i) AS (VALUES {', '.join(['(?, ?)'] * len(part))}) {query}", [value for key in part for value in key])
        rows.extend(cur.fetchall())
    return rows


def _current_from_row(row: Sequence[Any]) -> _Current:
    body = row[5]
    return _Current(int(row[0]), int(row[1]), bool(row[2]), int(row[3]), float(row[4]),
                    bytes(body) if body is not None else None, row[6] or "", row[7] or "")


@dataclass(frozen=True)
class _Current:
    internal: int
    version: int
    deleted: bool
    seq: int
    lu: float
    body: bytes | None
    method: str
    site_id: str


def _planned_resource(planned: Any) -> dict[str, Any] | SentWrite:
    """What a draft's planned write writes: a `SentWrite` as it came (serialised), or a planned write's resource."""
    return planned if isinstance(planned, SentWrite) else planned.resource


def _as_dict(resource: dict[str, Any] | SentWrite) -> dict[str, Any]:
    return resource.resource if isinstance(resource, SentWrite) else resource


def _versioned_body(resource: dict[str, Any] | SentWrite, resource_type: str, resource_id: str, version: int, now: float) -> bytes:
    """Stamp id, meta.versionId and meta.lastUpdated (in place, first in the JSON) and serialise."""
    if isinstance(resource, SentWrite):
        return resource.stamped(version, iso_instant(now))
    meta = resource.get("meta")
    meta = {**(meta if isinstance(meta, dict) else {}), "versionId": str(version), "lastUpdated": iso_instant(now)}
    rest = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}
    resource.clear()
    resource.update({"resourceType": resource_type, "id": resource_id, "meta": meta, **rest})
    return orjson.dumps(resource)


class SQLStore(Store):
    """Shared reads, searches and history; engines fill in connections and dialect."""

    for_update = ""
    for_update_current = ""
    txid_sql = "NULL"

    def __init__(self, site_id: str) -> None:
        self.site_id = site_id
        self._last_clock = 0.0

    def clock(self) -> float:
        """Now, strictly increasing within this process so versions never share an instant."""
        now = time.time()
        if now <= self._last_clock:
            now = self._last_clock + 0.000001
        self._last_clock = now
        return now

    def blob(self, body: bytes | None) -> Any:
        return body

    @property
    def insert_version(self) -> str:
        """INSERT of one `versions` row, its parameters in the order of a version row, the xid as the engine takes it."""
        return ("INSERT INTO versions (res_type, res_id, version, lu, method, site_id, txid, body)"
                f" VALUES (?, ?, ?, ?, ?, ?, {self.txid_sql}, ?)")

    def draft_holds(self, mark: int | None, keys: Collection[tuple[str, str]], types: Collection[str]) -> bool:
        """Known, without reading anything again, that nothing committed since the state a draft read (`mark`:
        `commit_mark` in its snapshot), nor written so far in this transaction, is one of the resources it read or of
        the types it searched; False when the engine cannot say (then the draft's reads are checked one by one)."""
        return False

    def rewrote(self, resource_type: str, resource_id: str) -> None:
        """A version rewritten in place in this transaction (a site node's own version replaced by the upstream's)."""

    def record_version(self, cur: Cursor, internal: int, version_row: tuple[Any, ...]) -> int:
        """Append a version and point the resource at it; returns the version's seq."""
        cur.execute(
            self.insert_version + " RETURNING seq",
            version_row,
        )
        seq = int(cur.fetchone()[0])
        _type, _id, version, lu, method, _site, _body = version_row
        cur.execute(
            "UPDATE resources SET version = ?, seq = ?, lu = ?, deleted = ? WHERE rid = ?",
            (version, seq, lu, 1 if method == "delete" else 0, internal),
        )
        return seq

    def insert_new(self, cur: Cursor, version_row: tuple[Any, ...]) -> tuple[int, int] | None:
        """Create a resource's first version: (internal rid, seq), or None when the id already exists.

        The resource row claims the id: a concurrent creator of the same id waits
        on it and then gets None, and carries on as an update.
        """
        rtype, rid, _version, lu, _method, _site, _body = version_row
        cur.execute(
            "INSERT INTO resources (res_type, res_id, version, seq, lu, deleted) VALUES (?, ?, 1, 0, ?, 0)"
            " ON CONFLICT (res_type, res_id) DO NOTHING RETURNING rid",
            (rtype, rid, lu),
        )
        row = cur.fetchone()
        if row is None:
            return None
        internal = int(row[0])
        cur.execute(
            self.insert_version + " RETURNING seq",
            version_row,
        )
        seq = int(cur.fetchone()[0])
        cur.execute("UPDATE resources SET seq = ? WHERE rid = ?", (seq, internal))
        return internal, seq

    def insert_many_new(self, cur: Cursor, version_rows: list[tuple[Any, ...]]) -> dict[tuple[str, str], tuple[int, int]]:
        """`insert_new` of several resources: (internal rid, seq) of each created, by (type, id); one whose id exists
        already is left out."""
        made = {}
        for row in version_rows:
            created = self.insert_new(cur, row)
            if created is not None:
                made[(row[0], row[1])] = created
        return made

    def insert_index_rows(self, cur: Cursor, by_table: dict[str, list[tuple[Any, ...]]]) -> None:
        for table, rows in by_table.items():
            cur.executemany(INDEX_INSERTS[table], rows)
        texts = self.unknown_texts(token_texts(by_table.get("sp_token", ())))
        if texts:
            cur.executemany(INSERT_TOKEN_TEXT, texts)

    def unknown_texts(self, texts: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """The (key, text, code) rows to offer to sp_token_texts, of those of a transaction's token rows: all of them,
        unless the engine knows some to be there already (the table only grows)."""
        return texts

    @abc.abstractmethod
    def lock_key(self, cur: Cursor, key: str) -> None: ...

    @abc.abstractmethod
    @contextmanager
    def reader(self) -> Iterator[Cursor]:
        """A cursor for reads, outside any write transaction."""
        yield  # type: ignore[misc]

    # -- reads

    def read(self, resource_type: str, resource_id: str) -> Stored | None:
        with self.reader() as cur:
            cur.execute(
                f"SELECT {_STORED_COLUMNS} FROM resources r JOIN versions v ON v.seq = r.seq"
                " WHERE r.res_type = ? AND r.res_id = ?",
                (resource_type, resource_id),
            )
            row = cur.fetchone()
        return stored_from_row(row) if row else None

    def read_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Stored | None]:
        """One statement per 100 resources."""
        found: dict[tuple[str, str], Stored | None] = dict.fromkeys(keys)
        query = f"SELECT {_STORED_COLUMNS} FROM k JOIN resources r ON r.res_type = k.t AND r.res_id = k.i JOIN versions v ON v.seq = r.seq"
        with self.reader() as cur:
            for row in _rows_for_keys(cur, keys, query):
                stored = stored_from_row(row)
                found[(stored.resource_type, stored.id)] = stored
        return found

    def vread(self, resource_type: str, resource_id: str, version: int) -> Stored | None:
        with self.reader() as cur:
            cur.execute(
                f"SELECT {_STORED_COLUMNS} FROM versions v WHERE v.res_type = ? AND v.res_id = ? AND v.version = ?",
                (resource_type, resource_id, version),
            )
            row = cur.fetchone()
        return stored_from_row(row) if row else None

    def history(
        self,
        resource_type: str | None = None,
        resource_id: str | None = None,
        *,
        since: float | None = None,
        count: int = 50,
        offset: int = 0,
    ) -> tuple[list[Stored], int]:
        # since a moment, for a type: the versions since then, by the index of their time, each checked for its type (the
        # index of the types would read every version of the type); `|| ''` keeps the planner off it, on both engines
        type_condition = "v.res_type || '' = ?" if since is not None and resource_id is None else "v.res_type = ?"
        conds, params = _given([(type_condition, resource_type), ("v.res_id = ?", resource_id), ("v.lu >= ?", since)])
        where = (" WHERE " + " AND ".join(conds)) if conds else ""
        with self.reader() as cur:
            cur.execute(f"SELECT count(*) FROM versions v{where}", params)
            total = int(cur.fetchone()[0])
            cur.execute(
                f"SELECT {_STORED_COLUMNS} FROM versions v{where} ORDER BY v.seq DESC LIMIT ? OFFSET ?",
                [*params, count, offset],
            )
            rows = cur.fetchall()
        return [stored_from_row(r) for r in rows], total

    def search_ids(self, query: SearchQuery, limit: int = 2) -> list[str]:
        where = where_fragment(query)
        return self.ids_where(where.sql, where.params, limit)

    def ids_where(self, where: str, params: list[Any], limit: int) -> list[str]:
        with self.reader() as cur:
            cur.execute(f"SELECT r.res_id FROM resources r WHERE {where} LIMIT ?", [*params, limit])
            return [row[0] for row in cur.fetchall()]

    def search(self, query: SearchQuery) -> SearchResult:
        where = where_fragment(query)
        with self.reader() as cur:
            total: int | None = None
            if query.total == "accurate" or query.summary == "count":
                cur.execute(f"SELECT count(*) FROM resources r WHERE {where.sql}", where.params)
                total = int(cur.fetchone()[0])
            if query.summary == "count":
                return SearchResult([], total=total)
            order = order_fragment(query)
            cur.execute(
                f"SELECT {_STORED_COLUMNS}, r.rid FROM resources r JOIN versions v ON v.seq = r.seq"
                f" WHERE {where.sql} ORDER BY {order.sql} LIMIT ? OFFSET ?",
                [*where.params, *order.params, query.count, query.offset],
            )
            rows = cur.fetchall()
            matches = [stored_from_row(r) for r in rows]
            included = self._includes(cur, query.includes, [(m.resource_type, int(r[9]), m.id) for m, r in zip(matches, rows, strict=False)])
        return SearchResult(matches, included, total)

    def _includes(self, cur: Cursor, includes: list[Include], page: list[tuple[str, int, str]]) -> list[Stored]:
        """Resources named by _include and _revinclude, following :iterate to a fixed point."""
        if not includes or not page:
            return []
        seen = {(t, i) for t, _r, i in page}
        out: list[Stored] = []
        frontier = page
        first = True
        while frontier and len(out) < MAX_INCLUDED:
            found: list[tuple[str, int, str]] = []
            for inc in includes:
                if not first and not inc.iterate:
                    continue
                for stored, internal in self._one_include(cur, inc, frontier):
                    key = (stored.resource_type, stored.id)
                    if key in seen or stored.deleted:
                        continue
                    seen.add(key)
                    out.append(stored)
                    found.append((stored.resource_type, internal, stored.id))
            frontier = found
            first = False
        return out[:MAX_INCLUDED]

    def _reference_keys(self, inc: Include, source_types: Iterable[str]) -> tuple[list[str], str]:
        """The index keys an _include or _revinclude follows, and the one target type a parameter like `patient` keeps."""
        reg = registry()
        keys: list[str] = []
        target_type = ""
        for source in set(source_types):
            if inc.source_type not in ("*", source):
                continue
            params = reg.get(source, {})
            if inc.param_code == "*":
                keys.extend(p.key for p in params.values() if p.type == "reference" and p.indexed)
            elif inc.param_code in params:
                keys.extend(params[inc.param_code].keys)
                target_type = params[inc.param_code].target_type
        return list(dict.fromkeys(keys)), target_type

    def _one_include(self, cur: Cursor, inc: Include, frontier: list[tuple[str, int, str]]) -> list[tuple[Stored, int]]:
        if inc.reverse:
            keys, kept = self._reference_keys(inc, [inc.source_type])
            ids = list({i for _t, _r, i in frontier})
            types = [t for t, _r, _i in frontier if not kept or t == kept]
            if not keys or not ids or not types:
                return []
            sql = (
                f"SELECT {_STORED_COLUMNS}, r.rid FROM sp_reference x JOIN resources r ON r.rid = x.rid"
                " JOIN versions v ON v.seq = r.seq"
                f" WHERE x.key IN ({', '.join('?' for _ in keys)}) AND x.target_id IN ({', '.join('?' for _ in ids)})"
                f" AND x.target_type IN ({', '.join('?' for _ in types)}) LIMIT ?"
            )
            cur.execute(sql, [*keys, *ids, *types, MAX_INCLUDED])
        else:
            keys, kept = self._reference_keys(inc, [t for t, _r, _i in frontier])
            rids = [r for t, r, _i in frontier if inc.source_type in ("*", t)]
            if not keys or not rids:
                return []
            target = inc.target_type or kept
            if inc.target_type and kept and inc.target_type != kept:
                return []
            target_cond = " AND x.target_type = ?" if target else ""
            sql = (
                f"SELECT {_STORED_COLUMNS}, r.rid FROM sp_reference x JOIN resources r"
                " ON r.res_type = x.target_type AND r.res_id = x.target_id JOIN versions v ON v.seq = r.seq"
                f" WHERE x.rid IN ({', '.join('?' for _ in rids)}) AND x.key IN ({', '.join('?' for _ in keys)}){target_cond} LIMIT ?"
            )
            cur.execute(sql, [*rids, *keys, *([target] if target else []), MAX_INCLUDED])
        return [(stored_from_row(row), int(row[9])) for row in cur.fetchall()]

    def journal(self, status: str | None = None, *, limit: int = 100, after: int = 0) -> list[JournalEntry]:
        where = "seq > ?"
        params: list[Any] = [after]
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        with self.reader() as cur:
            cur.execute(f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE {where} ORDER BY seq LIMIT ?", [*params, limit])
            return [journal_from_row(r) for r in cur.fetchall()]

    def journal_count(self, status: str) -> int:
        with self.reader() as cur:
            cur.execute("SELECT count(*) FROM journal WHERE status = ?", (status,))
            return int(cur.fetchone()[0])

    def message(self, message_id: int) -> InboxMessage | None:
        with self.reader() as cur:
            cur.execute(f"SELECT {_INBOX_COLUMNS} FROM inbox WHERE id = ?", (message_id,))
            row = cur.fetchone()
        return inbox_from_row(row) if row else None

    def message_count(self, channel: str, status: str) -> int:
        with self.reader() as cur:
            cur.execute("SELECT count(*) FROM inbox WHERE channel = ? AND status = ?", (channel, status))
            return int(cur.fetchone()[0])

    def messages(self, channel: str, status: str | None = None, *, limit: int = 100, after_id: int = 0) -> list[InboxMessage]:
        where, params = "channel = ? AND id > ?", [channel, after_id]
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        with self.reader() as cur:
            cur.execute(f"SELECT {_INBOX_COLUMNS} FROM inbox WHERE {where} ORDER BY id LIMIT ?", [*params, limit])
            return [inbox_from_row(r) for r in cur.fetchall()]

    def accesses(self, *, patient: str | None = None, agent: str | None = None, since: float | None = None,
                 until: float | None = None, limit: int = 100) -> list[Access]:
        # an id begins with its time in microseconds, in 14 hex digits (security/audit.py): a range of time is a range of ids
        where, params = _given([("agent = ?", agent), ("id >= ?", None if since is None else f"{int(since * 1_000_000):014x}"),
                                ("id < ?", None if until is None else f"{int(until * 1_000_000):014x}")])
        with self.reader() as cur:
            if patient is None:
                cur.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(where) or 'TRUE'} ORDER BY id DESC LIMIT ?",
                            [*params, limit])
                return [_access_from_row(row) for row in cur.fetchall()]
            # the patient's rows, newest first, until `limit` accesses are found and no older row can hold a newer one
            cur.execute("SELECT hi, audit_ids FROM audit_patient WHERE patient_id = ? AND hi >= ? AND lo < ? ORDER BY hi DESC",
                        (patient, since if since is not None else 0.0, until if until is not None else 1e12))
            spans = cur.fetchall()
            found: list[Access] = []
            for hi, ids in spans:
                if len(found) >= limit and hi < found[limit - 1].recorded:
                    break
                for part in _chunks(ids.split(), 500):
                    cur.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE id IN ({', '.join('?' * len(part))})"
                                + "".join(f" AND {w}" for w in where), [*part, *params])
                    found.extend(_access_from_row(row) for row in cur.fetchall())
                found.sort(key=lambda a: a.id, reverse=True)
        return found[:limit]

    def accesses_after(self, after: str, *, node: str, limit: int = 500) -> list[Access]:
        with self.reader() as cur:
            cur.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE id > ? AND node = ? ORDER BY id LIMIT ?", (after, node, limit))
            return [_access_from_row(row) for row in cur.fetchall()]

    def get_state(self, namespace: str, key: str) -> Any:
        with self.reader() as cur:
            cur.execute("SELECT value FROM node_state WHERE ns = ? AND key = ?", (namespace, key))
            row = cur.fetchone()
        return orjson.loads(row[0]) if row else None

    def list_state(self, namespace: str) -> list[tuple[str, Any]]:
        with self.reader() as cur:
            cur.execute("SELECT key, value FROM node_state WHERE ns = ? ORDER BY key", (namespace,))
            return [(row[0], orjson.loads(row[1])) for row in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        with self.reader() as cur:
            cur.execute("SELECT res_type, count(*) FROM resources WHERE deleted = 0 GROUP BY res_type")
            return {row[0]: int(row[1]) for row in cur.fetchall()}

    def ping(self) -> None:
        with self.reader() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()

    def _change_rows(self, cur: Cursor, after: int, count: int) -> list[Any]:
        cur.execute(
            f"SELECT {_STORED_COLUMNS}, v.txid FROM versions v WHERE v.seq > ? ORDER BY v.seq LIMIT ?",
            (after, count),
        )
        return cur.fetchall()

    def changes(self, after: str | None, count: int = 100) -> ChangePage:
        position = int(after) if after else 0
        with self.reader() as cur:
            rows = self._change_rows(cur, position, count)
        changes = [Change(int(r[6]), stored_from_row(r)) for r in rows]
        return ChangePage(changes, str(changes[-1].seq if changes else position))
