"""The store on both engines: versions, history, optimistic concurrency, conditional create, the change feed."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import orjson
import pytest

from rebond.fhir import operations
from rebond.fhir.search import parse_search
from rebond.store import open_store
from rebond.store.base import PreconditionFailed, Session, Store
from tests.pg_harness import PostgresServer


def patient(family: str = "Martin", **extra: object) -> dict[str, object]:
    return {"resourceType": "Patient", "name": [{"family": family, "given": ["Lucie"]}], **extra}


def test_every_write_is_a_new_immutable_version(store: Store) -> None:
    created = store.create(patient()).stored
    assert created.version == 1 and created.id
    body = orjson.loads(created.body or b"")
    assert body["meta"]["versionId"] == "1" and body["id"] == created.id

    updated = store.update("Patient", created.id, {**patient("Bernard"), "id": created.id}).stored
    assert updated.version == 2
    deleted = store.delete("Patient", created.id)
    assert deleted is not None and deleted.stored.deleted and deleted.stored.version == 3

    current = store.read("Patient", created.id)
    assert current is not None and current.deleted
    first = store.vread("Patient", created.id, 1)
    assert first is not None and orjson.loads(first.body or b"")["name"][0]["family"] == "Martin"
    versions, total = store.history("Patient", created.id)
    assert total == 3 and [v.version for v in versions] == [3, 2, 1]


def test_update_as_create_keeps_the_client_id(store: Store) -> None:
    result = store.update("Patient", "ipp-000123", {**patient(), "id": "ipp-000123"})
    assert result.created and result.stored.id == "ipp-000123"


def test_an_update_that_changes_nothing_makes_no_version(store: Store) -> None:
    created = store.create(patient()).stored
    again = store.update("Patient", created.id, {**patient(), "id": created.id})
    assert again.unchanged and again.stored.version == 1


def test_stale_if_match_is_refused(store: Store) -> None:
    rid = store.create(patient()).stored.id
    store.update("Patient", rid, {**patient("A"), "id": rid}, if_match=1)
    with pytest.raises(PreconditionFailed):
        store.update("Patient", rid, {**patient("B"), "id": rid}, if_match=1)


def test_concurrent_updates_with_the_same_if_match_one_wins(store: Store) -> None:
    rid = store.create(patient()).stored.id
    barrier = threading.Barrier(8)

    def attempt(i: int) -> str:
        barrier.wait()
        try:
            store.update("Patient", rid, {**patient(f"Writer{i}"), "id": rid}, if_match=1)
            return "won"
        except PreconditionFailed:
            return "412"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert results.count("won") == 1 and results.count("412") == 7
    current = store.read("Patient", rid)
    assert current is not None and current.version == 2


def test_concurrent_conditional_creates_make_one_resource(store: Store) -> None:
    barrier = threading.Barrier(8)
    ident = {"system": "urn:oid:1.2.250.1.71.4.2.7", "value": "IPP-42"}

    def attempt(_: int) -> int:
        barrier.wait()
        with store.transaction() as tx:
            return operations.create(tx, "Patient", patient(identifier=[ident]),
                                     if_none_exist="identifier=urn:oid:1.2.250.1.71.4.2.7|IPP-42").status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(attempt, range(8)))
    assert sorted(statuses) == [200] * 7 + [201]
    assert store.counts().get("Patient") == 1


def test_concurrent_creates_of_the_same_new_id_never_fail(store: Store) -> None:
    barrier = threading.Barrier(6)

    def attempt(i: int) -> int:
        barrier.wait()
        return store.update("Patient", "same-id", {**patient(f"W{i}"), "id": "same-id"}).stored.version

    with ThreadPoolExecutor(6) as pool:
        versions = sorted(pool.map(attempt, range(6)))
    assert versions == [1, 2, 3, 4, 5, 6]


def test_a_create_that_names_an_existing_id_is_refused_and_leaves_nothing(store: Store) -> None:
    store.create(patient("C1"), resource_id="named-twice")
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.write(lambda tx: tx.create(patient("C2"), resource_id="named-twice"))
    history, total = store.history("Patient", "named-twice")
    assert total == 1 and history[0].version == 1, "no version row left behind by the claim that lost"
    assert store.counts().get("Patient") == 1 and store.read("Patient", "named-twice").version == 1


def test_change_feed_is_resumable_and_names_the_site(engine_url: str) -> None:
    store = open_store(engine_url, site_id="hopital-nord")
    try:
        ids = [store.create(patient(f"P{i}")).stored.id for i in range(5)]
        first = store.changes(None, count=3)
        assert [c.stored.id for c in first.changes] == ids[:3]
        assert all(c.stored.site_id == "hopital-nord" for c in first.changes)
        rest = store.changes(first.next_cursor, count=10)
        assert [c.stored.id for c in rest.changes] == ids[3:]
        assert store.changes(rest.next_cursor).changes == []
    finally:
        store.close()


def test_a_rolled_back_transaction_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.create(patient())
        raise RuntimeError("abort")
    assert store.counts().get("Patient") is None
    assert store.changes(None).changes == []


def test_each_concurrent_write_succeeds_or_fails_on_its_own(store: Store) -> None:
    """Writes committed together (group commit) still roll back one by one."""
    barrier = threading.Barrier(12)

    def attempt(i: int) -> str:
        def work(tx: Session) -> str:
            created = tx.create(patient(f"G{i}")).stored
            if i % 2:
                raise RuntimeError("this one fails after writing")
            return created.id

        barrier.wait()
        try:
            return store.write(work)
        except RuntimeError:
            return ""

    with ThreadPoolExecutor(12) as pool:
        ids = [i for i in pool.map(attempt, range(12)) if i]
    assert len(ids) == 6
    assert store.counts().get("Patient") == 6
    assert all(store.read("Patient", i) is not None for i in ids)


@pytest.mark.parametrize("rerunnable", [False, True], ids=["run-once", "rerunnable"])
def test_write_many_gives_each_work_its_result_or_its_error(store: Store, rerunnable: bool) -> None:
    """Works handed over together (the HL7 intake writer's batches): the failing ones roll back alone."""
    runs: Counter[int] = Counter()

    def work(i: int, fails: bool) -> Callable[[Session], str]:
        def run(tx: Session) -> str:
            runs[i] += 1
            created = tx.create(patient(f"M{i}")).stored
            if fails:
                raise RuntimeError(f"work {i} fails after writing")
            return created.id
        return run

    outcomes = store.write_many([work(i, i % 3 == 1) for i in range(9)], rerunnable=rerunnable)
    assert [isinstance(o, RuntimeError) for o in outcomes] == [i % 3 == 1 for i in range(9)]
    assert str(outcomes[4]) == "work 4 fails after writing"
    ids = [o for o in outcomes if isinstance(o, str)]
    assert len(ids) == 6 and all(store.read("Patient", i) is not None for i in ids)
    assert store.counts().get("Patient") == 6, "nothing of a failed work stays"

    runs.clear()
    outcomes = store.write_many([work(i, False) for i in range(10, 14)], rerunnable=rerunnable)
    assert all(isinstance(o, str) for o in outcomes) and store.counts().get("Patient") == 10
    assert set(runs.values()) == {1}, "a batch where nothing fails runs each work once"


def test_a_copy_from_the_feed_keeps_its_version_and_is_applied_once(store: Store) -> None:
    from rebond.store.base import Stored

    body = b'{"resourceType":"Patient","id":"p-copy","meta":{"versionId":"3","lastUpdated":"2026-11-23T10:00:00.000000+00:00"},"gender":"male"}'
    copy = Stored("Patient", "p-copy", 3, 1_795_000_000.0, False, body, 0, "update", "central")
    assert store.write(lambda tx: tx.replicate(copy)) is True
    assert store.write(lambda tx: tx.replicate(copy)) is False, "a page applied twice changes nothing"
    here = store.read("Patient", "p-copy")
    assert here is not None and here.version == 3 and here.body == body and here.site_id == "central"
    from rebond.fhir.search import parse_search

    assert [s.id for s in store.search(parse_search("Patient", [("gender", "male")])).matches] == ["p-copy"], "indexed"


def test_a_sites_own_writes_are_journaled_and_its_version_yields_to_the_centrals(store: Store) -> None:
    from rebond.store.base import Stored

    store.journal_writes = True
    store.site_id = "H1"
    created = store.create({"resourceType": "Patient", "gender": "female"}, resource_id="p-site")
    store.update("Patient", "p-site", {"resourceType": "Patient", "id": "p-site", "gender": "other"})
    entries = store.journal("pending")
    assert [(e.method, e.base_version, e.local_version) for e in entries] == [("create", 0, 1), ("update", 1, 2)]
    assert created.stored.site_id == "H1"
    central = b'{"resourceType":"Patient","id":"p-site","meta":{"versionId":"2","lastUpdated":"2026-11-23T10:00:00.000000+00:00"},"gender":"male"}'
    assert store.write(lambda tx: tx.replicate(Stored("Patient", "p-site", 2, 1_795_000_000.0, False, central, 0, "update", "central")))
    here = store.read("Patient", "p-site")
    assert here is not None and here.version == 2 and here.body == central, "the central version replaces the site's own in place"
    assert store.journal("pending")[1].body is not None, "the site's version is still in its journal"
    store.write(lambda tx: tx.settle_journal(entries[0].seq, "replayed", "{}"))
    assert store.journal_count("pending") == 1 and store.journal_count("replayed") == 1


WRITER = """
import sys
from rebond.store import open_store
store = open_store(sys.argv[1], site_id=sys.argv[2])
for n in range(150):
    store.update("Patient", f"{sys.argv[2]}-{n}", {"resourceType": "Patient", "id": f"{sys.argv[2]}-{n}", "gender": "other"})
    store.update("Patient", "shared", {"resourceType": "Patient", "id": "shared", "name": [{"text": f"{sys.argv[2]} {n}"}]})
store.close()
"""


def test_sqlite_writers_in_several_processes_take_turns_and_lose_nothing(tmp_path: Path) -> None:
    """Processes writing the same SQLite file queue on its writer lock: every write lands, versions count up
    without a gap, and their times keep increasing from one process to the other."""
    url = f"sqlite:///{tmp_path}/shared.db"
    open_store(url).close()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, name]) for name in ("a", "b", "c")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    store = open_store(url)
    try:
        assert store.counts()["Patient"] == 3 * 150 + 1
        history, total = store.history("Patient", "shared", count=1000)
        assert total == 450 and sorted(v.version for v in history) == list(range(1, 451))
        by_version = sorted(history, key=lambda v: v.version)
        assert all(a.last_updated < b.last_updated for a, b in zip(by_version, by_version[1:], strict=False))
    finally:
        store.close()


