"""Writes worked out outside the write lock (drafts): applied only when what they read is unchanged, on both engines."""
from __future__ import annotations

import marshal
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from rebond.fhir.search import parse_search
from rebond.hl7 import intake
from rebond.hl7.mapping import apply_message
from rebond.hl7.message import Message, decode
from rebond.store import open_store, sqlite
from rebond.store.base import Store, Stored
from rebond.store.draft import Draft, NeedsTransaction, PlannedWrite, SentWrite, sent_draft
from rebond.store.sql import SQLStore
from tests.hl7_messages import adt, oru


def patient(family: str, ipp: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}], "identifier": [{"system": "urn:test", "value": ipp}]}


def code_text(body: bytes) -> str:
    """An Observation's code text, from its stored body."""
    return str(orjson.loads(body)["code"]["text"])


def parsed(raw: bytes) -> Message:
    return Message(decode(raw)[0])


def test_a_draft_writes_what_it_planned_when_nothing_changed(store: Store) -> None:
    known = store.update("Patient", "p1", patient("Martin", "1")).stored
    draft = Draft(store)
    assert draft.search_ids(parse_search("Patient", [("identifier", "urn:test|1")])) == ["p1"]
    draft.update("Patient", "p1", {**patient("Martin", "1"), "gender": "female"})
    draft.update("Observation", "o1", {"resourceType": "Observation", "status": "final", "code": {"text": "K"},
                                       "subject": {"reference": "Patient/p1"}})
    assert store.read("Observation", "o1") is None  # nothing is written before the transaction
    assert store.write(lambda tx: tx.apply_draft(draft)) is True
    now = store.read("Patient", "p1")
    assert now is not None and now.version == known.version + 1
    assert store.search_ids(parse_search("Observation", [("patient", "p1")])) == ["o1"]  # its index rows went in too


def test_what_a_draft_reads_ahead_counts_as_read(store: Store) -> None:
    store.update("Patient", "p2", patient("Martin", "2"))
    store.update("Patient", "p3", patient("Durand", "3"))
    draft = Draft(store)
    draft.read_ahead([("Patient", "p2"), ("Patient", "p3"), ("Patient", "absent"), ("Patient", "p2")])
    assert draft.seen == {("Patient", "p2"): 1, ("Patient", "p3"): 1, ("Patient", "absent"): 0}
    assert draft.read("Patient", "p3") is not None and draft.read("Patient", "absent") is None
    draft.update("Patient", "absent", patient("Petit", "4"))
    store.update("Patient", "p2", patient("Martin", "2b"))  # read ahead, then changed: the draft is stale
    assert store.write(lambda tx: tx.apply_draft(draft)) is False
    assert store.read("Patient", "absent") is None


def test_a_draft_whose_reads_changed_writes_nothing(store: Store) -> None:
    store.update("Patient", "p1", patient("Martin", "1"))
    draft = Draft(store)
    draft.update("Patient", "p1", {**patient("Martin", "1"), "gender": "female"})
    store.update("Patient", "p1", {**patient("Martin", "1"), "gender": "male"})  # someone else, in between
    assert store.write(lambda tx: tx.apply_draft(draft)) is False
    now = store.read("Patient", "p1")
    assert now is not None and now.version == 2 and b'"male"' in (now.body or b"")

    draft = Draft(store)
    assert draft.search_ids(parse_search("Patient", [("identifier", "urn:test|2")])) == []
    draft.update("Observation", "o2", {"resourceType": "Observation", "status": "final", "code": {"text": "K"}})
    carried = sent_draft(marshal.loads(marshal.dumps(draft.plain())))  # as the intake writer receives it
    assert carried.searches == draft.searches
    store.update("Patient", "p2", patient("Petit", "2"))  # the search would now find a patient
    assert store.write(lambda tx: tx.apply_draft(draft)) is False
    assert store.write(lambda tx: tx.apply_draft(carried)) is False
    assert store.read("Observation", "o2") is None


