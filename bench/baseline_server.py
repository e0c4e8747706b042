"""The baseline every HTTP benchmark runs beside: the same documents in the same engine, with the
same durability, served by the same HTTP stack, with no FHIR logic (no validation, indexing,
versioning or search). Rebond's figures divided by these say what the FHIR work costs."""
from __future__ import annotations

import sqlite3
import sys
import threading
import uuid
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class Docs:
    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()
        self.lock = threading.Lock()
        self.writer = self._connect()
        self.writer.execute("CREATE TABLE IF NOT EXISTS docs (type TEXT, id TEXT, body BLOB, PRIMARY KEY (type, id))")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def reader(self) -> sqlite3.Connection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = self._connect()
        return conn

    def get(self, rtype: str, rid: str) -> Any:
        row = self.reader().execute("SELECT body FROM docs WHERE type = ? AND id = ?", (rtype, rid)).fetchone()
        return row[0] if row else None

    def put(self, rtype: str, rid: str, body: bytes) -> None:
        with self.lock:
            self.writer.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", (rtype, rid, body))

    def put_many(self, rows: list[tuple[str, str, bytes]]) -> None:
        with self.lock:
            self.writer.execute("BEGIN")
            self.writer.executemany("INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", rows)
            self.writer.execute("COMMIT")


class PgDocs:
    """The same over PostgreSQL, synchronous_commit on, through a psycopg pool."""

    def __init__(self, url: str) -> None:
        from psycopg_pool import ConnectionPool

        self.pool = ConnectionPool(url, min_size=2, max_size=16, kwargs={"autocommit": True}, open=True)
        with self.pool.connection() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS docs (type TEXT, id TEXT, body BYTEA, PRIMARY KEY (type, id))")

    def get(self, rtype: str, rid: str) -> Any:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT body FROM docs WHERE type = %s AND id = %s", (rtype, rid)).fetchone()
        return bytes(row[0]) if row else None

    def put(self, rtype: str, rid: str, body: bytes) -> None:
        with self.pool.connection() as conn:
            conn.execute("INSERT INTO docs VALUES (%s, %s, %s) ON CONFLICT (type, id) DO UPDATE SET body = EXCLUDED.body",
                         (rtype, rid, body))

    def put_many(self, rows: list[tuple[str, str, bytes]]) -> None:
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany("INSERT INTO docs VALUES (%s, %s, %s) ON CONFLICT (type, id) DO NOTHING", rows)


def open_docs(url: str) -> Docs | PgDocs:
    if url.startswith("sqlite:///"):
        return Docs(url[len("sqlite:///"):])
    return PgDocs(url)


def create_app(docs: Docs | PgDocs) -> Starlette:
    async def get(request: Request) -> Response:
        rtype, rid = request.path_params["type"], request.path_params["id"]
        # as Rebond does: an embedded read in the event loop, a networked one in a thread
        body = docs.get(rtype, rid) if isinstance(docs, Docs) else await run_in_threadpool(docs.get, rtype, rid)
        if body is None:
            return Response(status_code=404)
        return Response(body, media_type="application/json")

    async def post(request: Request) -> Response:
        body = await request.body()
        rid = str(uuid.uuid4())
        await run_in_threadpool(docs.put, request.path_params["type"], rid, body)
        return Response(body, status_code=201, media_type="application/json")

    return Starlette(routes=[Route("/docs/{type}/{id}", get), Route("/docs/{type}", post, methods=["POST"])])


if __name__ == "__main__":
    uvicorn.run(create_app(open_docs(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