def test_an_intake_writers_smaller_cache_is_its_own(tmp_path: Path) -> None:
    from rebond.store.sqlite import SMALL_COMMITS_CACHE_KIB, SQLiteStore

    store = open_store(f"sqlite:///{tmp_path}/small.db")
    try:
        assert isinstance(store, SQLiteStore)
        store.for_small_commits()
        assert store._writer.execute("PRAGMA cache_size").fetchone()[0] == -SMALL_COMMITS_CACHE_KIB
        for n in range(50):  # commits go on as before, and readers keep their own, larger cache
            store.update("Patient", f"s{n}", {"resourceType": "Patient", "id": f"s{n}"})
        with store.reader() as cur:
            assert cur.execute("PRAGMA cache_size").fetchone()[0] < -SMALL_COMMITS_CACHE_KIB
        assert store.counts()["Patient"] == 50
    finally:
        store.close()


def test_sqlite_checkpoints_beside_the_writer(tmp_path: Path) -> None:
    """Commits only append to the WAL; the checkpointer thread copies them into the database file soon after."""
    path = tmp_path / "ckpt.db"
    store = open_store(f"sqlite:///{path}")
    try:
        for n in range(200):
            store.update("Patient", f"p{n}", {"resourceType": "Patient", "id": f"p{n}"})
        deadline = time.monotonic() + 10
        in_file = 0
        while time.monotonic() < deadline and in_file < 200:
            time.sleep(0.2)
            with suppress(sqlite3.DatabaseError):  # read while the checkpoint writes the file: the next look
                in_file = _patients_in_file(path)
        assert in_file == 200
        assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # never inside a commit
    finally:
        store.close()