def test_the_resources_a_draft_creates_are_written_together_one_deleted_before_as_its_next_version(store: Store) -> None:
    """A lab panel's new resources go in together (SQLite: two statements for all of them, `insert_many_new`); one
    whose id had been used and deleted (read as absent) is written as that resource's next version instead."""
    def result(code: str) -> dict[str, Any]:
        return {"resourceType": "Observation", "status": "final", "code": {"text": code}, "subject": {"reference": "Patient/p9"}}

    store.update("Observation", "o-gone", result("old"))
    store.delete("Observation", "o-gone")
    draft = Draft(store)
    for oid in ("o-a", "o-gone", "o-b", "o-c"):
        draft.update("Observation", oid, result(oid))
    assert draft.seen[("Observation", "o-gone")] == 0
    assert store.write(lambda tx: tx.apply_draft(draft)) is True
    versions = {oid: store.read("Observation", oid) for oid in ("o-a", "o-gone", "o-b", "o-c")}
    assert {oid: (s.version, s.deleted) for oid, s in versions.items() if s is not None} == {
        "o-a": (1, False), "o-gone": (3, False), "o-b": (1, False), "o-c": (1, False)}
    assert sorted(store.search_ids(parse_search("Observation", [("patient", "p9")]), limit=10)) == ["o-a", "o-b", "o-c", "o-gone"]
    assert all(s is not None and s.body is not None and code_text(s.body) == oid for oid, s in versions.items())
    stamps = [s.last_updated for s in versions.values() if s is not None]
    assert len(set(stamps)) == 4  # each version its own instant


def test_what_a_draft_cannot_do_outside_the_lock(store: Store) -> None:
    draft = Draft(store)
    draft.update("Patient", "p1", patient("Martin", "1"))
    with pytest.raises(NeedsTransaction):
        draft.search_ids(parse_search("Patient", [("identifier", "urn:test|1")]))  # its own write is not indexed yet
    with pytest.raises(NeedsTransaction):
        draft.delete("Patient", "p1")
    assert draft.read("Patient", "p1") is not None  # but it reads back what it planned


def test_two_results_for_a_new_patient_drafted_together_make_one_patient(store: Store) -> None:
    """Both drafts saw no patient with this IPP; the second, applied after the first, must not create another."""
    first, second = parsed(oru("R1", "880001", "F1")), parsed(oru("R2", "880001", "F2"))
    drafts = [(Draft(store), m) for m in (first, second)]
    for draft, message in drafts:
        apply_message(draft, message)
    applied = [store.write(lambda tx, d=d, m=m: tx.apply_draft(d) or (apply_message(tx, m), False)[1]) for d, m in drafts]
    assert applied == [True, False]  # the second was worked out again under the lock
    assert len(store.search_ids(parse_search("Patient", [("identifier", "880001")]), limit=5)) == 1
    assert len(store.search_ids(parse_search("DiagnosticReport", [("patient.identifier", "880001")]), limit=5)) == 2


def _drafted(store: Store, work: Callable[[Draft], Any]) -> Draft:
    """A draft made as the intake makes them: in one snapshot of the store, with the mark of the state it read."""
    draft = Draft(store)
    with store.snapshot():
        draft.mark = store.commit_mark()
        work(draft)
    return draft


def _a_result(draft: Draft) -> None:
    """What a lab result's draft does: finds the patient by IPP, reads it, plans an observation."""
    assert draft.search_ids(parse_search("Patient", [("identifier", "urn:test|1")])) == ["p1"]
    assert draft.read("Patient", "p1") is not None
    draft.update("Observation", "o1", {"resourceType": "Observation", "status": "final", "code": {"text": "K"},
                                       "subject": {"reference": "Patient/p1"}})


@pytest.fixture
def three(engine_url: str) -> Iterator[tuple[SQLStore, Store, Store]]:
    """Three connections to one store: the intake writer's, the drafting server's, another process's (the HTTP API)."""
    stores = [open_store(engine_url) for _ in range(3)]
    writer = stores[0]
    assert isinstance(writer, SQLStore)
    writer.update("Patient", "p1", patient("Martin", "1"))
    yield writer, stores[1], stores[2]
    for s in stores:
        s.close()


def test_a_draft_is_applied_as_planned_when_only_unrelated_writes_came_after_it(three: tuple[SQLStore, Store, Store]) -> None:
    """On SQLite the writer knows what it committed itself after a draft's state: none of it touched what the draft read
    or the types it searched, so the draft holds without being read again. PostgreSQL checks every read: the same end."""
    writer, server, _other = three
    draft = _drafted(server, _a_result)
    assert (draft.mark is not None) is isinstance(server, sqlite.SQLiteStore)  # PostgreSQL cannot mark a state
    writer.update("Observation", "elsewhere", {"resourceType": "Observation", "status": "final", "code": {"text": "Na"}})
    holds = writer.write(lambda tx: writer.draft_holds(draft.mark, draft.seen.keys(), draft.searched))
    assert holds is isinstance(writer, sqlite.SQLiteStore)
    carried = sent_draft(marshal.loads(marshal.dumps(draft.plain())))  # as the intake writer receives it
    assert carried.mark == draft.mark and carried.searched == {"Patient"}
    assert writer.write(lambda tx: tx.apply_draft(carried)) is True
    assert writer.search_ids(parse_search("Observation", [("patient", "p1")])) == ["o1"]
    chained = _drafted(server, lambda d: d.search_ids(parse_search("Observation", [("patient.identifier", "urn:test|1")])))
    assert chained.searched == {"Observation", "Patient"}  # a chain reads the rows of its target's type too
    writer.update("Patient", "p2", patient("Martin", "1"))
    assert writer.write(lambda tx: writer.draft_holds(chained.mark, chained.seen.keys(), chained.searched)) is False


