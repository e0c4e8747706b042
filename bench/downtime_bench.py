"""Downtime packs, timed: one 24-bed ward, every ward of the default demo group, and the clinical pages while packs are made.

Seeds the default demo group (3 hospitals x 6 wards x 24 beds) into a scratch SQLite store.
1. The fullest ward's pack, made in process several times: gathering the data, then laying
   out the PDF. Baseline in the same run: the same data written as a plain JSON file with
   fsync (no layout), so the figure is also a ratio: what the PDF costs over the bare data.
2. Every ward, the way the server's schedule does it: `python -m rebond.downtime.regenerate`.
3. The census and chart pages' p95 (server-side, Server-Timing) while nothing else runs, then
   while packs are regenerated back to back beside the server, as a schedule would at worst.

    .venv/bin/python bench/downtime_bench.py [--repeat 5] [--requests 150]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import threading
import time

import orjson
from common import SCRATCH, database, machine, percentile
from web_bench import timed

from rebond.clinical.census import group_wards, ward_census
from rebond.downtime.pack import Source, ward_pack
from rebond.downtime.render import render_pdf
from rebond.security.accounts import Accounts
from rebond.seed.demo import demo_accounts, seed_demo
from rebond.store import open_store
from rebond.web.i18n import translator
from tests.server import RebondServer
from tests.web_client import signed_in


def one_ward(url: str, ward_id: str, repeat: int) -> tuple[list[float], list[float], list[float], int]:
    """(data seconds, PDF seconds, baseline seconds) per run, and the pack's size in pages."""
    store = open_store(url, site_id="bench")
    data_s, pdf_s, base_s = [], [], []
    pages = 0
    try:
        for n in range(repeat + 1):
            now = dt.datetime.now(dt.UTC)
            started = time.perf_counter()
            pack = ward_pack(store, ward_id, now, translator("fr"), Source("central", "central", now))
            gathered = time.perf_counter()
            pdf = render_pdf(pack.data)
            laid_out = time.perf_counter()
            with open(SCRATCH / "downtime-baseline.json", "wb") as f:
                f.write(orjson.dumps(pack.data))
                f.flush()
                os.fsync(f.fileno())
            written = time.perf_counter()
            if n == 0:  # the first run loads the fonts and the template: reported apart
                print(f"first pack after start: {laid_out - started:.2f} s")
                continue
            data_s.append(gathered - started)
            pdf_s.append(laid_out - gathered)
            base_s.append(written - laid_out + (gathered - started))
            pages = pdf.count(b"/Type/Page") - pdf.count(b"/Type/Pages")
    finally:
        store.close()
    return data_s, pdf_s, base_s, pages


def all_wards(url: str, folder: str) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rebond.downtime.regenerate", "--db", url, "--dir", folder, "--keep", "2"],
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - started, orjson.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=150)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with database("sqlite", "downtime") as url:
        store = open_store(url, site_id="seed")
        report = seed_demo(store)
        demo_accounts(Accounts(store), report)
        store.optimize()
        now = dt.datetime.now(dt.UTC)
        wards = [ward for h in group_wards(store) for ward, _n in h.wards]
        fullest = max(wards, key=lambda w: sum(1 for b in ward_census(store, w.id, now).beds if b.patient is not None))
        census = ward_census(store, fullest.id, now)
        beds = len(census.beds)
        patient = next(b.patient for b in census.beds if b.patient is not None)
        assert patient is not None
        inpatients = sum(1 for b in census.beds if b.patient is not None)
        store.close()

        data_s, pdf_s, base_s, pages = one_ward(url, fullest.id, args.repeat)
        folder = str(SCRATCH / "downtime-packs")
        every_s, outcome = all_wards(url, folder)

        server = RebondServer(url, "--downtime-every", "0").start()
        pages_ms: dict[str, tuple[list[float], list[float]]] = {}
        regenerations = [0]
        try:
            nurse = signed_in(server.base, "nurse")
            paths = {"census": f"/wards/{fullest.id}", "chart": f"/patients/{patient.id}"}
            for path in paths.values():
                timed(nurse, path, 10)
            quiet = {name: timed(nurse, path, args.requests)[0] for name, path in paths.items()}
            stop = threading.Event()

            def regenerate_back_to_back() -> None:
                while not stop.is_set():
                    all_wards(url, folder)
                    regenerations[0] += 1

            worker = threading.Thread(target=regenerate_back_to_back)
            worker.start()
            time.sleep(3)  # the child is past its start-up and laying out packs
            try:
                busy = {name: timed(nurse, path, args.requests)[0] for name, path in paths.items()}
            finally:
                stop.set()
                worker.join()
            pages_ms = {name: (quiet[name], busy[name]) for name in paths}
        finally:
            server.stop()

    total = [d + p for d, p in zip(data_s, pdf_s, strict=True)]
    print(f"\none ward: {beds} beds, {inpatients} inpatients, {pages} pages ({args.repeat} runs)")
    print(f"{'':<22} {'median':>8} {'max':>8}")
    print(f"{'gather the data':<22} {statistics.median(data_s):>7.2f}s {max(data_s):>7.2f}s")
    print(f"{'lay out the PDF':<22} {statistics.median(pdf_s):>7.2f}s {max(pdf_s):>7.2f}s")
    print(f"{'pack (both)':<22} {statistics.median(total):>7.2f}s {max(total):>7.2f}s   (target <= 2 s)")
    print(f"{'baseline: data + JSON':<22} {statistics.median(base_s):>7.2f}s {max(base_s):>7.2f}s   "
          f"ratio {statistics.median(total) / statistics.median(base_s):.2f}")
    print(f"\nevery ward ({len(wards)}): {every_s:.1f} s, {outcome}   (target <= 60 s)")
    print(f"\n{'page':<8} {'p95 quiet':>10} {'p95 during packs':>17} {'change':>8}   ({args.requests} requests each, "
          f"{regenerations[0]} rounds of packs ran meanwhile)")
    for name, (quiet_ms, busy_ms) in pages_ms.items():
        q, b = percentile(quiet_ms, 95), percentile(busy_ms, 95)
        print(f"{name:<8} {q:>8.1f}ms {b:>15.1f}ms {(b / q - 1) * 100:>+7.0f}%")
    print("(target: no more than +10 % on the clinical pages' p95 while packs are made)")


if __name__ == "__main__":
    main()
