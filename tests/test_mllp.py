"""The MLLP listener of a real `rebond serve` process, with the `hl7` package's MLLP client as the sender."""
from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import html
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hl7.client
import httpx
import pytest

from rebond.hl7.mllp import END, MAX_SENDERS, OTHER_SENDERS, START, MllpServer, ack_code
from rebond.store import open_store
from tests.hl7_messages import oru, read_ack
from tests.pg_harness import free_port
from tests.server import RebondServer, rebond


@pytest.fixture
def listener(demo_db: str) -> Iterator[RebondServer]:
    port = free_port()
    server = RebondServer(demo_db, "--mllp-port", str(port)).start()
    server.mllp_port = port  # type: ignore[attr-defined]
    yield server
    server.stop()


def mllp_port(server: RebondServer) -> int:
    return int(server.mllp_port)  # type: ignore[attr-defined]


def test_a_result_sent_by_a_real_mllp_client_is_acknowledged_after_it_is_stored(listener: RebondServer) -> None:
    with hl7.client.MLLPClient("127.0.0.1", mllp_port(listener)) as client:
        ack = client.send_message(oru("M1", "910000001", "F1"))
    assert ack_code(ack) == "AA"
    found = httpx.get(f"{listener.fhir}/DiagnosticReport?identifier=F1", headers=listener.headers).json()
    assert found["entry"][0]["resource"]["status"] == "final"


def test_bytes_outside_frames_and_a_cut_frame_do_not_stop_the_next_message(listener: RebondServer) -> None:
    with socket.create_connection(("127.0.0.1", mllp_port(listener)), timeout=10) as conn:
        conn.sendall(b"\x00\xffnoise before any frame\r\n")
        conn.sendall(START + oru("M2", "910000002", "F2")[:60])  # cut by the next start: never acknowledged
        conn.sendall(frame_of(oru("M3", "910000002", "F3")))
        assert ack_code(read_ack(conn)) == "AA"
    reports = httpx.get(f"{listener.fhir}/DiagnosticReport?identifier=F2,F3", headers=listener.headers).json()
    assert [e["resource"]["identifier"][0]["value"] for e in reports["entry"]] == ["F3"]


def frame_of(payload: bytes) -> bytes:
    return START + payload + END


def test_garbage_in_a_frame_gets_a_negative_ack_and_waits_in_the_dead_letters(listener: RebondServer) -> None:
    with hl7.client.MLLPClient("127.0.0.1", mllp_port(listener)) as client:
        ack = client.send_message(b"\x13\x37 this is not an HL7 message")
    assert ack_code(ack) == "AR" and b"ERR|" in ack
    letters = rebond("hl7", "dead-letters", "--json", "--db", listener.db)
    assert letters.returncode == 0
    assert [json.loads(line)["reason"] for line in letters.stdout.splitlines()] == ["the message does not start with an MSH segment"]


def test_the_status_shows_each_senders_traffic_and_the_messages_waiting_for_it(listener: RebondServer) -> None:
    quiet = listener.status()["mllp"]
    assert quiet["senders"] == [] and quiet["dead_letters"] == 0 and quiet["waiting"] == 0
    with hl7.client.MLLPClient("127.0.0.1", mllp_port(listener)) as client:
        codes = [ack_code(client.send_message(message)) for message in
                 (oru("S1", "910000011", "F11"), oru("S2", "910000011", "F12"), b"\x13\x37 not HL7")]
    assert codes == ["AA", "AA", "AR"]
    facts = listener.status()["mllp"]
    assert facts["dead_letters"] == 1 and facts["waiting"] == 0
    senders = {s["sender"]: s for s in facts["senders"]}
    lab = senders["SIL|H1"]
    assert (lab["messages"], lab["accepted"], lab["refused"], lab["retry"]) == (2, 2, 0, 0)
    assert lab["last_at"].endswith("Z") and lab["last_refused_at"] is None
    assert (senders["?"]["messages"], senders["?"]["refused"]) == (1, 1), "what cannot be read is counted too"
    page = httpx.get(f"{listener.base}/status", headers={"Accept-Language": "fr"}, timeout=10).text
    shown = html.unescape(page)
    assert "Émetteur HL7 SIL|H1" in shown and "1 en attente de l'informatique" in shown and "Émetteur HL7 illisible" in shown, shown
    assert "2 messages depuis le démarrage" in shown and "1 refusé</span>" in shown, shown