def _patients_in_file(path: Path) -> int:
    """Patients in the database file alone, the WAL ignored: what checkpoints have copied so far."""
    with closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as raw:
        return int(raw.execute("SELECT count(*) FROM resources WHERE res_type = 'Patient'").fetchone()[0])


def test_a_store_that_checkpoints_elsewhere_leaves_its_commits_to_the_process_told_of_them(tmp_path: Path) -> None:
    """The intake writer's store leaves its checkpoints to the server's (hl7/workers.py): its commits stay in the WAL
    until the other store is told of them (`committed_elsewhere`), which then copies them into the file."""
    path = tmp_path / "elsewhere.db"
    writer, server = open_store(f"sqlite:///{path}"), open_store(f"sqlite:///{path}")
    try:
        writer.checkpoint_elsewhere()
        before = _patients_in_file(path)
        for n in range(100):
            writer.update("Patient", f"w{n}", {"resourceType": "Patient", "id": f"w{n}"})
        time.sleep(1.0)  # a checkpointer of its own would have copied them by now (every 0.25 s)
        assert _patients_in_file(path) == before, "the writer did not checkpoint"
        server.committed_elsewhere()
        deadline = time.monotonic() + 10
        while True:
            with suppress(sqlite3.DatabaseError):  # read while the checkpoint writes the file: the next look
                if _patients_in_file(path) == before + 100:
                    break
            assert time.monotonic() < deadline, "the server's checkpointer copied the writer's commits"
            time.sleep(0.1)
        found = server.read("Patient", "w99")
        assert found is not None and found.version == 1
    finally:
        writer.close()
        server.close()


def test_the_wal_hard_limit_counts_the_log_not_the_file_kept_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A WAL started over keeps its file (WAL_KEPT), so the file's size no longer tells how long the log is: the hard
    limit counts the log's frames in the wal-index. A long file holding a short log is left alone; the commit that
    finds the log over the limit copies it whole into the database, and the next commit starts it over."""
    from rebond.store import sqlite as engine

    monkeypatch.setattr(engine, "WAL_HARD_LIMIT", 1 << 20)
    path = tmp_path / "kept.db"
    wal = Path(f"{path}-wal")
    store = open_store(f"sqlite:///{path}")
    try:
        store.checkpoint_elsewhere()  # no timed checkpoints: only the hard limit copies the log here
        assert store._writer.execute("PRAGMA journal_size_limit").fetchone()[0] == engine.WAL_KEPT
        store.update("Patient", "k0", {"resourceType": "Patient", "id": "k0"})
        frames = engine._log_frames(str(path))
        with closing(sqlite3.connect(path)) as look:
            _busy, logged, _copied = look.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert frames == logged, "the frames SQLite counts"
        os.truncate(wal, 8 << 20)  # longer than the limit, as a WAL started over leaves its file; no frame past the log
        store.update("Patient", "k1", {"resourceType": "Patient", "id": "k1"})
        frames = engine._log_frames(str(path)) or 0
        store.update("Patient", "k2", {"resourceType": "Patient", "id": "k2"})
        assert (engine._log_frames(str(path)) or 0) > frames, "the log goes on: the file's size is not the log's"
        assert _patients_in_file(path) == 1, "nothing checkpointed since k0"
        written = 3
        while (engine._log_frames(str(path)) or 0) * store._frame_bytes <= engine.WAL_HARD_LIMIT:
            store.update("Patient", f"k{written}", {"resourceType": "Patient", "id": f"k{written}", "active": True})
            written += 1
            assert written < 2000, "the log never reached the limit"
        assert _patients_in_file(path) == written, "the commit that found the log over the limit copied it whole"
        store.update("Patient", "last", {"resourceType": "Patient", "id": "last"})
        assert (engine._log_frames(str(path)) or 0) < frames + 20, "and the next commit started the log over"
        assert wal.stat().st_size == 8 << 20, "in the same file, not cut back"
    finally:
        store.close()


def test_a_snapshot_reads_one_state_of_the_store_until_it_ends(tmp_path: Path) -> None:
    """A draft's reads (hl7/intake.py) see one state of the store: a commit by another connection meanwhile shows after."""
    url = f"sqlite:///{tmp_path / 'snap.db'}"
    store, other = open_store(url), open_store(url)
    try:
        store.update("Patient", "first", {"resourceType": "Patient", "id": "first"})
        with store.snapshot():
            assert store.read("Patient", "first") is not None
            other.update("Patient", "second", {"resourceType": "Patient", "id": "second"})
            with store.snapshot():  # within one: the same
                assert store.read("Patient", "second") is None
            assert store.read("Patient", "second") is None, "the state the snapshot began with"
        assert store.read("Patient", "second") is not None
        with pytest.raises(ValueError), store.snapshot():
            store.read("Patient", "first")
            raise ValueError("a draft that fails")
        other.update("Patient", "third", {"resourceType": "Patient", "id": "third"})
        assert store.read("Patient", "third") is not None, "a failed draft's snapshot ended with it"
    finally:
        store.close()
        other.close()


