"""Conflicts between a site's writes and the central site's, for a person to settle.

A conflict keeps both versions: the site's (in its journal) and the central one (fetched when the
replay was refused). Settling it writes the decision as data: keeping the site's version makes it
a new version on the central site (If-Match on the central version the person saw); keeping the
central one leaves the central record as it is. Either way the journal keeps the site's version.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from rebond.clinical.records import Clinician
from rebond.store.base import JournalEntry, Session, Store

Choice = Literal["site", "central"]


@dataclass(frozen=True)
class Conflict:
    seq: int
    resource_type: str
    resource_id: str
    reason: str
    site: dict[str, Any] | None
    site_written: float
    site_author: str
    central: dict[str, Any] | None
    central_updated: float | None
    later: list[int]  # later writes of the same record, made on top of this one


def _author(resource: dict[str, Any] | None) -> str:
    """Who made a version, as the record itself says (performer, recorder, author, owner)."""
    if not resource:
        return ""
    for key in ("performer", "recorder", "author", "owner", "requester", "asserter"):
        value = resource.get(key)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                actor = item.get("actor", item)
                if isinstance(actor, dict) and actor.get("display"):
                    return str(actor["display"])
    return ""


def open_conflicts(store: Store) -> list[Conflict]:
    entries = store.journal("conflict", limit=10_000)
    firsts: dict[tuple[str, str], JournalEntry] = {}
    later: dict[int, list[int]] = {}
    for entry in entries:
        key = (entry.resource_type, entry.resource_id)
        if key in firsts:
            later[firsts[key].seq].append(entry.seq)
        else:
            firsts[key] = entry
            later[entry.seq] = []
    out = []
    for entry in firsts.values():
        detail = orjson.loads(entry.detail or "{}")
        chain = [entry] + [e for e in entries if e.seq in later[entry.seq]]
        latest = chain[-1]
        site = orjson.loads(latest.body) if latest.body else None
        central = detail.get("central")
        updated = ((central or {}).get("meta") or {}).get("lastUpdated")
        out.append(Conflict(entry.seq, entry.resource_type, entry.resource_id, str(detail.get("reason", "")), site, latest.written,
                            _author(site), central, dt.datetime.fromisoformat(updated).timestamp() if updated else None,
                            later[entry.seq]))
    return out


class StillInConflict(Exception):
    """The central record changed again while the person was deciding: look again."""


class CentralUnreachable(Exception):
    """The central site did not answer: nothing was decided; try again when it does."""


def settle(store: Store, upstream: str, token: str, seq: int, keep: Choice, clinician: Clinician) -> None:
    conflict = next((c for c in open_conflicts(store) if c.seq == seq), None)
    if conflict is None:
        raise LookupError(f"no open conflict {seq}")
    headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}"} if token else {}
    detail: dict[str, Any] = {"kept": keep, "by": clinician.display, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if keep == "site":
        url = f"{upstream.rstrip('/')}/{conflict.resource_type}/{conflict.resource_id}"
        try:
            with httpx.Client(timeout=5) as client:
                current = client.get(url, headers=headers)
                if current.status_code >= 500:
                    raise CentralUnreachable(f"it answered {current.status_code}")
                version = current.headers.get("etag", "") if current.status_code == 200 else ""
                if conflict.site is None:
                    response = client.delete(url, headers={**headers, "If-Match": version} if version else headers)
                else:
                    body = {**conflict.site, "id": conflict.resource_id}
                    body.pop("meta", None)
                    response = client.put(url, content=orjson.dumps(body), headers={**headers, "If-Match": version} if version else headers)
        except httpx.HTTPError as err:
            raise CentralUnreachable(type(err).__name__) from err
        if response.status_code >= 500:
            raise CentralUnreachable(f"it answered {response.status_code}")
        if response.status_code == 412:
            raise StillInConflict(f"{conflict.resource_type}/{conflict.resource_id} changed again on the central site")
        if response.status_code >= 300:
            raise StillInConflict(f"the central site refused it ({response.status_code})")
        detail["central_version"] = response.headers.get("etag", "")
    text = orjson.dumps(detail).decode()

    def work(tx: Session) -> None:
        for entry_seq in (conflict.seq, *conflict.later):
            tx.settle_journal(entry_seq, "resolved", text)

    store.write(work)
