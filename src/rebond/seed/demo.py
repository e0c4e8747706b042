"""`rebond seed --demo`: a deterministic French hospital group, written as FHIR transactions through the store.

Group (Organization) → hospitals (Organization + site Location) → wards (Location
`wa`) → rooms (`ro`) → beds (`bd`). Staff are Practitioners with a PractitionerRole
per service. About 85 % of beds hold an inpatient stay (Encounter with its bed and
ward) with allergies, problems, prescriptions with their schedules, vitals and lab
results (some abnormal) grouped in DiagnosticReports. The same `--seed` gives the
same group, ids included.
"""
from __future__ import annotations

import base64
import datetime as dt
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from rebond.clinical.conventions import (
    ATC,
    DOCUMENT_CATEGORY,
    FINESS_SYSTEM,
    GROUP_IPP_SYSTEM,
    GROUP_VISIT_SYSTEM,
    HOSPITAL_TZ,
    INTERPRETATION,
    LOCATION_SYSTEM,
    LOCATION_TYPE,
    LOINC,
    OBSERVATION_CATEGORY,
    ON_CALL_SYSTEM,
    REPORT_SECTION,
    RPPS_SYSTEM,
    SNOMED,
    UCUM,
)
from rebond.clinical.messaging import add_services
from rebond.clinical.prescribing import formulary_resource
from rebond.clinical.records import person_name
from rebond.clinical.results import acknowledgement_task
from rebond.fhir import operations
from rebond.fhir.bundles import process_transaction
from rebond.fhir.search import parse_search
from rebond.security.accounts import Account, Accounts
from rebond.seed.vocabulary import (
    ALLERGIES,
    DOWNTIME_PROCEDURES,
    DRUGS,
    FAMILY_NAMES,
    GIVEN_FEMALE,
    GIVEN_MALE,
    HOSPITALS,
    IMAGING,
    LABS,
    MORE_DRUGS,
    NOTES,
    PROBLEMS,
    SERVICES,
    VITALS,
    Drug,
    LabTest,
)
from rebond.store.base import Store


@dataclass
class DemoSize:
    hospitals: int = 3
    wards_per_hospital: int = 6
    beds_per_ward: int = 24
    occupancy: float = 0.85
    days_of_results: int = 5


@dataclass
class SeedReport:
    resources: int = 0
    patients: int = 0
    beds: int = 0
    wards: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    #: the first ward's staff, for the demo accounts: profession -> (Practitioner id, name)
    staff: dict[str, tuple[str, str]] = field(default_factory=dict)


