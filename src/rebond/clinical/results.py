"""Lab and imaging results as clinicians read them: reports with their values and flags, and their acknowledgement.

A clinician acknowledging a report is data, not a UI state: a completed Task whose focus is the
DiagnosticReport, owned by the clinician, so that it replicates, prints and audits like any record.
"""
from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from rebond.clinical.conventions import ABNORMAL_FLAGS, ACKNOWLEDGEMENT, CRITICAL_FLAGS, INTERPRETATION, TASK_CODE_SYSTEM
from rebond.clinical.records import (
    SEARCH_LIMIT,
    Clinician,
    Resource,
    any_of,
    concept_text,
    fhir_instant,
    find,
    find_stored,
    find_with_included,
    first_code,
    instant,
    read,
    ref_id,
)
from rebond.fhir import operations
from rebond.store.base import NotFound, Store, Stored


@dataclass(frozen=True)
class LabResult:
    id: str
    code: str
    name: str
    value: float | None
    display: str  # the value as written, for results that are not numbers
    unit: str
    low: float | None
    high: float | None
    flag: str | None
    when: dt.datetime | None

    @property
    def abnormal(self) -> bool:
        return self.flag in ABNORMAL_FLAGS

    @property
    def critical(self) -> bool:
        return self.flag in CRITICAL_FLAGS


@dataclass(frozen=True)
class Acknowledgement:
    by: str
    at: dt.datetime | None


@dataclass
class ResultReport:
    id: str
    patient_id: str | None
    section: str  # LAB, RAD, …
    title: str
    status: str
    issued: dt.datetime | None
    results: list[LabResult] = field(default_factory=list)
    conclusion: str = ""
    acknowledgement: Acknowledgement | None = None
    imaging_study: str | None = None  # the ImagingStudy an imaging report reads (its images: /patients/…/imaging/{id})

    @property
    def abnormal(self) -> list[LabResult]:
        return [r for r in self.results if r.abnormal]


def lab_result(observation: Resource) -> LabResult:
    quantity = observation.get("valueQuantity") or {}
    value = quantity.get("value")
    display = str(value) if value is not None else str(observation.get("valueString") or concept_text(observation.get("valueCodeableConcept")))
    ranges = observation.get("referenceRange") or [{}]
    flag = None
    for interpretation in observation.get("interpretation") or ():
        for coding in interpretation.get("coding") or ():
            if coding.get("system") in (INTERPRETATION, None) and coding.get("code"):
                flag = str(coding["code"])
    return LabResult(
        id=observation["id"], code=first_code(observation.get("code")) or "", name=concept_text(observation.get("code")),
        value=float(value) if isinstance(value, int | float) else None, display=display,
        unit=str(quantity.get("unit") or quantity.get("code") or ""),
        low=(ranges[0].get("low") or {}).get("value"), high=(ranges[0].get("high") or {}).get("value"),
        flag=flag, when=instant(observation.get("effectiveDateTime") or observation.get("issued")),
    )


class _LabResultCache:
    """Parsed lab results by (id, version). A version never changes, so an entry is never stale; a
    chart with a year of results then parses only what arrived since it was last opened."""

    def __init__(self, size: int = 200_000) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, int], LabResult] = OrderedDict()
        self._lock = threading.Lock()

    def results(self, found: list[Stored]) -> dict[str, LabResult]:
        out: dict[str, LabResult] = {}
        missing: list[Stored] = []
        with self._lock:
            for stored in found:
                hit = self._entries.get((stored.id, stored.version))
                if hit is None:
                    missing.append(stored)
                else:
                    out[stored.id] = hit
        parsed = {s.id: (s.version, lab_result(orjson.loads(s.body))) for s in missing if s.body}
        with self._lock:
            for rid, (version, result) in parsed.items():
                self._entries[(rid, version)] = result
                out[rid] = result
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return out


_lab_cache = _LabResultCache()


def lab_results(store: Store, *params: tuple[str, str]) -> dict[str, LabResult]:
    """Observations matching a search, as lab results by id."""
    return _lab_cache.results(find_stored(store, "Observation", *params))


