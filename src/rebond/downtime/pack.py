"""What a ward's downtime pack holds, gathered from the store as plain data for the PDF template.

A pack is what a nurse works from when every screen is dark: the census, then one section per
patient (allergies first, prescriptions with a 24-hour grid to tick, the latest vitals and
results), the on-call list, the downtime procedures and blank forms labelled for each patient.
Its cover says how old it is, where it came from, and what changed since the previous pack;
the changes are found by comparing this pack's *facts* with the previous pack's, kept beside it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from rebond.clinical.census import ward_occupancy
from rebond.clinical.chart import PatientChart, patient_chart
from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.clinical.medication import Prescription
from rebond.clinical.messaging import about_patient
from rebond.clinical.records import concept_text, find, instant
from rebond.clinical.results import LabResult
from rebond.clinical.staff import procedures, shifts
from rebond.clinical.wards import Ward
from rebond.hl7.critical import called
from rebond.store.base import Store
from rebond.web.i18n import Translator

#: the administration grid covers the next day, hour by hour, from the hour the pack is made
GRID_HOURS = 24
#: the last administrations shown per patient (the grid shows what comes)
ADMINISTRATIONS_SHOWN = 12


@dataclass(frozen=True)
class Source:
    """Where the pack's data came from, for its cover: the central site or a site node, and how fresh it was."""

    role: str  # central, site
    node: str  # the site id
    data_as_of: dt.datetime | None
    upstream_reachable: bool | None = None


def source_from(facts: dict[str, object]) -> Source:
    """The cover's source line from a node's /status facts."""
    as_of = facts.get("data_as_of")
    reachable = facts.get("upstream_reachable")
    return Source(str(facts.get("role") or "central"), str(facts.get("site_id") or ""),
                  dt.datetime.fromisoformat(str(as_of).replace("Z", "+00:00")) if as_of else None,
                  reachable if isinstance(reachable, bool) else None)


@dataclass(frozen=True)
class Pack:
    ward: Ward
    data: dict[str, Any]  # what the template lays out
    facts: dict[str, Any]  # what the next pack compares itself with
    digest: str  # short hash of the clinical content: two packs with the same digest say the same thing
    as_of: dt.datetime


def _labels(t: Translator) -> dict[str, str]:
    _ = t.gettext
    return {
        "title": _("Downtime pack"), "as_of": _("Data as of"), "printed_note": _("This paper is as old as the time above."),
        "source": _("Source"), "digest": _("Content hash"), "pages": _("Page"), "of": _("of"),
        "central": _("central site"), "site": _("site node"), "upstream_down": _("central site unreachable"),
        "changes": _("What changed since the previous pack"), "since": _("previous pack"), "first_pack": _("First pack for this ward."),
        "nothing_changed": _("Nothing changed."), "admissions": _("Admissions"), "discharges": _("Discharges or transfers out"),
        "new_allergies": _("New allergies"), "new_prescriptions": _("New prescriptions"),
        "stopped_prescriptions": _("Stopped prescriptions"), "new_abnormal": _("New abnormal results"),
        "census": _("Census"), "bed": _("Bed"), "patient": _("Patient"), "born": _("Born"), "ipp": _("IPP"),
        "admitted": _("Admitted"), "attending": _("Attending"), "allergies": _("Allergies"), "no_allergy": _("No known allergy"),
        "empty_bed": _("empty"), "problems": _("Active problems"), "prescriptions": _("Active prescriptions"),
        "medication": _("Medication"), "dose": _("Dose"), "route": _("Route"), "times": _("Times"), "prescriber": _("Prescriber, validation"),
        "grid": _("Administrations, next 24 hours: tick, initial, time"), "last_given": _("Last administrations"),
        "given": _("given"), "not_given": _("not given"), "vitals": _("Latest vital signs"), "labs": _("Latest lab results"),
        "abnormal_mark": _("abnormal values in bold and marked ▲ ▼"), "range": _("Range"), "pending": _("Pending orders"),
        "imaging": _("Imaging conclusions"), "none": _("None"), "on_call": _("On call today"), "from": _("From"), "to": _("To"),
        "procedures": _("Downtime procedures"), "forms": _("Blank forms"), "vitals_form": _("Vital signs sheet"),
        "admin_form": _("Administration sheet"), "lab_form": _("Lab request"), "time": _("Time"),
        "signature": _("Signature"), "exam": _("Exam requested"), "urgent": _("Urgent"), "sampled_at": _("Sampled at"),
        "requested_by": _("Requested by"), "enter_later": _("To be entered into Rebond when it is back, checked by a second person."),
        "sex": _("Sex"), "age": _("age"), "hr": _("HR"), "bp": _("BP"), "temp": _("Temp."), "spo2": _("SpO2"),
        "rr": _("RR"), "pain": _("Pain"), "by": _("By"), "when": _("When"), "value": _("Value"),
        "unplaced": _("not in a bed"), "critical_calls": _("Critical results called by the lab (last 24 hours)"),
        "call_waiting": _("critical result: call not taken in hand"),
    }


