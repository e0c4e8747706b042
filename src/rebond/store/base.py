"""The store's one interface: versioned FHIR resources, search, history and the change feed.

Callers (the REST API, the importer, the HL7 interface, the site follower) only
see this module; which engine runs behind it is decided by the database URL.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

if TYPE_CHECKING:
    from rebond.fhir.search import SearchQuery
    from rebond.store.draft import Draft


T = TypeVar("T")


class StoreError(Exception):
    """A failure the caller can act on; `status` is the HTTP status it maps to."""

    status = 500
    code = "exception"


class NotFound(StoreError):
    status = 404
    code = "not-found"


class Gone(StoreError):
    status = 410
    code = "deleted"


class PreconditionFailed(StoreError):
    """If-Match named a version that is no longer the current one."""

    status = 412
    code = "conflict"


class MultipleMatches(StoreError):
    """A conditional operation whose criteria matched more than one resource."""

    status = 412
    code = "multiple-matches"


class Unavailable(StoreError):
    """The database cannot be reached; the caller may retry."""

    status = 503
    code = "transient"


@dataclass(frozen=True)
class Stored:
    """One version of a resource as the store holds it."""

    resource_type: str
    id: str
    version: int
    last_updated: float  # epoch seconds
    deleted: bool
    body: bytes | None  # JSON, meta.versionId and meta.lastUpdated included; None for a deletion
    seq: int = 0
    method: str = ""
    site_id: str = ""

    def __init__(self, resource_type: str, id: str, version: int, last_updated: float, deleted: bool,
                 body: bytes | None, seq: int = 0, method: str = "", site_id: str = "") -> None:
        """Frozen all the same: the fields go into the instance's dict as object.__setattr__ would put them, without
        its call for each (three times faster; made for every version read or written, see store/draft.py
        NATIVE_INIT)."""
        fields = self.__dict__
        fields["resource_type"] = resource_type
        fields["id"] = id
        fields["version"] = version
        fields["last_updated"] = last_updated
        fields["deleted"] = deleted
        fields["body"] = body
        fields["seq"] = seq
        fields["method"] = method
        fields["site_id"] = site_id


@dataclass(frozen=True)
class WriteResult:
    stored: Stored
    created: bool  # a new resource (201) rather than a new version of an existing one
    unchanged: bool = False  # a conditional create that found its match, or a delete of nothing

    def __init__(self, stored: Stored, created: bool, unchanged: bool = False) -> None:  # frozen all the same (Stored)
        fields = self.__dict__
        fields["stored"] = stored
        fields["created"] = created
        fields["unchanged"] = unchanged


@dataclass
class SearchResult:
    matches: list[Stored]
    included: list[Stored] = field(default_factory=list)
    total: int | None = None


@dataclass(frozen=True)
class InboxMessage:
    """A message another system sent (an HL7 v2 message), as received, and what became of it."""

    id: int
    channel: str
    sender: str
    control_id: str
    received: float
    raw: bytes
    status: str  # received (stored, not yet applied), applied, rejected (a dead letter)
    detail: str  # what was applied, or why it was rejected
    updated: float
    digest: str = ""  # SHA-256 of `raw` (hex); what is left of an applied message once its content is cleared

    def __init__(self, id: int, channel: str, sender: str, control_id: str, received: float, raw: bytes, status: str,
                 detail: str, updated: float, digest: str = "") -> None:  # frozen all the same (see Stored)
        fields = self.__dict__
        fields["id"] = id
        fields["channel"] = channel
        fields["sender"] = sender
        fields["control_id"] = control_id
        fields["received"] = received
        fields["raw"] = raw
        fields["status"] = status
        fields["detail"] = detail
        fields["updated"] = updated
        fields["digest"] = digest

    @property
    def cleared(self) -> bool:
        """Its content was cleared (`rebond hl7 prune`): only its digest is kept, enough to recognise a re-send."""
        return not self.raw and bool(self.digest)

    def holds(self, raw: bytes) -> bool:
        """Whether `raw` is this message's content (read from its digest once the content is cleared)."""
        return message_digest(raw) == self.digest if self.cleared else raw == self.raw


