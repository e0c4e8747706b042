"""The patient chart: everything a clinician reads about one patient, gathered in one pass over the store."""
from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass, field, fields, replace

from rebond.clinical.census import Allergy, Stay, allergies_by_patient, stay
from rebond.clinical.conventions import OBSERVATION_CATEGORY
from rebond.clinical.interventions import of_prescriptions
from rebond.clinical.medication import Administration, Dose, Prescription, administration, dose_schedule, prescription
from rebond.clinical.pharmacy import validations
from rebond.clinical.prescribing import allergens_of, conflicts_of, is_new, seen
from rebond.clinical.records import (
    PatientSummary,
    Resource,
    concept_text,
    fhir_instant,
    find,
    find_with_included,
    has_code,
    instant,
    patient_summary,
    read,
)
from rebond.clinical.results import LabResult, ResultReport, lab_result, lab_results, reports
from rebond.store.base import NotFound, Store

#: how much of the administration record the chart shows around now
RECORD_BEFORE = dt.timedelta(hours=24)
RECORD_AFTER = dt.timedelta(hours=12)
#: the vital-signs trend covers the last days
VITALS_WINDOW = dt.timedelta(days=7)
#: the chart lists the latest lab reports (each analyte's whole history is in its plot)
REPORTS_SHOWN = 20


@dataclass
class Series:
    """One analyte or vital sign over time, oldest first, with its reference range."""

    code: str
    name: str
    unit: str
    low: float | None
    high: float | None
    points: list[LabResult] = field(default_factory=list)

    @property
    def latest(self) -> LabResult:
        return self.points[-1]


@dataclass(frozen=True)
class Note:
    title: str
    when: dt.datetime | None
    author: str
    text: str


@dataclass(frozen=True)
class Location:
    id: str
    name: str


@dataclass
class PatientHeader:
    """What the banner of every patient page shows: who, where, allergies."""

    patient: PatientSummary
    stay: Stay | None
    bed: Location | None
    ward: Location | None
    allergies: list[Allergy]


@dataclass
class PatientChart(PatientHeader):
    problems: list[str]
    prescriptions: list[Prescription]
    doses: list[Dose]
    administrations: list[Administration]
    vitals: list[Series]
    labs: list[Series]
    lab_reports: list[ResultReport]
    imaging: list[ResultReport]
    notes: list[Note]
    as_of: dt.datetime
    stopped: list[Stopped] = field(default_factory=list)  # prescriptions stopped in the last STOPPED_SHOWN, newest first
    unreported: list[Study] = field(default_factory=list)  # imaging studies with no report yet: their images only


@dataclass(frozen=True)
class Stopped:
    """A prescription stopped lately: the nurses must not give it from habit."""

    medication: str
    reason: str
    by: str
    at: dt.datetime | None


#: how far back the chart lists stopped prescriptions
STOPPED_SHOWN = dt.timedelta(hours=24)


def stopped(request: Resource) -> Stopped:
    """Who stopped it and when: the note written with the stop, else the version's time."""
    notes = [n for n in request.get("note") or () if str(n.get("text", "")).startswith("Arrêtée")]
    last = notes[-1] if notes else {}
    by = str((last.get("authorReference") or {}).get("display") or last.get("authorString") or "")
    at = instant(last.get("time")) or instant((request.get("meta") or {}).get("lastUpdated"))
    return Stopped(concept_text(request.get("medicationCodeableConcept")) or "?", concept_text(request.get("statusReason")), by, at)


@dataclass(frozen=True)
class Study:
    """An imaging study as the chart lists it: its images are in the PACS."""

    id: str
    description: str
    started: dt.datetime | None


def series_by_code(results: list[LabResult]) -> list[Series]:
    by_code: dict[str, Series] = {}
    for result in sorted(results, key=lambda r: r.when or dt.datetime.min.replace(tzinfo=dt.UTC)):
        series = by_code.get(result.code)
        if series is None:
            series = by_code[result.code] = Series(result.code, result.name, result.unit, result.low, result.high)
        series.points.append(result)
        series.low, series.high = result.low if result.low is not None else series.low, result.high if result.high is not None else series.high
    return list(by_code.values())


def note(document: Resource) -> Note:
    """A DocumentReference as text: its title, date, author and the text of its first text attachment."""
    text = ""
    for content in document.get("content") or ():
        attachment = content.get("attachment") or {}
        if attachment.get("data") and str(attachment.get("contentType", "text/plain")).startswith("text/"):
            try:
                text = base64.b64decode(attachment["data"]).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                text = ""
            break
    authors = document.get("author") or [{}]
    return Note(concept_text(document.get("type")) or str(document.get("description", "")), instant(document.get("date")),
                str(authors[0].get("display", "")), text)


