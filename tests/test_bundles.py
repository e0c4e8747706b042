"""Batch and transaction Bundles: independence of batch entries, atomicity, reference resolution, processing order."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from rebond.store.base import Store
from tests.auth import api_client

FHIR = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    with api_client(store) as c:
        yield c


def post_bundle(client: TestClient, bundle: dict[str, Any]) -> Any:
    return client.post("/fhir", json=bundle, headers=FHIR)


def test_batch_entries_succeed_or_fail_on_their_own(client: TestClient) -> None:
    resp = post_bundle(client, {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "gender": "female"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": "not-a-gender-but-a-string", "birthDate": "nope"},
         "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
        {"resource": {"resourceType": "Patient", "id": "b1"}, "request": {"method": "PUT", "url": "Patient/b1"}},
    ]})
    assert resp.status_code == 200
    statuses = [e["response"]["status"] for e in resp.json()["entry"]]
    assert statuses[0].startswith("201") and statuses[1] == "422" and statuses[2].startswith("404") and statuses[3].startswith("201")
    assert resp.json()["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/Patient/b1").status_code == 200


def test_transaction_is_all_or_nothing(client: TestClient) -> None:
    resp = post_bundle(client, {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "t1"}, "request": {"method": "PUT", "url": "Patient/t1"}},
        {"resource": {"resourceType": "Observation", "code": {"text": "no status"}}, "request": {"method": "POST", "url": "Observation"}},
    ]})
    assert resp.status_code == 422
    assert "entry 1" in resp.json()["issue"][0]["diagnostics"] or resp.json()["issue"][0]["expression"]
    assert client.get("/fhir/Patient/t1").status_code == 404


def test_transaction_rewrites_urn_uuid_and_resolves_conditional_references(client: TestClient) -> None:
    client.post("/fhir/Practitioner", json={"resourceType": "Practitioner", "identifier": [{"system": "urn:rpps", "value": "10001"}]},
                headers=FHIR)
    resp = post_bundle(client, {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:3f0e6c1e-0000-0000-0000-000000000001",
         "resource": {"resourceType": "Patient", "name": [{"family": "Petit"}]}, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:3f0e6c1e-0000-0000-0000-000000000002",
         "resource": {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "IMP"},
                      "subject": {"reference": "urn:uuid:3f0e6c1e-0000-0000-0000-000000000001"},
                      "participant": [{"individual": {"reference": "Practitioner?identifier=urn:rpps|10001"}}]},
         "request": {"method": "POST", "url": "Encounter"}},
    ]})
    assert resp.status_code == 200, resp.text
    entries = resp.json()["entry"]
    patient_id = entries[0]["response"]["location"].split("/")[1]
    enc = entries[1]["resource"]
    assert enc["subject"]["reference"] == f"Patient/{patient_id}"
    assert enc["participant"][0]["individual"]["reference"].startswith("Practitioner/")
    found = client.get(f"/fhir/Encounter?patient={patient_id}").json()
    assert found["entry"][0]["resource"]["id"] == enc["id"]


def test_unresolvable_conditional_reference_fails_the_transaction(client: TestClient) -> None:
    resp = post_bundle(client, {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "generalPractitioner": [{"reference": "Practitioner?identifier=urn:rpps|none"}]},
         "request": {"method": "POST", "url": "Patient"}},
    ]})
    assert resp.status_code == 412
    assert client.get("/fhir/Patient?_summary=count").json()["total"] == 0


def test_transaction_processes_deletes_before_creates(client: TestClient) -> None:
    client.put("/fhir/Patient/old", json={"resourceType": "Patient", "id": "old", "identifier": [{"system": "urn:x", "value": "1"}]},
               headers=FHIR)
    resp = post_bundle(client, {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "1"}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:x|1"}},
        {"request": {"method": "DELETE", "url": "Patient/old"}},
    ]})
    assert resp.status_code == 200
    first = resp.json()["entry"][0]["response"]
    assert first["status"].startswith("201")  # the delete ran first, so the conditional create found nothing
    assert client.get("/fhir/Patient/old").status_code == 410


def test_conditional_create_in_a_transaction_finds_the_existing_resource(client: TestClient) -> None:
    body = {"resourceType": "Organization", "identifier": [{"system": "urn:finess", "value": "750100042"}], "name": "Lariboisière"}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:00000000-0000-0000-0000-0000000000aa", "resource": body,
         "request": {"method": "POST", "url": "Organization", "ifNoneExist": "identifier=urn:finess|750100042"}},
        {"resource": {"resourceType": "Location", "name": "Cardiologie",
                      "managingOrganization": {"reference": "urn:uuid:00000000-0000-0000-0000-0000000000aa"}},
         "request": {"method": "POST", "url": "Location"}},
    ]}
    first = post_bundle(client, bundle).json()
    second = post_bundle(client, bundle).json()
    assert second["entry"][0]["response"]["status"].startswith("200")
    org_id = first["entry"][0]["response"]["location"].split("/")[1]
    assert second["entry"][1]["resource"]["managingOrganization"]["reference"] == f"Organization/{org_id}"
    assert client.get("/fhir/Organization?_summary=count").json()["total"] == 1


def test_not_a_bundle_is_a_400(client: TestClient) -> None:
    assert client.post("/fhir", json={"resourceType": "Patient"}, headers=FHIR).status_code == 400
    assert post_bundle(client, {"resourceType": "Bundle", "type": "collection"}).status_code == 400
    assert post_bundle(client, {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {}}]}).status_code == 400