class Access(NamedTuple):
    """One access to the data, for the audit trail (security/audit.py): who, from where, what, the outcome, whose data.

    A tuple (thousands are made a second under load), its fields in the order of the trail's columns."""

    id: str
    recorded: float
    node: str  # the node that answered (central, or a site node's id): a site's lines are sent on to the central site
    agent: str  # the account's name
    role: str
    source: str  # the client's network address (or the machine's user, on the command line)
    channel: str  # fhir, web, cli
    action: str  # C, R, U, D or E (execute), as FHIR AuditEvent.action
    what: str  # the interaction: read, search-type, create, chart, census, …
    entity: str  # the request: method, path and query
    outcome: int  # the HTTP status answered
    patient_count: int  # the patients whose data it touched (all of them; `patients` lists at most AUDIT_PATIENTS)
    patients: tuple[str, ...]  # their Patient ids


def message_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class JournalEntry:
    """A write a site node made on its own, to be replayed on the central site in this order."""

    seq: int
    resource_type: str
    resource_id: str
    method: str  # create, update, delete
    base_version: int  # the version it was made on (0 for a create): the If-Match of the replay
    local_version: int
    body: bytes | None
    written: float
    status: str  # pending, replayed, conflict, resolved
    detail: str
    updated: float


@dataclass(frozen=True)
class Change:
    """An entry of the change feed: one committed version, in commit order."""

    seq: int
    stored: Stored


@dataclass(frozen=True)
class ChangePage:
    changes: list[Change]
    next_cursor: str


#: a check of each resource before it is written: (type, new content or None for a deletion, current JSON or None)
Guard = Callable[[str, dict[str, Any] | None, bytes | None], None]


class Session(abc.ABC):
    """One write transaction: everything done through it commits together, or not at all."""

    #: the site a write came from when it is not this node (a site's journal replayed here); None: this node
    origin: str | None = None
    #: who writes may not write everything: called with each resource before it is written (type, the new content or
    #: None for a deletion, the current version's JSON or None); raises to refuse, and the transaction writes nothing
    guard: Guard | None = None

    @abc.abstractmethod
    def create(self, resource: dict[str, Any], *, resource_id: str | None = None) -> WriteResult:
        """Store a new resource; `resource_id` None asks for a server-assigned UUID."""

    @abc.abstractmethod
    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any], *, if_match: int | None = None) -> WriteResult:
        """A new version (or the first one: update as create). `if_match` is checked atomically."""

    @abc.abstractmethod
    def delete(self, resource_type: str, resource_id: str, *, if_match: int | None = None) -> WriteResult | None:
        """A deletion version; None when there was nothing to delete."""

    @abc.abstractmethod
    def read(self, resource_type: str, resource_id: str) -> Stored | None:
        """The current version as seen inside this transaction (locked against concurrent writers)."""

    @abc.abstractmethod
    def search_ids(self, query: SearchQuery, limit: int = 2) -> list[str]:
        """Ids matching a search, inside this transaction: two tell a conditional operation all it needs."""

    @abc.abstractmethod
    def ids_where(self, where: str, params: list[Any], limit: int) -> list[str]:
        """Ids of the live resources that a condition over `resources r` selects (store/query.py where_fragment:
        what `search_ids` runs), inside this transaction: a draft's search, run again as it ran."""

    @abc.abstractmethod
    def lock(self, key: str) -> None:
        """Serialise with every other transaction that locks the same key (conditional create)."""

    @abc.abstractmethod
    def replicate(self, copy: Stored) -> bool:
        """Make a version read from the upstream's change feed the current one here, exactly as it is there
        (version number, time, body, site). False when this store already has it or a later one."""

    @abc.abstractmethod
    def settle_journal(self, seq: int, status: str, detail: str) -> None:
        """Record what became of a journaled write (replayed, conflict, resolved)."""

    @abc.abstractmethod
    def receive_message(self, channel: str, sender: str, control_id: str, raw: bytes, *, status: str = "received",
                        detail: str = "") -> tuple[InboxMessage, bool]:
        """Keep a message as received; (the message, True) when new, (the one kept earlier, False) for a re-send.

        `status`, `detail`: what a new one is kept as, when the caller already knows what its transaction will make of
        it (a drafted message: "applied", with what its draft writes)."""

    @abc.abstractmethod
    def settle_message(self, message_id: int, status: str, detail: str, raw: bytes | None = None) -> None:
        """Record what became of a message (and, for a corrected one, its new content), with the writes it caused."""

    @abc.abstractmethod
    def clear_message(self, message_id: int, digest: str) -> bool:
        """Clear the content of an applied message, keeping its digest; False if it is not applied, or cleared already."""

    @abc.abstractmethod
    def put_state(self, namespace: str, key: str, value: Any) -> None:
        """Set (or with None, remove) a value of this node's own state: JSON-serialisable, outside the change feed."""

    @abc.abstractmethod
    def claim_state(self, namespace: str, key: str, value: Any) -> bool:
        """Set a value of this node's own state unless the key has one: True if it was free (a nonce used once)."""

    @abc.abstractmethod
    def lease(self, namespace: str, key: str, owner: str, seconds: float) -> bool:
        """Hold the lease `key` for `seconds` more if it is free, lapsed, or `owner`'s already: True if `owner` holds it
        now. One of several processes over one store (server processes, central servers) does a job, another takes
        it over when the holder stops renewing."""

    @abc.abstractmethod
    def record_accesses(self, accesses: Sequence[Access]) -> int:
        """Add to the audit trail (outside the change feed); an access already there is kept once. Returns how many were new."""

    @abc.abstractmethod
    def prune_accesses(self, before: float) -> int:
        """Remove the accesses recorded before `before`; returns how many."""

    def apply_draft(self, draft: Draft) -> bool:
        """Write what a draft (store/draft.py) planned, if all it read is unchanged; False when the work must run here."""
        return False

    def read_ahead(self, keys: list[tuple[str, str]]) -> None:
        """These resources are about to be read: a session that can, reads them in one go (a draft); others read
        each when asked."""
        return None


