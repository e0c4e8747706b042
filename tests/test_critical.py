"""Critical results (OBX-8 HH, LL, AA): the lab's urgent message to the ward, written with the result, once."""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import httpx
import pytest

from rebond.clinical import messaging
from rebond.clinical.census import ward_census
from rebond.clinical.conventions import COMMUNICATION_CATEGORY, HOSPITAL_TZ, ON_CALL_SYSTEM, RPPS_SYSTEM, SERVICE_SYSTEM
from rebond.clinical.escalation import ESCALATE_AFTER, escalate, passed_on, physician_for
from rebond.clinical.records import Clinician, Entry, PatientSummary, Resource, fhir_instant, find, person_name, read
from rebond.clinical.wards import group_wards
from rebond.fhir.search import literal
from rebond.hl7.intake import prepare, receive, receive_many
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store import open_store
from rebond.store.base import Store
from rebond.store.draft import content_of
from tests.hl7_messages import adt, oru

IPP_SYSTEM = "urn:oid:1.2.250.1.999.1.1"
ALERTS = ("category", f"{COMMUNICATION_CATEGORY}|critical-result")


@pytest.fixture
def hospital(store: Store) -> Store:
    seed_demo(store, seed=2, size=DemoSize(1, 1, 4))
    return store


def service(store: Store, code: str) -> str:
    found = find(store, "HealthcareService", ("identifier", f"{SERVICE_SYSTEM}|{code}"))
    assert len(found) == 1, code
    return f"HealthcareService/{found[0]['id']}"


def patient_id(store: Store, ipp: str) -> str:
    return str(find(store, "Patient", ("identifier", f"{IPP_SYSTEM}|{literal(ipp)}"))[0]["id"])


def alerts(store: Store, ipp: str) -> list[Resource]:
    return list(find(store, "Communication", ("subject", f"Patient/{patient_id(store, ipp)}"), ALERTS))


def test_a_critical_result_reaches_the_wards_box_as_an_urgent_message_from_the_lab(hospital: Store) -> None:
    receive(hospital, adt("A01", "K1", "900000101", "V101", bed="H1-CARDIO-01A"))
    assert receive(hospital, oru("K2", "900000101", "F101", visit="V101")).code == "AA"
    [alert] = alerts(hospital, "900000101")
    report = find(hospital, "DiagnosticReport", ("identifier", "F101"))[0]
    ward, lab = service(hospital, "H1-CARDIO"), service(hospital, "H1-LAB")
    assert alert["priority"] == "urgent" and alert["recipient"][0]["reference"] == ward
    assert alert["sender"]["reference"] == lab and alert["about"] == [{"reference": f"DiagnosticReport/{report['id']}"}]
    text = alert["payload"][0]["contentString"]
    assert text.startswith("Résultat critique : Potassium 6,4 mmol/L (HH ; normales 3,5–5), prélevé le 23/11 à 11:00."), text
    assert "Créatinine" not in text, "only the critical results are in the message (the creatinine is L)"
    # the ward's nurses see it waiting, urgent, in their box (and so on the census and in every page's top bar)
    assert messaging.waiting(hospital, ward, now=messaging.message(alert).sent) == (1, 1)
    conversation = messaging.conversation(hospital, str(alert["id"]))
    assert conversation.first.urgent and conversation.waits_for(ward) and not conversation.waits_for(lab)


def test_the_stay_is_found_without_pv1_19_and_a_result_without_critical_values_writes_no_message(hospital: Store) -> None:
    receive(hospital, adt("A01", "K3", "900000102", "V102", bed="H1-CARDIO-01B"))
    receive(hospital, oru("K4", "900000102", "F102", potassium="5,6", flag="H"))
    assert alerts(hospital, "900000102") == [], "high is not critical"
    receive(hospital, oru("K5", "900000102", "F103"))  # no PV1: the stay in progress is the patient's
    [alert] = alerts(hospital, "900000102")
    assert alert["recipient"][0]["reference"] == service(hospital, "H1-CARDIO")


def test_the_same_critical_values_are_told_once_and_a_correction_that_changes_them_again(hospital: Store) -> None:
    receive(hospital, adt("A01", "K6", "900000103", "V103", bed="H1-CARDIO-02A"))
    receive(hospital, oru("K7", "900000103", "F104", visit="V103"))
    receive(hospital, oru("K7", "900000103", "F104", visit="V103"))  # sent again: applied once
    receive(hospital, oru("K8", "900000103", "F104", visit="V103"))  # the same result under another control id
    assert len(alerts(hospital, "900000103")) == 1
    receive(hospital, oru("K9", "900000103", "F104", visit="V103", potassium="4,2", flag="N", status="C"))
    assert len(alerts(hospital, "900000103")) == 1, "a correction to a normal value calls no one"
    receive(hospital, oru("K10", "900000103", "F104", visit="V103", potassium="7,1", flag="HH", status="C"))
    texts = sorted(a["payload"][0]["contentString"] for a in alerts(hospital, "900000103"))
    assert len(texts) == 2 and texts[0].startswith("Résultat critique : Potassium 6,4")
    assert texts[1].startswith("Résultat critique corrigé : Potassium 7,1"), texts


