"""HL7 v2 into FHIR, in process, on both engines: admissions and moves, results, corrections, merges, bad messages."""
from __future__ import annotations

import hashlib
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rebond.clinical.records import find, read
from rebond.fhir.search import literal
from rebond.hl7.intake import CHANNEL, prepare, receive, receive_many, replay
from rebond.hl7.message import Message, MessageError
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store.base import Store
from tests.hl7_messages import adt, oru

IPP_SYSTEM = "urn:oid:1.2.250.1.999.1.1"


@pytest.fixture
def hospital(store: Store) -> Store:
    seed_demo(store, seed=2, size=DemoSize(1, 1, 4))
    return store


def patient(store: Store, ipp: str) -> dict[str, object]:
    found = find(store, "Patient", ("identifier", f"{IPP_SYSTEM}|{literal(ipp)}"))
    assert len(found) == 1
    return found[0]


def stay(store: Store, visit: str) -> dict[str, object]:
    found = find(store, "Encounter", ("identifier", f"urn:oid:1.2.250.1.999.1.2|{visit}"))
    assert len(found) == 1
    return found[0]


def active_places(encounter: dict[str, object]) -> list[str]:
    return [loc["location"].get("display", "") for loc in encounter["location"] if loc["status"] == "active"]  # type: ignore[union-attr,index]


def test_an_admission_creates_the_patient_and_the_stay_in_its_bed(hospital: Store) -> None:
    answer = receive(hospital, adt("A01", "ADT1", "900000001", "V1", bed="H1-CARDIO-01A"))
    assert answer.code == "AA" and b"MSA|AA|ADT1" in answer.ack
    p = patient(hospital, "900000001")
    assert p["name"][0]["family"] == "LÉGER" and p["birthDate"] == "1947-02-11" and p["gender"] == "female"  # type: ignore[index]
    encounter = stay(hospital, "V1")
    assert encounter["status"] == "in-progress" and encounter["class"]["code"] == "IMP"  # type: ignore[index]
    bed = encounter["location"][0]["location"]  # type: ignore[index]
    assert bed["reference"].startswith("Location/") and bed["display"] == "Lit H1-CARDIO-01A"  # the directory's bed


def test_transfer_discharge_and_their_cancellations_keep_the_location_history(hospital: Store) -> None:
    receive(hospital, adt("A01", "M1", "900000002", "V2", bed="H1-CARDIO-01A"))
    receive(hospital, adt("A02", "M2", "900000002", "V2", bed="H1-CARDIO-02B", at="20261123120000"))
    moved = stay(hospital, "V2")
    assert active_places(moved) == ["Lit H1-CARDIO-02B", "Cardiologie — Hôpital Louis-Pasteur"]
    closed = [loc for loc in moved["location"] if loc["status"] == "completed"]  # type: ignore[union-attr]
    assert closed and all(loc["period"]["end"] == "2026-11-23T11:00:00Z" for loc in closed)
    receive(hospital, adt("A12", "M3", "900000002", "V2", bed="H1-CARDIO-02B"))
    assert active_places(stay(hospital, "V2"))[0] == "Lit H1-CARDIO-01A", "cancelling the transfer puts the patient back"
    receive(hospital, adt("A03", "M4", "900000002", "V2", at="20261124090000"))
    left = stay(hospital, "V2")
    assert left["status"] == "finished" and left["period"]["end"] == "2026-11-24T08:00:00Z" and not active_places(left)  # type: ignore[index]
    receive(hospital, adt("A13", "M5", "900000002", "V2"))
    back = stay(hospital, "V2")
    assert back["status"] == "in-progress" and "end" not in back["period"] and active_places(back)  # type: ignore[operator]
    receive(hospital, adt("A21", "M6", "900000002", "V2"))
    assert stay(hospital, "V2")["status"] == "onleave"
    receive(hospital, adt("A22", "M7", "900000002", "V2"))
    assert stay(hospital, "V2")["status"] == "in-progress"


