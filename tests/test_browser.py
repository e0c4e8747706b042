"""The web app in a real browser: Debian's Chromium driven by Playwright, screenshots kept as artifacts."""
from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from rebond.clinical.census import ward_census
from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.clinical.records import PatientSummary
from rebond.clinical.wards import Ward, group_wards
from rebond.store import open_store
from tests.server import RebondServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
# as root, in a sandbox with no internet: no setuid sandbox, no calls home
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = Path(os.environ.get("REBOND_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts")) / "browser"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            raise RuntimeError("Chromium is missing: `make test` installs the Debian package chromium")
        pytest.skip("Debian's chromium is not installed here (make system-deps)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def _potassium_for_a_patient_with_an_allergy(server: RebondServer) -> tuple[str, str, str]:
    """Post, as an analyzer would, a high potassium for an inpatient who has an allergy: (ward id, patient id, name)."""
    store = open_store(server.db)
    try:
        now = dt.datetime.now(dt.UTC)
        for hospital in group_wards(store):
            for ward, _count in hospital.wards:
                for line in ward_census(store, ward.id, now).beds:
                    if line.patient is not None and line.allergies:
                        patient, ward_id = line.patient, ward.id
                        break
                else:
                    continue
                break
            else:
                continue
            break
        else:
            raise AssertionError("the demo group has an inpatient with an allergy")
    finally:
        store.close()
    obs_id, report_id = str(uuid.uuid4()), str(uuid.uuid4())
    when = now.isoformat(timespec="seconds").replace("+00:00", "Z")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": f"Observation/{obs_id}"}, "resource": {
            "resourceType": "Observation", "id": obs_id, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}], "text": "Potassium"},
            "subject": {"reference": f"Patient/{patient.id}"}, "effectiveDateTime": when, "issued": when,
            "valueQuantity": {"value": 6.4, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
            "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "HH"}]}],
            "referenceRange": [{"low": {"value": 3.5, "unit": "mmol/L"}, "high": {"value": 5.0, "unit": "mmol/L"}}]}},
        {"request": {"method": "PUT", "url": f"DiagnosticReport/{report_id}"}, "resource": {
            "resourceType": "DiagnosticReport", "id": report_id, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}],
            "code": {"text": "Ionogramme sanguin"}, "subject": {"reference": f"Patient/{patient.id}"},
            "effectiveDateTime": when, "issued": when, "result": [{"reference": f"Observation/{obs_id}"}]}},
    ]}
    response = httpx.post(server.fhir, json=bundle, headers={"Content-Type": "application/fhir+json", **server.headers}, timeout=30)
    assert response.status_code == 200, response.text
    return ward_id, patient.id, patient.name


@pytest.fixture
def server(demo_db: str) -> Iterator[RebondServer]:
    """A Rebond server on a copy of the demo group, for one test; its screenshots go to ARTIFACTS."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    running = RebondServer(demo_db).start()
    yield running
    running.stop()


def _first_inpatient(server: RebondServer) -> tuple[Ward, PatientSummary]:
    """The demo's first ward and its first inpatient."""
    store = open_store(server.db)
    try:
        ward = group_wards(store)[0].wards[0][0]
        patient = next(b.patient for b in ward_census(store, ward.id, dt.datetime.now(dt.UTC)).beds if b.patient is not None)
        return ward, patient
    finally:
        store.close()


def _signed_in_page(browser: Browser, server: RebondServer, username: str) -> Page:
    """A page of the browser, signed in as `username` with the keyboard, in French."""
    page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="fr-FR")
    page.goto(f"{server.base}/login")
    page.fill("#username", username)
    page.fill("#password", "rebond-demo")
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "/login" not in url)
    return page


