"""Clearing the content of old applied HL7 messages (`rebond hl7 prune`): a re-send is still recognised, nothing else goes."""
from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from rebond.hl7.intake import CHANNEL, prune, receive, replay
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store import open_store
from rebond.store.base import Store
from rebond.store.schema import SCHEMA_VERSION
from tests.hl7_messages import adt, oru
from tests.server import rebond


@pytest.fixture
def hospital(store: Store) -> Store:
    seed_demo(store, seed=2, size=DemoSize(1, 1, 4))
    return store


def last_change(store: Store) -> str:
    """Where the change feed stands: a new version anywhere moves it."""
    cursor = None
    while (page := store.changes(cursor, count=1000)).changes:
        cursor = page.next_cursor
    return cursor or ""


def test_old_applied_messages_lose_their_content_but_a_re_send_is_still_applied_once(hospital: Store) -> None:
    admission = adt("A01", "P1", "900000101", "V101", bed="H1-CARDIO-01A")
    result = oru("P2", "900000101", "F101", visit="V101")
    garbage = b"\x00\xff not HL7 at all"
    applied = [receive(hospital, raw) for raw in (admission, result)]
    letter = receive(hospital, garbage)
    assert [a.code for a in applied] == ["AA", "AA"] and letter.code == "AR"
    time.sleep(0.01)
    cutoff = time.time()
    later = receive(hospital, oru("P3", "900000101", "F102", visit="V101"))
    before = last_change(hospital)

    count, size = prune(hospital, cutoff)
    assert (count, size) == (2, len(admission) + len(result))
    for answer, raw in zip(applied, (admission, result), strict=True):
        kept = hospital.message(answer.message_id or 0)
        assert kept is not None and kept.raw == b"" and kept.cleared and kept.status == "applied"
        assert kept.digest == hashlib.sha256(raw).hexdigest()
        assert kept.detail, "what was applied is still said"
    assert hospital.message(letter.message_id or 0).raw == garbage, "a dead letter is kept whole"  # type: ignore[union-attr]
    assert hospital.message(later.message_id or 0).raw, "a message received after the cut-off is kept whole"  # type: ignore[union-attr]
    assert prune(hospital, cutoff) == (0, 0), "pruning twice clears nothing more"

    again = receive(hospital, result)
    assert again.code == "AA" and b"already received and applied" in again.ack
    assert last_change(hospital) == before, "nothing applied twice"
    other = receive(hospital, oru("P2", "900000101", "F101", visit="V101", potassium="3,9", flag="N"))
    assert other.code == "AR" and b"MSH-10 'P2' was already used" in other.ack, "the digest tells other content apart"
    with pytest.raises(LookupError, match="content cleared"):
        replay(hospital, applied[1].message_id or 0)
    assert hospital.message(applied[1].message_id or 0).status == "applied", "the refused replay changed nothing"  # type: ignore[union-attr]


def test_a_store_made_before_digests_gets_them_and_its_old_messages_are_still_recognised(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = open_store(f"sqlite:///{path}")
    result = oru("Q1", "900000201", "F201")
    assert receive(store, result).code == "AA"
    store.close()
    with sqlite3.connect(path) as old:  # as an earlier Rebond left it: no digest column, schema 1
        old.execute("ALTER TABLE inbox DROP COLUMN digest")
        old.execute("UPDATE rebond_meta SET value = '1' WHERE name = 'schema'")

    store = open_store(f"sqlite:///{path}")
    try:
        with sqlite3.connect(path) as check:
            assert "digest" in {row[1] for row in check.execute("PRAGMA table_info(inbox)")}
            assert check.execute("SELECT value FROM rebond_meta WHERE name = 'schema'").fetchone() == (str(SCHEMA_VERSION),)
        assert store.messages(CHANNEL, "applied")[0].digest == "", "an old message has no digest yet"
        assert receive(store, result).code == "AA", "an old message is recognised by its content"
        assert prune(store, time.time() + 1) == (1, len(result))
        assert store.messages(CHANNEL, "applied")[0].digest == hashlib.sha256(result).hexdigest(), "pruning computes it"
        assert b"already received" in receive(store, result).ack
    finally:
        store.close()


def test_a_store_made_before_digests_gets_the_column_a_new_store_has(engine_url: str) -> None:
    """The column added on opening an older store is the one a new store is made with (on PostgreSQL, its collation too)."""
    def described(url: str) -> tuple[str, ...]:
        if url.startswith("sqlite:///"):
            with sqlite3.connect(url[len("sqlite:///"):]) as db:
                return tuple(str(row[2]) for row in db.execute("PRAGMA table_info(inbox)") if row[1] == "digest")
        import psycopg

        with psycopg.connect(url) as db:
            row = db.execute("SELECT data_type, coalesce(collation_name, '') FROM information_schema.columns"
                             " WHERE table_name = 'inbox' AND column_name = 'digest'").fetchone()
            return tuple(row) if row else ()

    open_store(engine_url).close()
    made_new = described(engine_url)
    if engine_url.startswith("sqlite:///"):
        with sqlite3.connect(engine_url[len("sqlite:///"):]) as db:
            db.execute("ALTER TABLE inbox DROP COLUMN digest")
    else:
        import psycopg

        with psycopg.connect(engine_url, autocommit=True) as db:
            db.execute("ALTER TABLE inbox DROP COLUMN digest")
    assert described(engine_url) == ()
    open_store(engine_url).close()
    assert made_new and described(engine_url) == made_new


def test_rebond_hl7_prune_clears_what_is_older_than_the_days_asked(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    db = f"sqlite:///{path}"
    store = open_store(db)
    for n in range(3):
        assert receive(store, oru(f"R{n}", "900000301", f"F30{n}")).code == "AA"
    store.close()
    with sqlite3.connect(path) as clock:  # two of them came ten days ago
        clock.execute("UPDATE inbox SET received = received - 10 * 86400 WHERE control_id IN ('R0', 'R1')")

    done = rebond("hl7", "prune", "--older-than", "7", "--db", db)
    assert done.returncode == 0, done.stderr
    assert "cleared the content of 2 applied HL7 message(s)" in done.stdout and len(done.stdout.strip().splitlines()) == 1, done.stdout
    with sqlite3.connect(path) as check:
        assert dict(check.execute("SELECT control_id, length(raw) > 0 FROM inbox")) == {"R0": 0, "R1": 0, "R2": 1}
    for wrong, says in (("0", "1 day or more"), ("-3", "1 day or more"), ("nan", "1 day or more")):
        refused = rebond("hl7", "prune", "--older-than", wrong, "--db", db)
        assert refused.returncode != 0 and says in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
