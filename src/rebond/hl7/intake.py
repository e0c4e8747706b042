"""Taking in one HL7 v2 message: kept raw and committed first, applied once, then acknowledged.

    bytes → decode (MSH-18) → header → FHIR writes worked out on the last committed state (a draft, no lock)
          → under the write lock: inbox + the draft's writes if what it read is unchanged (else worked out
            again there) + "applied", one commit → AA
                                     ↘ a re-send of an applied message: AA again, nothing applied twice
    a message that cannot be processed: kept as a dead letter with the reason → AR with ERR
    the store unavailable: the message stays "received" → AE, the sender retries (and start-up retries too)
"""
from __future__ import annotations

import hashlib
import logging
import marshal
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from rebond.hl7.mapping import Applied, apply_message
from rebond.hl7.message import CHARSETS, Header, Message, MessageError, acknowledgement, charset_of, decode
from rebond.pickled import by_fields
from rebond.store.base import InboxMessage, Session, Store, StoreError, Unavailable, message_digest
from rebond.store.draft import Draft, sent_draft

log = logging.getLogger("rebond.hl7")
CHANNEL = "hl7v2"
#: a message over this size is refused (AR) and kept truncated as a dead letter; a lab result is a few kilobytes
MAX_MESSAGE_BYTES = 1024 * 1024
KEPT_OF_OVERSIZED = 64 * 1024


@dataclass(unsafe_hash=True)
class Answer:
    """The acknowledgement to send back, as bytes in the message's character set. Never changed once made (not frozen
    only so that its `__init__` is compiled: store/draft.py NATIVE_INIT)."""

    ack: bytes
    code: str  # AA, AE, AR (or CA, CE, CR)
    message_id: int | None
    redone: bool = False  # its draft was stale (what it read had changed): worked out again under the lock
    sender: str = "?"  # MSH-3|MSH-4 of the message ("?": not readable)

    def __init__(self, ack: bytes, code: str, message_id: int | None, redone: bool = False, sender: str = "?") -> None:
        self.ack = ack
        self.code = code
        self.message_id = message_id
        self.redone = redone
        self.sender = sender

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)  # from the intake writer to the server


def _codes(header: Header | None) -> tuple[str, str, str]:
    enhanced = header is not None and bool(header.accept_ack)
    return ("CA", "CE", "CR") if enhanced else ("AA", "AE", "AR")


def _answer(header: Header | None, code: str, text: str, message_id: int | None, *, error: MessageError | None = None,
            control_id: str = "") -> Answer:
    codec = CHARSETS.get((header.charset if header else "").upper(), "utf-8")
    body = acknowledgement(header, code, text, error=error, control_id=control_id)
    return Answer(body.encode(codec, "replace"), code, message_id, sender=header.sender if header else "?")


def control_id_of(raw: bytes) -> str:
    """MSH-10 read from the bytes, for answering a message that cannot be decoded."""
    first = raw.split(b"\r", 1)[0]
    if first.startswith(b"MSH") and len(first) > 3:
        fields = first.split(first[3:4])
        if len(fields) > 9:
            return fields[9].decode("ascii", "replace")
    return ""


@dataclass
class Prepared:
    """A message's writes worked out before the write lock, possibly in another process (hl7/workers.py)."""

    draft: Draft
    applied: Applied
    header: Header  # the message's, read where the draft was made

    def __init__(self, draft: Draft, applied: Applied, header: Header) -> None:  # compiled (store/draft.py NATIVE_INIT)
        self.draft = draft
        self.applied = applied
        self.header = header

    def packed(self) -> bytes:
        """As it goes to the intake writer (`unpack` there): plain values through `marshal`, which the two processes,
        one interpreter, read alike."""
        return marshal.dumps((_PACKED_FORM, self.draft.plain(), self.applied.written, self.applied.notes,
                              by_fields(self.header)[1]))


_PACKED_FORM = 3  # 3: the state it read and the types it searched; 2: a draft's searches as their SQL (1: pickled queries)


def unpack(blob: bytes | None) -> Prepared | None:
    """A draft packed by this server's drafting process; None, for the writer to work the message out itself, if
    there is none or it is not one this version reads."""
    if blob is None:
        return None
    try:
        form, draft, written, notes, header = marshal.loads(blob)
        if form != _PACKED_FORM:
            return None
        return Prepared(sent_draft(draft), Applied(written, notes), Header(*header))
    except Exception:  # a draft is an optimisation: without it the writer works the message out under the lock
        log.warning("a packed draft could not be read: the message is worked out by the writer", exc_info=True)
        return None


def prepare(store: Store, raw: bytes) -> Prepared | None:
    """Decode a message and draft its writes on the last committed state; None when it must be done under the lock."""
    try:
        message = Message(decode(raw)[0])
        header = message.header()
    except MessageError:
        return None
    return _draft(store, message, header)


