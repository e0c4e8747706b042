"""`rebond import`: load FHIR Bundles and NDJSON files into a store or a running server.

Re-importing the same files creates no duplicates: a POST entry whose resource
carries its own id under a `urn:uuid:` fullUrl (as Synthea and bulk exports write
them) is loaded as a PUT to that id, and an update that changes nothing makes no
new version.
"""
from __future__ import annotations

import bz2
import gzip
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from rebond.fhir.bundles import process_batch, process_transaction
from rebond.fhir.errors import FhirError
from rebond.store.base import Store, StoreError

NDJSON_CHUNK = 500
SUFFIXES = (".json", ".json.bz2", ".json.gz", ".ndjson", ".ndjson.bz2", ".ndjson.gz")


@dataclass
class FileReport:
    path: str
    loaded: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)

    def fail(self, count: int, reason: str) -> None:
        self.failed += count
        if len(self.reasons) < 20:
            self.reasons.append(reason)


class Target(Protocol):
    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]: ...
    def batch(self, bundle: dict[str, Any]) -> dict[str, Any]: ...


class StoreTarget:
    """Straight into a store, through the same Bundle processing as the REST API."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        return process_transaction(self.store, bundle, "urn:rebond:import")

    def batch(self, bundle: dict[str, Any]) -> dict[str, Any]:
        return process_batch(self.store, bundle, "urn:rebond:import")


class ServerTarget:
    """Through a running server's FHIR API."""

    def __init__(self, base_url: str, timeout: float = 300.0) -> None:
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def _post(self, bundle: dict[str, Any]) -> dict[str, Any]:
        resp = self.client.post("", content=orjson.dumps(bundle), headers={"Content-Type": "application/fhir+json"})
        body = resp.json() if resp.content else {}
        if resp.status_code >= 400:
            raise FhirError(resp.status_code, _outcome_text(body) or f"HTTP {resp.status_code}")
        return body  # type: ignore[no-any-return]

    transaction = _post
    batch = _post


def _outcome_text(outcome: Any) -> str:
    if isinstance(outcome, dict):
        return "; ".join(str(i.get("diagnostics", "")) for i in outcome.get("issue", []) if isinstance(i, dict))
    return ""


def expand(paths: list[str]) -> list[Path]:
    """Files named, and the importable files of folders named (sorted, so `0-*` batches come first)."""
    out: list[Path] = []
    for name in paths:
        p = Path(name)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.name.endswith(SUFFIXES)))
        else:
            out.append(p)
    return out


def read_text(path: Path) -> bytes:
    if path.name.endswith(".bz2"):
        return bz2.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def idempotent_entries(bundle: dict[str, Any]) -> dict[str, Any]:
    """POSTs of resources that carry their own id become PUTs to it, so loading twice creates nothing twice."""
    for entry in bundle.get("entry", []) or []:
        if not isinstance(entry, dict):
            continue
        req = entry.get("request")
        res = entry.get("resource")
        if not isinstance(req, dict) or not isinstance(res, dict) or req.get("method") != "POST" or req.get("ifNoneExist"):
            continue
        rid = res.get("id")
        if isinstance(rid, str) and rid and isinstance(res.get("resourceType"), str):
            entry["request"] = {"method": "PUT", "url": f"{res['resourceType']}/{rid}"}
    return bundle


def _ndjson_chunks(data: bytes, report: FileReport) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            resource = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            report.fail(1, f"line {number}: not JSON ({err})")
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            report.fail(1, f"line {number}: not a resource")
            continue
        chunk.append(resource)
        if len(chunk) >= NDJSON_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _entry_for(resource: dict[str, Any]) -> dict[str, Any]:
    rid = resource.get("id")
    if isinstance(rid, str) and rid:
        return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{rid}"}}
    return {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}


def _count_batch(response: dict[str, Any], report: FileReport) -> None:
    for i, entry in enumerate(response.get("entry", [])):
        status = str(entry.get("response", {}).get("status", ""))
        if status[:1] == "2":
            report.loaded += 1
        else:
            report.fail(1, f"entry {i}: {status} {_outcome_text(entry.get('response', {}).get('outcome'))}")


def import_file(path: Path, target: Target) -> FileReport:
    report = FileReport(str(path))
    try:
        data = read_text(path)
    except OSError as err:
        report.fail(1, f"cannot read: {err}")
        return report
    if ".ndjson" in path.name:
        for chunk in _ndjson_chunks(data, report):
            response = target.batch({"resourceType": "Bundle", "type": "batch", "entry": [_entry_for(r) for r in chunk]})
            _count_batch(response, report)
        return report
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        report.fail(1, f"not JSON: {err}")
        return report
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        if isinstance(document, dict) and isinstance(document.get("resourceType"), str):
            _count_batch(target.batch({"resourceType": "Bundle", "type": "batch", "entry": [_entry_for(document)]}), report)
        else:
            report.fail(1, "not a FHIR resource or Bundle")
        return report
    kind = document.get("type")
    entries = len(document.get("entry", []) or [])
    bundle = idempotent_entries(document)
    if kind == "transaction":
        try:
            target.transaction(bundle)
            report.loaded += entries
        except (FhirError, StoreError) as err:
            report.fail(entries, f"transaction rolled back: {err}")
    elif kind == "batch":
        _count_batch(target.batch(bundle), report)
    elif kind == "collection":
        as_batch = {"resourceType": "Bundle", "type": "batch",
                    "entry": [_entry_for(e["resource"]) for e in bundle.get("entry", []) if isinstance(e, dict) and "resource" in e]}
        _count_batch(target.batch(as_batch), report)
    else:
        report.fail(entries, f"a Bundle of type '{kind}' cannot be imported")
    return report
