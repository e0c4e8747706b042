"""The disks a node writes to: watched and shown, and a real full disk drilled against a real server."""
from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from rebond.disk import FULL_BELOW, GIB, MIB, DiskWatch, hours_until_full, level_of
from rebond.hl7.mllp import END, START, ack_code
from rebond.hl7.simulate import Traffic
from tests.pg_harness import free_port
from tests.server import RebondServer

FHIR = {"Content-Type": "application/fhir+json"}


@pytest.mark.parametrize(("free", "total", "hours", "level"), [
    (500 * GIB, 1000 * GIB, None, "ok"),
    (500 * GIB, 1000 * GIB, 8 * 24.0, "ok"),
    (500 * GIB, 1000 * GIB, 6 * 24.0, "low"),  # plenty left, but gone within the week at this rate
    (90 * GIB, 1000 * GIB, None, "low"),  # under a tenth of the disk
    (500 * GIB, 1000 * GIB, 20.0, "critical"),  # gone by tomorrow
    (900 * MIB, 1000 * GIB, None, "critical"),
    (FULL_BELOW - 1, 1000 * GIB, None, "full"),
    (0, 1000 * GIB, None, "full"),
])
def test_a_disk_is_ok_low_critical_or_full_by_what_is_left_and_how_fast_it_goes(free: int, total: int, hours: float | None,
                                                                                 level: str) -> None:
    assert level_of(free, total, hours) == level


def test_the_time_left_is_read_from_the_rate_over_the_recorded_span() -> None:
    start = 1_000_000.0
    filling = [(start + 60 * i, 10 * GIB - i * 100 * MIB) for i in range(11)]  # 100 MiB a minute for 10 minutes
    expected = (10 * GIB - 1000 * MIB - FULL_BELOW) / (100 * MIB / 60) / 3600
    assert hours_until_full(filling) == pytest.approx(expected)
    assert hours_until_full(filling[:5]) is None, "four minutes are not enough to tell"
    assert hours_until_full([(start, 5 * GIB), (start + 3600, 6 * GIB)]) is None, "a disk getting emptier is not filling"
    assert hours_until_full([(start, 5 * GIB)]) is None


def test_the_watch_reads_real_disks_as_they_fill(small_disk: Callable[[str], Path]) -> None:
    disk, other = small_disk("256M"), small_disk("60M")
    now = [1_000_000.0]
    watch = DiskWatch({"store": disk / "store.db", "downtime packs": disk / "packs" / "not-made-yet", "exports": other},
                      every=60, clock=lambda: now[0])
    watch.look(record=True)
    first = watch.status()
    ours = next(d for d in first["disks"] if "store" in d["holds"])
    assert ours["holds"] == ["store", "downtime packs"], "two places on one disk are one disk"
    assert ours["path"] == str(disk) and ours["total_bytes"] == 256 * MIB
    assert ours["level"] == "critical" and ours["full_in_hours"] is None  # under 1 GiB, no rate known yet
    assert {d["level"] for d in first["disks"] if d["holds"] == ["exports"]} == {"full"}  # 60 MiB: under the floor
    assert first["level"] == "full", "the worst disk gives the level"

    with (disk / "filler").open("wb") as filler:
        for _minute in range(10):  # 12 MiB a minute for ten minutes
            filler.write(b"\0" * 12 * MIB)
            filler.flush()
            now[0] += 60
            watch.look(record=True)
    ours = next(d for d in watch.status()["disks"] if "store" in d["holds"])
    assert ours["free_bytes"] == pytest.approx(256 * MIB - 120 * MIB, abs=2 * MIB)
    assert ours["full_in_hours"] == pytest.approx((ours["free_bytes"] - FULL_BELOW) / (12 * MIB) / 60, rel=0.05)
    assert ours["level"] == "critical"

    alone = DiskWatch({"store": disk / "store.db"}, clock=lambda: now[0])
    assert alone.level_now() == "critical"
    (disk / "more").write_bytes(b"\0" * 100 * MIB)
    assert alone.level_now(max_age=3600) == "critical", "a recent look is not repeated"
    assert alone.level_now(max_age=0) == "full"
    (disk / "more").unlink()
    assert alone.level_now(max_age=0) == "critical"


