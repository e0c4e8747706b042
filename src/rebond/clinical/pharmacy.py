"""The pharmacy's validation of prescriptions (« validation pharmaceutique »), ward by ward.

A hospital pharmacist reads every new prescription against the patient (allergies, the rest of
the treatment) and validates it, or writes to the prescriber. Here:

- the pharmacy's list (`worklist`) holds the active prescriptions of the inpatients whose
  current version no pharmacist has validated: ward by ward, patient by patient, the oldest first;
- « Valider » records a completed Task (code `urn:rebond:task|prescription-validation`) whose
  `focus` is the prescription and whose `input` names the version validated: once per version
  on a node (a double click, two pharmacists). A site node cut off and the central site may each
  record one; the first counts, and neither is a conflict to settle. A prescription changed
  since (stopped, or corrected through the API) is a new version, to be validated again;
- « Intervention » records a pharmaceutical intervention, coded (clinical/interventions.py), and
  tells the prescriber, who accepts or refuses it on the chart;
- « Écrire au prescripteur » is a message of the messaging (clinical/messaging.py), from the
  pharmacy, about the patient.

Validation does not hold up the care: a nurse gives a dose the pharmacy has not validated yet,
and the chart says which prescriptions wait for it.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from rebond.clinical.census import Allergy, allergies_by_patient
from rebond.clinical.conventions import PRESCRIPTION_VALIDATION, TASK_CODE_SYSTEM
from rebond.clinical.interventions import Intervention, of_prescriptions
from rebond.clinical.medication import Prescription, prescription
from rebond.clinical.messaging import is_hospital_service
from rebond.clinical.prescribing import allergens_of, conflicts_of
from rebond.clinical.records import (
    Clinician,
    PatientSummary,
    Resource,
    any_of,
    find,
    find_stored,
    instant,
    patient_summary,
    ref_id,
)
from rebond.clinical.results import Acknowledgement, acknowledgement_task
from rebond.clinical.wards import Ward, group_wards
from rebond.fhir import operations
from rebond.fhir.search import parse_search
from rebond.store.base import NotFound, PreconditionFailed, Session, Store

VALIDATED_TEXT = "Prescription validée par la pharmacie"


@dataclass(frozen=True)
class ToValidate:
    """A prescription on the pharmacy's list: as the pharmacist sees it, and the version they validate."""

    prescription: Prescription
    version: int
    patient: PatientSummary
    ward: Ward
    alerts: tuple[str, ...]  # the patient's known allergies it meets
    prescriber_ref: str | None  # the Practitioner, to write to
    pharmacy_ref: str | None = None  # the pharmacy of the ward's hospital, to write for
    interventions: tuple[Intervention, ...] = ()  # the pharmacy's on it, the latest first (clinical/interventions.py)


def _validated_version(task: Resource) -> int | None:
    return next((int(i["valueInteger"]) for i in task.get("input") or () if isinstance(i.get("valueInteger"), int)), None)


def validations(store: Store, current: Iterable[tuple[str, int]]) -> dict[str, Acknowledgement]:
    """The validation of each prescription's version given (request id, version), where there is one (the first)."""
    wanted = dict(current)
    ids = list(wanted)
    out: dict[str, Acknowledgement] = {}
    for start in range(0, len(ids), 500):
        focus = any_of(f"MedicationRequest/{rid}" for rid in ids[start:start + 500])
        tasks = find(store, "Task", ("focus", focus), ("code", f"{TASK_CODE_SYSTEM}|{PRESCRIPTION_VALIDATION}"), ("status", "completed"))
        for task in sorted(tasks, key=lambda t: str(t.get("authoredOn", ""))):
            rid = ref_id(task.get("focus"), "MedicationRequest")
            if rid is not None and rid not in out and _validated_version(task) == wanted.get(rid):
                out[rid] = Acknowledgement(str((task.get("owner") or {}).get("display", "")), instant(task.get("authoredOn")))
    return out


def validate(store: Store, request_id: str, version: int, clinician: Clinician, now: dt.datetime) -> Acknowledgement:
    """Validate a prescription as the pharmacist saw it (`version`): once. PreconditionFailed if it has changed since
    (they look again); NotFound if it is no active prescription."""

    def save(tx: Session) -> None:
        tx.lock(f"prescription-validation:{request_id}")  # two pharmacists at once: the second finds the first's
        stored = tx.read("MedicationRequest", request_id)
        if stored is None or stored.deleted or stored.body is None:
            raise NotFound(f"no MedicationRequest/{request_id}")
        if stored.version != version:
            raise PreconditionFailed(f"MedicationRequest/{request_id} changed since it was shown")
        request: Resource = orjson.loads(stored.body)
        if request.get("status") != "active":
            raise NotFound(f"MedicationRequest/{request_id} is not active")
        query = parse_search("Task", [("focus", f"MedicationRequest/{request_id}"),
                                      ("code", f"{TASK_CODE_SYSTEM}|{PRESCRIPTION_VALIDATION}")])
        for task_id in tx.search_ids(query, limit=100):
            earlier = tx.read("Task", task_id)
            if earlier is not None and earlier.body is not None and _validated_version(orjson.loads(earlier.body)) == version:
                return
        task = acknowledgement_task(request, clinician.reference(), now, str(uuid.uuid4()), PRESCRIPTION_VALIDATION, VALIDATED_TEXT)
        task["input"] = [{"type": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "validated-version"}],
                                   "text": "version validée"}, "valueInteger": version}]
        operations.create(tx, "Task", task, resource_id=task["id"])

    store.write(save)
    return validations(store, [(request_id, version)])[request_id]


