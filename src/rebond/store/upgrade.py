"""A store made by an earlier Rebond, brought to this one's index tables once, when it opens.

Schema 4 changed how the search index is kept (store/schema.py), to write fewer pages a commit:
- the rows of each index table are numbered (`n`, unique for their resource and key) and kept in
  the order of (rid, key, n): on SQLite the table is that order (WITHOUT ROWID) instead of a table and
  an index by rid; on PostgreSQL (rid, key, n) is the primary key, in place of the index by rid;
- a composite's token part is one row, `code` then its system after a separator, where there were
  two (`code` and `system|code`);
- `:text` finds its codes in `sp_token_texts`, written once for each code and text, instead of an
  index holding every row's text.

Each index table is made again, its rows copied with their numbers; the composites are worked out
again from the resources they index, and the texts gathered from the token rows. The same SQL runs on
both engines, in one transaction of the engine's opening (`upgrade_index`): a store is upgraded
entirely or not at all, and another process opening it at the same time waits, then finds it done.
Every process of a group must run this Rebond or a later one from then on.

Schema 5 answers an Observation's `code-value-quantity`, `code-value-concept` and `code-value-date` with the rows of
its code and its value (fhir/searchparams.py JOINED_COMPOSITES): their composite rows are no longer written nor read,
and a store made before loses them when it opens (`drop_joined_rows`), in one statement. An earlier Rebond would not
find the resources written since by such a search: it refuses a store of schema 5 (`check_schema`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson

from rebond.fhir.searchparams import JOINED_COMPOSITES
from rebond.store.base import StoreError
from rebond.store.indexing import index_resource
from rebond.store.schema import INDEX_TABLES, SCHEMA_VERSION, Types, index_columns, index_table_ddl
from rebond.store.sql import INDEX_INSERTS

log = logging.getLogger("rebond.store")
_PAGE = 500  # resources read and re-indexed at a time
#: a long upgrade says how far it has gone this often (seconds), for whoever watches it at 3 a.m.
PROGRESS_EVERY = 10.0


def has_numbered_rows(columns: Sequence[str]) -> bool:
    """Whether an index table (its columns' names) is of schema 4."""
    return "n" in columns


def upgrade_index(cur: Any, types: Types) -> None:
    """Bring index tables of schema 3 or before to schema 4, in the caller's transaction; `cur` takes `?` placeholders."""
    started = time.monotonic()
    statements = {table: index_table_ddl(types, table) for table in INDEX_TABLES}
    old_indexes = [f"{table}_{suffix}" for table in INDEX_TABLES for suffix in ("rid", "lookup")]
    for index in (*old_indexes, "sp_date_hi", "sp_string_exact", "sp_token_text"):
        cur.execute(f"DROP INDEX IF EXISTS {index}")  # their names are the new tables' indexes' names
    for table, (create, *indexes) in statements.items():
        values = ", ".join(("rid", "key", *INDEX_TABLES[table]))
        cur.execute(f"ALTER TABLE {table} RENAME TO {table}_v3")
        cur.execute(create)
        cur.execute(f"INSERT INTO {table} ({', '.join(index_columns(table))})"
                    f" SELECT {values}, row_number() OVER (PARTITION BY rid, key) - 1 FROM {table}_v3"
                    " ORDER BY rid, key")
        copied = cur.rowcount
        cur.execute(f"DROP TABLE {table}_v3")
        for statement in indexes:  # made once the rows are in: faster than kept up row by row
            cur.execute(statement)
        log.warning("upgrading the search index (schema 4): %s made again, %d rows, at %.1f s", table, copied,
                    time.monotonic() - started)
    resources = rebuild_composites(cur)
    gather_token_texts(cur)
    log.warning("the search index is of schema 4 (%d resources with composite rows indexed again) in %.1f s",
                resources, time.monotonic() - started)


def rebuild_composites(cur: Any) -> int:
    """The composite rows of every resource that has some, worked out again from its current version (their token
    parts are in one form now); returns how many resources. `cur`: the engine's cursor, with `?` placeholders."""
    cur.execute("SELECT DISTINCT rid FROM sp_composite ORDER BY rid")
    rids = [int(row[0]) for row in cur.fetchall()]
    if rids:
        log.warning("upgrading the search index (schema 4): the composite rows of %d resources", len(rids))
    said = time.monotonic()
    for start in range(0, len(rids), _PAGE):
        if time.monotonic() - said >= PROGRESS_EVERY:
            log.warning("upgrading the search index (schema 4): composite rows, %d of %d resources", start, len(rids))
            said = time.monotonic()
        page = rids[start:start + _PAGE]
        marks = ", ".join("?" for _ in page)
        cur.execute(f"SELECT r.rid, v.body FROM resources r JOIN versions v ON v.seq = r.seq WHERE r.rid IN ({marks})"
                    " AND r.deleted = 0", page)
        bodies = cur.fetchall()
        cur.execute(f"DELETE FROM sp_composite WHERE rid IN ({marks})", page)
        rows = [(int(rid), *row, n) for rid, body in bodies if body is not None
                for n, row in enumerate(index_resource(orjson.loads(bytes(body))).composite)]
        if rows:
            cur.executemany(INDEX_INSERTS["sp_composite"], rows)
    return len(rids)


def gather_token_texts(cur: Any) -> None:
    """sp_token_texts from the token rows already written."""
    cur.execute("INSERT INTO sp_token_texts (key, text_norm, code) SELECT DISTINCT key, text_norm, code FROM sp_token"
                " WHERE text_norm IS NOT NULL AND code IS NOT NULL ON CONFLICT DO NOTHING")


_JOINED_KEYS = sorted(JOINED_COMPOSITES)


def has_joined_rows(cur: Any) -> bool:
    """Whether a store made before schema 5 still holds the composite rows its codes' and values' rows now answer."""
    cur.execute(f"SELECT 1 FROM sp_composite WHERE key IN ({', '.join('?' for _ in _JOINED_KEYS)}) LIMIT 1", _JOINED_KEYS)
    return cur.fetchone() is not None


def drop_joined_rows(cur: Any) -> None:
    """Schema 5: the composite rows of JOINED_COMPOSITES deleted, in the caller's transaction (`?` placeholders)."""
    started = time.monotonic()
    cur.execute(f"DELETE FROM sp_composite WHERE key IN ({', '.join('?' for _ in _JOINED_KEYS)})", _JOINED_KEYS)
    log.warning("upgrading the search index (schema 5): %d composite rows no longer kept (an Observation's code and value"
                " answer them) deleted in %.1f s", cur.rowcount, time.monotonic() - started)


class LaterSchema(StoreError):
    """A store that a later Rebond has brought to its own schema."""


def check_schema(found: int | None) -> None:
    """Refuse a store of a later schema than this Rebond's: it would write index rows and versions in a layout that
    store no longer reads, and nothing would say so before searches went wrong. `found`: None for no store yet."""
    if found is not None and found > SCHEMA_VERSION:
        raise LaterSchema(f"this store is of schema {found}, made by a later Rebond; this one knows schema {SCHEMA_VERSION}"
                          " and earlier: run the later Rebond here too (docs/operations.md, « Upgrading »)")


def schema_of(tables: set[str], stamped: str | None) -> int | None:
    """A store's schema from its tables and the number stamped in `rebond_meta`: None where there is no store yet, 1
    for one made before the number was kept."""
    if "resources" not in tables:
        return None
    return int(stamped) if stamped is not None and stamped.isdigit() else 1
