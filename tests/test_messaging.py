"""Internal messaging over the store (both engines): who writes to whom, conversations, « pris en compte », once only."""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from rebond.clinical.census import ward_census
from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.clinical.messaging import (
    Box,
    about_patient,
    answer,
    conversation,
    conversations,
    own_boxes,
    send,
    services,
    waiting,
    ward_box,
)
from rebond.clinical.recording import InvalidForm
from rebond.clinical.records import Clinician, Entry, find
from rebond.clinical.wards import group_wards
from rebond.seed.demo import DemoSize, SeedReport, seed_demo
from rebond.store import open_store
from rebond.store.base import NotFound, Store
from tests import test_site as site_tests
from tests.server import RebondServer, rebond
from tests.web_client import csrf_of, entry_of, signed_in

NOW = dt.datetime(2026, 11, 23, 9, 30, tzinfo=HOSPITAL_TZ)
LAB = Clinician("lab", "Laboratoire (démo)", None)  # an account that stands for no one: it writes for a service


@pytest.fixture
def group(store: Store) -> tuple[Store, SeedReport]:
    return store, seed_demo(store, seed=2, size=DemoSize(2, 2, 4), now=NOW)


def _people(report: SeedReport) -> tuple[Clinician, Clinician]:
    (doctor_id, doctor), (nurse_id, nurse) = report.staff["doctor"], report.staff["nurse"]
    return Clinician("doctor", doctor, doctor_id), Clinician("nurse", nurse, nurse_id)


def _service(store: Store, code: str) -> Box:
    return next(b for b in services(store) if b.code == code)


def test_every_ward_has_a_team_and_every_hospital_a_lab_and_a_pharmacy(group: tuple[Store, SeedReport]) -> None:
    store, _report = group
    codes = {b.code for b in services(store)}
    assert {"H1-LAB", "H1-PHARMA", "H2-LAB", "H2-PHARMA"} <= codes
    wards = [w for w in find(store, "Location") if w.get("alias")]
    assert len(wards) == 4
    for ward in wards:
        team = ward_box(store, ward["id"])
        assert team is not None and team.code == ward["alias"][0] and team.hospital in team.name


def test_a_nurse_has_her_own_box_and_her_ward_s(group: tuple[Store, SeedReport]) -> None:
    store, report = group
    _doctor, nurse = _people(report)
    mine = own_boxes(store, nurse)
    assert mine[0].reference == f"Practitioner/{nurse.practitioner_id}" and not mine[0].is_service
    assert [b.code for b in mine[1:]] == ["H1-CARDIO"], "the ward of her PractitionerRole"
    assert own_boxes(store, LAB) == [], "an account that stands for no one has no box of its own"


def test_a_message_waits_until_someone_other_than_its_author_takes_it(group: tuple[Store, SeedReport]) -> None:
    store, report = group
    doctor, nurse = _people(report)
    ward, lab = _service(store, "H1-CARDIO"), _service(store, "H1-LAB")
    patient = find(store, "Patient")[0]
    first = send(store, {"to": ward.reference, "text": "Kaliémie à 6,8 mmol/L, contrôle demandé", "urgent": "1", "as": lab.reference,
                         "patient": patient["id"]}, LAB, NOW)
    assert waiting(store, ward.reference, NOW) == (1, 1)
    assert waiting(store, lab.reference, NOW) == (0, 0), "what a box sent does not wait for it"

    # the lab adds a word: still waiting, its author answered itself
    answer(store, first, {"text": "Échantillon non hémolysé.", "as": lab.reference}, LAB, NOW + dt.timedelta(minutes=1))
    assert waiting(store, ward.reference, NOW) == (1, 1)

    answer(store, first, {}, nurse, NOW + dt.timedelta(minutes=3), taken=True)
    assert waiting(store, ward.reference, NOW) == (0, 0)
    talk = conversation(store, first)
    assert talk.taken_by is not None and talk.taken_by.author == nurse.display and talk.taken_by.taken
    assert [m.text for m in talk.after] == ["Échantillon non hémolysé.", ""]
    assert talk.first.urgent and talk.first.patient_id == patient["id"] and patient["name"][0]["family"].upper() in talk.first.patient

    # the physician answers: the answer goes to the lab and the ward, and is in the lab's box, in the same conversation
    reply = answer(store, first, {"text": "Je passe voir le patient."}, doctor, NOW + dt.timedelta(minutes=5))
    stored = find(store, "Communication", ("_id", reply))[0]
    assert {r["reference"] for r in stored["recipient"]} == {lab.reference, ward.reference}
    assert stored["inResponseTo"] == [{"reference": f"Communication/{first}"}]
    assert stored["recipient"][0]["display"] == lab.name, "a service that wrote is answered by its name"
    lab_box = conversations(store, lab.reference, NOW + dt.timedelta(minutes=6))
    assert [c.first.id for c in lab_box] == [first] and len(lab_box[0].after) == 3
    assert conversation(store, reply).first.id == first, "any message of a conversation opens all of it"
    assert [c.first.id for c in about_patient(store, patient["id"], NOW)] == [first]


