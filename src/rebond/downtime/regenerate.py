"""One round of downtime packs, run by the scheduler as a child process at low priority.

    REBOND_DB=URL python -m rebond.downtime.regenerate --site-id ID --dir DIR --keep N --lang fr --source JSON

Prints one JSON line: {"written": n, "failed": n, "seconds": s}; exits 1 when no pack could be made.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import orjson

from rebond.downtime.library import PackLibrary, regenerate
from rebond.downtime.pack import source_from
from rebond.store import open_store
from rebond.web.i18n import translator


def _background() -> None:
    """Run only on a core nothing else wants: the clinical pages come first (SCHED_IDLE on Linux, else the lowest nice)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rebond.downtime.regenerate")
    parser.add_argument("--db", default=os.environ.get("REBOND_DB"), help="or REBOND_DB in the environment")
    parser.add_argument("--site-id", default="central")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--keep", type=int, default=6)
    parser.add_argument("--lang", default="fr")
    parser.add_argument("--source", default="{}")
    args = parser.parse_args(argv)
    if not args.db:
        parser.error("--db URL or REBOND_DB is needed")
    _background()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    started = time.monotonic()
    store = open_store(args.db, site_id=args.site_id)
    try:
        written, failed = regenerate(store, PackLibrary(Path(args.dir), args.keep), source_from(orjson.loads(args.source)),
                                     translator(args.lang))
    finally:
        store.close()
    print(orjson.dumps({"written": written, "failed": failed, "seconds": round(time.monotonic() - started, 2)}).decode())
    return 0 if written or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
