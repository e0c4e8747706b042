"""Nothing is acknowledged before it is durable: a server killed with SIGKILL in the middle of a stream
of writes comes back with every write it acknowledged."""
from __future__ import annotations

import threading
import time

import httpx

from tests.server import RebondServer

FHIR = {"Content-Type": "application/fhir+json"}


def test_every_acknowledged_create_survives_a_kill_9(engine_url: str) -> None:
    server = RebondServer(engine_url).start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def write(worker: int) -> None:
        with server.client(timeout=5) as client:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"resourceType": "Observation", "status": "final", "code": {"text": f"pouls {worker}-{n}"},
                        "valueQuantity": {"value": 60 + n % 40, "unit": "/min"}}
                try:
                    resp = client.post("/Observation", json=body, headers=FHIR)
                except httpx.HTTPError:
                    return  # the server is gone: this write was never acknowledged
                if resp.status_code == 201:
                    with lock:
                        acknowledged.append(resp.json()["id"])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    time.sleep(3)
    server.kill()  # SIGKILL, mid-stream
    stop.set()
    for t in threads:
        t.join()
    assert len(acknowledged) > 100

    restarted = RebondServer(engine_url).start()
    try:
        with restarted.client(timeout=10) as client:
            missing = [rid for rid in acknowledged if client.get(f"/Observation/{rid}").status_code != 200]
            total = client.get("/Observation?_summary=count").json()["total"]
        assert missing == []
        assert total >= len(acknowledged)
    finally:
        restarted.stop()