def test_a_person_writes_to_a_person_and_finds_it_in_both_boxes(group: tuple[Store, SeedReport]) -> None:
    store, report = group
    doctor, nurse = _people(report)
    sent = send(store, {"to": f"Practitioner/{doctor.practitioner_id}", "text": "Pouvez-vous rappeler la famille du lit 4 ?"}, nurse, NOW)
    assert [c.first.id for c in conversations(store, f"Practitioner/{doctor.practitioner_id}", NOW)] == [sent]
    assert [c.first.id for c in conversations(store, f"Practitioner/{nurse.practitioner_id}", NOW)] == [sent]
    assert waiting(store, f"Practitioner/{doctor.practitioner_id}", NOW) == (1, 0)
    stored = find(store, "Communication", ("_id", sent))[0]
    assert stored["sender"] == {"reference": f"Practitioner/{nurse.practitioner_id}", "display": nurse.display}
    assert stored["priority"] == "routine" and "subject" not in stored
    # a week later the box no longer lists it
    assert conversations(store, f"Practitioner/{doctor.practitioner_id}", NOW + dt.timedelta(days=8)) == []


def test_a_refused_message_says_why_and_writes_nothing(group: tuple[Store, SeedReport]) -> None:
    store, report = group
    _doctor, nurse = _people(report)
    ward = _service(store, "H1-CARDIO")
    with pytest.raises(InvalidForm) as refused:
        send(store, {"to": "", "text": " "}, nurse, NOW)
    assert refused.value.problems == {"to": "choose-one", "text": "required"}
    with pytest.raises(InvalidForm) as refused:
        send(store, {"to": "Location/elsewhere", "text": "x" * 2001}, nurse, NOW)
    assert refused.value.problems == {"to": "choose-one", "text": "too-long:2000"}
    with pytest.raises(InvalidForm) as refused:
        send(store, {"to": ward.reference, "text": "Bonjour"}, LAB, NOW)
    assert refused.value.problems == {"as": "choose-one"}, "an account that stands for no one says which service it writes for"
    with pytest.raises(InvalidForm) as refused:
        send(store, {"to": ward.reference, "text": "Bonjour", "as": f"Practitioner/{nurse.practitioner_id}"}, LAB, NOW)
    assert refused.value.problems == {"as": "choose-one"}, "it cannot write as a person"
    with pytest.raises(NotFound):
        send(store, {"to": ward.reference, "text": "Bonjour", "patient": "nobody"}, nurse, NOW)
    with pytest.raises(NotFound):
        answer(store, "nothing-here", {"text": "?"}, nurse, NOW)
    assert find(store, "Communication") == []


def test_a_message_sent_twice_is_recorded_once(group: tuple[Store, SeedReport]) -> None:
    store, report = group
    _doctor, nurse = _people(report)
    ward = _service(store, "H1-CARDIO")
    form = {"to": ward.reference, "text": "Le chariot d'urgence est vérifié.", "entry": str(Entry.new())}
    first = send(store, form, nurse, NOW)
    assert send(store, form, nurse, NOW + dt.timedelta(seconds=2)) == first
    taken = {"entry": str(Entry.new())}
    one = answer(store, first, taken, nurse, NOW, taken=True)
    assert answer(store, first, taken, nurse, NOW, taken=True) == one
    assert len(find(store, "Communication")) == 2


# -- the web app, over a real `rebond serve`


@pytest.fixture(scope="module")
def places(web: RebondServer) -> dict[str, str]:
    """The first ward's service, the lab's, and one of the ward's inpatients."""
    store = open_store(web.db)
    try:
        ward = group_wards(store)[0].wards[0][0]
        team = ward_box(store, ward.id)
        assert team is not None
        patient = next(b.patient for b in ward_census(store, ward.id, dt.datetime.now(dt.UTC)).beds if b.patient is not None)
        lab = next(b for b in services(store) if b.code.endswith("-LAB") and b.hospital == ward.hospital)
        return {"ward": ward.id, "team": team.reference, "lab": lab.reference, "patient": patient.id, "name": patient.name}
    finally:
        store.close()


