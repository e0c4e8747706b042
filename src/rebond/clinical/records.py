"""Reading FHIR resources for the clinical views: searches through the store, and the small readers of FHIR shapes."""
from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from rebond.clinical.conventions import GROUP_IPP_SYSTEM, HOSPITAL_TZ
from rebond.fhir import operations
from rebond.fhir.search import parse_search
from rebond.store.base import Session, Store, Stored

Resource = dict[str, Any]
#: the most resources one clinical search returns (a year of daily labs for one patient is ~3,000)
SEARCH_LIMIT = 20_000


def find(store: Store, resource_type: str, *params: tuple[str, str], limit: int = SEARCH_LIMIT) -> list[Resource]:
    return find_with_included(store, resource_type, *params, limit=limit)[0]


def find_with_included(store: Store, resource_type: str, *params: tuple[str, str],
                       limit: int = SEARCH_LIMIT) -> tuple[list[Resource], list[Resource]]:
    """Search through the same parser and index as the FHIR API; every match (up to `limit`), not one page."""
    query = parse_search(resource_type, list(params))
    query.count = limit
    result = store.search(query)
    return [orjson.loads(s.body) for s in result.matches if s.body], [orjson.loads(s.body) for s in result.included if s.body]


def find_stored(store: Store, resource_type: str, *params: tuple[str, str], limit: int = SEARCH_LIMIT) -> list[Stored]:
    """The matching versions as stored (ids, versions, JSON bodies), for callers that cache what they parse."""
    query = parse_search(resource_type, list(params))
    query.count = limit
    return store.search(query).matches


@dataclass(frozen=True)
class Entry:
    """One filling of a form, named when the form is shown (its hidden field `entry`): the ids of what it records
    derive from it. Sent twice — a double click, a retry after an answer lost in a failover — it records nothing
    the second time, and the second sending is told what the first recorded."""

    key: uuid.UUID

    @classmethod
    def of(cls, sent: str | None) -> Entry:
        """The form's entry; a form without one (a page from before it had one) gets a new one: it is recorded once."""
        try:
            return cls(uuid.UUID(sent or ""))
        except ValueError:
            return cls.new()

    @classmethod
    def new(cls) -> Entry:
        return cls(uuid.uuid4())

    def __str__(self) -> str:
        return str(self.key)

    def id(self, what: str = "") -> str:
        """The id of one thing this entry records ("" for the only one, a field's name for one of several)."""
        return str(uuid.uuid5(self.key, what)) if what else str(self.key)

    def recorded(self, tx: Session, resource_type: str, *whats: str) -> list[str]:
        """The ids among `whats` (default: the only one) already recorded by this entry, read in the transaction."""
        keys = [(resource_type, self.id(what)) for what in (whats or ("",))]
        tx.read_ahead(keys)
        return [rid for _type, rid in keys if (stored := tx.read(resource_type, rid)) is not None and not stored.deleted]


def create_once(store: Store, entry: Entry, resource: Resource, what: str = "") -> str:
    """Create `resource`, whose id is `entry.id(what)`, unless this entry recorded it already (a form sent twice);
    returns its id."""
    rtype = resource["resourceType"]

    def save(tx: Session) -> str:
        if entry.recorded(tx, rtype, what):
            return entry.id(what)
        return operations.create(tx, rtype, resource, resource_id=resource["id"]).stored.id  # type: ignore[union-attr]

    return store.write(save)


def read(store: Store, resource_type: str, resource_id: str) -> Resource | None:
    stored = store.read(resource_type, resource_id)
    return orjson.loads(stored.body) if stored is not None and stored.body else None


def any_of(references: Iterable[str]) -> str:
    """An OR'ed search value (references and codes hold no commas)."""
    return ",".join(references)


def ref(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def ref_id(reference: Any, resource_type: str | None = None) -> str | None:
    """The id in {"reference": "Type/id"} (optionally only of that type)."""
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    kind, _, rid = reference["reference"].rpartition("/")
    if resource_type is not None and kind.rpartition("/")[2] != resource_type:
        return None
    return rid or None


def instant(value: Any) -> dt.datetime | None:
    """A FHIR dateTime/instant as an aware datetime (dates count from midnight in the hospital's time zone)."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) <= 10:
            parts = [int(p) for p in value.split("-")] + [1, 1]
            return dt.datetime(parts[0], parts[1], parts[2], tzinfo=HOSPITAL_TZ)
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=HOSPITAL_TZ)


@functools.lru_cache(maxsize=256)
def fhir_instant(moment: dt.datetime) -> str:
    """A moment as FHIR writes an instant, in UTC to the second. The last ones are kept: a lab panel writes the same
    moment a dozen times (2.8 µs each, 0.15 from the cache), and equal moments, in whatever zone, give the same text."""
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def concept_text(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or ():
        if coding.get("display"):
            return str(coding["display"])
    codings = concept.get("coding") or [{}]
    return str(codings[0].get("code", ""))


def has_code(concept: Any, code: str, system: str | None = None) -> bool:
    if not isinstance(concept, dict):
        return False
    return any(c.get("code") == code and (system is None or c.get("system") == system) for c in concept.get("coding") or ())


def first_code(concept: Any) -> str | None:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return str(codings[0]["code"]) if codings and codings[0].get("code") else None


def person_name(resource: Resource | None) -> str:
    """'DUPONT Marie', or 'Dr Marie DUPONT' for a practitioner with a prefix, as French wards write them."""
    if not resource:
        return ""
    names = resource.get("name") or []
    name = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    family = str(name.get("family", "")).upper()
    given = " ".join(name.get("given") or [])
    if name.get("prefix"):
        return " ".join([*name["prefix"], given, family]).strip()
    return f"{family} {given}".strip() or str(name.get("text", ""))


@dataclass(frozen=True)
class PatientSummary:
    """What identifies a patient on every page: the banner, a census line, a search hit."""

    id: str
    name: str
    gender: str
    birth_date: dt.date | None
    ipp: str | None

    def age(self, today: dt.date) -> int | None:
        if self.birth_date is None:
            return None
        return today.year - self.birth_date.year - ((today.month, today.day) < (self.birth_date.month, self.birth_date.day))


def identifier_value(resource: Resource, system: str) -> str | None:
    """The value of a resource's first identifier of `system` (an IPP, a site's or a service's code), or None."""
    return next((str(i["value"]) for i in resource.get("identifier") or ()
                 if isinstance(i, dict) and i.get("system") == system and i.get("value") is not None), None)


def patient_summary(patient: Resource) -> PatientSummary:
    birth = None
    if isinstance(patient.get("birthDate"), str):
        try:
            birth = dt.date.fromisoformat(patient["birthDate"][:10])
        except ValueError:
            birth = None
    return PatientSummary(patient["id"], person_name(patient), str(patient.get("gender", "unknown")), birth,
                          identifier_value(patient, GROUP_IPP_SYSTEM))


@dataclass(frozen=True)
class Clinician:
    """Who records something: the signed-in user, the Practitioner their account stands for, and the service it works
    for (the code of a lab's or pharmacy's HealthcareService: the lab's bench account)."""

    username: str
    display: str
    practitioner_id: str | None = None
    service: str | None = None

    def reference(self) -> Resource:
        reference: Resource = {"display": self.display}
        if self.practitioner_id:
            reference["reference"] = f"Practitioner/{self.practitioner_id}"
        return reference
