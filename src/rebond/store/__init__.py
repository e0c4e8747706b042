"""The versioned FHIR resource store: one interface, an engine chosen by the database URL."""
from __future__ import annotations

from pathlib import Path

from rebond.store.base import Store, StoreError

DEFAULT_DB = "sqlite:///var/rebond.db"


def open_store(url: str = DEFAULT_DB, *, site_id: str = "central") -> Store:
    """`sqlite:///relative/path.db`, `sqlite:////absolute/path.db` or `postgresql://user@host:port/db`."""
    if url.startswith("sqlite://"):
        from rebond.store.sqlite import SQLiteStore

        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise StoreError(f"'{url}' names no file: write sqlite:///path/to/file.db")
        return SQLiteStore(path if path == ":memory:" else str(Path(path)), site_id)
    if url.startswith(("postgresql://", "postgres://")):
        from rebond.store.postgres import PostgresStore

        return PostgresStore(url, site_id)
    raise StoreError(f"unsupported database URL '{url}': use sqlite:///file.db or postgresql://user@host:port/db")


__all__ = ["DEFAULT_DB", "Store", "StoreError", "open_store"]