class _Ids:
    """Deterministic UUIDs from the seed, so the same seed gives the same ids."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def __call__(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ref(resource: dict[str, Any]) -> dict[str, str]:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


def _who(practitioner: dict[str, Any]) -> dict[str, str]:
    """A reference to a practitioner that carries their name, as every clinical record shows who did what."""
    return {**_ref(practitioner), "display": person_name(practitioner)}


def _location(new_id: Callable[[], str], name: str, kind: str, part_of: dict[str, Any] | None, org: dict[str, Any],
              identifier: str) -> dict[str, Any]:
    loc: dict[str, Any] = {
        "resourceType": "Location", "id": new_id(), "status": "active", "name": name, "mode": "instance",
        "identifier": [{"system": LOCATION_SYSTEM, "value": identifier}],
        "physicalType": {"coding": [{"system": LOCATION_TYPE, "code": kind}]},
        "managingOrganization": _ref(org),
    }
    if part_of is not None:
        loc["partOf"] = _ref(part_of)
    return loc


def seed_demo(store: Store, *, seed: int = 1, size: DemoSize | None = None, now: dt.datetime | None = None,
              progress: Callable[[int, int], None] | None = None) -> SeedReport:
    size = size or DemoSize()
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    rng = random.Random(seed)
    new_id = _Ids(random.Random(seed * 7919 + 1))
    report = SeedReport()

    def commit(entries: list[dict[str, Any]]) -> None:
        process_transaction(store, {"resourceType": "Bundle", "type": "transaction", "entry": entries}, "urn:rebond:seed")
        for e in entries:
            rtype = e["resource"]["resourceType"]
            report.counts[rtype] = report.counts.get(rtype, 0) + 1
        report.resources += len(entries)

    group: dict[str, Any] = {"resourceType": "Organization", "id": new_id(), "active": True, "name": "Groupe hospitalier Rebond",
             "identifier": [{"system": FINESS_SYSTEM, "value": "750000000"}],
             "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov"}]}]}
    commit([_entry(group)])
    total_wards = size.hospitals * size.wards_per_hospital
    done_wards = 0
    for h in range(size.hospitals):
        name, city, postcode, street = HOSPITALS[h % len(HOSPITALS)]
        if h >= len(HOSPITALS):
            name = f"{name} {h // len(HOSPITALS) + 1}"
        hospital: dict[str, Any] = {"resourceType": "Organization", "id": new_id(), "active": True, "name": name, "partOf": _ref(group),
                    "identifier": [{"system": FINESS_SYSTEM, "value": f"75{h:07d}"}],
                    "address": [{"line": [street], "city": city, "postalCode": postcode, "country": "FR"}]}
        site = _location(new_id, name, "si", None, hospital, f"H{h + 1}")
        site["address"] = hospital["address"][0]
        commit([_entry(hospital), _entry(site), *[_entry(d) for d in _procedures_binder(new_id, hospital, now)]])
        for w in range(size.wards_per_hospital):
            code, service_name, service_snomed = SERVICES[w % len(SERVICES)]
            ward_code = f"H{h + 1}-{code}{'' if w < len(SERVICES) else w // len(SERVICES) + 1}"
            entries = _ward(new_id, rng, hospital, site, ward_code, service_name, service_snomed, size, now, report)
            commit(entries)
            done_wards += 1
            if progress is not None:
                progress(done_wards, total_wards)
    services = add_services(store)  # what the wards, labs and pharmacies write to one another (clinical/messaging.py)
    report.counts["HealthcareService"] = services
    report.resources += services
    medicines = add_formulary(store)
    report.counts["Medication"] = medicines
    report.resources += medicines
    return report


def add_formulary(store: Store) -> int:
    """The demo hospital's formulary (clinical/prescribing.py): every drug of the vocabulary, made where missing."""
    lines = {d.name: formulary_resource(d.name, d.atc, d.allergens) for d in (*DRUGS, *MORE_DRUGS)}
    missing = [r for r in lines.values() if store.read("Medication", r["id"]) is None]
    if missing:
        store.write(lambda tx: [operations.update(tx, "Medication", r["id"], r) for r in missing])
    return len(missing)


def _staff(new_id: Callable[[], str], rng: random.Random, hospital: dict[str, Any], ward: dict[str, Any], service_name: str,
           service_snomed: str, count: int, profession: tuple[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    people, roles = [], []
    for _ in range(count):
        female = rng.random() < 0.6
        name: dict[str, Any] = {"family": rng.choice(FAMILY_NAMES), "given": [rng.choice(GIVEN_FEMALE if female else GIVEN_MALE)]}
        if profession[0] == "doctor":
            name["prefix"] = ["Dr"]
        person: dict[str, Any] = {"resourceType": "Practitioner", "id": new_id(), "active": True,
                                  "identifier": [{"system": RPPS_SYSTEM, "value": f"10{rng.randrange(10**9):09d}"}],
                                  "name": [name], "gender": "female" if female else "male"}
        role = {"resourceType": "PractitionerRole", "id": new_id(), "active": True, "practitioner": _who(person),
                "organization": _ref(hospital), "location": [_ref(ward)],
                "code": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/practitioner-role", "code": profession[0]}],
                          "text": profession[1]}],
                "specialty": [{"coding": [{"system": SNOMED, "code": service_snomed}], "text": service_name}]}
        people.append(person)
        roles.append(role)
    return people, roles


