"""HL7 v2 to FHIR, inside one store transaction: admissions and moves (IHE PAM, French profile) and results (ORU^R01).

Resources an interface creates get ids derived from the identifiers the message carries
(UUID v5), so the same message gives the same resources on every node; resources that
already exist (the demo group, another interface) are found by identifier first. The results
of one order share the first half of their ids (`result_id`), so that their rows sit side by
side in the store's indexes: a lab panel's commit rewrites one index page where it rewrote one
a result.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from rebond.clinical.conventions import (
    GROUP_IPP_SYSTEM,
    GROUP_VISIT_SYSTEM,
    INTERPRETATION,
    LOCATION_SYSTEM,
    LOINC,
    OBSERVATION_CATEGORY,
    REPORT_SECTION,
    RPPS_SYSTEM,
    UCUM,
)
from rebond.clinical.messaging import CRITICAL_RESULT
from rebond.clinical.records import fhir_instant, person_name, ref_id
from rebond.fhir import operations
from rebond.fhir.errors import FhirError
from rebond.fhir.search import literal, parse_search
from rebond.hl7 import critical
from rebond.hl7.message import Message, MessageError, Segment, hl7_time
from rebond.pickled import by_fields
from rebond.store.base import Session

Resource = dict[str, Any]
NAMESPACE = uuid.UUID("5a1e0c3e-7d2b-4c61-9c55-2b0f6f1d6e01")  # Rebond's namespace for ids derived from HL7 identifiers
MOVEMENT_EXTENSION = "urn:rebond:hl7:movement-id"
PROVISIONAL_TAG = {"system": "urn:rebond:hl7", "code": "provisional-patient",
                   "display": "Patient créé depuis un résultat, en attente de l'admission"}
ADT_EVENTS = {"A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A12", "A13", "A21", "A22", "A28", "A31", "A38",
              "A40", "A47", "A52", "A53", "Z99"}
PATIENT_CLASS = {"I": ("IMP", "hospitalisation complète"), "O": ("AMB", "consultation externe"), "E": ("EMER", "urgences"),
                 "R": ("AMB", "séances"), "N": ("AMB", "non applicable"), "B": ("AMB", "obstétrique")}
SEX = {"M": "male", "F": "female", "U": "unknown", "O": "other", "A": "other", "N": "unknown"}
REPORT_STATUS = {"P": "preliminary", "F": "final", "C": "corrected", "X": "cancelled", "I": "registered", "R": "partial",
                 "S": "partial", "A": "partial", "O": "registered"}
RESULT_STATUS = {"P": "preliminary", "F": "final", "C": "corrected", "X": "cancelled", "D": "entered-in-error", "W": "entered-in-error",
                 "R": "preliminary", "S": "preliminary", "I": "registered", "U": "final"}
FLAGS = {"H", "L", "HH", "LL", "A", "AA", "N", "<", ">", "HU", "LU", "U", "D", "B", "W", "S", "R", "I"}


_NAMESPACE_BYTES = NAMESPACE.bytes


def _uuid(raw: bytes, version: int) -> str:
    """16 bytes as the text of a UUID of this version (RFC 9562 variant), as `str(uuid.UUID(bytes=raw, version=...))`
    writes it, without making the object: a lab panel's draft makes a dozen ids (2.1 against 4.3 µs for uuid5)."""
    marked = bytearray(raw)
    marked[6] = (marked[6] & 0x0F) | (version << 4)
    marked[8] = (marked[8] & 0x3F) | 0x80
    digits = marked.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def derived_id(*parts: str) -> str:
    """uuid.uuid5(NAMESPACE, "|".join(parts)) as text (tests/test_hl7.py checks they agree)."""
    return _uuid(hashlib.sha1(_NAMESPACE_BYTES + "|".join(parts).encode()).digest()[:16], 5)


def result_id(order_key: str, *parts: str) -> str:
    """The id of one result of an order: a UUID (version 8: laid out by Rebond) whose first 64 bits come from the order
    alone and the last 64 from the result, so that an order's results are neighbours in every index of ids."""
    order = hashlib.blake2b(f"Observation|{order_key}".encode(), digest_size=8).digest()
    result = hashlib.blake2b("|".join(("Observation", order_key, *parts)).encode(), digest_size=8).digest()
    return _uuid(order + result, 8)


