"""Processes that take MLLP messages in, so that HL7 intake uses every core and its writer has one to itself.

Turning a lab result into FHIR (decoding, mapping, validation, index rows) is Python, and one
interpreter runs Python on one core at a time. With `rebond serve --mllp-workers N`, the
server process keeps the connections; each message's writes are worked out as a draft
(store/draft.py) by one of N worker processes, each reading the same store, and every draft
is written by one intake writer process:

    connection ──bytes──▶ server ──bytes──▶ worker: decode, map, validate, index rows on the last commit
                                 ◀─draft──
                          server ──bytes + draft──▶ writer: group commit (inbox + the draft's writes, checked)
                                 ◀──────ACK───────
                          server ──▶ AA on the connection

The writer is alone on purpose. SQLite has one writer at a time and drops a connection's page
cache whenever another process has written, so writers in several processes spend their turn
re-reading the pages they need; and a writer thread inside the server waited for the
interpreter behind the connections, the drafts' unpickling and the HTTP requests for about
half of its time (measured: 4.3 ms a message of which 2.1 ms working). The writer process
does nothing else: it takes whatever messages have arrived, writes them in one transaction,
each under its own savepoint, commits once, and sends back their acknowledgements.

A message is acknowledged only after the writer's commit. A worker that fails or dies costs
nothing but time: the writer works the message out under the lock, as without workers. A
writer that dies is started again and is sent every message not yet answered (a message it
had committed is recognised by its sender and control id and answered again, applied once);
a message in flight through two dead writers is taken in by the server process itself.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from rebond.hl7.intake import Answer, Prepared, prepare, receive_many
from rebond.store import open_store
from rebond.store.base import Store

log = logging.getLogger("rebond.hl7")
_PR_SET_PDEATHSIG = 1
#: messages the writer takes into one commit at most
WRITER_BATCH = 64
#: a message in flight through this many dead writers is taken in by the server process
WRITER_ATTEMPTS = 2
#: a writer that dies sooner than this after its start is started again only after as long (seconds)
WRITER_MIN_LIFE = 2.0
_store: Store | None = None
_SPAWN = multiprocessing.get_context("spawn")  # not forked: the server's threads, sockets and connections stay out


def _child_process() -> None:
    """In every worker and writer: die with the server (Linux); Ctrl-C stops the server, which stops them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_worker(db_url: str, site_id: str) -> None:
    global _store
    _child_process()
    _store = open_store(db_url, site_id=site_id)


def _draft_here(raw: bytes) -> bytes | None:
    """In a worker: the message's draft, pickled here so that the server passes it on without reading it."""
    assert _store is not None
    prepared = prepare(_store, raw)
    return pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL) if prepared is not None else None


def _unpickled(blob: bytes | None) -> Prepared | None:
    if blob is None:
        return None
    try:
        prepared = pickle.loads(blob)  # made by this server's own worker processes
    except Exception:
        return None
    return prepared if isinstance(prepared, Prepared) else None


def _writer_main(conn: Connection, db_url: str, site_id: str) -> None:
    """The intake writer: messages in (ticket, bytes, draft), acknowledgements out, one commit per batch."""
    _child_process()
    store = open_store(db_url, site_id=site_id)
    try:
        stopping = False
        while not stopping:
            try:
                first = conn.recv()
            except EOFError:
                return
            if first is None:
                return
            batch = [first]
            while len(batch) < WRITER_BATCH and conn.poll():  # whatever else has arrived goes into the same commit
                try:
                    item = conn.recv()
                except EOFError:
                    item = None
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            answers = receive_many(store, [(raw, _unpickled(blob)) for _ticket, raw, blob in batch])
            conn.send([(ticket, answer) for (ticket, _raw, _blob), answer in zip(batch, answers, strict=True)])
    finally:
        store.close()


class WriterGone(Exception):
    """The intake writer could not take this message (it died with it in flight, twice): take it in here."""


@dataclass
class _InFlight:
    raw: bytes
    blob: bytes | None
    future: asyncio.Future[Answer]
    loop: asyncio.AbstractEventLoop
    attempts: int = 0


