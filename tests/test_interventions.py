"""The pharmacy's interventions (SFPC): the problem, the proposal, the prescriber told, their answer once; on the web."""
from __future__ import annotations

import datetime as dt
import re
from urllib.parse import urlencode

import pytest

from rebond.clinical import messaging
from rebond.clinical.chart import patient_chart
from rebond.clinical.interventions import answer, figures, propose
from rebond.clinical.pharmacy import worklist
from rebond.clinical.prescribing import formulary, prescribe
from rebond.clinical.recording import InvalidForm
from rebond.clinical.records import Clinician, Entry, find, person_name, read, ref_id
from rebond.clinical.wards import group_wards
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store import open_store
from rebond.store.base import NotFound, PreconditionFailed, Store
from tests.server import RebondServer
from tests.web_client import csrf_of, entry_of, signed_in

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
PHARMACIST = Clinician("pharma", "Pharmacie (démo)", None, "H1-PHARMA")


@pytest.fixture
def seeded(store: Store) -> Store:
    seed_demo(store, seed=2, size=DemoSize(1, 1, 6), now=NOW - dt.timedelta(hours=20))
    return store


def a_prescription(store: Store) -> tuple[str, str, Clinician]:
    """A new prescription of an inpatient by a physician the store knows: (patient, prescription, the physician)."""
    stay = find(store, "Encounter", ("status", "in-progress"))[0]
    patient = stay["subject"]["reference"].split("/")[1]
    doctor = find(store, "Practitioner")[-1]
    prescriber = Clinician("doctor", person_name(doctor), str(doctor["id"]))
    line = next(m.id for m in formulary(store) if m.name == "Kétoprofène 100 mg comprimé LP")
    written = prescribe(store, patient, {"medication": line, "dose": "1 comprimé", "route": "Voie orale", "times": "8h, 20h",
                                         "entry": str(Entry.new())}, prescriber, NOW, [], stay["id"])
    return patient, written, prescriber


def test_an_intervention_tells_the_prescriber_who_answers_once_on_the_chart(seeded: Store) -> None:
    patient, written, prescriber = a_prescription(seeded)
    form = {"problem": "1.4", "proposal": "2.7", "text": "Clairance à 25 mL/min : 100 mg par jour au plus.", "urgent": "1",
            "entry": str(Entry.new())}
    issue_id = propose(seeded, written, form, PHARMACIST, NOW)
    assert propose(seeded, written, form, PHARMACIST, NOW) == issue_id, "the form sent twice: recorded once"
    issue = read(seeded, "DetectedIssue", issue_id)
    assert issue is not None and issue["status"] == "preliminary" and issue["severity"] == "high"
    assert issue["code"]["coding"][0] == {"system": "urn:rebond:sfpc-problem", "code": "1.4", "display": "Surdosage"}
    assert issue["mitigation"][0]["action"]["coding"][0]["code"] == "2.7" and issue["implicated"][0]["reference"] == f"MedicationRequest/{written}"
    assert issue["patient"] == {"reference": f"Patient/{patient}"} and issue["author"] == {"display": "Pharmacie (démo)"}

    # the prescriber's box: an urgent message from the pharmacy, about the patient and the intervention
    box = f"Practitioner/{prescriber.practitioner_id}"
    [talk] = [c for c in messaging.waiting_in(seeded, box, NOW) if c.first.patient_id == patient]
    assert talk.first.urgent and talk.first.author.startswith("Pharmacie") and "Surdosage" in talk.first.text
    assert "Proposition : Adaptation posologique." in talk.first.text and "Clairance à 25 mL/min" in talk.first.text

    [shown] = next(r for r in patient_chart(seeded, patient, NOW).prescriptions if r.id == written).interventions
    assert (shown.problem, shown.proposal, shown.outcome, shown.urgent) == ("1.4", "2.7", None, True)
    [listed] = [i for _w, patients in worklist(seeded) for items in patients for i in items if i.prescription.id == written]
    assert [iv.id for iv in listed.interventions] == [issue_id], "the pharmacy's list says it waits for an answer"

    done = answer(seeded, issue_id, True, prescriber, NOW + dt.timedelta(minutes=10))
    assert done.outcome == "accepted" and done.answered_by == prescriber.display
    with pytest.raises(PreconditionFailed):
        answer(seeded, issue_id, False, prescriber, NOW + dt.timedelta(minutes=11))  # a second answer leaves the first
    stored = read(seeded, "DetectedIssue", issue_id)
    assert stored is not None and stored["status"] == "final" and stored["mitigation"][1]["action"]["coding"][0]["code"] == "accepted"
    assert not [c for c in messaging.waiting_in(seeded, box, NOW) if c.first.patient_id == patient], "its message is answered"
    assert figures(seeded, NOW - dt.timedelta(days=30)) == type(figures(seeded, NOW))(1, 1, 0)


