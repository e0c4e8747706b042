"""The clinical views and bedside recording, over the store (both engines where it matters)."""
from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rebond.clinical.admission import NoNumberRange
from rebond.clinical.census import ward_census
from rebond.clinical.chart import patient_chart
from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.clinical.medication import Administration, Prescription, dose_schedule
from rebond.clinical.patients import UnclearSearch, search_terms
from rebond.clinical.recording import InvalidForm, record_vitals
from rebond.clinical.records import Clinician, Entry, fhir_instant, find
from rebond.clinical.results import acknowledge_result, reports
from rebond.fhir import operations
from rebond.seed.demo import DemoSize, seed_demo
from rebond.store.base import NotFound, Store

NOW = dt.datetime(2026, 11, 23, 9, 30, tzinfo=HOSPITAL_TZ)
NURSE = Clinician("nurse", "LEROY Hélène", None)


def _rx(*times: str) -> Prescription:
    return Prescription("rx1", "Furosémide 40 mg", "1 comprimé", "Voie orale", tuple(dt.time.fromisoformat(t) for t in times),
                        NOW - dt.timedelta(days=3), "Dr X")


def _given(at: dt.datetime, given: bool = True) -> Administration:
    return Administration(f"a{at.hour}", "rx1", "Furosémide", at, given, "", "LEROY Hélène", "1 comprimé")


def test_doses_are_given_late_due_or_planned() -> None:
    rx = _rx("06:00", "08:00", "09:45", "20:00")
    doses = dose_schedule([rx], [_given(NOW.replace(hour=6, minute=10)), _given(NOW.replace(hour=8, minute=5), given=False)],
                          NOW.replace(hour=0, minute=0), NOW.replace(hour=23, minute=59), NOW)
    states = {d.due.strftime("%H:%M"): d.state for d in doses}
    assert states == {"06:00": "given", "08:00": "not-given", "09:45": "due", "20:00": "planned"}


def test_an_unrecorded_dose_more_than_an_hour_old_is_late_and_one_record_answers_one_dose() -> None:
    rx = _rx("07:00", "08:00")
    doses = dose_schedule([rx], [_given(NOW.replace(hour=7, minute=30))], NOW.replace(hour=0, minute=0), NOW, NOW)
    assert sorted(d.state for d in doses) == ["given", "late"]


def test_doses_before_the_prescription_do_not_exist() -> None:
    rx = Prescription("rx1", "X", "", "", (dt.time(8),), NOW, "")
    assert dose_schedule([rx], [], NOW - dt.timedelta(days=2), NOW, NOW) == []


def test_what_is_typed_in_the_search_box_becomes_search_parameters() -> None:
    assert search_terms("Dupont 12/03/1950") == [("name", "Dupont"), ("birthdate", "1950-03-12")]
    assert search_terms("123456789") == [("identifier", "urn:oid:1.2.250.1.999.1.1|123456789")]
    assert search_terms("1950-03-12") == [("birthdate", "1950-03-12")]
    assert search_terms("Dupont,Jean") == [("name", "Dupont\\,Jean")], "one word to match, not Dupont or Jean"
    with pytest.raises(UnclearSearch):
        search_terms("31/02/1950")
    with pytest.raises(UnclearSearch):
        search_terms("  ")


@pytest.fixture
def seeded(store: Store) -> Store:
    seed_demo(store, seed=2, size=DemoSize(1, 1, 6), now=NOW)
    return store


def test_census_places_each_inpatient_in_their_bed(seeded: Store) -> None:
    ward = next(w for w in find(seeded, "Location") if w.get("alias"))
    census = ward_census(seeded, ward["id"], NOW)
    assert len(census.beds) == 6
    stays = find(seeded, "Encounter", ("status", "in-progress"))
    assert census.occupied == len(stays)
    for line in census.beds:
        if line.patient is not None:
            assert line.stay is not None and line.stay.bed_id == line.bed_id and line.stay.attending.startswith("Dr ")
    with pytest.raises(NotFound):
        ward_census(seeded, "not-a-ward", NOW)


def test_acknowledging_twice_records_one_task(seeded: Store) -> None:
    pending = [r for r in reports(seeded, ("category", "LAB")) if r.acknowledgement is None]
    assert pending
    first = acknowledge_result(seeded, pending[0].id, NURSE, NOW)
    second = acknowledge_result(seeded, pending[0].id, Clinician("doctor", "Dr Y"), NOW + dt.timedelta(minutes=5))
    assert first == second and first.by == "LEROY Hélène"
    assert len(find(seeded, "Task", ("focus", f"DiagnosticReport/{pending[0].id}"))) == 1


