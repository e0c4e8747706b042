"""Finding a patient by what a clinician has at hand: a name, an IPP, a birth date — or several of them."""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from rebond.clinical.census import Stay, stay
from rebond.clinical.conventions import GROUP_IPP_SYSTEM, LOCATION_TYPE
from rebond.clinical.records import PatientSummary, any_of, find, find_with_included, has_code, patient_summary
from rebond.fhir.search import literal
from rebond.store.base import Store

MAX_HITS = 50
_DATE = re.compile(r"^(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})$|^(\d{4})-(\d{2})-(\d{2})$")


@dataclass
class PatientHit:
    patient: PatientSummary
    stay: Stay | None
    place: str  # bed, or ward, of the current stay


class UnclearSearch(ValueError):
    """The words typed could not be turned into a search (an impossible date, nothing to search on)."""


def parse_day(word: str) -> dt.date:
    """A day as French wards write it (dd/mm/yyyy) or as ISO (yyyy-mm-dd); ValueError for anything else."""
    match = _DATE.match(word.strip())
    if not match:
        raise ValueError(f"not a date: {word!r}")
    day, month, year = (match[1], match[2], match[3]) if match[1] else (match[6], match[5], match[4])
    return dt.date(int(year), int(month), int(day))


def patient_by_ipp_or_id(store: Store, text: str) -> str | None:
    """The Patient id of an IPP (digits) or of an id; None when this node has no such patient."""
    if text.isdigit():
        found = find(store, "Patient", ("identifier", f"{GROUP_IPP_SYSTEM}|{literal(text)}"), limit=1)
        return str(found[0]["id"]) if found else None
    return text if store.read("Patient", text) is not None else None


def search_terms(text: str) -> list[tuple[str, str]]:
    """FHIR search parameters for what was typed: digits are an IPP, a date is a birth date, words are names."""
    params: list[tuple[str, str]] = []
    for word in text.split():
        if _DATE.match(word):
            try:
                born = parse_day(word)
            except ValueError:
                raise UnclearSearch(word) from None
            params.append(("birthdate", born.isoformat()))
        elif word.isdigit():
            params.append(("identifier", f"{GROUP_IPP_SYSTEM}|{literal(word)}"))
        elif len(word.strip(",;")) >= 2:
            params.append(("name", literal(word.strip(",;"))))  # « Dupont,Jean » is one word to match, not "or"
    if not params:
        raise UnclearSearch(text)
    return params


def find_patients(store: Store, text: str) -> list[PatientHit]:
    """Active patients matching every word typed, with where they lie now; at most MAX_HITS."""
    found = find(store, "Patient", *search_terms(text), ("active:not", "false"), ("_sort", "family,given"))[:MAX_HITS]
    if not found:
        return []
    encounters, locations = find_with_included(store, "Encounter", ("subject", any_of(f"Patient/{p['id']}" for p in found)),
                                               ("status", "in-progress"), ("_include", "Encounter:location"))
    places = {r["id"]: r for r in locations if r["resourceType"] == "Location"}
    beds = {i for i, loc in places.items() if has_code(loc.get("physicalType"), "bd", LOCATION_TYPE)}
    stays = {s.patient_id: s for s in (stay(e, {}, beds) for e in encounters)}
    hits = []
    for patient in found:
        current = stays.get(patient["id"])
        where = places.get((current.bed_id or current.ward_id or "") if current else "")
        hits.append(PatientHit(patient_summary(patient), current, str(where.get("name", "")) if where else ""))
    return hits
