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

With `--mllp-workers 0` (the default on two cores) the server process makes the drafts itself,
in its event loop, and the writer is the only other process: on two cores, three busy
processes took turns on the cores and each woke up cold to every message (a draft cost 0.8 ms
in a loop and 1.6 to 2.1 ms when its process slept between messages), and the hop to the worker
and back cost its share too. Measured in the same runs, seven times: 422 to 602 lab panels a
second against 369 to 542 with one worker process, ahead or level each time; in a thread
instead of the event loop, 340 to 472 (the thread and the loop take turns on the interpreter). HTTP reads served by the same process kept their
latency (p99 9.5 to 11.9 ms under 4 MLLP connections, either way).

The server talks to each process over a socket pair read and written by its event loop: a
message crosses to a worker, and its draft to the writer, without waking a thread, so a hop
costs a system call, not a turn of the interpreter lock (through a process pool and its
feeder and result threads, each message took about 2 ms longer on two cores).

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
import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import pickle
import signal
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from rebond.hl7.intake import Answer, prepare, receive_many, unpack
from rebond.store import open_store
from rebond.store.base import Store
from rebond.store.sqlite import stop_counting_memory

log = logging.getLogger("rebond.hl7")
_PR_SET_PDEATHSIG = 1
#: messages the writer takes into one commit at most
WRITER_BATCH = 64
#: a message in flight through this many dead writers is taken in by the server process
WRITER_ATTEMPTS = 2
#: a process that dies sooner than this after its start is started again only after as long (seconds)
MIN_LIFE = 2.0
#: a draft takes a few milliseconds: a worker silent for this long on one (stopped, looping) is killed and replaced
DRAFT_TIMEOUT = 5.0
_SPAWN = multiprocessing.get_context("spawn")  # not forked: the server's threads, sockets and connections stay out
_LENGTH = struct.Struct("!I")
_RUNNING: set[asyncio.Task[None]] = set()  # the loop keeps only a weak reference to its tasks


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


def _child_process() -> None:
    """In every worker and writer: die with the server (Linux); Ctrl-C stops the server, which stops them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _framed(item: Any) -> bytes:
    payload = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


class _Frames:
    """In a child process: what the server sends on its socket, one pickle per length-prefixed frame."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _complete(self, most: int) -> list[Any]:
        items: list[Any] = []
        start = 0
        while len(items) < most and len(self.buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self.buffer, start)
            end = start + _LENGTH.size + size
            if len(self.buffer) < end:
                break
            items.append(pickle.loads(memoryview(self.buffer)[start + _LENGTH.size:end]))  # from this server only
            start = end
        del self.buffer[:start]
        return items

    def take(self, most: int) -> list[Any] | None:
        """Wait for one item, then take whatever else has arrived (up to `most`); None when the server is gone."""
        while True:
            items = self._complete(most)
            if items:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    while len(items) < most and (more := self.sock.recv(1 << 20, socket.MSG_DONTWAIT)):
                        self.buffer += more
                        items += self._complete(most - len(items))
                return items
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buffer += chunk

    def send(self, item: Any) -> None:
        self.sock.sendall(_framed(item))


def _worker_main(sock: socket.socket, db_url: str, site_id: str) -> None:
    """A draft worker: messages in (ticket, bytes), drafts out (ticket, packed draft or None, error)."""
    _child_process()
    store = open_store(db_url, site_id=site_id)
    store.for_reads_between_commits()
    frames = _Frames(sock)
    try:
        while (items := frames.take(16)) is not None:
            for item in items:
                if item is None:  # the server is stopping
                    return
                ticket, raw = item
                try:
                    frames.send((ticket, _draft_blob(store, raw), None))
                except Exception as err:  # a draft is an optimisation: the writer works the message out itself
                    frames.send((ticket, None, type(err).__name__))
    finally:
        store.close()


def _draft_blob(store: Store, raw: bytes) -> bytes | None:
    """The message's draft, packed here so that the server passes it on without reading it."""
    prepared = prepare(store, raw)
    return prepared.packed() if prepared is not None else None


