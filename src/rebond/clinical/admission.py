"""Emergency admission at the bedside: a patient and a stay, with numbers that can never collide.

A site node cut off from the central site cannot ask the admissions system for an IPP. It takes
one from a range allocated to it in advance (`rebond site --ipp-range`); visit numbers carry the
site's name. If the person was already known under another IPP, the two records are merged later
(ADT A40), which moves everything recorded here onto the surviving patient.
"""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Mapping

from rebond.clinical.census import ward_occupancy
from rebond.clinical.conventions import GROUP_IPP_SYSTEM, GROUP_VISIT_SYSTEM
from rebond.clinical.patients import search_terms
from rebond.clinical.recording import InvalidForm
from rebond.clinical.records import Clinician, Entry, Resource, fhir_instant
from rebond.fhir import operations
from rebond.store.base import Session, Store

STATE = "site"
EMERGENCY_TAG = {"system": "urn:rebond:admission", "code": "emergency-admission", "display": "Admission en urgence en mode dégradé"}
_allocating = threading.Lock()


class NoNumberRange(RuntimeError):
    """This node has no IPP range: admissions come from the admissions system."""


class RangeExhausted(RuntimeError):
    """Every number of the range is used: IT allocates a new one."""


def set_ipp_range(store: Store, first: int, last: int) -> None:
    if not 0 < first <= last:
        raise ValueError(f"'{first}-{last}' is not a range of IPP numbers")
    current = store.get_state(STATE, "ipp-range")
    if current and current["first"] == first and current["last"] == last:
        return
    store.put_state(STATE, "ipp-range", {"first": first, "last": last, "next": first})


def ipp_range(store: Store) -> dict[str, int] | None:
    value = store.get_state(STATE, "ipp-range")
    return dict(value) if value else None


def emergency_admission(store: Store, ward_id: str, form: Mapping[str, str], clinician: Clinician, now: dt.datetime) -> str:
    """Register a patient and open their stay in a bed of the ward; returns the Patient id. InvalidForm when refused.

    The form sent again (its `entry` recorded already) admits no one twice: the Patient it registered is returned."""
    entry = Entry.of(form.get("entry"))
    if store.read("Patient", entry.id("Patient")) is not None:  # checked first: the bed it took is no longer free
        return entry.id("Patient")
    problems: dict[str, str] = {}
    family, given = (form.get("family") or "").strip(), (form.get("given") or "").strip()
    if not family:
        problems["family"] = "required"
    born = None
    try:
        terms = search_terms(form.get("birth_date") or "")
        born = next((v for k, v in terms if k == "birthdate"), None)
    except ValueError:
        born = None
    if born is None:
        problems["birth_date"] = "not-a-date"
    elif dt.date.fromisoformat(born) > now.date():
        problems["birth_date"] = "in-the-future"
    gender = form.get("gender", "")
    if gender not in ("female", "male", "other", "unknown"):
        problems["gender"] = "choose-one"
    census = ward_occupancy(store, ward_id, now)
    free = {line.bed_id: line.bed for line in census.beds if line.patient is None and line.bed_id}
    bed_id = form.get("bed", "")
    if bed_id and bed_id not in free:
        problems["bed"] = "bed-taken"
    if problems:
        raise InvalidForm(problems)
    if ipp_range(store) is None:
        raise NoNumberRange("this node has no IPP range (rebond site --ipp-range FIRST-LAST)")
    with _allocating:  # one number for one admission, even with two nurses at once

        def admit(tx: Session) -> str:
            if entry.recorded(tx, "Patient", "Patient"):  # the same form, sent twice at once
                return entry.id("Patient")
            numbers = ipp_range(store)
            assert numbers is not None
            if numbers["next"] > numbers["last"]:
                raise RangeExhausted(f"the IPP range {numbers['first']}-{numbers['last']} is used up")
            ipp = str(numbers["next"])
            tx.put_state(STATE, "ipp-range", {**numbers, "next": numbers["next"] + 1})
            patient: Resource = {
                "resourceType": "Patient", "id": entry.id("Patient"), "active": True, "meta": {"tag": [EMERGENCY_TAG]},
                "identifier": [{"use": "usual", "system": GROUP_IPP_SYSTEM, "value": ipp,
                                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PI"}],
                                         "text": "IPP"}}],
                "name": [{"use": "official", "family": family, **({"given": [given]} if given else {})}],
                "gender": gender, "birthDate": born,
            }
            operations.create(tx, "Patient", patient, resource_id=patient["id"])
            places = [{"location": {"reference": f"Location/{ward_id}", "display": census.ward.name}, "status": "active",
                       "period": {"start": fhir_instant(now)}}]
            if bed_id:
                places.insert(0, {"location": {"reference": f"Location/{bed_id}", "display": free[bed_id]}, "status": "active",
                                  "period": {"start": fhir_instant(now)}})
            encounter: Resource = {
                "resourceType": "Encounter", "id": entry.id("Encounter"), "status": "in-progress",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER", "display": "urgences"},
                "identifier": [{"system": GROUP_VISIT_SYSTEM, "value": f"{store.site_id}-U{ipp}"}],
                "subject": {"reference": f"Patient/{patient['id']}"}, "period": {"start": fhir_instant(now)}, "location": places,
                "participant": [{"individual": clinician.reference()}],
            }
            operations.create(tx, "Encounter", encounter, resource_id=encounter["id"])
            return str(patient["id"])

        return store.write(admit)