def test_the_lab_warns_a_ward_which_sees_it_and_takes_it_in_hand(web: RebondServer, places: dict[str, str]) -> None:
    lab = signed_in(web.base, "lab")
    form = lab.get(f"/messages/new?patient={places['patient']}&as={quote(places['lab'])}")
    assert form.status_code == 200 and places["name"] in form.text and "Nouveau message" in form.text
    sent = lab.post("/messages/new", data={"csrf": csrf_of(form.text), "entry": entry_of(form.text), "to": places["team"],
                                           "as": places["lab"], "patient": places["patient"], "urgent": "1",
                                           "text": "Kaliémie à 6,8 mmol/L : contrôle et ECG."})
    assert sent.status_code == 303 and "?sent=1&box=" in sent.headers["location"]
    again = lab.post("/messages/new", data={"csrf": csrf_of(form.text), "entry": entry_of(form.text), "to": places["team"],
                                            "as": places["lab"], "patient": places["patient"], "urgent": "1",
                                            "text": "Kaliémie à 6,8 mmol/L : contrôle et ECG."})
    assert again.headers["location"] == sent.headers["location"], "a double click sends it once"

    nurse = signed_in(web.base, "nurse")
    census = nurse.get(f"/wards/{places['ward']}")
    assert "1 message à traiter (1 urgent)" in census.text
    assert re.search(r'href="/messages" title="\d+ conversations? vous attend.*?<span class="chip late">1 urgent</span>', census.text,
                     re.S), "the top bar of every page says it, whatever page the nurse is on"
    box = nurse.get(f"/messages?box={quote(places['team'])}")
    assert box.status_code == 200 and "1 message à traiter" in box.text and "Kaliémie à 6,8" in box.text
    assert 'class="flag">Urgent' in box.text
    page = nurse.get(sent.headers["location"].split("?")[0])
    assert "Personne ne s&#39;en occupe encore." in page.text or "Personne ne s'en occupe encore." in page.text
    taken = nurse.post(sent.headers["location"].split("?")[0], data={"csrf": csrf_of(page.text), "entry": entry_of(page.text),
                                                                     "action": "take", "text": ""})
    assert taken.status_code == 303
    after = nurse.get(f"/wards/{places['ward']}").text
    assert "message à traiter" not in after and '<span class="chip late">' not in after.split("</nav>")[0], "taken: no longer urgent"
    chart = nurse.get(f"/patients/{places['patient']}")
    assert "Messages concernant ce patient" in chart.text and "Kaliémie à 6,8" in chart.text and "Pris en charge" in chart.text

    # the lab sees who has it in hand, in its own box
    lab_box = lab.get(f"/messages?box={quote(places['lab'])}")
    assert "Pris en charge" in lab_box.text and "Kaliémie à 6,8" in lab_box.text

    # who read and wrote messages about the patient is on the audit trail
    def trail() -> list[dict[str, object]]:
        listed = rebond("audit", "list", "--patient", places["patient"], "--json", "--db", web.db).stdout
        return [json.loads(line) for line in listed.splitlines()]

    site_tests.wait_for(lambda: {("lab", "message"), ("nurse", "messages"), ("nurse", "message")}
                        <= {(line["agent"], line["what"]) for line in trail()}, 5)


def test_a_message_form_with_problems_says_them_in_french_and_sends_nothing(web: RebondServer, places: dict[str, str]) -> None:
    nurse = signed_in(web.base, "nurse")
    form = nurse.get("/messages/new")
    refused = nurse.post("/messages/new", data={"csrf": csrf_of(form.text), "entry": entry_of(form.text), "to": "", "text": ""})
    assert refused.status_code == 422
    assert "Rien n&#39;a été envoyé" in refused.text or "Rien n'a été envoyé" in refused.text
    assert 'id="to-problem"' in refused.text and 'id="text-problem"' in refused.text
    no_csrf = nurse.post("/messages/new", data={"entry": entry_of(form.text), "to": places["team"], "text": "Bonjour"})
    assert no_csrf.status_code == 403


@pytest.mark.parametrize("username", ["admin", "crisis"])
def test_messages_are_for_the_care_staff_and_the_lab(web: RebondServer, username: str) -> None:
    client = signed_in(web.base, username)
    assert client.get("/messages").status_code == 403
    assert 'href="/messages"' not in client.get("/status").text