def test_a_sender_changing_its_name_at_every_message_does_not_grow_the_status_without_end(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'tally.db'}")
    try:
        server = MllpServer(store, "127.0.0.1", 0)
        for n in range(MAX_SENDERS + 50):
            server._sender(f"APP{n}|H1").note("AA", 1.0)
        server._sender("APP0|H1").note("AR", 2.0)
        assert len(server.senders) == MAX_SENDERS + 1 and server.senders[OTHER_SENDERS].messages == 50
        assert (server.senders["APP0|H1"].messages, server.senders["APP0|H1"].refused) == (2, 1), "a known sender keeps its own"
    finally:
        store.close()


def test_a_connection_silent_past_the_idle_limit_is_closed_and_one_that_talks_is_kept(tmp_path: Path) -> None:
    """A sender that went away without closing (a half-open connection) holds nothing for ever: the listener closes a
    connection silent for `idle_timeout`, and only then; one that keeps sending under the limit stays open."""
    store = open_store(f"sqlite:///{tmp_path / 'idle.db'}")

    async def scenario() -> tuple[list[str], float]:
        server = MllpServer(store, "127.0.0.1", 0, idle_timeout=0.8)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            codes = []
            for n in range(4):  # 1.6 s in all, never 0.8 s silent
                writer.write(frame_of(oru(f"IDLE{n}", "910000020", f"FI{n}")))
                await writer.drain()
                codes.append(ack_code(await asyncio.wait_for(reader.readuntil(END), 30)))
                acked_at = time.monotonic()
                await asyncio.sleep(0.4)
            assert await asyncio.wait_for(reader.read(), 10) == b"", "closed by the listener"
            writer.close()
            return codes, time.monotonic() - acked_at
        finally:
            await server.stop()

    try:
        codes, closed_after = asyncio.run(scenario())
    finally:
        store.close()
    assert codes == ["AA"] * 4
    assert 0.6 <= closed_after <= 5.0  # silent 0.8 s since its last acknowledgement, not before


def test_a_message_far_over_the_size_limit_is_refused_and_kept_truncated(listener: RebondServer) -> None:
    huge = oru("BIG1", "910000003", "F4").replace("Hémolysé".encode(), b"X" * (3 * 1024 * 1024))
    with socket.create_connection(("127.0.0.1", mllp_port(listener)), timeout=30) as conn:
        conn.sendall(frame_of(huge))
        ack = read_ack(conn)
        assert ack_code(ack) == "AR" and b"over the 1048576-byte limit" in ack
        conn.sendall(frame_of(oru("M5", "910000003", "F5")))  # the connection carries on
        assert ack_code(read_ack(conn)) == "AA"


def test_a_wrongly_encoded_message_is_refused_with_the_reason(listener: RebondServer) -> None:
    latin1_claiming_utf8 = oru("ENC1", "910000004", "F6", charset="8859/1").replace(b"8859/1", b"UNICODE UTF-8")
    with hl7.client.MLLPClient("127.0.0.1", mllp_port(listener)) as client:
        ack = client.send_message(latin1_claiming_utf8)
        assert ack_code(ack) == "AR" and b"not valid UNICODE UTF-8" in ack
        assert ack_code(client.send_message(oru("ENC2", "910000004", "F7", charset="8859/1"))) == "AA"


def test_a_duplicate_is_acknowledged_again_and_applied_once(listener: RebondServer) -> None:
    message = oru("DUP1", "910000005", "F8")
    with hl7.client.MLLPClient("127.0.0.1", mllp_port(listener)) as client:
        assert ack_code(client.send_message(message)) == "AA"
        assert ack_code(client.send_message(message)) == "AA"
    history = httpx.get(f"{listener.fhir}/DiagnosticReport?identifier=F8", headers=listener.headers).json()
    report_id = history["entry"][0]["resource"]["id"]
    versions = httpx.get(f"{listener.fhir}/DiagnosticReport/{report_id}/_history", headers=listener.headers).json()
    assert versions["total"] == 1