def receive(store: Store, raw: bytes, prepared: Prepared | None = None) -> Answer:
    """Take in one message (the MLLP payload) and say how to acknowledge it.

    The raw message is the first row its transaction writes; its FHIR writes and its "applied"
    mark commit with it, in one commit. A message that cannot be applied is kept alone, as a
    dead letter. Nothing is acknowledged before its commit. `prepared`: its writes already
    worked out (`prepare`); without it they are worked out here first, before the write lock.
    """
    intake = _Intake(store, raw, prepared, draft_here=True)
    return intake.finish(store.write_many([intake.keep_and_apply])[0])


def receive_many(store: Store, messages: list[tuple[bytes, Prepared | None]]) -> list[Answer]:
    """`receive` for several messages at once, as the intake writer takes them: their writes share commits, each its
    own answer. A message without a draft (its worker could not make one) is worked out under the lock: drafting it
    here would fail the same way."""
    intakes = [_Intake(store, raw, prepared, draft_here=False) for raw, prepared in messages]
    # keep_and_apply keeps nothing outside the transaction: it can be run again if another message of the batch fails
    outcomes = store.write_many([intake.keep_and_apply for intake in intakes], rerunnable=True)
    return [intake.finish(outcome) for intake, outcome in zip(intakes, outcomes, strict=True)]


class _Intake:
    """One message on its way in: what to write under the lock (`keep_and_apply`), then the answer (`finish`)."""

    def __init__(self, store: Store, raw: bytes, prepared: Prepared | None, *, draft_here: bool) -> None:
        self.store = store
        self.raw = raw
        # a drafted message was read where its draft was made: it is parsed here again only if the draft is not used
        self.header: Header | None = prepared.header if prepared is not None else None
        self._message: Message | None = None
        self.problem: MessageError | None = None
        if self.header is None:
            try:
                self._message = Message(decode(raw)[0])
                self.header = self._message.header()
            except MessageError as err:
                self.problem = err
        self.sender = self.header.sender if self.header else "?"
        self.control_id = self.header.control_id if self.header else (control_id_of(raw) or "sha256:" + hashlib.sha256(raw).hexdigest())
        if prepared is None and draft_here and self._message is not None and self.header is not None and self.problem is None:
            prepared = _draft(store, self._message, self.header)
        self.prepared = prepared
        self.redone = False

    @property
    def message(self) -> Message | None:
        """The parsed message; None for one that cannot be read (`problem` says why)."""
        if self._message is None and self.header is not None:
            self._message = Message(decode(self.raw)[0])
        return self._message

    def keep(self, tx: Session) -> tuple[InboxMessage, bool]:
        return tx.receive_message(CHANNEL, self.sender, self.control_id, self.raw)

    def keep_and_apply(self, tx: Session) -> tuple[InboxMessage, bool]:
        if self.header is None or self.problem is not None:
            return self.keep(tx)
        prepared = self.prepared
        if prepared is None:
            kept, new = self.keep(tx)
        else:
            # kept as applied, with what its draft writes, in the transaction that writes it: one row instead of a row
            # and its update. If the draft's writes fail, the row goes with them (the batch or its savepoint rolled back)
            # and `finish` keeps the message alone, as received
            kept, new = tx.receive_message(CHANNEL, self.sender, self.control_id, self.raw, status="applied",
                                           detail=prepared.applied.summary())
        if new:
            # the draft's writes, or (what it read has changed since, or there is none) worked out again under the lock
            drafted = prepared is not None and tx.apply_draft(prepared.draft)
            self.redone = prepared is not None and not drafted
            if not drafted:
                message = self.message
                assert message is not None  # it has a header
                tx.settle_message(kept.id, "applied", apply_message(tx, message).summary())
        return kept, new

    def _unavailable(self, err: StoreError) -> Answer:
        log.warning("message not kept, the store is unavailable: %s", err)
        _accept, error, _reject = _codes(self.header)
        return _answer(self.header, error, f"the message could not be taken now ({err}); send it again", None,
                       control_id=self.control_id)

    def finish(self, outcome: tuple[InboxMessage, bool] | BaseException) -> Answer:
        """The answer, once `keep_and_apply` has committed or failed (a failure: the message is kept alone)."""
        header = self.header
        accept, _error, reject = _codes(header)
        if isinstance(outcome, StoreError):
            return self._unavailable(outcome)
        if isinstance(outcome, BaseException):  # its writes were refused: the message is kept alone, as a dead letter
            if isinstance(outcome, MessageError):
                self.problem = outcome
            else:
                log.error("message %s from %s: unexpected failure", self.control_id, self.sender, exc_info=outcome)
                self.problem = MessageError("internal error while applying the message", code=207)
            try:
                outcome = self.store.write(self.keep)
            except StoreError as err:
                return self._unavailable(err)
        kept, new = outcome
        if not new and not kept.holds(self.raw):
            # same sender and control id, other content: refused rather than silently ignored
            conflict = MessageError(f"MSH-10 '{self.control_id}' was already used by another message from {self.sender}",
                                    code=207, location="MSH-10")
            return _answer(header, reject, conflict.text, kept.id, error=conflict)
        if not new and kept.status == "applied":
            return _answer(header, accept, "already received and applied", kept.id)
        if not new and kept.status == "rejected":
            return _answer(header, reject, kept.detail, kept.id, error=MessageError(kept.detail))
        if self.problem is not None:
            return _reject(self.store, kept, header, self.problem)
        if not new and self.message is not None:  # kept earlier but not applied (a replay in progress, a crash in between)
            return _apply(self.store, kept, self.message, header)
        return replace(_answer(header, accept, "", kept.id), redone=self.redone)