def test_a_place_that_is_no_disk_shows_as_unknown_without_figures(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from rebond.app import create_app
    from rebond.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    watch = DiskWatch({"store": tmp_path / "store.db", "kernel": "/proc/not-a-disk"})
    try:
        with TestClient(create_app(store, disks=watch)) as client:
            facts = client.get("/status", headers={"Accept": "application/json"}).json()["disk"]
            page = client.get("/status", headers={"Accept-Language": "fr"}).text
    finally:
        store.close()
    kernel = next(d for d in facts["disks"] if d["holds"] == ["kernel"])
    assert kernel["level"] == "unknown" and kernel["free_bytes"] is None and kernel["problem"] == "not a disk (no size)"
    assert facts["level"] != "unknown", "a disk that can be read gives the level"
    assert "inconnu" in page and "— libres" not in page, page


def _mllp(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(START + message + END)
        data = b""
        while END not in data:
            data += conn.recv(65536)
    return data


def test_a_full_disk_refuses_writes_in_clear_words_loses_nothing_and_writes_resume_once_room_is_made(
        small_disk: Callable[[str], Path]) -> None:
    disk = small_disk("200M")
    mllp = free_port()
    server = RebondServer(f"sqlite:///{disk}/store.db", "--mllp-port", str(mllp)).start()
    admission = Traffic(seed=11).admission(dt.datetime.now(dt.UTC)).encode()
    try:
        facts = server.status()["disk"]
        assert facts["level"] == "critical" and facts["disks"][0]["holds"] == ["store"]  # 200 MiB: under 1 GiB
        with server.client() as client:
            before = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Avant"}]}, headers=FHIR)
            assert before.status_code == 201, before.text

            # something else on the machine takes every byte left
            with (disk / "filler").open("wb") as filler, pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * MIB)
                    filler.flush()
            assert server.status()["disk"]["level"] == "full"
            page = httpx.get(f"{server.base}/login", headers={"Accept-Language": "fr"}, timeout=10)
            assert "Le disque du serveur est plein" in page.text, "every page tells the staff"
            status = httpx.get(f"{server.base}/status", headers={"Accept-Language": "fr"}, timeout=10).text
            assert "Espace disque" in status and '<span class="chip late">plein</span>' in status, status

            refused = [client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Pendant", "given": ["x" * 2000] * 40}]},
                                   headers=FHIR) for _ in range(3)]
            for answer in refused:
                assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", answer.text
                issue = answer.json()["issue"][0]
                assert issue["code"] == "transient" and "disk of the store is full" in issue["diagnostics"], issue
            ack = _mllp(mllp, admission)
            assert ack_code(ack) == "AE" and b"disk of the store is full" in ack, ack  # the sender will send it again
            assert client.get(f"/Patient/{before.json()['id']}").status_code == 200, "reads go on"

            (disk / "filler").unlink()  # IT makes room: no restart needed
            assert server.status()["disk"]["level"] == "critical"
            after = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Apres"}]}, headers=FHIR)
            assert after.status_code == 201, after.text
            assert ack_code(_mllp(mllp, admission)) == "AA"
            assert ack_code(_mllp(mllp, admission)) == "AA", "a re-send is acknowledged again"

            def found(**params: str) -> int:
                return len(client.get("/Patient", params={**params, "_count": "50"}).json().get("entry", []))

            assert {family: found(family=family) for family in ("Avant", "Pendant", "Apres")} == {"Avant": 1, "Pendant": 0, "Apres": 1}
            assert found(_count="50") == 3, "the admission was applied once, and nothing refused was kept"
    finally:
        server.stop()
    log = server.log.read_text()
    assert "disk for store" in log and ": full," in log, log[-2000:]
