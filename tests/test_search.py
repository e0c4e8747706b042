"""Search as a clinician relies on it: every parameter type, modifiers, prefixes, chains, includes, sorting, paging."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given as for_any
from hypothesis import strategies as st
from starlette.testclient import TestClient

from rebond.fhir.search import parse_search
from rebond.fhir.searchparams import JOINED_COMPOSITES, lookup
from rebond.store.base import Store
from rebond.store.indexing import index_resource
from tests.auth import api_client

LOINC = "http://loinc.org"


def obs(pid: str, code: str, value: float, when: str, unit: str = "mmol/L", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code, "display": {"2823-3": "Potassium", "2951-2": "Sodium"}.get(code, code)}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        **extra,
    }


@pytest.fixture
def ward(store: Store) -> Iterator[tuple[TestClient, dict[str, str]]]:
    ids: dict[str, str] = {}
    org = store.create({"resourceType": "Organization", "name": "Hôpital Lariboisière"}).stored.id
    ids["org"] = org
    people = [
        ("helene", "Lefèvre", ["Hélène"], "1948-02-11", "female", "IPP-1"),
        ("marc", "Lefort", ["Marc", "Antoine"], "1975-07-30", "male", "IPP-2"),
        ("zoe", "Zidane", ["Zoé"], "2001-12-01", "female", "IPP-3"),
    ]
    for key, family, given, birth, gender, ipp in people:
        ids[key] = store.create({
            "resourceType": "Patient", "name": [{"family": family, "given": given}], "birthDate": birth, "gender": gender,
            "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.7", "value": ipp}],
            "managingOrganization": {"reference": f"Organization/{org}"},
        }).stored.id
    ids["k_high"] = store.create(obs(ids["helene"], "2823-3", 6.2, "2026-11-20T08:00:00Z")).stored.id
    ids["k_norm"] = store.create(obs(ids["marc"], "2823-3", 4.1, "2026-11-21T08:00:00Z")).stored.id
    ids["na"] = store.create(obs(ids["helene"], "2951-2", 139, "2026-11-22T08:00:00Z")).stored.id
    ids["enc"] = store.create({
        "resourceType": "Encounter", "status": "in-progress", "class": {"code": "IMP"},
        "subject": {"reference": f"Patient/{ids['helene']}"}, "period": {"start": "2026-11-19T10:00:00Z"},
    }).stored.id
    with api_client(store) as client:
        yield client, ids


def search(client: TestClient, query: str) -> dict[str, Any]:
    resp = client.get(f"/fhir/{query}")
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def ids_of(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


def test_string_is_prefix_case_and_accent_insensitive(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    assert ids_of(search(client, "Patient?name=lef")) == {ids["helene"], ids["marc"]}
    assert ids_of(search(client, "Patient?given=helene")) == {ids["helene"]}
    assert ids_of(search(client, "Patient?family:exact=Lefort")) == {ids["marc"]}
    assert ids_of(search(client, "Patient?family:exact=lefort")) == set()
    assert ids_of(search(client, "Patient?name:contains=dan")) == {ids["zoe"]}


def test_token_with_and_without_system_and_not(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    assert ids_of(search(client, "Observation?code=2823-3")) == {ids["k_high"], ids["k_norm"]}
    assert ids_of(search(client, f"Observation?code={LOINC}|2951-2")) == {ids["na"]}
    assert ids_of(search(client, "Observation?code=other|2951-2")) == set()
    assert ids_of(search(client, "Patient?gender:not=female")) == {ids["marc"]}
    assert ids_of(search(client, "Patient?identifier=urn:oid:1.2.250.1.71.4.2.7|IPP-3")) == {ids["zoe"]}
    assert ids_of(search(client, "Observation?code:text=potass")) == {ids["k_high"], ids["k_norm"]}


def test_or_with_commas_and_with_repetition(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    assert ids_of(search(client, "Patient?gender=male,female")) == {ids["helene"], ids["marc"], ids["zoe"]}
    assert ids_of(search(client, "Patient?birthdate=ge1950&birthdate=lt2000")) == {ids["marc"]}


def test_date_prefixes(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    assert ids_of(search(client, "Patient?birthdate=1948")) == {ids["helene"]}
    assert ids_of(search(client, "Patient?birthdate=1975-07")) == {ids["marc"]}
    assert ids_of(search(client, "Patient?birthdate=gt1975-07-30")) == {ids["zoe"]}
    assert ids_of(search(client, "Patient?birthdate=le1975-07-30")) == {ids["helene"], ids["marc"]}
    assert ids_of(search(client, "Patient?birthdate=ne1975-07-30")) == {ids["helene"], ids["zoe"]}
    assert ids_of(search(client, "Observation?date=ge2026-11-21")) == {ids["k_norm"], ids["na"]}
    assert ids_of(search(client, "Encounter?date=ge2026-11-22")) == {ids["enc"]}  # still open: the stay goes on
    assert ids_of(search(client, "Observation?date=sa2026-11-21")) == {ids["na"]}
    assert ids_of(search(client, "Observation?date=eb2026-11-21")) == {ids["k_high"]}


def test_quantity_and_number_prefixes(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    assert ids_of(search(client, "Observation?value-quantity=gt5")) == {ids["k_high"], ids["na"]}
    assert ids_of(search(client, "Observation?value-quantity=lt5|http://unitsofmeasure.org|mmol/L")) == {ids["k_norm"]}
    assert ids_of(search(client, "Observation?value-quantity=6.2")) == {ids["k_high"]}
    assert ids_of(search(client, "Observation?code-value-quantity=2823-3$6.2")) == {ids["k_high"]}


def test_reference_forms_chaining_and_has(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    helene = ids["helene"]
    assert ids_of(search(client, f"Observation?patient={helene}")) == {ids["k_high"], ids["na"]}
    assert ids_of(search(client, f"Observation?subject=Patient/{helene}")) == {ids["k_high"], ids["na"]}
    assert ids_of(search(client, f"Observation?subject:Patient={helene}")) == {ids["k_high"], ids["na"]}
    assert ids_of(search(client, "Observation?subject:Patient.name=lefort")) == {ids["k_norm"]}
    assert ids_of(search(client, "Observation?patient.birthdate=lt1960&code=2823-3")) == {ids["k_high"]}
    assert ids_of(search(client, "Patient?_has:Observation:patient:code=2951-2")) == {helene}
    assert ids_of(search(client, "Patient?organization.name=hopital")) == {helene, ids["marc"], ids["zoe"]}


def test_missing_id_and_last_updated(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    assert ids_of(search(client, "Patient?deceased:missing=true")) == {ids["helene"], ids["marc"], ids["zoe"]}
    assert ids_of(search(client, f"Patient?_id={ids['zoe']},{ids['marc']}")) == {ids["zoe"], ids["marc"]}
    assert len(ids_of(search(client, "Patient?_lastUpdated=gt2020-01-01"))) == 3
    assert ids_of(search(client, "Patient?_lastUpdated=lt2020-01-01")) == set()


def test_include_revinclude_and_iterate(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    bundle = search(client, "Observation?code=2951-2&_include=Observation:patient")
    assert ids_of(bundle) == {ids["na"]} and ids_of(bundle, "include") == {ids["helene"]}
    bundle = search(client, f"Patient?_id={ids['helene']}&_revinclude=Observation:subject")
    assert ids_of(bundle, "include") == {ids["k_high"], ids["na"]}
    bundle = search(client, "Observation?code=2951-2&_include=Observation:patient&_include:iterate=Patient:organization")
    assert ids_of(bundle, "include") == {ids["helene"], ids["org"]}
    wild = client.get("/fhir/Observation?_include=*&_revinclude=*")
    assert wild.status_code == 200


def test_sort_count_paging_total_and_summary(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    bundle = search(client, "Patient?_sort=-birthdate")
    assert [e["resource"]["id"] for e in bundle["entry"]] == [ids["zoe"], ids["marc"], ids["helene"]]
    bundle = search(client, "Patient?_sort=gender,-birthdate")
    assert [e["resource"]["id"] for e in bundle["entry"]] == [ids["zoe"], ids["helene"], ids["marc"]]
    first = search(client, "Patient?_sort=birthdate&_count=2&_total=accurate")
    assert first["total"] == 3 and len(first["entry"]) == 2
    next_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = client.get(next_url).json()
    assert [e["resource"]["id"] for e in second["entry"]] == [ids["zoe"]]
    assert any(link["relation"] == "previous" for link in second["link"])
    assert "total" not in search(client, "Patient")
    count = search(client, "Patient?_summary=count")
    assert count["total"] == 3 and "entry" not in count
    elements = search(client, "Patient?_elements=birthDate&_id=" + ids["zoe"])
    res = elements["entry"][0]["resource"]
    assert res["birthDate"] == "2001-12-01" and "name" not in res
    assert any(t["code"] == "SUBSETTED" for t in res["meta"]["tag"])


def test_unknown_parameters_are_refused_unless_lenient(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    strict = client.get("/fhir/Patient?nmae=lefort")
    assert strict.status_code == 400 and "nmae" in strict.text
    lenient = client.get("/fhir/Patient?nmae=lefort&gender=male", headers={"Prefer": "handling=lenient"})
    assert lenient.status_code == 200
    bundle = lenient.json()
    assert ids_of(bundle) == {ids["marc"]}
    outcome = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert "nmae" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    assert client.get("/fhir/Patient?gender:above=male").status_code == 400


def test_post_search(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    resp = client.post("/fhir/Patient/_search", content="family=zidane",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200 and ids_of(resp.json()) == {ids["zoe"]}


def test_deleted_resources_leave_search(ward: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = ward
    client.delete(f"/fhir/Patient/{ids['zoe']}")
    assert ids_of(search(client, "Patient?gender=female")) == {ids["helene"]}


def test_uri_exact_below_and_above(store: Store) -> None:
    profile = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
    vital = store.create({"resourceType": "Observation", "status": "final", "code": {"text": "pouls"},
                          "meta": {"profile": [profile]}}).stored.id
    store.create({"resourceType": "Observation", "status": "final", "code": {"text": "note"}})
    with api_client(store) as client:
        assert ids_of(search(client, f"Observation?_profile={profile}")) == {vital}
        assert ids_of(search(client, "Observation?_profile:below=http://hl7.org/fhir/StructureDefinition/")) == {vital}
        assert ids_of(search(client, f"Observation?_profile:above={profile}/extra")) == {vital}
        assert ids_of(search(client, "Observation?_profile=http://hl7.org/fhir/StructureDefinition/other")) == set()


def test_a_search_for_thousands_of_values_is_answered(store: Store) -> None:
    """« The Tasks of these 2,000 prescriptions », « these 1,200 codes »: SQLite refuses an expression 1,000 deep, which a
    flat OR of 500 references reached; references of one type are one IN list, other values OR'ed in halves."""
    from rebond.fhir import operations

    focused = [f"MedicationRequest/rx-{n}" for n in range(2000)]
    store.write(lambda tx: [operations.update(tx, "Task", f"t-{n}", {
        "resourceType": "Task", "id": f"t-{n}", "status": "completed", "intent": "order", "focus": {"reference": ref},
        "code": {"coding": [{"system": "urn:test", "code": f"c{n}"}]}}) for n, ref in enumerate(focused[::10])])
    query = parse_search("Task", [("focus", ",".join(focused))])
    query.count = 1000
    assert len(store.search(query).matches) == 200
    mixed = parse_search("Task", [("focus", ",".join([*focused[:700], "Patient/p-1", "rx-10"]))])  # two types, and an id alone
    mixed.count = 1000
    assert {m.id for m in store.search(mixed).matches} == {f"t-{n}" for n in range(70)} | {"t-1"}
    codes = parse_search("Task", [("code", ",".join(f"urn:test|c{n}" for n in range(100, 1300)))])
    codes.count = 1000
    assert {m.id for m in store.search(codes).matches} == {f"t-{n}" for n in range(100, 200)}