def _ward(new_id: Callable[[], str], rng: random.Random, hospital: dict[str, Any], site: dict[str, Any], ward_code: str,
          service_name: str, service_snomed: str, size: DemoSize, now: dt.datetime, report: SeedReport) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    ward = _location(new_id, f"{service_name} — {hospital['name']}", "wa", site, hospital, ward_code)
    ward["alias"] = [ward_code]
    entries.append(_entry(ward))
    report.wards += 1
    doctors, doctor_roles = _staff(new_id, rng, hospital, ward, service_name, service_snomed, 4, ("doctor", "Médecin"))
    nurses, nurse_roles = _staff(new_id, rng, hospital, ward, service_name, service_snomed, 6, ("nurse", "Infirmier(ère)"))
    entries += [_entry(r) for r in doctors + doctor_roles + nurses + nurse_roles]
    for profession, people in (("doctor", doctors), ("nurse", nurses)):
        report.staff.setdefault(profession, (people[0]["id"], person_name(people[0])))
    entries += [_entry(r) for r in _on_call_rota(new_id, ward, doctor_roles, service_name, service_snomed, now)]
    room: dict[str, Any] | None = None
    for b in range(size.beds_per_ward):
        if b % 2 == 0:
            room = _location(new_id, f"Chambre {ward_code}-{b // 2 + 1:02d}", "ro", ward, hospital, f"{ward_code}-{b // 2 + 1:02d}")
            entries.append(_entry(room))
        assert room is not None
        bed = _location(new_id, f"Lit {ward_code}-{b // 2 + 1:02d}{'AB'[b % 2]}", "bd", room, hospital,
                        f"{ward_code}-{b // 2 + 1:02d}{'AB'[b % 2]}")
        bed["operationalStatus"] = {"system": "http://terminology.hl7.org/CodeSystem/v2-0116", "code": "U", "display": "Libre"}
        entries.append(_entry(bed))
        report.beds += 1
        if rng.random() < size.occupancy:
            bed["operationalStatus"] = {"system": "http://terminology.hl7.org/CodeSystem/v2-0116", "code": "O", "display": "Occupé"}
            entries += _inpatient(new_id, rng, hospital, ward, bed, rng.choice(doctors), rng.choice(nurses), size, now)
            report.patients += 1
    return entries


