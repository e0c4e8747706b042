"""Run `rebond serve` as a real process for integration tests and drills."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.pg_harness import free_port


def rebond(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the `rebond` command as a user would."""
    return subprocess.run([sys.executable, "-m", "rebond.cli", *args], capture_output=True, text=True, timeout=600)


class RebondServer:
    def __init__(self, db: str, *extra: str, site_id: str = "central") -> None:
        self.db = db
        self.port = free_port()
        self.extra = extra
        self.site_id = site_id
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"rebond-serve-{self.port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    @property
    def headers(self) -> dict[str, str]:
        """What an integration sends: its API token."""
        return {"Authorization": f"Bearer {self.token}"}

    def status(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.base}/status", headers={"Accept": "application/json"}, timeout=5).json())

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.fhir, headers=self.headers, timeout=timeout)

    def start(self, timeout: float = 30) -> RebondServer:
        if not self.token:
            from tests.auth import api_token_for

            self.token = api_token_for(self.db)
        cmd = [sys.executable, "-m", "rebond.cli", *self.command()]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rebond serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("rebond serve did not answer /healthz")

    @property
    def packs(self) -> list[str]:
        """Downtime packs only where a test asks for them (every server making them would load the machine)."""
        return [] if "--downtime-every" in self.extra else ["--downtime-every", "0"]

    def command(self) -> list[str]:
        return ["serve", "--db", self.db, "--port", str(self.port), "--site-id", self.site_id, "--log-level", "warning",
                *self.packs, *self.extra]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class SiteServer(RebondServer):
    """`rebond site` following a central server, with an API token on the central (the central's role-system one
    unless `upstream_token` is given)."""

    def __init__(self, db: str, central: RebondServer, site_id: str = "H1", *extra: str, upstream: str | None = None,
                 upstream_token: str | None = None) -> None:
        super().__init__(db, *extra, site_id=site_id)
        self.central = central
        self.upstream = upstream or central.fhir
        self.upstream_token = upstream_token

    def command(self) -> list[str]:
        return ["site", "--upstream", self.upstream, "--site-id", self.site_id, "--db", self.db, "--port", str(self.port),
                "--token", self.upstream_token or self.central.token, "--log-level", "warning", *self.packs, *self.extra]