def test_a_nurse_finds_the_allergy_and_the_potassium_and_acknowledges_it(browser: object, server: RebondServer) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    ward_id, patient_id, name = _potassium_for_a_patient_with_an_allergy(server)
    page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="fr-FR")
    page.goto(f"{server.base}/")
    expect(page.locator("h1")).to_have_text("Connexion à Rebond")
    page.screenshot(path=ARTIFACTS / "01-login.png")
    page.fill("#username", "nurse")
    page.fill("#password", "rebond-demo")
    page.keyboard.press("Enter")  # keyboard only, as on a ward PC

    expect(page.locator("h1")).to_have_text("Services")
    page.screenshot(path=ARTIFACTS / "02-wards.png", full_page=True)
    page.click(f"a[href='/wards/{ward_id}']")
    row = page.locator("tr", has=page.locator(f"a[href='/patients/{patient_id}']"))
    expect(row.locator(".chip.allergy").first).to_be_visible()
    expect(row.locator(".chip.result")).to_contain_text("Potassium")
    page.screenshot(path=ARTIFACTS / "03-census.png", full_page=True)

    page.click(f"a.patient[href='/patients/{patient_id}']")
    banner = page.locator(".patient-banner")
    expect(banner).to_contain_text(name)
    expect(banner.locator(".chip.allergy").first).to_be_visible()
    potassium = page.locator("#labs tr", has=page.get_by_role("link", name="Potassium"))
    expect(potassium.locator(".flag")).to_have_text("HH")
    expect(potassium.locator("td.value")).to_contain_text("6,4")
    page.screenshot(path=ARTIFACTS / "04-chart.png", full_page=True)

    report = page.locator("ul.reports li", has_text="Ionogramme sanguin")
    report.get_by_role("button", name="Prendre en compte").click()
    expect(page.locator("ul.reports li", has_text="Ionogramme sanguin").locator(".ack")).to_contain_text("vu par")
    page.screenshot(path=ARTIFACTS / "05-acknowledged.png", full_page=True)

    page.get_by_role("link", name="English").click()
    expect(page.locator("#labs h2")).to_have_text("Lab results")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    page.screenshot(path=ARTIFACTS / "06-english.png", full_page=True)

    page.goto(f"{server.base}/patients/{patient_id}/vitals")
    page.fill("#temperature", "45")
    page.click("button.primary")
    expect(page.locator(".field-error")).to_contain_text("between 30 and 44")
    page.screenshot(path=ARTIFACTS / "07-invalid-form.png", full_page=True)

    page.set_viewport_size({"width": 768, "height": 1024})  # a ward tablet, upright
    page.goto(f"{server.base}/wards/{ward_id}")
    expect(page.locator(f"a.patient[href='/patients/{patient_id}']")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scrolling on a tablet"
    page.screenshot(path=ARTIFACTS / "08-census-tablet.png", full_page=True)
    page.close()


def test_the_lab_writes_to_a_ward_and_a_nurse_takes_it_in_hand(browser: object, server: RebondServer) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    ward, patient = _first_inpatient(server)
    ward_name = ward.name.split(" — ")[0]
    lab = _signed_in_page(browser, server, "lab")
    lab.get_by_role("link", name="Messages", exact=True).click()
    expect(lab.locator("main h2")).to_contain_text("Laboratoire de biologie médicale")  # the bench account's own: the lab's
    lab.get_by_role("link", name="Nouveau message").click()
    lab.select_option("#to", label=ward_name)
    lab.select_option("#as", label=f"Laboratoire de biologie médicale — {ward.hospital}")  # the bench account writes for the lab
    lab.fill("#text", f"Kaliémie de {patient.name} à 6,8 mmol/L : contrôle et ECG.")
    lab.check("input[name=urgent]")
    lab.get_by_role("button", name="Envoyer").click()
    expect(lab.locator(".notice")).to_have_text("Envoyé.")
    lab.screenshot(path=ARTIFACTS / "10-message-sent.png", full_page=True)

    nurse = _signed_in_page(browser, server, "nurse")
    nurse.goto(f"{server.base}/wards/{ward.id}")
    waiting = nurse.get_by_role("link", name="1 message à traiter (1 urgent)")
    expect(waiting).to_be_visible()
    nurse.screenshot(path=ARTIFACTS / "11-census-message.png", full_page=True)
    waiting.click()
    expect(nurse.locator(".conversation.waiting")).to_contain_text("Kaliémie")
    nurse.get_by_role("link", name="Ouvrir, répondre").click()
    nurse.get_by_role("button", name="Je m'en occupe").click()
    expect(nurse.locator("article.message.taken")).to_contain_text("S'en occupe.")
    nurse.screenshot(path=ARTIFACTS / "12-message-taken.png", full_page=True)
    nurse.goto(f"{server.base}/wards/{ward.id}")
    expect(nurse.get_by_role("link", name="Messages du service")).to_be_visible()

    lab.get_by_role("link", name="← Messages").click()  # back to the lab's box, which it wrote for
    expect(lab.locator("main h2")).to_contain_text("Laboratoire de biologie médicale")
    expect(lab.locator("main")).to_contain_text("Pris en charge : ")
    lab.close()
    nurse.close()


def test_a_physician_prescribes_is_stopped_by_an_allergy_maintains_it_then_stops_it(browser: object, server: RebondServer) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    _ward, patient = _first_inpatient(server)
    allergy = {"resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{patient.id}"}, "criticality": "high",
               "code": {"coding": [{"system": "http://snomed.info/sct", "code": "764146007"}], "text": "Pénicillines"}}
    assert httpx.post(f"{server.fhir}/AllergyIntolerance", json=allergy,
                      headers={"Content-Type": "application/fhir+json", **server.headers}).status_code == 201

    doctor = _signed_in_page(browser, server, "doctor")
    doctor.goto(f"{server.base}/patients/{patient.id}")
    doctor.get_by_role("link", name="Prescrire").click()
    doctor.select_option("#medication", label="Amoxicilline 1 g comprimé")
    doctor.fill("#dose", "1 comprimé")
    doctor.fill("#times", "8h, 16h, 0h")
    doctor.fill("#days", "7")
    doctor.get_by_role("button", name="Prescrire").click()
    expect(doctor.locator("#medication-problem")).to_contain_text("Allergie connue : Pénicillines")
    doctor.screenshot(path=ARTIFACTS / "13-prescription-allergy.png", full_page=True)
    doctor.check("input[name=despite_allergy]")
    doctor.get_by_role("button", name="Prescrire").click()
    expect(doctor.locator(".notice")).to_have_text("Prescription enregistrée.")
    row = doctor.locator("#prescriptions tr", has_text="Amoxicilline 1 g comprimé").last
    expect(row).to_contain_text("Allergie connue : Pénicillines")
    doctor.screenshot(path=ARTIFACTS / "14-prescription-chart.png", full_page=True)
    count = doctor.locator("#prescriptions tr", has_text="Amoxicilline 1 g comprimé").count()
    row.get_by_role("link", name="Arrêter").click()
    doctor.fill("#reason", "Allergie : remplacée par la ceftriaxone")
    doctor.get_by_role("button", name="Arrêter la prescription").click()
    expect(doctor.locator(".notice")).to_have_text("Prescription arrêtée.")
    expect(doctor.locator("#prescriptions tr", has_text="Amoxicilline 1 g comprimé")).to_have_count(count - 1)
    doctor.close()