def test_a_state_key_is_claimed_once(store: Store) -> None:
    assert store.write(lambda tx: tx.claim_state("nonce", "a", {"n": 1})) is True
    assert store.write(lambda tx: tx.claim_state("nonce", "a", {"n": 2})) is False, "taken: the first value stays"
    assert store.get_state("nonce", "a") == {"n": 1}


def test_a_lease_is_held_by_one_owner_until_it_lapses(store: Store) -> None:
    assert store.write(lambda tx: tx.lease("jobs", "pacs", "a", 0.5))
    assert not store.write(lambda tx: tx.lease("jobs", "pacs", "b", 0.5)), "held by a"
    assert store.write(lambda tx: tx.lease("jobs", "pacs", "a", 0.5)), "a renews it"
    time.sleep(0.6)
    assert store.write(lambda tx: tx.lease("jobs", "pacs", "b", 0.5)), "lapsed: b takes it"
    assert not store.write(lambda tx: tx.lease("jobs", "pacs", "a", 0.5))
    assert store.write(lambda tx: tx.lease("jobs", "pacs", "b", 0)) and store.write(lambda tx: tx.lease("jobs", "pacs", "a", 1)), \
        "given up (0 s): free at once"


def test_after_a_failover_a_feed_waiting_at_a_gap_goes_on(postgres: PostgresServer) -> None:
    """A follower waits at a gap for a horizon xid; if that xid was taken on a primary lost since, the new primary may
    never reach it (quiet hours): the gap is final, since whatever did not reach the new primary never will."""
    from rebond.store.postgres import FeedPosition

    store = open_store(postgres.create_database("feed_failover"))
    try:
        store.create(patient("Avant"))
        before = store.changes(None).next_cursor
        with pytest.raises(RuntimeError), store.transaction() as tx:  # a sequence number taken, never committed: a gap
            tx.create(patient("Perdu"))
            raise RuntimeError("rolled back")
        after = store.create(patient("Après")).stored.id
        waiting = FeedPosition.parse(store.changes(before).next_cursor)
        assert waiting.horizon is not None, "the feed waits at the gap"
        assert [c.stored.id for c in store.changes(str(waiting)).changes] == [after], "the horizon passed: the gap is final"

        # the same wait, but for a horizon taken on the lost primary, above every xid this one has handed out
        lost = FeedPosition(waiting.seq, waiting.horizon + 1_000_000, waiting.resume)
        assert [c.stored.id for c in store.changes(str(lost)).changes] == [after], "not held at the gap until enough writes come"

        # the row seen after the gap was on the lost primary too: the first row now is further on. The feed waits again
        # there, from a horizon of this server's, and goes on once it has passed, instead of waiting for that row for ever
        vanished = FeedPosition(waiting.seq, waiting.horizon, (waiting.resume or 0) - 1)
        again = store.changes(str(vanished))
        anchored = FeedPosition.parse(again.next_cursor)
        assert again.changes == [] and anchored.resume == waiting.resume and anchored.horizon is not None
        assert [c.stored.id for c in store.changes(again.next_cursor).changes] == [after]
    finally:
        store.close()


def _index_rows(engine_url: str) -> dict[str, Counter[tuple[object, ...]]]:
    """Every index table's rows (without their numbers), read straight from the database."""
    from rebond.store.schema import INDEX_TABLES

    rows: dict[str, Counter[tuple[object, ...]]] = {}
    with _raw(engine_url) as (conn, _mark):
        for table, columns in INDEX_TABLES.items():
            found = conn.execute(f"SELECT rid, key, {', '.join(columns)} FROM {table}").fetchall()
            rows[table] = Counter(tuple(row) for row in found)
    return rows