def test_without_a_stay_in_a_ward_the_message_waits_in_the_labs_box_to_call_the_prescriber(hospital: Store) -> None:
    assert receive(hospital, oru("K11", "900000104", "F105")).code == "AA"  # an outpatient, not yet known: provisional
    [alert] = alerts(hospital, "900000104")
    lab = service(hospital, "H1-LAB")  # MSH-4 names the site, H1: its lab
    assert alert["recipient"][0]["reference"] == lab and "reference" not in alert["sender"]
    assert "appelez le prescripteur" in alert["payload"][0]["contentString"]
    assert messaging.waiting(hospital, lab, now=messaging.message(alert).sent) == (1, 1)


def test_a_drafted_message_writes_its_alert_in_the_same_commit(hospital: Store) -> None:
    """The MLLP intake's path: the draft made outside the lock, checked and written by the writer."""
    receive(hospital, adt("A01", "K12", "900000105", "V105", bed="H1-CARDIO-02B"))
    raw = oru("K13", "900000105", "F106", visit="V105")
    [answer] = receive_many(hospital, [(raw, prepare(hospital, raw))])
    assert answer.code == "AA" and not answer.redone
    assert len(alerts(hospital, "900000105")) == 1


# -- a call no one takes in hand is passed on to a physician (clinical/escalation.py)


def inpatient(store: Store) -> tuple[str, PatientSummary]:
    """The first ward's service and one of its inpatients."""
    ward = group_wards(store)[0].wards[0][0]
    line = next(b for b in ward_census(store, ward.id, dt.datetime.now(dt.UTC)).beds if b.patient is not None)
    team = messaging.ward_box(store, ward.id)
    assert team is not None and line.patient is not None and line.patient.ipp
    return team.reference, line.patient


def rota(store: Store, ward_ref: str, practitioner: dict[str, object] | None, start: dt.datetime) -> None:
    """The ward's rota emptied; with `practitioner`, one shift on call from `start`, for 12 hours."""
    for schedule in find(store, "Schedule"):
        store.delete("Schedule", str(schedule["id"]))
    if practitioner is None:
        return
    service = read(store, "HealthcareService", ward_ref.split("/")[1])
    assert service is not None
    store.create({"resourceType": "Schedule", "active": True,
                  "serviceType": [{"coding": [{"system": ON_CALL_SYSTEM, "code": "garde"}], "text": "Garde sur place"}],
                  "actor": [{"reference": f"Practitioner/{practitioner['id']}", "display": person_name(practitioner)},
                            service["location"][0]],
                  "planningHorizon": {"start": fhir_instant(start), "end": fhir_instant(start + dt.timedelta(hours=12))}})