def test_a_cut_off_site_takes_messages_and_the_central_site_gets_them_back(demo_db: str, tmp_path: Path) -> None:
    central = RebondServer(demo_db).start()
    site = site_tests.start_site(central, tmp_path, ("nurse", "nurse", "LEROY Hélène"))  # an account that stands for no one
    try:
        store = open_store(central.db)
        try:
            ward = next(b for b in services(store) if b.code.startswith("H1-") and not b.code.endswith(("-LAB", "-PHARMA")))
            lab = next(b for b in services(store) if b.code == "H1-LAB")
        finally:
            store.close()
        central.kill()
        site_tests.wait_for(lambda: site.status()["upstream_reachable"] is False, 10)

        nurse = signed_in(site.base, "nurse")
        form = nurse.get(f"/messages/new?as={quote(ward.reference)}")
        assert "Ce site est coupé du site central" in form.text
        sent = nurse.post("/messages/new", data={"csrf": csrf_of(form.text), "entry": entry_of(form.text), "to": lab.reference,
                                                 "as": ward.reference, "text": "Tubes de gaz du sang partis par coursier."})
        assert sent.status_code == 303, "the site takes a message while cut off"
        message_id = sent.headers["location"].split("?")[0].rsplit("/", 1)[1]
        assert "Tubes de gaz du sang" in nurse.get(f"/messages?box={quote(lab.reference)}").text, "shown at the site at once"
        assert site.status()["journal_pending"] == 1

        central.start()
        site_tests.wait_for(lambda: site.status()["journal_pending"] == 0, 30)
        copy = httpx.get(f"{central.fhir}/Communication/{message_id}", headers=central.headers, timeout=10).json()
        assert copy["sender"]["reference"] == ward.reference and copy["recipient"][0]["reference"] == lab.reference

        # the lab, on the central site, takes it in hand; the site sees it through the feed
        lab_user = signed_in(central.base, "lab")
        page = lab_user.get(f"/messages/{message_id}?box={quote(lab.reference)}")
        assert lab_user.post(f"/messages/{message_id}", data={"csrf": csrf_of(page.text), "entry": entry_of(page.text), "action": "take",
                                                               "as": lab.reference, "text": ""}).status_code == 303
        site_tests.wait_for(lambda: "Pris en charge" in nurse.get(f"/messages?box={quote(ward.reference)}").text, 10)
    finally:
        site.stop()
        central.stop()


def test_answers_written_by_another_system_are_followed_to_the_first_message_even_in_a_loop(group: tuple[Store, SeedReport]) -> None:
    from rebond.fhir import operations

    store, report = group
    _doctor, nurse = _people(report)
    ward = _service(store, "H1-CARDIO")
    first = send(store, {"to": ward.reference, "text": "Premier"}, nurse, NOW)
    base = find(store, "Communication", ("_id", first))[0]

    def answered(rid: str, to: str) -> None:
        answer_of = {**base, "id": rid, "inResponseTo": [{"reference": f"Communication/{to}"}]}
        store.write(lambda tx: operations.update(tx, "Communication", rid, answer_of))

    answered("answer-1", first)
    answered("answer-2", "answer-1")  # an answer to an answer
    assert conversation(store, "answer-2").first.id == first
    answered("loop-a", "loop-b")
    answered("loop-b", "loop-a")
    assert conversation(store, "loop-a").first.id in ("loop-a", "loop-b"), "a loop ends instead of recursing forever"


def test_services_lacking_are_made_once_with_the_ids_the_seed_gives(group: tuple[Store, SeedReport], engine_url: str) -> None:
    from rebond.clinical.messaging import missing_services

    store, _report = group
    assert missing_services(store) == [], "the demo group has every service"
    ward, lab = _service(store, "H1-CARDIO"), _service(store, "H1-LAB")
    store.write(lambda tx: [tx.delete(*b.reference.split("/")) for b in (ward, lab)])
    assert sorted(s["identifier"][0]["value"] for s in missing_services(store)) == ["H1-CARDIO", "H1-LAB"]
    made = rebond("messaging", "services", "--db", engine_url)
    assert made.returncode == 0 and made.stdout.strip() == "made 2 service(s)"
    assert {b.reference for b in services(store)} >= {ward.reference, lab.reference}, "the same ids as the seed's"
    again = rebond("messaging", "services", "--db", engine_url)
    assert again.stdout.strip() == "every ward, lab and pharmacy has its service already"
    listed = rebond("messaging", "services", "--list", "--db", engine_url)  # the codes an account's --service takes
    assert listed.returncode == 0 and all(code in listed.stdout for code in ("H1-CARDIO", "H1-LAB", "H1-PHARMA"))