def _inpatient(new_id: Callable[[], str], rng: random.Random, hospital: dict[str, Any], ward: dict[str, Any],
               bed: dict[str, Any], doctor: dict[str, Any], nurse: dict[str, Any], size: DemoSize,
               now: dt.datetime) -> list[dict[str, Any]]:
    female = rng.random() < 0.52
    age = int(min(99, max(18, rng.gauss(68, 16))))
    birth = (now - dt.timedelta(days=age * 365 + rng.randrange(365))).date()
    ipp = f"{rng.randrange(10**9):09d}"
    patient = {
        "resourceType": "Patient", "id": new_id(), "active": True,
        "identifier": [{"use": "usual", "system": GROUP_IPP_SYSTEM, "value": ipp,
                        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PI"}], "text": "IPP"}}],
        "name": [{"use": "official", "family": rng.choice(FAMILY_NAMES),
                  "given": [rng.choice(GIVEN_FEMALE if female else GIVEN_MALE)]}],
        "gender": "female" if female else "male", "birthDate": birth.isoformat(),
        "address": [{"city": hospital["address"][0]["city"], "postalCode": hospital["address"][0]["postalCode"], "country": "FR"}],
        "managingOrganization": _ref(hospital),
    }
    admitted = now - dt.timedelta(hours=rng.randrange(6, 24 * 9))
    encounter = {
        "resourceType": "Encounter", "id": new_id(), "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP", "display": "hospitalisation complète"},
        "identifier": [{"system": GROUP_VISIT_SYSTEM, "value": f"{rng.randrange(10**9):09d}"}],
        "subject": _ref(patient), "period": {"start": _iso(admitted)},
        "participant": [{"individual": _who(doctor), "type": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "ATND"}], "text": "Médecin référent"}]}],
        "location": [{"location": _ref(bed), "status": "active", "period": {"start": _iso(admitted)}},
                     {"location": _ref(ward), "status": "active", "period": {"start": _iso(admitted)}}],
        "serviceProvider": _ref(hospital),
    }
    out = [_entry(patient), _entry(encounter)]
    for name, code, criticality in rng.sample(ALLERGIES, k=rng.choice((0, 0, 1, 1, 2))):
        out.append(_entry({
            "resourceType": "AllergyIntolerance", "id": new_id(), "patient": _ref(patient),
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}]},
            "criticality": criticality, "code": {"coding": [{"system": SNOMED, "code": code}], "text": name},
            "recordedDate": _iso(admitted), "recorder": _who(doctor),
        }))
    for name, code in rng.sample(PROBLEMS, k=rng.randint(1, 3)):
        out.append(_entry({
            "resourceType": "Condition", "id": new_id(), "subject": _ref(patient), "encounter": _ref(encounter),
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": SNOMED, "code": code}], "text": name}, "recordedDate": _iso(admitted),
        }))
    prescriptions: list[tuple[dict[str, Any], Drug]] = []
    for drug in rng.sample(DRUGS, k=rng.randint(2, 6)):
        prescriptions.append(({
            "resourceType": "MedicationRequest", "id": new_id(), "status": "active", "intent": "order",
            "subject": _ref(patient), "encounter": _ref(encounter), "requester": _who(doctor), "authoredOn": _iso(admitted),
            "medicationCodeableConcept": {"coding": [{"system": ATC, "code": drug.atc}], "text": drug.name},
            "dosageInstruction": [{"text": f"{drug.dose} à {', '.join(drug.times)}",
                                   "timing": {"repeat": {"frequency": len(drug.times), "period": 1, "periodUnit": "d",
                                                         "timeOfDay": [f"{t}:00" for t in drug.times]}},
                                   "route": {"text": drug.route}}],
        }, drug))
    out += [_entry(request) for request, _drug in prescriptions]
    # results draw from streams of their own: how many there are depends on the hour the seed runs,
    # and must not change who lies in which bed
    results_rng = random.Random(rng.getrandbits(64))
    results_ids = _Ids(random.Random(rng.getrandbits(64)))
    results = _results(results_ids, results_rng, patient, encounter, nurse, admitted, size, now)
    out += results
    out += _acknowledgements(results_ids, results_rng, results, doctor, now)
    out += _administrations(results_ids, results_rng, patient, encounter, nurse, prescriptions, admitted, now)
    out += _imaging_and_notes(results_ids, results_rng, patient, encounter, doctor, admitted, now)
    return out


def _value(rng: random.Random, typical: float, spread: float, decimals: int, abnormal: bool, low: float, high: float) -> float:
    if abnormal:
        value = high + abs(rng.gauss(spread, spread / 2)) if rng.random() < 0.6 else low - abs(rng.gauss(spread / 2, spread / 4))
    else:
        value = min(high, max(low, rng.gauss(typical, spread / 2)))
    return round(max(value, 0.0), decimals) if decimals else float(round(max(value, 0.0)))


def _observation(new_id: Callable[[], str], patient: dict[str, Any], encounter: dict[str, Any] | None, performer: dict[str, Any],
                 when: dt.datetime, category: str, code: str, name: str, unit: str, value: float, low: float, high: float
                 ) -> dict[str, Any]:
    flag = "H" if value > high else "L" if value < low else "N"
    return {
        "resourceType": "Observation", "id": new_id(), "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": name}], "text": name},
        "subject": _ref(patient), **_during(encounter), "effectiveDateTime": _iso(when), "issued": _iso(when),
        "performer": [_who(performer)],
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        "interpretation": [{"coding": [{"system": INTERPRETATION, "code": flag}]}],
        "referenceRange": [{"low": {"value": low, "unit": unit, "system": UCUM, "code": unit},
                            "high": {"value": high, "unit": unit, "system": UCUM, "code": unit}}],
    }


