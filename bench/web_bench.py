"""The clinician pages, timed: seeding the demo group, a 24-bed ward census, a chart with a year of results.

Seeds the default demo group (3 hospitals x 6 wards x 24 beds) into a scratch SQLite
store, gives one inpatient a year of daily lab panels, starts `rebond serve`, signs in
as the demo nurse and requests each page repeatedly, one at a time. It reports the
server-side time (the Server-Timing header: from the request to the finished page) and
the time seen by the client. The baseline, in the same run, is the same HTML bytes
served by bench/baseline_server.py (same Starlette + uvicorn stack, one SQLite read,
no clinical work), so each figure is also a ratio: what building the page costs.

    .venv/bin/python bench/web_bench.py [--requests 200]
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import time

import httpx
from common import ROOT, SCRATCH, database, machine, percentile

from rebond.clinical.census import group_wards, ward_census
from rebond.security.accounts import Accounts
from rebond.seed.demo import add_result_history, demo_accounts, seed_demo
from rebond.store import open_store
from tests.pg_harness import free_port
from tests.server import RebondServer
from tests.web_client import signed_in


def timed(client: httpx.Client, path: str, count: int) -> tuple[list[float], list[float], bytes]:
    server_ms, client_ms = [], []
    body = b""
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path)
        client_ms.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code)
        timing = response.headers.get("server-timing", "app;dur=0")
        server_ms.append(float(timing.split("dur=")[1]))
        body = response.content
    return server_ms, client_ms, body


def baseline(pages: dict[str, bytes], count: int) -> dict[str, list[float]]:
    """The same bytes from the baseline server: one document read, no clinical work."""
    from baseline_server import open_docs

    url = f"sqlite:///{SCRATCH}/web-baseline.db"
    (SCRATCH / "web-baseline.db").unlink(missing_ok=True)
    docs = open_docs(url)
    for name, body in pages.items():
        docs.put("page", name, body)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "baseline_server.py"), url, str(port)])
    out: dict[str, list[float]] = {}
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/docs/page/none", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for name in pages:
                out[name] = timed_plain(client, f"/docs/page/{name}", count)
    finally:
        proc.terminate()
        proc.wait()
    return out


def timed_plain(client: httpx.Client, path: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        assert client.get(path).status_code == 200
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with database("sqlite", "web") as url:
        store = open_store(url, site_id="seed")
        started = time.perf_counter()
        report = seed_demo(store)
        seed_seconds = time.perf_counter() - started
        demo_accounts(Accounts(store), report)
        now = dt.datetime.now(dt.UTC)
        ward = group_wards(store)[0].wards[0][0]
        census = ward_census(store, ward.id, now)
        patient = next(b.patient for b in census.beds if b.patient is not None)
        assert patient is not None
        started = time.perf_counter()
        history = add_result_history(store, patient.id, days=365)
        history_seconds = time.perf_counter() - started
        store.optimize()
        store.close()
        print(f"seed --demo (default size): {report.resources} resources in {seed_seconds:.1f} s (target < 60 s)")
        print(f"a year of results for one patient: {history} resources in {history_seconds:.1f} s")

        server = RebondServer(url).start()
        try:
            nurse = signed_in(server.base, "nurse")
            pages = {"census": f"/wards/{ward.id}", "chart": f"/patients/{patient.id}"}
            bodies: dict[str, bytes] = {}
            results = {}
            first: dict[str, float] = {}
            for name, path in pages.items():
                warm_up, _, _ = timed(nurse, path, 10)  # the first opening after a start parses every result once
                first[name] = warm_up[0]
                server_ms, client_ms, bodies[name] = timed(nurse, path, args.requests)
                results[name] = (server_ms, client_ms)
        finally:
            server.stop()
    base = baseline(bodies, args.requests)
    print(f"\n{'page':<8} {'first':>8} {'server p50':>11} {'server p95':>11} {'client p95':>11} {'baseline p95':>13} {'ratio':>6}  size")
    for name, (server_ms, client_ms) in results.items():
        b95 = percentile(base[name], 95)
        c95 = percentile(client_ms, 95)
        print(f"{name:<8} {first[name]:>6.0f}ms {statistics.median(server_ms):>9.1f}ms {percentile(server_ms, 95):>9.1f}ms {c95:>9.1f}ms"
              f" {b95:>11.1f}ms {c95 / b95:>6.1f}  {len(bodies[name]) / 1024:.0f} KiB")
    print(f"(target: 24-bed census and a chart with a year of results, server p95 < 150 ms; {args.requests} requests each)")


if __name__ == "__main__":
    main()
