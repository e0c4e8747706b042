"""Critical results: the lab's call to the ward, written in the same transaction as the result.

A potassium at 6.8 mmol/L must reach someone who can act on it, and a lab calls the ward for it
by telephone, the telephone that goes down with the rest of the IT. So when an ORU^R01 gives a
result flagged critical (OBX-8 HH, LL or AA), the commit that stores the result also writes an
urgent message (clinical/messaging.py) to the box of the patient's ward:

    Communication.category   urn:rebond:communication-category|message, and …|critical-result
    Communication.priority   urgent
    Communication.sender     the lab's service (the one MSH-4 names, or the ward's hospital's)
    Communication.recipient  the ward's service, where the patient's stay is now; without a ward
                             (no stay in progress, an outpatient), the lab's own box: call the prescriber
    Communication.subject    the patient
    Communication.about      the DiagnosticReport
    Communication.payload    « Résultat critique : Potassium 6,8 mmol/L (HH ; normales 3,5–5) … »

The message waits in the ward's box, on its census, and as « 1 urgent » in the top bar of every
page its nurses open, until someone answers it or says « Je m'en occupe ». Its id derives from the
report and its critical values: the same message sent twice, or played again, writes it once; a
correction that changes a critical value writes a new one.
"""
from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from rebond.clinical.conventions import COMMUNICATION_CATEGORY, CRITICAL_FLAGS, HOSPITAL_TZ, INTERPRETATION, SERVICE_SYSTEM
from rebond.clinical.messaging import CRITICAL_RESULT, MESSAGE, is_hospital_service, patient_subject
from rebond.clinical.records import concept_text, fhir_instant, instant, ref_id
from rebond.fhir.search import literal

if TYPE_CHECKING:
    from rebond.hl7.mapping import Writer

Resource = dict[str, Any]
_NOT_ALERTED = ("cancelled", "entered-in-error")
#: how the call begins: a result; a correction of one that changes a critical value
CALL_HEAD = "Résultat critique : "
CORRECTED_HEAD = "Résultat critique corrigé : "
#: what the call asks, after the result: of the ward; of the lab, for a patient in no ward
WARD_ASKED = " Prévenez le médecin, puis répondez ici ou cliquez « Je m'en occupe »."
LAB_ASKED = " Le patient n'a pas de séjour en cours dans un service : appelez le prescripteur."


def called(text: str) -> str:
    """What a call says of the result, from its text: « Potassium 6,8 mmol/L (HH ; normales 3,5–5), prélevé le … ».
    Without « Résultat critique : » and what it asks."""
    return text.removeprefix(CORRECTED_HEAD).removeprefix(CALL_HEAD).removesuffix(WARD_ASKED).removesuffix(LAB_ASKED)


def is_correction(text: str) -> bool:
    """A call for a correction that changed a critical value."""
    return text.startswith(CORRECTED_HEAD)


def flags(observation: Resource) -> list[str]:
    return [str(c.get("code")) for concept in observation.get("interpretation") or () for c in concept.get("coding") or ()
            if c.get("system") == INTERPRETATION]


def critical(observations: list[Resource]) -> list[Resource]:
    """The results flagged critical, leaving out those withdrawn."""
    return [o for o in observations if o.get("status") not in _NOT_ALERTED and CRITICAL_FLAGS.intersection(flags(o))]


def _number(value: Any) -> str:
    return f"{value:g}".replace(".", ",") if isinstance(value, int | float) else str(value)


def _quantity(quantity: Resource) -> str:
    unit = str(quantity.get("unit") or quantity.get("code") or "")
    return f"{quantity.get('comparator', '')}{_number(quantity.get('value'))}{' ' + unit if unit else ''}"


def describe(observation: Resource) -> str:
    """« Potassium 6,8 mmol/L (HH ; normales 3,5–5) »: the analyte, its value, its flag and its normal range."""
    name = concept_text(observation.get("code")) or "?"
    if "valueQuantity" in observation:
        value = _quantity(observation["valueQuantity"])
    elif "valueString" in observation:
        value = str(observation["valueString"])
    elif "valueCodeableConcept" in observation:
        value = concept_text(observation["valueCodeableConcept"])
    else:
        value = "?"
    marks = " ".join(f for f in flags(observation) if f in CRITICAL_FLAGS)
    span: Resource = next(iter(observation.get("referenceRange") or ()), {})
    if "low" in span and "high" in span:
        marks += f" ; normales {_number(span['low'].get('value'))}–{_number(span['high'].get('value'))}"
    elif "high" in span:
        marks += f" ; normales < {_number(span['high'].get('value'))}"
    elif "low" in span:
        marks += f" ; normales > {_number(span['low'].get('value'))}"
    return f"{name} {value} ({marks})"


