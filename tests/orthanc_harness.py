"""A real Orthanc for the imaging tests (Debian's `orthanc`; `make test` installs it), on a free port, its storage in
a temporary folder, no plugins, DICOM networking off, one account (HTTP basic): the tests put studies in through its
REST API."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.pg_harness import free_port

#: Debian's orthanc-dicomweb: Orthanc speaks DICOMweb (QIDO-RS, WADO-RS, STOW-RS) under /dicom-web/
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancServer:
    USER, PASSWORD = "rebond", "pacs-secret"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rebond-orthanc-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.auth = (self.USER, self.PASSWORD)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_with_account(self) -> str:
        """What Rebond is given: the account in the URL."""
        return f"http://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}"

    def start(self) -> OrthancServer:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            raise RuntimeError("Orthanc not found: `make test` installs Debian's orthanc")
        config = self.dir / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "rebond-tests", "StorageDirectory": str(self.dir / "storage"), "IndexDirectory": str(self.dir / "index"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.USER: self.PASSWORD}, "StableAge": 1,  # a study is complete 1 s after its last instance
            "Plugins": [DICOMWEB_PLUGIN] if Path(DICOMWEB_PLUGIN).exists() else [], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
        with open(self.dir / "log", "wb") as log:
            self.proc = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/system", timeout=1, auth=self.auth).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not start: {(self.dir / 'log').read_text()[-2000:]}")

    def store_study(self, patient_id: str, study_uid: str, description: str, modality: str = "CT") -> dict[str, Any]:
        """One DICOM instance of a new study, made by Orthanc itself (/tools/create-dicom), as a modality would send it."""
        tags = {"PatientID": patient_id, "PatientName": "TEST^IMAGES", "StudyInstanceUID": study_uid, "Modality": modality,
                "StudyDescription": description}
        response = httpx.post(f"{self.url}/tools/create-dicom", json={"Tags": tags, "Force": True}, timeout=30, auth=self.auth)
        response.raise_for_status()
        return dict(response.json())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