def test_an_intervention_says_what_is_missing_and_without_a_prescriber_goes_to_the_ward(seeded: Store) -> None:
    patient, written, _prescriber = a_prescription(seeded)
    with pytest.raises(InvalidForm) as refused:
        propose(seeded, written, {"problem": "9.9", "proposal": "", "text": "x" * 1001}, PHARMACIST, NOW)
    assert refused.value.problems == {"problem": "choose-one", "proposal": "choose-one", "text": "too-long:1000"}
    with pytest.raises(NotFound):
        propose(seeded, "no-such-prescription", {"problem": "1.6", "proposal": "2.2"}, PHARMACIST, NOW)
    # a prescription written by another system, naming no prescriber: the message goes to the patient's ward
    request = read(seeded, "MedicationRequest", written)
    assert request is not None
    del request["requester"]
    seeded.update("MedicationRequest", written, {k: v for k, v in request.items() if k != "meta"})
    issue_id = propose(seeded, written, {"problem": "1.6", "proposal": "2.2", "entry": str(Entry.new())}, PHARMACIST, NOW)
    issue = read(seeded, "DetectedIssue", issue_id)
    assert issue is not None
    note = read(seeded, "Communication", issue["extension"][0]["valueString"])
    assert note is not None and note["recipient"][0]["reference"].startswith("HealthcareService/") and note["priority"] != "urgent"


# -- the web app, over a real `rebond serve`


def test_the_pharmacist_intervenes_from_the_list_and_the_physician_accepts_on_the_chart(web: RebondServer) -> None:
    store = open_store(web.db)
    try:
        patient, written, prescriber = a_prescription(store)
        stay = find(store, "Encounter", ("subject", f"Patient/{patient}"), ("status", "in-progress"))[0]
        wards = {w.id for h in group_wards(store, count_inpatients=False) for w, _n in h.wards}
        ward = next(lid for place in stay["location"] if (lid := ref_id(place["location"], "Location")) in wards)
    finally:
        store.close()
    pharma = signed_in(web.base, "pharma")
    listing = pharma.get("/pharmacy").text
    link = re.search(r'href="(/pharmacy/interventions/new\?request=' + written + r'[^"]*)"', listing)
    assert link is not None and "Interventions pharmaceutiques sur 30 jours : proposées 0," in listing
    form = pharma.get(link.group(1).replace("&amp;", "&"))
    assert form.status_code == 200 and "Kétoprofène 100 mg" in form.text and "1.4 Surdosage" in form.text
    refused = pharma.post(link.group(1).replace("&amp;", "&"), data={"csrf": csrf_of(form.text), "entry": entry_of(form.text),
                                                                      "problem": "", "proposal": "2.7"})
    assert refused.status_code == 422 and "Choisissez" in refused.text
    sent = pharma.post(link.group(1).replace("&amp;", "&"), data={
        "csrf": csrf_of(form.text), "entry": entry_of(form.text), "problem": "1.6", "proposal": "2.3",
        "text": "Avec l'énoxaparine : risque hémorragique.", "next": "/pharmacy"})
    assert sent.status_code == 303 and sent.headers["location"].startswith("/pharmacy") and "saved=intervention" in sent.headers["location"]
    assert "sur 30 jours : proposées 1, acceptées 0, refusées 0, encore sans réponse 1." in pharma.get("/pharmacy").text
    assert pharma.get("/pharmacy/interventions/new?" + urlencode({"request": "nope"})).status_code == 404

    doctor = signed_in(web.base, "doctor")
    chart = doctor.get(f"/patients/{patient}").text
    assert "Intervention pharmaceutique" in chart and "Interaction" in chart and "en attente de la réponse du prescripteur" in chart
    issue = re.search(rf'action="/patients/{patient}/interventions/([0-9a-f-]{{36}})"', chart)
    assert issue is not None
    assert doctor.post(f"/patients/{patient}/interventions/{issue.group(1)}", data={"csrf": csrf_of(chart), "action": "maybe"}).status_code == 400
    nurse = signed_in(web.base, "nurse")
    assert "⚠ Pharmacie : Kétoprofène 100 mg comprimé LP" in nurse.get(f"/wards/{ward}").text, "on the census"
    dose = nurse.get(f"/patients/{patient}/administrations/{written}").text  # about to give a dose: told first
    assert "La pharmacie a signalé un problème auquel le prescripteur n&#39;a pas encore répondu : Interaction" in dose
    assert nurse.post(f"/patients/{patient}/interventions/{issue.group(1)}", data={"csrf": csrf_of(chart), "action": "accept"}).status_code == 403
    accepted = doctor.post(f"/patients/{patient}/interventions/{issue.group(1)}", data={"csrf": csrf_of(chart), "action": "accept"})
    assert accepted.status_code == 303
    after = doctor.get(f"/patients/{patient}").text
    assert "acceptée par le prescripteur" in after and 'value="accept"' not in after
    assert "La pharmacie a signalé" not in nurse.get(f"/patients/{patient}/administrations/{written}").text, "answered: no warning"
    assert "⚠ Pharmacie :" not in nurse.get(f"/wards/{ward}").text
    again = doctor.post(f"/patients/{patient}/interventions/{issue.group(1)}", data={"csrf": csrf_of(chart), "action": "refuse"})
    assert again.status_code == 303 and "saved=answered" in again.headers["location"]
    assert nurse.get(f"/patients/{patient}").status_code == 200 and "acceptée par le prescripteur" in nurse.get(f"/patients/{patient}").text
