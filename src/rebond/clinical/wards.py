"""The wards of the group: each hospital site with its wards, as the Locations the admissions system keeps describe
them (a site, `si`, its wards, `wa`, their rooms and beds, `bd`)."""
from __future__ import annotations

from dataclasses import dataclass

from rebond.clinical.conventions import LOCATION_TYPE
from rebond.clinical.records import Resource, any_of, find, has_code, ref_id
from rebond.store.base import Store


@dataclass(frozen=True)
class Ward:
    id: str
    name: str
    code: str
    hospital: str
    hospital_id: str | None


def is_kind(location: Resource, kind: str) -> bool:
    return has_code(location.get("physicalType"), kind, LOCATION_TYPE)


@dataclass
class HospitalWards:
    hospital: str
    site_id: str
    wards: list[tuple[Ward, int]]  # each ward with its number of inpatients


def group_wards(store: Store, *, count_inpatients: bool = True) -> list[HospitalWards]:
    """Every hospital site with its wards, for choosing a ward; each with its inpatients counted unless told not to
    (a page that only names the wards need not read every stay)."""
    sites = [s for s in find(store, "Location", ("partof:missing", "true")) if is_kind(s, "si")]
    if not sites:
        return []
    wards = [w for w in find(store, "Location", ("partof", any_of(f"Location/{s['id']}" for s in sites))) if is_kind(w, "wa")]
    occupancy: dict[str, int] = {}
    if wards and count_inpatients:
        query = any_of(f"Location/{w['id']}" for w in wards)
        for encounter in find(store, "Encounter", ("location", query), ("status", "in-progress")):
            for loc in encounter.get("location") or ():
                lid = ref_id(loc.get("location"), "Location")
                if lid is not None:
                    occupancy[lid] = occupancy.get(lid, 0) + 1
    out = []
    for site in sorted(sites, key=lambda s: str(s.get("name", ""))):
        mine = [w for w in wards if ref_id(w.get("partOf"), "Location") == site["id"]]
        listed = [(Ward(w["id"], str(w.get("name", "")), str((w.get("alias") or [""])[0]), str(site.get("name", "")),
                        ref_id(w.get("managingOrganization"), "Organization")), occupancy.get(w["id"], 0))
                  for w in sorted(mine, key=lambda w: str(w.get("name", "")))]
        out.append(HospitalWards(str(site.get("name", "")), site["id"], listed))
    return out