def _writer_main(sock: socket.socket, db_url: str, site_id: str, checkpoint_elsewhere: bool) -> None:
    """The intake writer: messages in (ticket, bytes, draft), acknowledgements out, one commit per batch."""
    _child_process()
    if not stop_counting_memory():  # before the process's first connection
        log.debug("the intake writer: SQLite still counts its memory")
    store = open_store(db_url, site_id=site_id)
    store.for_small_commits()
    if checkpoint_elsewhere:  # by the server process, less busy, woken after each batch (IntakeWriter.on_commit)
        store.checkpoint_elsewhere()
    frames = _Frames(sock)
    try:
        while (items := frames.take(WRITER_BATCH)) is not None:
            batch = [item for item in items if item is not None]
            if batch:
                answers = receive_many(store, [(raw, unpack(blob)) for _ticket, raw, blob in batch])
                frames.send([(ticket, answer) for (ticket, _raw, _blob), answer in zip(batch, answers, strict=True)])
            if len(batch) < len(items):  # None: the server is stopping
                return
    finally:
        store.close()


class _Link:
    """The server's end of one child process: frames written without blocking, frames read by a task of the loop."""

    def __init__(self, process: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.process = process
        self.reader = reader
        self.writer = writer
        self.started = time.monotonic()

    @classmethod
    async def open(cls, name: str, target: Callable[..., None], *args: Any) -> _Link:
        ours, theirs = socket.socketpair()
        try:
            process = _SPAWN.Process(target=target, args=(theirs, *args), name=name, daemon=True)
            await asyncio.to_thread(process.start)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours, limit=2 ** 24)
        return cls(process, reader, writer)

    @property
    def pid(self) -> int | None:
        return int(self.process.pid) if self.process.pid is not None else None

    def listen(self, on_item: Callable[[Any], None], on_exit: Callable[[_Link], None]) -> None:
        async def read() -> None:
            try:
                while True:
                    (size,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
                    on_item(pickle.loads(await self.reader.readexactly(size)))  # from this server's own child
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            except Exception:  # whatever it was, the process is treated as gone (and replaced): nothing waits forever
                log.exception("MLLP: reading from %s failed", self.process.name)
                with contextlib.suppress(OSError, ValueError):
                    self.process.kill()
            self.writer.close()
            on_exit(self)

        _in_background(read())

    def send(self, item: Any) -> bool:
        if self.writer.is_closing():
            return False
        self.writer.write(_framed(item))
        return True

    async def stop(self, wait: float) -> None:
        """Ask the child to end (None is its last item: it finishes what it has), and end it if it does not."""
        with contextlib.suppress(OSError, RuntimeError):
            self.send(None)
        await self.reap(wait)
        self.writer.close()

    async def reap(self, wait: float = 5.0) -> None:
        """Wait for the process to end (killing it after `wait` seconds), so that no dead child is left behind."""
        await asyncio.to_thread(self._end, wait)

    async def bury(self) -> None:
        """After its death: reap it, and if it died within MIN_LIFE of its start (the store cannot open?), wait as long,
        so that a process that cannot live is not started again in a tight loop."""
        await self.reap()
        if time.monotonic() - self.started < MIN_LIFE:
            await asyncio.sleep(MIN_LIFE)

    def _end(self, wait: float) -> None:
        self.process.join(timeout=wait)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class WriterGone(Exception):
    """The intake writer could not take this message (it died with it in flight, twice): take it in here."""


@dataclass
class _InFlight:
    raw: bytes
    blob: bytes | None
    future: asyncio.Future[Answer]
    sent_to: _Link | None = None
    attempts: int = 0


class IntakeWriter:
    """The server's side of the intake writer process: sends messages, hands acknowledgements back, restarts it."""

    def __init__(self, db_url: str, site_id: str, on_commit: Callable[[], None] | None = None) -> None:
        self.db_url = db_url
        self.site_id = site_id
        #: called in the event loop after each of the writer's commits; given, the writer leaves its checkpoints to it
        self.on_commit = on_commit
        self._tickets = itertools.count(1)
        self._in_flight: dict[int, _InFlight] = {}
        self._link: _Link | None = None
        self._launching = False
        self._stopping = False
        self.batches = 0
        self.written = 0
        self.restarts = 0

    async def start(self) -> None:
        self._stopping = False
        await self._launch()

    async def _launch(self) -> None:
        self._launching = True
        try:
            link = await _Link.open("rebond-mllp-writer", _writer_main, self.db_url, self.site_id, self.on_commit is not None)
        except Exception as err:  # no writer process can be started: the server takes the messages in itself
            log.error("the MLLP intake writer cannot be started (%s): messages are taken in by the server", err)
            self._link = None
        else:
            if self._stopping:  # stopped while it was starting
                await link.stop(wait=10.0)
                return
            self._link = link
            link.listen(self._answered, self._died)
        finally:
            self._launching = False
        for ticket, flight in list(self._in_flight.items()):
            if flight.sent_to is None:
                self._send(ticket, flight)

    @property
    def pid(self) -> int | None:
        return self._link.pid if self._link is not None else None

    async def receive(self, raw: bytes, blob: bytes | None) -> Answer:
        """The message's acknowledgement, once the writer has committed it; WriterGone if it cannot."""
        if self._link is None and not self._launching:
            raise WriterGone("the intake writer is stopped")
        ticket = next(self._tickets)
        flight = _InFlight(raw, blob, asyncio.get_running_loop().create_future())
        self._in_flight[ticket] = flight
        if self._link is not None:  # else it goes to the writer being started
            self._send(ticket, flight)
        return await flight.future

    def _send(self, ticket: int, flight: _InFlight) -> None:
        if self._link is None:
            self._in_flight.pop(ticket, None)
            _settle(flight.future, error=WriterGone("no intake writer could be started"))
        elif self._link.send((ticket, flight.raw, flight.blob)):
            flight.sent_to = self._link

    def _answered(self, answers: list[tuple[int, Answer]]) -> None:
        self.batches += 1
        self.written += len(answers)
        if self.on_commit is not None:
            self.on_commit()
        for ticket, answer in answers:
            flight = self._in_flight.pop(ticket, None)
            if flight is not None:
                _settle(flight.future, answer=answer)

    def _died(self, link: _Link) -> None:
        if self._stopping or link is not self._link:
            return
        self._link = None
        self._launching = True  # messages arriving meanwhile wait for the new writer
        log.warning("the MLLP intake writer process died: starting it again (%d messages in flight)", len(self._in_flight))
        for ticket, flight in list(self._in_flight.items()):
            if flight.sent_to is link:
                flight.sent_to = None
                flight.attempts += 1
                if flight.attempts >= WRITER_ATTEMPTS:
                    del self._in_flight[ticket]
                    _settle(flight.future, error=WriterGone("in flight through dead writers"))
        _in_background(self._relaunch(link))

    async def _relaunch(self, dead: _Link) -> None:
        await dead.bury()
        if self._stopping:
            return
        self.restarts += 1
        await self._launch()

    async def stop(self) -> None:
        self._stopping = True
        link, self._link = self._link, None
        for flight in self._in_flight.values():
            _settle(flight.future, error=ConnectionAbortedError("the server is stopping"))
        self._in_flight.clear()
        if link is not None:
            await link.stop(wait=10.0)  # the writer ends after its batch

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "batches": self.batches, "written": self.written, "restarts": self.restarts,
                "in_flight": len(self._in_flight)}