def test_a_stalled_sender_does_not_hold_up_the_others(listener: RebondServer) -> None:
    stalled = socket.create_connection(("127.0.0.1", mllp_port(listener)), timeout=10)
    stalled.sendall(START + b"MSH|^~\\&|SLOW|H1|")  # half a message, then nothing
    try:
        acks: list[str] = []

        def sender(n: int) -> None:
            with hl7.client.MLLPClient("127.0.0.1", mllp_port(listener)) as client:
                for i in range(10):
                    acks.append(ack_code(client.send_message(oru(f"P{n}-{i}", f"92000{n:04d}", f"FP{n}-{i}"))))

        started = time.monotonic()
        threads = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert acks.count("AA") == 60 and time.monotonic() - started < 30
    finally:
        stalled.close()


def test_a_connection_dropped_mid_message_loses_nothing_acknowledged(listener: RebondServer) -> None:
    with hl7.client.MLLPClient("127.0.0.1", mllp_port(listener)) as client:
        assert ack_code(client.send_message(oru("DROP1", "910000006", "F9"))) == "AA"
    conn = socket.create_connection(("127.0.0.1", mllp_port(listener)), timeout=10)
    conn.sendall(START + oru("DROP2", "910000006", "F10")[:80])
    conn.close()
    found = httpx.get(f"{listener.fhir}/DiagnosticReport?identifier=F9,F10", headers=listener.headers).json()
    assert [e["resource"]["identifier"][0]["value"] for e in found["entry"]] == ["F9"]


def test_simulate_plays_admissions_and_results_to_a_listener(listener: RebondServer) -> None:
    result = rebond("hl7", "simulate", "--target", f"127.0.0.1:{mllp_port(listener)}", "--rate", "0", "--count", "60")
    assert result.returncode == 0, result.stderr
    assert "60 messages sent: 60 AA" in result.stdout
    admitted = httpx.get(f"{listener.fhir}/Patient?identifier=urn:oid:1.2.250.1.999.1.1|&_summary=count", headers=listener.headers)
    assert admitted.status_code == 200
    unreachable = rebond("hl7", "simulate", "--target", f"127.0.0.1:{free_port()}", "--count", "1")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def worker_pids(server: RebondServer) -> list[int]:
    """The server's MLLP processes: draft workers and the intake writer (its spawned children, the resource tracker aside)."""
    assert server.proc is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server.proc.pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_messages_are_worked_out_by_worker_processes_and_a_killed_worker_loses_nothing(demo_db: str) -> None:
    port = free_port()
    server = RebondServer(demo_db, "--mllp-port", str(port), "--mllp-workers", "2").start()
    try:
        with hl7.client.MLLPClient("127.0.0.1", port) as client:
            codes = [ack_code(client.send_message(oru(f"W{n}", "910000020", f"FW{n}"))) for n in range(6)]
        assert codes == ["AA"] * 6
        facts = server.status()["mllp"]
        assert facts["workers"]["processes"] == 2 and facts["workers"]["drafted"] >= 6 and facts["workers"]["failed"] == 0
        pids = worker_pids(server)
        assert pids, "the workers run as processes of their own"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        with hl7.client.MLLPClient("127.0.0.1", port) as client:  # the next messages: worked out here, then by new workers
            codes = [ack_code(client.send_message(oru(f"X{n}", "910000020", f"FX{n}"))) for n in range(6)]
        assert codes == ["AA"] * 6
        reports = httpx.get(f"{server.fhir}/DiagnosticReport?patient.identifier=910000020&_count=50", headers=server.headers).json()
        assert len(reports["entry"]) == 12
        facts = server.status()["mllp"]
        assert facts["workers"]["restarts"] >= 1 and facts["workers"]["writer"]["restarts"] >= 1
        assert set(worker_pids(server)).isdisjoint(pids)
        page = httpx.get(f"{server.base}/status", headers={"Accept-Language": "fr"}).text
        assert "Interface HL7 v2 (MLLP)" in page and "processus de travail" in page
    finally:
        server.stop()
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]