def _prescription(t: Translator, rx: Prescription) -> dict[str, Any]:
    times = ", ".join(at.strftime("%H:%M") for at in rx.times)
    if rx.as_needed or not times:
        times = " · ".join(part for part in (times, t.gettext("if needed"), rx.indication) if part)
    if rx.until is not None:
        times += " · " + t.gettext("until %(date)s", date=t.datetime(rx.until))
    return {"id": rx.id, "medication": rx.medication, "dose": rx.dose, "route": rx.route, "times": times,
            "prescriber": rx.prescriber, "authored": t.date(rx.authored, "short"),
            # the pharmacy's validation, short: the column is narrow
            "validation": t.gettext("✓ validated %(when)s", when=t.datetime(rx.validated.at)) if rx.validated is not None
            else t.gettext("not validated"), "validated": rx.validated is not None,
            "alerts": [t.gettext("Known allergy: %(substance)s", substance=a) for a in rx.alerts]
            + [t.gettext("Pharmacy: %(problem)s, awaiting the prescriber", problem=t.gettext(iv.problem_name))
               for iv in rx.interventions if iv.outcome is None]}


def _grid(chart: PatientChart, start: dt.datetime) -> list[dict[str, Any]]:
    """Each active prescription and, for each of the next 24 hours, the minutes of the doses due in it ('' for none)."""
    rows = []
    for rx in chart.prescriptions:
        cells: list[str] = []
        for n in range(GRID_HOURS):
            hour = start + dt.timedelta(hours=n)
            due = [at for at in rx.times if at.hour == hour.hour]
            cells.append(" ".join(at.strftime("%M") for at in due))
        rows.append({"medication": rx.medication, "dose": f"{rx.dose} {rx.route}".strip(), "cells": cells})
    return rows


def _result(t: Translator, result: LabResult) -> dict[str, Any]:
    arrow = ""
    if result.abnormal:
        low = result.flag in ("L", "LL", "LU", "<")
        arrow = "▼" if low else "▲"
    value = t.number(result.value) if result.value is not None else result.display
    span = ""
    if result.low is not None or result.high is not None:
        span = f"{t.number(result.low) if result.low is not None else ''}–{t.number(result.high) if result.high is not None else ''}"
    return {"name": result.name, "value": value, "unit": result.unit, "flag": result.flag or "", "abnormal": result.abnormal,
            "critical": result.critical, "arrow": arrow, "range": span, "when": t.datetime(result.when)}


def _critical_calls(store: Store, t: Translator, patient_id: str, now: dt.datetime) -> list[dict[str, Any]]:
    """The lab's calls for the patient's critical results over the last day, and who took each in hand: on paper, a call
    no one has answered when the IT went down is still seen (hl7/critical.py)."""
    out = []
    for talk in about_patient(store, patient_id, now, days=1):
        if talk.first.critical_report is None:
            continue
        taken = talk.taken_by
        out.append({"sent": t.datetime(talk.first.sent), "what": called(talk.first.text), "waiting": taken is None,
                    "state": t.gettext("taken in hand by %(who)s, %(when)s", who=taken.author, when=t.datetime(taken.sent))
                    if taken is not None else t.gettext("NO ONE HAS TAKEN IT IN HAND: tell the physician")})
    return sorted(out, key=lambda c: not c["waiting"])


def _patient(store: Store, t: Translator, chart: PatientChart, bed: str, now: dt.datetime, grid_start: dt.datetime) -> dict[str, Any]:
    me = f"Patient/{chart.patient.id}"
    pending = find(store, "ServiceRequest", ("subject", me), ("status", "active"))
    stay = chart.stay
    summary = chart.patient
    age = summary.age(now.astimezone(HOSPITAL_TZ).date())
    return {
        "id": summary.id, "name": summary.name, "birth_date": t.date(summary.birth_date, "short"), "ipp": summary.ipp or "—",
        "sex": {"female": "F", "male": "M"}.get(summary.gender, "—"),
        "age": "—" if age is None else str(age), "bed": bed,
        "admitted": t.date(stay.admitted if stay else None, "short"), "attending": stay.attending if stay else "—",
        "allergies": [{"substance": a.substance, "critical": a.criticality == "high"} for a in chart.allergies],
        "critical_calls": _critical_calls(store, t, summary.id, now),
        "problems": chart.problems,
        "prescriptions": [_prescription(t, rx) for rx in chart.prescriptions],
        "grid": _grid(chart, grid_start),
        "administrations": [{"when": t.datetime(a.when), "medication": a.medication, "dose": a.dose,
                             "given": a.given, "reason": a.reason, "by": a.performer}
                            for a in chart.administrations[:ADMINISTRATIONS_SHOWN]],
        "vitals": [_result(t, s.latest) for s in chart.vitals],
        "labs": [_result(t, s.latest) for s in chart.labs],
        "pending": [{"what": concept_text(r.get("code")) or "—", "when": t.datetime(instant(r.get("authoredOn"))),
                     "priority": str(r.get("priority") or "")} for r in pending],
        "imaging": [{"title": r.title, "when": t.datetime(r.issued), "conclusion": r.conclusion} for r in chart.imaging],
    }