@contextmanager
def _raw(engine_url: str) -> Iterator[tuple[Any, str]]:
    """A plain connection to the store's database, and its placeholder."""
    if engine_url.startswith("sqlite:///"):
        with closing(sqlite3.connect(engine_url.removeprefix("sqlite:///"), isolation_level=None)) as conn:
            yield conn, "?"
    else:
        import psycopg

        with psycopg.connect(engine_url, autocommit=True) as pg:
            yield pg, "%s"


def _as_schema_3(engine_url: str) -> None:
    """The search index put back as Rebond kept it before schema 4: rows in a plain table with an index by rid, a
    composite's token part in two forms (`code`, `system|code`), an index of the tokens' texts, no sp_token_texts."""
    from rebond.store.schema import INDEX_TABLES

    with _raw(engine_url) as (conn, mark):
        for table, columns in INDEX_TABLES.items():
            values = ", ".join(("rid", "key", *columns))
            conn.execute(f"CREATE TABLE {table}_old AS SELECT {values} FROM {table}")
            conn.execute(f"DROP TABLE {table}")
            conn.execute(f"ALTER TABLE {table}_old RENAME TO {table}")
            conn.execute(f"CREATE INDEX {table}_rid ON {table} (rid, key)")
            first = {"sp_token": "code", "sp_quantity": "code", "sp_reference": "target_id"}.get(table, columns[0])
            conn.execute(f"CREATE INDEX {table}_lookup ON {table} (key, {first}, rid)")
        conn.execute("CREATE INDEX sp_token_text ON sp_token (key, text_norm, rid) WHERE text_norm IS NOT NULL")
        conn.execute("DROP TABLE sp_token_texts")
        parts = conn.execute("SELECT rid, key, part1, part2 FROM sp_composite").fetchall()
        conn.execute("DELETE FROM sp_composite")
        def earlier_forms(part: str) -> list[str]:  # a token part was kept as its code, and as system|code
            code, separator, system = part.partition("\x1f")
            return [code, f"{system}|{code}"] if separator else [code]

        for rid, key, part1, part2 in parts:
            for one in earlier_forms(part1):
                for two in earlier_forms(part2):
                    conn.execute(f"INSERT INTO sp_composite (rid, key, part1, part2) VALUES ({mark}, {mark}, {mark}, {mark})",
                                 (rid, key, one, two))
        conn.execute("UPDATE rebond_meta SET value = '3' WHERE name = 'schema'")


