"""Prescriptions, their schedules and the administration record: which doses are given, due or late."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.clinical.records import Resource, concept_text, instant, ref_id
from rebond.clinical.results import Acknowledgement

if TYPE_CHECKING:
    from rebond.clinical.interventions import Intervention

#: a dose is "due" from an hour before its time to an hour after; later than that with nothing recorded, it is late
DUE_WINDOW = dt.timedelta(hours=1)
#: an administration recorded this close to a scheduled time answers for that dose
MATCH_WINDOW = dt.timedelta(hours=2)

DoseState = Literal["given", "not-given", "late", "due", "planned"]


@dataclass(frozen=True)
class Prescription:
    id: str
    medication: str
    dose: str
    route: str
    times: tuple[dt.time, ...]  # times of day, hospital time
    authored: dt.datetime | None
    prescriber: str
    until: dt.datetime | None = None  # no dose after this: the end of the prescription's length
    as_needed: bool = False  # given when needed (« si besoin »), with or without set times
    indication: str = ""  # what it is given for, when needed (« douleur »)
    alerts: tuple[str, ...] = ()  # the patient's known allergies it meets (clinical/prescribing.py), filled by the chart
    seen: Acknowledgement | None = None  # the nurse who read it first (clinical/prescribing.py), filled by the chart
    version: int = 0  # the version of the MedicationRequest it shows
    validated: Acknowledgement | None = None  # the pharmacist who validated that version (clinical/pharmacy.py), filled by the chart
    interventions: tuple[Intervention, ...] = ()  # the pharmacy's, the latest first (clinical/interventions.py), filled by the chart


@dataclass(frozen=True)
class Administration:
    id: str
    request_id: str | None
    medication: str
    when: dt.datetime
    given: bool
    reason: str
    performer: str
    dose: str


@dataclass(frozen=True)
class Dose:
    prescription: Prescription
    due: dt.datetime
    state: DoseState
    administration: Administration | None


def prescription(request: Resource) -> Prescription:
    times: list[dt.time] = []
    dose_text, route, indication = "", "", ""
    as_needed = False
    until: dt.datetime | None = None
    for dosage in request.get("dosageInstruction") or ():
        dose_text = dose_text or str(dosage.get("text", ""))
        route = route or concept_text(dosage.get("route"))
        if dosage.get("asNeededBoolean") is True or dosage.get("asNeededCodeableConcept"):
            as_needed, indication = True, indication or concept_text(dosage.get("asNeededCodeableConcept"))
        repeat = (dosage.get("timing") or {}).get("repeat") or {}
        for value in repeat.get("timeOfDay") or ():
            try:
                times.append(dt.time.fromisoformat(value))
            except ValueError:
                continue
        until = until or instant((repeat.get("boundsPeriod") or {}).get("end"))
    return Prescription(
        id=request["id"], medication=concept_text(request.get("medicationCodeableConcept")) or "?", dose=dose_text, route=route,
        times=tuple(sorted(set(times))), authored=instant(request.get("authoredOn")),
        prescriber=str((request.get("requester") or {}).get("display", "")), until=until, as_needed=as_needed,
        indication=indication, version=int((request.get("meta") or {}).get("versionId") or 0),
    )


def administration(resource: Resource) -> Administration | None:
    when = instant(resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start"))
    if when is None:
        return None
    performers = resource.get("performer") or [{}]
    return Administration(
        id=resource["id"], request_id=ref_id(resource.get("request"), "MedicationRequest"),
        medication=concept_text(resource.get("medicationCodeableConcept")), when=when,
        given=resource.get("status") in ("completed", "in-progress"),
        reason="; ".join(concept_text(r) for r in resource.get("statusReason") or ()),
        performer=str((performers[0].get("actor") or {}).get("display", "")),
        dose=str((resource.get("dosage") or {}).get("text", "")),
    )


def dose_schedule(prescriptions: Iterable[Prescription], administrations: Iterable[Administration], start: dt.datetime,
                  end: dt.datetime, now: dt.datetime) -> list[Dose]:
    """Every scheduled dose between start and end, each with the administration that answers it, in time order."""
    by_request: dict[str | None, list[Administration]] = {}
    for given in administrations:
        by_request.setdefault(given.request_id, []).append(given)
    doses: list[Dose] = []
    for rx in prescriptions:
        candidates = sorted(by_request.get(rx.id, []), key=lambda a: a.when)
        used: set[str] = set()
        day = start.astimezone(HOSPITAL_TZ).date()
        while dt.datetime.combine(day, dt.time(0), HOSPITAL_TZ) < end:
            for at in rx.times:
                due = dt.datetime.combine(day, at, HOSPITAL_TZ)
                if not start <= due < end or (rx.authored is not None and due < rx.authored - DUE_WINDOW) or \
                        (rx.until is not None and due > rx.until):
                    continue
                match = min((a for a in candidates if a.id not in used and abs(a.when - due) <= MATCH_WINDOW),
                            key=lambda a: abs(a.when - due), default=None)
                if match is not None:
                    used.add(match.id)
                    doses.append(Dose(rx, due, "given" if match.given else "not-given", match))
                elif due < now - DUE_WINDOW:
                    doses.append(Dose(rx, due, "late", None))
                elif due <= now + DUE_WINDOW:
                    doses.append(Dose(rx, due, "due", None))
                else:
                    doses.append(Dose(rx, due, "planned", None))
            day += dt.timedelta(days=1)
    return sorted(doses, key=lambda d: (d.due, d.prescription.medication))
