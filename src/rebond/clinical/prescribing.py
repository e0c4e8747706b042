"""Prescribing at the bedside: the hospital's formulary, a new prescription, stopping one, and the check of each
prescription against the patient's known allergies.

The formulary is the hospital's list of medicines (its « livret thérapeutique »), one FHIR `Medication` each: its
`code` (ATC and the name prescribers know) and its `ingredient` concepts, coded as the allergies are (SNOMED CT), the
substance and the classes it belongs to (amoxicillin is a penicillin). A prescription names a medicine of the formulary
and is a `MedicationRequest`, written once; stopping it is a new version of it (status `stopped`, the reason and who
stopped it in its notes), so that a site node cut off can do both and replay them like any other write.

A prescription that meets a known allergy (one of the medicine's codes among the allergy's, or the allergy's substance
named in the medicine's name) is refused unless the prescriber says they maintain it. It is then written with a
`DetectedIssue` (ActCode ALGY) naming both and the prescriber's decision. The same check marks the prescriptions of the
chart, of the administration form and of the downtime pack, whoever wrote them.
"""
from __future__ import annotations

import datetime as dt
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from rebond.clinical.conventions import ATC, PRESCRIPTION_ACKNOWLEDGEMENT, SNOMED
from rebond.clinical.recording import InvalidForm, typed_text
from rebond.clinical.records import (
    Clinician,
    Entry,
    Resource,
    any_of,
    concept_text,
    fhir_instant,
    find,
    read,
)
from rebond.clinical.results import Acknowledgement, acknowledge_result, acknowledgements
from rebond.fhir import operations
from rebond.store.base import NotFound, PreconditionFailed, Session, Store

if TYPE_CHECKING:  # the census imports this module
    from rebond.clinical.census import Allergy

FORMULARY_SYSTEM = "urn:rebond:formulary"  # the namespace of the ids of the demo formulary's lines
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
#: the routes a prescription is given by, as the wards write them
ROUTES = ("Voie orale", "Voie sous-cutanée", "Voie intraveineuse", "Voie intramusculaire", "Voie inhalée", "Voie cutanée",
          "Voie rectale", "Voie sublinguale")
MAX_DAYS = 365
MAX_DOSE_TEXT = 200
MAX_PRESCRIPTION_NOTE = 1000
MAX_TIMES = 12  # doses a day at set times: more is a continuous infusion, written otherwise
#: a prescription written this recently, and not yet read by a nurse, is new on the census and in the chart
NEW_PRESCRIPTION_WINDOW = dt.timedelta(hours=12)
_TIME = re.compile(r"^(\d{1,2})\s*(?:h|:)\s*(\d{2})?$")


@dataclass(frozen=True)
class Medicine:
    """A line of the formulary."""

    id: str
    name: str
    code: Resource  # the Medication's code: what a prescription of it names
    allergens: frozenset[tuple[str, str]]  # (system, code) of its ingredients and the classes they belong to

    @property
    def codes(self) -> frozenset[tuple[str, str]]:
        return frozenset(_codes(self.code)) | self.allergens


def medicine(resource: Resource) -> Medicine:
    allergens = {pair for ingredient in resource.get("ingredient") or () for pair in _codes(ingredient.get("itemCodeableConcept"))}
    code = resource.get("code") or {}
    return Medicine(str(resource["id"]), concept_text(code), code, frozenset(allergens))


def formulary(store: Store) -> list[Medicine]:
    """The medicines that may be prescribed, by name."""
    return sorted((medicine(r) for r in find(store, "Medication", ("status", "active"))), key=lambda m: _normal(m.name))


def formulary_resource(name: str, atc: str, allergens: Iterable[str]) -> Resource:
    """A formulary line as a `Medication`, its id derived from its name: made twice, or on two nodes, the same resource."""
    resource: Resource = {
        "resourceType": "Medication", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{FORMULARY_SYSTEM}:{name}")), "status": "active",
        "code": {"coding": [{"system": ATC, "code": atc}], "text": name},
    }
    codes = [{"system": SNOMED, "code": code} for code in allergens]
    if codes:
        resource["ingredient"] = [{"itemCodeableConcept": {"coding": codes}, "isActive": True}]
    return resource


def allergy_conflicts(allergies: Iterable[Allergy], codes: Iterable[tuple[str, str]], name: str) -> list[Allergy]:
    """The allergies a medicine meets: one of its codes (its own, its ingredients', their classes') among an allergy's,
    or the allergy's substance (its first word, singular) a word of the medicine's name."""
    known = set(codes)
    words = set(_normal(name).split())
    out = []
    for allergy in allergies:
        substance = _normal(allergy.substance).split()
        if known & set(allergy.codes) or (substance and len(substance[0]) >= 4 and substance[0].rstrip("s") in
                                          {w.rstrip("s") for w in words}):
            out.append(allergy)
    return out