def test_a_result_becomes_a_report_with_flagged_observations_linked_to_order_and_stay(hospital: Store) -> None:
    receive(hospital, adt("A01", "A1", "900000003", "V3", bed="H1-CARDIO-01B"))
    assert receive(hospital, oru("L1", "900000003", "F100", visit="V3")).code == "AA"
    p = patient(hospital, "900000003")
    report = find(hospital, "DiagnosticReport", ("subject", f"Patient/{p['id']}"))[0]
    assert report["status"] == "final" and report["encounter"]["reference"] == f"Encounter/{stay(hospital, 'V3')['id']}"
    order = read(hospital, "ServiceRequest", report["basedOn"][0]["reference"].split("/")[1])
    assert order is not None and {i["value"] for i in order["identifier"]} == {"PF100", "F100"}
    values = {o["code"]["coding"][0]["code"]: o for o in find(hospital, "Observation", ("subject", f"Patient/{p['id']}"))}
    k = values["2823-3"]
    assert k["valueQuantity"]["value"] == 6.4 and k["interpretation"][0]["coding"][0]["code"] == "HH"
    assert k["referenceRange"][0]["high"]["value"] == 5.0 and k["note"][0]["text"].startswith("Contrôle")
    assert values["2160-0"]["valueQuantity"] == {"value": 30.0, "comparator": "<", "unit": "umol/L", "system": "http://unitsofmeasure.org",
                                                  "code": "umol/L"}
    assert values["8251-1"]["valueString"] == "Hémolysé"


def test_a_correction_is_a_new_version_of_the_same_observation(hospital: Store) -> None:
    receive(hospital, oru("C1", "900000004", "F200"))
    receive(hospital, oru("C2", "900000004", "F200", potassium="4,1", flag="N", status="C"))
    p = patient(hospital, "900000004")
    k = [o for o in find(hospital, "Observation", ("subject", f"Patient/{p['id']}")) if o["code"]["coding"][0]["code"] == "2823-3"]
    assert len(k) == 1 and k[0]["status"] == "corrected" and k[0]["valueQuantity"]["value"] == 4.1
    assert k[0]["meta"]["versionId"] == "2"
    assert find(hospital, "DiagnosticReport", ("subject", f"Patient/{p['id']}"))[0]["status"] == "corrected"


def test_the_results_of_an_order_have_ids_side_by_side(hospital: Store) -> None:
    receive(hospital, oru("S1", "900000014", "F210"))
    receive(hospital, oru("S2", "900000014", "F211"))
    p = patient(hospital, "900000014")
    by_order: dict[str, set[str]] = {}
    for report in find(hospital, "DiagnosticReport", ("subject", f"Patient/{p['id']}")):
        by_order[report["identifier"][0]["value"]] = {ref["reference"].split("/")[1] for ref in report["result"]}
    assert set(by_order) == {"F210", "F211"} and all(len(ids) == 3 for ids in by_order.values())
    prefixes = {order: {i[:18] for i in ids} for order, ids in by_order.items()}  # the first 64 bits: the order's
    assert all(len(p) == 1 for p in prefixes.values()) and prefixes["F210"] != prefixes["F211"]
    assert all(i[14] == "8" for ids in by_order.values() for i in ids), "UUID version 8: laid out by Rebond"