def test_parameters_answered_from_other_parameters_rows(store: Store, ward: tuple[TestClient, dict[str, str]]) -> None:
    """combo-code reads the rows of code and component-code, patient those of subject aimed at a Patient: the same
    resources match as if they had rows of their own."""
    client, ids = ward
    combo = lookup("Observation", "combo-code")
    patient = lookup("Observation", "patient")
    assert combo is not None and combo.keys == ("Observation.code", "Observation.component-code")
    assert patient is not None and patient.keys == ("Observation.subject",) and patient.target_type == "Patient"
    group = store.create({"resourceType": "Group", "type": "person", "actual": True}).stored.id
    pressure = store.create({
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Group/{group}"},
        "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure"}], "text": "Tension artérielle"},
        "component": [
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": 150, "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": 95, "code": "mm[Hg]"}},
        ],
    }).stored.id
    stored = store.read("Observation", pressure)
    assert stored is not None and stored.body is not None
    rows = index_resource(orjson.loads(stored.body))
    assert not [r for r in rows.token + rows.reference if r[0] in ("Observation.combo-code", "Observation.patient")]
    assert ids_of(search(client, "Observation?combo-code=8480-6")) == {pressure}
    assert ids_of(search(client, "Observation?combo-code=2823-3")) == {ids["k_high"], ids["k_norm"]}
    assert ids_of(search(client, "Observation?combo-value-quantity=gt140")) == {pressure}
    assert ids_of(search(client, "Observation?combo-value-quantity=gt7")) == {pressure, ids["na"]}
    assert ids_of(search(client, "Observation?combo-code-value-quantity=8462-4$95")) == {pressure}
    assert ids_of(search(client, "Observation?combo-code-value-quantity=2823-3$6.2")) == {ids["k_high"]}
    assert ids_of(search(client, f"Observation?subject=Group/{group}")) == {pressure}
    assert ids_of(search(client, f"Observation?patient={group}")) == set()  # a Group is not a Patient
    assert pressure in ids_of(search(client, "Observation?patient:missing=true"))
    assert ids["na"] not in ids_of(search(client, "Observation?patient:missing=true"))
    assert ids_of(search(client, "Observation?code:text=tension")) == {pressure}
    assert ids_of(search(client, "Observation?code:text=blood")) == {pressure}
    bundle = search(client, f"Patient?_id={ids['helene']}&_revinclude=Observation:patient")
    assert ids_of(bundle, "include") == {ids["k_high"], ids["na"]}
    bundle = search(client, f"Observation?_id={pressure}&_include=Observation:patient")
    assert ids_of(bundle, "include") == set()
    bundle = search(client, f"Observation?_id={pressure}&_include=Observation:subject")
    assert ids_of(bundle, "include") == {group}


