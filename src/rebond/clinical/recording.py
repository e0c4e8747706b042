"""What nurses and physicians record at the bedside: vital signs, administrations and notes, checked before anything is
written.

Each form is validated as a whole: a value out of its plausible range sends the form back
with the reasons, and nothing is written; a valid form is one transaction.
"""
from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from rebond.clinical.conventions import DOCUMENT_CATEGORY, HOSPITAL_TZ, INTERPRETATION, LOINC, OBSERVATION_CATEGORY, UCUM
from rebond.clinical.records import Clinician, Entry, Resource, create_once, fhir_instant, read
from rebond.fhir import operations
from rebond.store.base import NotFound, Session, Store


@dataclass(frozen=True)
class VitalSign:
    field: str  # the form field
    loinc: str
    label: str  # English; the web app translates it
    display: str  # French, written in the record
    unit: str
    low: float  # usual range: outside it the value is flagged
    high: float
    minimum: float  # plausible range: outside it the value is a typing error
    maximum: float
    decimals: int = 0


VITAL_SIGNS = (
    VitalSign("heart_rate", "8867-4", "Heart rate", "Fréquence cardiaque", "/min", 55, 100, 20, 250),
    VitalSign("systolic", "8480-6", "Systolic blood pressure", "Pression artérielle systolique", "mm[Hg]", 100, 140, 40, 280),
    VitalSign("diastolic", "8462-4", "Diastolic blood pressure", "Pression artérielle diastolique", "mm[Hg]", 60, 90, 20, 180),
    VitalSign("temperature", "8310-5", "Temperature", "Température corporelle", "Cel", 36.0, 38.0, 30.0, 44.0, 1),
    VitalSign("spo2", "59408-5", "Oxygen saturation", "Saturation en oxygène", "%", 94, 100, 50, 100),
    VitalSign("respiratory_rate", "9279-1", "Respiratory rate", "Fréquence respiratoire", "/min", 12, 20, 4, 70),
)


@dataclass(frozen=True)
class NoteKind:
    code: str  # the form's value
    loinc: str
    label: str  # English; the web app translates it
    display: str  # French, written in the record


NOTE_KINDS = (
    NoteKind("progress", "11506-3", "Progress note", "Note d'évolution"),
    NoteKind("nursing", "34746-8", "Nursing note", "Transmissions infirmières"),
)
#: the longest note (a page and a half)
MAX_NOTE = 5000


class InvalidForm(ValueError):
    """The reasons, field by field, a form was refused; nothing was written."""

    def __init__(self, problems: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()))
        self.problems = problems


def typed_text(form: Mapping[str, str], problems: dict[str, str], limit: int, field: str = "text") -> str:
    """A free text field, its line ends as \\n: required, `limit` characters at most; a problem is added to `problems`."""
    text = (form.get(field) or "").strip().replace("\r\n", "\n")
    if not text:
        problems[field] = "required"
    elif len(text) > limit:
        problems[field] = f"too-long:{limit}"
    return text


def _number(raw: str) -> float:
    return float(raw.strip().replace(",", "."))  # French keyboards write 37,5


def record_vitals(store: Store, patient_id: str, form: Mapping[str, str], clinician: Clinician, now: dt.datetime) -> list[str]:
    """Write one Observation per filled field, all in one transaction; returns their ids.

    Problems are reported as message ids the caller translates ("out-of-range:40:280" etc.).
    """
    patient = read(store, "Patient", patient_id)
    if patient is None:
        raise NotFound(f"no Patient/{patient_id}")
    problems: dict[str, str] = {}
    values: list[tuple[VitalSign, float]] = []
    for sign in VITAL_SIGNS:
        raw = (form.get(sign.field) or "").strip()
        if not raw:
            continue
        try:
            value = _number(raw)
        except ValueError:
            problems[sign.field] = "not-a-number"
            continue
        if not sign.minimum <= value <= sign.maximum:
            problems[sign.field] = f"out-of-range:{sign.minimum:g}:{sign.maximum:g}"
            continue
        values.append((sign, round(value, sign.decimals)))
    if not values and not problems:
        problems["_form"] = "empty"
    fields = {sign.field: value for sign, value in values}
    if "systolic" in fields and "diastolic" in fields and fields["diastolic"] >= fields["systolic"]:
        problems["diastolic"] = "diastolic-above-systolic"
    if problems:
        raise InvalidForm(problems)
    # the ids name the patient too: an entry sent with another patient's form (a page tampered with) records anew
    entry = Entry.of(form.get("entry"))
    observations = [_vital(sign, value, patient_id, clinician, now, entry.id(f"{patient_id}/{sign.field}")) for sign, value in values]

    def save(tx: Session) -> list[str]:
        already = entry.recorded(tx, "Observation", *(f"{patient_id}/{sign.field}" for sign in VITAL_SIGNS))
        if already:  # this form was sent before and recorded: not twice
            return already
        return [operations.create(tx, "Observation", o, resource_id=o["id"]).stored.id for o in observations]  # type: ignore[union-attr]

    return store.write(save)