def test_a_worker_that_hangs_costs_time_not_messages(demo_db: str) -> None:
    port = free_port()
    server = RebondServer(demo_db, "--mllp-port", str(port), "--mllp-workers", "1").start()
    try:
        with hl7.client.MLLPClient("127.0.0.1", port) as client:
            assert ack_code(client.send_message(oru("H0", "910000022", "FH0"))) == "AA"
            writer = server.status()["mllp"]["workers"]["writer"]["pid"]
            (worker,) = [pid for pid in worker_pids(server) if pid != writer]
            os.kill(worker, signal.SIGSTOP)  # alive, its socket open, and silent
            started = time.monotonic()
            codes = [ack_code(client.send_message(oru(f"H{n}", "910000022", f"FH{n}"))) for n in range(1, 4)]
            waited = time.monotonic() - started
        assert codes == ["AA"] * 3
        assert 4 < waited < 30, "the message waits for the draft timeout, then the writer works it out itself"
        facts = server.status()["mllp"]["workers"]
        assert facts["restarts"] == 1 and facts["failed"] >= 1
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists():
            assert time.monotonic() < deadline, "the hung worker is ended"
            time.sleep(0.05)
        found = httpx.get(f"{server.fhir}/DiagnosticReport?patient.identifier=910000022&_count=50", headers=server.headers).json()
        assert len(found["entry"]) == 4
    finally:
        server.stop()