def with_alerts(store: Store, requests: list[Resource], allergies: list[Allergy], now: dt.datetime | None = None) -> list[Prescription]:
    """The prescriptions, each with the known allergies it meets and the pharmacy's interventions on it; given `now` (a
    chart), those still new then (the only ones a page says it of) with who read them first, and each with the
    pharmacist who validated it as it stands."""
    allergens = allergens_of(store, (r.get("medicationCodeableConcept") or {} for r in requests)) if allergies else {}
    new = [r["id"] for r in requests if now is not None and is_new(instant(r.get("authoredOn")), now)]
    read_by = seen(store, new) if new else {}
    raised = of_prescriptions(store, [r["id"] for r in requests])  # a nurse about to give a dose sees them too
    shown = [replace(prescription(r), alerts=tuple(a.substance for a in conflicts_of(r, allergies, allergens)), seen=read_by.get(r["id"]),
                     interventions=tuple(raised.get(r["id"], ()))) for r in requests]
    if now is None:
        return shown
    validated = validations(store, [(p.id, p.version) for p in shown])
    return [replace(p, validated=validated.get(p.id)) for p in shown]


def patient_header(store: Store, patient_id: str) -> PatientHeader:
    """The patient, their current stay with its bed and ward, and their allergies: the banner, without the chart."""
    patient = read(store, "Patient", patient_id)
    if patient is None:
        raise NotFound(f"no Patient/{patient_id}")
    encounters, included = find_with_included(store, "Encounter", ("subject", f"Patient/{patient_id}"), ("status", "in-progress"),
                                              ("_sort", "-date"), ("_include", "Encounter:participant"),
                                              ("_include", "Encounter:location"))
    practitioners = {r["id"]: r for r in included if r["resourceType"] == "Practitioner"}
    locations = {r["id"]: r for r in included if r["resourceType"] == "Location"}
    current = stay(encounters[0], practitioners, {i for i, loc in locations.items() if has_code(loc.get("physicalType"), "bd")}) \
        if encounters else None

    def place(location_id: str | None) -> Location | None:
        loc = locations.get(location_id or "")
        return Location(loc["id"], str(loc.get("name", ""))) if loc else None

    return PatientHeader(patient_summary(patient), current, place(current.bed_id if current else None),
                         place(current.ward_id if current else None), allergies_by_patient(store, [patient_id]).get(patient_id, []))


def patient_chart(store: Store, patient_id: str, now: dt.datetime) -> PatientChart:
    header = patient_header(store, patient_id)
    me = f"Patient/{patient_id}"
    problems = [concept_text(c.get("code")) for c in find(store, "Condition", ("subject", me), ("clinical-status", "active"))]
    requests = find(store, "MedicationRequest", ("subject", me), ("status", "active"))
    prescriptions = sorted(with_alerts(store, requests, header.allergies, now), key=lambda p: p.medication)
    ended = [stopped(r) for r in find(store, "MedicationRequest", ("subject", me), ("status", "stopped"),
                                      ("_lastUpdated", f"ge{fhir_instant(now - STOPPED_SHOWN)}"))]
    given = find(store, "MedicationAdministration", ("subject", me),
                 ("effective-time", f"ge{fhir_instant(now - RECORD_BEFORE - dt.timedelta(hours=3))}"), ("_sort", "-effective-time"))
    administrations = [a for a in (administration(r) for r in given) if a is not None]
    doses = dose_schedule(prescriptions, administrations, now - RECORD_BEFORE, now + RECORD_AFTER, now)
    vitals = find(store, "Observation", ("subject", me), ("category", f"{OBSERVATION_CATEGORY}|vital-signs"),
                  ("date", f"ge{fhir_instant(now - VITALS_WINDOW)}"))
    # every lab result, read once: the per-analyte history; the latest reports are drawn from the same results
    results_by_id = lab_results(store, ("subject", me), ("category", f"{OBSERVATION_CATEGORY}|laboratory"))
    lab_reports = reports(store, ("subject", me), ("category", "LAB"), observations=results_by_id, limit=REPORTS_SHOWN)
    imaging = reports(store, ("subject", me), ("category", "RAD"))
    reported = {r.imaging_study for r in imaging}
    unreported = sorted((Study(str(s["id"]), str(s.get("description") or ""), instant(s.get("started")))
                         for s in find(store, "ImagingStudy", ("subject", me)) if s["id"] not in reported),
                        key=lambda s: s.started or dt.datetime.min.replace(tzinfo=dt.UTC), reverse=True)
    notes = [note(d) for d in find(store, "DocumentReference", ("subject", me), ("_sort", "-date"))]
    return PatientChart(
        **{f.name: getattr(header, f.name) for f in fields(PatientHeader)}, problems=sorted(p for p in problems if p),
        prescriptions=prescriptions, doses=doses, administrations=administrations,
        vitals=series_by_code([lab_result(o) for o in vitals]),
        labs=sorted(series_by_code(list(results_by_id.values())), key=lambda s: s.name),
        lab_reports=lab_reports, imaging=imaging, notes=notes, as_of=now, unreported=unreported,
        stopped=sorted(ended, key=lambda s: s.at or now, reverse=True),
    )

