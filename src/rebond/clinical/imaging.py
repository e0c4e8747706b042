"""Images stay in the PACS, Orthanc; Rebond links each ImagingStudy to them by its Study Instance UID.

The ImagingStudy carries the UID as an identifier (`urn:dicom:uid`, `urn:oid:1.2.…`), as the radiology system
sends it. Opening the images asks Orthanc which of its studies has that UID (`POST /tools/lookup`) and leads
to Orthanc's viewer for it. Orthanc keeps the pixels; Rebond keeps the report and the link.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from starlette.concurrency import run_in_threadpool

from rebond.background import BackgroundLoop
from rebond.clinical.conventions import GROUP_IPP_SYSTEM, HOSPITAL_TZ
from rebond.clinical.records import read, ref_id
from rebond.fhir import operations
from rebond.fhir.search import literal, parse_search
from rebond.moments import utc_second
from rebond.store.base import NotFound, Session, Store, StoreError

log = logging.getLogger("rebond.imaging")
DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
#: this node's state: where it stands in Orthanc's change feed
IMAGING_STATE = "imaging"
#: changes read from Orthanc at a time
CHANGES_PAGE = 100
#: days a study naming no known patient is tried again, each round, before it is left to IT
WAITING_DAYS = 7
#: a DICOM UID: digits and dots, 64 characters at most
_UID = re.compile(r"[0-9][0-9.]{0,63}")
#: seconds: how long the PACS's answer to "are you there" is kept for the status page
REACHABLE_KEPT_SECONDS = 10.0
#: where Orthanc's DICOMweb plugin answers (Debian's orthanc-dicomweb)
DICOMWEB_ROOT = "/dicom-web"


class PacsUnavailable(Exception):
    """Orthanc did not answer: the images cannot be opened now (the report can still be read)."""


def study_of_uid(store: Store, uid: str) -> dict[str, Any] | None:
    """The ImagingStudy with this Study Instance UID (written with or without `urn:oid:`), if this node holds one."""
    if not _UID.fullmatch(uid):
        return None
    query = parse_search("ImagingStudy", [("identifier", f"{DICOM_UID_SYSTEM}|{literal('urn:oid:' + uid)},{DICOM_UID_SYSTEM}|{literal(uid)}")])
    found = store.search(query).matches
    return orjson.loads(found[0].body) if found and found[0].body else None


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

    def get(self, path: str) -> Any:
        """A GET of the REST API, as JSON; PacsUnavailable when Orthanc does not answer."""
        return self._call("GET", path)

    def _call(self, method: str, path: str, body: str | None = None) -> Any:
        try:
            response = httpx.request(method, f"{self.base}{path}", content=body, timeout=self.timeout, auth=self.auth)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as err:
            raise PacsUnavailable(f"Orthanc at {self.base} did not answer: {type(err).__name__}") from err

    async def dicomweb(self, path: str, query: str, accept: str | None) -> tuple[httpx.Response, httpx.AsyncClient]:
        """A DICOMweb GET on the PACS (`/studies/{uid}…`: WADO-RS), its answer streamed: (answer, client to close after
        reading it); PacsUnavailable when Orthanc does not answer."""
        client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, read=60.0), auth=self.auth)
        request = client.build_request("GET", f"{self.base}{DICOMWEB_ROOT}{path}" + (f"?{query}" if query else ""),
                                       headers={"Accept": accept} if accept else {})
        try:
            return await client.send(request, stream=True), client
        except httpx.HTTPError as err:
            await client.aclose()
            raise PacsUnavailable(f"Orthanc at {self.base} did not answer: {type(err).__name__}") from err

    def study(self, orthanc_id: str) -> DicomStudy | None:
        """One of its studies, with its series; None when it has gone since (deleted) or names no UID."""
        try:
            found = self.get(f"/studies/{orthanc_id}")
        except PacsUnavailable as err:
            if isinstance(err.__cause__, httpx.HTTPStatusError) and err.__cause__.response.status_code == 404:
                return None
            raise
        tags, patient = found.get("MainDicomTags") or {}, found.get("PatientMainDicomTags") or {}
        if not _UID.fullmatch(str(tags.get("StudyInstanceUID", ""))):
            log.warning("a study in the PACS has no valid Study Instance UID: not linked (Orthanc id %s)", orthanc_id)
            return None
        series = [(str((s.get("MainDicomTags") or {}).get("Modality", "")), len(s.get("Instances") or ()))
                  for s in self.get(f"/studies/{orthanc_id}/series")]
        return DicomStudy(orthanc_id, str(tags["StudyInstanceUID"]), str(patient.get("PatientID", "")),
                          str(tags.get("StudyDescription", "")), _dicom_instant(str(tags.get("StudyDate", "")),
                                                                               str(tags.get("StudyTime", ""))), series)

    def find_study(self, uid: str) -> str | None:
        """Orthanc's id of the study with this Study Instance UID; None when it does not hold it."""
        found = self._call("POST", "/tools/lookup", uid)
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


