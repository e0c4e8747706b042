"""The pharmacy's validation of prescriptions: its list, « Valider » once per version, the chart, the roles."""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from rebond.clinical.chart import patient_chart
from rebond.clinical.pharmacy import validate, validations, worklist
from rebond.clinical.prescribing import formulary, prescribe, stop
from rebond.clinical.records import Clinician, Entry, find, read
from rebond.fhir import operations
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store import open_store
from rebond.store.base import PreconditionFailed, Store
from tests.server import RebondServer
from tests.web_client import csrf_of, signed_in

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DOCTOR = Clinician("doctor", "Dr MARTIN Paul", "p-martin")
PHARMACIST = Clinician("pharma", "Pharmacie (démo)")


@pytest.fixture
def seeded(store: Store) -> Store:
    seed_demo(store, seed=2, size=DemoSize(1, 1, 6), now=NOW - dt.timedelta(hours=20))
    return store


def waiting_ids(store: Store) -> set[str]:
    return {i.prescription.id for _ward, patients in worklist(store) for items in patients for i in items}


def test_the_pharmacy_validates_each_prescription_as_it_stands_once(seeded: Store) -> None:
    stay = find(seeded, "Encounter", ("status", "in-progress"))[0]
    patient = stay["subject"]["reference"].split("/")[1]
    line = next(m.id for m in formulary(seeded) if m.name == "Kétoprofène 100 mg comprimé LP")
    written = prescribe(seeded, patient, {"medication": line, "dose": "1 comprimé", "route": "Voie orale", "times": "20h",
                                          "entry": str(Entry.new())}, DOCTOR, NOW, [], stay["id"])
    listed = worklist(seeded)
    active = {r["id"] for r in find(seeded, "MedicationRequest", ("status", "active"))}
    assert written in waiting_ids(seeded) and waiting_ids(seeded) <= active, "the inpatients' active prescriptions, none validated yet"
    item = next(i for _w, patients in listed for items in patients for i in items if i.prescription.id == written)
    assert all(len({i.patient.id for i in items}) == 1 for _w, patients in listed for items in patients), "patient by patient"
    assert item.version == 1 and item.prescriber_ref == "Practitioner/p-martin" and item.ward.name
    pharmacy = read(seeded, "HealthcareService", str(item.pharmacy_ref).split("/")[1])
    assert pharmacy is not None and pharmacy["identifier"][0]["value"].endswith("-PHARMA"), "the message is written for the pharmacy"
    assert not next(r for r in patient_chart(seeded, patient, NOW).prescriptions if r.id == written).validated

    first = validate(seeded, written, 1, PHARMACIST, NOW + dt.timedelta(minutes=5))
    again = validate(seeded, written, 1, PHARMACIST, NOW + dt.timedelta(minutes=6))  # a double click, a second pharmacist
    assert first == again and first.by == "Pharmacie (démo)"
    tasks = find(seeded, "Task", ("focus", f"MedicationRequest/{written}"), ("code", "urn:rebond:task|prescription-validation"))
    assert len(tasks) == 1 and tasks[0]["input"][0]["valueInteger"] == 1 and tasks[0]["for"]["reference"] == f"Patient/{patient}"
    assert written not in waiting_ids(seeded)
    shown = next(r for r in patient_chart(seeded, patient, NOW + dt.timedelta(minutes=7)).prescriptions if r.id == written)
    assert shown.validated is not None and shown.validated.by == "Pharmacie (démo)"

    # corrected through the API (a dose changed by another system): a new version, to be validated again
    request = read(seeded, "MedicationRequest", written)
    assert request is not None
    request["dosageInstruction"][0]["text"] = "2 comprimés à 20:00"
    seeded.write(lambda tx: operations.update(tx, "MedicationRequest", written, {k: v for k, v in request.items() if k != "meta"}))
    assert written in waiting_ids(seeded)
    with pytest.raises(PreconditionFailed):
        validate(seeded, written, 1, PHARMACIST, NOW + dt.timedelta(minutes=8))  # the page showed version 1
    assert validations(seeded, [(written, 2)]) == {}
    stop(seeded, patient, written, {"reason": "Fin de traitement", "version": "2"}, DOCTOR, NOW + dt.timedelta(minutes=9))
    assert written not in waiting_ids(seeded), "a stopped prescription waits for no one"


def test_the_list_marks_a_prescription_that_meets_a_known_allergy(seeded: Store) -> None:
    marked = [i for _w, patients in worklist(seeded) for items in patients for i in items if i.alerts]
    assert marked, "the small demo holds a patient allergic to a medicine they are prescribed"
    assert all(i.prescription.medication for i in marked)


# -- the web app, over a real `rebond serve`