def _results(new_id: Callable[[], str], rng: random.Random, patient: dict[str, Any], encounter: dict[str, Any],
             nurse: dict[str, Any], admitted: dt.datetime, size: DemoSize, now: dt.datetime) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    start = max(admitted, now - dt.timedelta(days=size.days_of_results))
    # vitals three times a day, labs every morning since admission (or the last days of the stay)
    moment = start.replace(minute=0, second=0) + dt.timedelta(hours=1)
    while moment < now:
        hour = moment.astimezone(HOSPITAL_TZ).hour  # the ward's rounds follow the hospital's clock
        if hour in (7, 14, 21):
            for code, name, unit, low, high, typical, spread, decimals in VITALS:
                value = _value(rng, typical, spread, decimals, rng.random() < 0.06, low, high)
                out.append(_entry(_observation(new_id, patient, encounter, nurse, moment, "vital-signs", code, name, unit,
                                               value, low, high)))
        if hour == 6 and moment + dt.timedelta(minutes=55) <= now:  # a panel drawn at 6 is out at 6:55, never in the future
            out += _lab_panel(new_id, rng, patient, encounter, nurse, moment, LABS)
        moment += dt.timedelta(hours=1)
    return out


def _during(encounter: dict[str, Any] | None) -> dict[str, Any]:
    return {"encounter": _ref(encounter)} if encounter else {}


def _lab_panel(new_id: Callable[[], str], rng: random.Random, patient: dict[str, Any], encounter: dict[str, Any] | None,
               performer: dict[str, Any], when: dt.datetime, tests: tuple[LabTest, ...]) -> list[dict[str, Any]]:
    observations = []
    for test in tests:
        value = _value(rng, test.typical, test.spread, test.decimals, rng.random() < 0.12, test.low, test.high)
        observations.append(_observation(new_id, patient, encounter, performer, when + dt.timedelta(minutes=50), "laboratory",
                                         test.loinc, test.name, test.unit, value, test.low, test.high))
    report = {
        "resourceType": "DiagnosticReport", "id": new_id(), "status": "final",
        "category": [{"coding": [{"system": REPORT_SECTION, "code": "LAB"}]}],
        "code": {"coding": [{"system": LOINC, "code": "24323-8"}], "text": "Bilan biologique"},
        "subject": _ref(patient), **_during(encounter), "effectiveDateTime": _iso(when),
        "issued": _iso(when + dt.timedelta(minutes=55)), "result": [_ref(o) for o in observations],
    }
    return [_entry(o) for o in observations] + [_entry(report)]


def _acknowledgements(new_id: Callable[[], str], rng: random.Random, results: list[dict[str, Any]], doctor: dict[str, Any],
                      now: dt.datetime) -> list[dict[str, Any]]:
    """The attending has seen every lab report older than the morning round; the newest wait for them."""
    out = []
    for entry in results:
        report = entry["resource"]
        if report["resourceType"] != "DiagnosticReport":
            continue
        issued = dt.datetime.fromisoformat(report["issued"])
        seen = issued + dt.timedelta(minutes=rng.randint(30, 300))
        if seen < now - dt.timedelta(hours=18):
            out.append(_entry(acknowledgement_task(report, _who(doctor), seen, new_id())))
    return out


