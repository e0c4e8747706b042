"""Accounts and sign-in sessions: argon2 hashes, lock-out, idle expiry, roles."""
from __future__ import annotations

import time

import pytest

from rebond.security.accounts import PERMISSIONS, AccountError, Accounts
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
