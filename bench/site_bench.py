"""Site node figures: replication lag under a steady write load, and journal replay after an outage.

1. A central server (SQLite) and a site node following it, as processes. Writers create
   Observations on the central site at a steady rate (default 200/s) for `--seconds`; a
   sampler takes the newest id every 50 ms and times how long until the site serves it.
2. The site's link is cut (a proxy), `--journal` writes are made at the site (an outage's
   worth), the link is restored, and the time until the journal is empty is measured.
   Baseline in the same run: the same writes PUT straight to the central site by one client,
   so the replay rate is also a ratio.

    .venv/bin/python bench/site_bench.py [--rate 200] [--seconds 30] [--journal 12000]

Volume model for "a 3-hour outage of a 500-bed hospital": per occupied bed and hour, about
1.5 vital-sign observations, 1.5 administrations, 0.3 result acknowledgements, 0.2 notes and
orders (4 writes), plus lab results arriving over HL7 at 0.5 panels per bed and hour (about 8
resources each): 500 x 3 x (4 + 4) = 12,000 journaled writes.
"""
from __future__ import annotations

import argparse
import threading
import time
import uuid

import httpx
from common import database, machine, percentile

from rebond.security.accounts import Accounts
from rebond.store import open_store
from tests.proxy import CuttableLink
from tests.server import RebondServer, SiteServer

FHIR = {"Content-Type": "application/fhir+json"}


def observation(n: int) -> dict[str, object]:
    return {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": "Patient/bench"}, "valueQuantity": {"value": 60 + n % 40, "unit": "/min"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--journal", type=int, default=12_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with database("sqlite", "site-central") as central_url, database("sqlite", "site-h1") as site_url:
        store = open_store(site_url, site_id="H1")
        Accounts(store).save("bench", "not-for-sign-in", "system", "bench")
        site_token = Accounts(store).issue_token("bench")
        store.close()
        central = RebondServer(central_url).start()
        link = CuttableLink(central.port)
        site = SiteServer(site_url, central, "H1", upstream=f"http://127.0.0.1:{link.port}/fhir").start()
        site.token = site_token
        try:
            lags, achieved = replication_lag(central, site, args.rate, args.seconds)
            print(f"\nreplication lag at {achieved:.0f} writes/s on the central site (asked {args.rate:.0f}), {len(lags)} samples:"
                  f" p50 {percentile(lags, 50) * 1000:.0f} ms, p99 {percentile(lags, 99) * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms"
                  "  (target p99 <= 1 s)")
            replay_s, waited_s, replayed_rate = journal_replay(site, link, args.journal)
            print(f"replay of {args.journal} journaled writes: {replay_s:.1f} s from the link's return to an empty journal"
                  f" ({args.journal / replay_s:.0f} writes/s; the replayer itself: {replayed_rate:.0f}/s;"
                  f" {waited_s:.1f} s to notice the return)  (target >= 200/s; <= 300 s for the outage)")
            base = baseline(central, min(args.journal, 3000))
            print(f"baseline: the same writes PUT straight to the central site by one client: {base:.0f} writes/s"
                  f" (replay/baseline = {replayed_rate / base:.2f})")
        finally:
            site.stop()
            link.close()
            central.stop()


def replication_lag(central: RebondServer, site: SiteServer, rate: float, seconds: float) -> tuple[list[float], float]:
    latest: list[str] = []
    started = time.monotonic()
    stop = started + seconds

    def writer(share: float) -> None:
        with httpx.Client(base_url=central.fhir, headers={**FHIR, **central.headers}, timeout=10) as client:
            next_at = time.monotonic()
            n = 0
            while time.monotonic() < stop:
                rid = str(uuid.uuid4())
                client.put(f"/Observation/{rid}", json={**observation(n), "id": rid})
                latest.append(rid)
                n += 1
                next_at += 1 / share
                time.sleep(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=writer, args=(rate / 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    lags: list[float] = []
    with httpx.Client(base_url=site.fhir, headers=site.headers, timeout=5) as client:
        time.sleep(1)
        while time.monotonic() < stop - 1:
            rid = latest[-1]
            written = time.monotonic()
            while client.get(f"/Observation/{rid}").status_code != 200 and time.monotonic() - written < 10:
                time.sleep(0.005)
            lags.append(time.monotonic() - written)
            time.sleep(0.02)
    for t in threads:
        t.join()
    return lags, len(latest) / (time.monotonic() - started)


def journal_replay(site: SiteServer, link: CuttableLink, count: int) -> tuple[float, float, float]:
    link.cut()
    while site.status()["upstream_reachable"]:
        time.sleep(0.05)
    with httpx.Client(base_url=site.fhir, headers={**FHIR, **site.headers}, timeout=30) as client:
        for n in range(count):
            assert client.post("/Observation", json=observation(n)).status_code == 201
    assert site.status()["journal_pending"] == count
    restored = time.monotonic()
    link.restore()
    while not site.status()["upstream_reachable"]:
        time.sleep(0.05)
    waited = time.monotonic() - restored
    while site.status()["journal_pending"]:
        time.sleep(0.1)
    return time.monotonic() - restored, waited, float(site.status()["last_replay_rate"] or 0)  # type: ignore[arg-type]


def baseline(central: RebondServer, count: int) -> float:
    with httpx.Client(base_url=central.fhir, headers={**FHIR, **central.headers}, timeout=30) as client:
        started = time.monotonic()
        for n in range(count):
            rid = str(uuid.uuid4())
            client.put(f"/Observation/{rid}", json={**observation(n), "id": rid})
        return count / (time.monotonic() - started)


if __name__ == "__main__":
    main()
