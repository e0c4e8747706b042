"""A real highly available PostgreSQL for the failover drills: etcd, and PostgreSQL nodes run by Patroni.

Debian's packages (`etcd-server`, `patroni`, `postgresql-15`; `make test` installs them). Each node is a
Patroni process with its own PostgreSQL on 127.0.0.1, as two database servers in two data centres would be, each
reached through links (tests/proxy.py) that a drill cuts to take a server off the network; synchronous mode is on,
so a commit is on the standby's disk before it returns. PostgreSQL refuses to run as root: when the tests run as
root, Patroni runs as the `postgres` system user. The timings are short (the leader key lives 10 s) so that a drill
lasts seconds; deploy/patroni.yml has the production ones.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.pg_harness import find_bin, free_port
from tests.proxy import CuttableLink

SCOPE = "rebond-drill"
TTL = 10  # seconds the leader key lives without renewal: the failover begins after it


def _owned_by_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Etcd:
    """One etcd member: the drill's consensus store (production has three, in three places)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "etcd"
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> Etcd:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd not found: `make test` installs etcd-server")
        client, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        with open(self.dir.parent / "etcd.log", "wb") as log:
            self.proc = subprocess.Popen(
                [etcd, "--name", "witness", "--data-dir", str(self.dir), "--listen-client-urls", client,
                 "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"witness={peer}", "--initial-cluster-state", "new"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{client}/health", timeout=1).json().get("health") == "true":
                    return self
            time.sleep(0.2)
        raise RuntimeError("etcd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PatroniNode:
    """One database server: Patroni and the PostgreSQL it runs."""

    def __init__(self, root: Path, name: str, etcd: Etcd) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        _owned_by_postgres(self.dir)
        self.pg_port, self.api_port = free_port(), free_port()
        self.etcd = etcd
        # the server's network, which a drill can cut (`isolate`): what the others reach its PostgreSQL and its Patroni
        # by, and its own way to etcd. Only the drill's console (`state`, `local_url`) reaches it directly.
        self.pg_link, self.api_link, self.etcd_link = CuttableLink(self.pg_port), CuttableLink(self.api_port), \
            CuttableLink(etcd.client_port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = self.dir / "patroni.yml"
        self.config.write_text(json.dumps(self._config(), indent=1))  # JSON is YAML
        _owned_by_postgres(self.config)

    def _config(self) -> dict[str, Any]:
        bin_dir = str(Path(find_bin("postgres") or "/usr/lib/postgresql/15/bin/postgres").parent)
        return {
            "scope": SCOPE, "name": self.name,
            "restapi": {"listen": f"127.0.0.1:{self.api_port}", "connect_address": f"127.0.0.1:{self.api_link.port}"},
            # through its link only: no discovery of etcd's own addresses, which would go round it
            "etcd3": {"hosts": f"127.0.0.1:{self.etcd_link.port}", "use_proxies": True},
            "bootstrap": {
                "dcs": {"ttl": TTL, "loop_wait": 1, "retry_timeout": 4, "maximum_lag_on_failover": 0,
                        "synchronous_mode": True,
                        "postgresql": {"use_pg_rewind": True,
                                       "parameters": {"wal_log_hints": "on", "max_connections": 100,
                                                      "max_wal_senders": 5, "max_replication_slots": 5}}},
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
                "pg_hba": ["local all all trust", "host replication replicator 127.0.0.1/32 trust",
                           "host all all 127.0.0.1/32 trust"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}", "connect_address": self.address,
                "data_dir": str(self.dir / "data"), "bin_dir": bin_dir, "pgpass": str(self.dir / "pgpass"),
                "authentication": {"superuser": {"username": "rebond", "password": "drill"},
                                   "replication": {"username": "replicator", "password": "drill"},
                                   "rewind": {"username": "rebond", "password": "drill"}},
                "parameters": {"unix_socket_directories": str(self.dir), "fsync": "on"},
            },
        }

    @property
    def address(self) -> str:
        """Where the others (Rebond, the standby) reach its PostgreSQL: through its network."""
        return f"127.0.0.1:{self.pg_link.port}"

    @property
    def listening(self) -> str:
        """The address its PostgreSQL listens on, as it says itself (a Rebond node's status shows it)."""
        return f"127.0.0.1:{self.pg_port}"

    def local_url(self, dbname: str) -> str:
        """Its PostgreSQL reached on the server itself, not through its network: a console's, during a partition."""
        return f"postgresql://rebond@127.0.0.1:{self.pg_port}/{dbname}"

    def isolate(self) -> None:
        """The server loses its network and keeps running (a switch, a cable, a data centre's uplink): no one reaches its
        PostgreSQL or its Patroni, and its Patroni no longer reaches etcd; connections open through it die."""
        for link in (self.pg_link, self.api_link, self.etcd_link):
            link.cut()

    def reconnect(self) -> None:
        for link in (self.pg_link, self.api_link, self.etcd_link):
            link.restore()

    def start(self) -> PatroniNode:
        patroni = shutil.which("patroni")
        if patroni is None:
            raise RuntimeError("patroni not found: `make test` installs Debian's patroni")
        with open(self.dir / "patroni.log", "ab") as log:
            self.proc = subprocess.Popen(_as_postgres([patroni, str(self.config)]), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def state(self) -> dict[str, Any] | None:
        """Patroni's own account of this node (role, state, timeline), or None when it does not answer."""
        try:
            return dict(httpx.get(f"http://127.0.0.1:{self.api_port}/patroni", timeout=1).json())
        except (httpx.HTTPError, ValueError):
            return None

    def postmaster(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        return None

    def lose(self) -> None:
        """The server is gone at once, as in a power cut: Patroni and PostgreSQL killed (-9), nothing shut down cleanly."""
        postmaster = self.postmaster()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # runuser and Patroni
            self.proc.wait()
        if postmaster is not None:  # Patroni starts PostgreSQL in a session of its own: its group, backends included
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(postmaster), signal.SIGKILL)

    def lose_patroni(self) -> None:
        """Patroni alone dies (killed -9: a crash, the OOM killer); its PostgreSQL, in a session of its own, runs on as it
        was. Without a watchdog to reset the machine, a primary's goes on taking connections as a primary."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def lost(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "patroni.log").read_text()[-3000:]
        return ""


class PatroniCluster:
    """etcd and two Patroni nodes: a primary and its synchronous standby."""

    def __init__(self, nodes: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rebond-ha-"))
        _owned_by_postgres(self.root)
        self.etcd = Etcd(self.root)
        self.nodes = [PatroniNode(self.root, f"pg{n + 1}", self.etcd) for n in range(nodes)]

    def start(self, timeout: float = 120) -> PatroniCluster:
        self.etcd.start()
        self.nodes[0].start()
        self.wait_for(lambda: self.leader() is self.nodes[0], timeout, "the first node did not become the primary")
        for node in self.nodes[1:]:
            node.start()
        self.wait_for(self.synchronous, timeout, "no synchronous standby")
        return self

    def url(self, dbname: str = "postgres") -> str:
        """Every node in one URL: libpq tries them in turn and keeps the one that takes writes."""
        hosts = ",".join(node.address for node in self.nodes)
        return f"postgresql://rebond@{hosts}/{dbname}?target_session_attrs=read-write"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def leader(self) -> PatroniNode | None:
        for node in self.nodes:
            state = node.state()
            if state and state.get("role") in ("master", "primary") and state.get("state") == "running":
                return node
        return None

    def synchronous(self) -> PatroniNode | None:
        """The standby whose disk a commit waits for, once it streams from the primary."""
        for node in self.nodes:
            state = node.state()
            if state and state.get("sync_standby") and state.get("state") == "running":
                return node
        return None

    def healed(self) -> PatroniCluster:
        """Every server lost by an earlier drill (one that failed before bringing it back) started again: each drill
        begins with a primary and its synchronous standby."""
        for node in self.nodes:
            if node.lost:
                node.start()
        return self

    def wait_for(self, check: Any, timeout: float, failure: str) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.2)
        logs = "\n".join(f"--- {node.name}\n{node.log_tail()}" for node in self.nodes)
        raise RuntimeError(f"{failure} after {timeout:.0f} s\n{logs}")

    def stop(self) -> None:
        for node in self.nodes:
            node.lose()
            for link in (node.pg_link, node.api_link, node.etcd_link):
                link.close()
        self.etcd.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class HAProxy:
    """HAProxy in front of the cluster, as deploy/haproxy.cfg's `postgres_primary`: one address, led to the node whose
    Patroni answers 200 on /primary, connections to a node that stops leading cut at once."""

    def __init__(self, cluster: PatroniCluster) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.config = cluster.root / "haproxy.cfg"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(haproxy).exists():
            raise RuntimeError("haproxy not found: `make test` installs Debian's haproxy")
        servers = "\n".join(f"    server {n.name} {n.address} maxconn 100 check port {n.api_link.port}" for n in self.cluster.nodes)
        self.config.write_text(f"""global
    maxconn 400
defaults
    mode tcp
    timeout connect 2s
    timeout client 30m
    timeout server 30m
listen postgres_primary
    bind 127.0.0.1:{self.port}
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
{servers}
""")
        with open(self.cluster.root / "haproxy.log", "wb") as log:
            self.proc = subprocess.Popen([haproxy, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        self.cluster.wait_for(self._leads, 30, "HAProxy did not lead to the primary")
        return self

    def _leads(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url(), connect_timeout=2) as conn:
                return not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]  # type: ignore[index]
        except psycopg.Error:
            return False

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://rebond@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