class IntakeWriter:
    """The server's side of the intake writer process: sends messages, hands acknowledgements back, restarts it."""

    def __init__(self, db_url: str, site_id: str) -> None:
        self.db_url = db_url
        self.site_id = site_id
        self._lock = threading.Lock()
        self._tickets = itertools.count(1)
        self._in_flight: dict[int, _InFlight] = {}
        self._outbox: queue.SimpleQueue[tuple[Connection | None, Any]] = queue.SimpleQueue()
        self._process: Any = None
        self._conn: Connection | None = None
        self._stopping = False
        self._launched_at = 0.0
        self.batches = 0
        self.written = 0
        self.restarts = 0

    def start(self) -> None:
        self._stopping = False
        self._launch()
        threading.Thread(target=self._send_loop, name="mllp-writer-send", daemon=True).start()

    def _launch(self) -> None:
        ours, theirs = _SPAWN.Pipe(duplex=True)
        process = _SPAWN.Process(target=_writer_main, args=(theirs, self.db_url, self.site_id), name="rebond-mllp-writer",
                                 daemon=True)
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        self._launched_at = time.monotonic()
        threading.Thread(target=self._receive_loop, args=(ours,), name="mllp-writer-receive", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def receive(self, raw: bytes, blob: bytes | None) -> Answer:
        """The message's acknowledgement, once the writer has committed it; WriterGone if it cannot."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        with self._lock:
            if self._conn is None:
                raise WriterGone("the intake writer is stopped")
            ticket = next(self._tickets)
            self._in_flight[ticket] = _InFlight(raw, blob, future, loop)
            self._outbox.put((self._conn, (ticket, raw, blob)))
        return await future

    def _send_loop(self) -> None:
        # sends happen here, not on the event loop: a full pipe (the writer busy committing) must not stall connections
        while True:
            conn, item = self._outbox.get()
            if conn is None:
                return
            with contextlib.suppress(OSError, ValueError):  # a dead writer: its receiver thread starts another
                conn.send(item)

    def _receive_loop(self, conn: Connection) -> None:
        while True:
            try:
                answers = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                self.batches += 1
                self.written += len(answers)
                done = [(self._in_flight.pop(ticket, None), answer) for ticket, answer in answers]
            for flight, answer in done:
                if flight is not None:
                    flight.loop.call_soon_threadsafe(_settle, flight.future, answer, None)
        with contextlib.suppress(OSError):
            conn.close()
        if self._stopping or conn is not self._conn:
            return
        log.warning("the MLLP intake writer process died: starting it again (%d messages in flight)", len(self._in_flight))
        if time.monotonic() - self._launched_at < WRITER_MIN_LIFE:
            time.sleep(WRITER_MIN_LIFE)  # one that dies at start (the store cannot open?) is not started in a tight loop
        with self._lock:
            if self._stopping:
                return
            self.restarts += 1
            try:
                self._launch()
            except Exception as err:  # no writer process can be started: the server takes the messages in itself
                log.error("the MLLP intake writer cannot be started (%s): messages are taken in by the server", err)
                self._conn = self._process = None
            for ticket, flight in list(self._in_flight.items()):
                flight.attempts += 1
                if self._conn is None or flight.attempts >= WRITER_ATTEMPTS:
                    del self._in_flight[ticket]
                    flight.loop.call_soon_threadsafe(_settle, flight.future, None, WriterGone("in flight through dead writers"))
                else:
                    self._outbox.put((self._conn, (ticket, flight.raw, flight.blob)))

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            conn, process = self._conn, self._process
            self._conn = None
            for flight in self._in_flight.values():
                flight.loop.call_soon_threadsafe(_settle, flight.future, None, ConnectionAbortedError("the server is stopping"))
            self._in_flight.clear()
        if conn is not None:
            self._outbox.put((conn, None))  # the writer ends after its batch
        self._outbox.put((None, None))
        if process is not None:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        if conn is not None:
            conn.close()

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "batches": self.batches, "written": self.written, "restarts": self.restarts,
                "in_flight": len(self._in_flight)}


def _settle(future: asyncio.Future[Answer], answer: Answer | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert answer is not None
        future.set_result(answer)


class DraftWorkers:
    """Worker processes making drafts (replaced as a whole if one of them dies) and the intake writer process."""

    def __init__(self, db_url: str, site_id: str, count: int) -> None:
        self.db_url = db_url
        self.site_id = site_id
        self.count = count
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.writer = IntakeWriter(db_url, site_id)
        self.drafted = 0
        self.failed = 0
        self.redone = 0  # drafts found stale under the lock (another write changed what they read): worked out again
        self.restarts = 0

    def start(self) -> None:
        self._pool = self._new_pool()
        self.writer.start()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(self.count, mp_context=_SPAWN, initializer=_start_worker,
                                                      initargs=(self.db_url, self.site_id))

    async def draft(self, raw: bytes) -> bytes | None:
        """The message's draft from a worker, pickled; None (the writer works it out itself) if the workers cannot."""
        pool = self._pool
        if pool is None:
            return None
        try:
            blob = await asyncio.get_running_loop().run_in_executor(pool, _draft_here, raw)
        except concurrent.futures.BrokenExecutor:
            self._restart(pool)
            return None
        except Exception as err:  # a draft is an optimisation: whatever went wrong, the writer decides
            self.failed += 1
            log.warning("an MLLP worker could not draft a message: %s", type(err).__name__)
            return None
        self.drafted += 1
        return blob

    async def take(self, raw: bytes) -> Answer:
        """Draft the message in a worker, have the writer commit it: its acknowledgement (WriterGone: take it in here)."""
        answer = await self.writer.receive(raw, await self.draft(raw))
        if answer.redone:
            self.redone += 1
        return answer

    def _restart(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        if self._pool is not broken:
            return
        log.warning("an MLLP worker process died: starting the workers again")
        self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    def stop(self) -> None:
        self.writer.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def status(self) -> dict[str, Any]:
        return {"processes": self.count, "drafted": self.drafted, "failed": self.failed, "redone": self.redone,
                "restarts": self.restarts, "writer": self.writer.status()}