def test_a_draft_is_read_again_after_a_commit_by_another_connection(three: tuple[SQLStore, Store, Store]) -> None:
    writer, server, other = three
    unrelated = _drafted(server, _a_result)
    other.update("Observation", "elsewhere", {"resourceType": "Observation", "status": "final", "code": {"text": "Na"}})
    assert writer.write(lambda tx: writer.draft_holds(unrelated.mark, unrelated.seen.keys(), unrelated.searched)) is False
    assert writer.write(lambda tx: tx.apply_draft(unrelated)) is True  # read again: it still holds
    stale = _drafted(server, lambda d: d.update("Patient", "p1", {**patient("Martin", "1"), "gender": "female"}))
    other.update("Patient", "p1", {**patient("Martin", "1"), "gender": "male"})
    assert writer.write(lambda tx: tx.apply_draft(stale)) is False
    now = writer.read("Patient", "p1")
    assert now is not None and b'"male"' in (now.body or b"")


def test_a_draft_is_stale_after_the_writer_itself_wrote_what_it_read_or_searched(three: tuple[SQLStore, Store, Store]) -> None:
    writer, server, _other = three
    read = _drafted(server, lambda d: (d.read("Patient", "p1"), d.update("Observation", "o1", {
        "resourceType": "Observation", "status": "final", "code": {"text": "K"}, "subject": {"reference": "Patient/p1"}})))
    assert read.searched == set()
    writer.update("Patient", "p1", {**patient("Martin", "1"), "gender": "male"})  # a resource it read, no search
    assert writer.write(lambda tx: tx.apply_draft(read)) is False
    searched = _drafted(server, _a_result)
    writer.update("Patient", "p2", patient("Martin", "1"))  # a type it searched: the search now finds two
    assert writer.write(lambda tx: tx.apply_draft(searched)) is False
    earlier = _drafted(server, lambda d: d.update("Patient", "p1", {**patient("Martin", "1"), "gender": "female"}))
    first, second = writer.write_many([lambda tx: tx.update("Patient", "p1", patient("Martin", "1b")),
                                       lambda tx: tx.apply_draft(earlier)])  # the same transaction, before it
    assert first is not None and second is False
    assert writer.read("Observation", "o1") is None


def test_the_writer_forgets_what_it_cannot_vouch_for(three: tuple[SQLStore, Store, Store], monkeypatch: pytest.MonkeyPatch) -> None:
    """A version rewritten in place (its seq is older than the drafts' marks), or more of its own commits than it keeps:
    the drafts made before are read again, and still applied when nothing they read changed."""
    writer, server, _other = three
    monkeypatch.setattr(sqlite, "OWN_COMMITS_KEPT", 2)
    draft = _drafted(server, _a_result)
    for n in range(3):
        writer.update("Observation", f"e{n}", {"resourceType": "Observation", "status": "final", "code": {"text": "Na"}})
    assert writer.write(lambda tx: writer.draft_holds(draft.mark, draft.seen.keys(), draft.searched)) is False
    assert writer.write(lambda tx: tx.apply_draft(draft)) is True
    current = writer.read("Observation", "e0")
    assert current is not None and current.body is not None
    draft = _drafted(server, lambda d: d.update("Observation", "o2", {"resourceType": "Observation", "status": "final",
                                                                       "code": {"text": "K"}}))
    upstream = Stored("Observation", "e0", current.version, current.last_updated, False, current.body.replace(b'"Na"', b'"Cl"'))
    assert writer.write(lambda tx: tx.replicate(upstream)) is True  # this node's version replaced by the upstream's
    assert writer.write(lambda tx: writer.draft_holds(draft.mark, draft.seen.keys(), draft.searched)) is False
    assert writer.write(lambda tx: tx.apply_draft(draft)) is True


