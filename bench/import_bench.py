"""Synthea import: `rebond import` against the same documents written straight into the engine.

Run: .venv/bin/python bench/import_bench.py [--engine sqlite|postgres]
The baseline parses the same files and inserts each resource's JSON into a plain
(type, id, body) table, one transaction per file, with the same durability: no
validation, no reference resolution, no versions, no search index.
"""
from __future__ import annotations

import argparse
import bz2
import subprocess
import sys
import time

import orjson
from common import SYNTHEA, database, machine


def baseline(url: str) -> tuple[int, float]:
    files = sorted(SYNTHEA.glob("*.json.bz2"))
    started = time.perf_counter()
    count = 0
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE docs (type TEXT, id TEXT, body BLOB, PRIMARY KEY (type, id))")
        for path in files:
            rows = [(e["resource"]["resourceType"], e["resource"]["id"], orjson.dumps(e["resource"]))
                    for e in orjson.loads(bz2.decompress(path.read_bytes()))["entry"]]
            conn.execute("BEGIN")
            conn.executemany("INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")
            count += len(rows)
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE docs (type TEXT, id TEXT, body BYTEA, PRIMARY KEY (type, id))")
            for path in files:
                rows = [(e["resource"]["resourceType"], e["resource"]["id"], orjson.dumps(e["resource"]))
                        for e in orjson.loads(bz2.decompress(path.read_bytes()))["entry"]]
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany("INSERT INTO docs VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", rows)
                count += len(rows)
    return count, time.perf_counter() - started


def rebond_import(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rebond.cli", "import", "--db", url, str(SYNTHEA)],
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    loaded = int(result.stdout.strip().splitlines()[-1].split()[0])
    return loaded, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with database(args.engine, "import_rebond") as url:
        n, secs = rebond_import(url)
    with database(args.engine, "import_baseline") as url:
        bn, bsecs = baseline(url)
    rate, brate = n / secs, bn / bsecs
    print(f"{args.engine} Synthea import (122 bundles, {n} resources)")
    print(f"  rebond import   {secs:7.1f} s  {rate:8.0f} resources/s")
    print(f"  baseline        {bsecs:7.1f} s  {brate:8.0f} resources/s  (plain inserts, same durability)")
    print(f"  ratio           {rate / brate:.2f} of the baseline's rate")


if __name__ == "__main__":
    main()