def allergens_of(store: Store, concepts: Iterable[Resource]) -> dict[tuple[str, str], frozenset[tuple[str, str]]]:
    """For each (system, code) of the concepts (the medicines of prescriptions), every code an allergy to it is found
    under: the codes of the formulary's medicines with that code (one search for them all)."""
    wanted = {pair for concept in concepts for pair in _codes(concept)}
    if not wanted:
        return {}
    found: dict[tuple[str, str], frozenset[tuple[str, str]]] = {pair: frozenset({pair}) for pair in wanted}
    for line in (medicine(r) for r in find(store, "Medication", ("code", any_of(f"{s}|{c}" for s, c in sorted(wanted))))):
        for pair in _codes(line.code):
            if pair in found:
                found[pair] = found[pair] | line.codes
    return found


def conflicts_of(request: Resource, allergies: list[Allergy], allergens: Mapping[tuple[str, str], frozenset[tuple[str, str]]]) -> list[Allergy]:
    """The allergies a MedicationRequest meets, `allergens` from `allergens_of`."""
    concept = request.get("medicationCodeableConcept") or {}
    codes = {code for pair in _codes(concept) for code in allergens.get(pair, {pair})}
    return allergy_conflicts(allergies, codes, concept_text(concept))


def parse_times(text: str) -> list[str]:
    """'8h, 20h30' or '08:00 ; 14:00 et 20:00' → ['08:00', '20:30']; ValueError for anything else."""
    out = set()
    for part in re.split(r"[,;/]|\s+et\s+|\s+(?=\d)", text.strip().lower()):
        part = part.strip()
        if not part:
            continue
        match = _TIME.match(part)
        if match is None:
            raise ValueError(part)
        hour, minute = int(match.group(1)), int(match.group(2) or 0)
        if hour > 23 or minute > 59:
            raise ValueError(part)
        out.add(f"{hour:02d}:{minute:02d}")
    return sorted(out)


