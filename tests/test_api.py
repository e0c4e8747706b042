"""The REST interactions and their headers, and every error as an OperationOutcome with the right status."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from rebond.store.base import Store
from tests.auth import api_client

FHIR = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    with api_client(store) as c:
        yield c


def new_patient(client: TestClient, family: str = "Durand") -> dict[str, object]:
    resp = client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": family}]}, headers=FHIR)
    assert resp.status_code == 201
    return resp.json()  # type: ignore[no-any-return]


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"


def test_create_read_update_delete_with_headers(client: TestClient) -> None:
    resp = client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "female"}, headers=FHIR)
    assert resp.status_code == 201
    assert resp.headers["content-type"].startswith("application/fhir+json")
    rid = resp.json()["id"]
    assert resp.headers["etag"] == 'W/"1"'
    assert resp.headers["location"].endswith(f"/fhir/Patient/{rid}/_history/1")
    assert "last-modified" in resp.headers

    read = client.get(f"/fhir/Patient/{rid}")
    assert read.status_code == 200 and read.json()["meta"]["versionId"] == "1"
    assert client.get(f"/fhir/Patient/{rid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304

    upd = client.put(f"/fhir/Patient/{rid}", json={"resourceType": "Patient", "id": rid, "gender": "male"},
                     headers={**FHIR, "If-Match": 'W/"1"'})
    assert upd.status_code == 200 and upd.headers["etag"] == 'W/"2"'
    stale = client.put(f"/fhir/Patient/{rid}", json={"resourceType": "Patient", "id": rid, "gender": "other"},
                       headers={**FHIR, "If-Match": 'W/"1"'})
    assert stale.status_code == 412 and stale.json()["resourceType"] == "OperationOutcome"

    assert client.get(f"/fhir/Patient/{rid}/_history/1").json()["gender"] == "female"
    hist = client.get(f"/fhir/Patient/{rid}/_history").json()
    assert hist["type"] == "history" and hist["total"] == 2

    assert client.delete(f"/fhir/Patient/{rid}").status_code == 204
    gone = client.get(f"/fhir/Patient/{rid}")
    assert gone.status_code == 410 and gone.json()["resourceType"] == "OperationOutcome"
    assert client.get(f"/fhir/Patient/{rid}/_history").json()["total"] == 3


def test_put_creates_with_the_client_id(client: TestClient) -> None:
    resp = client.put("/fhir/Patient/ipp-1", json={"resourceType": "Patient", "id": "ipp-1"}, headers=FHIR)
    assert resp.status_code == 201 and resp.json()["id"] == "ipp-1"


def test_conditional_create_and_update(client: TestClient) -> None:
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:ipp", "value": "77"}]}
    first = client.post("/fhir/Patient", json=body, headers={**FHIR, "If-None-Exist": "identifier=urn:ipp|77"})
    second = client.post("/fhir/Patient", json=body, headers={**FHIR, "If-None-Exist": "identifier=urn:ipp|77"})
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    upd = client.put("/fhir/Patient?identifier=urn:ipp|77", json={**body, "gender": "female"}, headers=FHIR)
    assert upd.status_code == 200 and upd.json()["id"] == first.json()["id"] and upd.json()["meta"]["versionId"] == "2"
    created = client.put("/fhir/Patient?identifier=urn:ipp|78",
                         json={"resourceType": "Patient", "identifier": [{"system": "urn:ipp", "value": "78"}]}, headers=FHIR)
    assert created.status_code == 201


def test_json_patch(client: TestClient) -> None:
    rid = new_patient(client)["id"]
    resp = client.patch(f"/fhir/Patient/{rid}", json=[{"op": "add", "path": "/birthDate", "value": "1961-04-12"}],
                        headers={"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'})
    assert resp.status_code == 200 and resp.json()["birthDate"] == "1961-04-12"
    bad = client.patch(f"/fhir/Patient/{rid}", json=[{"op": "remove", "path": "/nothing"}],
                       headers={"Content-Type": "application/json-patch+json"})
    assert bad.status_code == 422


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("post", "/fhir/Patient", b"{not json", FHIR, 400),
        ("post", "/fhir/Patient", b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"}}', FHIR, 400),
        ("post", "/fhir/Unicorn", b'{"resourceType": "Unicorn"}', FHIR, 400),
        ("put", "/fhir/Patient/abc", b'{"resourceType": "Patient", "id": "xyz"}', FHIR, 400),
        ("put", "/fhir/Patient/abc", b'{"resourceType": "Patient"}', FHIR, 400),
        ("post", "/fhir/Patient", b'{"resourceType": "Patient"}', {"Content-Type": "text/plain"}, 415),
        ("post", "/fhir/Patient", b'{"resourceType": "Patient", "birthDate": "12/04/1961"}', FHIR, 422),
        ("post", "/fhir/Patient", b'{"resourceType": "Patient", "nickname": "Jo"}', FHIR, 422),
        ("post", "/fhir/Observation", b'{"resourceType": "Observation", "code": {"text": "K"}}', FHIR, 422),
        ("get", "/fhir/Patient/does-not-exist", None, {}, 404),
        ("get", "/fhir/Patient?unknown-param=1", None, {}, 400),
        ("get", "/fhir/Patient?birthdate=yesterday", None, {}, 400),
        ("put", "/fhir/Patient/p1", b'{"resourceType": "Patient", "id": "p1"}', {**FHIR, "If-Match": "W/\"9\""}, 412),
        ("put", "/fhir/Patient/p1", b'{"resourceType": "Patient", "id": "p1"}', {**FHIR, "If-None-Match": 'W/"1"'}, 400),
        ("put", "/fhir/Patient/p1", b'{"resourceType": "Patient", "id": "p1"}',
         {**FHIR, "If-None-Match": "*", "If-Match": 'W/"1"'}, 400),
    ],
)
def test_bad_requests_get_an_operation_outcome(
    client: TestClient, method: str, path: str, body: bytes | None, headers: dict[str, str], status: int
) -> None:
    resp = client.request(method.upper(), path, content=body, headers=headers)
    assert resp.status_code == status
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "error"


def test_an_update_with_if_none_match_star_only_creates(client: TestClient) -> None:
    """If-None-Match: * on a PUT (HTTP's "only if there is none"): how a site node replays a record it created."""
    body = {"resourceType": "Patient", "id": "cree-au-site", "gender": "female"}
    first = client.put("/fhir/Patient/cree-au-site", json=body, headers={**FHIR, "If-None-Match": "*"})
    assert first.status_code == 201 and first.headers["etag"] == 'W/"1"'
    again = client.put("/fhir/Patient/cree-au-site", json=body, headers={**FHIR, "If-None-Match": "*"})
    assert again.status_code == 412 and "already exists" in again.json()["issue"][0]["diagnostics"]
    assert client.get("/fhir/Patient/cree-au-site/_history").json()["total"] == 1, "not even an unchanged version"
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {**body, "gender": "male"}, "request": {"method": "PUT", "url": "Patient/cree-au-site", "ifNoneMatch": "*"}},
        {"resource": {**body, "id": "autre"}, "request": {"method": "PUT", "url": "Patient/autre", "ifNoneMatch": "*"}}]}
    answers = client.post("/fhir", json=batch, headers=FHIR).json()["entry"]
    assert [a["response"]["status"][:3] for a in answers] == ["412", "201"]
    assert client.get("/fhir/Patient/cree-au-site").json()["gender"] == "female"
    assert client.delete("/fhir/Patient/autre").status_code == 204
    recreated = client.put("/fhir/Patient/autre", json={**body, "id": "autre"}, headers={**FHIR, "If-None-Match": "*"})
    assert recreated.status_code == 201 and recreated.headers["etag"] == 'W/"3"', "a deleted record may be made again"


