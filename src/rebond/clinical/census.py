"""The ward census: every bed of a ward, who lies in it, and what needs attention now."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from rebond.clinical.interventions import of_prescriptions
from rebond.clinical.medication import administration, dose_schedule, prescription
from rebond.clinical.prescribing import allergens_of, conflicts_of, is_new, seen
from rebond.clinical.records import (
    PatientSummary,
    Resource,
    any_of,
    concept_text,
    fhir_instant,
    find,
    find_with_included,
    has_code,
    instant,
    patient_summary,
    person_name,
    read,
    ref_id,
)
from rebond.clinical.results import reports
from rebond.clinical.wards import Ward, is_kind
from rebond.store.base import NotFound, Store

#: abnormal results older than this no longer raise a census alert (they stay in the chart and the results portal)
ALERT_WINDOW = dt.timedelta(days=7)
#: how far back the census looks for doses that were not recorded
LATE_DOSE_WINDOW = dt.timedelta(hours=12)


@dataclass(frozen=True)
class Allergy:
    substance: str
    criticality: str  # high, low, unable-to-assess
    codes: tuple[tuple[str, str], ...] = ()  # (system, code) of its substance, to check prescriptions against


@dataclass
class Stay:
    encounter_id: str
    patient_id: str
    admitted: dt.datetime | None
    attending: str
    bed_id: str | None
    ward_id: str | None


@dataclass
class BedLine:
    bed_id: str
    bed: str
    patient: PatientSummary | None = None
    stay: Stay | None = None
    allergies: list[Allergy] = field(default_factory=list)
    abnormal_results: list[str] = field(default_factory=list)  # analytes of reports not yet acknowledged
    reports_to_acknowledge: int = 0
    critical_results: bool = False  # among them, a result flagged critical (HH, LL, AA)
    doses_due: int = 0
    doses_late: int = 0
    new_prescriptions: int = 0  # written in the last NEW_PRESCRIPTION_WINDOW and not yet read by a nurse
    allergy_prescriptions: list[str] = field(default_factory=list)  # active prescriptions meeting a known allergy
    pharmacy_problems: list[str] = field(default_factory=list)  # active prescriptions with an intervention not answered yet


@dataclass
class WardCensus:
    ward: Ward
    beds: list[BedLine]
    as_of: dt.datetime

    @property
    def occupied(self) -> int:
        return sum(1 for b in self.beds if b.patient is not None)


def ward_of(store: Store, ward_id: str) -> Ward:
    location = read(store, "Location", ward_id)
    if location is None or not is_kind(location, "wa"):
        raise NotFound(f"no ward Location/{ward_id}")
    hospital_id = ref_id(location.get("managingOrganization"), "Organization")
    hospital = read(store, "Organization", hospital_id) if hospital_id else None
    return Ward(ward_id, str(location.get("name", "")), str((location.get("alias") or [""])[0]),
                str((hospital or {}).get("name", "")), hospital_id)


def stay(encounter: Resource, practitioners: dict[str, Resource], beds: set[str]) -> Stay:
    """An inpatient stay: its current bed and ward (the active locations), its attending physician."""
    bed_id = ward_id = None
    for loc in encounter.get("location") or ():
        if loc.get("status", "active") != "active":
            continue
        lid = ref_id(loc.get("location"), "Location")
        if lid is not None and lid in beds:
            bed_id = lid
        else:
            ward_id = ward_id or lid
    attending = ""
    for participant in encounter.get("participant") or ():
        pid = ref_id(participant.get("individual"), "Practitioner")
        if pid is not None:
            attending = person_name(practitioners.get(pid)) or str(participant["individual"].get("display", ""))
            break
    return Stay(encounter["id"], ref_id(encounter.get("subject"), "Patient") or "",
                instant((encounter.get("period") or {}).get("start")), attending, bed_id, ward_id)


def beds_of(store: Store, ward_id: str) -> list[Resource]:
    rooms = find(store, "Location", ("partof", f"Location/{ward_id}"))
    beds = [r for r in rooms if is_kind(r, "bd")]  # beds straight under the ward
    room_ids = [r["id"] for r in rooms if not is_kind(r, "bd")]
    if room_ids:
        beds += [b for b in find(store, "Location", ("partof", any_of(f"Location/{r}" for r in room_ids))) if is_kind(b, "bd")]
    return sorted(beds, key=lambda b: str(b.get("name", "")))


def allergies_by_patient(store: Store, patient_ids: list[str]) -> dict[str, list[Allergy]]:
    out: dict[str, list[Allergy]] = {}
    if not patient_ids:
        return out
    for allergy in find(store, "AllergyIntolerance", ("patient", any_of(f"Patient/{p}" for p in patient_ids))):
        status = allergy.get("clinicalStatus")
        if status and not has_code(status, "active"):
            continue
        pid = ref_id(allergy.get("patient"), "Patient")
        if pid is not None:
            code = allergy.get("code") or {}
            codes = tuple((str(c.get("system", "")), str(c["code"])) for c in code.get("coding") or () if c.get("code"))
            out.setdefault(pid, []).append(Allergy(concept_text(code), str(allergy.get("criticality", "")), codes))
    for listed in out.values():
        listed.sort(key=lambda a: (a.criticality != "high", a.substance))
    return out


def ward_census(store: Store, ward_id: str, now: dt.datetime) -> WardCensus:
    """Every bed, who lies in it, and the alerts of each inpatient."""
    census = ward_occupancy(store, ward_id, now)
    occupied = [line for line in census.beds if line.patient is not None]
    _alerts(store, occupied, [line.patient.id for line in occupied if line.patient is not None], now)
    return census


def ward_occupancy(store: Store, ward_id: str, now: dt.datetime) -> WardCensus:
    """Every bed and who lies in it, without the alerts (for pages that only need to know who is where)."""
    ward = ward_of(store, ward_id)
    beds = beds_of(store, ward_id)
    bed_ids = {b["id"] for b in beds}
    lines = {b["id"]: BedLine(b["id"], str(b.get("name", ""))) for b in beds}
    encounters, included = find_with_included(store, "Encounter", ("location", f"Location/{ward_id}"), ("status", "in-progress"),
                                              ("_include", "Encounter:subject"), ("_include", "Encounter:participant"))
    patients = {r["id"]: r for r in included if r["resourceType"] == "Patient"}
    practitioners = {r["id"]: r for r in included if r["resourceType"] == "Practitioner"}
    unplaced: list[BedLine] = []  # in the ward but in no bed of it (a stretcher, a corridor): still on the census
    for encounter in encounters:
        current = stay(encounter, practitioners, bed_ids)
        patient = patients.get(current.patient_id)
        if patient is None:
            continue
        line = lines.get(current.bed_id or "")
        if line is None or line.patient is not None:
            line = BedLine("", "—")
            unplaced.append(line)
        line.patient, line.stay = patient_summary(patient), current
    return WardCensus(ward, [*lines.values(), *unplaced], now)


def _alerts(store: Store, occupied: list[BedLine], patient_ids: list[str], now: dt.datetime) -> None:
    if not patient_ids:
        return
    by_patient = {line.patient.id: line for line in occupied if line.patient is not None}
    for pid, found in allergies_by_patient(store, patient_ids).items():
        by_patient[pid].allergies = found
    patients = any_of(f"Patient/{p}" for p in patient_ids)
    for report in reports(store, ("patient", patients), ("issued", f"ge{fhir_instant(now - ALERT_WINDOW)}")):
        line = by_patient.get(report.patient_id or "")
        if line is None or report.acknowledgement is not None or not report.abnormal:
            continue
        line.reports_to_acknowledge += 1
        for result in report.abnormal:
            if result.name not in line.abnormal_results:
                line.abnormal_results.append(result.name)
            line.critical_results = line.critical_results or result.critical
    requests = find(store, "MedicationRequest", ("patient", patients), ("status", "active"))
    given = find(store, "MedicationAdministration", ("patient", patients),
                 ("effective-time", f"ge{fhir_instant(now - LATE_DOSE_WINDOW - dt.timedelta(hours=3))}"))
    administrations = [a for a in (administration(r) for r in given) if a is not None]
    patient_of_request = {r["id"]: ref_id(r.get("subject"), "Patient") for r in requests}
    allergic = [r for r in requests if (line := by_patient.get(patient_of_request[r["id"]] or "")) is not None and line.allergies]
    allergens = allergens_of(store, (r.get("medicationCodeableConcept") or {} for r in allergic)) if allergic else {}
    new = [r["id"] for r in requests if is_new(instant(r.get("authoredOn")), now)]
    read_already = seen(store, new) if new else {}
    raised = {rid for rid, found in of_prescriptions(store, [r["id"] for r in requests]).items() if any(i.outcome is None for i in found)}
    for request in requests:
        line = by_patient.get(patient_of_request[request["id"]] or "")
        if line is None:
            continue
        if request["id"] in new and request["id"] not in read_already:
            line.new_prescriptions += 1
        if line.allergies and conflicts_of(request, line.allergies, allergens):
            line.allergy_prescriptions.append(concept_text(request.get("medicationCodeableConcept")))
        if request["id"] in raised:
            line.pharmacy_problems.append(concept_text(request.get("medicationCodeableConcept")))
    for dose in dose_schedule([prescription(r) for r in requests], administrations, now - LATE_DOSE_WINDOW, now + dt.timedelta(hours=1), now):
        line = by_patient.get(patient_of_request.get(dose.prescription.id) or "")
        if line is None:
            continue
        if dose.state == "due":
            line.doses_due += 1
        elif dose.state == "late":
            line.doses_late += 1