@dataclass(frozen=True)
class DicomStudy:
    """What Orthanc says of one of its studies."""

    orthanc_id: str
    uid: str
    patient_number: str  # DICOM PatientID: the IPP, as the modality worklist gave it
    description: str
    started: str | None  # FHIR dateTime, from StudyDate and StudyTime
    series: list[tuple[str, int]]  # (modality, instances) of each series


def _dicom_instant(date: str, time_of_day: str) -> str | None:
    """StudyDate (YYYYMMDD) and StudyTime (HHMMSS.frac) as a FHIR dateTime in the hospital's time zone, or None."""
    try:
        day = dt.datetime.strptime(date[:8], "%Y%m%d")
    except ValueError:
        return None
    digits = "".join(c for c in time_of_day.split(".")[0] if c.isdigit()).ljust(6, "0")[:6]
    try:
        moment = day.replace(hour=int(digits[:2]), minute=int(digits[2:4]), second=int(digits[4:6]))
    except ValueError:
        moment = day
    return moment.replace(tzinfo=HOSPITAL_TZ).isoformat()


class StudyFollower(BackgroundLoop):
    """Follows Orthanc's change feed (`/changes`): each study that has become stable (Orthanc's StableStudy, no new
    image for a while) gets its ImagingStudy in Rebond. An ImagingStudy of the same Study Instance UID (the radiology
    system's) is completed with the series and image counts; otherwise one is made for the patient whose IPP is the
    study's PatientID. A study whose PatientID is no known IPP is not guessed: it waits, tried again each round for a
    week (the patient may be registered after the images), and IT sees it on the status page meanwhile.

    The cursor in Orthanc's feed is kept in this node's state, in the same transaction as what a page of changes made:
    a restart resumes where it stopped, and a page applied twice changes nothing (the ImagingStudy is found by UID)."""

    def __init__(self, store: Store, orthanc: Orthanc, *, interval: float = 5.0) -> None:
        self.store = store
        self.orthanc = orthanc
        self.interval = interval
        # one process over this store follows (`rebond serve --workers N`, central servers behind HAProxy): it holds the
        # lease and renews it each round; another takes over when it has not for three rounds
        self.me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.following = False
        self.linked = 0  # since the start
        self.unmatched = 0  # studies waiting for a known patient, now (read at the first round)
        self.problem: str | None = None
        self.last_at: float | None = None

    def follow_once(self) -> bool:
        """One page of Orthanc's changes; True when there was nothing more to read."""
        since = int(self.store.get_state(IMAGING_STATE, "orthanc-changes") or 0)
        page = self.orthanc.get(f"/changes?since={since}&limit={CHANGES_PAGE}")
        studies = [self.orthanc.study(str(c["ID"])) for c in page.get("Changes") or ()
                   if c.get("ChangeType") == "StableStudy" and c.get("ResourceType") == "Study"]
        waiting = dict(self.store.get_state(IMAGING_STATE, "waiting") or {})

        def keep(tx: Session) -> int:
            linked = 0
            for study in studies:
                if study is not None and link_study(tx, study):
                    linked += 1
                    waiting.pop(study.orthanc_id, None)
                elif study is not None:
                    waiting.setdefault(study.orthanc_id, time.time())
            tx.put_state(IMAGING_STATE, "waiting", waiting)
            tx.put_state(IMAGING_STATE, "orthanc-changes", int(page.get("Last") or since))
            return linked

        self._linked(self.store.write(keep), waiting)
        return bool(page.get("Done", True))

    def retry_waiting(self) -> None:
        """The studies that named no known patient, tried again (the patient may have been registered since: a trauma
        CT before the admission); after WAITING_DAYS they are left to IT, with a log line."""
        waiting = dict(self.store.get_state(IMAGING_STATE, "waiting") or {})
        if not waiting:
            return
        studies = {orthanc_id: self.orthanc.study(orthanc_id) for orthanc_id in waiting}

        def keep(tx: Session) -> int:
            linked = 0
            for orthanc_id, study in studies.items():
                if study is None or link_study(tx, study):  # gone from the PACS, or linked now
                    linked += study is not None
                    waiting.pop(orthanc_id)
                elif time.time() - waiting[orthanc_id] > WAITING_DAYS * 86_400:
                    log.warning("a study from the PACS named no known patient for %d days: left to IT (Orthanc id %s)",
                                WAITING_DAYS, orthanc_id)
                    waiting.pop(orthanc_id)
            tx.put_state(IMAGING_STATE, "waiting", waiting)
            return linked

        self._linked(self.store.write(keep), waiting)

    def _linked(self, linked: int, waiting: dict[str, float]) -> None:
        self.linked += linked
        if len(waiting) > self.unmatched:
            log.warning("%d studies from the PACS name no known patient (PatientID is no IPP here): not linked yet", len(waiting))
        self.unmatched = len(waiting)
        self.problem, self.last_at = None, time.time()

    async def stop(self) -> None:
        await super().stop()
        if self.following:  # another process may take over at once
            with contextlib.suppress(StoreError):
                await run_in_threadpool(self.store.write, lambda tx: tx.lease(IMAGING_STATE, "follower", self.me, 0))
            self.following = False

    def hold(self) -> bool:
        """Hold (or renew) the lease of following this PACS; False while another process follows it."""
        held = self.store.write(lambda tx: tx.lease(IMAGING_STATE, "follower", self.me, self.interval * 3))
        if held != self.following:
            log.info("this process %s the PACS's new studies", "follows" if held else "no longer follows (another does)")
        self.following = held
        return held

    async def run(self) -> None:
        while True:
            try:
                if await run_in_threadpool(self.hold):
                    while not await run_in_threadpool(self.follow_once):
                        pass
                    await run_in_threadpool(self.retry_waiting)
            except (PacsUnavailable, StoreError) as err:
                if self.problem is None:
                    log.warning("the PACS's new studies are not followed now: %s", err)
                self.problem = str(err)
            except Exception:
                log.exception("following the PACS's new studies failed")
                self.problem = "internal error (see the server's log)"
            await asyncio.sleep(self.interval)

    def status(self) -> dict[str, Any]:
        return {"up_to": self.store.get_state(IMAGING_STATE, "orthanc-changes"), "linked": self.linked,
                "unmatched": len(self.store.get_state(IMAGING_STATE, "waiting") or {}),  # whichever process follows
                "last_at": utc_second(self.last_at), "problem": self.problem, "this_process": self.following}