def test_a_pharmacist_validates_from_the_list_and_the_chart_says_so(web: RebondServer) -> None:
    pharma = signed_in(web.base, "pharma")
    page = pharma.get("/pharmacy")
    assert page.status_code == 200 and "Prescriptions à valider" in page.text and 'href="/pharmacy"' in page.text
    assert re.search(r'<option value="[0-9a-f-]{36}" selected>', page.text), "the first hospital's pharmacy sees its hospital first"
    forms = re.findall(r'name="request" value="([0-9a-f-]{36})">\s*<input type="hidden" name="version" value="(\d+)">', page.text)
    assert forms, "the demo's prescriptions wait for the pharmacy"
    request_id, version = forms[0]
    patient = httpx.get(f"{web.fhir}/MedicationRequest/{request_id}", headers=web.headers).json()["subject"]["reference"].split("/")[1]
    chart = pharma.get(f"/patients/{patient}").text
    assert "en attente de validation pharmaceutique" in chart
    stale = pharma.post("/pharmacy/validate", data={"csrf": csrf_of(page.text), "request": request_id, "version": str(int(version) + 1),
                                                     "next": "/pharmacy"})
    assert stale.status_code == 303 and stale.headers["location"] == "/pharmacy?saved=changed"
    assert "a changé depuis l&#39;affichage" in pharma.get(stale.headers["location"]).text or \
        "a changé depuis l'affichage" in pharma.get(stale.headers["location"]).text
    done = pharma.post("/pharmacy/validate", data={"csrf": csrf_of(page.text), "request": request_id, "version": version,
                                                    "next": "/pharmacy#top"})
    assert done.status_code == 303 and done.headers["location"] == "/pharmacy#top"
    assert f'name="request" value="{request_id}"' not in pharma.get("/pharmacy").text, "off the list"
    nurse = signed_in(web.base, "nurse")
    assert "validée par la pharmacie : Pharmacie (démo)" in nurse.get(f"/patients/{patient}").text
    assert nurse.get("/pharmacy").status_code == 403 and 'href="/pharmacy"' not in nurse.get("/").text
    assert nurse.post("/pharmacy/validate", data={"csrf": csrf_of(chart), "request": request_id, "version": version}).status_code == 403
    assert pharma.get(f"/patients/{patient}/prescriptions/new").status_code == 403, "the pharmacy does not prescribe"


def test_a_pharmacist_validates_a_patients_prescriptions_at_once_and_a_changed_one_is_shown_again(web: RebondServer) -> None:
    store = open_store(web.db)
    try:
        several = next(items for _w, patients in worklist(store) for items in patients if len(items) >= 3)
    finally:
        store.close()
    pharma = signed_in(web.base, "pharma")
    page = pharma.get("/pharmacy")
    assert "Valider les " in page.text
    first, *others = several
    data: list[tuple[str, str]] = [("csrf", csrf_of(page.text)), ("next", "/pharmacy")]
    data += [("request", first.prescription.id), ("version", str(first.version + 1))]  # changed since the page was shown
    data += [pair for i in others for pair in (("request", i.prescription.id), ("version", str(i.version)))]
    done = pharma.post("/pharmacy/validate", content=urlencode(data), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert done.status_code == 303 and done.headers["location"] == "/pharmacy?saved=changed"
    after = pharma.get("/pharmacy").text
    assert all(f'name="request" value="{i.prescription.id}"' not in after for i in others), "the others are validated"
    assert f'name="request" value="{first.prescription.id}"' in after, "the changed one waits, shown as it stands"


def test_a_cut_off_site_validates_and_the_same_validation_on_the_central_site_is_no_conflict(demo_db: str, tmp_path: Path) -> None:
    """A pharmacist validates at a site node cut off; meanwhile one on the central site validates the same prescription.
    When the link returns, both validations are there and nothing waits for a person to settle."""
    from tests import test_site as site_tests

    central = RebondServer(demo_db).start()
    site = site_tests.start_site(central, tmp_path, ("pharma-h1", "pharmacist", "Pharmacie H1"))
    try:
        store = open_store(central.db)
        try:
            both, alone = next(items for _w, patients in worklist(store) for items in patients if len(items) >= 2)[:2]
        finally:
            store.close()
        central.kill()
        site_tests.wait_for(lambda: site.status()["upstream_reachable"] is False, 10)
        at_site = signed_in(site.base, "pharma-h1")
        page = at_site.get("/pharmacy")
        for item in (both, alone):
            answer = at_site.post("/pharmacy/validate", data={"csrf": csrf_of(page.text), "request": item.prescription.id,
                                                               "version": str(item.version), "next": "/pharmacy"})
            assert answer.status_code == 303 and answer.headers["location"] == "/pharmacy"
        assert site.status()["journal_pending"] == 2

        central.start()
        store = open_store(central.db)
        try:
            validate(store, both.prescription.id, both.version, PHARMACIST, dt.datetime.now(dt.UTC))  # before the link returns
        finally:
            store.close()
        site_tests.wait_for(lambda: site.status()["journal_pending"] == 0, 30)
        assert site.status()["conflicts_open"] == 0
        store = open_store(central.db)
        try:
            done = validations(store, [(both.prescription.id, both.version), (alone.prescription.id, alone.version)])
            assert set(done) == {both.prescription.id, alone.prescription.id}
            assert done[alone.prescription.id].by == "Pharmacie H1", "the site's validation reached the central site"
        finally:
            store.close()
    finally:
        site.stop()
        central.stop()
