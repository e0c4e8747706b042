"""The clinician web app over a real `rebond serve` process: sign-in, roles, pages, forms, errors."""
from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from rebond.clinical.census import ward_census
from rebond.clinical.wards import group_wards
from rebond.store import open_store
from tests.server import RebondServer, rebond
from tests.web_client import csrf_of, entry_of, signed_in


@pytest.fixture(scope="module")
def ward(web: RebondServer) -> dict[str, str]:
    """A ward of the demo and one of its inpatients (with their stay's first prescription)."""
    import datetime as dt

    store = open_store(web.db)
    try:
        ward = group_wards(store)[0].wards[0][0]
        census = ward_census(store, ward.id, dt.datetime.now(dt.UTC))
        line = next(b for b in census.beds if b.patient is not None)
        assert line.patient is not None
        from rebond.clinical.records import find

        request = find(store, "MedicationRequest", ("subject", f"Patient/{line.patient.id}"), ("status", "active"))[0]
        return {"ward": ward.id, "patient": line.patient.id, "name": line.patient.name, "ipp": line.patient.ipp or "",
                "birth": line.patient.birth_date.isoformat() if line.patient.birth_date else "", "request": request["id"]}
    finally:
        store.close()


def fhir_count(web: RebondServer, query: str) -> int:
    bundle = httpx.get(f"{web.fhir}/{query}&_summary=count", headers=web.headers, timeout=30).json()
    return int(bundle["total"])