def test_indexing_skips_only_parameters_that_cannot_select_anything() -> None:
    """Parameters whose paths start at an element a resource lacks are not evaluated (store/indexing.py `_Plan`), and
    those of a shape of resource seen before are not worked out again: the rows must be those of evaluating every
    parameter, over real Synthea resources with their value[x] choices."""
    import bz2

    from rebond.store.indexing import IndexRows, _index_values, _plan
    from tests.conftest import SYNTHEA

    resources = []
    for path in sorted(SYNTHEA.glob("*.json.bz2"))[2:5]:
        with bz2.open(path) as file:
            bundle = orjson.loads(file.read())
        resources += [entry["resource"] for entry in bundle["entry"]]
    kinds = {r["resourceType"] for r in resources}
    shapes_before = len(_plan("Observation")._of_shape)  # other tests in this process may have indexed some
    assert {"Observation", "Patient", "Encounter", "MedicationRequest", "Condition"} <= kinds
    choices = 0
    composites: set[str] = set()
    for resource in resources:
        expected = IndexRows()
        for param in _plan(resource["resourceType"]).params:  # every indexed parameter of the type, none skipped
            values = param.extractor.values(resource)
            if values:
                _index_values(expected, param, values)
        expected.dedupe()
        assert index_resource(resource) == expected, resource["resourceType"]
        choices += any(k.startswith("value") and k != "value" for k in resource)
        composites.update(row[0] for row in expected.composite)
    assert choices > 100  # Observations with valueQuantity, valueCodeableConcept…: found through `value`
    # the parameters are worked out once for each shape (top-level keys): most resources above were answered from it
    observations = sum(r["resourceType"] == "Observation" for r in resources)
    assert observations > 500 and len(_plan("Observation")._of_shape) - shapes_before < observations / 10
    # composites on a component are evaluated only when the resource has components; those on the resource itself that
    # its code's and value's rows answer make no rows (searchparams.JOINED_COMPOSITES)
    assert "Observation.component-code-value-quantity" in composites and not composites & JOINED_COMPOSITES


