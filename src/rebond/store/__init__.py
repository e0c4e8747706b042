"""The versioned FHIR resource store: one interface, an engine chosen by the database URL."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rebond.store.base import Store, StoreError

DEFAULT_DB = "sqlite:///var/rebond.db"


@dataclass(frozen=True)
class StoreFacts:
    """What a store is, read without opening it for writing (`rebond db status`)."""

    engine: str  # sqlite, postgresql
    where: str  # its file, or its server and database (no password)
    schema: int | None  # None: no Rebond store there
    size: int  # bytes on disk (the WAL included)
    page_size: int | None = None  # SQLite


def _sqlite_path(url: str) -> str:
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if not path:
        raise StoreError(f"'{url}' names no file: write sqlite:///path/to/file.db")
    return path if path == ":memory:" else str(Path(path))


def inspect_store(url: str = DEFAULT_DB) -> StoreFacts:
    """The engine, schema and size of the store at `url`; nothing is created, upgraded or written."""
    if url.startswith("sqlite://"):
        from rebond.store.sqlite import inspect

        return inspect(_sqlite_path(url))
    if url.startswith(("postgresql://", "postgres://")):
        from rebond.store.postgres import inspect as inspect_pg

        return inspect_pg(url)
    raise StoreError(f"unsupported database URL '{url}': use sqlite:///file.db or postgresql://user@host:port/db")


def open_store(url: str = DEFAULT_DB, *, site_id: str = "central") -> Store:
    """`sqlite:///relative/path.db`, `sqlite:////absolute/path.db` or `postgresql://user@host:port/db`."""
    if url.startswith("sqlite://"):
        from rebond.store.sqlite import SQLiteStore

        return SQLiteStore(_sqlite_path(url), site_id)
    if url.startswith(("postgresql://", "postgres://")):
        from rebond.store.postgres import PostgresStore

        return PostgresStore(url, site_id)
    raise StoreError(f"unsupported database URL '{url}': use sqlite:///file.db or postgresql://user@host:port/db")


__all__ = ["DEFAULT_DB", "Store", "StoreError", "StoreFacts", "inspect_store", "open_store"]