def test_invalid_resource_names_the_path_of_each_problem(client: TestClient) -> None:
    resp = client.post("/fhir/Patient", headers=FHIR,
                       content=b'{"resourceType": "Patient", "birthDate": "1961-13-01", "name": {"family": "X"}}')
    assert resp.status_code == 422
    paths = {p for issue in resp.json()["issue"] for p in issue["expression"]}
    assert paths == {"Patient.birthDate", "Patient.name"}


def test_each_problem_is_named_by_its_path_down_to_the_array_item() -> None:
    from rebond.fhir.model import validate

    issues = validate({"resourceType": "Patient", "name": [{"family": "X"}, {"given": "Lucie"}], "telecom": [{"system": 5}],
                       "contact": [{"name": {"family": " "}}], "identifier": [{"value": None}], "birthDate": "1961-13-01",
                       "active": "yes", "photo": {}, "contained": [{"resourceType": "Nothing"}]})
    assert {(issue.path, issue.message) for issue in issues} == {
        ("Patient.name[1].given", "must be an array"),
        ("Patient.telecom[0].system", "must be a string"),
        ("Patient.contact[0].name.family", "a string may not be empty"),
        ("Patient.identifier[0].value", "null is not allowed"),
        ("Patient.birthDate", "'1961-13-01' is not a valid date"),
        ("Patient.active", "must be true or false"),
        ("Patient.photo", "must be an array"),
        ("Patient.contained[0].resourceType", "unknown resource type 'Nothing'"),
    }


def test_body_over_the_limit_is_413(store: Store) -> None:
    from rebond.fhir.api import FhirApi

    limit = FhirApi(store).max_body
    with api_client(store) as c:
        resp = c.post("/fhir/Patient", content=b" " * (limit + 10), headers=FHIR)
    assert resp.status_code == 413 and resp.json()["resourceType"] == "OperationOutcome"


def test_capability_statement_lists_search_parameters(client: TestClient) -> None:
    cap = client.get("/fhir/metadata").json()
    assert cap["fhirVersion"] == "4.0.1"
    obs = next(r for r in cap["rest"][0]["resource"] if r["type"] == "Observation")
    names = {p["name"] for p in obs["searchParam"]}
    assert {"code", "patient", "date", "value-quantity", "code-value-quantity", "_id", "_lastUpdated"} <= names
    assert {op["name"] for op in cap["rest"][0]["operation"]} == {"changes", "audit"}


def test_change_feed_over_http(client: TestClient) -> None:
    ids = [new_patient(client, f"F{i}")["id"] for i in range(3)]
    page = client.get("/fhir/$changes?_count=2").json()
    assert [e["resource"]["id"] for e in page["entry"]] == ids[:2]
    cursor = page["extension"][0]["valueString"]
    rest = client.get(f"/fhir/$changes?after={cursor}").json()
    assert [e["resource"]["id"] for e in rest["entry"]] == ids[2:]
    sites = {x["valueString"] for e in page["entry"] for x in e["extension"] if x["url"].endswith("change-site")}
    assert sites == {"central"}
    assert client.get("/fhir/$changes?after=abc").status_code == 400


def test_system_and_type_history_with_since_and_count(client: TestClient) -> None:
    for i in range(3):
        new_patient(client, f"H{i}")
    hist = client.get("/fhir/_history?_count=2").json()
    assert hist["total"] == 3 and len(hist["entry"]) == 2
    assert any(link["relation"] == "next" for link in hist["link"])
    assert client.get("/fhir/Patient/_history?_since=2999-01-01").json()["total"] == 0
    assert client.get("/fhir/Patient/_history?_since=2000-01-01").json()["total"] == 3
