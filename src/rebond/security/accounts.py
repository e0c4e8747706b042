"""Accounts, roles and sign-in sessions, kept in the node's own state (never in the change feed).

Passwords are hashed with argon2id. A session is a random token in an HttpOnly cookie; the
node keeps only its SHA-256, so a copy of the database opens no session. Sessions end after
a quiet period (`idle`) and in any case after `lifetime`.

The central site's accounts of people (not those of interfaces and nodes) are copied to every
site node (`directory` there, `adopt` here, site/directory.py between), password hashes
included, so that the staff of a hospital cut off from the central site still sign in with the
name and password they always use. Sessions, API tokens and lockouts stay each node's own.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from rebond.store.base import Session, Store, Unavailable

ACCOUNTS = "account"
SESSIONS = "web-session"
TOKENS = "api-token"
#: a token's account is looked up at most this often (seconds): reads stay fast, a revoked token stops within it
TOKEN_CACHE_SECONDS = 30.0

#: what each role may do; the web app checks these names, never the role itself
_FHIR = frozenset({"fhir-read", "fhir-write"})
PERMISSIONS: dict[str, frozenset[str]] = {
    "nurse": frozenset({"view-patients", "view-notes", "view-results", "record-vitals", "record-administrations",
                        "acknowledge-results", "resolve-conflicts", "admit-patients", "messages", "write-notes",
                        "acknowledge-prescriptions"}) | _FHIR,
    "physician": frozenset({"view-patients", "view-notes", "view-results", "record-vitals", "acknowledge-results",
                            "resolve-conflicts", "admit-patients", "messages", "write-notes", "prescribe"}) | _FHIR,
    "lab": frozenset({"view-patients", "view-results", "messages"}) | _FHIR,
    # the hospital pharmacy: reads the charts, validates prescriptions (clinical/pharmacy.py), writes to prescribers
    "pharmacist": frozenset({"view-patients", "view-notes", "view-results", "messages", "validate-prescriptions"}) | _FHIR,
    "admin": frozenset({"manage-accounts", "view-status", "manage-interfaces", "post-situation", "read-audit"}),
    # the crisis cell: publishes the situation updates of the status page; no patient data
    "crisis": frozenset({"view-status", "post-situation"}),
    # interfaces: importers, the HL7 engine, scripts; the FHIR API, and may say which site a write comes from
    "system": _FHIR | {"name-origin-site"},
    # a site node on the central site: the FHIR API (its feed, its replayed writes), a copy of the accounts of people,
    # and its audit trail sent on
    "site": _FHIR | {"name-origin-site", "follow-accounts", "send-audit"},
}
ROLES = tuple(PERMISSIONS)
#: the roles of people: their accounts are copied to the site nodes
PEOPLE = ("nurse", "physician", "lab", "pharmacist", "admin", "crisis")
#: `Account.origin` of a site node's copy of a central account
CENTRAL = "central"

_hasher = PasswordHasher()
# verifying against this when the user does not exist keeps unknown and known names equally slow
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


@dataclass(frozen=True)
class Account:
    username: str
    display: str
    role: str
    password_hash: str
    practitioner_id: str | None = None
    active: bool = True
    origin: str = ""  # "": made on this node; CENTRAL: a site node's copy of the central site's account
    service: str | None = None  # the code of the service it works for (`H1-LAB`): its messages' box is the account's

    def may(self, permission: str) -> bool:
        return self.active and permission in PERMISSIONS.get(self.role, frozenset())


@dataclass(frozen=True)
class WebSession:
    token_hash: str
    username: str
    csrf: str
    created: float
    last_seen: float


class AccountError(ValueError):
    """A refused account change, said in one line."""


@dataclass(frozen=True)
class Adopted:
    """What a copy of the central accounts changed on a site node."""

    added: int
    updated: int
    removed: int
    copies: int  # the central accounts this node now holds
    kept_here: tuple[str, ...]  # names made on this node that the central site has too: this node's account is kept


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _central_copy(entry: Any) -> Account:
    """One entry of the central site's directory as this node's copy; AccountError if it is not one."""
    try:
        copy = Account(username=entry["username"], display=entry["display"], role=entry["role"],
                       password_hash=entry["password_hash"], practitioner_id=entry.get("practitioner_id"),
                       active=entry.get("active", True), origin=CENTRAL, service=entry.get("service"))
    except (TypeError, KeyError) as err:
        raise AccountError(f"the central directory has an entry that is not an account ({type(err).__name__}: {err})") from None
    if (not isinstance(copy.username, str) or copy.username != copy.username.strip().lower() or not copy.username
            or copy.role not in PEOPLE or not isinstance(copy.password_hash, str) or not copy.password_hash.startswith("$argon2")
            or not isinstance(copy.display, str) or not isinstance(copy.active, bool)
            or not isinstance(copy.practitioner_id, str | None) or not isinstance(copy.service, str | None)):
        raise AccountError(f"the central directory's entry '{entry.get('username')}' is not an account of a person")
    return copy


@dataclass
class _Failures:
    count: int = 0
    since: float = field(default_factory=time.monotonic)


class Accounts:
    """The accounts and sessions of one node."""

    #: after this many wrong passwords for one name within LOCKOUT seconds, sign-in waits
    MAX_FAILURES = 5
    LOCKOUT = 300.0

    def __init__(self, store: Store, *, idle: float = 30 * 60, lifetime: float = 12 * 3600) -> None:
        self.store = store
        self.idle = idle
        self.lifetime = lifetime
        self._failures: dict[str, _Failures] = {}
        self._lock = threading.Lock()
        self._token_cache: dict[str, tuple[float, Account | None]] = {}

    # -- accounts

    def get(self, username: str) -> Account | None:
        value = self.store.get_state(ACCOUNTS, username.lower())
        return Account(**value) if value else None

    def all(self) -> list[Account]:
        return [Account(**value) for _key, value in self.store.list_state(ACCOUNTS)]

    def save(self, username: str, password: str, role: str, display: str, practitioner_id: str | None = None,
             service: str | None = None) -> Account:
        """Create or replace an account; `service`: the code of the service it works for (its box, in the messaging)."""
        username = username.strip().lower()
        if not username or not username.replace("-", "").replace(".", "").replace("_", "").isalnum():
            raise AccountError(f"'{username}' is not a valid user name (letters, digits, '.', '-', '_')")
        if role not in PERMISSIONS:
            raise AccountError(f"unknown role '{role}': choose one of {', '.join(ROLES)}")
        if len(password) < 8:
            raise AccountError("the password must have at least 8 characters")
        account = Account(username, display.strip() or username, role, _hasher.hash(password), practitioner_id,
                          service=service.strip().upper() or None if service else None)
        self.store.put_state(ACCOUNTS, username, asdict(account))
        return account

    # -- the central accounts on the site nodes

    def directory(self) -> list[dict[str, Any]]:
        """The accounts of people made on this node, as the site nodes copy them (password hashes included)."""
        return [asdict(a) for a in self.all() if a.role in PEOPLE and not a.origin]

    def adopt(self, central: list[dict[str, Any]]) -> Adopted:
        """Make this node's copies of the central accounts what the central site's `directory` says, in one commit.

        A copy changed or disabled on the central site changes here; one gone from there is removed here (its
        sessions end with it). An account made on this node keeps its name: it is never overwritten, and is
        reported in `kept_here`. A malformed directory raises AccountError and changes nothing.
        """
        wanted = {account.username: account for account in map(_central_copy, central)}
        mine = {account.username: account for account in self.all()}
        added = updated = removed = 0
        changes: list[tuple[str, dict[str, Any] | None]] = []
        for name, copy in wanted.items():
            current = mine.get(name)
            if current is not None and not current.origin:
                continue
            if current != copy:
                added, updated = added + (current is None), updated + (current is not None)
                changes.append((name, asdict(copy)))
        for name, current in mine.items():
            if current.origin == CENTRAL and name not in wanted:
                removed += 1
                changes.append((name, None))
        if changes:
            def write(tx: Session) -> None:
                for name, value in changes:
                    tx.put_state(ACCOUNTS, name, value)

            self.store.write(write)
        kept = tuple(sorted(name for name in wanted if name in mine and not mine[name].origin))
        return Adopted(added, updated, removed, len(wanted) - len(kept), kept)

    def authenticate(self, username: str, password: str) -> Account | None:
        """The account if the password is right; None otherwise (and after too many failures, even when right)."""
        key = username.strip().lower()
        if self.locked_out(key):
            return None
        account = self.get(key)
        try:
            _hasher.verify(account.password_hash if account else _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            self._fail(key)
            return None
        if account is None or not account.active:
            self._fail(key)
            return None
        with self._lock:
            self._failures.pop(key, None)
        if _hasher.check_needs_rehash(account.password_hash):
            self.store.put_state(ACCOUNTS, key, {**asdict(account), "password_hash": _hasher.hash(password)})
        return account

    def locked_out(self, username: str) -> bool:
        with self._lock:
            failures = self._failures.get(username.strip().lower())
            if failures is None:
                return False
            if time.monotonic() - failures.since > self.LOCKOUT:
                del self._failures[username.strip().lower()]
                return False
            return failures.count >= self.MAX_FAILURES

    def _fail(self, username: str) -> None:
        with self._lock:
            failures = self._failures.setdefault(username, _Failures())
            failures.count += 1

    # -- sessions

    def open_session(self, account: Account) -> tuple[str, WebSession]:
        """A new session: the token for the cookie, and the session (with its CSRF token)."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        session = WebSession(_digest(token), account.username, secrets.token_urlsafe(24), now, now)
        self.store.put_state(SESSIONS, session.token_hash, asdict(session))
        return token, session

    def session(self, token: str) -> WebSession | None:
        """The live session for a cookie's token; None when unknown or expired (an expired one is removed)."""
        if not token:
            return None
        key = _digest(token)
        value = self.store.get_state(SESSIONS, key)
        if not value:
            return None
        session = WebSession(**value)
        now = time.time()
        if now - session.last_seen > self.idle or now - session.created > self.lifetime:
            self.store.put_state(SESSIONS, key, None)
            return None
        if now - session.last_seen > 60:  # one write a minute at most, not one per page
            refreshed = WebSession(session.token_hash, session.username, session.csrf, session.created, now)
            try:
                self.store.put_state(SESSIONS, key, asdict(refreshed))
            except Unavailable:  # no writes for now (a failover): the session stands; it is refreshed on a later page
                return session
            session = refreshed
        return session

    def close_session(self, token: str) -> None:
        if token:
            self.store.put_state(SESSIONS, _digest(token), None)

    def purge_sessions(self) -> int:
        """Remove expired sessions; returns how many."""
        now = time.time()
        gone = [key for key, value in self.store.list_state(SESSIONS)
                if now - value["last_seen"] > self.idle or now - value["created"] > self.lifetime]
        for key in gone:
            self.store.put_state(SESSIONS, key, None)
        return len(gone)

    # -- API tokens (Authorization: Bearer)

    def issue_token(self, username: str, label: str = "") -> str:
        """A new API token for an account; only its SHA-256 is kept, the token is shown once."""
        account = self.get(username)
        if account is None:
            raise AccountError(f"no account '{username}'")
        token = "rbd_" + secrets.token_urlsafe(32)
        self.store.put_state(TOKENS, _digest(token), {"username": account.username, "label": label, "created": time.time()})
        return token

    def revoke_tokens(self, username: str) -> int:
        mine = [key for key, value in self.store.list_state(TOKENS) if value.get("username") == username.lower()]
        for key in mine:
            self.store.put_state(TOKENS, key, None)
        with self._lock:
            self._token_cache.clear()
        return len(mine)

    def token_account(self, token: str) -> Account | None:
        if not token:
            return None
        key = _digest(token)
        now = time.monotonic()
        with self._lock:
            cached = self._token_cache.get(key)
        if cached is not None and now - cached[0] < TOKEN_CACHE_SECONDS:
            return cached[1]
        value = self.store.get_state(TOKENS, key)
        account = self.get(value["username"]) if value else None
        if account is not None and not account.active:
            account = None
        with self._lock:
            if len(self._token_cache) > 10_000:
                self._token_cache.clear()
            self._token_cache[key] = (now, account)
        return account