def test_a_correction_of_an_order_stored_with_earlier_ids_keeps_them(hospital: Store) -> None:
    from rebond.hl7.mapping import derived_id

    receive(hospital, oru("E1", "900000015", "F220"))
    p = patient(hospital, "900000015")
    # the order as results were stored before `result_id`: each result named by a UUID v5 of its own
    report = find(hospital, "DiagnosticReport", ("subject", f"Patient/{p['id']}"))[0]
    earlier = set()
    for ref in report["result"]:
        result = read(hospital, "Observation", ref["reference"].split("/")[1])
        assert result is not None
        old = derived_id("Observation", "F220", result["code"]["coding"][0]["code"], "")
        hospital.write(lambda tx, r=result, o=old: (tx.delete("Observation", r["id"]), tx.update("Observation", o, {**r, "id": o})))
        ref["reference"] = f"Observation/{old}"
        earlier.add(old)
    hospital.update("DiagnosticReport", report["id"], report)
    assert receive(hospital, oru("E2", "900000015", "F220", potassium="4,1", flag="N", status="C")).code == "AA"
    now = find(hospital, "Observation", ("subject", f"Patient/{p['id']}"))
    assert {o["id"] for o in now} == earlier and len(earlier) == 3, "no second copy of a result under a new id"
    k = [o for o in now if o["code"]["coding"][0]["code"] == "2823-3"][0]
    assert k["status"] == "corrected" and k["meta"]["versionId"] == "2"


def test_a_result_for_an_unknown_patient_is_kept_on_a_provisional_record_that_the_admission_completes(hospital: Store) -> None:
    assert receive(hospital, oru("U1", "900000005", "F300")).code == "AA"
    provisional = patient(hospital, "900000005")
    assert provisional["meta"]["tag"][0]["code"] == "provisional-patient"  # type: ignore[index]
    receive(hospital, adt("A01", "U2", "900000005", "V5", bed="H1-CARDIO-02A"))
    admitted = patient(hospital, "900000005")
    assert admitted["id"] == provisional["id"] and "tag" not in admitted.get("meta", {})  # type: ignore[operator]
    assert find(hospital, "DiagnosticReport", ("subject", f"Patient/{admitted['id']}"))


def test_an_identifier_with_a_search_separator_is_never_read_as_two(hospital: Store) -> None:
    """A PID-3 typed « 900000006,900000007 » names no one known: its result goes to a provisional record of that very
    number, never to patient 900000006 (a search would read the comma as "or")."""
    receive(hospital, adt("A01", "S1", "900000006", "V6", bed="H1-CARDIO-03A"))
    known = patient(hospital, "900000006")
    assert receive(hospital, oru("S2", "900000006,900000007", "F301")).code == "AA"
    assert not find(hospital, "DiagnosticReport", ("subject", f"Patient/{known['id']}")), "not given to 900000006"
    assert patient(hospital, "900000006,900000007")["id"] != known["id"]


def test_a_result_for_an_identifier_two_patients_hold_waits_for_a_person(hospital: Store, caplog: pytest.LogCaptureFixture) -> None:
    """Two records, not merged, with one IPP (a registration error elsewhere): the result is given to neither; it is
    refused with the reason and waits in the dead letters until IT merges them and replays it. The log names no IPP."""
    import logging

    from rebond.fhir import operations

    caplog.set_level(logging.INFO, logger="rebond.hl7")

    receive(hospital, adt("A28", "T1", "900000020", "V20"))
    twin = {"resourceType": "Patient", "identifier": [{"system": IPP_SYSTEM, "value": "900000020"}], "name": [{"family": "AUTRE"}]}
    hospital.write(lambda tx: operations.create(tx, "Patient", twin))
    answer = receive(hospital, oru("T2", "900000020", "F900"))
    assert answer.code == "AR" and b"2 patients hold the identifier" in answer.ack and b"|205" in answer.ack
    assert not find(hospital, "DiagnosticReport", ("identifier", "F900"))
    kept = hospital.message(answer.message_id or 0)
    assert kept is not None and kept.status == "rejected" and "merge them" in kept.detail
    assert "HL7 error 205 at PID-3" in caplog.text and "900000020" not in caplog.text, caplog.text


def test_a_resent_message_is_acknowledged_again_and_applied_once(hospital: Store) -> None:
    message = oru("D1", "900000006", "F400")
    assert receive(hospital, message).code == "AA"
    versions = hospital.history()[1]
    again = receive(hospital, message)
    assert again.code == "AA" and b"already received" in again.ack
    assert hospital.history()[1] == versions, "nothing written twice"
    reused = receive(hospital, oru("D1", "900000006", "F401"))
    assert reused.code == "AR" and b"already used" in reused.ack


