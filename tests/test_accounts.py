"""Accounts and sign-in sessions: argon2 hashes, lock-out, idle expiry, roles."""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from rebond.security.accounts import PERMISSIONS, AccountError, Accounts
from rebond.store import open_store
from rebond.store.base import Store


def test_passwords_are_hashed_with_argon2_and_checked(store: Store) -> None:
    accounts = Accounts(store)
    accounts.save("Nurse", "correct horse", "nurse", "LEROY Hélène")
    stored = store.get_state("account", "nurse")
    assert stored["password_hash"].startswith("$argon2id$") and "correct horse" not in str(stored)
    assert accounts.authenticate("nurse", "correct horse") is not None
    assert accounts.authenticate("NURSE ", "correct horse") is not None, "names are not case-sensitive"
    assert accounts.authenticate("nurse", "wrong") is None
    assert accounts.authenticate("nobody", "correct horse") is None


def test_bad_accounts_are_refused_in_one_line(store: Store) -> None:
    accounts = Accounts(store)
    with pytest.raises(AccountError, match="unknown role"):
        accounts.save("x", "long enough", "surgeon", "X")
    with pytest.raises(AccountError, match="at least 8"):
        accounts.save("x", "short", "nurse", "X")
    with pytest.raises(AccountError, match="not a valid user name"):
        accounts.save("a b", "long enough", "nurse", "X")


def test_five_wrong_passwords_lock_the_name_out(store: Store) -> None:
    accounts = Accounts(store)
    accounts.save("doctor", "rebond-demo", "physician", "Dr X")
    for _ in range(Accounts.MAX_FAILURES):
        assert accounts.authenticate("doctor", "guess") is None
    assert accounts.authenticate("doctor", "rebond-demo") is None, "even the right password waits"
    assert accounts.locked_out("doctor")


def test_sessions_expire_when_idle_and_on_sign_out(store: Store) -> None:
    accounts = Accounts(store, idle=1)
    account = accounts.save("nurse", "rebond-demo", "nurse", "N")
    token, session = accounts.open_session(account)
    assert store.get_state("web-session", token) is None, "only the token's hash is kept"
    assert accounts.session(token) == session
    time.sleep(1.2)
    assert accounts.session(token) is None
    token, _ = accounts.open_session(account)
    accounts.close_session(token)
    assert accounts.session(token) is None


def test_only_clinical_roles_see_patients() -> None:
    assert "view-patients" not in PERMISSIONS["admin"]
    assert {"acknowledge-results", "record-vitals"} <= PERMISSIONS["nurse"]
    assert "record-vitals" not in PERMISSIONS["lab"]


def test_a_site_copies_the_central_accounts_of_people_and_keeps_its_own(store: Store, tmp_path: Path) -> None:
    """`directory` on the central site, `adopt` on a site node (here `store`): what is copied, changed, removed, kept."""
    central_store = open_store(f"sqlite:///{tmp_path}/central.db")
    try:
        central, site = Accounts(central_store), Accounts(store)
        central.save("leroy", "rebond-demo", "nurse", "LEROY Hélène")
        central.save("martin", "rebond-demo", "physician", "Dr MARTIN")
        central.save("garde", "rebond-demo", "physician", "Dr GARDE (central)")
        central.save("lab-engine", "rebond-demo", "system", "Lab interface")
        central.save("paillasse", "rebond-demo", "lab", "Paillasse H1", service="h1-lab")
        central.save("site-h1", "rebond-demo", "site", "Site H1")
        site.save("garde", "site-password", "physician", "Dr GARDE (site)")  # made at the site before: stays the site's

        directory = central.directory()
        assert sorted(a["username"] for a in directory) == ["garde", "leroy", "martin", "paillasse"], "interfaces and nodes stay central"
        adopted = site.adopt(directory)
        assert (adopted.added, adopted.updated, adopted.removed, adopted.copies, adopted.kept_here) == (3, 0, 0, 3, ("garde",))
        assert site.get("paillasse").service == "H1-LAB", "the service it works for comes with it (its code, as written)"
        assert site.authenticate("leroy", "rebond-demo") is not None, "the central password signs in at the site"
        assert site.authenticate("garde", "site-password") is not None and site.get("garde").origin == ""
        assert site.get("lab-engine") is None and site.get("site-h1") is None
        assert [a["username"] for a in site.directory()] == ["garde"], "a site shares only the accounts made there"

        assert site.adopt(central.directory()) == type(adopted)(0, 0, 0, 3, ("garde",)), "nothing changed: nothing written"

        central.save("leroy", "new-password", "nurse", "LEROY Hélène")  # a new password on the central site
        central_store.put_state("account", "martin", {**central_store.get_state("account", "martin"), "active": False})
        assert site.adopt(central.directory()).updated == 2
        assert site.authenticate("leroy", "new-password") is not None and site.authenticate("leroy", "rebond-demo") is None
        assert site.authenticate("martin", "rebond-demo") is None, "disabled on the central site, disabled here"

        central_store.put_state("account", "leroy", None)  # gone from the central site: gone here, with its sessions
        token, _session = site.open_session(site.get("leroy"))
        assert site.adopt(central.directory()).removed == 1
        assert site.get("leroy") is None and site.authenticate("leroy", "new-password") is None
        session = site.session(token)
        assert session is not None and site.get(session.username) is None, "its session names no account: refused"
    finally:
        central_store.close()


def test_a_malformed_central_directory_changes_nothing(store: Store) -> None:
    site = Accounts(store)
    good = {"username": "leroy", "display": "L", "role": "nurse", "password_hash": site.save("x", "rebond-demo", "nurse", "X").password_hash}
    for bad, why in [({**good, "role": "system"}, "not an account of a person"), ({**good, "password_hash": "plain"}, "not an account"),
                     ({**good, "username": "Leroy "}, "not an account"), ({**good, "service": 12}, "not an account"),
                     ({"username": "leroy"}, "KeyError"), ("leroy", "TypeError")]:
        with pytest.raises(AccountError, match=why):
            site.adopt([good, bad])
        assert site.get("leroy") is None


def test_a_session_stands_while_the_store_refuses_writes(small_disk: Callable[[str], Path]) -> None:
    """The minute's refresh of a session is a write: while none can be made (here a full disk; a failover of the
    central database alike), the session still opens pages, and is refreshed once writes resume."""
    disk = small_disk("8M")
    store = open_store(f"sqlite:///{disk}/store.db")
    try:
        accounts = Accounts(store)
        token, session = accounts.open_session(accounts.save("nurse", "rebond-demo", "nurse", "N"))
        key = next(k for k, _ in store.list_state("web-session"))
        store.put_state("web-session", key, {**store.get_state("web-session", key), "last_seen": time.time() - 120})
        with closing(sqlite3.connect(disk / "store.db")) as raw:  # the WAL emptied: the refresh must grow it, not reuse it
            assert raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        with (disk / "filler").open("wb") as filler, pytest.raises(OSError, match="No space left"):
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        standing = accounts.session(token)
        assert standing is not None and standing.username == "nurse" and standing.last_seen < time.time() - 100
        (disk / "filler").unlink()
        refreshed = accounts.session(token)
        assert refreshed is not None and refreshed.last_seen > time.time() - 5
    finally:
        store.close()