def prescribe(store: Store, patient_id: str, form: Mapping[str, str], clinician: Clinician, now: dt.datetime,
              allergies: list[Allergy], encounter_id: str | None = None) -> str:
    """A new prescription from the form (medication: a formulary line's id; dose; route; times or as_needed with
    indication; days; note; despite_allergy; entry); returns the MedicationRequest id. `allergies`: the patient's,
    as the form showed them. InvalidForm says what to correct, `allergy:<substances>` when the prescriber must say
    they maintain it."""
    if read(store, "Patient", patient_id) is None:
        raise NotFound(f"no Patient/{patient_id}")
    problems: dict[str, str] = {}
    chosen = read(store, "Medication", form.get("medication", "")) if form.get("medication") else None
    line = medicine(chosen) if chosen is not None and chosen.get("status", "active") == "active" else None
    if line is None:
        problems["medication"] = "not-in-formulary"
    dose = typed_text(form, problems, MAX_DOSE_TEXT, "dose")
    route = form.get("route", "")
    if route not in ROUTES:
        problems["route"] = "choose-one"
    as_needed = form.get("as_needed") == "yes"
    indication = " ".join((form.get("indication") or "").split())[:MAX_DOSE_TEXT]
    times: list[str] = []
    if not as_needed:
        try:
            times = parse_times(form.get("times", ""))
        except ValueError:
            problems["times"] = "not-times"
        else:
            if not times:
                problems["times"] = "times-or-as-needed"
            elif len(times) > MAX_TIMES:
                problems["times"] = f"too-many-times:{MAX_TIMES}"
    days = None
    if (form.get("days") or "").strip():
        raw = form["days"].strip()
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
            problems["days"] = f"out-of-range:1:{MAX_DAYS}"
        else:
            days = int(raw)
    note = " ".join((form.get("note") or "").split())
    if len(note) > MAX_PRESCRIPTION_NOTE:
        problems["note"] = f"too-long:{MAX_PRESCRIPTION_NOTE}"
    met = allergy_conflicts(allergies, line.codes, line.name) if line is not None else []
    if met and form.get("despite_allergy") != "yes" and not problems:
        problems["medication"] = "allergy:" + ", ".join(a.substance for a in met)
    if problems:
        raise InvalidForm(problems)
    assert line is not None
    entry = Entry.of(form.get("entry"))
    dosage: Resource = {"text": _dosage_text(dose, times, as_needed, indication, days), "route": {"text": route}}
    repeat: Resource = {}
    if times:
        repeat = {"frequency": len(times), "period": 1, "periodUnit": "d", "timeOfDay": [f"{t}:00" for t in times]}
    if days is not None:
        repeat["boundsPeriod"] = {"start": fhir_instant(now), "end": fhir_instant(now + dt.timedelta(days=days))}
    if repeat:
        dosage["timing"] = {"repeat": repeat}
    if as_needed:
        dosage["asNeededCodeableConcept" if indication else "asNeededBoolean"] = {"text": indication} if indication else True
    request: Resource = {
        "resourceType": "MedicationRequest", "id": entry.id(patient_id), "status": "active", "intent": "order",
        "medicationCodeableConcept": line.code, "subject": {"reference": f"Patient/{patient_id}"},
        "requester": clinician.reference(), "authoredOn": fhir_instant(now), "dosageInstruction": [dosage],
    }
    if encounter_id:
        request["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    if note:
        request["note"] = [_annotation(clinician, now, note)]
    issue: Resource | None = None
    if met:
        issue = {
            "resourceType": "DetectedIssue", "id": entry.id("allergy"), "status": "final",
            "code": {"coding": [{"system": ACT_CODE, "code": "ALGY", "display": "Allergy Alert"}], "text": "Allergie connue"},
            "severity": "high" if any(a.criticality == "high" for a in met) else "moderate",
            "patient": {"reference": f"Patient/{patient_id}"}, "identifiedDateTime": fhir_instant(now),
            "implicated": [{"reference": f"MedicationRequest/{request['id']}"}],
            "detail": f"Allergie connue : {', '.join(a.substance for a in met)} — {line.name}",
            "mitigation": [{"action": {"text": "Prescription maintenue par le prescripteur"}, "date": fhir_instant(now),
                            "author": clinician.reference()}],
        }
        if clinician.practitioner_id:
            issue["author"] = clinician.reference()

    def save(tx: Session) -> str:
        if entry.recorded(tx, "MedicationRequest", patient_id):
            return str(request["id"])  # the form sent twice: recorded the first time
        operations.create(tx, "MedicationRequest", request, resource_id=request["id"])
        if issue is not None:
            operations.create(tx, "DetectedIssue", issue, resource_id=issue["id"])
        return str(request["id"])

    return store.write(save)


def stop(store: Store, patient_id: str, request_id: str, form: Mapping[str, str], clinician: Clinician, now: dt.datetime) -> None:
    """Stop an active prescription (form: reason, version: the version the person saw). A prescription changed since
    they saw it is a PreconditionFailed: they look again. One already stopped stays as it is."""
    problems: dict[str, str] = {}
    reason = typed_text(form, problems, MAX_DOSE_TEXT, "reason")
    if problems:
        raise InvalidForm(problems)
    seen = int(form["version"]) if (form.get("version") or "").isdigit() else None

    def save(tx: Session) -> None:
        stored = tx.read("MedicationRequest", request_id)
        if stored is None or stored.deleted or stored.body is None:
            raise NotFound(f"no MedicationRequest/{request_id}")
        request: Resource = orjson.loads(stored.body)
        if (request.get("subject") or {}).get("reference") != f"Patient/{patient_id}":
            raise NotFound(f"no MedicationRequest/{request_id} for this patient")
        if request.get("status") == "stopped":
            return
        if seen is not None and seen != stored.version:
            raise PreconditionFailed(f"MedicationRequest/{request_id} changed since it was shown")
        request["status"] = "stopped"
        request["statusReason"] = {"text": reason}
        request["note"] = [*(request.get("note") or ()), _annotation(clinician, now, f"Arrêtée : {reason}")]
        operations.update(tx, "MedicationRequest", request_id, request, if_match=stored.version)

    store.write(save)


def _dosage_text(dose: str, times: list[str], as_needed: bool, indication: str, days: int | None) -> str:
    """How the wards read it: « 1 comprimé à 08:00, 20:00 pendant 5 jours », « 1 comprimé si besoin (douleur) »."""
    when = ("si besoin" + (f" ({indication})" if indication else "")) if as_needed else f"à {', '.join(times)}"
    text = f"{dose} {when}"
    if days is not None:
        text += f" pendant {days} jour{'s' if days > 1 else ''}"
    return text


def _annotation(clinician: Clinician, now: dt.datetime, text: str) -> Resource:
    reference = clinician.reference()
    author: Resource = {"authorReference": reference} if "reference" in reference else {"authorString": clinician.display}
    return {**author, "time": fhir_instant(now), "text": text}


def _codes(concept: object) -> list[tuple[str, str]]:
    if not isinstance(concept, dict):
        return []
    return [(str(c.get("system", "")), str(c["code"])) for c in concept.get("coding") or () if isinstance(c, dict) and c.get("code")]


def _normal(text: str) -> str:
    """Lower case, without accents or punctuation: 'Pénicillines' → 'penicillines'."""
    flat = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)).lower()
    return re.sub(r"[^a-z0-9]+", " ", flat).strip()


def acknowledge(store: Store, request_id: str, clinician: Clinician, now: dt.datetime) -> Acknowledgement:
    """A nurse has read a new prescription (« Prise en compte »): a completed Task, recorded once, as for results."""
    return acknowledge_result(store, request_id, clinician, now, "MedicationRequest", PRESCRIPTION_ACKNOWLEDGEMENT,
                              "Prescription prise en compte")


def seen(store: Store, request_ids: Iterable[str]) -> dict[str, Acknowledgement]:
    """Who first read each prescription, and when."""
    return acknowledgements(store, request_ids, "MedicationRequest", PRESCRIPTION_ACKNOWLEDGEMENT)


def is_new(authored: dt.datetime | None, now: dt.datetime) -> bool:
    return authored is not None and authored >= now - NEW_PRESCRIPTION_WINDOW