def test_the_intake_writer_killed_mid_stream_and_twice_in_a_row_is_replaced_and_every_message_is_stored_once(demo_db: str) -> None:
    """A writer killed mid-stream (messages in flight, some perhaps committed and not yet answered), then two in a row with
    the same messages in flight: those go the server process's way; every message is answered AA and stored once. For
    the two, the test holds the writers' file lock, so that no writer can commit (and answer) the messages in flight
    before it is killed: without it, a quick second writer won the race now and then."""
    port = free_port()
    server = RebondServer(demo_db, "--mllp-port", str(port), "--mllp-workers", "2").start()
    codes: list[str] = []
    acked = threading.Event()

    def send(prefix: str) -> None:
        with hl7.client.MLLPClient("127.0.0.1", port) as client:
            for n in range(150):
                codes.append(ack_code(client.send_message(oru(f"{prefix}{n}", "910000021", f"{prefix}F{n}"))))
                if len(codes) >= 40:
                    acked.set()

    def writer_facts() -> dict[str, Any]:
        return dict(server.status()["mllp"]["workers"]["writer"])

    def wait_for(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while not check(facts := writer_facts()):
            assert time.monotonic() < deadline, facts
            time.sleep(0.01)
        return facts

    lock = os.open(demo_db.removeprefix("sqlite:///") + "-writer.lock", os.O_RDWR)
    try:
        first = writer_facts()["pid"]
        senders = [threading.Thread(target=send, args=(prefix,)) for prefix in ("KA", "KB")]
        for sender in senders:
            sender.start()
        assert acked.wait(60)
        os.kill(first, signal.SIGKILL)  # mid-stream, whatever it was doing
        second = wait_for(lambda facts: facts["pid"] not in (first, None))["pid"]
        written = writer_facts()["written"]
        wait_for(lambda facts: facts["written"] >= written + 20)  # the second writer takes the stream on
        fcntl.flock(lock, fcntl.LOCK_EX)  # from here no writer commits: what is sent to one stays in flight
        wait_for(lambda facts: facts["in_flight"] == 2)  # each sender's next message
        os.kill(second, signal.SIGKILL)
        third = wait_for(lambda facts: facts["pid"] not in (first, second, None))["pid"]
        time.sleep(0.5)  # the messages in flight are sent again to the third writer, which cannot commit them
        os.kill(third, signal.SIGKILL)  # in flight through both: they go to the server process, which waits for the lock too
        wait_for(lambda facts: facts["restarts"] == 3 and facts["pid"] not in (first, second, third, None))
        fcntl.flock(lock, fcntl.LOCK_UN)
        for sender in senders:
            sender.join(120)
        assert codes == ["AA"] * 300, "every message answered AA, by a new writer or by the server itself"
        facts = writer_facts()
        assert facts["restarts"] == 3 and facts["pid"] not in (first, second, third) and facts["in_flight"] == 0
        assert server.log.read_text().count("MLLP message taken in by the server process") == 2, \
            "the two messages in flight through both writers went the server's way"
        found = httpx.get(f"{server.fhir}/DiagnosticReport?patient.identifier=910000021&_count=1000&_elements=identifier",
                          headers=server.headers).json()
        fillers = [i["value"] for e in found["entry"] for i in e["resource"]["identifier"] if i["value"].startswith("K")]
        assert len(fillers) == 300 and len(set(fillers)) == 300, "each result stored once"
    finally:
        os.close(lock)
        server.stop()


def test_a_critical_result_sent_over_mllp_waits_urgent_on_the_wards_census_and_in_its_box(listener: RebondServer) -> None:
    """The lab's call for a potassium at 6.4 mmol/L (hl7/critical.py), written in the result's commit: the ward's nurse sees it
    on the census and in every page's top bar, opens it from the box, and goes from it to the result in the chart."""
    from urllib.parse import quote

    from rebond.clinical.census import ward_census
    from rebond.clinical.messaging import ward_box
    from rebond.clinical.wards import group_wards
    from tests.web_client import signed_in

    store = open_store(listener.db)
    try:
        ward = group_wards(store)[0].wards[0][0]
        team = ward_box(store, ward.id)
        inpatient = next(b.patient for b in ward_census(store, ward.id, dt.datetime.now(dt.UTC)).beds if b.patient is not None)
    finally:
        store.close()
    assert team is not None and inpatient.ipp
    nurse = signed_in(listener.base, "nurse")
    assert "message à traiter" not in nurse.get(f"/wards/{ward.id}").text, "nothing waits before the result"
    with hl7.client.MLLPClient("127.0.0.1", mllp_port(listener)) as client:
        assert ack_code(client.send_message(oru("K1", inpatient.ipp, "FK1"))) == "AA"  # no PV1: the stay in progress
    census = nurse.get(f"/wards/{ward.id}").text
    assert "1 message à traiter (1 urgent)" in census and '<span class="chip late">1 urgent</span>' in census.split("</nav>")[0]
    box = nurse.get(f"/messages?box={quote(team.reference)}").text
    assert nurse.get("/messages").text.count("Potassium 6,4 mmol/L") == 1, "the top bar's link opens the box where it waits"
    assert 'class="flag">Résultat critique' in box and "Potassium 6,4 mmol/L (HH ; normales 3,5–5)" in box
    assert f'href="/patients/{inpatient.id}#labs">Voir le résultat dans le dossier' in box
    opened = nurse.get(re.findall(r'href="(/messages/[0-9a-f-]{36})[?"]', box)[0]).text
    assert f'href="/patients/{inpatient.id}#labs">Voir le résultat dans le dossier' in opened and "Je m&#39;en occupe" in opened
    chart = nurse.get(f"/patients/{inpatient.id}").text
    assert 'class="chip result critical" title="Résultat critique">Potassium 6,4' in chart


def test_a_critical_result_no_one_takes_in_hand_is_passed_on_to_a_physician_by_the_server(demo_db: str) -> None:
    """`rebond serve --escalate-after` (here 3 s for 15 min): the server's own round passes the call on, once."""
    port = free_port()
    server = RebondServer(demo_db, "--mllp-port", str(port), "--escalate-after", "0.05").start()
    try:
        from rebond.clinical.census import ward_census
        from rebond.clinical.wards import group_wards

        store = open_store(server.db)
        try:
            ward = group_wards(store)[0].wards[0][0]
            inpatient = next(b.patient for b in ward_census(store, ward.id, dt.datetime.now(dt.UTC)).beds
                             if b.patient is not None)
        finally:
            store.close()
        assert inpatient.ipp
        with hl7.client.MLLPClient("127.0.0.1", port) as client:
            assert ack_code(client.send_message(oru("K2", inpatient.ipp, "FK2"))) == "AA"
        category = "urn:rebond:communication-category|critical-result"

        def calls() -> list[dict[str, object]]:
            found = httpx.get(f"{server.fhir}/Communication", params={"category": category, "subject": f"Patient/{inpatient.id}"},
                              headers=server.headers).json()
            return [e["resource"] for e in found.get("entry", [])]

        deadline = time.monotonic() + 20
        while len(calls()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        first, passed = sorted(calls(), key=lambda c: "inResponseTo" in c)
        assert passed["inResponseTo"] == [{"reference": f"Communication/{first['id']}"}]
        assert str(passed["recipient"][0]["reference"]).startswith("Practitioner/")  # type: ignore[index]
        time.sleep(2.5)  # two more rounds: still once
        assert len(calls()) == 2
        status = httpx.get(f"{server.base}/status", headers={"Accept": "application/json"}).json()["critical_results"]
        assert status["passed_on"] == 1 and status["this_process"] and status["after_minutes"] == 0.05
    finally:
        server.stop()