def _settle(future: asyncio.Future[Any], *, answer: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(answer)


class _Worker:
    def __init__(self, link: _Link) -> None:
        self.link = link
        self.waiting: dict[int, asyncio.Future[tuple[bytes | None, str | None]]] = {}


class DraftWorkers:
    """Draft worker processes (each replaced if it dies), or none: then the server process drafts on `here`, its own
    store; and the intake writer process."""

    def __init__(self, db_url: str, site_id: str, count: int, here: Store | None = None) -> None:
        if count == 0 and here is None:
            raise ValueError("without worker processes, the drafts are made on the server's own store: give it")
        self.db_url = db_url
        self.site_id = site_id
        self.count = count
        self.here = here
        self._reading_here = False
        self._workers: list[_Worker | None] = [None] * count
        self._tickets = itertools.count(1)
        self._stopping = False
        # the server process checkpoints the store the writer commits to: the writer is the busier of the two
        self.writer = IntakeWriter(db_url, site_id, here.committed_elsewhere if here is not None else None)
        self.drafted = 0
        self.failed = 0
        self.redone = 0  # drafts found stale under the lock (another write changed what they read): worked out again
        self.restarts = 0

    async def start(self) -> None:
        self._stopping = False
        await asyncio.gather(self.writer.start(), *(self._launch(slot) for slot in range(self.count)))

    async def _launch(self, slot: int) -> None:
        try:
            link = await _Link.open(f"rebond-mllp-worker-{slot + 1}", _worker_main, self.db_url, self.site_id)
        except Exception as err:
            log.error("an MLLP worker process cannot be started (%s): its messages are worked out by the writer", err)
            return
        if self._stopping:  # stopped while it was starting
            await link.stop(wait=2.0)
            return
        worker = _Worker(link)
        self._workers[slot] = worker
        link.listen(lambda item: _drafted(worker, item), lambda dead: self._died(slot, worker))

    async def draft(self, raw: bytes) -> bytes | None:
        """The message's draft from a worker, packed; None (the writer works it out itself) if the workers cannot."""
        if self.here is not None and self.count == 0:
            return self._draft_here(raw)
        live = [w for w in self._workers if w is not None]
        if not live:
            return None
        worker = min(live, key=lambda w: len(w.waiting))  # the one with the fewest messages waiting
        ticket = next(self._tickets)
        future: asyncio.Future[tuple[bytes | None, str | None]] = asyncio.get_running_loop().create_future()
        worker.waiting[ticket] = future
        if not worker.link.send((ticket, raw)):
            worker.waiting.pop(ticket)
            return None
        try:
            blob, error = await asyncio.wait_for(future, DRAFT_TIMEOUT)
        except TimeoutError:
            log.warning("an MLLP worker gave no draft in %.0f s: it is stopped and replaced", DRAFT_TIMEOUT)
            with contextlib.suppress(OSError, ValueError):
                worker.link.process.kill()
            blob, error = None, "TimeoutError"
        if error is not None:  # whatever went wrong, the writer decides
            self.failed += 1
            log.warning("an MLLP worker could not draft a message: %s", error)
            return None
        self.drafted += 1
        return blob

    def _draft_here(self, raw: bytes) -> bytes | None:
        """The draft made in this process, in the event loop: about a millisecond of Python, as a worker would spend."""
        assert self.here is not None
        try:
            if not self._reading_here:  # the event loop's own connection, once
                self.here.for_reads_between_commits()
                self._reading_here = True
            blob = _draft_blob(self.here, raw)
        except Exception as err:  # whatever went wrong, the writer decides
            self.failed += 1
            log.warning("an MLLP message could not be drafted: %s", type(err).__name__)
            return None
        self.drafted += 1
        return blob

    async def take(self, raw: bytes) -> Answer:
        """Draft the message in a worker, have the writer commit it: its acknowledgement (WriterGone: take it in here)."""
        answer = await self.writer.receive(raw, await self.draft(raw))
        if answer.redone:
            self.redone += 1
        return answer

    def _died(self, slot: int, worker: _Worker) -> None:
        for future in worker.waiting.values():
            _settle(future, answer=(None, None))
        worker.waiting.clear()
        if self._stopping or self._workers[slot] is not worker:
            return
        self._workers[slot] = None
        log.warning("an MLLP worker process died: starting it again")
        self.restarts += 1

        async def relaunch() -> None:
            await worker.link.bury()
            if not self._stopping:
                await self._launch(slot)

        _in_background(relaunch())

    async def stop(self) -> None:
        self._stopping = True
        workers = [w for w in self._workers if w is not None]
        self._workers = [None] * self.count
        await self.writer.stop()
        for worker in workers:
            await worker.link.stop(wait=2.0)

    def status(self) -> dict[str, Any]:
        return {"processes": self.count, "drafted": self.drafted, "failed": self.failed, "redone": self.redone,
                "restarts": self.restarts, "writer": self.writer.status()}


def _drafted(worker: _Worker, item: tuple[int, bytes | None, str | None]) -> None:
    ticket, blob, error = item
    future = worker.waiting.pop(ticket, None)
    if future is not None:
        _settle(future, answer=(blob, error))
