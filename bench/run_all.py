"""Every benchmark, one after the other: `make bench` (SQLite) or `python bench/run_all.py --engine postgres`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    args = sys.argv[1:]
    for script in ("import_bench.py", "http_bench.py"):
        print(f"== {script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
    if "postgres" not in args:  # the clinical pages are measured on the embedded store, as on a site node
        for script in ("web_bench.py", "hl7_bench.py", "site_bench.py", "downtime_bench.py"):
            print(f"== {script}", flush=True)
            subprocess.run([sys.executable, str(HERE / script)], check=True)


if __name__ == "__main__":
    main()
