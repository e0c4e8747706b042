"""Critical results (OBX-8 HH, LL, AA): the lab's urgent message to the ward, written with the result, once."""
from __future__ import annotations

import pytest

from rebond.clinical import messaging
from rebond.clinical.conventions import COMMUNICATION_CATEGORY, SERVICE_SYSTEM
from rebond.clinical.records import find
from rebond.fhir.search import literal
from rebond.hl7.intake import prepare, receive, receive_many
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store.base import Store
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


def alerts(store: Store, ipp: str) -> list[dict[str, object]]:
    return find(store, "Communication", ("subject", f"Patient/{patient_id(store, ipp)}"), ALERTS)


def test_a_critical_result_reaches_the_wards_box_as_an_urgent_message_from_the_lab(hospital: Store) -> None:
    receive(hospital, adt("A01", "K1", "900000101", "V101", bed="H1-CARDIO-01A"))
    assert receive(hospital, oru("K2", "900000101", "F101", visit="V101")).code == "AA"
    [alert] = alerts(hospital, "900000101")
    report = find(hospital, "DiagnosticReport", ("identifier", "F101"))[0]
    ward, lab = service(hospital, "H1-CARDIO"), service(hospital, "H1-LAB")
    assert alert["priority"] == "urgent" and alert["recipient"][0]["reference"] == ward  # type: ignore[index]
    assert alert["sender"]["reference"] == lab and alert["about"] == [{"reference": f"DiagnosticReport/{report['id']}"}]  # type: ignore[index]
    text = alert["payload"][0]["contentString"]  # type: ignore[index]
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
    assert alert["recipient"][0]["reference"] == service(hospital, "H1-CARDIO")  # type: ignore[index]


def test_the_same_critical_values_are_told_once_and_a_correction_that_changes_them_again(hospital: Store) -> None:
    receive(hospital, adt("A01", "K6", "900000103", "V103", bed="H1-CARDIO-02A"))
    receive(hospital, oru("K7", "900000103", "F104", visit="V103"))
    receive(hospital, oru("K7", "900000103", "F104", visit="V103"))  # sent again: applied once
    receive(hospital, oru("K8", "900000103", "F104", visit="V103"))  # the same result under another control id
    assert len(alerts(hospital, "900000103")) == 1
    receive(hospital, oru("K9", "900000103", "F104", visit="V103", potassium="4,2", flag="N", status="C"))
    assert len(alerts(hospital, "900000103")) == 1, "a correction to a normal value calls no one"
    receive(hospital, oru("K10", "900000103", "F104", visit="V103", potassium="7,1", flag="HH", status="C"))
    texts = sorted(a["payload"][0]["contentString"] for a in alerts(hospital, "900000103"))  # type: ignore[index]
    assert len(texts) == 2 and texts[0].startswith("Résultat critique : Potassium 6,4")
    assert texts[1].startswith("Résultat critique corrigé : Potassium 7,1"), texts


def test_without_a_stay_in_a_ward_the_message_waits_in_the_labs_box_to_call_the_prescriber(hospital: Store) -> None:
    assert receive(hospital, oru("K11", "900000104", "F105")).code == "AA"  # an outpatient, not yet known: provisional
    [alert] = alerts(hospital, "900000104")
    lab = service(hospital, "H1-LAB")  # MSH-4 names the site, H1: its lab
    assert alert["recipient"][0]["reference"] == lab and "reference" not in alert["sender"]  # type: ignore[index,operator]
    assert "appelez le prescripteur" in alert["payload"][0]["contentString"]  # type: ignore[index]
    assert messaging.waiting(hospital, lab, now=messaging.message(alert).sent) == (1, 1)


def test_a_drafted_message_writes_its_alert_in_the_same_commit(hospital: Store) -> None:
    """The MLLP intake's path: the draft made outside the lock, checked and written by the writer."""
    receive(hospital, adt("A01", "K12", "900000105", "V105", bed="H1-CARDIO-02B"))
    raw = oru("K13", "900000105", "F106", visit="V105")
    [answer] = receive_many(hospital, [(raw, prepare(hospital, raw))])
    assert answer.code == "AA" and not answer.redone
    assert len(alerts(hospital, "900000105")) == 1
