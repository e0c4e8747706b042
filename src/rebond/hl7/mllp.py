"""The MLLP listener: HL7 v2 messages framed <VT> message <FS><CR> over TCP, each acknowledged on its connection.

One message in flight per connection (the sender waits for the ACK before the next); many
connections at once, each its own task, so a slow or half-open sender never holds up the
others. Bytes outside a frame are skipped; a frame cut by a new <VT> is dropped (it was never
acknowledged, the sender will send it again); a frame over the size limit is answered AR.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from anyio.to_thread import run_sync

from rebond.hl7.intake import CHANNEL, KEPT_OF_OVERSIZED, MAX_MESSAGE_BYTES, Answer, control_id_of, receive
from rebond.hl7.message import MessageError, acknowledgement
from rebond.hl7.workers import DraftWorkers, WriterGone
from rebond.moments import utc_second
from rebond.ops.awake import AwakeWhileBusy
from rebond.store.base import Store

log = logging.getLogger("rebond.hl7")
START, END = b"\x0b", b"\x1c\x0d"
#: senders tallied one by one in the status; the others share one tally
MAX_SENDERS = 100
OTHER_SENDERS = "(others)"


def frame(payload: bytes) -> bytes:
    return START + payload + END


class _Framing:
    """Cuts a byte stream into MLLP frames; an oversized frame keeps only its beginning (memory stays bounded)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buffer = b""
        self.in_frame = False
        self.kept = b""
        self.size = 0

    def _take(self, part: bytes) -> None:
        self.size += len(part)
        room = (self.max_bytes if self.size <= self.max_bytes else KEPT_OF_OVERSIZED) - len(self.kept)
        if room > 0:
            self.kept += part[:room]
        if self.size > self.max_bytes:
            self.kept = self.kept[:KEPT_OF_OVERSIZED]

    def feed(self, chunk: bytes) -> list[tuple[bytes, int]]:
        """The frames this chunk completes: (payload, its full size)."""
        self.buffer += chunk
        done: list[tuple[bytes, int]] = []
        while True:
            if not self.in_frame:
                start = self.buffer.find(START)
                if start < 0:
                    if self.buffer.strip():
                        log.info("MLLP: %d bytes outside any frame skipped", len(self.buffer))
                    self.buffer = b""
                    return done
                if self.buffer[:start].strip():
                    log.info("MLLP: %d bytes before a frame skipped", start)
                self.buffer, self.in_frame, self.kept, self.size = self.buffer[start + 1:], True, b"", 0
            end, restart = self.buffer.find(END), self.buffer.find(START)
            if restart >= 0 and (end < 0 or restart < end):
                log.info("MLLP: a frame was cut by the start of another; the cut one is dropped")
                self.buffer, self.in_frame = self.buffer[restart:], False
                continue
            if end < 0:
                cut = len(self.buffer) - 1 if self.buffer.endswith(END[:1]) else len(self.buffer)  # <FS> may await its <CR>
                self._take(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                return done
            self._take(self.buffer[:end])
            self.buffer, self.in_frame = self.buffer[end + len(END):], False
            done.append((self.kept, self.size))


@dataclass
class _Sender:
    """What one sending system (MSH-3|MSH-4) sent since the listener started, and how it was answered."""

    messages: int = 0
    accepted: int = 0  # AA, CA
    retry: int = 0  # AE, CE: the store could not take it then; the sender sends it again
    refused: int = 0  # AR, CR: kept as a dead letter
    last_at: float = 0.0
    last_refused_at: float | None = None

    def note(self, code: str, at: float) -> None:
        self.messages += 1
        self.last_at = at
        if code in ("AA", "CA"):
            self.accepted += 1
        elif code in ("AE", "CE"):
            self.retry += 1
        else:
            self.refused += 1
            self.last_refused_at = at


class MllpServer:
    def __init__(self, store: Store, host: str, port: int, *, max_bytes: int = MAX_MESSAGE_BYTES, idle_timeout: float = 300.0,
                 workers: int = 8, drafts: DraftWorkers | None = None, awake: AwakeWhileBusy | None = None) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self.drafts = drafts  # worker processes that work out each message's writes (hl7/workers.py); None: done here
        self.awake = awake  # idle CPUs kept polling while messages come in fast (ops/awake.py); None: never
        self._limiter = anyio.CapacityLimiter(workers)  # messages applied at once, across connections
        self._server: asyncio.Server | None = None
        self.connections = 0
        self.senders: dict[str, _Sender] = {}

    async def start(self) -> None:
        if self.drafts is not None:
            await self.drafts.start()
        if self.awake is not None:
            self.awake.start()
        self._server = await asyncio.start_server(self.serve_connection, self.host, self.port, limit=2 ** 20)
        sockets: list[Any] = list(self._server.sockets or [])
        if sockets and self.port == 0:
            self.port = sockets[0].getsockname()[1]
        workers = ""
        if self.drafts is not None:
            drafted = f"one of {self.drafts.count} worker processes" if self.drafts.count else "this process"
            workers = f", each message worked out by {drafted} and written by the intake writer process"
        log.info("MLLP listening on %s:%s%s", self.host, self.port, workers)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.awake is not None:
            self.awake.stop()
        if self.drafts is not None:
            await self.drafts.stop()

    def status(self) -> dict[str, Any]:
        """The listener, the messages waiting for IT (dead letters) or not yet applied, and each sender's traffic since the
        listener started: a lab whose results stopped coming shows here. Reads the store: call it off the event loop."""
        facts: dict[str, Any] = {"port": self.port, "connections": self.connections,
                                 "dead_letters": self.store.message_count(CHANNEL, "rejected"),
                                 "waiting": self.store.message_count(CHANNEL, "received"),
                                 "senders": [{"sender": name, **asdict(sender), "last_at": utc_second(sender.last_at),
                                              "last_refused_at": utc_second(sender.last_refused_at)}
                                             for name, sender in sorted(self.senders.items())]}
        if self.drafts is not None:
            facts["workers"] = self.drafts.status()
        if self.awake is not None:
            facts["cpus_polling"] = self.awake.status()
        return facts

    def _sender(self, name: str) -> _Sender:
        """Its tally; past MAX_SENDERS names (a sender that changes its MSH-3 at every message), one tally for the rest."""
        if name not in self.senders and len(self.senders) >= MAX_SENDERS:
            name = OTHER_SENDERS
        return self.senders.setdefault(name, _Sender())

    async def _take(self, payload: bytes) -> Answer:
        if self.drafts is not None:
            try:
                return await self.drafts.take(payload)
            except WriterGone as err:
                log.warning("MLLP message taken in by the server process: %s", err)
        return await run_sync(functools.partial(receive, self.store, payload), limiter=self._limiter)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = writer.get_extra_info("peername")
        framing = _Framing(self.max_bytes)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):  # a timer moved, where wait_for made a task: ~13 µs less a read
                        chunk = await reader.read(65536)
                except TimeoutError:
                    log.info("MLLP connection idle for %.0f s: closed", self.idle_timeout)
                    return
                if not chunk:
                    return  # closed by the sender; a partial frame was never acknowledged, so nothing is lost
                for payload, size in framing.feed(chunk):
                    if size > self.max_bytes:
                        answer = await run_sync(self._refuse_oversized, payload, size, limiter=self._limiter)
                    else:
                        answer = await self._take(payload)
                    self._sender(answer.sender).note(answer.code, time.time())
                    if self.awake is not None:
                        self.awake.note()
                    writer.write(frame(answer.ack))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except Exception:
            log.exception("MLLP connection from %s failed", peer)
        finally:
            self.connections -= 1
            writer.close()

    def _refuse_oversized(self, head: bytes, size: int) -> Answer:
        """Keep the beginning as a dead letter, answer AR: nothing of it is applied."""
        problem = MessageError(f"the message is {size} bytes, over the {self.max_bytes}-byte limit", code=207, location="MSH")
        control_id = control_id_of(head) or "oversized"
        try:
            kept, _new = self.store.write(lambda tx: tx.receive_message(CHANNEL, "?", f"oversized:{control_id}:{size}", head))
            self.store.write(lambda tx: tx.settle_message(kept.id, "rejected", problem.text + " (the first 64 KiB are kept)"))
            message_id: int | None = kept.id
        except Exception:
            message_id = None
        return Answer(acknowledgement(None, "AR", problem.text, error=problem, control_id=control_id).encode(), "AR", message_id)


def send_messages(host: str, port: int, messages: Iterable[bytes], *, rate: float = 0.0, timeout: float = 30.0) -> Counter[str]:
    """Send messages one at a time on one connection, each after the previous one's ACK; count the MSA codes."""
    codes: Counter[str] = Counter()
    interval = 1.0 / rate if rate > 0 else 0.0
    with socket.create_connection((host, port), timeout=timeout) as conn:
        pending = b""
        next_at = time.monotonic()
        for message in messages:
            if interval:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
            conn.sendall(frame(message))
            while END not in pending:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError("the listener closed the connection")
                pending += chunk
            ack, _, pending = pending.partition(END)
            codes[ack_code(ack)] += 1
    return codes


def ack_code(ack: bytes) -> str:
    """The MSA-1 of an acknowledgement (framing bytes allowed)."""
    for segment in ack.strip(START + END).split(b"\r"):
        if segment.startswith(b"MSA"):
            return segment.split(segment[3:4])[1].decode("ascii", "replace")
    return "?"
