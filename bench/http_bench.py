"""Read by id, durable create and a clinical search mix, over HTTP, against Rebond and the baseline.

Run: .venv/bin/python bench/http_bench.py [--engine sqlite|postgres] [--seconds 10]
Both servers are real processes (uvicorn, one worker each) measured by the same
closed-loop load generator (bench/loadgen.py) on the same machine. The baseline
(bench/baseline_server.py) serves the same documents from a plain (type, id, body)
table in the same engine with the same durability and no FHIR logic.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import orjson
from common import ROOT, SCRATCH, SYNTHEA, database, machine
from loadgen import Request, Result, run

from rebond.store import open_store
from tests.pg_harness import free_port
from tests.server import RebondServer


class BaselineServer:
    def __init__(self, url: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "baseline_server.py"), url, str(self.port)])
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/docs/x/y", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("baseline server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def load_synthea(url: str) -> None:
    result = subprocess.run([sys.executable, "-m", "rebond.cli", "import", "--db", url, str(SYNTHEA)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])


def copy_to_baseline(source_url: str, baseline_url: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from baseline_server import open_docs

    docs = open_docs(baseline_url)
    store = open_store(source_url)
    cursor = None
    while True:
        page = store.changes(cursor, count=2000)
        if not page.changes:
            break
        docs.put_many([(c.stored.resource_type, c.stored.id, c.stored.body) for c in page.changes if c.stored.body])
        cursor = page.next_cursor
    store.close()


def sample(url: str) -> dict[str, list[object]]:
    """Real ids and search values from the loaded data, so that every request finds something."""
    store = open_store(url)
    with store.reader() as cur:  # type: ignore[attr-defined]
        cur.execute("SELECT res_id FROM resources WHERE res_type = 'Observation' AND deleted = 0 ORDER BY rid LIMIT 20000")
        observations = [r[0] for r in cur.fetchall()]
        cur.execute(
            "SELECT x.target_id, t.code FROM sp_reference x JOIN sp_token t ON t.rid = x.rid AND t.key = 'Observation.code'"
            " WHERE x.key = 'Observation.subject' AND x.target_type = 'Patient' AND t.system IS NOT NULL ORDER BY x.rid LIMIT 5000"
        )
        pairs = [(r[0], r[1]) for r in cur.fetchall()]
        cur.execute("SELECT value_norm FROM sp_string WHERE key = 'Patient.family'")
        families = [r[0][:4] for r in cur.fetchall()]
    store.close()
    return {"observations": observations, "pairs": pairs, "families": families}  # type: ignore[dict-item]


def search_request(n: int, data: dict[str, list[object]]) -> tuple[str, str, bytes, dict[str, str]]:
    rng = random.Random(n)
    kind = n % 4
    pid, code = rng.choice(data["pairs"])  # type: ignore[misc]
    if kind == 0:
        path = f"/fhir/Observation?patient={pid}&code={code}"
    elif kind == 1:
        path = f"/fhir/Patient?name={rng.choice(data['families'])}"
    elif kind == 2:
        path = f"/fhir/Encounter?date=ge{rng.randint(2015, 2021)}-0{rng.randint(1, 9)}-01"
    else:
        path = f"/fhir/Observation?patient={pid}&code={code}&_include=Observation:patient&_include=Observation:encounter"
    return "GET", path, b"", {}


OBSERVATION = orjson.dumps({
    "resourceType": "Observation", "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
    "subject": {"reference": "Patient/bench"}, "effectiveDateTime": "2026-11-23T03:00:00+01:00",
    "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
})
FHIR = {"Content-Type": "application/fhir+json"}


def signed(make: Callable[[int], Request], server: RebondServer) -> Callable[[int], Request]:
    """The same requests, carrying the server's API token, as every integration does."""
    def request(n: int) -> Request:
        method, path, body, headers = make(n)
        return method, path, body, {**headers, **server.headers}

    return request


def report(title: str, rebond_result: Result, baseline: Result) -> None:
    print(f"{title}")
    print("  " + rebond_result.line())
    print("  " + baseline.line())
    print(f"  ratio: {rebond_result.rate / baseline.rate:.2f} of the baseline's rate")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    secs = args.seconds
    print(f"machine: {machine()}; engine: {args.engine}; one uvicorn worker per server; load generator on the same machine")
    SCRATCH.mkdir(parents=True, exist_ok=True)

    with database(args.engine, "http_synthea") as url, database(args.engine, "http_baseline") as burl:
        load_synthea(url)
        copy_to_baseline(url, burl)
        data = sample(url)
        server = RebondServer(url).start()
        baseline = BaselineServer(burl)
        try:
            obs = data["observations"]
            read = run("rebond GET Observation/{id}", "127.0.0.1", server.port,
                       signed(lambda n: ("GET", f"/fhir/Observation/{obs[n % len(obs)]}", b"", {}), server), concurrency=16, seconds=secs)
            base_read = run("baseline GET docs/Observation/{id}", "127.0.0.1", baseline.port,
                            lambda n: ("GET", f"/docs/Observation/{obs[n % len(obs)]}", b"", {}), concurrency=16, seconds=secs)
            report("read by id, 16 concurrent clients, all of Synthea loaded", read, base_read)
            for clients in (4, 16):
                mix = run(f"rebond search mix ({clients} clients)", "127.0.0.1", server.port,
                          signed(lambda n: search_request(n, data), server), concurrency=clients, seconds=secs)
                report(f"search mix, {clients} concurrent clients (baseline: read by id, the floor of one request)", mix, base_read)
        finally:
            server.stop()
            baseline.stop()

    with database(args.engine, "http_create") as url, database(args.engine, "http_create_baseline") as burl:
        server = RebondServer(url).start()
        baseline = BaselineServer(burl)
        try:
            create = run("rebond POST Observation", "127.0.0.1", server.port,
                         signed(lambda n: ("POST", "/fhir/Observation", OBSERVATION, FHIR), server), concurrency=16, seconds=secs)
            base_create = run("baseline POST docs/Observation", "127.0.0.1", baseline.port,
                              lambda n: ("POST", "/docs/Observation", OBSERVATION, FHIR), concurrency=16, seconds=secs)
            report("durable create, 16 concurrent clients (acknowledged after the commit is on disk)", create, base_create)
        finally:
            server.stop()
            baseline.stop()


if __name__ == "__main__":
    main()