def _on_call_rota(new_id: Callable[[], str], ward: dict[str, Any], doctor_roles: list[dict[str, Any]], service_name: str,
                  service_snomed: str, now: dt.datetime) -> list[dict[str, Any]]:
    """Two weeks of night duty (garde, on site, 18:30–08:30) and call from home (astreinte, 08:30–18:30 on weekends).

    One Schedule per shift, its planningHorizon the shift: "who is on call in cardiology now" is
    `Schedule?specialty=…&date=ge{now}&date=le{now}`.
    """
    out = []
    paris = HOSPITAL_TZ
    first = now.astimezone(paris).replace(hour=0, minute=0, second=0) - dt.timedelta(days=1)
    for day in range(15):
        date = first + dt.timedelta(days=day)
        shifts = [("garde", date.replace(hour=18, minute=30), date.replace(hour=8, minute=30) + dt.timedelta(days=1))]
        if date.weekday() >= 5:
            shifts.append(("astreinte", date.replace(hour=8, minute=30), date.replace(hour=18, minute=30)))
        for n, (kind, start, end) in enumerate(shifts):
            role = doctor_roles[(day + n) % len(doctor_roles)]
            out.append({
                "resourceType": "Schedule", "id": new_id(), "active": True,
                "serviceType": [{"coding": [{"system": ON_CALL_SYSTEM, "code": kind}],
                                 "text": "Garde sur place" if kind == "garde" else "Astreinte à domicile"}],
                "specialty": [{"coding": [{"system": SNOMED, "code": service_snomed}], "text": service_name}],
                "actor": [_ref(role), role["practitioner"], _ref(ward)],
                "planningHorizon": {"start": _iso(start), "end": _iso(end)},
                "comment": f"{'Garde' if kind == 'garde' else 'Astreinte'} {service_name}",
            })
    return out


def _administrations(new_id: Callable[[], str], rng: random.Random, patient: dict[str, Any], encounter: dict[str, Any],
                     nurse: dict[str, Any], prescriptions: list[tuple[dict[str, Any], Drug]], admitted: dt.datetime,
                     now: dt.datetime) -> list[dict[str, Any]]:
    """The last 36 hours of the administration record: given (a few not given, with the reason)."""
    out = []
    paris = HOSPITAL_TZ
    since = max(admitted, now - dt.timedelta(hours=36))
    for request, drug in prescriptions:
        day = since.astimezone(paris).replace(hour=0, minute=0, second=0)
        while day < now:
            for hhmm in drug.times:
                hour, minute = (int(x) for x in hhmm.split(":"))
                due = day.replace(hour=hour, minute=minute)
                if not since <= due < now:
                    continue
                given = rng.random() > 0.04
                admin: dict[str, Any] = {
                    "resourceType": "MedicationAdministration", "id": new_id(),
                    "status": "completed" if given else "not-done",
                    "medicationCodeableConcept": request["medicationCodeableConcept"],
                    "subject": _ref(patient), "context": _ref(encounter), "request": _ref(request),
                    "effectiveDateTime": _iso(due + dt.timedelta(minutes=rng.randint(-10, 25))),
                    "performer": [{"actor": _who(nurse)}],
                    "dosage": {"text": drug.dose, "route": {"text": drug.route}},
                }
                if not given:
                    admin["statusReason"] = [{"text": rng.choice(("Patient au bloc", "Refus du patient", "Patient à jeun"))}]
                out.append(_entry(admin))
            day += dt.timedelta(days=1)
    return out


def _imaging_and_notes(new_id: Callable[[], str], rng: random.Random, patient: dict[str, Any], encounter: dict[str, Any],
                       doctor: dict[str, Any], admitted: dt.datetime, now: dt.datetime) -> list[dict[str, Any]]:
    out = []
    if rng.random() < 0.35:
        modality, code, title, conclusion = rng.choice(IMAGING)
        when = admitted + (now - admitted) * rng.random()
        uid = f"1.2.250.1.999.2.{rng.randrange(10**8)}.{rng.randrange(10**6)}"
        study = {"resourceType": "ImagingStudy", "id": new_id(), "status": "available", "subject": _ref(patient),
                 "encounter": _ref(encounter), "started": _iso(when),
                 "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
                 "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality}],
                 "description": title, "numberOfSeries": 1, "numberOfInstances": rng.randint(40, 400)}
        out.append(_entry(study))
        out.append(_entry({
            "resourceType": "DiagnosticReport", "id": new_id(), "status": "final",
            "category": [{"coding": [{"system": REPORT_SECTION, "code": "RAD"}]}],
            "code": {"coding": [{"system": LOINC, "code": code}], "text": title},
            "subject": _ref(patient), "encounter": _ref(encounter), "effectiveDateTime": _iso(when),
            "issued": _iso(min(now, when + dt.timedelta(hours=3))), "imagingStudy": [_ref(study)], "conclusion": conclusion,
        }))
    for title, text in rng.sample(NOTES, k=rng.randint(1, 2)):
        when = admitted + (now - admitted) * rng.random()
        out.append(_entry({
            "resourceType": "DocumentReference", "id": new_id(), "status": "current",
            "type": {"coding": [{"system": LOINC, "code": "11506-3"}], "text": title},
            "category": [{"coding": [{"system": DOCUMENT_CATEGORY, "code": "clinical-note"}], "text": "Note clinique"}],
            "subject": _ref(patient), "date": _iso(when), "author": [_who(doctor)],
            "context": {"encounter": [_ref(encounter)]},
            "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "language": "fr", "title": title,
                                        "data": base64.b64encode(text.encode()).decode()}}],
        }))
    return out