@for_any(st.text(min_size=1, max_size=30))
def test_a_literal_value_is_searched_for_as_it_is(value: str) -> None:
    """Whatever another system sent as an identifier (commas, bars, dollars, backslashes) is one code, not an "or"."""
    from rebond.fhir.search import literal

    (clause,) = parse_search("Patient", [("identifier", f"urn:oid:1.2.3|{literal(value)}")]).clauses
    assert [(v.system, v.code) for v in clause.values] == [("urn:oid:1.2.3", value)]


def test_a_composites_token_part_with_or_without_its_system(store: Store, ward: tuple[TestClient, dict[str, str]]) -> None:
    """A token part is kept in one form (code, then its system): searched with its system, without (any system), or
    with an empty one (none); a longer code that begins with the code asked for is not it."""
    client, ids = ward
    local = store.create(obs(ids["marc"], "2823-30", 6.2, "2026-11-23T08:00:00Z")).stored.id  # same value, another code
    nosystem = store.create({**obs(ids["zoe"], "2823-3", 6.2, "2026-11-24T08:00:00Z"), "code": {"coding": [{"code": "2823-3"}]}}).stored.id
    blood_group = store.create({
        "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{ids['zoe']}"},
        "code": {"coding": [{"system": LOINC, "code": "883-9"}]},
        "valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA19710-5", "display": "Groupe A"}]},
    }).stored.id
    assert ids_of(search(client, "Observation?code-value-quantity=2823-3$6.2")) == {ids["k_high"], nosystem}
    assert ids_of(search(client, f"Observation?code-value-quantity={LOINC}|2823-3$6.2")) == {ids["k_high"]}
    assert ids_of(search(client, "Observation?code-value-quantity=|2823-3$6.2")) == {nosystem}
    assert ids_of(search(client, "Observation?code-value-quantity=2823-30$6.2")) == {local}
    assert ids_of(search(client, "Observation?code-value-quantity=2823$6.2")) == set()
    assert ids_of(search(client, "Observation?code-value-concept=883-9$LA19710-5")) == {blood_group}
    assert ids_of(search(client, f"Observation?code-value-concept={LOINC}|883-9${LOINC}|LA19710-5")) == {blood_group}
    assert ids_of(search(client, "Observation?code-value-concept=883-9$la19710-5")) == set()  # codes keep their case
    assert ids_of(search(client, "Observation?code-value-concept=883-9$http://snomed.info/sct|LA19710-5")) == set()
    assert index_resource(obs(ids["marc"], "2823-3", 4.1, "2026-11-21T08:00:00Z")).composite == []  # its code's and value's rows
    pressure = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
                "component": [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": 150}}]}
    assert index_resource(pressure).composite == [("Observation.component-code-value-quantity", f"8480-6\x1f{LOINC}", "150")]


def test_a_composite_of_an_observation_s_code_and_value_takes_each_part_s_whole_syntax(
        store: Store, ward: tuple[TestClient, dict[str, str]]) -> None:
    """`code-value-quantity`, `-concept` and `-date` are answered by the Observation's code and value rows
    (searchparams.JOINED_COMPOSITES): the value part takes prefixes and units as the value's own parameter does."""
    client, ids = ward
    dated = store.create({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": "11778-8"}]},
                          "subject": {"reference": f"Patient/{ids['zoe']}"}, "valueDateTime": "2026-12-01T10:00:00Z"}).stored.id
    assert ids_of(search(client, "Observation?code-value-quantity=2823-3$gt5")) == {ids["k_high"]}
    assert ids_of(search(client, "Observation?code-value-quantity=2823-3$le5")) == {ids["k_norm"]}
    assert ids_of(search(client, "Observation?code-value-quantity=2823-3$6.2|http://unitsofmeasure.org|mmol/L")) == {ids["k_high"]}
    assert ids_of(search(client, "Observation?code-value-quantity=2823-3$6.2|http://unitsofmeasure.org|mg/dL")) == set()
    assert ids_of(search(client, "Observation?code-value-quantity=2823-3$gt5,2951-2$gt100")) == {ids["k_high"], ids["na"]}
    assert ids_of(search(client, "Observation?code-value-quantity=2951-2$gt5")) == {ids["na"]}  # not sodium's code with potassium's value
    assert ids_of(search(client, f"Observation?subject=Patient/{ids['helene']}&code-value-quantity=2823-3$gt1")) == {ids["k_high"]}
    assert ids_of(search(client, "Observation?code-value-date=11778-8$ge2026-12")) == {dated}
    assert ids_of(search(client, "Observation?code-value-date=11778-8$lt2026-12")) == set()
    missing = ids_of(search(client, "Observation?code-value-quantity:missing=true"))
    assert dated in missing and not missing & {ids["k_high"], ids["k_norm"], ids["na"]}
    assert ids_of(search(client, "Observation?code-value-quantity:missing=false")) == {ids["k_high"], ids["k_norm"], ids["na"]}
    refused = client.get("/fhir/Observation?code-value-quantity=2823-3$beaucoup")
    assert refused.status_code == 400 and "'beaucoup' is not a quantity" in refused.text
    refused = client.get("/fhir/Observation?combo-code-value-quantity=2823-3$beaucoup")
    assert refused.status_code == 400 and "'beaucoup' is not a quantity" in refused.text


def test_the_composites_answered_by_their_components_rows_pair_exactly_those_rows() -> None:
    """What JOINED_COMPOSITES rests on: over Synthea's Observations of three bundles and some made for what Synthea lacks
    (a code in two systems, a date, a period, a SampledData, a concept with a text), the pairs a composite row would
    hold are exactly the pairs of its two parameters' rows, in the forms a composite part is compared in. And
    `code-value-string` could not be answered so: a valueCodeableConcept's text is a value-string row, never its pair."""
    import bz2
    from collections import Counter
    from itertools import product

    from rebond.fhir.searchparams import SearchParam
    from rebond.store.indexing import IndexRows, composite_values, format_number, normalize_text, token_part
    from tests.conftest import SYNTHEA

    def forms(rows: IndexRows, param: SearchParam) -> set[str]:
        if param.type == "token":
            return {token_part(system, code) for key, system, code, _text in rows.token if key in param.keys and code}
        if param.type == "quantity":
            return {format_number(value) for key, *_unit, _lo, _hi, value in rows.quantity if key in param.keys}
        if param.type == "date":
            return {str(lo) for key, lo, _hi in rows.date if key in param.keys}
        return {normalize_text(exact) for key, _norm, exact in rows.string if key in param.keys}

    coded = {"coding": [{"system": LOINC, "code": "8310-5"}, {"system": "urn:oid:1.2.250.1.213.2.5", "code": "TEMP"}]}
    made = [
        {"resourceType": "Observation", "status": "final", "code": coded, "valueQuantity": {"value": 38.5, "unit": "Cel"}},
        {"resourceType": "Observation", "status": "final", "code": coded, "valueDateTime": "2026-12-01T10:00:00+01:00"},
        {"resourceType": "Observation", "status": "final", "code": coded,
         "valuePeriod": {"start": "2026-12-01", "end": "2026-12-02"}},
        {"resourceType": "Observation", "status": "final", "code": coded,
         "valueSampledData": {"origin": {"value": 0}, "period": 10, "dimensions": 1, "data": "1 2 3"}},
        {"resourceType": "Observation", "status": "final", "code": coded,
         "valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA6576-8"}], "text": "Positif"}},
    ]
    observations = list(made)
    for path in sorted(SYNTHEA.glob("*.json.bz2"))[2:5]:
        with bz2.open(path) as file:
            observations += [e["resource"] for e in orjson.loads(file.read())["entry"] if e["resource"]["resourceType"] == "Observation"]
    paired: Counter[str] = Counter()
    for resource in observations:
        rows = index_resource(resource)
        for code in ("code-value-quantity", "code-value-concept", "code-value-date", "code-value-string"):
            param = lookup("Observation", code)
            assert param is not None
            first, second = (lookup("Observation", c) for c in (param.joined or ("code", "value-string")))
            assert first is not None and second is not None
            pairs, joined = set(composite_values(param, resource)), set(product(forms(rows, first), forms(rows, second)))
            if param.joined:
                assert pairs == joined, (code, resource)
                paired[code] += bool(pairs)
            elif pairs != joined:
                paired["code-value-string, not a join"] += 1
    assert paired["code-value-quantity"] > 500 and paired["code-value-concept"] > 20 and paired["code-value-date"] >= 2, paired
    assert paired["code-value-string, not a join"] >= 1, paired