def _vital(sign: VitalSign, value: float, patient_id: str, clinician: Clinician, when: dt.datetime, rid: str) -> Resource:
    flag = "H" if value > sign.high else "L" if value < sign.low else "N"
    quantity = {"value": value, "unit": sign.unit, "system": UCUM, "code": sign.unit}
    return {
        "resourceType": "Observation", "id": rid, "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": sign.loinc, "display": sign.display}], "text": sign.display},
        "subject": {"reference": f"Patient/{patient_id}"}, "effectiveDateTime": fhir_instant(when), "issued": fhir_instant(when),
        "performer": [clinician.reference()], "valueQuantity": quantity,
        "interpretation": [{"coding": [{"system": INTERPRETATION, "code": flag}]}],
        "referenceRange": [{"low": {**quantity, "value": sign.low}, "high": {**quantity, "value": sign.high}}],
    }


def record_administration(store: Store, request_id: str, form: Mapping[str, str], clinician: Clinician, now: dt.datetime) -> str:
    """A dose given (or not given, with the reason) for a prescription; returns the MedicationAdministration id."""
    request = read(store, "MedicationRequest", request_id)
    if request is None:
        raise NotFound(f"no MedicationRequest/{request_id}")
    problems: dict[str, str] = {}
    outcome = form.get("outcome", "")
    reason = (form.get("reason") or "").strip()
    if outcome not in ("given", "not-given"):
        problems["outcome"] = "choose-outcome"
    elif outcome == "not-given" and not reason:
        problems["reason"] = "reason-required"
    when = now
    if form.get("time"):
        try:
            at = dt.time.fromisoformat(form["time"])
        except ValueError:
            problems["time"] = "not-a-time"
        else:
            local = now.astimezone(HOSPITAL_TZ).replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
            when = local - dt.timedelta(days=1) if local > now + dt.timedelta(minutes=5) else local
    if problems:
        raise InvalidForm(problems)
    entry = Entry.of(form.get("entry"))
    given: Resource = {
        "resourceType": "MedicationAdministration", "id": entry.id(request_id),
        "status": "completed" if outcome == "given" else "not-done",
        "medicationCodeableConcept": request.get("medicationCodeableConcept") or {"text": "?"},
        "subject": request["subject"], "request": {"reference": f"MedicationRequest/{request_id}"},
        "effectiveDateTime": fhir_instant(when), "performer": [{"actor": clinician.reference()}],
    }
    if request.get("encounter"):
        given["context"] = request["encounter"]
    dosage = (request.get("dosageInstruction") or [{}])[0]
    if dosage.get("text"):
        given["dosage"] = {"text": dosage["text"]}
    if outcome == "not-given":
        given["statusReason"] = [{"text": reason}]
    return create_once(store, entry, given, request_id)


def record_note(store: Store, patient_id: str, form: Mapping[str, str], clinician: Clinician, now: dt.datetime,
                encounter_id: str | None = None) -> str:
    """A clinical note (fields: kind, text, entry) on the patient's record, for their stay if given; returns the
    DocumentReference id, read in the chart like the notes other systems send. Never changed: a correction is a new note."""
    if read(store, "Patient", patient_id) is None:
        raise NotFound(f"no Patient/{patient_id}")
    problems: dict[str, str] = {}
    kind = next((k for k in NOTE_KINDS if k.code == form.get("kind")), None)
    if kind is None:
        problems["kind"] = "choose-one"
    text = typed_text(form, problems, MAX_NOTE)
    if problems:
        raise InvalidForm(problems)
    assert kind is not None
    entry = Entry.of(form.get("entry"))
    document: Resource = {
        "resourceType": "DocumentReference", "id": entry.id(patient_id), "status": "current", "docStatus": "final",
        "type": {"coding": [{"system": LOINC, "code": kind.loinc}], "text": kind.display},
        "category": [{"coding": [{"system": DOCUMENT_CATEGORY, "code": "clinical-note"}], "text": "Note clinique"}],
        "subject": {"reference": f"Patient/{patient_id}"}, "date": fhir_instant(now), "author": [clinician.reference()],
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "language": "fr", "title": kind.display,
                                    "data": base64.b64encode(text.encode()).decode()}}],
    }
    if encounter_id:
        document["context"] = {"encounter": [{"reference": f"Encounter/{encounter_id}"}]}
    return create_once(store, entry, document, patient_id)