def test_every_page_asks_for_sign_in_and_keeps_the_target(web: RebondServer, ward: dict[str, str]) -> None:
    response = httpx.get(f"{web.base}/wards/{ward['ward']}", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"/login?next=%2Fwards%2F{ward['ward']}"


def test_wrong_password_and_missing_csrf_are_refused(web: RebondServer) -> None:
    client = httpx.Client(base_url=web.base, follow_redirects=False)
    page = client.get("/login")
    wrong = client.post("/login", data={"username": "nurse", "password": "nope", "csrf": csrf_of(page.text)})
    assert wrong.status_code == 401 and "Identifiant ou mot de passe incorrect" in wrong.text
    no_token = httpx.post(f"{web.base}/login", data={"username": "nurse", "password": "rebond-demo"}, follow_redirects=False)
    assert no_token.status_code == 400 and "rebond_session" not in no_token.cookies


def test_sign_in_lands_on_the_page_asked_for(web: RebondServer, ward: dict[str, str]) -> None:
    client = httpx.Client(base_url=web.base, follow_redirects=False)
    page = client.get(f"/login?next=/wards/{ward['ward']}")
    response = client.post("/login", data={"username": "nurse", "password": "rebond-demo", "csrf": csrf_of(page.text),
                                           "next": f"/wards/{ward['ward']}"})
    assert response.status_code == 303 and response.headers["location"] == f"/wards/{ward['ward']}"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    census = client.get(f"/wards/{ward['ward']}")
    assert census.status_code == 200 and ward["name"] in census.text
    assert census.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in census.headers["content-security-policy"]


def test_a_redirect_target_never_leaves_the_site(web: RebondServer) -> None:
    client = httpx.Client(base_url=web.base, follow_redirects=False)
    page = client.get("/login")
    response = client.post("/login", data={"username": "nurse", "password": "rebond-demo", "csrf": csrf_of(page.text),
                                           "next": "//evil.example/"})
    assert response.headers["location"] == "/"


def test_roles_decide_what_a_user_sees_and_does(web: RebondServer, ward: dict[str, str]) -> None:
    admin = signed_in(web.base, "admin")
    assert admin.get(f"/patients/{ward['patient']}").status_code == 403
    assert admin.get("/").headers["location"] == "/status", "no ward list for IT: its home is the situation"
    assert admin.get("/admin/accounts").status_code == 200
    lab = signed_in(web.base, "lab")
    assert lab.get(f"/patients/{ward['patient']}").status_code == 200
    form = lab.get(f"/patients/{ward['patient']}")
    assert lab.post(f"/patients/{ward['patient']}/vitals", data={"csrf": csrf_of(form.text), "heart_rate": "80"}).status_code == 403
    nurse = signed_in(web.base, "nurse")
    assert nurse.get("/admin/accounts").status_code == 403


def test_unknown_patient_ward_and_page_are_404_pages(web: RebondServer) -> None:
    nurse = signed_in(web.base, "nurse")
    for path in ("/patients/no-such-patient", "/wards/no-such-ward", "/no/such/page"):
        response = nurse.get(path)
        assert response.status_code == 404, path
        assert "text/html" in response.headers["content-type"] and "Traceback" not in response.text
    assert httpx.get(f"{web.fhir}/Patient/nope", headers=web.headers).json()["resourceType"] == "OperationOutcome"


def test_a_form_without_its_csrf_token_writes_nothing(web: RebondServer, ward: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    before = fhir_count(web, f"Observation?subject=Patient/{ward['patient']}")
    response = nurse.post(f"/patients/{ward['patient']}/vitals", data={"heart_rate": "80", "csrf": "forged"})
    assert response.status_code == 403
    assert fhir_count(web, f"Observation?subject=Patient/{ward['patient']}") == before


def test_invalid_vitals_come_back_with_reasons_and_nothing_is_written(web: RebondServer, ward: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    form = nurse.get(f"/patients/{ward['patient']}/vitals")
    before = fhir_count(web, f"Observation?subject=Patient/{ward['patient']}")
    response = nurse.post(f"/patients/{ward['patient']}/vitals",
                          data={"csrf": csrf_of(form.text), "entry": entry_of(form.text), "heart_rate": "82", "temperature": "73,5",
                                "spo2": "abc"})
    assert response.status_code == 422
    assert "Doit être compris entre 30 et 44" in response.text and "Ce n&#39;est pas un nombre" in response.text
    assert 'value="82"' in response.text, "what was typed is shown again"
    assert entry_of(response.text) == entry_of(form.text), "the same filling of the form, until it is recorded"
    assert fhir_count(web, f"Observation?subject=Patient/{ward['patient']}") == before, "nothing half-written"


def test_valid_vitals_are_written_as_observations(web: RebondServer, ward: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    form = nurse.get(f"/patients/{ward['patient']}/vitals")
    before = fhir_count(web, f"Observation?subject=Patient/{ward['patient']}")
    sent = {"csrf": csrf_of(form.text), "entry": entry_of(form.text), "heart_rate": "131", "temperature": "38,9"}
    response = nurse.post(f"/patients/{ward['patient']}/vitals", data=sent)
    assert response.status_code == 303
    again = nurse.post(f"/patients/{ward['patient']}/vitals", data=sent)  # a double click, or a retry after a lost answer
    assert again.status_code == 303 and again.headers["location"] == response.headers["location"]
    assert fhir_count(web, f"Observation?subject=Patient/{ward['patient']}") == before + 2, "recorded once"
    found = httpx.get(f"{web.fhir}/Observation?subject=Patient/{ward['patient']}&code=http://loinc.org|8310-5&_sort=-date&_count=1",
                      headers=web.headers).json()
    latest = found["entry"][0]["resource"]
    assert latest["valueQuantity"]["value"] == 38.9 and latest["interpretation"][0]["coding"][0]["code"] == "H"
    assert latest["performer"][0]["display"], "who recorded it is on the record"


def test_an_administration_not_given_needs_a_reason(web: RebondServer, ward: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    url = f"/patients/{ward['patient']}/administrations/{ward['request']}"
    form = nurse.get(url)
    assert form.status_code == 200
    refused = nurse.post(url, data={"csrf": csrf_of(form.text), "outcome": "not-given", "reason": "", "time": "08:00"})
    assert refused.status_code == 422 and "Indiquez pourquoi" in refused.text
    saved = nurse.post(url, data={"csrf": csrf_of(form.text), "outcome": "not-given", "reason": "Patient au bloc", "time": "08:00"})
    assert saved.status_code == 303
    found = httpx.get(f"{web.fhir}/MedicationAdministration?request=MedicationRequest/{ward['request']}&status=not-done", headers=web.headers).json()
    assert any(e["resource"].get("statusReason", [{}])[0].get("text") == "Patient au bloc" for e in found.get("entry", []))


def test_acknowledging_a_result_is_recorded_once_as_a_task(web: RebondServer, ward: dict[str, str]) -> None:
    doctor = signed_in(web.base, "doctor")
    results = doctor.get(f"/results?ward={ward['ward']}&pending=1")
    assert results.status_code == 200
    report_ids = re.findall(r'action="/results/([^/]+)/acknowledge"', results.text)
    assert report_ids, "the demo has results waiting for acknowledgement"
    for _ in range(2):  # a double click acknowledges once
        response = doctor.post(f"/results/{report_ids[0]}/acknowledge", data={"csrf": csrf_of(results.text), "next": "/results"})
        assert response.status_code == 303
    tasks = httpx.get(f"{web.fhir}/Task?focus=DiagnosticReport/{report_ids[0]}&code=urn:rebond:task|result-acknowledgement",
                      headers=web.headers).json()
    assert len(tasks["entry"]) == 1 and tasks["entry"][0]["resource"]["status"] == "completed"
    after = doctor.get(f"/results?ward={ward['ward']}&pending=1")
    assert f"/results/{report_ids[0]}/acknowledge" not in after.text


def test_results_filter_rejects_a_bad_date_with_the_reason(web: RebondServer, ward: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    response = nurse.get(f"/results?ward={ward['ward']}&since=31/02/2026")
    assert response.status_code == 400 and "jj/mm/aaaa" in response.text


def test_patient_search_by_name_ipp_and_birth_date(web: RebondServer, ward: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    family = ward["name"].split()[0].lower()
    y, m, d = ward["birth"].split("-")
    for query in (family, ward["ipp"], f"{d}/{m}/{y}", f"{family} {d}/{m}/{y}"):
        page = nurse.get("/patients", params={"q": query})
        assert page.status_code == 200 and f"/patients/{ward['patient']}" in page.text, query
    assert "Aucun patient" in nurse.get("/patients", params={"q": "Zzyzx"}).text
    assert nurse.get("/patients", params={"q": "31/02/1950"}).status_code == 400


def test_english_is_one_click_away(web: RebondServer, ward: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    assert "Lit libre" in nurse.get(f"/wards/{ward['ward']}").text or "Médecin référent" in nurse.get(f"/wards/{ward['ward']}").text
    switched = nurse.get(f"/language/en?next=/wards/{ward['ward']}")
    assert switched.status_code == 303 and switched.headers["location"] == f"/wards/{ward['ward']}"
    english = nurse.get(f"/wards/{ward['ward']}")
    assert "Attending" in english.text and 'lang="en"' in english.text


def test_sign_out_ends_the_session(web: RebondServer) -> None:
    nurse = signed_in(web.base, "nurse")
    home = nurse.get("/")
    assert home.status_code == 200
    nurse.post("/logout", data={"csrf": csrf_of(home.text)})
    assert nurse.get("/").status_code == 303


def test_an_expired_session_goes_back_to_sign_in_keeping_the_target(demo_db: str) -> None:
    server = RebondServer(demo_db, "--session-idle-minutes", "0.03").start()  # about 2 s without use
    try:
        nurse = signed_in(server.base, "nurse")
        assert nurse.get("/").status_code == 200
        time.sleep(2.5)
        response = nurse.get("/results?ward=x")
        assert response.status_code == 303
        assert response.headers["location"] == "/login?next=%2Fresults%3Fward%3Dx&expired=1"
        assert "a expiré" in nurse.get(response.headers["location"]).text
    finally:
        server.stop()


def test_the_fhir_api_asks_for_a_token_or_a_session_and_checks_the_role(web: RebondServer, ward: dict[str, str]) -> None:
    anonymous = httpx.get(f"{web.fhir}/Patient/{ward['patient']}")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.json()["resourceType"] == "OperationOutcome" and ward["name"].split()[0] not in anonymous.text
    assert httpx.get(f"{web.fhir}/Patient/{ward['patient']}", headers={"Authorization": "Bearer rbd_forged"}).status_code == 401
    assert httpx.post(f"{web.fhir}/Patient", json={"resourceType": "Patient"}).status_code == 401
    assert httpx.get(f"{web.fhir}/metadata").status_code == 200, "the CapabilityStatement stays public"
    assert httpx.get(f"{web.fhir}/Patient/{ward['patient']}", headers=web.headers).status_code == 200
    nurse = signed_in(web.base, "nurse")  # the web session works for the API of the same site
    assert nurse.get(f"/fhir/Patient/{ward['patient']}").status_code == 200
    admin = signed_in(web.base, "admin")
    assert admin.get(f"/fhir/Patient/{ward['patient']}").status_code == 403, "IT sees no patient data"


def test_an_api_token_is_issued_once_and_checked_by_its_hash(demo_db: str) -> None:
    issued = rebond("accounts", "token", "nurse", "--db", demo_db)
    assert issued.returncode == 0
    token = issued.stdout.strip()
    assert token.startswith("rbd_")
    server = RebondServer(demo_db).start()
    try:
        assert httpx.get(f"{server.fhir}/Patient?_count=1", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        server.stop()
    assert token not in Path(demo_db.removeprefix("sqlite:///")).read_bytes().decode("latin-1")
    missing = rebond("accounts", "token", "nobody", "--db", demo_db)
    assert missing.returncode == 1 and "no account 'nobody'" in missing.stderr


def test_it_reads_and_replays_hl7_dead_letters_in_the_web_app(web: RebondServer) -> None:
    from rebond.hl7.intake import receive
    from tests.hl7_messages import adt

    store = open_store(web.db)
    try:
        refused = receive(store, adt("A02", "DL1", "940000001", "V-NOT-YET"))  # a transfer before its admission
        assert refused.code == "AR"
        admin = signed_in(web.base, "admin")
        page = admin.get("/admin/hl7")
        assert page.status_code == 200 and "never admitted" in page.text
        receive(store, adt("A01", "DL0", "940000001", "V-NOT-YET"))  # the admission arrives
    finally:
        store.close()
    replayed = admin.post(f"/admin/hl7/{refused.message_id}/replay", data={"csrf": csrf_of(page.text)})
    assert replayed.status_code == 303 and replayed.headers["location"] == "/admin/hl7?outcome=applied"
    assert "never admitted" not in admin.get("/admin/hl7").text
    assert signed_in(web.base, "nurse").get("/admin/hl7").status_code == 403


def test_every_account_reads_the_on_call_rota_the_staff_and_the_procedures_binder(web: RebondServer) -> None:
    assert httpx.get(f"{web.base}/directory", follow_redirects=False).status_code == 303, "signed in only"
    for who in ("nurse", "lab", "crisis"):  # no patient data: the crisis cell and the lab read it too
        client = signed_in(web.base, who)
        directory = client.get("/directory")
        assert directory.status_code == 200 and "Annuaire et gardes" in directory.text, who
        # the rota has a night shift (garde, 18:30-08:30) every day: it is now, or within the next 24 hours
        assert "Garde sur place" in directory.text and "Dr " in directory.text
        assert "Personnel de chaque service" in directory.text and "Infirmier(ère)" in directory.text
        staff = directory.text[directory.text.index("Personnel de chaque service"):]
        assert staff.index("Médecin") < staff.index("Infirmier(ère)"), "physicians first"
        binder = client.get("/procedures")
        assert binder.status_code == 200 and "Classeur des procédures" in binder.text
        assert "Prévenir la cellule de crise (poste 5555)." in binder.text and "hyperkaliémie" in binder.text
        assert binder.text.index("mode dégradé") < binder.text.index("hyperkaliémie"), "what to do when the IT fails first"


def test_a_nurse_writes_a_note_read_at_once_in_the_chart(web: RebondServer, ward: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    chart = nurse.get(f"/patients/{ward['patient']}")
    assert f'href="/patients/{ward["patient"]}/notes"' in chart.text
    form = nurse.get(f"/patients/{ward['patient']}/notes")
    assert form.status_code == 200 and 'value="nursing" checked' in form.text, "a nurse's note is the nurses' handover by default"
    empty = nurse.post(f"/patients/{ward['patient']}/notes", data={"csrf": csrf_of(form.text), "entry": entry_of(form.text),
                                                                   "kind": "nursing", "text": ""})
    assert empty.status_code == 422 and 'id="text-problem"' in empty.text
    sent = {"csrf": csrf_of(form.text), "entry": entry_of(form.text), "kind": "nursing", "text": "Nuit calme. Pansement refait à 5 h."}
    saved = nurse.post(f"/patients/{ward['patient']}/notes", data=sent)
    assert saved.status_code == 303 and saved.headers["location"].endswith("?saved=note#notes")
    assert nurse.post(f"/patients/{ward['patient']}/notes", data=sent).headers["location"] == saved.headers["location"]
    page = nurse.get(saved.headers["location"])
    assert "Note enregistrée." in page.text and "Nuit calme. Pansement refait à 5 h." in page.text
    assert fhir_count(web, f"DocumentReference?subject=Patient/{ward['patient']}&type=http://loinc.org|34746-8") == 1
    lab = signed_in(web.base, "lab")
    assert lab.get(f"/patients/{ward['patient']}/notes").status_code == 403, "the lab reads no notes and writes none"


def test_a_physician_prescribes_and_stops_and_a_nurse_sees_the_doses(web: RebondServer, ward: dict[str, str]) -> None:
    doctor = signed_in(web.base, "doctor")
    url = f"/patients/{ward['patient']}/prescriptions/new"
    assert f'href="{url}"' in doctor.get(f"/patients/{ward['patient']}").text
    form = doctor.get(url)
    assert form.status_code == 200 and "Tramadol 50 mg gélule" in form.text
    line = re.search(r'<option value="([0-9a-f-]{36})">Tramadol 50 mg gélule</option>', form.text)
    assert line is not None
    keys = {"csrf": csrf_of(form.text), "entry": entry_of(form.text)}
    refused = doctor.post(url, data={**keys, "medication": line.group(1), "dose": "1 gélule", "route": "Voie orale", "times": "matin"})
    assert refused.status_code == 422 and "Écrivez les heures ainsi" in refused.text
    assert fhir_count(web, f"MedicationRequest?subject=Patient/{ward['patient']}&code=http://www.whocc.no/atc|N02AX02") == 0
    sent = {**keys, "medication": line.group(1), "dose": "1 gélule", "route": "Voie orale", "times": "8h, 14h, 20h", "days": "3"}
    saved = doctor.post(url, data=sent)
    assert saved.status_code == 303 and saved.headers["location"].endswith("?saved=prescription#prescriptions")
    assert doctor.post(url, data=sent).headers["location"] == saved.headers["location"], "sent twice, recorded once"
    found = httpx.get(f"{web.fhir}/MedicationRequest?subject=Patient/{ward['patient']}&code=http://www.whocc.no/atc|N02AX02",
                      headers=web.headers).json()["entry"]
    assert len(found) == 1 and found[0]["resource"]["dosageInstruction"][0]["text"] == "1 gélule à 08:00, 14:00, 20:00 pendant 3 jours"
    request_id = found[0]["resource"]["id"]

    nurse = signed_in(web.base, "nurse")
    chart = nurse.get(f"/patients/{ward['patient']}").text
    assert "Tramadol 50 mg gélule" in chart and "Prescrire" not in chart, "the nurse reads it and does not prescribe"
    assert "nouvelle prescription à lire" in nurse.get(f"/wards/{ward['ward']}").text
    assert doctor.post(f"/patients/{ward['patient']}/prescriptions/{request_id}/acknowledge",
                       data={"csrf": csrf_of(form.text)}).status_code == 403, "a nurse's reading"
    read_it = nurse.post(f"/patients/{ward['patient']}/prescriptions/{request_id}/acknowledge", data={"csrf": csrf_of(chart)})
    assert read_it.status_code == 303
    assert "prise en compte par LEROY Hélène" in nurse.get(f"/patients/{ward['patient']}").text
    assert "nouvelle prescription à lire" not in nurse.get(f"/wards/{ward['ward']}").text
    assert nurse.get(url).status_code == 403 and nurse.get(f"/patients/{ward['patient']}/prescriptions/{request_id}/stop").status_code == 403

    stop_url = f"/patients/{ward['patient']}/prescriptions/{request_id}/stop"
    form = doctor.get(stop_url)
    assert form.status_code == 200 and 'name="version" value="1"' in form.text
    empty = doctor.post(stop_url, data={"csrf": csrf_of(form.text), "version": "1", "reason": ""})
    assert empty.status_code == 422 and 'id="reason-problem"' in empty.text
    stopped = doctor.post(stop_url, data={"csrf": csrf_of(form.text), "version": "1", "reason": "Nausées"})
    assert stopped.status_code == 303 and "Prescription arrêtée." in doctor.get(stopped.headers["location"]).text
    after = nurse.get(f"/patients/{ward['patient']}").text
    assert "<s>Tramadol 50 mg gélule</s> — arrêtée le" in after and "Nausées" in after, "listed as stopped, not as active"
    assert "Tramadol 50 mg gélule</strong>" not in after
    assert httpx.get(f"{web.fhir}/MedicationRequest/{request_id}", headers=web.headers).json()["status"] == "stopped"


def test_a_prescription_that_meets_a_known_allergy_needs_the_prescriber_to_maintain_it(web: RebondServer, ward: dict[str, str]) -> None:
    allergy = {"resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{ward['patient']}"}, "criticality": "high",
               "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
               "code": {"coding": [{"system": "http://snomed.info/sct", "code": "387406002"}], "text": "Sulfamides"}}
    made = httpx.post(f"{web.fhir}/AllergyIntolerance", json=allergy, headers={"Content-Type": "application/fhir+json", **web.headers})
    assert made.status_code == 201
    try:
        doctor = signed_in(web.base, "doctor")
        url = f"/patients/{ward['patient']}/prescriptions/new"
        form = doctor.get(url)
        line = re.search(r'<option value="([0-9a-f-]{36})">Cotrimoxazole[^<]*</option>', form.text)
        assert line is not None
        sent = {"csrf": csrf_of(form.text), "entry": entry_of(form.text), "medication": line.group(1), "dose": "1 comprimé",
                "route": "Voie orale", "times": "8h 20h"}
        warned = doctor.post(url, data=sent)
        assert warned.status_code == 422 and "Allergie connue : Sulfamides" in warned.text and 'name="despite_allergy"' in warned.text
        assert doctor.post(url, data={**sent, "despite_allergy": "yes"}).status_code == 303
        chart = doctor.get(f"/patients/{ward['patient']}").text
        assert "Allergie connue : Sulfamides" in chart
        request = httpx.get(f"{web.fhir}/MedicationRequest?subject=Patient/{ward['patient']}&code=http://www.whocc.no/atc|J01EE01",
                            headers=web.headers).json()["entry"][0]["resource"]
        issues = httpx.get(f"{web.fhir}/DetectedIssue?implicated=MedicationRequest/{request['id']}", headers=web.headers).json()
        assert len(issues["entry"]) == 1
        nurse = signed_in(web.base, "nurse")
        given = nurse.get(f"/patients/{ward['patient']}/administrations/{request['id']}")
        assert "Allergie connue : Sulfamides" in given.text, "the nurse about to give it is warned too"
        census = nurse.get(f"/wards/{ward['ward']}").text
        assert "⚠ Allergie : Cotrimoxazole" in census and "nouvelle prescription" in census, "the census shows both"
    finally:
        httpx.delete(f"{web.fhir}/AllergyIntolerance/{made.json()['id']}", headers=web.headers)