def _procedures_binder(new_id: Callable[[], str], hospital: dict[str, Any], now: dt.datetime) -> list[dict[str, Any]]:
    """The hospital's procedures binder, downtime procedures first."""
    return [{
        "resourceType": "DocumentReference", "id": new_id(), "status": "current",
        "type": {"text": title},
        "category": [{"coding": [{"system": DOCUMENT_CATEGORY, "code": category}], "text": "Classeur de procédures"}],
        "description": title, "date": _iso(now - dt.timedelta(days=30)), "custodian": _ref(hospital),
        "content": [{"attachment": {"contentType": "text/markdown; charset=utf-8", "language": "fr", "title": title,
                                    "data": base64.b64encode(text.encode()).decode()}}],
    } for category, title, text in DOWNTIME_PROCEDURES]


DEMO_PASSWORD = "rebond-demo"


def demo_accounts(accounts: Accounts, report: SeedReport) -> list[Account]:
    """The demo's sign-ins, all with password `rebond-demo`: a nurse and a doctor of the first ward, a lab technician and a
    pharmacist of the first hospital (its lab's and pharmacy's boxes are theirs), IT, the crisis cell."""
    doctor_id, doctor_name = report.staff.get("doctor", (None, "Dr Démo"))
    nurse_id, nurse_name = report.staff.get("nurse", (None, "Infirmière Démo"))
    return [
        accounts.save("nurse", DEMO_PASSWORD, "nurse", nurse_name, nurse_id),
        accounts.save("doctor", DEMO_PASSWORD, "physician", doctor_name, doctor_id),
        accounts.save("lab", DEMO_PASSWORD, "lab", "Laboratoire (démo)", service="H1-LAB"),
        accounts.save("pharma", DEMO_PASSWORD, "pharmacist", "Pharmacie (démo)", service="H1-PHARMA"),
        accounts.save("admin", DEMO_PASSWORD, "admin", "Informatique (démo)"),
        accounts.save("crisis", DEMO_PASSWORD, "crisis", "Cellule de crise (démo)"),
    ]


def add_result_history(store: Store, patient_id: str, *, days: int = 365, seed: int = 1, now: dt.datetime | None = None) -> int:
    """A year (or `days`) of morning lab panels for one patient, as a long-stay or chronic patient has; returns resources written."""
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    rng = random.Random(seed)
    new_id = _Ids(random.Random(seed * 31 + 7))
    patient = {"resourceType": "Patient", "id": patient_id}
    biologist = store.search(parse_search("Practitioner", [("_count", "1")])).matches
    if not biologist or not biologist[0].body:
        raise ValueError("the store holds no Practitioner to sign the results")
    performer = orjson.loads(biologist[0].body)
    written = 0
    for day in range(days, 0, -1):  # earlier visits: results outside the current stay
        when = (now - dt.timedelta(days=day)).replace(hour=6, minute=0, second=0)
        entries = _lab_panel(new_id, rng, patient, None, performer, when, LABS)
        process_transaction(store, {"resourceType": "Bundle", "type": "transaction", "entry": entries}, "urn:rebond:seed")
        written += len(entries)
    return written
