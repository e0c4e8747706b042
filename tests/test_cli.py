"""The `rebond` command as a person uses it, and a real server process driven by an independent FHIR client."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fhirclient import client as fhir_client
from fhirclient.models.bundle import Bundle
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient

from rebond.store import open_store
from tests.server import RebondServer, rebond


@pytest.fixture
def server(engine_url: str) -> Iterator[RebondServer]:
    srv = RebondServer(engine_url).start()
    yield srv
    srv.stop()


def test_an_independent_fhir_client_creates_reads_and_searches(server: RebondServer) -> None:
    smart = fhir_client.FHIRClient(settings={"app_id": "rebond-tests", "api_base": server.fhir + "/"})
    smart.server.session.headers.update(server.headers)  # the integration's API token
    patient = Patient({"name": [{"family": "Moreau", "given": ["Inès"]}], "birthDate": "1983-05-17", "gender": "female"})
    created = patient.create(smart.server)
    assert created is not None and created["id"]
    pid = created["id"]

    read = Patient.read(pid, smart.server)
    assert read.name[0].family == "Moreau" and read.birthDate.isostring == "1983-05-17"

    k = Observation({
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3", "display": "Potassium"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": {"value": 6.1, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
    })
    k.create(smart.server)

    found = Patient.where(struct={"family": "moreau"}).perform_resources(smart.server)
    assert [p.id for p in found] == [pid]
    results = Observation.where(struct={"patient": pid, "code": "http://loinc.org|2823-3"}).perform(smart.server)
    assert isinstance(results, Bundle) and results.entry[0].resource.valueQuantity.value == 6.1

    read.gender = "other"
    read.update(smart.server)
    assert Patient.read(pid, smart.server).meta.versionId == "2"


def test_serve_refuses_a_bad_database_url_in_one_line() -> None:
    result = rebond("serve", "--db", "mysql://nope")
    assert result.returncode != 0
    assert "unsupported database URL" in result.stderr and "Traceback" not in result.stderr


def test_a_command_against_an_unreachable_database_says_so_in_one_line() -> None:
    """The PostgreSQL pool tries for 30 s (a failover may be under way) and its retries stay out of the terminal."""
    result = rebond("accounts", "list", "--db", "postgresql://nobody@127.0.0.1:9/none")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "cannot reach PostgreSQL" in result.stderr


def test_serve_refuses_a_negative_number_of_mllp_workers_before_starting(tmp_path: Path) -> None:
    result = rebond("serve", "--db", f"sqlite:///{tmp_path / 'r.db'}", "--mllp-port", "0", "--mllp-workers", "-1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["rebond: --mllp-workers must be 0 or more, not -1"]
    assert "serving" not in result.stdout


@pytest.mark.parametrize("command", ["serve", "site"])
def test_a_negative_delay_before_critical_results_go_to_a_physician_is_refused_in_one_line(command: str, tmp_path: Path) -> None:
    site_args = ["--upstream", "http://127.0.0.1:9/fhir", "--site-id", "H1"] if command == "site" else []
    result = rebond(command, *site_args, "--db", f"sqlite:///{tmp_path / 'r.db'}", "--escalate-after", "-3")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["rebond: --escalate-after takes minutes, 0 or more, not -3.0"]


def test_import_reports_bad_files_and_exits_non_zero(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/x.db"
    good = tmp_path / "good.ndjson"
    good.write_text('{"resourceType": "Patient", "id": "p1"}\n{"resourceType": "Patient", "id": "p2"}\n')
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"resourceType": "Patient", "id": "p3"}\nnot json\n{"resourceType": "Patient", "birthDate": "soon"}\n')
    result = rebond("import", "--db", db, str(good), str(bad))
    assert result.returncode == 1
    assert "3 resources loaded, 2 failed" in result.stdout
    again = rebond("import", "--db", db, str(good))
    assert again.returncode == 0
    store = open_store(db)
    try:
        assert store.counts() == {"Patient": 3}
    finally:
        store.close()
    missing = rebond("import", "--db", db, str(tmp_path / "nope.json"))
    assert missing.returncode != 0 and "no such file" in missing.stderr


def test_import_through_a_running_server(server: RebondServer, tmp_path: Path) -> None:
    bundle = tmp_path / "admission.json"
    bundle.write_text(
        '{"resourceType": "Bundle", "type": "transaction", "entry": ['
        '{"fullUrl": "urn:uuid:7d1c0f4e-0000-4000-8000-000000000001", "request": {"method": "POST", "url": "Patient"},'
        ' "resource": {"resourceType": "Patient", "id": "7d1c0f4e-0000-4000-8000-000000000001", "name": [{"family": "Roux"}]}},'
        '{"request": {"method": "POST", "url": "Encounter"}, "resource": {"resourceType": "Encounter", "status": "in-progress",'
        ' "class": {"code": "IMP"}, "subject": {"reference": "urn:uuid:7d1c0f4e-0000-4000-8000-000000000001"}}}]}'
    )
    for _ in range(2):
        result = rebond("import", "--url", server.fhir, "--token", server.token, str(bundle))
        assert result.returncode == 0, result.stdout + result.stderr
    import httpx

    found = httpx.get(f"{server.fhir}/Encounter?patient=7d1c0f4e-0000-4000-8000-000000000001", headers=server.headers).json()
    assert len(found["entry"]) == 2  # the Encounter has no id of its own: each load creates one, the Patient only once
    assert httpx.get(f"{server.fhir}/Patient?family=roux&_summary=count", headers=server.headers).json()["total"] == 1


def test_several_worker_processes_share_one_store(tmp_path: Path) -> None:

    srv = RebondServer(f"sqlite:///{tmp_path}/w.db", "--workers", "2").start()
    try:
        with srv.client(timeout=10) as client:
            ids = []
            for i in range(20):
                resp = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"Worker{i}"}]},
                                   headers={"Content-Type": "application/fhir+json"})
                assert resp.status_code == 201
                ids.append(resp.json()["id"])
            assert all(client.get(f"/Patient/{i}").status_code == 200 for i in ids)
            assert client.get("/Patient?name=worker&_summary=count").json()["total"] == 20
    finally:
        srv.stop()
