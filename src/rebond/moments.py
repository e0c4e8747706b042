"""Instants as the status of a node gives them: UTC, to the second (`2026-11-23T10:48:02Z`)."""
from __future__ import annotations

import datetime as dt


def utc_second(epoch: float | None) -> str | None:
    """`epoch` (seconds) as `YYYY-MM-DDTHH:MM:SSZ`; None for None."""
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