@pytest.mark.parametrize("drafted", [True, False], ids=["drafted", "worked-out-under-the-lock"])
def test_messages_taken_in_one_commit_are_each_answered_and_a_refused_one_leaves_the_others_applied_once(
        hospital: Store, drafted: bool) -> None:
    """The intake writer's batch: taken together without savepoints, then again one by one when a message fails."""
    receive(hospital, adt("A01", "T0", "900000013", "V13", bed="H1-CARDIO-01A"))
    raws = [oru("T1", "900000013", "F800"), adt("A02", "T2", "900000013", "NEVER-ADMITTED"), oru("T3", "900000013", "F801"),
            oru("T4", "900000014", "F802"), oru("T5", "900000013", "F803", potassium="six")]  # the last one fails half-way
    answers = receive_many(hospital, [(raw, prepare(hospital, raw) if drafted else None) for raw in raws])
    assert [a.code for a in answers] == ["AA", "AR", "AA", "AA", "AR"]
    assert b"never admitted" in answers[1].ack and b"'six' is not a number" in answers[4].ack
    assert hospital.message(answers[1].message_id or 0).status == "rejected"  # type: ignore[union-attr]
    reports = find(hospital, "DiagnosticReport", ("identifier", "F800,F801,F802"))
    assert sorted(i["value"] for r in reports for i in r["identifier"]) == ["F800", "F801", "F802"], "each result stored once"
    assert patient(hospital, "900000014")["meta"]["tag"][0]["code"] == "provisional-patient"  # type: ignore[index]
    assert not find(hospital, "Encounter", ("identifier", "urn:oid:1.2.250.1.999.1.2|NEVER-ADMITTED")), "nothing of the refused ones"
    assert not find(hospital, "ServiceRequest", ("identifier", "F803")) and not find(hospital, "DiagnosticReport", ("identifier", "F803"))
    written = hospital.history()[1]
    again = receive_many(hospital, [(raw, None) for raw in raws])
    assert [a.code for a in again] == ["AA", "AR", "AA", "AA", "AR"]
    assert hospital.history()[1] == written, "a batch sent again is answered again and applied once"


def test_a_merge_moves_the_merged_records_to_the_surviving_patient(hospital: Store) -> None:
    receive(hospital, adt("A28", "G1", "900000007", "V7", family="DOUBLON"))
    receive(hospital, oru("G2", "900000007", "F500", family="DOUBLON"))
    receive(hospital, adt("A01", "G3", "900000008", "V8", bed="H1-CARDIO-02A"))
    merged_id = patient(hospital, "900000007")["id"]
    merge = adt("A40", "G4", "900000008", "V8", extra="MRG|900000007^^^GHR&1.2.250.1.999.1.1&ISO^PI")
    assert receive(hospital, merge).code == "AA"
    survivor = patient(hospital, "900000008")
    assert find(hospital, "DiagnosticReport", ("subject", f"Patient/{survivor['id']}")), "the survivor shows the merged record's results"
    assert not find(hospital, "Observation", ("subject", f"Patient/{merged_id}"))
    old = read(hospital, "Patient", str(merged_id))
    assert old is not None and old["active"] is False and old["link"][0] == {"other": {"reference": f"Patient/{survivor['id']}"},
                                                                              "type": "replaced-by"}
    assert any(link["type"] == "replaces" for link in survivor["link"])  # type: ignore[union-attr,index]
    # an analyzer that still has the merged IPP: its result goes to the surviving patient, not the record merged away
    assert receive(hospital, oru("G5", "900000007", "F501", family="DOUBLON")).code == "AA"
    late = find(hospital, "DiagnosticReport", ("identifier", "F501"))
    assert [r["subject"]["reference"] for r in late] == [f"Patient/{survivor['id']}"]