def test_intake_takes_results_and_admissions_through_drafts(store: Store) -> None:
    applied: list[bool] = []
    for raw in (adt("A01", "A1", "880002", "V1", bed="H1-CARDIO-01A"), oru("R3", "880002", "F3", visit="V1")):
        made = intake.prepare(store, raw)
        assert made is not None, "the message's writes could be worked out before the lock"
        sent = intake.unpack(made.packed())  # as the drafting process sends it to the intake writer
        assert sent is not None and sent.header == made.header and sent.applied == made.applied
        assert sent.draft.store is None and sent.draft.seen == made.draft.seen and sent.draft.searches == made.draft.searches
        assert sent.draft.writes.keys() == made.draft.writes.keys()
        applied.append(store.write(lambda tx, d=sent.draft: tx.apply_draft(d)))
    assert applied == [True, True]
    answer = intake.receive(store, oru("R4", "880002", "F4", visit="V1"))
    assert answer.code == "AA" and not answer.redone
    kept = store.message(answer.message_id or 0)
    assert kept is not None and kept.status == "applied" and "DiagnosticReport/" in kept.detail  # kept as applied at once
    stale = intake.prepare(store, oru("R5", "880002", "F5", visit="V1"))
    assert stale is not None
    intake.receive(store, adt("A08", "A2", "880002", "V1", family="LEGRAND"))  # the patient changes after that draft
    answer = intake.receive(store, oru("R5", "880002", "F5", visit="V1"), stale)
    assert answer.code == "AA" and answer.redone
    # a draft that planned a provisional patient, who is admitted before its turn: the inbox says what was written
    early = intake.prepare(store, oru("R7", "880004", "F7"))
    assert early is not None and any(w.startswith("Patient/") for w in early.applied.written)
    intake.receive(store, adt("A01", "A7", "880004", "V7", bed="H1-CARDIO-02A"))
    answer = intake.receive(store, oru("R7", "880004", "F7"), early)
    kept = store.message(answer.message_id or 0)
    assert answer.code == "AA" and answer.redone and kept is not None and kept.status == "applied"
    assert kept.detail != early.applied.summary() and not any(part.startswith("Patient/") for part in kept.detail.split(", "))
    assert len(store.search_ids(parse_search("Observation", [("patient.identifier", "880002")]), limit=50)) >= 2


def test_a_packed_draft_another_version_made_or_damaged_is_worked_out_by_the_writer(store: Store) -> None:
    raw = oru("R6", "880003", "F6")
    made = intake.prepare(store, adt("A01", "A6", "880003", "V6"))
    assert made is not None
    form, *rest = marshal.loads(made.packed())
    assert intake.unpack(marshal.dumps((form + 1, *rest))) is None  # a form this version does not read
    assert intake.unpack(made.packed()[:-7]) is None and intake.unpack(b"\x00garbage") is None and intake.unpack(None) is None
    answer = intake.receive_many(store, [(raw, intake.unpack(b"\x00garbage"))])[0]
    assert answer.code == "AA"  # without a draft: worked out under the lock
    assert len(store.search_ids(parse_search("Observation", [("patient.identifier", "880003")]), limit=50)) >= 1


def _carried(write: PlannedWrite | SentWrite) -> PlannedWrite | SentWrite:
    """A write as the intake writer receives it: in a draft made plain, through marshal, and back."""
    draft = Draft(None)
    draft.writes[(write.resource_type, write.resource_id)] = write
    return sent_draft(marshal.loads(marshal.dumps(draft.plain()))).writes[(write.resource_type, write.resource_id)]


def test_a_write_sent_to_another_process_is_stored_as_the_same_bytes() -> None:
    """The intake writer splices the new version's meta into a resource a worker serialised (SentWrite.stamped):
    it must store exactly what serialising the resource there would, over real Synthea resources and edge cases."""
    import bz2

    import orjson

    from rebond.store.indexing import index_resource
    from rebond.store.sql import _versioned_body
    from tests.conftest import SYNTHEA

    with bz2.open(sorted(SYNTHEA.glob("*.json.bz2"))[7]) as file:
        resources = [entry["resource"] for entry in orjson.loads(file.read())["entry"]]
    resources += [
        {"resourceType": "Basic"},  # nothing but what is stamped
        {"resourceType": "Basic", "id": "old", "meta": {"versionId": "3", "lastUpdated": "2020-01-01T00:00:00Z"}},
        {"resourceType": "Basic", "meta": {"tag": [{"code": "é\u2028"}], "source": "#lab"}, "code": {"text": "«\"»\\"}},
    ]
    assert sum("meta" in r for r in resources) > 100  # Synthea resources carry meta.profile: it must be kept
    for number, resource in enumerate(resources):
        planned = PlannedWrite(resource["resourceType"], f"r{number}", resource, 2, index_resource(resource))
        sent = _carried(planned)
        assert isinstance(sent, SentWrite) and sent.rows == planned.rows
        assert sent.resource == {k: v for k, v in resource.items() if k != "id"} | {"id": f"r{number}"}
        expected = _versioned_body(dict(resource), resource["resourceType"], f"r{number}", 3, 1_790_000_000.25)
        assert _versioned_body(sent, resource["resourceType"], f"r{number}", 3, 1_790_000_000.25) == expected
        assert _carried(sent) == sent
