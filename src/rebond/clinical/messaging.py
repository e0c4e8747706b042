"""Internal messaging: what the wards, the lab, the pharmacy and the physicians write to one another.

When the phones go down with the rest of the IT, a ward still has to tell the lab that a sample
is on its way, and the lab to tell a ward that a potassium is at 6.8. Messages are kept in the
store like any record, so a hospital's site node takes them, shows them and answers them while
it is cut off from the central site. A message is a FHIR Communication:

    Communication.category      urn:rebond:communication-category|message (a reply too), or
                                |message-taken: « Je m'en occupe », someone has it in hand;
                                beside |message, |critical-result: the lab's call for a critical result
    Communication.priority      routine or urgent
    Communication.sender        the Practitioner the account stands for; or a service the author writes for
                                (an account that stands for no one, the lab's, always writes for a service)
    Communication.recipient     a service (HealthcareService: a ward's team, a hospital's lab or pharmacy)
                                or a person (Practitioner); a reply: everyone of the conversation but its author
    Communication.subject       the patient it is about, if any
    Communication.inResponseTo  a reply's or a « Je m'en occupe »'s first message
    Communication.about         the lab's call for a critical result: the DiagnosticReport (hl7/critical.py)
    Communication.payload       the text
    Communication.sent          when it was written

Nothing is ever changed once written — there is no "read" flag to update — so a site node cut off
from the central site takes messages, replies and « Je m'en occupe » like any other write and
replays them later with nothing to reconcile. A message waits (« à traiter ») until someone other
than its author answers it or takes it in hand.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rebond.clinical.conventions import COMMUNICATION_CATEGORY, LOCATION_SYSTEM, SERVICE_SYSTEM
from rebond.clinical.recording import InvalidForm, typed_text
from rebond.clinical.records import (
    Clinician,
    Entry,
    Resource,
    any_of,
    create_once,
    fhir_instant,
    find,
    find_stored,
    identifier_value,
    instant,
    patient_summary,
    person_name,
    read,
    ref_id,
)
from rebond.clinical.wards import group_wards
from rebond.fhir import operations
from rebond.fhir.search import literal
from rebond.store.base import NotFound, Store

MESSAGE = "message"
TAKEN = "message-taken"
CRITICAL_RESULT = "critical-result"  # a message's second category: the lab's call for a critical result (hl7/critical.py)
CATEGORIES = f"{COMMUNICATION_CATEGORY}|{MESSAGE},{COMMUNICATION_CATEGORY}|{TAKEN}"
#: the longest message (read on a ward PC, between two rounds)
MAX_TEXT = 2000
#: how much earlier than its first message an answer may be stamped (another node's clock)
ANSWER_SKEW = dt.timedelta(minutes=5)
#: how far back a box lists its conversations (a conversation answered since is listed whatever its age)
SHOWN_DAYS = 7
_KINDS = ("HealthcareService", "Practitioner")
#: the services of each hospital that the wards write to, besides one another
HOSPITAL_SERVICES = (("LAB", "Laboratoire de biologie médicale"), ("PHARMA", "Pharmacie"))


@dataclass(frozen=True)
class Box:
    """Where messages arrive: a service (a ward's team, a lab, a pharmacy) or a person."""

    reference: str  # "HealthcareService/…" or "Practitioner/…"
    name: str
    hospital: str = ""  # a service's hospital
    code: str = ""  # a service's code (H1-CARD)

    @property
    def is_service(self) -> bool:
        return self.reference.startswith("HealthcareService/")


@dataclass(frozen=True)
class Message:
    id: str
    sent: dt.datetime
    author: str
    author_ref: str | None
    to: tuple[tuple[str | None, str], ...]  # (reference, name) of each recipient
    text: str
    urgent: bool
    taken: bool  # a « Je m'en occupe »: no text of its own
    patient_id: str | None
    patient: str  # as written when sent: name and IPP
    answers: str | None  # the first message of its conversation, for a reply or a « Je m'en occupe »
    critical_report: str | None = None  # the lab's call for a critical result: the DiagnosticReport's id


@dataclass
class Conversation:
    first: Message
    after: list[Message] = field(default_factory=list)  # replies and « Je m'en occupe », in order

    @property
    def taken_by(self) -> Message | None:
        """The first answer by someone other than the author: from then on, someone has it in hand."""
        return next((m for m in self.after if m.author_ref != self.first.author_ref), None)

    @property
    def waiting(self) -> bool:
        return self.taken_by is None

    def waits_for(self, box_ref: str) -> bool:
        """Waiting in this box: no one has seen to it, and the box did not write it."""
        return self.waiting and self.first.author_ref != box_ref

    @property
    def last(self) -> dt.datetime:
        return max([self.first.sent, *(m.sent for m in self.after)])


def _box(resource: Resource, hospitals: Mapping[str, str]) -> Box:
    if resource["resourceType"] == "Practitioner":
        return Box(f"Practitioner/{resource['id']}", person_name(resource))
    hospital = ref_id(resource.get("providedBy"), "Organization") or ""
    return Box(f"HealthcareService/{resource['id']}", str(resource.get("name", "")), hospitals.get(hospital, ""),
               identifier_value(resource, SERVICE_SYSTEM) or "")


def hospitals(store: Store) -> dict[str, str]:
    """Every hospital's name, by id: for listing many services."""
    return {str(o["id"]): str(o.get("name", "")) for o in find(store, "Organization", ("partof:missing", "false"))}


def _its_hospital(store: Store, service: Resource) -> dict[str, str]:
    """The name of one service's hospital, by id: one read, not every hospital's."""
    hospital_id = ref_id(service.get("providedBy"), "Organization")
    hospital = read(store, "Organization", hospital_id) if hospital_id else None
    return {hospital_id: str(hospital.get("name", ""))} if hospital_id and hospital else {}


def services(store: Store) -> list[Box]:
    """Every active service messages may be sent to, by hospital, then name."""
    names = hospitals(store)
    found = [_box(s, names) for s in find(store, "HealthcareService", ("active", "true"))]
    return sorted(found, key=lambda b: (b.hospital, b.name))


def box(store: Store, reference: str) -> Box | None:
    """The box a reference names (an active service or practitioner), None if it names none."""
    kind, _, rid = reference.partition("/")
    if kind not in _KINDS or not rid:
        return None
    resource = read(store, kind, rid)
    if resource is None or resource.get("active") is False:
        return None
    return _box(resource, _its_hospital(store, resource) if kind == "HealthcareService" else {})


def service_of(store: Store, code: str) -> Resource | None:
    """The active service with this code (`H1-LAB`), if there is one."""
    found = find(store, "HealthcareService", ("identifier", f"{SERVICE_SYSTEM}|{literal(code)}"), ("active", "true"), limit=1)
    return found[0] if found else None


def service_box(store: Store, code: str) -> Box | None:
    """The box of the active service with this code (`H1-LAB`), if there is one."""
    found = service_of(store, code)
    return _box(found, _its_hospital(store, found)) if found is not None else None


def own_boxes(store: Store, clinician: Clinician) -> list[Box]:
    """A person's boxes: the service their account works for (the lab's bench account: the lab's), their own (if their
    account stands for a Practitioner), then the services of the wards they work on (their active PractitionerRoles'
    locations)."""
    works_for = service_box(store, clinician.service) if clinician.service else None
    if not clinician.practitioner_id:
        return [works_for] if works_for is not None else []
    mine = Box(f"Practitioner/{clinician.practitioner_id}", clinician.display)
    if works_for is not None:
        return [works_for, mine]
    roles = find(store, "PractitionerRole", ("practitioner", f"Practitioner/{clinician.practitioner_id}"), ("active", "true"))
    places = [loc["reference"] for r in roles for loc in r.get("location") or () if isinstance(loc.get("reference"), str)]
    if not places:
        return [mine]
    names = hospitals(store)
    wards = [_box(s, names) for s in find(store, "HealthcareService", ("location", any_of(places)), ("active", "true"))]
    return [mine, *sorted(wards, key=lambda b: (b.hospital, b.name))]


def ward_box(store: Store, ward_id: str) -> Box | None:
    """The service of a ward (its team), if it has one."""
    found = find(store, "HealthcareService", ("location", f"Location/{ward_id}"), ("active", "true"), limit=1)
    return _box(found[0], _its_hospital(store, found[0])) if found else None


def missing_services(store: Store) -> list[Resource]:
    """The services messages are sent to that the store lacks: one per ward (at the ward, named as it is), and each
    hospital's lab and pharmacy (at its site). Their ids derive from their place and code: made on two nodes, or twice,
    they are the same resource."""
    have_at: set[str] = set()
    have_codes: set[str] = set()
    for service in find(store, "HealthcareService"):
        have_at |= {str(loc["reference"]) for loc in service.get("location") or () if isinstance(loc.get("reference"), str)}
        have_codes |= {str(i.get("value")) for i in service.get("identifier") or () if i.get("system") == SERVICE_SYSTEM}
    out: list[Resource] = []
    for hospital in group_wards(store, count_inpatients=False):
        for ward, _inpatients in hospital.wards:
            if f"Location/{ward.id}" not in have_at:
                out.append(_service(ward.name, ward.hospital_id, ward.id, ward.code))
        site = read(store, "Location", hospital.site_id) or {}
        site_code = identifier_value(site, LOCATION_SYSTEM)
        for code, label in HOSPITAL_SERVICES if site_code else ():
            if f"{site_code}-{code}" not in have_codes:
                out.append(_service(f"{label} — {hospital.hospital}", ref_id(site.get("managingOrganization"), "Organization"),
                                    hospital.site_id, f"{site_code}-{code}"))
    return out


def is_hospital_service(service: Resource, kind: str) -> bool:
    """Whether a HealthcareService is a hospital's service of this kind (LAB, PHARMA of HOSPITAL_SERVICES): its code is
    the site's and the kind's, `H1-LAB`."""
    return any(i.get("system") == SERVICE_SYSTEM and str(i.get("value", "")).endswith(f"-{kind}") for i in service.get("identifier") or ())


def _service(name: str, hospital_id: str | None, location_id: str, code: str) -> Resource:
    service: Resource = {
        "resourceType": "HealthcareService", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:rebond:service:{location_id}:{code}")),
        "active": True, "name": name, "location": [{"reference": f"Location/{location_id}"}],
        "identifier": [{"system": SERVICE_SYSTEM, "value": code}],
    }
    if hospital_id:
        service["providedBy"] = {"reference": f"Organization/{hospital_id}"}
    return service


def add_services(store: Store) -> int:
    """Make the services the store lacks (`missing_services`), in one transaction; how many were made."""
    missing = missing_services(store)
    if missing:
        store.write(lambda tx: [operations.update(tx, "HealthcareService", s["id"], s) for s in missing])
    return len(missing)


def message(resource: Resource) -> Message:
    sender = resource.get("sender") or {}
    subject = resource.get("subject") or {}
    categories = {c.get("code") for concept in resource.get("category") or () for c in concept.get("coding") or ()
                  if c.get("system") == COMMUNICATION_CATEGORY}
    answers = next((rid for r in resource.get("inResponseTo") or () if (rid := ref_id(r, "Communication"))), None)
    return Message(
        str(resource["id"]), instant(resource.get("sent")) or dt.datetime.min.replace(tzinfo=dt.UTC),
        str(sender.get("display", "")) or "—", sender.get("reference") if isinstance(sender.get("reference"), str) else None,
        tuple((r.get("reference") if isinstance(r.get("reference"), str) else None, str(r.get("display", "")))
              for r in resource.get("recipient") or ()),
        "\n".join(str(p["contentString"]) for p in resource.get("payload") or () if isinstance(p.get("contentString"), str)),
        resource.get("priority") in ("urgent", "asap", "stat"), TAKEN in categories,
        ref_id(subject, "Patient"), str(subject.get("display", "")), answers,
        next((rid for r in resource.get("about") or () if (rid := ref_id(r, "DiagnosticReport"))), None)
        if CRITICAL_RESULT in categories else None,
    )


def _conversations(store: Store, resources: Iterable[Resource]) -> list[Conversation]:
    """The messages grouped by conversation (a reply's first message read if it is older than what was found), the
    latest activity first."""
    found = {m.id: m for m in (message(r) for r in resources)}
    firsts = {i: Conversation(m) for i, m in found.items() if m.answers is None}
    for key in {m.answers for m in found.values() if m.answers is not None and m.answers not in firsts}:
        assert key is not None
        older = read(store, "Communication", key)
        if older is not None:
            firsts[key] = Conversation(message(older))
    for m in sorted(found.values(), key=lambda m: m.sent):
        if m.answers is not None and m.answers in firsts:
            firsts[m.answers].after.append(m)
    return sorted(firsts.values(), key=lambda c: c.last, reverse=True)


def conversations(store: Store, box_ref: str, now: dt.datetime, *, days: int = SHOWN_DAYS) -> list[Conversation]:
    """The conversations of a box over the last days: what was sent to it or by it, and their answers."""
    since = ("sent", f"ge{fhir_instant(now - dt.timedelta(days=days))}")
    category = ("category", CATEGORIES)
    resources = {r["id"]: r for r in find(store, "Communication", ("recipient", box_ref), category, since)}
    resources.update((r["id"], r) for r in find(store, "Communication", ("sender", box_ref), category, since))
    return _conversations(store, resources.values())


def about_patient(store: Store, patient_id: str, now: dt.datetime, *, days: int = SHOWN_DAYS) -> list[Conversation]:
    """The conversations about a patient over the last days, for their chart."""
    return _conversations(store, find(store, "Communication", ("subject", f"Patient/{patient_id}"), ("category", CATEGORIES),
                                      ("sent", f"ge{fhir_instant(now - dt.timedelta(days=days))}")))


def waiting_in(store: Store, box_ref: str, now: dt.datetime) -> list[Conversation]:
    """The conversations sent to a box over the last days that no one has seen to yet."""
    return [c for c in conversations(store, box_ref, now) if c.waits_for(box_ref)]


def last_written(store: Store) -> str | None:
    """The id and version of the Communication written last (a message, a reply, a « Je m'en occupe », a lab's call): while it is
    the same, no box's count has changed but by the passing of days."""
    found = find_stored(store, "Communication", ("_sort", "-_lastUpdated"), limit=1)
    return f"{found[0].id}/{found[0].version}" if found else None


def tally(waits: list[Conversation]) -> tuple[int, int]:
    """(conversations waiting, of which urgent)."""
    return len(waits), sum(1 for c in waits if c.first.urgent)


def waiting(store: Store, box_ref: str, now: dt.datetime) -> tuple[int, int]:
    """(conversations waiting, of which urgent) sent to a box, over the last days."""
    return tally(waiting_in(store, box_ref, now))


def conversation(store: Store, message_id: str) -> Conversation:
    """A conversation whole, from any of its messages."""
    seen: set[str] = set()
    while True:  # up to its first message (Rebond answers a first message; another system may answer an answer)
        first = read(store, "Communication", message_id)
        if first is None or not _is_message(first):
            raise NotFound(f"no message {message_id}")
        start = message(first)
        seen.add(start.id)
        if start.answers is None or start.answers in seen:  # a loop of answers, written through the API: stop there
            break
        message_id = start.answers
    # every answer is sent to the first message's author, or, from its author, to its recipients
    audience = [r for r in (start.author_ref, *(ref for ref, _name in start.to)) if r]
    answers = find(store, "Communication", ("recipient", any_of(audience)), ("category", CATEGORIES),
                   ("sent", f"ge{fhir_instant(start.sent - ANSWER_SKEW)}")) if audience else []
    return Conversation(start, sorted((m for m in map(message, answers) if m.answers == start.id), key=lambda m: m.sent))


def patient_subject(patient: Resource) -> Resource:
    """A message's `subject`: the patient, with their name and IPP as shown when it was sent."""
    shown = patient_summary(patient)
    return {"reference": f"Patient/{shown.id}", "display": f"{shown.name} ({shown.ipp})" if shown.ipp else shown.name}


def _is_message(resource: Resource) -> bool:
    return any(c.get("system") == COMMUNICATION_CATEGORY and c.get("code") in (MESSAGE, TAKEN)
               for concept in resource.get("category") or () for c in concept.get("coding") or ())


def author_of(store: Store, clinician: Clinician, form: Mapping[str, str], problems: dict[str, str]) -> dict[str, str]:
    """Who writes: the account's Practitioner; or, for a service (always, for an account that stands for no one), the
    service, with the person's name. A problem is added to `problems`."""
    speaking_for = (form.get("as") or "").strip()
    if not speaking_for and not clinician.practitioner_id and clinician.service:
        works_for = service_of(store, clinician.service)  # the lab's bench account writes for the lab
        speaking_for = f"HealthcareService/{works_for['id']}" if works_for is not None else ""
    if speaking_for:
        service = box(store, speaking_for)
        if service is not None and service.is_service:
            return {"reference": service.reference, "display": f"{service.name} ({clinician.display})"}
    elif clinician.practitioner_id:
        return clinician.reference()
    problems["as"] = "choose-one"
    return {}


def send(store: Store, form: Mapping[str, str], clinician: Clinician, now: dt.datetime) -> str:
    """Write a new message (fields: to, text, urgent, patient, as, entry); returns its id. Problems as message ids."""
    problems: dict[str, str] = {}
    to = box(store, (form.get("to") or "").strip())
    if to is None:
        problems["to"] = "choose-one"
    text = typed_text(form, problems, MAX_TEXT)
    patient: Resource | None = None
    if form.get("patient"):
        patient = read(store, "Patient", str(form["patient"]))
        if patient is None:
            raise NotFound(f"no Patient/{form['patient']}")
    author = author_of(store, clinician, form, problems)
    if problems:
        raise InvalidForm(problems)
    assert to is not None
    entry = Entry.of(form.get("entry"))
    resource = communication(entry.id(), MESSAGE, author, [{"reference": to.reference, "display": to.name}], text, now,
                              urgent=form.get("urgent") == "1", patient=patient)
    return create_once(store, entry, resource)


def answer(store: Store, message_id: str, form: Mapping[str, str], clinician: Clinician, now: dt.datetime, *,
           taken: bool = False) -> str:
    """Reply to a conversation (or, `taken`, say it is in hand), for everyone in it but the author; returns the id."""
    first = conversation(store, message_id).first
    problems: dict[str, str] = {}
    text = "" if taken else typed_text(form, problems, MAX_TEXT)
    author = author_of(store, clinician, form, problems)
    if problems:
        raise InvalidForm(problems)
    # a service that wrote is answered by its name, not its author's
    author_box = box(store, first.author_ref) if first.author_ref and first.author_ref.startswith("HealthcareService/") else None
    everyone = [(first.author_ref, author_box.name if author_box else first.author), *first.to]
    recipients = [{"reference": ref, "display": name} for ref, name in dict(everyone).items() if ref and ref != author.get("reference")]
    if not recipients and author.get("reference"):
        # no one else is in it (the lab's own call to ring a prescriber, from Rebond): it goes to the box that answers,
        # where its conversation is read
        own = box(store, author["reference"])
        recipients = [{"reference": author["reference"], "display": own.name if own else author["display"]}]
    entry = Entry.of(form.get("entry"))
    # the id names the conversation: an entry sent with another conversation's form records anew
    resource = communication(entry.id(first.id), TAKEN if taken else MESSAGE, author, recipients, text, now,
                              urgent=first.urgent and not taken, answers=first.id,
                              subject={"reference": f"Patient/{first.patient_id}", "display": first.patient} if first.patient_id else None)
    return create_once(store, entry, resource, first.id)


def communication(rid: str, kind: str, author: dict[str, str], recipients: list[dict[str, Any]], text: str, now: dt.datetime, *,
                   urgent: bool, patient: Resource | None = None, subject: dict[str, str] | None = None,
                   answers: str | None = None) -> Resource:
    resource: Resource = {
        "resourceType": "Communication", "id": rid, "status": "completed",
        "category": [{"coding": [{"system": COMMUNICATION_CATEGORY, "code": kind}]}],
        "priority": "urgent" if urgent else "routine", "sent": fhir_instant(now), "sender": author, "recipient": recipients,
    }
    if patient is not None:
        subject = patient_subject(patient)
    if subject is not None:
        resource["subject"] = subject
    if answers is not None:
        resource["inResponseTo"] = [{"reference": f"Communication/{answers}"}]
    if text:
        resource["payload"] = [{"contentString": text}]
    return resource