def _draft(store: Store, message: Message, header: Header) -> Prepared | None:
    """The message's writes worked out before taking the write lock (store/draft.py), or None: then under the lock.

    Any failure here (an invalid message, a store that does not answer, a message whose writes
    need the lock) only means the work is done again in the transaction, which decides.
    """
    draft = Draft(store)
    try:
        with store.snapshot():
            draft.mark = store.commit_mark()
            return Prepared(draft, apply_message(draft, message), header)
    except Exception:
        return None


def _reject(store: Store, kept: InboxMessage, header: Header | None, problem: MessageError) -> Answer:
    _accept, error, reject = _codes(header)
    try:
        store.write(lambda tx: tx.settle_message(kept.id, "rejected", problem.text))
    except StoreError:
        return _answer(header, error, "the store is unavailable; send it again", kept.id, control_id=kept.control_id)
    # the reason is kept with the message and sent back; it may name a patient's identifier: the log says where only
    log.info("message %s rejected: HL7 error %s at %s (the reason: rebond hl7 dead-letters)", kept.id, problem.code,
             problem.location or "the message")
    return _answer(header, reject, problem.text, kept.id, error=problem, control_id=kept.control_id)


def _apply(store: Store, kept: InboxMessage, message: Message, header: Header | None) -> Answer:
    accept, error, _ = _codes(header)

    def work(tx: Session) -> str:
        applied = apply_message(tx, message)
        summary = applied.summary()
        tx.settle_message(kept.id, "applied", summary)
        return summary

    try:
        store.write(work)
    except MessageError as err:
        return _reject(store, kept, header, err)
    except (Unavailable, StoreError) as err:
        if isinstance(err, Unavailable) or err.status >= 500:
            log.warning("message %s waits: the store is unavailable (%s)", kept.id, err)
            return _answer(header, error, "the store is unavailable; send it again", kept.id)
        return _reject(store, kept, header, MessageError(f"the store refused the result: {err}", code=207))
    except Exception:
        log.exception("message %s: unexpected failure", kept.id)
        return _reject(store, kept, header, MessageError("internal error while applying the message", code=207))
    return _answer(header, accept, "", kept.id)


def recover(store: Store) -> int:
    """Apply every message kept but not yet applied (a crash between keeping and applying); returns how many."""
    count = 0
    after = 0
    while True:
        waiting = store.messages(CHANNEL, "received", limit=200, after_id=after)
        if not waiting:
            return count
        for kept in waiting:
            after = kept.id
            replay(store, kept.id)
            count += 1


def replay(store: Store, message_id: int, corrected: bytes | None = None) -> Answer:
    """Process a kept message again (a dead letter after the cause was fixed), or its corrected content."""
    kept = store.message(message_id)
    if kept is None:
        raise LookupError(f"no message {message_id}")
    if kept.cleared and corrected is None:
        raise LookupError(f"message {message_id} was applied and its content cleared since (rebond hl7 prune): "
                          "only its digest is kept")
    raw = corrected if corrected is not None else kept.raw
    if corrected is not None:
        original = kept.raw
        store.write(lambda tx: (tx.put_state("hl7-original", str(message_id), original.decode("latin-1")),
                                tx.settle_message(message_id, "received", "corrected by hand", raw=corrected)))
    header: Header | None = None
    try:
        charset_of(raw)
        text, _ = decode(raw)
        message = Message(text)
        header = message.header()
    except MessageError as err:
        return _reject(store, kept, header, err)
    return _apply(store, kept, message, header)


def prune(store: Store, before: float, *, page: int = 500) -> tuple[int, int]:
    """Clear the content of the messages applied and received before `before` (epoch seconds), keeping their digests,
    which recognise a re-send as well; returns (messages, bytes) cleared. Dead letters and messages not yet applied
    are kept whole."""
    def clear(old: list[InboxMessage]) -> Callable[[Session], list[InboxMessage]]:
        return lambda tx: [kept for kept in old if tx.clear_message(kept.id, message_digest(kept.raw))]

    count = size = 0
    after = 0
    while batch := store.messages(CHANNEL, "applied", limit=page, after_id=after):
        after = batch[-1].id
        old = [kept for kept in batch if kept.received < before and kept.raw]
        if old:
            cleared = store.write(clear(old))
            count += len(cleared)
            size += sum(len(kept.raw) for kept in cleared)
        if batch[-1].received >= before:  # ids follow arrival: the rest came later
            break
    return count, size


def describe(raw: bytes) -> tuple[str, str]:
    """(message type, control id) read from the bytes, whatever their state."""
    first = raw.split(b"\r", 1)[0]
    if first.startswith(b"MSH") and len(first) > 3:
        fields = first.split(first[3:4])
        kind = fields[8].decode("ascii", "replace").split("^")[:2] if len(fields) > 8 else ["?"]
        return "^".join(kind), control_id_of(raw)
    return "?", ""