def worklist(store: Store, hospital_id: str | None = None) -> list[tuple[Ward, list[list[ToValidate]]]]:
    """The active prescriptions of the inpatients that wait for the pharmacy's validation, ward by ward (of one hospital
    site, or all), patient by patient, the oldest first."""
    hospitals = [h for h in group_wards(store, count_inpatients=False) if hospital_id in (None, h.site_id)]
    wards = {w.id: w for h in hospitals for w, _n in h.wards}
    if not wards:
        return []
    site_of = {w.id: h.site_id for h in hospitals for w, _n in h.wards}
    pharmacies = _pharmacies(store, [h.site_id for h in hospitals])
    stays = find(store, "Encounter", ("location", any_of(f"Location/{w}" for w in wards)), ("status", "in-progress"),
                 ("_include", "Encounter:subject"))
    ward_of: dict[str, Ward] = {}
    for stay in stays:
        if stay.get("resourceType") != "Encounter":
            continue
        here = [wards[lid] for loc in stay.get("location") or () if loc.get("status", "active") == "active"
                and (lid := ref_id(loc.get("location"), "Location")) in wards]
        patient_id = ref_id(stay.get("subject"), "Patient")
        if here and patient_id:
            ward_of[patient_id] = here[0]
    if not ward_of:
        return []
    patients = {p["id"]: p for p in find(store, "Patient", ("_id", any_of(ward_of)))}
    requests = find_stored(store, "MedicationRequest", ("patient", any_of(f"Patient/{p}" for p in ward_of)), ("status", "active"))
    done = validations(store, [(r.id, r.version) for r in requests])
    waiting = [(r.version, orjson.loads(r.body)) for r in requests if r.id not in done and r.body]
    allergies: dict[str, list[Allergy]] = allergies_by_patient(store, list({ref_id(q.get("subject"), "Patient") or "" for _v, q in waiting}))
    allergens = allergens_of(store, [q.get("medicationCodeableConcept") or {} for _v, q in waiting])
    raised = of_prescriptions(store, [str(q["id"]) for _v, q in waiting])
    by_ward: dict[str, list[ToValidate]] = {}
    for version, request in waiting:
        patient_id = ref_id(request.get("subject"), "Patient") or ""
        if patient_id not in ward_of or patient_id not in patients:
            continue
        ward = ward_of[patient_id]
        met = conflicts_of(request, allergies.get(patient_id, []), allergens)
        requester = ref_id(request.get("requester"), "Practitioner")
        by_ward.setdefault(ward.id, []).append(ToValidate(
            prescription(request), version, patient_summary(patients[patient_id]), ward, tuple(a.substance for a in met),
            f"Practitioner/{requester}" if requester else None, pharmacies.get(site_of[ward.id]), tuple(raised.get(str(request["id"]), ()))))
    return [(wards[w], _by_patient(items)) for w, items in sorted(by_ward.items(), key=lambda kv: (wards[kv[0]].hospital, wards[kv[0]].name))]


def _by_patient(items: list[ToValidate]) -> list[list[ToValidate]]:
    """A ward's prescriptions to validate, patient by patient (a pharmacist reads a patient's treatment whole): the
    patient with the oldest first, and each patient's oldest first."""
    oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
    patients: dict[str, list[ToValidate]] = {}
    for item in sorted(items, key=lambda i: (i.prescription.authored or oldest, i.prescription.medication)):
        patients.setdefault(item.patient.id, []).append(item)
    return list(patients.values())


def _pharmacies(store: Store, site_ids: list[str]) -> dict[str, str]:
    """The pharmacy service of each hospital site (clinical/messaging.py: code `{site}-PHARMA`), by site id."""
    out: dict[str, str] = {}
    if not site_ids:
        return out
    for service in find(store, "HealthcareService", ("location", any_of(f"Location/{s}" for s in site_ids)), ("active", "true")):
        if is_hospital_service(service, "PHARMA"):
            site = next((ref_id(loc, "Location") for loc in service.get("location") or () if ref_id(loc, "Location") in site_ids), None)
            if site is not None:
                out.setdefault(site, f"HealthcareService/{service['id']}")
    return out
