"""`rebond backup`: a SQLite store copied while a real server writes to it, whole, consistent, and served again."""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.server import RebondServer, rebond

FHIR = {"Content-Type": "application/fhir+json"}


def test_a_backup_taken_under_writes_is_consistent_and_serves(demo_db: str, tmp_path: Path) -> None:
    server = RebondServer(demo_db).start()
    created: list[str] = []
    stop = threading.Event()

    def write() -> None:  # admissions keep coming while the backup is taken
        with httpx.Client(base_url=server.fhir, headers={**FHIR, **server.headers}, timeout=30) as client:
            while not stop.is_set():
                answer = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"Sauvegarde{len(created)}"}]})
                assert answer.status_code == 201, answer.text
                created.append(answer.json()["id"])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while len(created) < 20:
            stop.wait(0.05)
        before = len(created)
        done = rebond("backup", str(tmp_path / "copy.db"), "--db", server.db)
        after = len(created)
    finally:
        stop.set()
        writer.join()
        server.stop()
    assert done.returncode == 0, done.stderr
    assert "resources" in done.stdout and "checked" in done.stdout
    assert not list(tmp_path.glob("copy.db.partial*")), "nothing is left aside"

    copy = sqlite3.connect(tmp_path / "copy.db")
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete", "one self-contained file"
        # as of one commit: every resource points at a version it has, every version at a resource
        assert copy.execute("SELECT count(*) FROM resources r LEFT JOIN versions v ON v.seq = r.seq WHERE v.seq IS NULL").fetchone()[0] == 0
        kept = {row[0] for row in copy.execute("SELECT res_id FROM resources WHERE res_type = 'Patient'")}
    finally:
        copy.close()
    assert set(created[:before]) <= kept, "everything acknowledged before the backup started is in it"
    assert len(set(created) & kept) <= after

    restored = RebondServer(f"sqlite:///{tmp_path / 'copy.db'}").start()
    try:
        read = httpx.get(f"{restored.fhir}/Patient/{created[0]}", headers=restored.headers, timeout=10)
        assert read.status_code == 200 and read.json()["name"][0]["family"] == "Sauvegarde0"
    finally:
        restored.stop()


def test_a_backup_that_cannot_be_made_says_why_in_one_line(demo_db: str, tmp_path: Path) -> None:
    target = tmp_path / "copy.db"
    target.write_bytes(b"yesterday's backup")
    for args, says in [
        ([str(target), "--db", demo_db], "exists"),
        ([str(tmp_path / "x.db"), "--db", f"sqlite:///{tmp_path}/none.db"], "no SQLite store"),
        ([str(tmp_path / "x.db"), "--db", "postgresql://rebond@localhost/rebond"], "pg_basebackup"),
        ([str(tmp_path / "no" / "x.db"), "--db", demo_db], "no folder"),
    ]:
        done = rebond("backup", *args)
        assert done.returncode == 1 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert target.read_bytes() == b"yesterday's backup", "a refused backup touches nothing"
    assert rebond("backup", str(target), "--db", demo_db, "--replace").returncode == 0
    assert target.read_bytes().startswith(b"SQLite format 3")


def test_a_backup_onto_a_full_disk_fails_in_one_line_and_leaves_nothing(demo_db: str, small_disk: Callable[[str], Path]) -> None:
    disk = small_disk("1M")
    done = rebond("backup", str(disk / "copy.db"), "--db", demo_db)
    assert done.returncode == 1 and "disk is full" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(disk.iterdir()), "nothing is left on the disk"