def link_study(tx: Session, study: DicomStudy) -> bool:
    """The ImagingStudy of a study in the PACS, completed or made; False when its PatientID is no known IPP."""
    counts = {"numberOfSeries": len(study.series), "numberOfInstances": sum(n for _m, n in study.series)}
    modalities = sorted({m for m, _n in study.series if m})
    coded = [{"system": DCM_SYSTEM, "code": m} for m in modalities]
    by_uid = f"{DICOM_UID_SYSTEM}|urn:oid:{study.uid}"
    tx.lock(f"ImagingStudy?identifier={by_uid}")  # two followers (server processes) at once: the second finds the first's
    found = tx.search_ids(parse_search("ImagingStudy", [("identifier", by_uid)]))
    if found:
        current = tx.read("ImagingStudy", found[0])
        assert current is not None and current.body is not None
        kept = {k: v for k, v in orjson.loads(current.body).items() if k != "meta"}
        completed = {**kept, **counts, **({"modality": coded} if coded else {})}
        operations.update(tx, "ImagingStudy", found[0], completed)
        return True
    number = study.patient_number
    if not number:
        return False
    patients = tx.search_ids(parse_search("Patient", [("identifier", f"{GROUP_IPP_SYSTEM}|{literal(number)}")]))
    if len(patients) != 1:  # none, or (a merge not done yet) two: not guessed
        return False
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy", "status": "available", "subject": {"reference": f"Patient/{patients[0]}"},
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.uid}"}], **counts,
        **({"modality": coded} if coded else {}), **({"started": study.started} if study.started else {}),
        **({"description": study.description} if study.description else {})}
    operations.create(tx, "ImagingStudy", resource)
    return True