def _on_call(store: Store, t: Translator, ward_id: str, now: dt.datetime) -> list[dict[str, str]]:
    """The shifts that cover today (hospital time) for this ward: who, what kind, from when to when."""
    day = now.astimezone(HOSPITAL_TZ).replace(hour=0, minute=0, second=0, microsecond=0)
    return [{"who": shift.who, "kind": shift.label, "from": t.datetime(shift.start), "to": t.datetime(shift.end)}
            for shift in shifts(store, day, day + dt.timedelta(days=1), ward_id=ward_id)]


def _procedures(store: Store, hospital_id: str | None) -> list[dict[str, Any]]:
    """The downtime procedures of the hospital's binder (or of the group, when the hospital has none of its own)."""
    return [{"title": p.title, "lines": p.lines} for p in procedures(store, hospital_id)]


def _facts(patients: list[dict[str, Any]]) -> dict[str, Any]:
    return {"patients": {p["id"]: {
        "name": p["name"], "bed": p["bed"],
        "allergies": sorted(a["substance"] for a in p["allergies"]),
        "prescriptions": {rx["id"]: f"{rx['medication']} — {rx['dose']}" for rx in p["prescriptions"]},
        "abnormal": sorted(f"{r['name']} {r['value']} {r['unit']} {r['arrow']}".strip() for r in p["labs"] if r["abnormal"]),
    } for p in patients}}


def changes(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, list[str]] | None:
    """What a nurse must notice between two packs; None when there is no previous pack to compare with."""
    if previous is None:
        return None
    before: dict[str, Any] = previous.get("patients") or {}
    now: dict[str, Any] = current["patients"]
    out: dict[str, list[str]] = {key: [] for key in ("admissions", "discharges", "new_allergies", "new_prescriptions",
                                                      "stopped_prescriptions", "new_abnormal")}
    for pid, p in now.items():
        old = before.get(pid)
        who = f"{p['bed']} · {p['name']}"
        if old is None:
            allergies = f" — {', '.join(p['allergies'])}" if p["allergies"] else ""
            out["admissions"].append(who + allergies)
            continue
        out["new_allergies"] += [f"{who}: {a}" for a in p["allergies"] if a not in old.get("allergies", [])]
        out["new_prescriptions"] += [f"{who}: {text}" for rid, text in p["prescriptions"].items() if rid not in old.get("prescriptions", {})]
        out["stopped_prescriptions"] += [f"{who}: {text}" for rid, text in old.get("prescriptions", {}).items()
                                         if rid not in p["prescriptions"]]
        out["new_abnormal"] += [f"{who}: {r}" for r in p["abnormal"] if r not in old.get("abnormal", [])]
    out["discharges"] = [f"{p['bed']} · {p['name']}" for pid, p in before.items() if pid not in now]
    return out


def _digest(content: Any) -> str:
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


def ward_pack(store: Store, ward_id: str, now: dt.datetime, t: Translator, source: Source,
              previous: dict[str, Any] | None = None) -> Pack:
    """Everything the ward's pack prints, as of `now`; `previous` is the facts of the previous pack, if any."""
    census = ward_occupancy(store, ward_id, now)
    grid_start = now.astimezone(HOSPITAL_TZ).replace(minute=0, second=0, microsecond=0)
    beds = []
    patients = []
    for line in census.beds:
        bed = line.bed if line.bed_id else t.gettext("not in a bed")
        if line.patient is None:
            beds.append({"bed": bed, "empty": True})
            continue
        chart = patient_chart(store, line.patient.id, now)
        patient = _patient(store, t, chart, bed, now, grid_start)
        patients.append(patient)
        beds.append({"bed": bed, "empty": False, "name": patient["name"], "birth_date": patient["birth_date"],
                     "ipp": patient["ipp"], "admitted": patient["admitted"], "attending": patient["attending"],
                     "allergies": patient["allergies"], "call_waiting": any(c["waiting"] for c in patient["critical_calls"])})
    content = {"ward": census.ward.name, "hospital": census.ward.hospital, "census": beds, "patients": patients,
               "on_call": _on_call(store, t, ward_id, now), "procedures": _procedures(store, census.ward.hospital_id)}
    # the grid follows the clock, not the record: it stays out of the hash, so the same record gives the same hash
    digest = _digest({**content, "patients": [{k: v for k, v in p.items() if k != "grid"} for p in patients]})
    facts = _facts(patients)
    data = {
        **content, "labels": _labels(t), "lang": t.language, "digest": "-".join(digest[i:i + 4] for i in range(0, 12, 4)),
        "as_of": t.datetime(now, "long"), "hours": [(grid_start + dt.timedelta(hours=n)).strftime("%H") for n in range(GRID_HOURS)],
        "source": {"role": source.role, "node": source.node, "data_as_of": t.datetime(source.data_as_of, "long"),
                   "upstream_reachable": source.upstream_reachable},
        "changes": changes(previous, facts), "previous_as_of": (previous or {}).get("as_of_text"),
    }
    facts["as_of_text"] = data["as_of"]
    return Pack(census.ward, data, facts, digest, now)