def test_invalid_vitals_write_nothing_and_valid_ones_reach_the_chart(seeded: Store) -> None:
    patient = find(seeded, "Patient")[0]["id"]
    before = len(find(seeded, "Observation", ("subject", f"Patient/{patient}")))
    with pytest.raises(InvalidForm) as refused:
        record_vitals(seeded, patient, {"heart_rate": "80", "systolic": "90", "diastolic": "120"}, NURSE, NOW)
    assert refused.value.problems == {"diastolic": "diastolic-above-systolic"}
    with pytest.raises(InvalidForm):
        record_vitals(seeded, patient, {}, NURSE, NOW)
    assert len(find(seeded, "Observation", ("subject", f"Patient/{patient}"))) == before
    record_vitals(seeded, patient, {"heart_rate": "131", "temperature": "38,2"}, NURSE, NOW + dt.timedelta(minutes=1))
    chart = patient_chart(seeded, patient, NOW + dt.timedelta(minutes=2))
    heart = next(s for s in chart.vitals if s.code == "8867-4")
    assert heart.latest.value == 131 and heart.latest.flag == "H"


def test_node_state_is_kept_apart_from_the_change_feed(store: Store) -> None:
    before = store.changes(None, 1000).next_cursor
    store.put_state("account", "nurse", {"role": "nurse"})
    store.put_state("account", "admin", {"role": "admin"})
    assert store.get_state("account", "nurse") == {"role": "nurse"}
    assert [k for k, _ in store.list_state("account")] == ["admin", "nurse"]
    store.put_state("account", "nurse", None)
    assert store.get_state("account", "nurse") is None
    assert store.changes(before, 10).changes == []


def test_emergency_admissions_take_consecutive_numbers_from_the_sites_range(seeded: Store) -> None:
    from rebond.clinical.admission import RangeExhausted, emergency_admission, set_ipp_range
    from rebond.clinical.records import read

    ward = next(w for w in find(seeded, "Location") if w.get("alias"))["id"]
    form = {"family": "Urgence", "given": "Jean", "birth_date": "12/03/1950", "gender": "male"}
    with pytest.raises(NoNumberRange):
        emergency_admission(seeded, ward, form, NURSE, NOW)
    set_ipp_range(seeded, 910000000, 910000001)
    before = seeded.history()[1]
    with pytest.raises(InvalidForm) as refused:
        emergency_admission(seeded, ward, {**form, "birth_date": "31/02/1950", "family": ""}, NURSE, NOW)
    assert set(refused.value.problems) == {"family", "birth_date"} and seeded.history()[1] == before
    first = read(seeded, "Patient", emergency_admission(seeded, ward, form, NURSE, NOW))
    second = read(seeded, "Patient", emergency_admission(seeded, ward, form, NURSE, NOW))
    assert first and second and [first["identifier"][0]["value"], second["identifier"][0]["value"]] == ["910000000", "910000001"]
    stay = find(seeded, "Encounter", ("subject", f"Patient/{first['id']}"))[0]
    assert stay["class"]["code"] == "EMER" and stay["status"] == "in-progress"
    with pytest.raises(RangeExhausted):
        emergency_admission(seeded, ward, form, NURSE, NOW)