def test_a_store_of_schema_3_gets_its_index_made_again_when_it_opens(engine_url: str, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The index tables of an earlier Rebond are made again in the layout of schema 4 (store/upgrade.py): the same rows,
    numbered; a composite's token part in one form; the texts gathered; searches answer as on a new store."""
    from rebond.store.schema import SCHEMA_VERSION

    loinc = "http://loinc.org"
    store = open_store(engine_url)
    try:
        pid = store.create(patient()).stored.id
        for code, value in (("2823-3", 6.2), ("2951-2", 139.0), ("2823-3", 4.1)):
            store.create({"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
                          "code": {"coding": [{"system": loinc, "code": code, "display": "Kaliémie" if code == "2823-3" else "Natrémie"}]},
                          "valueQuantity": {"value": value, "unit": "mmol/L"}})
        for systolic in (150, 120):  # composite rows: a component's code and value
            store.create(_pressure(pid, systolic))
        gone = store.create({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": loinc, "code": "718-7"}]},
                             "valueQuantity": {"value": 12.0}}).stored.id
        store.delete("Observation", gone)
    finally:
        store.close()
    made = _index_rows(engine_url)
    _as_schema_3(engine_url)
    assert _index_rows(engine_url)["sp_composite"] != made["sp_composite"]  # two forms of each token part
    monkeypatch.setattr("rebond.store.upgrade.PROGRESS_EVERY", 0.0)  # how far it has gone, said at every step
    with caplog.at_level("WARNING", logger="rebond.store"):
        store = open_store(engine_url)
    said = [r.getMessage() for r in caplog.records]
    assert f"upgrading the search index (schema 4): sp_token made again, {sum(made['sp_token'].values())} rows" in "\n".join(said)
    assert any("composite rows, 0 of 2 resources" in line for line in said), said
    try:
        assert _index_rows(engine_url) == made
        with _raw(engine_url) as (conn, _mark):
            assert conn.execute("SELECT value FROM rebond_meta WHERE name = 'schema'").fetchone()[0] == str(SCHEMA_VERSION)
            texts = {tuple(row) for row in conn.execute("SELECT key, text_norm, code FROM sp_token_texts").fetchall()}
        assert texts == {("Observation.code", "kaliemie", "2823-3"), ("Observation.code", "natremie", "2951-2")}

        def found(query: str) -> int:
            return len(store.search(parse_search("Observation", [tuple(query.split("=", 1))])).matches)  # type: ignore[list-item]

        assert found(f"code-value-quantity={loinc}|2823-3$6.2") == 1 and found("code-value-quantity=2823-3$4.1") == 1
        assert found(f"component-code-value-quantity={loinc}|8480-6$150") == 1 and found("component-code-value-quantity=8480-6$120") == 1
        assert found("code:text=kali") == 2 and found("code=2951-2") == 1
        store.create(_pressure(pid, 150))
        assert found("component-code-value-quantity=8480-6$150") == 2
    finally:
        store.close()
    open_store(engine_url).close()  # opened again: nothing left to do, nothing lost
    assert sum(_index_rows(engine_url)["sp_composite"].values()) == sum(made["sp_composite"].values()) + 1


def _pressure(pid: str, systolic: float) -> dict[str, Any]:
    loinc = "http://loinc.org"
    return {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": loinc, "code": "85354-9"}]},
            "component": [{"code": {"coding": [{"system": loinc, "code": "8480-6"}]}, "valueQuantity": {"value": systolic}}]}


def test_a_store_of_schema_4_loses_the_composite_rows_an_observation_s_code_and_value_now_answer(
        engine_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Schema 5 (store/upgrade.py): `code-value-quantity` and the like are answered by the code's and the value's rows;
    a store of schema 4 loses the composite rows it kept for them when it opens, keeps the others, and finds the same."""
    from rebond.store.schema import SCHEMA_VERSION

    loinc = "http://loinc.org"
    store = open_store(engine_url)
    try:
        pid = store.create(patient()).stored.id
        potassium = store.create({"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
                                  "code": {"coding": [{"system": loinc, "code": "2823-3"}]}, "valueQuantity": {"value": 6.2}}).stored.id
        store.create(_pressure(pid, 150))
    finally:
        store.close()
    made = _index_rows(engine_url)
    assert [key for _rid, key, *_parts in made["sp_composite"]] == ["Observation.component-code-value-quantity"]
    with _raw(engine_url) as (conn, mark):  # the row schema 4 wrote for the potassium
        rid = conn.execute(f"SELECT rid FROM resources WHERE res_id = {mark}", (potassium,)).fetchone()[0]
        conn.execute(f"INSERT INTO sp_composite (rid, key, part1, part2, n) VALUES ({mark}, {mark}, {mark}, {mark}, 0)",
                     (rid, "Observation.code-value-quantity", f"2823-3\x1f{loinc}", "6.2"))
        conn.execute("UPDATE rebond_meta SET value = '4' WHERE name = 'schema'")
    with caplog.at_level("WARNING", logger="rebond.store"):
        store = open_store(engine_url)
    try:
        assert any("schema 5): 1 composite rows no longer kept" in r.getMessage() for r in caplog.records), caplog.records
        assert _index_rows(engine_url) == made
        with _raw(engine_url) as (conn, _mark):
            assert conn.execute("SELECT value FROM rebond_meta WHERE name = 'schema'").fetchone()[0] == str(SCHEMA_VERSION) == "5"
        query = parse_search("Observation", [("code-value-quantity", f"{loinc}|2823-3$6.2")])
        assert [m.id for m in store.search(query).matches] == [potassium]
    finally:
        store.close()


@pytest.mark.parametrize("kept", [True, False], ids=["map-kept", "map-let-go"])
def test_a_thread_reading_between_commits_reads_past_the_map_unless_it_is_kept_and_sees_every_commit(tmp_path: Path,
                                                                                                     kept: bool) -> None:
    """`for_reads_between_commits` (the MLLP drafts): where the 'rebond' VFS keeps a database's map between read
    transactions, this thread reads through it; where it does not (REBOND_WAL_READS=pread), this thread's reads go
    past the map, no other thread's. Either way its reads see each commit of the writer at once."""
    from rebond.store import _walvfs

    was = _walvfs.read_through_map(kept)
    store = open_store(f"sqlite:///{tmp_path}/drafts.db")
    try:
        def mapped() -> int:
            with store.reader() as cur:
                return int(cur.execute("PRAGMA mmap_size").fetchone()[0])

        assert mapped() > 0
        store.for_reads_between_commits()
        assert (mapped() > 0) is kept
        elsewhere: list[int] = []
        thread = threading.Thread(target=lambda: elsewhere.append(mapped()))
        thread.start()
        thread.join()
        assert elsewhere[0] > 0
        for n in range(1, 30):
            store.update("Patient", "p", {"resourceType": "Patient", "name": [{"family": f"F{n}"}]})
            now = store.read("Patient", "p")
            assert now is not None and now.version == n and f"F{n}".encode() in (now.body or b"")
    finally:
        store.close()
        _walvfs.read_through_map(was)


def test_none_and_bytes_are_bound_as_they_were_through_the_adapters_rebond_registers() -> None:
    """store/sqlite.py registers adapters for None and bytes (a shortcut past sqlite3's adaptation protocol): they
    must still bind as NULL and as the same BLOB, and the other types as before."""
    import rebond.store.sqlite  # noqa: F401  (registers them)

    with closing(sqlite3.connect(":memory:")) as conn:
        row = conn.execute("SELECT typeof(?), typeof(?), ?, typeof(?), typeof(?), typeof(?)",
                           (None, b"\x00\xff", b"\x00\xff", "t", 1, bytearray(b"b"))).fetchone()
    assert row == ("null", "blob", b"\x00\xff", "text", "integer", "blob")


def _indexes(engine_url: str) -> set[str]:
    with _raw(engine_url) as (conn, _mark):
        if engine_url.startswith("sqlite:///"):
            return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()}
        return {row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()").fetchall()}


def test_an_index_no_longer_kept_up_is_dropped_when_the_store_opens_and_type_history_since_still_answers(engine_url: str) -> None:
    """versions_type_lu (schema.DROPPED_INDEXES) is gone from a store an earlier Rebond made; the history of a type since
    a moment reads the versions by their time instead, and answers the same."""
    store = open_store(engine_url)
    try:
        first = store.create(patient("Avant")).stored
        store.create({"resourceType": "Observation", "status": "final", "code": {"text": "K"}})
        later = store.create(patient("Après")).stored
        store.update("Patient", first.id, {**patient("Avant"), "id": first.id, "active": True})
    finally:
        store.close()
    with _raw(engine_url) as (conn, _mark):
        conn.execute("CREATE INDEX versions_type_lu ON versions (res_type, lu)")  # as an earlier Rebond made it
    assert "versions_type_lu" in _indexes(engine_url)
    store = open_store(engine_url)
    try:
        assert "versions_type_lu" not in _indexes(engine_url) and "versions_lu" in _indexes(engine_url)
        since, total = store.history("Patient", since=later.last_updated)
        assert total == 2 and [(v.id, v.version) for v in since] == [(first.id, 2), (later.id, 1)]
        assert store.history("Patient")[1] == 3 and store.history(since=first.last_updated)[1] == 4
    finally:
        store.close()


def test_rebond_db_upgrades_a_store_ahead_of_a_start(engine_url: str) -> None:
    """The IT team upgrades a store in a quiet moment, not at the next start: `rebond db status` says what it is,
    writing nothing; `rebond db upgrade` brings it to this schema once."""
    from rebond.store.schema import SCHEMA_VERSION
    from tests.server import rebond

    store = open_store(engine_url)
    try:
        pid = store.create(patient()).stored.id
        store.create({"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
                      "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3", "display": "Kaliémie"}]},
                      "valueQuantity": {"value": 6.2, "unit": "mmol/L"}})
        store.create(_pressure(pid, 150))
    finally:
        store.close()
    made = _index_rows(engine_url)
    _as_schema_3(engine_url)
    status = rebond("db", "status", "--db", engine_url)
    assert status.returncode == 0 and "schema 3" in status.stdout and "rebond db upgrade" in status.stdout, status
    assert _index_rows(engine_url) != made  # status wrote nothing
    upgrade = rebond("db", "upgrade", "--db", engine_url)
    assert upgrade.returncode == 0 and f"schema 3 → {SCHEMA_VERSION} in" in upgrade.stdout, upgrade
    assert _index_rows(engine_url) == made
    status = rebond("db", "status", "--db", engine_url)
    assert status.returncode == 0 and "up to date" in status.stdout, status
    again = rebond("db", "upgrade", "--db", engine_url)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again