def _active_places(encounter: Resource) -> list[str]:
    return [str(loc["location"]["reference"]) for loc in encounter.get("location") or ()
            if loc.get("status", "active") == "active" and isinstance((loc.get("location") or {}).get("reference"), str)]


def _ward_service(w: Writer, patient_id: str, encounter: Resource | None) -> Resource | None:
    """The service of the ward the patient's stay is in now: the message's stay, or their stay in progress."""
    if encounter is None or encounter.get("status") != "in-progress":
        encounter = w.find_one("Encounter", ("subject", f"Patient/{patient_id}"), ("status", "in-progress"))
    places = _active_places(encounter) if encounter is not None else []
    if not places:
        return None
    return w.find_one("HealthcareService", ("location", ",".join(places)), ("active", "true"))


def _lab_service(w: Writer, sending_facility: str, ward: Resource | None) -> Resource | None:
    """The lab that calls: the service MSH-4 names (`H1-LAB`), or the lab of the site it names (`H1`), or the lab of the
    ward's hospital."""
    for code in (sending_facility, f"{sending_facility}-LAB") if sending_facility else ():
        named = w.find_one("HealthcareService", ("identifier", f"{SERVICE_SYSTEM}|{literal(code)}"), ("active", "true"))
        if named is not None:
            return named
    hospital = ref_id((ward or {}).get("providedBy"), "Organization")
    if hospital is None:
        return None
    for service in w.find("HealthcareService", ("organization", f"Organization/{hospital}"), ("active", "true")):
        if is_hospital_service(service, "LAB"):
            return service
    return None


def _as_box(service: Resource) -> dict[str, str]:
    return {"reference": f"HealthcareService/{service['id']}", "display": str(service.get("name", ""))}


def _prescriber(requester: Resource | None) -> str:
    """« Prescripteur : Dr Jeanne ROBIN (RPPS 10001). », or nothing for an order that does not say who."""
    if not requester:
        return ""
    number = (requester.get("identifier") or {}).get("value")
    who = " ".join(p for p in (str(requester.get("display") or ""), f"(RPPS {number})" if number else "") if p)
    return f" Prescripteur : {who}." if who else ""


def alert(w: Writer, report: Resource, found: list[Resource], patient: Resource, encounter: Resource | None,
          sending_facility: str, now: dt.datetime, alert_id: str, *, prescriber: Resource | None = None) -> Resource | None:
    """The urgent message for a report's critical results (`found`); None if it has no one to tell. `prescriber`: the
    order's requester, named in it (the one the lab rings for a patient in no ward)."""
    ward = _ward_service(w, str(patient["id"]), encounter)
    lab = _lab_service(w, sending_facility, ward)
    head = CORRECTED_HEAD if report.get("status") == "corrected" else CALL_HEAD
    taken = min((t for o in found if (t := instant(o.get("effectiveDateTime"))) is not None), default=None)
    when = f", prélevé le {taken.astimezone(HOSPITAL_TZ):%d/%m à %H:%M}" if taken is not None else ""
    text = f"{head}{' ; '.join(describe(o) for o in found)}{when}.{_prescriber(prescriber)}"
    if ward is not None:
        recipient = _as_box(ward)
        sender = _as_box(lab) if lab is not None else {"display": f"Laboratoire {sending_facility}".strip() + " (alerte automatique)"}
        text += WARD_ASKED
    elif lab is not None:  # no ward to tell: the lab's own box, so that the lab calls whoever prescribed it
        recipient = _as_box(lab)
        sender = {"display": "Rebond (alerte automatique)"}
        text += LAB_ASKED
    else:
        return None
    return {
        "resourceType": "Communication", "id": alert_id, "status": "completed",
        "category": [{"coding": [{"system": COMMUNICATION_CATEGORY, "code": MESSAGE}]},
                     {"coding": [{"system": COMMUNICATION_CATEGORY, "code": CRITICAL_RESULT}]}],
        "priority": "urgent", "sent": fhir_instant(now), "sender": sender, "recipient": [recipient],
        "subject": patient_subject(patient),
        "about": [{"reference": f"DiagnosticReport/{report['id']}"}],
        "payload": [{"contentString": text}],
    }