def test_a47_corrects_a_patient_identifier(hospital: Store) -> None:
    receive(hospital, adt("A28", "I1", "900000009", "V9"))
    assert receive(hospital, adt("A47", "I2", "900000010", "V9", extra="MRG|900000009^^^GHR&1.2.250.1.999.1.1&ISO^PI")).code == "AA"
    assert patient(hospital, "900000010") and not find(hospital, "Patient", ("identifier", f"{IPP_SYSTEM}|900000009"))


@pytest.mark.parametrize(("raw", "reason"), [
    (oru("B1", "900000011", "F600", potassium="six"), b"OBX-5 (set 1) 'six' is not a number"),
    (oru("B2", "900000011", "F601").replace(b"|HH|", b"|ZZ|"), b"OBX-8 flag 'ZZ' is not in table 0078"),
    (oru("B3", "900000011", "F602").replace(b"UNICODE UTF-8", b"KLINGON"), b"character set 'KLINGON'"),
    (oru("B4", "900000011", "F603").replace("Hémolysé".encode(), b"H\xe9molys\xe9"), b"not valid UNICODE UTF-8"),
    (b"\x00\xff garbage that is not HL7", b"does not start with an MSH segment"),
    (adt("A02", "B5", "900000011", "NEVER-ADMITTED"), b"never admitted"),
    (adt("A99", "B6", "900000011", "V11"), b"ADT\\S\\A99 is not handled"),
])
def test_a_message_that_cannot_be_processed_is_refused_with_the_reason_and_kept(hospital: Store, raw: bytes, reason: bytes) -> None:
    before = hospital.history()[1]
    answer = receive(hospital, raw)
    assert answer.code == "AR" and reason in answer.ack and b"\rERR|" in answer.ack
    assert hospital.history()[1] == before, "nothing half-written"
    letter = hospital.message(answer.message_id or 0)
    assert letter is not None and letter.status == "rejected" and letter.raw == raw


def test_latin_1_messages_are_read_as_latin_1(hospital: Store) -> None:
    assert receive(hospital, oru("E1", "900000012", "F700", charset="8859/1")).code == "AA"
    assert patient(hospital, "900000012")["name"][0]["family"] == "LÉGER"  # type: ignore[index]


def test_enhanced_mode_answers_commit_codes(hospital: Store) -> None:
    assert receive(hospital, oru("E2", "900000013", "F800", enhanced=True)).code == "CA"
    assert receive(hospital, oru("E3", "900000013", "F801", potassium="x", enhanced=True)).code == "CR"


def test_a_dead_letter_is_replayed_once_corrected(hospital: Store) -> None:
    refused = receive(hospital, oru("R1", "900000014", "F900", potassium="6;4"))
    assert refused.code == "AR" and refused.message_id is not None
    assert [m.id for m in hospital.messages(CHANNEL, "rejected")] == [refused.message_id]
    fixed = replay(hospital, refused.message_id, oru("R1", "900000014", "F900", potassium="6,4"))
    assert fixed.code == "AA"
    assert hospital.message(refused.message_id).status == "applied"  # type: ignore[union-attr]
    assert hospital.get_state("hl7-original", str(refused.message_id)), "the message as first sent is kept"
    assert patient(hospital, "900000014")


def test_the_senders_section_is_kept_beside_lab_so_the_clinical_views_find_the_report(hospital: Store) -> None:
    chemistry = oru("S1", "900000015", "F1000").replace(b"|||20261123111000|||F", b"|||20261123111000||CH|F")
    assert receive(hospital, chemistry).code == "AA"
    p = patient(hospital, "900000015")
    report = find(hospital, "DiagnosticReport", ("subject", f"Patient/{p['id']}"), ("category", "LAB"))
    assert [c["code"] for c in report[0]["category"][0]["coding"]] == ["LAB", "CH"]


