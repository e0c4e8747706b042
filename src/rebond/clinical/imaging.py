"""Images stay in the PACS, Orthanc; Rebond links each ImagingStudy to them by its Study Instance UID.

The ImagingStudy carries the UID as an identifier (`urn:dicom:uid`, `urn:oid:1.2.…`), as the radiology system
sends it. Opening the images asks Orthanc which of its studies has that UID (`POST /tools/lookup`) and leads
to Orthanc's viewer for it. Orthanc keeps the pixels; Rebond keeps the report and the link.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from rebond.clinical.records import read, ref_id
from rebond.store.base import NotFound, Store

DICOM_UID_SYSTEM = "urn:dicom:uid"
#: seconds: how long the PACS's answer to "are you there" is kept for the status page
REACHABLE_KEPT_SECONDS = 10.0


class PacsUnavailable(Exception):
    """Orthanc did not answer: the images cannot be opened now (the report can still be read)."""


def study_uid(study: dict[str, Any]) -> str | None:
    """The Study Instance UID of an ImagingStudy (`urn:oid:` taken off), or None."""
    for identifier in study.get("identifier") or ():
        value = str(identifier.get("value") or "")
        if identifier.get("system") == DICOM_UID_SYSTEM and value:
            return value.removeprefix("urn:oid:")
    return None


class Orthanc:
    """An Orthanc server's REST API. Credentials in the URL (`http://user:password@pacs:8042`) are Rebond's to send:
    they are kept apart, never shown on the status page nor given to a browser in the viewer's link."""

    def __init__(self, url: str, *, timeout: float = 3.0) -> None:
        parsed = httpx.URL(url.rstrip("/"))
        self.auth = (parsed.username, parsed.password) if parsed.username else None
        self.base = str(parsed.copy_with(username=None, password=None))
        self.timeout = timeout
        self._lock = threading.Lock()
        self._seen: tuple[float, str | None] | None = None  # (when, problem) of the last "are you there"

    def viewer(self, orthanc_id: str) -> str:
        """Orthanc's own viewer of one of its studies."""
        return f"{self.base}/app/explorer.html#study?uuid={orthanc_id}"

    def find_study(self, uid: str) -> str | None:
        """Orthanc's id of the study with this Study Instance UID; None when it does not hold it."""
        try:
            response = httpx.post(f"{self.base}/tools/lookup", content=uid, timeout=self.timeout, auth=self.auth)
            response.raise_for_status()
            found = response.json()
        except (httpx.HTTPError, ValueError) as err:
            raise PacsUnavailable(f"Orthanc at {self.base} did not answer: {type(err).__name__}") from err
        return next((str(item["ID"]) for item in found if isinstance(item, dict) and item.get("Type") == "Study"), None)

    def status(self) -> dict[str, Any]:
        """For `/status`: the PACS, and whether it answered (asked at most every 10 s)."""
        with self._lock:
            seen = self._seen
        if seen is None or time.monotonic() - seen[0] > REACHABLE_KEPT_SECONDS:
            try:
                httpx.get(f"{self.base}/system", timeout=self.timeout, auth=self.auth).raise_for_status()
                problem = None
            except httpx.HTTPError as err:
                problem = f"Orthanc did not answer: {type(err).__name__}"
            seen = (time.monotonic(), problem)
            with self._lock:
                self._seen = seen
        return {"pacs": self.base, "reachable": seen[1] is None, "problem": seen[1]}


def images_of(store: Store, orthanc: Orthanc, patient_id: str, study_id: str) -> str | None:
    """The viewer of an ImagingStudy's images in Orthanc; None when Orthanc does not hold them (or the study names no
    UID). NotFound when the study is not this patient's; PacsUnavailable when Orthanc does not answer."""
    study = read(store, "ImagingStudy", study_id)
    if study is None or ref_id(study.get("subject"), "Patient") != patient_id:
        raise NotFound(f"no ImagingStudy/{study_id} of Patient/{patient_id}")
    uid = study_uid(study)
    found = orthanc.find_study(uid) if uid else None
    return orthanc.viewer(found) if found else None