def _report(resource: Resource, observations: dict[str, LabResult]) -> ResultReport:
    categories = resource.get("category") or [{}]
    results = [observations[rid] for rid in (ref_id(r, "Observation") for r in resource.get("result") or ()) if rid in observations]
    return ResultReport(
        id=resource["id"], patient_id=ref_id(resource.get("subject"), "Patient"), section=first_code(categories[0]) or "",
        title=concept_text(resource.get("code")), status=str(resource.get("status", "")),
        issued=instant(resource.get("issued") or resource.get("effectiveDateTime")), results=results,
        conclusion=str(resource.get("conclusion", "")),
        imaging_study=next((ref_id(r, "ImagingStudy") for r in resource.get("imagingStudy") or () if ref_id(r, "ImagingStudy")), None),
    )


def reports(store: Store, *params: tuple[str, str], observations: dict[str, LabResult] | None = None,
            limit: int = SEARCH_LIMIT) -> list[ResultReport]:
    """DiagnosticReports matching a search, newest first, with their results and acknowledgements.

    `observations` already read (by id) spare reading them again through _include.
    """
    include = () if observations is not None else (("_include", "DiagnosticReport:result"),)
    found, included = find_with_included(store, "DiagnosticReport", *params, *include, ("_sort", "-issued"), limit=limit)
    if observations is None:
        observations = {o["id"]: lab_result(o) for o in included if o.get("resourceType") == "Observation"}
    out = [_report(r, observations) for r in found]
    acks = acknowledgements(store, [r.id for r in out])
    for report in out:
        report.acknowledgement = acks.get(report.id)
    return out


def acknowledgements(store: Store, report_ids: Iterable[str], resource_type: str = "DiagnosticReport",
                     code: str = ACKNOWLEDGEMENT) -> dict[str, Acknowledgement]:
    """Who first saw each of these records (reports by default; prescriptions: clinical/prescribing.py), and when."""
    ids = list(report_ids)
    out: dict[str, Acknowledgement] = {}
    for start in range(0, len(ids), 500):
        focus = any_of(f"{resource_type}/{rid}" for rid in ids[start:start + 500])
        for task in find(store, "Task", ("focus", focus), ("code", f"{TASK_CODE_SYSTEM}|{code}"), ("status", "completed")):
            report_id = ref_id(task.get("focus"), resource_type)
            if report_id is not None and report_id not in out:
                out[report_id] = Acknowledgement(str((task.get("owner") or {}).get("display", "")), instant(task.get("authoredOn")))
    return out


def acknowledgement_task(report: Resource, clinician: Resource, when: dt.datetime, task_id: str | None = None,
                         code: str = ACKNOWLEDGEMENT, text: str = "Résultat pris en compte") -> Resource:
    """The record that `clinician` (a reference with its display) saw `report` (or another record) at `when`."""
    task: Resource = {
        "resourceType": "Task", "status": "completed", "intent": "order",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": code}], "text": text},
        "focus": {"reference": f"{report['resourceType']}/{report['id']}"},
        "authoredOn": fhir_instant(when), "lastModified": fhir_instant(when), "owner": clinician,
        "executionPeriod": {"end": fhir_instant(when)},
    }
    if task_id is not None:
        task["id"] = task_id
    if report.get("subject"):
        task["for"] = report["subject"]
    if report.get("encounter"):
        task["encounter"] = report["encounter"]
    return task


def acknowledge_result(store: Store, report_id: str, clinician: Clinician, now: dt.datetime,
                       resource_type: str = "DiagnosticReport", code: str = ACKNOWLEDGEMENT,
                       text: str = "Résultat pris en compte") -> Acknowledgement:
    """Record the acknowledgement once: a second click (or a second clinician) finds the first one."""
    report = read(store, resource_type, report_id)
    if report is None:
        raise NotFound(f"{resource_type}/{report_id} is not known")
    task = acknowledgement_task(report, clinician.reference(), now, str(uuid.uuid4()), code, text)
    criteria = f"focus={resource_type}/{report_id}&code={TASK_CODE_SYSTEM}|{code}&status=completed"
    store.write(lambda tx: operations.create(tx, "Task", task, if_none_exist=criteria, resource_id=task["id"]))
    return acknowledgements(store, [report_id], resource_type, code)[report_id]
