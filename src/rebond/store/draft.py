"""Writes worked out before the write lock, applied under it only if nothing they read has changed.

An interface message (an HL7 v2 result, an admission) turns into a handful of FHIR writes after
a few reads: find the patient by IPP, the stay by visit number, the order, the current version
of each resource it touches. Mapping, validating and indexing those writes costs several times
what inserting them does. A `Draft` is a session that runs all of it against the last committed
state, outside the write lock, in as many threads or processes as there are cores, and records
what it read and what it would write:

    draft = Draft(store); work(draft)              # reads recorded: (type, id) → version, search → ids
    store.write(lambda tx: tx.apply_draft(draft))  # under the lock: every read checked, then the inserts

Under the lock, each resource read must still be at the version seen, and each search must still
find the same ids (a search is kept as the SQL it ran, and run again as it is); then the outcome
of the work is the one it would have had under the lock, and its writes go in as prepared.
Otherwise `apply_draft` returns False and the caller runs the work again inside the transaction,
as if there had been no draft (two results for the same patient at the same instant, say). What a
draft cannot do outside the lock (a delete, a search over a type it has itself written, a named
lock) raises `NeedsTransaction`, which means the same.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from rebond.fhir.search import SearchQuery
from rebond.pickled import by_fields
from rebond.store.base import Access, InboxMessage, PreconditionFailed, Session, Store, Stored, StoreError, WriteResult
from rebond.store.indexing import IndexRows, index_resource
from rebond.store.query import where_fragment


class NeedsTransaction(StoreError):
    """The work needs the write lock (it is run again inside the transaction)."""


# NATIVE_INIT: the dataclasses made for every message on the intake's path write their own `__init__`, which mypyc
# compiles; the one `@dataclass` would write is Python, run for each object made (with the frozen ones', through
# object.__setattr__ for each field, 13 % of a lab panel's draft: 0.42 M instructions of 3.25, callgrind). The
# `__repr__` and `__eq__` it writes stay. tests/test_build.py checks that each takes its fields, in order, with their
# defaults.


@dataclass
class PlannedWrite:
    resource_type: str
    resource_id: str
    resource: dict[str, Any]
    base_version: int  # the version it replaces; 0: none (or a deleted one)
    rows: IndexRows

    def __init__(self, resource_type: str, resource_id: str, resource: dict[str, Any], base_version: int,
                 rows: IndexRows) -> None:  # compiled (see NATIVE_INIT)
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.resource = resource
        self.base_version = base_version
        self.rows = rows

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)  # compiled with its `__init__`, it is made again through it

    def sent(self) -> SentWrite:
        """As another process receives it: the resource already serialised, as its store keeps it."""
        meta = self.resource.get("meta")
        rest = {k: v for k, v in self.resource.items() if k not in _STAMPED}
        return SentWrite(self.resource_type, self.resource_id, orjson.dumps(rest), meta if isinstance(meta, dict) else None,
                         self.base_version, self.rows)


_STAMPED = ("resourceType", "id", "meta")


@dataclass
class SentWrite:
    """A `PlannedWrite` received from the process that drafted it.

    The drafting process serialised the resource but for what the store stamps first in it (resourceType,
    id, meta): the writer, which runs every message's commit alone, only splices in the new version's meta
    (`stamped`) instead of unpickling a tree of dicts and serialising it again. Never changed once made (not
    frozen only so that its `__init__` is compiled: see NATIVE_INIT).
    """

    resource_type: str
    resource_id: str
    content: bytes  # the resource's JSON object without resourceType, id and meta
    meta: dict[str, Any] | None  # its meta, if it had one, before stamping
    base_version: int
    rows: IndexRows

    def __init__(self, resource_type: str, resource_id: str, content: bytes, meta: dict[str, Any] | None,
                 base_version: int, rows: IndexRows) -> None:  # compiled (see NATIVE_INIT)
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.content = content
        self.meta = meta
        self.base_version = base_version
        self.rows = rows

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)

    def plain(self) -> tuple[Any, ...]:
        """Its fields as values `marshal` carries (`Draft.plain`)."""
        return self.resource_type, self.resource_id, self.content, self.meta, self.base_version, self.rows.plain()

    def stamped(self, version: int, last_updated: str) -> bytes:
        """The stored JSON: the same bytes as serialising {resourceType, id, meta, ...content} (sql._versioned_body)."""
        meta = {**(self.meta or {}), "versionId": str(version), "lastUpdated": last_updated}
        head = b'{"resourceType":' + orjson.dumps(self.resource_type) + b',"id":' + orjson.dumps(self.resource_id)
        head += b',"meta":' + orjson.dumps(meta)
        return head + (b"}" if self.content == b"{}" else b"," + self.content[1:])

    @property
    def resource(self) -> dict[str, Any]:
        """The resource as drafted (for a site node's journal; the writer needs only `stamped`)."""
        resource: dict[str, Any] = {"resourceType": self.resource_type, "id": self.resource_id}
        if self.meta is not None:
            resource["meta"] = self.meta
        resource.update(orjson.loads(self.content))
        return resource


def content_of(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource without what the store stamps (id, meta.versionId, meta.lastUpdated): equal content, no new version."""
    out = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    return out


class Draft(Session):
    def __init__(self, store: Store | None) -> None:
        self.store: Store | None = store
        self.seen: dict[tuple[str, str], int] = {}  # version read (0: absent or deleted)
        self.searches: list[tuple[str, list[Any], int, list[str]]] = []  # (WHERE over `resources r`, its values, limit, ids)
        self.writes: dict[tuple[str, str], PlannedWrite | SentWrite] = {}  # SentWrite once sent
        self._read: dict[tuple[str, str], Stored | None] = {}  # what was read, read once: the draft sees one state
        self.mark: int | None = None  # the state read (Store.commit_mark), when the store can say
        self.searched: set[str] = set()  # the resource types searched

    def plain(self) -> tuple[Any, ...]:
        """What another process needs to apply it (`sent_draft` there), as values `marshal` carries: the versions
        read, the searches made (their SQL), the writes (index rows included, as tuples and lists); not the store it
        read from. Marshal takes a lab panel's draft in a fraction of what pickling its objects took."""
        writes = [(w if isinstance(w, SentWrite) else w.sent()).plain() for w in self.writes.values()]
        return self.seen, self.searches, writes, self.mark, self.searched

    def _source(self) -> Store:
        if self.store is None:
            raise NeedsTransaction("a draft sent from another process reads nothing more")
        return self.store

    # -- reads, recorded

    def read(self, resource_type: str, resource_id: str) -> Stored | None:
        planned = self.writes.get((resource_type, resource_id))
        if planned is not None:
            body = orjson.dumps({**planned.resource, "id": resource_id})
            return Stored(resource_type, resource_id, planned.base_version + 1, 0.0, False, body)
        key = (resource_type, resource_id)
        if key in self._read:
            return self._read[key]
        stored = self._source().read(resource_type, resource_id)
        self._saw(key, stored)
        return stored

    def read_ahead(self, keys: list[tuple[str, str]]) -> None:
        wanted = [key for key in dict.fromkeys(keys) if key not in self._read and key not in self.writes]
        if wanted:
            for key, stored in self._source().read_many(wanted).items():
                self._saw(key, stored)

    def _saw(self, key: tuple[str, str], stored: Stored | None) -> None:
        """Keep what was read: read again, it answers the same; the first version seen is the one checked under the lock."""
        self._read[key] = stored
        self.seen.setdefault(key, 0 if stored is None or stored.deleted else stored.version)

    def search_ids(self, query: SearchQuery, limit: int = 2) -> list[str]:
        if any(t == query.resource_type for t, _i in self.writes):
            raise NeedsTransaction(f"a search over {query.resource_type} after writing one")
        where = where_fragment(query)
        ids = self._source().ids_where(where.sql, where.params, limit)
        self.searches.append((where.sql, where.params, limit, ids))
        types = _types_read(query)
        if types is None:  # over every type: what it finds is checked by running it again
            self.mark = None
        else:
            self.searched |= types
        return ids

    def ids_where(self, where: str, params: list[Any], limit: int) -> list[str]:
        raise NeedsTransaction("a search given as SQL, its resource type unknown")

    # -- writes, planned

    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any], *, if_match: int | None = None) -> WriteResult:
        current = self.read(resource_type, resource_id)
        version = 0 if current is None or current.deleted else current.version
        if if_match is not None and if_match != version:
            raise PreconditionFailed(f"{resource_type}/{resource_id} is at version {version}, not {if_match}")
        if version and current is not None and current.body is not None and content_of(orjson.loads(current.body)) == content_of(resource):
            return WriteResult(current, created=False, unchanged=True)
        earlier = self.writes.get((resource_type, resource_id))
        base = earlier.base_version if earlier is not None else version
        self.writes[(resource_type, resource_id)] = PlannedWrite(resource_type, resource_id, resource, base, index_resource(resource))
        return WriteResult(Stored(resource_type, resource_id, base + 1, 0.0, False, None), created=base == 0)

    def create(self, resource: dict[str, Any], *, resource_id: str | None = None) -> WriteResult:
        if resource_id is None:
            raise NeedsTransaction("a create with a server-assigned id")
        if self.read(resource["resourceType"], resource_id) is not None:
            raise NeedsTransaction("a create of an id that exists")
        return self.update(resource["resourceType"], resource_id, resource)

    def delete(self, resource_type: str, resource_id: str, *, if_match: int | None = None) -> WriteResult | None:
        raise NeedsTransaction("a delete")

    def lock(self, key: str) -> None:
        raise NeedsTransaction("a named lock")

    def replicate(self, copy: Stored) -> bool:
        raise NeedsTransaction("a replicated version")

    def settle_journal(self, seq: int, status: str, detail: str) -> None:
        raise NeedsTransaction("a journal entry")

    def receive_message(self, channel: str, sender: str, control_id: str, raw: bytes, *, status: str = "received",
                        detail: str = "") -> tuple[InboxMessage, bool]:
        raise NeedsTransaction("keeping a message")

    def settle_message(self, message_id: int, status: str, detail: str, raw: bytes | None = None) -> None:
        raise NeedsTransaction("settling a message")

    def clear_message(self, message_id: int, digest: str) -> bool:
        raise NeedsTransaction("clearing a message")

    def put_state(self, namespace: str, key: str, value: Any) -> None:
        raise NeedsTransaction("node state")

    def claim_state(self, namespace: str, key: str, value: Any) -> bool:
        raise NeedsTransaction("node state")

    def lease(self, namespace: str, key: str, owner: str, seconds: float) -> bool:
        raise NeedsTransaction("node state")

    def record_accesses(self, accesses: Sequence[Access]) -> int:
        raise NeedsTransaction("the audit trail")

    def prune_accesses(self, before: float) -> int:
        raise NeedsTransaction("the audit trail")


def _types_read(query: SearchQuery) -> set[str] | None:
    """The resource types whose rows a search reads: its own and those its chains and `_has` go through (None: all)."""
    if query.resource_type is None:
        return None
    types = {query.resource_type}
    clauses = list(query.clauses)
    while clauses:
        clause = clauses.pop()
        if clause.chain is not None:
            types.add(clause.chain[0])
            clauses.append(clause.chain[1])
        if clause.has is not None:
            types.add(clause.has[0])
            clauses.append(clause.has[2])
    return types


def sent_draft(plain: tuple[Any, ...]) -> Draft:
    """A draft made in another process, from its `Draft.plain` (taken from this server's own processes only)."""
    seen, searches, writes, mark, searched = plain
    draft = Draft(None)
    draft.seen = seen
    draft.searches = searches
    draft.mark = mark
    draft.searched = searched
    for resource_type, resource_id, content, meta, base_version, rows in writes:
        draft.writes[(resource_type, resource_id)] = SentWrite(resource_type, resource_id, content, meta, base_version,
                                                               IndexRows.from_plain(rows))
    return draft