def test_a_store_of_a_later_schema_is_refused_and_left_as_it_is(engine_url: str, tmp_path: Path) -> None:
    """A Rebond older than the store's schema would write rows that store no longer reads: it refuses to open it,
    with one line saying why, and touches nothing. No store at all: said, and no file made."""
    from rebond.store.schema import SCHEMA_VERSION
    from rebond.store.upgrade import LaterSchema
    from tests.server import rebond

    store = open_store(engine_url)
    try:
        store.create(patient())
    finally:
        store.close()
    later = str(SCHEMA_VERSION + 1)
    with _raw(engine_url) as (conn, mark):
        conn.execute(f"UPDATE rebond_meta SET value = {mark} WHERE name = 'schema'", (later,))
    with pytest.raises(LaterSchema, match=f"schema {later}, made by a later Rebond"):
        open_store(engine_url)
    for command in (("db", "status"), ("db", "upgrade"), ("accounts", "list")):
        done = rebond(*command, "--db", engine_url)
        assert done.returncode == 1 and "made by a later Rebond" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done
    with _raw(engine_url) as (conn, _mark):
        assert conn.execute("SELECT value FROM rebond_meta WHERE name = 'schema'").fetchone()[0] == later
        assert conn.execute("SELECT count(*) FROM resources").fetchone()[0] == 1
    missing = tmp_path / "nowhere" / "rebond.db"
    for command in ("status", "upgrade"):
        done = rebond("db", command, "--db", f"sqlite:///{missing}")
        assert done.returncode == 1 and "no Rebond store at" in done.stderr, done
    assert not missing.parent.exists()


def test_a_new_sqlite_store_has_small_pages_and_an_older_one_keeps_its_own(tmp_path: Path) -> None:
    """A commit writes every page it changed whole: a new store's pages are 2 KiB; a store made with pages of 4 KiB
    keeps them (SQLite changes a page size only by rewriting the file) and works as before."""
    from rebond.store.sqlite import PAGE_SIZE

    open_store(f"sqlite:///{tmp_path}/new.db").close()
    with closing(sqlite3.connect(tmp_path / "new.db")) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 2048
    with closing(sqlite3.connect(tmp_path / "old.db")) as conn:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE earlier (x)")
    store = open_store(f"sqlite:///{tmp_path}/old.db")
    try:
        pid = store.create(patient()).stored.id
        assert [m.id for m in store.search(parse_search("Patient", [("family", "martin")])).matches] == [pid]
    finally:
        store.close()
    with closing(sqlite3.connect(tmp_path / "old.db")) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096