def test_text_finds_codes_by_their_text_and_checks_each_rows_own(store: Store, ward: tuple[TestClient, dict[str, str]]) -> None:
    """`:text` goes from a text to the codes written with it (sp_token_texts), then keeps the rows whose own text
    matches: a code written once with « Kaliémie » does not bring every potassium; a text without a code is found too."""
    client, ids = ward
    renamed = store.create({**obs(ids["zoe"], "2823-3", 5.0, "2026-11-24T08:00:00Z"),
                            "code": {"coding": [{"system": LOINC, "code": "2823-3", "display": "Kaliémie"}]}}).stored.id
    text_only = store.create({**obs(ids["zoe"], "x", 1.0, "2026-11-24T09:00:00Z"), "code": {"text": "Kaliémie au lit"}}).stored.id
    assert ids_of(search(client, "Observation?code:text=kaliemie")) == {renamed, text_only}
    assert ids_of(search(client, "Observation?code:text=potass")) == {ids["k_high"], ids["k_norm"]}
    assert ids_of(search(client, "Observation?code:text=kaliemie&subject=Patient/" + ids["zoe"])) == {renamed, text_only}
    assert ids_of(search(client, "Observation?code:text=kaliemie,sodium")) == {renamed, text_only, ids["na"]}
    assert ids_of(search(client, f"Observation?subject=Patient/{ids['zoe']}&code:text=kaliemie au")) == {text_only}
    assert ids_of(search(client, "Observation?code:text=chlore")) == set()