@dataclass
class Applied:
    """What a message changed, for the inbox record and the logs (ids only: no patient identity)."""

    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __init__(self, written: list[str] | None = None, notes: list[str] | None = None) -> None:  # compiled (NATIVE_INIT)
        self.written = [] if written is None else written
        self.notes = [] if notes is None else notes

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)

    def summary(self) -> str:
        return "; ".join([*self.notes, ", ".join(self.written)])


def recorded(resource: Resource) -> Resource:
    """A resource as a write gives it: without the version and time the store stamps (nor a meta left empty)."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    out = {k: v for k, v in resource.items() if k != "meta"}
    if meta:
        out["meta"] = meta
    return out


class Writer:
    """Reads and writes of one message, in its transaction."""

    def __init__(self, tx: Session, applied: Applied) -> None:
        self.tx = tx
        self.applied = applied

    def find_one(self, resource_type: str, *params: tuple[str, str]) -> Resource | None:
        ids = self.tx.search_ids(parse_search(resource_type, list(params)))
        if not ids:
            return None
        stored = self.tx.read(resource_type, ids[0])
        return orjson.loads(stored.body) if stored is not None and stored.body else None

    def find(self, resource_type: str, *params: tuple[str, str], limit: int = 50) -> list[Resource]:
        found = (self.tx.read(resource_type, rid) for rid in self.tx.search_ids(parse_search(resource_type, list(params)), limit=limit))
        return [orjson.loads(stored.body) for stored in found if stored is not None and stored.body]

    def read(self, resource_type: str, resource_id: str) -> Resource | None:
        stored = self.tx.read(resource_type, resource_id)
        return orjson.loads(stored.body) if stored is not None and stored.body else None

    def save(self, resource: Resource) -> None:
        clean = recorded(resource)
        try:
            operations.update(self.tx, clean["resourceType"], clean["id"], clean)
        except FhirError as err:
            raise MessageError(f"the {clean['resourceType']} it gives is not valid FHIR: {err.message}", code=207) from None
        self.applied.written.append(f"{clean['resourceType']}/{clean['id']}")


# -- patients


def _identifier(segment: Segment, field_no: int, repetition: int) -> tuple[str, str, str] | None:
    """(system, value, type code) of one CX repetition."""
    value = segment.get(field_no, 1, repetition=repetition)
    if not value:
        return None
    oid = segment.get(field_no, 4, 2, repetition=repetition)
    authority = segment.get(field_no, 4, 1, repetition=repetition)
    kind = segment.get(field_no, 5, repetition=repetition)
    system = f"urn:oid:{oid}" if oid else (f"urn:rebond:hl7:{authority}" if authority else GROUP_IPP_SYSTEM)
    return system, value, kind


def patient_identifier(segment: Segment, field_no: int = 3) -> tuple[str, str]:
    """The IPP: the repetition typed PI (or the first one)."""
    found = [i for i in (_identifier(segment, field_no, r) for r in range(1, segment.repetitions(field_no) + 1)) if i]
    if not found:
        raise MessageError(f"{segment.where(field_no)} (patient identifier) is empty", code=101, location=segment.where(field_no))
    ipp = next((i for i in found if i[2] == "PI"), found[0])
    return ipp[0], ipp[1]


def _patient_fields(pid: Segment) -> Resource:
    out: Resource = {}
    names = []
    for r in range(1, max(1, pid.repetitions(5)) + 1):
        family, given = pid.get(5, 1, repetition=r), pid.get(5, 2, repetition=r)
        if not family and not given:
            continue
        name: Resource = {"use": "maiden" if pid.get(5, 7, repetition=r) == "M" else "official"}
        if family:
            name["family"] = family
        givens = [g for g in (given, pid.get(5, 3, repetition=r)) if g]
        if givens:
            name["given"] = givens
        if pid.get(5, 5, repetition=r):
            name["prefix"] = [pid.get(5, 5, repetition=r)]
        names.append(name)
    if names:
        out["name"] = names
    born = hl7_time(pid.get(7))
    if born is not None:
        out["birthDate"] = born.date().isoformat()
    if pid.get(8):
        if pid.get(8) not in SEX:
            raise MessageError(f"PID-8 '{pid.get(8)}' is not a sex of table 0001", code=103, location="PID-8")
        out["gender"] = SEX[pid.get(8)]
    address = {k: v for k, v in (("line", [pid.get(11, 1)] if pid.get(11, 1) else None), ("city", pid.get(11, 3)),
                                 ("postalCode", pid.get(11, 5)), ("country", pid.get(11, 6))) if v}
    if address:
        out["address"] = [address]
    phone = pid.get(13, 1) or pid.get(13, 12)
    if phone:
        out["telecom"] = [{"system": "phone", "value": phone}]
    died = hl7_time(pid.get(29))
    if died is not None:
        out["deceasedDateTime"] = fhir_instant(died)
    elif pid.get(30) == "Y":
        out["deceasedBoolean"] = True
    return out


#: merges followed from a record to its survivor, and records found for one identifier, at most
MERGED_AT_MOST = 10


def find_patient(w: Writer, system: str, value: str) -> Resource | None:
    """The patient of an identifier. A record merged away (A40: inactive, `replaced-by`) leads to its survivor, which
    also holds the old identifier: a result sent with a merged IPP goes where the merged data went. Two patients that
    are not the same person holding one identifier: refused (AR), since a person must merge them first."""
    ids = w.tx.search_ids(parse_search("Patient", [("identifier", f"{system}|{literal(value)}")]), limit=MERGED_AT_MOST)
    found: dict[str, Resource] = {}
    for rid in ids:
        patient = _survivor(w, w.read("Patient", rid))
        if patient is not None:
            found[str(patient["id"])] = patient
    if len(found) > 1:
        raise MessageError(f"{len(found)} patients hold the identifier {value} of PID-3: merge them (A40), then send this "
                           "message again", code=205, location="PID-3")
    return next(iter(found.values()), None)


def _survivor(w: Writer, patient: Resource | None) -> Resource | None:
    """A patient, or the one its record was merged into (`replaced-by`, followed along a chain of merges)."""
    for _ in range(MERGED_AT_MOST):
        if patient is None or patient.get("active") is not False:
            return patient
        onward = next((ref_id(link.get("other"), "Patient") for link in patient.get("link") or ()
                       if link.get("type") == "replaced-by"), None)
        if onward is None:
            return patient
        patient = w.read("Patient", onward)
    return patient


def upsert_patient(w: Writer, pid: Segment, *, provisional: bool = False) -> Resource:
    system, value = patient_identifier(pid)
    found = find_patient(w, system, value)
    fields = _patient_fields(pid)
    before = recorded(found) if found is not None else None
    if found is None:
        patient: Resource = {
            "resourceType": "Patient", "id": derived_id("Patient", system, value), "active": True,
            "identifier": [{"use": "usual", "system": system, "value": value,
                            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PI"}],
                                     "text": "IPP"}}]}
        if provisional:
            patient["meta"] = {"tag": [PROVISIONAL_TAG]}
            w.applied.notes.append("provisional patient created from a result")
    else:
        patient = recorded(found)
        if not provisional:  # the admission completes a provisional patient
            tags = [t for t in patient.get("meta", {}).get("tag", []) if t.get("code") != PROVISIONAL_TAG["code"]]
            patient.pop("meta", None)
            if tags:
                patient["meta"] = {"tag": tags}
    if provisional and patient.get("name") and fields.get("name"):
        fields.pop("name")  # a result does not rename a known patient
    patient.update(fields)
    if patient != before:
        w.save(patient)
    return patient


# -- stays and movements


def _location_ref(w: Writer, code: str) -> Resource | None:
    if not code:
        return None
    found = w.find_one("Location", ("identifier", f"{LOCATION_SYSTEM}|{literal(code)}"))
    if found is not None:
        return {"reference": f"Location/{found['id']}", "display": str(found.get("name", code))}
    return {"display": code}  # a place the group's directory does not know yet: kept by name


def _places(w: Writer, pv1: Segment, field_no: int = 3) -> list[Resource]:
    """The bed (or room) and the ward of a PL field, most precise first."""
    ward, room, bed = pv1.get(field_no, 1), pv1.get(field_no, 2), pv1.get(field_no, 3)
    places = [_location_ref(w, bed or room), _location_ref(w, ward)]
    return [p for p in places if p is not None]


def _movement_time(msg: Message, pv1: Segment | None) -> str:
    zbe, evn = msg.segment("ZBE"), msg.segment("EVN")
    for value in ((zbe.get(2) if zbe else ""), (evn.get(6) if evn else ""), (evn.get(2) if evn else ""),
                  msg.require("MSH").get(7)):
        moment = hl7_time(value)
        if moment is not None:
            return fhir_instant(moment)
    raise MessageError("no movement date/time (ZBE-2, EVN-6, EVN-2 or MSH-7)", code=101, location="ZBE-2")


def _visit(pv1: Segment) -> tuple[str, str]:
    value = pv1.get(19, 1)
    if not value:
        raise MessageError("PV1-19 (visit number) is empty", code=101, location="PV1-19")
    oid = pv1.get(19, 4, 2)
    return (f"urn:oid:{oid}" if oid else GROUP_VISIT_SYSTEM), value


def find_encounter(w: Writer, pv1: Segment) -> Resource | None:
    system, value = _visit(pv1)
    return w.find_one("Encounter", ("identifier", f"{system}|{literal(value)}"))


def _new_encounter(pv1: Segment, patient: Resource) -> Resource:
    system, value = _visit(pv1)
    return {"resourceType": "Encounter", "id": derived_id("Encounter", system, value), "status": "in-progress",
            "identifier": [{"system": system, "value": value}], "subject": {"reference": f"Patient/{patient['id']}"},
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}, "location": []}


def _set_class(encounter: Resource, pv1: Segment) -> None:
    code = pv1.get(2)
    if not code:
        return
    if code not in PATIENT_CLASS:
        raise MessageError(f"PV1-2 '{code}' is not a patient class of table 0004", code=103, location="PV1-2")
    act, display = PATIENT_CLASS[code]
    encounter["class"] = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": act, "display": display}


def practitioner(w: Writer, segment: Segment, field_no: int) -> Resource | None:
    """A physician of an XCN field (PV1-7 attending, ORC-12 or OBR-16 ordering) as a reference: to the Practitioner of
    its number (XCN-1, RPPS unless XCN-9 names another authority's OID) when the store knows them, so that their box is
    reached (clinical/escalation.py); else their name and number as written. None for an empty field."""
    number, family, given = segment.get(field_no, 1), segment.get(field_no, 2), segment.get(field_no, 3)
    if not number and not family:
        return None
    name = " ".join(p for p in (segment.get(field_no, 6) or "Dr", given, family.upper()) if p) if family else ""
    out: Resource = {}
    if number:
        authority = segment.get(field_no, 9, 2)
        system = f"urn:oid:{authority}" if authority else RPPS_SYSTEM
        known = w.find_one("Practitioner", ("identifier", f"{system}|{literal(number)}"))
        if known is not None:
            out["reference"] = f"Practitioner/{known['id']}"
            name = name or person_name(known)
        else:
            out["identifier"] = {"system": system, "value": number}
    if name:
        out["display"] = name
    return out


def _set_attending(w: Writer, encounter: Resource, pv1: Segment) -> None:
    attending = practitioner(w, pv1, 7)
    if attending is None:
        return
    others = [p for p in encounter.get("participant", []) if not any(
        c.get("code") == "ATND" for t in p.get("type", []) for c in t.get("coding", []))]
    encounter["participant"] = [{"type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                                        "code": "ATND"}], "text": "Médecin référent"}],
                                 "individual": attending}, *others]


def _close_active(encounter: Resource, at: str) -> list[Resource]:
    closed = []
    for loc in encounter.get("location", []):
        if loc.get("status") == "active":
            loc["status"] = "completed"
            loc.setdefault("period", {})["end"] = at
            closed.append(loc)
    return closed


def _move_in(encounter: Resource, places: list[Resource], at: str, movement: str) -> None:
    for place in places:
        entry: Resource = {"location": place, "status": "active", "period": {"start": at}}
        if movement:
            entry["extension"] = [{"url": MOVEMENT_EXTENSION, "valueString": movement}]
        encounter.setdefault("location", []).append(entry)


def _undo_last_move(encounter: Resource) -> None:
    """Cancel the last movement: drop the active places, put back the ones it closed."""
    locations = encounter.get("location", [])
    remaining = [loc for loc in locations if loc.get("status") != "active"]
    if remaining:
        last_end = max(loc.get("period", {}).get("end", "") for loc in remaining)
        for loc in remaining:
            if loc.get("period", {}).get("end", "") == last_end:
                loc["status"] = "active"
                loc["period"].pop("end", None)
    encounter["location"] = remaining


def apply_adt(w: Writer, msg: Message, trigger: str) -> None:
    if trigger not in ADT_EVENTS:
        raise MessageError(f"ADT^{trigger} is not handled (IHE PAM events: {', '.join(sorted(ADT_EVENTS))})", code=201,
                           location="MSH-9")
    pid = msg.require("PID")
    if trigger == "A40":
        return _merge(w, msg, pid)
    if trigger == "A47":
        return _change_identifier(w, msg, pid)
    patient = upsert_patient(w, pid)
    if trigger in ("A28", "A31"):
        return None
    pv1 = msg.require("PV1")
    zbe = msg.segment("ZBE")
    movement = zbe.get(1) if zbe else ""
    at = _movement_time(msg, pv1)
    encounter = find_encounter(w, pv1)
    if encounter is None:
        if trigger not in ("A01", "A04", "A05", "A06", "A07", "A08"):
            raise MessageError(f"ADT^{trigger} refers to a stay (PV1-19 {_visit(pv1)[1]}) that was never admitted", code=207,
                               location="PV1-19")
        encounter = _new_encounter(pv1, patient)
    encounter["subject"] = {"reference": f"Patient/{patient['id']}"}
    _set_class(encounter, pv1)
    _set_attending(w, encounter, pv1)
    places = _places(w, pv1)
    if trigger in ("A01", "A04", "A05"):
        encounter["status"] = "planned" if trigger == "A05" else "in-progress"
        admitted = hl7_time(pv1.get(44))
        start = fhir_instant(admitted) if admitted is not None else at
        encounter["period"] = {"start": start}
        if not any(loc.get("status") == "active" for loc in encounter.get("location", [])):
            _move_in(encounter, places, start, movement)
    elif trigger == "A02":
        _close_active(encounter, at)
        _move_in(encounter, places, at, movement)
    elif trigger == "A03":
        discharged = hl7_time(pv1.get(45))
        end = fhir_instant(discharged) if discharged is not None else at
        encounter["status"] = "finished"
        encounter.setdefault("period", {})["end"] = end
        _close_active(encounter, end)
    elif trigger in ("A11", "A38"):
        encounter["status"] = "entered-in-error" if trigger == "A11" else "cancelled"
        _close_active(encounter, at)
    elif trigger == "A12":
        _undo_last_move(encounter)
    elif trigger == "A13":
        encounter["status"] = "in-progress"
        encounter.get("period", {}).pop("end", None)
        _undo_last_move(encounter)
    elif trigger in ("A21", "A53"):
        encounter["status"] = "onleave"
    elif trigger in ("A22", "A52"):
        encounter["status"] = "in-progress"
    elif trigger in ("A06", "A07", "A08"):
        if not encounter.get("location") and places:
            _move_in(encounter, places, at, movement)
    elif trigger == "Z99":
        _correct_movement(encounter, places, at, zbe)
    w.save(encounter)


def _correct_movement(encounter: Resource, places: list[Resource], at: str, zbe: Segment | None) -> None:
    """Z99 (PAM FR): the movement ZBE-1 is corrected with the place and time this message gives."""
    if zbe is None or not zbe.get(1):
        raise MessageError("Z99 needs ZBE-1, the id of the movement it corrects", code=101, location="ZBE-1")
    target = [loc for loc in encounter.get("location", []) if any(
        e.get("url") == MOVEMENT_EXTENSION and e.get("valueString") == zbe.get(1) for e in loc.get("extension", []))]
    if not target:
        raise MessageError(f"movement '{zbe.get(1)}' (ZBE-1) is not known for this stay", code=207, location="ZBE-1")
    status = target[0].get("status", "active")
    encounter["location"] = [loc for loc in encounter["location"] if loc not in target]
    for place in places:
        encounter["location"].append({"location": place, "status": status, "period": {"start": at},
                                      "extension": [{"url": MOVEMENT_EXTENSION, "valueString": zbe.get(1)}]})


REFERRING_TYPES = (("Encounter", "subject"), ("Observation", "subject"), ("DiagnosticReport", "subject"),
                   ("AllergyIntolerance", "patient"), ("Condition", "subject"), ("MedicationRequest", "subject"),
                   ("MedicationAdministration", "subject"), ("DocumentReference", "subject"), ("ImagingStudy", "subject"),
                   ("ServiceRequest", "subject"), ("Procedure", "subject"), ("Task", "patient"))


def _merge(w: Writer, msg: Message, pid: Segment) -> None:
    """A40: the patient of MRG-1 was the same person as PID-3's. The surviving record takes the merged one's data."""
    mrg = msg.require("MRG")
    survivor = upsert_patient(w, pid)
    system, value = patient_identifier(mrg, 1)
    merged = find_patient(w, system, value)
    if merged is None:
        raise MessageError(f"the patient to merge (MRG-1 {value}) is not known", code=207, location="MRG-1")
    if merged["id"] == survivor["id"]:
        return
    moved = 0
    old_ref = f"Patient/{merged['id']}"
    for resource_type, param in REFERRING_TYPES:
        for rid in _all_ids(w.tx, resource_type, param, old_ref):
            resource = w.read(resource_type, rid)
            if resource is None:
                continue
            w.save(_repointed(resource, old_ref, f"Patient/{survivor['id']}"))
            moved += 1
    merged["active"] = False
    merged["link"] = [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
    links = [link for link in survivor.get("link", []) if link.get("other", {}).get("reference") != old_ref]
    survivor["link"] = [*links, {"other": {"reference": old_ref}, "type": "replaces"}]
    known = {(i.get("system"), i.get("value")) for i in survivor.get("identifier", [])}
    for ident in merged.get("identifier", []):
        if (ident.get("system"), ident.get("value")) not in known:
            survivor.setdefault("identifier", []).append({**ident, "use": "old"})
    w.save(merged)
    w.save(survivor)
    w.applied.notes.append(f"merged: {moved} records moved to the surviving patient")


def _all_ids(tx: Session, resource_type: str, param: str, reference: str) -> list[str]:
    return tx.search_ids(parse_search(resource_type, [(param, reference)]), limit=1_000_000)


def _repointed(resource: Resource, old: str, new: str) -> Resource:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (new if k == "reference" and v == old else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: Resource = walk(resource)
    return result


def _change_identifier(w: Writer, msg: Message, pid: Segment) -> None:
    """A47: the identifier MRG-1 was wrong; PID-3 is the right one."""
    mrg = msg.require("MRG")
    old_system, old_value = patient_identifier(mrg, 1)
    system, value = patient_identifier(pid)
    patient = find_patient(w, old_system, old_value)
    if patient is None:
        raise MessageError(f"no patient has the identifier MRG-1 {old_value}", code=207, location="MRG-1")
    for ident in patient.get("identifier", []):
        if ident.get("system") == old_system and ident.get("value") == old_value:
            ident["value"] = value
            ident["system"] = system
    w.save(patient)


# -- results


def _code(segment: Segment, field_no: int) -> Resource:
    code, text, system = segment.get(field_no, 1), segment.get(field_no, 2), segment.get(field_no, 3)
    if not code and not text:
        raise MessageError(f"{segment.where(field_no)} (code) is empty", code=101, location=segment.where(field_no))
    concept: Resource = {}
    if code:
        coding: Resource = {"code": code, "system": LOINC if system in ("LN", "LOINC") else f"urn:rebond:hl7:code:{system or 'local'}"}
        if text:
            coding["display"] = text
        concept["coding"] = [coding]
    if text:
        concept["text"] = text
    return concept


def _number(raw: str, where: str) -> float:
    try:
        return float(raw.replace(",", ".").strip())
    except ValueError:
        raise MessageError(f"{where} '{raw}' is not a number", code=102, location=where.split(" ")[0]) from None


def _quantity(value: float, unit: str) -> Resource:
    quantity: Resource = {"value": value}
    if unit:
        quantity.update({"unit": unit, "system": UCUM, "code": unit})
    return quantity


def _reference_range(raw: str, unit: str) -> list[Resource]:
    raw = raw.strip().replace(",", ".")
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)", raw)
    if match:
        return [{"low": _quantity(float(match[1]), unit), "high": _quantity(float(match[2]), unit)}]
    match = re.fullmatch(r"([<>])=?\s*(-?\d+(?:\.\d+)?)", raw)
    if match:
        return [{("high" if match[1] == "<" else "low"): _quantity(float(match[2]), unit)}]
    return [{"text": raw}] if raw else []


def _value(obx: Segment, observation: Resource) -> None:
    kind, raw, unit = obx.get(2), obx.get(5), obx.get(6)
    where = f"OBX-5 (set {obx.get(1) or obx.occurrence})"
    if not raw and kind not in ("CE", "CWE"):
        observation["dataAbsentReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                                       "code": "unknown"}]}
        return
    if kind == "NM":
        observation["valueQuantity"] = _quantity(_number(raw, where), unit)
    elif kind == "SN":
        comparator, first, separator, second = obx.get(5, 1), obx.get(5, 2), obx.get(5, 3), obx.get(5, 4)
        if separator in ("-",) and second:
            observation["valueRange"] = {"low": _quantity(_number(first, where), unit), "high": _quantity(_number(second, where), unit)}
        elif separator in (":", "/") and second:
            observation["valueRatio"] = {"numerator": {"value": _number(first, where)}, "denominator": {"value": _number(second, where)}}
        else:
            quantity = _quantity(_number(first, where), unit)
            if comparator in ("<", ">", "<=", ">="):
                quantity["comparator"] = comparator
            elif comparator not in ("", "="):
                raise MessageError(f"{where} comparator '{comparator}' is not <, >, <=, >= or =", code=102, location="OBX-5")
            observation["valueQuantity"] = quantity
    elif kind in ("ST", "TX", "FT"):
        observation["valueString"] = raw
    elif kind in ("CE", "CWE"):
        observation["valueCodeableConcept"] = _code(obx, 5)
    else:
        raise MessageError(f"OBX-2 value type '{kind}' is not handled (NM, SN, ST, TX, FT, CE, CWE)", code=102, location="OBX-2")


def _order_key(orc: Segment | None, obr: Segment) -> tuple[str, str]:
    placer = (orc.get(2) if orc else "") or obr.get(2)
    filler = (orc.get(3) if orc else "") or obr.get(3)
    if not placer and not filler:
        raise MessageError("the order has no placer (ORC-2/OBR-2) nor filler (ORC-3/OBR-3) number", code=101, location="OBR-3")
    return placer, filler


def apply_oru(w: Writer, msg: Message) -> None:
    pid = msg.require("PID")
    system, value = patient_identifier(pid)
    patient = find_patient(w, system, value)
    if patient is None:  # never dropped: the result waits on a provisional patient the admission will complete
        patient = upsert_patient(w, pid, provisional=True)
    pv1 = msg.segment("PV1")
    encounter = find_encounter(w, pv1) if pv1 is not None and pv1.get(19) else None
    subject = {"reference": f"Patient/{patient['id']}"}
    issued_default = hl7_time(msg.require("MSH").get(7))
    orc: Segment | None = None
    obr: Segment | None = None
    groups: list[tuple[Segment | None, Segment, list[Segment]]] = []
    last_obx: Segment | None = None
    notes: dict[tuple[str, int], list[str]] = {}
    for segment in msg.ordered():
        if segment.name == "ORC":
            orc = segment
        elif segment.name == "OBR":
            obr = segment
            groups.append((orc, obr, []))
            last_obx = None
        elif segment.name == "OBX":
            if obr is None:
                raise MessageError("OBX before any OBR", code=100, location="OBX")
            groups[-1][2].append(segment)
            last_obx = segment
        elif segment.name == "NTE" and last_obx is not None:
            notes.setdefault((last_obx.name, last_obx.occurrence), []).append(segment.get(3))
    if not groups:
        raise MessageError("an ORU^R01 needs at least one OBR", code=100, location="OBR")
    for order, request, results in groups:
        placer, filler = _order_key(order, request)
        key = filler or placer
        report_status = REPORT_STATUS.get(request.get(25) or "F")
        if report_status is None:
            raise MessageError(f"OBR-25 '{request.get(25)}' is not a result status of table 0123", code=103, location="OBR-25")
        effective = hl7_time(request.get(7)) or issued_default
        issued = hl7_time(request.get(22)) or issued_default
        # an order stored before results had `result_id`s keeps the ids it has (a correction makes new versions of them)
        earlier = w.read("DiagnosticReport", derived_id("DiagnosticReport", key)) or {}
        kept = {ref.get("reference", "").removeprefix("Observation/") for ref in earlier.get("result") or ()}
        observations = [_observation(obx, key, kept, subject, encounter, effective, notes.get((obx.name, obx.occurrence), []))
                        for obx in results]
        order_id = derived_id("ServiceRequest", key)
        w.tx.read_ahead([("ServiceRequest", order_id), *(("Observation", o["id"]) for o in observations)])
        service_request = w.read("ServiceRequest", order_id) or {
            "resourceType": "ServiceRequest", "id": order_id, "intent": "order", "subject": subject}
        service_request["identifier"] = [i for i in (
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}]}, "value": placer}
            if placer else None,
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}]}, "value": filler}
            if filler else None) if i]
        service_request.update({"status": "completed" if report_status in ("final", "corrected") else "active",
                                "code": _code(request, 4), "subject": subject})
        if encounter is not None:
            service_request["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
        requester = (practitioner(w, order, 12) if order is not None else None) or practitioner(w, request, 16)
        if requester is not None:
            service_request["requester"] = requester
        w.save(service_request)
        for observation in observations:
            w.save(observation)
        observation_refs = [{"reference": f"Observation/{o['id']}"} for o in observations]
        report: Resource = {
            "resourceType": "DiagnosticReport", "id": derived_id("DiagnosticReport", key), "status": report_status,
            "identifier": [{"value": key}], "basedOn": [{"reference": f"ServiceRequest/{service_request['id']}"}],
            "category": [_section(request.get(24))],
            "code": _code(request, 4), "subject": subject, "result": observation_refs,
        }
        if effective is not None:
            report["effectiveDateTime"] = fhir_instant(effective)
        if issued is not None:
            report["issued"] = fhir_instant(issued)
        if encounter is not None:
            report["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
        w.save(report)
        found = critical.critical(observations)  # the lab's call to the ward (hl7/critical.py)
        if found:
            _alert(w, msg, report, found, patient, encounter, service_request.get("requester"))


def _alert(w: Writer, msg: Message, report: Resource, found: list[Resource], patient: Resource, encounter: Resource | None,
           requester: Resource | None) -> None:
    """The urgent message for a report's critical results, once for the same values (a message sent again, replayed)."""
    alert_id = derived_id("Communication", CRITICAL_RESULT, report["id"], *(critical.describe(o) for o in found))
    if w.read("Communication", alert_id) is not None:
        return
    alert = critical.alert(w, report, found, patient, encounter, msg.require("MSH").get(4), dt.datetime.now(dt.UTC), alert_id,
                           prescriber=requester)
    if alert is None:
        w.applied.notes.append("critical result: no ward nor lab service to tell")
    else:
        w.save(alert)


IMAGING_SECTIONS = {"RAD", "RX", "CT", "MR", "NMR", "US", "NMS", "VUS", "XRC", "CUS", "RUS"}


def _section(code: str) -> Resource:
    """LAB or RAD, as the clinical views look for them; the sender's finer section (OBR-24: CH, HM, …) is kept beside."""
    main = "RAD" if code in IMAGING_SECTIONS else "LAB"
    codings = [{"system": REPORT_SECTION, "code": main}]
    if code and code != main:
        codings.append({"system": REPORT_SECTION, "code": code})
    return {"coding": codings}


def _observation(obx: Segment, order_key: str, kept: set[str], subject: Resource, encounter: Resource | None,
                 effective: Any, notes: list[str]) -> Resource:
    code = _code(obx, 3)
    status = RESULT_STATUS.get(obx.get(11) or "F")
    if status is None:
        raise MessageError(f"OBX-11 '{obx.get(11)}' is not an observation status of table 0085", code=103, location="OBX-11")
    identity = (code.get("coding") or [{}])[0].get("code") or code.get("text", "")
    earlier_id = derived_id("Observation", order_key, identity, obx.get(4)) if kept else ""
    observation: Resource = {
        "resourceType": "Observation", "id": earlier_id if earlier_id in kept else result_id(order_key, identity, obx.get(4)),
        "status": status,
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory"}]}], "code": code, "subject": subject,
    }
    _value(obx, observation)
    unit = obx.get(6)
    ranges = _reference_range(obx.get(7), unit)
    if ranges:
        observation["referenceRange"] = ranges
    flags = [f for f in (obx.get(8, repetition=r) for r in range(1, obx.repetitions(8) + 1)) if f]
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise MessageError(f"OBX-8 flag '{unknown[0]}' is not in table 0078", code=103, location="OBX-8")
    if flags:
        observation["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": f}]} for f in flags]
    moment = hl7_time(obx.get(14)) or effective
    if moment is not None:
        observation["effectiveDateTime"] = fhir_instant(moment)
        observation["issued"] = fhir_instant(moment)
    if encounter is not None:
        observation["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
    if notes:
        observation["note"] = [{"text": n} for n in notes if n]
    return observation


def apply_message(tx: Session, msg: Message) -> Applied:
    """Every FHIR write a message causes, in the caller's transaction."""
    header = msg.header()
    applied = Applied()
    w = Writer(tx, applied)
    if header.message_type == "ADT":
        apply_adt(w, msg, header.trigger)
    elif header.message_type == "ORU" and header.trigger == "R01":
        apply_oru(w, msg)
    else:
        raise MessageError(f"{header.message_type}^{header.trigger} is not handled here (ADT, ORU^R01)", code=200, location="MSH-9")
    return applied