class Store(abc.ABC):
    """A versioned FHIR resource store with search and a change feed."""

    site_id: str
    #: the schema the store was of when this opened it (store/upgrade.py), before any upgrade; None: made by this opening
    schema_found: int | None = None
    #: reads by id answer from local disk in microseconds, never waiting on a network (embedded engines)
    local_reads: bool = False
    #: set on a site node: every clinical write is also journaled, in its transaction, for replay on the central site
    journal_writes: bool = False
    #: called (outside the transaction, after its commit) with the journal entries a write made: a connected site node
    #: waits there until the central site has them, so that its writes go to the central site before they are answered
    after_journal: Callable[[list[int]], None] | None = None

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Session]:
        """A write transaction, committed durably when the block ends without error."""

    @abc.abstractmethod
    def read(self, resource_type: str, resource_id: str) -> Stored | None: ...

    def read_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Stored | None]:
        """`read` of several resources, by (type, id)."""
        return {key: self.read(*key) for key in keys}

    @abc.abstractmethod
    def vread(self, resource_type: str, resource_id: str, version: int) -> Stored | None: ...

    @abc.abstractmethod
    def history(
        self,
        resource_type: str | None = None,
        resource_id: str | None = None,
        *,
        since: float | None = None,
        count: int = 50,
        offset: int = 0,
    ) -> tuple[list[Stored], int]:
        """Versions newest first, and how many there are in all."""

    @abc.abstractmethod
    def search(self, query: SearchQuery) -> SearchResult: ...

    @abc.abstractmethod
    def search_ids(self, query: SearchQuery, limit: int = 2) -> list[str]:
        """Ids matching a search, as last committed (outside any transaction)."""

    @abc.abstractmethod
    def ids_where(self, where: str, params: list[Any], limit: int) -> list[str]:
        """`Session.ids_where` as last committed: a draft's search, kept as the SQL it ran."""

    @abc.abstractmethod
    def changes(self, after: str | None, count: int = 100) -> ChangePage:
        """Committed versions after `after` (an opaque cursor; None from the start), in commit order."""

    @abc.abstractmethod
    def journal(self, status: str | None = None, *, limit: int = 100, after: int = 0) -> list[JournalEntry]:
        """Journaled writes (of one status), oldest first."""

    @abc.abstractmethod
    def journal_count(self, status: str) -> int: ...

    @abc.abstractmethod
    def message(self, message_id: int) -> InboxMessage | None: ...

    @abc.abstractmethod
    def message_count(self, channel: str, status: str) -> int:
        """How many messages of a channel are in this state (meant for the few: waiting, refused)."""

    @abc.abstractmethod
    def messages(self, channel: str, status: str | None = None, *, limit: int = 100, after_id: int = 0) -> list[InboxMessage]:
        """Messages of a channel (of one status), oldest first."""

    @abc.abstractmethod
    def accesses(self, *, patient: str | None = None, agent: str | None = None, since: float | None = None,
                 until: float | None = None, limit: int = 100) -> list[Access]:
        """The audit trail, newest first: of one patient's data, of one account, between two instants."""

    @abc.abstractmethod
    def accesses_after(self, after: str, *, node: str, limit: int = 500) -> list[Access]:
        """The accesses made at `node` whose id follows `after`, oldest first (a site node sends its own on, in order)."""

    @abc.abstractmethod
    def get_state(self, namespace: str, key: str) -> Any:
        """A value of this node's own state (accounts, sessions, cursors), or None."""

    @abc.abstractmethod
    def list_state(self, namespace: str) -> list[tuple[str, Any]]:
        """Every (key, value) of a namespace of this node's state, by key."""

    def put_state(self, namespace: str, key: str, value: Any) -> None:
        self.write(lambda tx: tx.put_state(namespace, key, value))

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Live resources per type."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise Unavailable when the database cannot be reached."""

    @abc.abstractmethod
    def optimize(self) -> None:
        """Refresh the query planner's statistics (after a bulk load; engines also do it as data grows)."""

    def for_small_commits(self) -> None:
        """This store's writes will be many small commits (an interface's intake writer): tune the writer for them."""
        return None

    def checkpoint_elsewhere(self) -> None:
        """Another process copies this store's log into its file (the server, for its intake writer): not this one."""
        return None

    def committed_elsewhere(self) -> None:
        """Another process has committed to this store (the intake writer): copy its log into the file soon."""
        return None

    def for_reads_between_commits(self) -> None:
        """This thread will read between the frequent commits of another connection (an interface's drafts, while its
        intake writer commits every few milliseconds): tune this thread's reads for it."""
        return None

    def snapshot(self) -> contextlib.AbstractContextManager[None]:
        """This thread's reads meanwhile see one state of the store (a draft's): where the engine can, in one read
        transaction."""
        return contextlib.nullcontext()

    def commit_mark(self) -> int | None:
        """Inside `snapshot`: a mark of the committed state it reads, by which this store's writer can tell what was
        committed after it (SQLite: the highest seq); None when the engine cannot (store/draft.py)."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...

    def local_file(self) -> str | None:
        """The file this store keeps on this machine (the disk watch looks at its disk); None for a database server's."""
        return None

    def writes_refused(self) -> bool:
        """No write can be taken now, as last seen (a failover of the database under way): pages say so."""
        return False

    @abc.abstractmethod
    def database(self) -> dict[str, Any]:
        """What keeps the data, for `/status`: `engine`, where (`file` or `server`), and for a database server its
        `role`, the `standbys` that stream from it, whether a commit waits for one (`synchronous`), and a `problem`."""

    # Conveniences built on the transaction, shared by every engine.

    def write(self, work: Callable[[Session], T]) -> T:
        """Run `work` in a write transaction and return its result once durably committed.

        Engines may commit several concurrent callers' work together (group commit);
        each caller's work still succeeds or fails on its own.
        """
        with self.transaction() as tx:
            result = work(tx)
        journaled: list[int] = getattr(tx, "journaled", [])
        if journaled and self.after_journal is not None:
            self.after_journal(journaled)
        return result

    def write_many(self, works: Sequence[Callable[[Session], T]], *, rerunnable: bool = False) -> list[T | BaseException]:
        """Run several works, each succeeding or failing on its own: per work, its result or the exception it raised.

        Engines with group commit commit them together (one fsync); here, one after the other.
        `rerunnable`: each work may be run again from its start, if the engine finds that cheaper.
        """
        outcomes: list[T | BaseException] = []
        for work in works:
            try:
                outcomes.append(self.write(work))
            except Exception as err:
                outcomes.append(err)
        return outcomes

    def create(self, resource: dict[str, Any], *, resource_id: str | None = None) -> WriteResult:
        return self.write(lambda tx: tx.create(resource, resource_id=resource_id))

    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any], *, if_match: int | None = None) -> WriteResult:
        return self.write(lambda tx: tx.update(resource_type, resource_id, resource, if_match=if_match))

    def delete(self, resource_type: str, resource_id: str, *, if_match: int | None = None) -> WriteResult | None:
        return self.write(lambda tx: tx.delete(resource_type, resource_id, if_match=if_match))
