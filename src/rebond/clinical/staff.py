"""The staff directory, the on-call rota and the procedures binder: who works on a ward, who is on call, what to do.

On-call shifts are Schedules (one per shift, its planningHorizon the shift; `actor` the PractitionerRole, the
Practitioner and the ward), staff are PractitionerRoles at a ward, and the downtime procedures are DocumentReferences
of the category `downtime-procedure`, a hospital's own or the group's.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from rebond.clinical.chart import note
from rebond.clinical.conventions import DOCUMENT_CATEGORY, ON_CALL_SYSTEM
from rebond.clinical.records import concept_text, fhir_instant, find, has_code, instant, read, ref_id
from rebond.store.base import Store

PRACTITIONER_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/practitioner-role"


@dataclass(frozen=True)
class Shift:
    who: str
    kind: str  # "garde" (on site) or "astreinte" (from home), from ON_CALL_SYSTEM
    label: str  # as the rota says it: « Garde sur place »
    specialty: str
    ward_id: str | None
    start: dt.datetime
    end: dt.datetime
    practitioner_id: str | None = None  # who, to write to them (clinical/messaging.py)


@dataclass(frozen=True)
class StaffMember:
    name: str
    role: str  # « Médecin », « Infirmier(ère) »
    specialty: str
    physician: bool  # the role's code is `doctor` (practitioner-role): listed first


@dataclass(frozen=True)
class Procedure:
    id: str
    title: str
    lines: list[str]
    hospital_id: str | None  # None: the group's
    downtime: bool  # what to do when the IT fails (category downtime-procedure), else a clinical procedure


def shifts(store: Store, start: dt.datetime, end: dt.datetime, *, ward_id: str | None = None) -> list[Shift]:
    """The on-call shifts that overlap [start, end), of one ward or of every ward, by start."""
    params: list[tuple[str, str]] = [("date", f"le{fhir_instant(end)}"), ("date", f"ge{fhir_instant(start)}")]
    if ward_id is not None:
        params.append(("actor", f"Location/{ward_id}"))
    out = []
    for schedule in find(store, "Schedule", *params):
        shift = _shift(store, schedule)
        if shift is not None and shift.end > start and shift.start < end:
            out.append(shift)
    return sorted(out, key=lambda s: (s.start, s.specialty, s.who))


def _shift(store: Store, schedule: dict[str, Any]) -> Shift | None:
    horizon = schedule.get("planningHorizon") or {}
    start, end = instant(horizon.get("start")), instant(horizon.get("end"))
    if start is None or end is None:
        return None
    actors = schedule.get("actor") or ()
    person = next((a for a in actors if ref_id(a, "Practitioner")), None)
    who = str(person.get("display", "")) if person is not None else ""
    if not who:  # named only through the PractitionerRole
        role_id = next((ref_id(a, "PractitionerRole") for a in actors if ref_id(a, "PractitionerRole")), None)
        role = read(store, "PractitionerRole", role_id) if role_id else None
        person = (role or {}).get("practitioner") or person
        who = str((person or {}).get("display", ""))
    kind = next((str(c.get("code")) for s in schedule.get("serviceType") or () for c in s.get("coding") or ()
                 if c.get("system") == ON_CALL_SYSTEM), "")
    return Shift(who or "—", kind, concept_text((schedule.get("serviceType") or [{}])[0]) or kind,
                 concept_text((schedule.get("specialty") or [{}])[0]) or "",
                 next((ref_id(a, "Location") for a in actors if ref_id(a, "Location")), None), start, end,
                 ref_id(person, "Practitioner") if person is not None else None)


def staff_by_ward(store: Store) -> dict[str, list[StaffMember]]:
    """The staff of every ward (their active PractitionerRoles there), physicians first, by name."""
    out: dict[str, list[StaffMember]] = {}
    for role in find(store, "PractitionerRole", ("active", "true")):
        member = StaffMember(str((role.get("practitioner") or {}).get("display", "")) or "—",
                             concept_text((role.get("code") or [{}])[0]) or "", concept_text((role.get("specialty") or [{}])[0]) or "",
                             has_code((role.get("code") or [{}])[0], "doctor", PRACTITIONER_ROLE_SYSTEM))
        for place in role.get("location") or ():
            ward_id = ref_id(place, "Location")
            if ward_id:
                out.setdefault(ward_id, []).append(member)
    for members in out.values():
        members.sort(key=lambda m: (not m.physician, m.name))
    return out


def procedures(store: Store, hospital_id: str | None) -> list[Procedure]:
    """The downtime procedures of a hospital's binder (`hospital_id` None: the group's own), or every downtime
    procedure when it has none of its own, by title."""
    documents = [d for d in _binder_documents(store) if _code(d) == "downtime-procedure"]
    own = [d for d in documents if ref_id(d.get("custodian"), "Organization") == hospital_id]
    return sorted((_procedure(d) for d in own or documents), key=lambda p: p.title)


def binder(store: Store) -> list[tuple[str, list[Procedure]]]:
    """Each hospital's procedures binder (and the group's): its name, then its procedures, downtime ones first."""
    kept: dict[str, list[Procedure]] = {}
    for document in _binder_documents(store):
        kept.setdefault(ref_id(document.get("custodian"), "Organization") or "", []).append(_procedure(document))
    names = {owner: str((read(store, "Organization", owner) or {}).get("name", "")) if owner else "" for owner in kept}
    return sorted(((names[owner], sorted(found, key=lambda p: (not p.downtime, p.title))) for owner, found in kept.items()),
                  key=lambda pair: pair[0])


def _binder_documents(store: Store) -> list[dict[str, Any]]:
    return find(store, "DocumentReference", ("category", f"{DOCUMENT_CATEGORY}|downtime-procedure,{DOCUMENT_CATEGORY}|procedure"),
                ("status", "current"))


def _code(document: dict[str, Any]) -> str | None:
    return next((str(c.get("code")) for concept in document.get("category") or () for c in concept.get("coding") or ()
                 if c.get("system") == DOCUMENT_CATEGORY), None)


def _procedure(document: dict[str, Any]) -> Procedure:
    text = note(document)
    # the document's own heading repeats its title: the steps are what a reader needs
    return Procedure(str(document["id"]), text.title, [line for line in text.text.splitlines() if line.strip() and not line.startswith("#")],
                     ref_id(document.get("custodian"), "Organization"), _code(document) == "downtime-procedure")