def test_a_form_sent_twice_records_once(seeded: Store) -> None:
    """A double click, or a retry after an answer lost in a failover: one filling of a form (its entry) records once,
    and the second sending gets what the first recorded; the next filling records again."""
    from rebond.clinical.admission import emergency_admission, set_ipp_range, ward_occupancy
    from rebond.clinical.recording import record_administration

    patient = find(seeded, "Patient")[0]["id"]
    def observations() -> int:
        return len(find(seeded, "Observation", ("subject", f"Patient/{patient}")))

    before = observations()
    vitals = {"heart_rate": "88", "spo2": "97", "entry": str(Entry.new())}
    first = record_vitals(seeded, patient, vitals, NURSE, NOW)
    assert len(first) == 2 and observations() == before + 2
    assert sorted(record_vitals(seeded, patient, vitals, NURSE, NOW + dt.timedelta(seconds=20))) == sorted(first)
    assert observations() == before + 2
    record_vitals(seeded, patient, {**vitals, "entry": str(Entry.new())}, NURSE, NOW)
    assert observations() == before + 4
    other = next(p["id"] for p in find(seeded, "Patient") if p["id"] != patient)
    assert not set(record_vitals(seeded, other, vitals, NURSE, NOW)) & set(first), "the entry on another patient's form records anew"

    rx = find(seeded, "MedicationRequest", ("status", "active"))[0]
    def administrations() -> list[str]:
        return [a["id"] for a in find(seeded, "MedicationAdministration", ("request", f"MedicationRequest/{rx['id']}"))]

    before_doses = administrations()
    dose = {"outcome": "given", "time": "09:00", "entry": str(Entry.new())}
    given = record_administration(seeded, rx["id"], dose, NURSE, NOW)
    assert record_administration(seeded, rx["id"], dose, NURSE, NOW) == given
    assert sorted(administrations()) == sorted([*before_doses, given]), "one dose recorded, not two"

    set_ipp_range(seeded, 910000000, 910000009)
    leaving = find(seeded, "Encounter", ("status", "in-progress"))[0]  # a discharge frees a bed
    seeded.write(lambda tx: operations.update(tx, "Encounter", leaving["id"], {**leaving, "status": "finished"}))
    ward, bed = next((w["id"], line.bed_id) for w in find(seeded, "Location") if w.get("alias")
                     for line in ward_occupancy(seeded, w["id"], NOW).beds if line.patient is None and line.bed_id)
    form = {"family": "Urgence", "given": "Jean", "birth_date": "12/03/1950", "gender": "male", "bed": bed,
            "entry": str(Entry.new())}
    admitted = emergency_admission(seeded, ward, form, NURSE, NOW)
    assert emergency_admission(seeded, ward, form, NURSE, NOW) == admitted, "not refused for the bed it took itself"
    assert len(find(seeded, "Patient", ("family", "Urgence"))) == 1
    assert len(find(seeded, "Encounter", ("subject", f"Patient/{admitted}"))) == 1
    again = emergency_admission(seeded, ward, {**form, "bed": "", "entry": str(Entry.new())}, NURSE, NOW)
    assert again != admitted and len(find(seeded, "Patient", ("family", "Urgence"))) == 2


def test_a_note_is_on_the_chart_first_signed_and_written_once(seeded: Store) -> None:
    from rebond.clinical.recording import record_note

    patient = find(seeded, "Patient")[0]["id"]
    stay = find(seeded, "Encounter", ("subject", f"Patient/{patient}"))[0]["id"]
    form = {"kind": "nursing", "text": "Patient algique à 6/10.\r\nAntalgique donné, réévaluation à 14 h.", "entry": str(Entry.new())}
    written = record_note(seeded, patient, form, NURSE, NOW + dt.timedelta(minutes=5), stay)
    assert record_note(seeded, patient, form, NURSE, NOW + dt.timedelta(minutes=6), stay) == written, "sent twice, recorded once"
    document = find(seeded, "DocumentReference", ("_id", written))[0]
    assert document["type"]["coding"][0]["code"] == "34746-8" and document["context"]["encounter"][0]["reference"] == f"Encounter/{stay}"
    newest = patient_chart(seeded, patient, NOW + dt.timedelta(minutes=10)).notes[0]
    assert (newest.title, newest.author) == ("Transmissions infirmières", "LEROY Hélène")
    assert newest.text == "Patient algique à 6/10.\nAntalgique donné, réévaluation à 14 h."

    for refused, problems in (({"kind": "gossip", "text": "x"}, {"kind": "choose-one"}),
                              ({"kind": "progress", "text": "  "}, {"text": "required"}),
                              ({"kind": "progress", "text": "x" * 5001}, {"text": "too-long:5000"})):
        with pytest.raises(InvalidForm) as err:
            record_note(seeded, patient, refused, NURSE, NOW)
        assert err.value.problems == problems
    with pytest.raises(NotFound):
        record_note(seeded, "nobody", form, NURSE, NOW)
    assert len(find(seeded, "DocumentReference", ("subject", f"Patient/{patient}"), ("date", f"ge{NOW.isoformat()}"))) == 1


@given(st.datetimes(min_value=dt.datetime(1900, 1, 2), max_value=dt.datetime(2199, 12, 30), timezones=st.just(HOSPITAL_TZ)))
def test_an_instant_is_written_in_utc_whatever_zone_it_came_in(moment: dt.datetime) -> None:
    """`fhir_instant` keeps its last answers; the same moment written in another zone is the same text."""
    in_utc = moment.astimezone(dt.UTC)
    expected = in_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert fhir_instant(moment) == expected
    assert fhir_instant(in_utc) == expected
    assert fhir_instant(moment.astimezone(dt.timezone(dt.timedelta(hours=-5)))) == expected