def test_processes_opening_a_store_of_schema_3_together_upgrade_it_once(tmp_path: Path) -> None:
    """`rebond serve --workers 2` and its MLLP writer open the store at the same moment: one makes the index again
    under the writers' file lock, the others wait for it and find it done."""
    url = f"sqlite:///{tmp_path}/old.db"
    store = open_store(url)
    try:
        pid = store.create(patient()).stored.id
        store.write(lambda tx: [tx.create({"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{pid}"},
                                           "code": {"coding": [{"system": "http://loinc.org", "code": f"{n}-1", "display": f"Test {n}"}]},
                                           "valueQuantity": {"value": n}}) for n in range(400)])
    finally:
        store.close()
    made = _index_rows(url)
    _as_schema_3(url)
    opening = [subprocess.Popen([sys.executable, "-c", f"from rebond.store import open_store; open_store({url!r}).close()"],
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in opening]
    assert [code for code, _err in outcomes] == [0, 0, 0], outcomes
    assert sum("the search index is of schema 4" in err for _code, err in outcomes) == 1
    assert _index_rows(url) == made


COUNTING = """
import ctypes, sqlite3, sys
from rebond.store import open_store
from rebond.store.sqlite import stop_counting_memory
used = ctypes.CDLL("libsqlite3.so.0").sqlite3_memory_used
used.restype = ctypes.c_int64
held = sqlite3.connect(":memory:") if sys.argv[2] == "open-first" else None
first = stop_counting_memory()
store = open_store(sys.argv[1], site_id="t")
created = store.create({"resourceType": "Patient", "name": [{"family": "Martin"}]}).stored
again = stop_counting_memory()  # with a connection open: never a second shutdown under it
read = store.read("Patient", created.id)
print(first, again, used(), read is not None and read.version == 1, store.create({"resourceType": "Patient"}).stored.version)
store.close()
"""


@pytest.mark.parametrize("order", ["fresh", "open-first"])
def test_sqlite_stops_counting_its_memory_only_in_a_process_with_no_connection_open(tmp_path: Path, order: str) -> None:
    """The intake writer's process turns SQLite's memory count off (a global mutex on every allocation). SQLite
    must be shut down for that: done only when no connection is open, and never again under open ones."""
    done = subprocess.run([sys.executable, "-c", COUNTING, f"sqlite:///{tmp_path / 'c.db'}", order],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, again, used, read, second = done.stdout.split()
    assert read == "True" and second == "1"  # the store works either way
    if order == "fresh":
        assert (first, again, used) == ("True", "True", "0")  # stopped: nothing is counted, though a store is open
    else:
        assert (first, again) == ("False", "False") and int(used) > 0  # left as it was: still counting


def _coded(text: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": text}]}}


def _found_by_text(store: Store, text: str) -> set[str]:
    return {s.id for s in store.search(parse_search("Observation", [("code:text", text)])).matches}


def test_a_codes_text_offered_by_a_transaction_or_a_work_that_rolled_back_is_offered_again(store: Store) -> None:
    """The writer remembers the texts of codes (sp_token_texts, what `:text` finds codes by) that it saw committed, and
    does not offer them again (store/sqlite.py _KnownTexts). Texts offered by a transaction rolled back, or by a work
    rolled back to its savepoint, are not remembered: the rows may have gone with them."""
    by_text = parse_search("Observation", [("code:text", "uree")])
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.create(_coded("Urée sanguine", "3094-0"))
        tx.search_ids(by_text)  # the index rows, the text's among them, written before the end
        raise RuntimeError("abort")

    def work(text: str, code: str, fails: bool) -> Callable[[Session], str]:
        def run(tx: Session) -> str:
            created = tx.create(_coded(text, code)).stored.id
            tx.search_ids(by_text)
            if fails:
                raise RuntimeError("this work fails after its rows are written")
            return created
        return run

    outcomes = store.write_many([work("Créatinine", "2160-0", False), work("Glycémie", "2345-7", True)])
    assert isinstance(outcomes[0], str) and isinstance(outcomes[1], RuntimeError)
    assert _found_by_text(store, "glycemie") == set()
    created = {text: store.create(_coded(text, code)).stored.id
               for text, code in (("Urée sanguine", "3094-0"), ("Glycémie", "2345-7"), ("Créatinine", "2160-0"))}
    assert _found_by_text(store, "uree") == {created["Urée sanguine"]}
    assert _found_by_text(store, "glycemie") == {created["Glycémie"]}
    assert _found_by_text(store, "creatinine") == {outcomes[0], created["Créatinine"]}


def test_the_sqlite_writer_offers_a_codes_text_once_it_knows_it_committed(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'texts.db'}", site_id="central")
    offered: list[str] = []
    try:
        store._writer.set_trace_callback(lambda sql: offered.append(sql) if "sp_token_texts" in sql else None)  # type: ignore[attr-defined]
        store.create(_coded("Kaliémie", "2823-3"))
        assert len(offered) == 1
        store.create(_coded("Kaliémie", "2823-3"))
        store.create(_coded("Kaliémie", "2823-3"))
        assert len(offered) == 1, "a text known to be committed is not offered again"
        store.create(_coded("Natrémie", "2951-2"))
        assert len(offered) == 2
        assert len(_found_by_text(store, "kaliemie")) == 3 and len(_found_by_text(store, "natremie")) == 1
    finally:
        store.close()