def test_a_critical_potassium_reaches_the_nurse_from_every_page_and_the_pharmacy_validates_a_treatment(browser: object,
                                                                                                        demo_db: str) -> None:
    """The lab's analyzer sends a potassium at 6.4 mmol/L (HH) over MLLP: the nurse, on whatever page, sees « 1 urgent »,
    is led to the lab's call, to the result, and takes it in hand. Then the pharmacist validates a patient's treatment."""
    import hl7.client
    from playwright.sync_api import Browser, expect

    from rebond.hl7.mllp import ack_code
    from tests.hl7_messages import oru
    from tests.pg_harness import free_port

    assert isinstance(browser, Browser)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RebondServer(demo_db, "--mllp-port", str(port)).start()
    try:
        ward, patient = _first_inpatient(server)
        nurse = _signed_in_page(browser, server, "nurse")
        nurse.goto(f"{server.base}/procedures")  # reading the binder, far from the ward's census
        expect(nurse.locator("header.top .chip.late")).to_have_count(0)
        today = dt.datetime.now(HOSPITAL_TZ).strftime("%Y%m%d").encode()  # the test message's day made today's
        with hl7.client.MLLPClient("127.0.0.1", port) as client:
            assert ack_code(client.send_message(oru("B1", str(patient.ipp), "FB1").replace(b"20261123", today))) == "AA"
        nurse.reload()
        urgent = nurse.locator("header.top .chip.late")
        expect(urgent).to_have_text("1 urgent")
        nurse.screenshot(path=ARTIFACTS / "30-top-bar-urgent.png")
        nurse.get_by_role("link", name="Messages").first.click()
        call = nurse.locator(".conversation.waiting", has_text="Résultat critique")
        expect(call).to_contain_text("Potassium 6,4 mmol/L (HH ; normales 3,5–5)")
        nurse.screenshot(path=ARTIFACTS / "31-critical-call.png", full_page=True)
        call.get_by_role("link", name="Voir le résultat dans le dossier").click()
        expect(nurse.locator("#labs .chip.result.critical").first).to_contain_text("Potassium 6,4")
        expect(nurse.locator(".patient-banner")).to_contain_text(patient.name)
        nurse.screenshot(path=ARTIFACTS / "32-critical-in-chart.png")
        nurse.go_back()
        nurse.locator(".conversation.waiting", has_text="Résultat critique").get_by_role("link", name="Ouvrir, répondre").click()
        nurse.get_by_role("button", name="Je m'en occupe").click()
        expect(nurse.locator("article.message.taken")).to_be_visible()
        expect(nurse.locator("header.top .chip.late")).to_have_count(0)
        nurse.close()

        pharma = _signed_in_page(browser, server, "pharma")
        pharma.get_by_role("link", name="Pharmacie").click()
        expect(pharma.locator("h1")).to_have_text("Prescriptions à valider")
        several = pharma.locator("main td", has=pharma.get_by_role("button", name="Valider les")).first  # a patient's treatment
        href = several.locator("a.patient").get_attribute("href")
        pharma.screenshot(path=ARTIFACTS / "33-pharmacy.png")
        several.get_by_role("button", name="Valider les").click()
        expect(pharma.locator(f"main a.patient[href='{href}']")).to_have_count(0)
        pharma.goto(f"{server.base}{str(href).split('#')[0]}")
        expect(pharma.locator("#prescriptions")).to_contain_text("validée par la pharmacie : Pharmacie (démo)")
        expect(pharma.locator("#prescriptions")).not_to_contain_text("en attente de validation pharmaceutique")
        pharma.screenshot(path=ARTIFACTS / "34-validated-chart.png", full_page=True)
        pharma.close()
    finally:
        server.stop()