def test_z99_corrects_a_movement_and_a06_a07_change_the_class(hospital: Store) -> None:
    receive(hospital, adt("A01", "Z1", "900000016", "V16", bed="H1-CARDIO-01A"))
    wrong_bed = stay(hospital, "V16")
    movement = wrong_bed["location"][0]["extension"][0]["valueString"]  # type: ignore[index]
    fix = adt("Z99", "Z2", "900000016", "V16", bed="H1-CARDIO-02B").replace(b"ZBE|MVZ2|", f"ZBE|{movement}|".encode())
    assert receive(hospital, fix).code == "AA"
    assert active_places(stay(hospital, "V16"))[0] == "Lit H1-CARDIO-02B"
    unknown = adt("Z99", "Z3", "900000016", "V16", bed="H1-CARDIO-02B").replace(b"ZBE|MVZ3|", b"ZBE|NO-SUCH-MOVE|")
    assert receive(hospital, unknown).code == "AR"
    outpatient = adt("A07", "Z4", "900000016", "V16").replace(b"PV1|1|I|", b"PV1|1|O|")
    assert receive(hospital, outpatient).code == "AA" and stay(hospital, "V16")["class"]["code"] == "AMB"  # type: ignore[index]
    assert receive(hospital, adt("A06", "Z5", "900000016", "V16")).code == "AA"
    assert stay(hospital, "V16")["class"]["code"] == "IMP"  # type: ignore[index]


def test_fields_are_read_with_the_messages_own_delimiters_and_escapes_undone() -> None:
    text = ("MSH#*!?$#LAB#H1#REBOND#H1#20260101120000##ORU*R01*ORU_R01#C1#P#2.5\r"
            "PID###123***IPP$1.2.250$ISO!456***NDA##DUPONT?S?FILS*Jean##\r"
            "OBX#1#NM#K*Potassium##6.1#mmol/L#3.5-5.0#H!HH#")
    message = Message(text)
    msh, pid, obx = message.require("MSH"), message.require("PID"), message.require("OBX")
    assert (msh.get(1), msh.get(2), msh.get(10), msh.get(9, 2)) == ("#", "*!?$", "C1", "R01")
    assert (pid.get(3), pid.get(3, 4, 2), pid.get(3, repetition=2), pid.repetitions(3)) == ("123", "1.2.250", "456", 2)
    assert (pid.get(5), pid.get(5, 2)) == ("DUPONT*FILS", "Jean"), "an escaped component separator is text"
    assert (obx.get(8, repetition=2), obx.repetitions(8), obx.get(40), obx.repetitions(40)) == ("HH", 2, "", 0)
    # a value without repetitions, components or subcomponents: itself as the first of each, nothing as any other
    assert (obx.get(5, 1, 1, 1), obx.get(5, 2), obx.get(5, 1, 2), obx.get(5, repetition=2), obx.get(5, 0)) == ("6.1", "", "", "", "")
    assert (msh.get(10, 2), pid.get(3, 1, 2), pid.get(5, 3), pid.get(3, 4, 4)) == ("", "", "", "")
    with pytest.raises(MessageError, match="is not a segment name"):
        Message("MSH|^~\\&|A|B\rpid|x")


@given(st.lists(st.text(), min_size=1, max_size=4))
def test_ids_derived_from_hl7_identifiers_are_the_uuid5_they_always_were(parts: list[str]) -> None:
    """Written without uuid.UUID for speed: a store's ids from before must come out the same."""
    from rebond.hl7.mapping import NAMESPACE, derived_id

    assert derived_id(*parts) == str(uuid.uuid5(NAMESPACE, "|".join(parts)))


@given(st.text(), st.lists(st.text(), max_size=3))
def test_result_ids_keep_their_layout(order_key: str, parts: list[str]) -> None:
    """Version 8, the order's 64 bits then the result's, as first laid out with integers and uuid.UUID."""
    from rebond.hl7.mapping import result_id

    order = hashlib.blake2b(f"Observation|{order_key}".encode(), digest_size=8).digest()
    result = hashlib.blake2b("|".join(("Observation", order_key, *parts)).encode(), digest_size=8).digest()
    value = int.from_bytes(order + result, "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    made = result_id(order_key, *parts)
    assert made == str(uuid.UUID(int=value)) and uuid.UUID(made).version == 8