def test_a_call_no_one_takes_goes_after_15_minutes_to_the_physician_on_call_once(hospital: Store) -> None:
    ward, patient = inpatient(hospital)
    doctor = find(hospital, "Practitioner")[-1]
    rota(hospital, ward, doctor, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    receive(hospital, oru("E1", str(patient.ipp), "FE1"))
    [call] = alerts(hospital, str(patient.ipp))
    sent = messaging.message(call).sent
    assert escalate(hospital, sent + dt.timedelta(minutes=14)) == [], "not before 15 minutes"
    [passed] = escalate(hospital, sent + dt.timedelta(minutes=16))
    assert escalate(hospital, sent + dt.timedelta(minutes=17)) == [], "once"
    reply = read(hospital, "Communication", passed)
    assert reply is not None and reply["sender"] == call["sender"] and reply["priority"] == "urgent"
    assert [r["reference"] for r in reply["recipient"]] == [f"Practitioner/{doctor['id']}", ward]
    assert reply["sent"] == fhir_instant(sent + dt.timedelta(minutes=15)) and reply["about"] == call["about"]
    assert reply["payload"][0]["contentString"].startswith(
        f"Sans prise en charge par le service après 15 min, transmis à {person_name(doctor)} (garde sur place). Résultat critique : ")

    later = sent + dt.timedelta(minutes=20)
    doctors_box = f"Practitioner/{doctor['id']}"
    assert messaging.waiting(hospital, doctors_box, later) == (1, 1), "in the physician's box, waiting, urgent"
    assert messaging.waiting(hospital, ward, later) == (1, 1), "and still waiting in the ward's"
    [shown] = messaging.conversations(hospital, doctors_box, later)
    assert shown.first.critical_report and [m.id for m in shown.after] == [passed]
    taker = Clinician("doctor", person_name(doctor), str(doctor["id"]))
    messaging.answer(hospital, str(call["id"]), {"entry": str(Entry.new())}, taker, later, taken=True)
    assert messaging.waiting(hospital, doctors_box, later) == (0, 0) and messaging.waiting(hospital, ward, later) == (0, 0)


def test_a_call_taken_in_time_stays_and_without_a_rota_one_goes_to_the_stays_physician_the_same_on_every_node(hospital: Store) -> None:
    ward, patient = inpatient(hospital)
    rota(hospital, ward, None, dt.datetime.now(dt.UTC))
    receive(hospital, oru("E2", str(patient.ipp), "FE2"))
    receive(hospital, oru("E3", str(patient.ipp), "FE3", potassium="2,1", flag="LL"))
    first, second = sorted(alerts(hospital, str(patient.ipp)), key=lambda c: str(c["payload"][0]["contentString"]))
    nurse = find(hospital, "Practitioner")[0]
    messaging.answer(hospital, str(second["id"]), {"entry": str(Entry.new())}, Clinician("nurse", "IDE", str(nurse["id"])),
                     messaging.message(second).sent + dt.timedelta(minutes=3), taken=True)
    when = messaging.message(first).sent + dt.timedelta(minutes=16)
    [passed] = escalate(hospital, when)
    reply = read(hospital, "Communication", passed)
    stay = find(hospital, "Encounter", ("subject", f"Patient/{patient.id}"), ("status", "in-progress"))[0]
    physician = stay["participant"][0]["individual"]["reference"]
    assert reply is not None and reply["inResponseTo"] == [{"reference": f"Communication/{first['id']}"}]
    assert reply["recipient"][0]["reference"] == physician and "(médecin du séjour)" in reply["payload"][0]["contentString"]
    # another node passing it on later writes the very same resource: a site node's journal settles it as already there
    talk = messaging.conversation(hospital, str(first["id"]))
    later = passed_on(first, physician_for(hospital, talk, when + dt.timedelta(minutes=30)), ESCALATE_AFTER)
    assert content_of(later) == content_of(reply)


def test_a_site_node_passes_calls_on_only_while_cut_off_and_the_central_site_gets_them_back(demo_db: str, tmp_path: Path) -> None:
    """Connected, a site node leaves the rounds to the central site (here told never to make them); cut off, it makes
    them itself, for the calls its own lab interface wrote, and journals what it writes for the central site."""
    import hl7.client

    from rebond.hl7.mllp import ack_code
    from rebond.security.accounts import Accounts
    from tests import test_site as site_tests
    from tests.pg_harness import free_port
    from tests.server import RebondServer, SiteServer

    central = RebondServer(demo_db, "--escalate-after", "0").start()
    site_db = f"sqlite:///{tmp_path}/site-H1.db"
    store = open_store(site_db)
    Accounts(store).save("nurse", "rebond-demo", "nurse", "LEROY Hélène")
    store.close()
    port = free_port()
    site = SiteServer(site_db, central, "H1", "--mllp-port", str(port), "--escalate-after", "0.05").start()
    try:
        site_tests.wait_for(lambda: site.status()["data_as_of"] is not None, 120)
        store = open_store(central.db)
        try:
            _ward, patient = inpatient(store)
        finally:
            store.close()
        category = f"{COMMUNICATION_CATEGORY}|critical-result"

        def calls(server: RebondServer) -> list[Resource]:
            found = httpx.get(f"{server.fhir}/Communication", params={"category": category, "subject": f"Patient/{patient.id}"},
                              headers=server.headers, timeout=10).json()
            return [e["resource"] for e in found.get("entry", [])]

        with hl7.client.MLLPClient("127.0.0.1", port) as client:
            assert ack_code(client.send_message(oru("S1", str(patient.ipp), "FS1"))) == "AA"
        time.sleep(5)  # past the delay, several rounds: connected, the site leaves them to the central site
        assert len(calls(site)) == 1 and site.status()["critical_results"]["this_process"] is False  # type: ignore[index]

        central.kill()
        site_tests.wait_for(lambda: site.status()["upstream_reachable"] is False, 10)
        site_tests.wait_for(lambda: len(calls(site)) == 2, 15)
        assert site.status()["critical_results"]["passed_on"] == 1  # type: ignore[index]

        central.start()
        site_tests.wait_for(lambda: site.status()["journal_pending"] == 0, 30)
        assert sorted(c["id"] for c in calls(central)) == sorted(c["id"] for c in calls(site)), "both on the central site"
        assert site.status()["conflicts_open"] == 0
    finally:
        site.stop()
        central.stop()


def test_the_order_names_its_prescriber_whom_the_call_names_and_who_gets_it_when_no_one_takes_it(hospital: Store) -> None:
    """An outpatient's critical result: the lab's own box, « Prescripteur : … », and after 15 minutes the prescriber's box
    when the store knows them (ORC-12's RPPS number)."""
    doctor = find(hospital, "Practitioner")[-1]
    rpps = next(i["value"] for i in doctor["identifier"] if i["system"] == RPPS_SYSTEM)
    receive(hospital, oru("P1", "900000301", "FP1", orderer=f"{rpps}^{doctor['name'][0]['family']}^{doctor['name'][0]['given'][0]}^^^Dr"))
    order = find(hospital, "ServiceRequest", ("identifier", "FP1"))[0]
    assert order["requester"]["reference"] == f"Practitioner/{doctor['id']}"
    [call] = alerts(hospital, "900000301")
    text = call["payload"][0]["contentString"]
    assert call["recipient"][0]["reference"] == service(hospital, "H1-LAB") and f"Prescripteur : {order['requester']['display']}." in text
    [passed] = escalate(hospital, messaging.message(call).sent + dt.timedelta(minutes=16))
    reply = read(hospital, "Communication", passed)
    assert reply is not None and reply["recipient"][0]["reference"] == f"Practitioner/{doctor['id']}"
    assert "(prescripteur)" in reply["payload"][0]["contentString"]

    # a prescriber the store does not know: named with their number, for the lab to ring; no one to pass it on to
    receive(hospital, oru("P2", "900000302", "FP2", orderer="10099887766^DURAND^Paul^^^Dr"))
    assert find(hospital, "ServiceRequest", ("identifier", "FP2"))[0]["requester"] == {
        "identifier": {"system": RPPS_SYSTEM, "value": "10099887766"}, "display": "Dr Paul DURAND"}
    [unknown] = alerts(hospital, "900000302")
    assert "Prescripteur : Dr Paul DURAND (RPPS 10099887766)." in unknown["payload"][0]["contentString"]
    assert escalate(hospital, messaging.message(unknown).sent + dt.timedelta(minutes=16)) == []


def test_an_admission_names_its_attending_physician_whom_the_store_knows_by_rpps(hospital: Store) -> None:
    doctor = find(hospital, "Practitioner")[0]
    rpps = next(i["value"] for i in doctor["identifier"] if i["system"] == RPPS_SYSTEM)
    raw = adt("A01", "P3", "900000303", "V303", bed="H1-CARDIO-01A").replace(b"10001^ROBIN^Jeanne^^^Dr", f"{rpps}^ROBIN^Jeanne^^^Dr".encode())
    receive(hospital, raw)
    stay = find(hospital, "Encounter", ("identifier", "V303"))[0]
    assert stay["participant"][0]["individual"] == {"reference": f"Practitioner/{doctor['id']}", "display": "Dr Jeanne ROBIN"}
    receive(hospital, adt("A01", "P4", "900000304", "V304", bed="H1-CARDIO-01B"))  # 10001: no one the store knows
    other = find(hospital, "Encounter", ("identifier", "V304"))[0]
    assert other["participant"][0]["individual"] == {"identifier": {"system": RPPS_SYSTEM, "value": "10001"}, "display": "Dr Jeanne ROBIN"}


def test_the_census_marks_a_patient_with_a_critical_result_not_yet_acknowledged(hospital: Store) -> None:
    ward, patient = inpatient(hospital)
    today = dt.datetime.now(HOSPITAL_TZ).strftime("%Y%m%d").encode()
    receive(hospital, oru("C1", str(patient.ipp), "FC1").replace(b"20261123", today))
    receive(hospital, oru("C2", str(patient.ipp), "FC2", potassium="5,4", flag="H").replace(b"20261123", today))
    ward_id = str(read(hospital, "HealthcareService", ward.split("/")[1])["location"][0]["reference"]).split("/")[1]  # type: ignore[index]
    line = next(b for b in ward_census(hospital, ward_id, dt.datetime.now(dt.UTC)).beds if b.patient and b.patient.id == patient.id)
    assert line.critical_results and "Potassium" in line.abnormal_results and line.reports_to_acknowledge >= 2
