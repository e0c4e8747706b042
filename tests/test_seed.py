"""`rebond seed --demo`: a deterministic hospital group, through the store's normal write path."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson

from rebond.clinical.conventions import GROUP_IPP_SYSTEM
from rebond.fhir.search import parse_search
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store import open_store
from rebond.store.base import Store

NOW = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC)
SMALL = DemoSize(hospitals=2, wards_per_hospital=2, beds_per_ward=6)


def search(store: Store, rtype: str, *params: tuple[str, str]) -> list[dict[str, object]]:
    query = parse_search(rtype, [*params, ("_count", "1000")])
    return [orjson.loads(s.body or b"{}") for s in store.search(query).matches]


def test_the_group_has_hospitals_wards_rooms_and_beds(store: Store) -> None:
    report = seed_demo(store, seed=3, size=SMALL, now=NOW)
    assert report.wards == 4 and report.beds == 24
    assert len(search(store, "Organization")) == 3  # the group and two hospitals
    wards = [loc for loc in search(store, "Location") if loc["physicalType"]["coding"][0]["code"] == "wa"]  # type: ignore[index]
    beds = [loc for loc in search(store, "Location") if loc["physicalType"]["coding"][0]["code"] == "bd"]  # type: ignore[index]
    assert len(wards) == 4 and len(beds) == 24
    stays = search(store, "Encounter", ("status", "in-progress"))
    assert len(stays) == report.patients and 0 < report.patients <= 24
    ward_id = wards[0]["id"]
    in_ward = search(store, "Encounter", ("location", f"Location/{ward_id}"), ("status", "in-progress"))
    assert all(any(loc["location"]["reference"] == f"Location/{ward_id}" for loc in e["location"]) for e in in_ward)  # type: ignore[index,union-attr]


def test_patients_carry_an_ipp_and_a_clinical_record(store: Store) -> None:
    seed_demo(store, seed=3, size=SMALL, now=NOW)
    patients = search(store, "Patient", ("identifier", f"{GROUP_IPP_SYSTEM}|"))
    assert patients and all(p["identifier"][0]["system"] == GROUP_IPP_SYSTEM for p in patients)  # type: ignore[index]
    high_potassium = search(store, "Observation", ("code", "http://loinc.org|2823-3"), ("value-quantity", "gt5"))
    assert high_potassium, "the demo has abnormal potassium results to show"
    assert all(o["interpretation"][0]["coding"][0]["code"] == "H" for o in high_potassium)  # type: ignore[index]
    assert search(store, "MedicationRequest", ("status", "active"))
    assert search(store, "DiagnosticReport", ("code", "24323-8"))
    assert search(store, "PractitionerRole", ("role", "doctor"))


def test_the_same_seed_gives_the_same_group(tmp_path: Path) -> None:
    contents = []
    for run in range(2):
        store = open_store(f"sqlite:///{tmp_path}/{run}.db")
        seed_demo(store, seed=11, size=DemoSize(1, 1, 4), now=NOW)
        contents.append(sorted((c.stored.resource_type, c.stored.id) for c in store.changes(None, 1000).changes))
        store.close()
    assert contents[0] == contents[1] and contents[0]


def test_the_hour_it_runs_does_not_change_who_lies_where(tmp_path: Path) -> None:
    census = []
    for run, now in enumerate((NOW, NOW + dt.timedelta(hours=5, minutes=17))):
        store = open_store(f"sqlite:///{tmp_path}/h{run}.db")
        seed_demo(store, seed=5, size=DemoSize(1, 1, 8), now=now)
        census.append(sorted((p["id"], p["identifier"][0]["value"]) for p in search(store, "Patient")))  # type: ignore[index]
        store.close()
    assert census[0] == census[1] and census[0]


def test_rota_administrations_imaging_notes_and_procedures(store: Store) -> None:
    seed_demo(store, seed=3, size=SMALL, now=NOW)
    at = NOW.isoformat().replace("+00:00", "Z")
    on_call = search(store, "Schedule", ("specialty", "394579002"), ("date", f"ge{at}"), ("date", f"le{at}"))
    assert on_call, "someone is on call in cardiology now"
    assert all(s["planningHorizon"]["start"] <= at <= s["planningHorizon"]["end"] for s in on_call)  # type: ignore[index,operator]
    given = search(store, "MedicationAdministration", ("status", "completed"))
    assert given and all(a["request"]["reference"].startswith("MedicationRequest/") for a in given)  # type: ignore[index,union-attr]
    reports = search(store, "DiagnosticReport", ("category", "RAD"))
    studies = search(store, "ImagingStudy")
    assert reports and len(reports) == len(studies)
    assert all(r["conclusion"] and r["imagingStudy"] for r in reports)
    assert search(store, "DocumentReference", ("category", "clinical-note"))
    binder = search(store, "DocumentReference", ("category", "downtime-procedure"))
    assert len(binder) == 2 * 2  # two downtime procedures per hospital


def test_no_result_is_dated_after_the_moment_the_seed_runs(store: Store) -> None:
    for now in (dt.datetime(2026, 11, 23, 5, 10, tzinfo=dt.UTC), dt.datetime(2026, 11, 23, 6, 10, tzinfo=dt.UTC)):
        # 06:10 in Paris the morning panel is not out yet; at 07:10 it is, dated 06:50
        seed_demo(store, seed=3, size=DemoSize(1, 1, 4), now=now)
        limit = now.isoformat().replace("+00:00", "Z")
        for observation in search(store, "Observation"):
            assert str(observation["effectiveDateTime"]) <= limit and str(observation["issued"]) <= limit
