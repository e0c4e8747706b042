"""The register of the lab's calls for critical results: whom each went to, who took it in hand, when; page and CSV."""
from __future__ import annotations

import csv
import datetime as dt
import io
import re

import httpx
import pytest

from rebond.clinical import messaging
from rebond.clinical.critical_register import CSV_COLUMNS, as_csv, register
from rebond.clinical.escalation import escalate
from rebond.clinical.records import Clinician, Entry, find, person_name
from rebond.hl7.intake import receive
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store import open_store
from rebond.store.base import Store
from tests.hl7_messages import oru
from tests.server import RebondServer, rebond
from tests.test_audit import patients_of, trail_of
from tests.test_critical import alerts, inpatient, rota, service
from tests.test_site import wait_for
from tests.web_client import csrf_of, entry_of, signed_in


@pytest.fixture
def hospital(store: Store) -> Store:
    seed_demo(store, seed=2, size=DemoSize(1, 1, 4))
    return store


def after(store: Store, call_id: str, minutes: float) -> dt.datetime:
    return messaging.message(find(store, "Communication", ("_id", call_id))[0]).sent + dt.timedelta(minutes=minutes)


def test_the_register_says_for_each_call_who_took_it_in_hand_and_after_how_long(hospital: Store) -> None:
    ward, patient = inpatient(hospital)
    doctor = find(hospital, "Practitioner")[-1]
    rota(hospital, ward, doctor, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    nurse = Clinician("nurse", "IDE", str(find(hospital, "Practitioner")[0]["id"]))
    ipp = str(patient.ipp)
    receive(hospital, oru("R1", ipp, "FR1"))
    receive(hospital, oru("R2", ipp, "FR2", potassium="2,1", flag="LL"))
    receive(hospital, oru("R3", ipp, "FR3", potassium="7,2"))
    taken, late, waiting = sorted(alerts(hospital, ipp), key=lambda c: str(c["payload"][0]["contentString"]))
    # 1: the ward's nurse takes it in hand after 4 minutes
    messaging.answer(hospital, str(taken["id"]), {"entry": str(Entry.new())}, nurse, after(hospital, taken["id"], 4), taken=True)
    # 2: no one for 15 minutes: passed on to the physician on call, who answers at 20
    assert len(escalate(hospital, after(hospital, late["id"], 16))) == 2, "the other one waits too"
    doctor_as = Clinician("doctor", person_name(doctor), str(doctor["id"]))
    messaging.answer(hospital, str(late["id"]), {"entry": str(Entry.new()), "text": "Je passe voir le patient."}, doctor_as,
                     after(hospital, late["id"], 20))
    # 3: passed on, and no one yet; 4: a patient in no ward: the lab's own box, and the lab rings the prescriber
    assert receive(hospital, oru("R4", "900000199", "FR4")).code == "AA"
    [own] = alerts(hospital, "900000199")
    lab = service(hospital, "H1-LAB")
    messaging.answer(hospital, str(own["id"]), {"as": lab}, Clinician("lab", "Laboratoire (démo)"), after(hospital, own["id"], 2),
                     taken=True)

    now = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    found = register(hospital, now - dt.timedelta(days=1), now)
    calls = {c.first.id: c for c in found.calls}
    assert set(calls) == {taken["id"], late["id"], waiting["id"], own["id"]}, "the calls, not their replies"
    assert [c.first.sent for c in found.calls] == sorted((c.first.sent for c in found.calls), reverse=True)

    first = calls[taken["id"]]
    assert first.state == "taken" and first.delay == dt.timedelta(minutes=4) and first.taken and first.taken.taken
    assert first.to_ward and first.passed_on is None and first.result.startswith("Potassium 2,1 mmol/L (LL") and not first.corrected
    assert "Prévenez" not in first.result
    second = calls[late["id"]]
    assert second.state == "taken-late" and second.delay == dt.timedelta(minutes=20)
    assert second.physician == person_name(doctor) and second.taken and not second.taken.taken and second.taken.author == person_name(doctor)
    third = calls[waiting["id"]]
    assert third.state == "passed-on" and third.taken is None and third.delay is None
    fourth = calls[own["id"]]
    assert not fourth.to_ward and fourth.state == "taken" and fourth.delay == dt.timedelta(minutes=2)
    assert messaging.waiting(hospital, lab, after(hospital, own["id"], 3)) == (0, 0), "the lab's « Je m'en occupe » counts"

    assert (len(found.calls), len(found.taken), found.in_time, found.waiting, found.passed_on) == (4, 3, 2, 1, 2)
    assert found.median_delay == dt.timedelta(minutes=4)

    # a hospital's: the calls of its lab and wards; another's has none
    [hospital_id] = messaging.hospitals(hospital)
    assert len(register(hospital, now - dt.timedelta(days=1), now, hospital=hospital_id).calls) == 4
    assert register(hospital, now - dt.timedelta(days=1), now, hospital="another").calls == []
    assert register(hospital, now - dt.timedelta(days=3), now - dt.timedelta(days=2)).calls == [], "the period"

    rows = list(csv.reader(io.StringIO(as_csv(found).removeprefix("\ufeff")), delimiter=";"))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 5
    line = dict(zip(CSV_COLUMNS, next(r for r in rows[1:] if r[-1] == late["id"]), strict=True))
    assert line["etat"] == "pris en charge après le délai" and line["delai_min"] == "20,0" and line["par"] == "réponse"
    assert line["transmis_a"] == person_name(doctor) and line["patient_id"] == patient.id and line["correction"] == ""

    # a correction that changes a critical value is a call of its own, marked so
    receive(hospital, oru("R5", ipp, "FR3", potassium="7,6", status="C"))
    [fixed] = [c for c in register(hospital, now - dt.timedelta(days=1), now).calls if c.corrected]
    assert fixed.result.startswith("Potassium 7,6 mmol/L (HH") and fixed.state == "waiting"


def test_the_register_in_the_web_app_and_its_csv_whose_patients_are_on_the_audit_trail(web: RebondServer,
                                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(web.db)
    try:
        _ward, patient = inpatient(store)
        assert receive(store, oru("W1", str(patient.ipp), "FW1")).code == "AA"
        assert receive(store, oru("W2", "900000299", "FW2")).code == "AA"  # a patient in no ward: the lab's own box
        [own] = alerts(store, "900000299")
        lab_box = service(store, "H1-LAB")
    finally:
        store.close()
    lab = signed_in(web.base, "lab")  # the lab's bench account: it works for the lab (H1-LAB), whose box is its own
    home = lab.get("/").text
    assert "1 urgent" in home, "the call to ring the prescriber shows in the lab's top bar"
    box = lab.get("/messages").text
    assert f'value="{lab_box}" selected' in box and "chip selected" in box, "the messages open on the lab's box, the account's"
    assert f'href="/messages/{own["id"]}' in box
    # the lab rings the prescriber, and says so with « Je m'en occupe »: for the lab, without choosing it
    talk = lab.get(f"/messages/{own['id']}")
    taken = lab.post(f"/messages/{own['id']}", data={"csrf": csrf_of(talk.text), "entry": entry_of(talk.text), "action": "take"})
    assert taken.status_code == 303, taken.text[-500:]
    assert "urgent" not in lab.get("/").text.split("</nav>")[0], "nothing waits for the lab any more"
    assert 'href="/critical-results"' in lab.get("/results").text
    page = lab.get("/critical-results")
    assert page.status_code == 200 and "Résultats critiques : les appels du laboratoire" in page.text
    h1 = re.search(r'<option value="([0-9a-f-]{36})" selected>', page.text)
    assert h1 is not None, "the lab's bench account sees its own hospital's calls first"
    every = lab.get("/critical-results", params={"hospital": ""}).text
    assert re.search(r'<option value="[0-9a-f-]{36}" selected>', every) is None, "« Tous les hôpitaux » chosen: all of them"
    assert f'href="/patients/{patient.id}#labs"' in page.text and "Potassium 6,4 mmol/L" in page.text
    assert page.text.count("en attente depuis") == 1, "no one has taken the ward's in hand; the lab has its own"
    assert "dans aucun service : le laboratoire appelle le prescripteur" in page.text and "« Je m&#39;en occupe »" in page.text
    assert lab.get("/critical-results", params={"days": "abc"}).status_code == 400
    assert lab.get("/critical-results", params={"hospital": "nowhere"}).status_code == 404
    sheet = lab.get("/critical-results.csv", params={"days": "7"})
    assert sheet.status_code == 200 and sheet.headers["content-type"].startswith("text/csv")
    assert "attachment" in sheet.headers["content-disposition"] and patient.id in sheet.text
    assert signed_in(web.base, "crisis").get("/critical-results").status_code == 403, "no patient data for the crisis cell"
    # the status page's figures of the last 24 hours, the same whichever process answers (read from the store)
    day = web.status()["critical_calls"]
    assert day == {"calls": 2, "taken": 1, "taken_in_time": 1, "waiting": 1, "passed_on": 0, "median_minutes": day["median_minutes"]}
    shown = signed_in(web.base, "crisis").get("/status").text
    assert "1 appel en attente" in shown and "2 appels du laboratoire en 24 h" in shown and "/critical-results" not in shown

    monkeypatch.setenv("REBOND_PASSWORD", "protection-2026")
    assert rebond("accounts", "add", "dpo2", "--role", "admin", "--name", "DPO", "--db", web.db).returncode == 0
    unknown = rebond("accounts", "add", "paillasse", "--role", "lab", "--service", "H9-LAB", "--db", web.db)
    assert unknown.returncode == 1 and "no active service with the code 'H9-LAB'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    made = rebond("accounts", "add", "paillasse", "--role", "lab", "--service", "h1-lab", "--db", web.db)
    assert made.returncode == 0 and "(lab, H1-LAB)" in made.stdout
    auditor = rebond("accounts", "token", "dpo2", "--label", "audit", "--db", web.db).stdout.strip()

    def registers() -> list[set[str]]:
        return [patients_of(e) for e in trail_of(web, auditor, agent="lab", patient=patient.id)
                if e["subtype"][0]["code"] == "critical-results-register"]

    wait_for(lambda: len(registers()) >= 2, 10)
    assert all(patient.id in named for named in registers()), "the page and the CSV name the patient"
    assert httpx.get(f"{web.base}/critical-results.csv", follow_redirects=False).status_code in (302, 303, 401), "signed in only"
