"""SMART Backend Services: other systems (a lab's middleware, an integration engine) get short-lived tokens for the
FHIR API by proving who they are with their own private key; no secret is shared.

    rebond accounts client lab-engine --jwks keys.json --scope "system/Observation.cu system/Patient.rs"
    client: POST /auth/token  grant_type=client_credentials, scope=…,
            client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer,
            client_assertion=<JWT signed RS384 or ES384: iss = sub = client id, aud = this URL, exp ≤ 5 min, jti once>
    Rebond:  {"access_token": …, "token_type": "bearer", "expires_in": 300, "scope": <what was granted>}

A client belongs to an account (an interface's, role `system`): what its tokens may do is what the account's role
allows AND what its scopes allow, and the audit trail names the account. The tokens, like the API tokens, are kept
as their SHA-256 only. Discovery: `GET /fhir/.well-known/smart-configuration`.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from rebond.security.accounts import TOKEN_CACHE_SECONDS, Account, Accounts
from rebond.store.base import Session, Store

log = logging.getLogger("rebond.smart")
CLIENTS = "smart-client"
TOKENS = "smart-token"
SEEN_ASSERTIONS = "smart-jti"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384")  # what SMART asks servers to accept
#: how long an access token lives (seconds); a client asks for a new one
TOKEN_SECONDS = 300
#: how far in the future a client's assertion may expire (SMART: five minutes at most)
MAX_ASSERTION_SECONDS = 300
_SCOPE = re.compile(r"(system|user)/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|c?r?u?d?s?)")
APPS = "smart-app"
CODES = "smart-code"
USED_CODES = "smart-code-used"
#: how long an app's code may wait for its exchange (seconds)
CODE_SECONDS = 60
#: how long an app's access token lives: as long as a web session without use (the user authorizes the app again after)
APP_TOKEN_SECONDS = 1800


class SmartError(Exception):
    """An OAuth 2.0 error (RFC 6749 §5.2, §4.1.2.1): its code and what the client should know; `redirect` False when an
    app's request cannot be answered at its redirect URI (unknown app or URI)."""

    def __init__(self, error: str, description: str, *, redirect: bool = True) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.redirect = redirect


@dataclass(frozen=True)
class Scopes:
    """What a token may read and write: resource types, "*" for every type."""

    read: frozenset[str]
    write: frozenset[str]

    def allows(self, resource_type: str | None, *, write: bool) -> bool:
        granted = self.write if write else self.read
        return "*" in granted or (resource_type is not None and resource_type in granted)

    def covers(self, other: Scopes) -> bool:
        return all(self.allows(t, write=False) for t in other.read) and all(self.allows(t, write=True) for t in other.write)


def parse_scopes(text: str | Iterable[str], context: str = "system") -> list[tuple[str, Scopes]]:
    """Each scope of the context (`system/` for a backend service, `user/` for an app a person uses; SMART v1
    read/write/*, v2 letters c r u d s) and what it grants; SmartError for another."""
    out = []
    for scope in text.split() if isinstance(text, str) else text:
        match = _SCOPE.fullmatch(scope)
        if match is None or match.group(1) != context or match.group(3) == "":
            raise SmartError("invalid_scope", f"'{scope}' is not a scope of this server: ask for {context}/<Type or *>."
                                              "<read|write|*> or the letters cruds")
        kind, access = match.group(2), match.group(3)
        if access in ("read", "write", "*"):  # SMART v1
            reads, writes = access != "write", access != "read"
        else:  # SMART v2: c create, r read, u update, d delete, s search
            reads, writes = any(c in access for c in "rs"), any(c in access for c in "cud")
        out.append((scope, Scopes(frozenset({kind}) if reads else frozenset(), frozenset({kind}) if writes else frozenset())))
    return out


def merged(scopes: Iterable[Scopes]) -> Scopes:
    read: set[str] = set()
    write: set[str] = set()
    for s in scopes:
        read |= s.read
        write |= s.write
    return Scopes(frozenset(read), frozenset(write))


@dataclass(frozen=True)
class Client:
    client_id: str
    username: str  # the account it belongs to
    scopes: tuple[str, ...]  # what it may ask for
    jwks: dict[str, Any]
    label: str
    created: float


@dataclass(frozen=True)
class App:
    """An app a person uses (SMART App Launch, standalone): a public client, PKCE, its redirect URIs registered."""

    client_id: str
    label: str
    redirect_uris: tuple[str, ...]
    scopes: tuple[str, ...]  # user/ scopes it may ask for


@dataclass(frozen=True)
class Authorization:
    """An app's request to act for the signed-in person, checked (`SmartClients.authorization`)."""

    app: App
    redirect_uri: str
    scope: str  # what it asks that is registered
    state: str
    challenge: str


@dataclass(frozen=True)
class Grant:
    """Who a token stands for, and what it may do."""

    account: Account
    client_id: str
    scopes: Scopes
    expires: float
    context: str = "system"  # system: a backend service's; user: an app's, for a person


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SmartClients:
    """The backend clients registered on this node, their assertions and their tokens."""

    def __init__(self, store: Store, accounts: Accounts, *, clock: Any = time.time) -> None:
        self.store = store
        self.accounts = accounts
        self.clock = clock
        self._lock = threading.Lock()
        # token digest -> (when read, grant): read again after TOKEN_CACHE_SECONDS, so a disabled account stops within it
        self._grants: dict[str, tuple[float, Grant | None]] = {}

    # -- registering

    def register(self, username: str, jwks: dict[str, Any], scopes: str, label: str = "", client_id: str | None = None) -> Client:
        account = self.accounts.get(username)
        if account is None:
            raise ValueError(f"no account '{username}': make it first (rebond accounts add {username} --role system)")
        _key_set(jwks)
        parse_scopes(scopes)
        if not scopes.split():
            raise ValueError("say which scopes the client may ask for: --scope 'system/Observation.cu system/Patient.rs'")
        client = Client(client_id or str(uuid.uuid4()), account.username, tuple(scopes.split()), {"keys": list(jwks["keys"])},
                        label, self.clock())
        self.store.put_state(CLIENTS, client.client_id, {"username": client.username, "scopes": list(client.scopes),
                                                          "jwks": client.jwks, "label": label, "created": client.created})
        return client

    def get(self, client_id: str) -> Client | None:
        value = self.store.get_state(CLIENTS, client_id) if client_id else None
        if not value:
            return None
        return Client(client_id, value["username"], tuple(value["scopes"]), value["jwks"], value.get("label", ""), value["created"])

    def all(self) -> list[Client]:
        return [c for key, _v in self.store.list_state(CLIENTS) if (c := self.get(key)) is not None]

    def apps(self) -> list[App]:
        return [a for key, _v in self.store.list_state(APPS) if (a := self.app(key)) is not None]

    def revoke(self, client_id: str) -> bool:
        """Remove a backend client or an app, and every token it holds."""
        if self.get(client_id) is None and self.app(client_id) is None:
            return False
        self.store.put_state(CLIENTS, client_id, None)
        self.store.put_state(APPS, client_id, None)
        for key, value in self.store.list_state(TOKENS):
            if value.get("client_id") == client_id:
                self.store.put_state(TOKENS, key, None)
        with self._lock:
            self._grants.clear()
        return True

    def register_app(self, client_id: str, label: str, redirect_uris: Iterable[str], scopes: str) -> App:
        uris = tuple(redirect_uris)
        if not uris or not all(u.startswith(("https://", "http://localhost", "http://127.0.0.1")) for u in uris):
            raise ValueError("give the app's redirect URIs, https (or http on this machine, for a test)")
        parse_scopes(scopes, "user")
        if not scopes.split():
            raise ValueError("say which scopes the app may ask for: --scope 'user/Patient.rs user/Observation.rs'")
        app = App(client_id, label or client_id, uris, tuple(scopes.split()))
        self.store.put_state(APPS, client_id, {"label": app.label, "redirect_uris": list(uris), "scopes": list(app.scopes),
                                                "created": self.clock()})
        return app

    def app(self, client_id: str) -> App | None:
        value = self.store.get_state(APPS, client_id) if client_id else None
        if not value:
            return None
        return App(client_id, value["label"], tuple(value["redirect_uris"]), tuple(value["scopes"]))

    def authorization(self, params: dict[str, str], fhir_base: str) -> Authorization:
        """An app's authorization request checked; SmartError whose `redirect` is False when the app or its redirect URI
        is not known (then the person is told, and not sent anywhere)."""
        app = self.app(params.get("client_id", ""))
        if app is None:
            raise SmartError("invalid_request", "this app is not registered here", redirect=False)
        if params.get("redirect_uri") not in app.redirect_uris:
            raise SmartError("invalid_request", "this redirect URI is not the app's", redirect=False)
        if params.get("response_type") != "code":
            raise SmartError("unsupported_response_type", "ask for response_type=code")
        if params.get("aud", "").rstrip("/") != fhir_base.rstrip("/"):
            raise SmartError("invalid_request", f"aud must be this FHIR server: {fhir_base}")
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            raise SmartError("invalid_request", "PKCE is required: code_challenge with code_challenge_method=S256")
        allowed = merged(s for _t, s in parse_scopes(app.scopes, "user"))
        asked = [(t, sc) for t, sc in parse_scopes([x for x in params.get("scope", "").split() if x.startswith("user/")], "user")
                 if allowed.covers(sc)]
        if not asked:
            raise SmartError("invalid_scope", "none of the scopes asked for was registered for this app")
        return Authorization(app, str(params["redirect_uri"]), " ".join(t for t, _s in asked), params.get("state", ""),
                             str(params["code_challenge"]))

    def code(self, authorization: Authorization, account: Account) -> str:
        """The code the app exchanges for its token, for the person who said yes; usable once, for a minute."""
        code = secrets.token_urlsafe(32)
        self.store.put_state(CODES, _digest(code), {"client_id": authorization.app.client_id, "username": account.username,
                                                    "scope": authorization.scope, "redirect_uri": authorization.redirect_uri,
                                                    "challenge": authorization.challenge, "expires": self.clock() + CODE_SECONDS})
        log.info("app %s authorized by %s: %s", authorization.app.client_id, account.username, authorization.scope)
        return code

    # -- the token endpoint

    def issue(self, form: dict[str, str], audience: str) -> dict[str, Any]:
        """The answer to a token request (RFC 6749 §5.1), or SmartError."""
        if form.get("grant_type") == "authorization_code":
            return self._exchange(form)
        if form.get("grant_type") != "client_credentials":
            raise SmartError("unsupported_grant_type", "ask with grant_type=client_credentials (a backend service) or "
                                                       "authorization_code (an app)")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            raise SmartError("invalid_request", f"authenticate with a signed JWT: client_assertion_type={ASSERTION_TYPE} and client_assertion")
        client, jti, expires = self._authenticated(form["client_assertion"], audience)
        asked = parse_scopes(form.get("scope", ""))
        allowed = merged(s for _text, s in parse_scopes(client.scopes))
        granted = [(text, s) for text, s in asked if allowed.covers(s)]
        if not granted:
            raise SmartError("invalid_scope", "none of the scopes asked for was registered for this client"
                                              f" (it may ask for: {' '.join(client.scopes)})")
        account = self.accounts.get(client.username)
        if account is None or not account.active:
            raise SmartError("invalid_client", "the account of this client is disabled")
        return self._token(client.client_id, account.username, " ".join(text for text, _s in granted), TOKEN_SECONDS,
                           once=(SEEN_ASSERTIONS, f"{client.client_id} {jti}", expires),
                           used=SmartError("invalid_client", "this client_assertion (its jti) was used already: sign a new one"))

    def _token(self, client_id: str, username: str, scope: str, seconds: int, *, once: tuple[str, str, float],
               used: SmartError) -> dict[str, Any]:
        """A new access token, kept as its SHA-256 in the same transaction that claims what bought it (an assertion's jti,
        an app's code: `once`, namespace, key and expiry), so that it buys one token even sent twice at the same instant;
        `used` is raised when it had bought one already."""
        now = self.clock()
        self._forget_expired(now)
        token = "rbs_" + secrets.token_urlsafe(32)
        namespace, key, expires = once

        def keep(tx: Session) -> bool:
            if not tx.claim_state(namespace, key, {"expires": expires}):
                return False
            tx.put_state(TOKENS, _digest(token), {"client_id": client_id, "username": username, "scope": scope, "expires": now + seconds})
            return True

        if not self.store.write(keep):
            raise used
        log.info("token issued to %s for %s: %s", client_id, username, scope)
        return {"access_token": token, "token_type": "bearer", "expires_in": seconds, "scope": scope}

    def _exchange(self, form: dict[str, str]) -> dict[str, Any]:
        """An app's code for its access token: once, within the minute, with the verifier of its PKCE challenge."""
        key = _digest(form.get("code", ""))
        value = self.store.get_state(CODES, key) if form.get("code") else None
        if not value or float(value["expires"]) < self.clock():
            raise SmartError("invalid_grant", "the code is unknown or expired: authorize the app again")
        if form.get("client_id") != value["client_id"] or form.get("redirect_uri") != value["redirect_uri"]:
            raise SmartError("invalid_grant", "the code was given to another app, or for another redirect URI")
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not verifier or not secrets.compare_digest(challenge, str(value["challenge"])):
            raise SmartError("invalid_grant", "the code_verifier does not match the code_challenge")
        account = self.accounts.get(value["username"])
        if account is None or not account.active or self.app(value["client_id"]) is None:
            raise SmartError("invalid_grant", "the person's account or the app is gone")
        # the code is kept until it expires (`_forget_expired`): claimed, it buys nothing more
        return self._token(value["client_id"], account.username, value["scope"], APP_TOKEN_SECONDS,
                           once=(USED_CODES, key, float(value["expires"])), used=SmartError("invalid_grant", "the code was used already"))

    def _authenticated(self, assertion: str, audience: str) -> tuple[Client, str, float]:
        """The client that signed the assertion, the assertion's jti and expiry; SmartError (invalid_client) otherwise (a jti
        used already is refused when the token is kept: in the same transaction)."""
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise SmartError("invalid_client", "the client_assertion is not a JWT") from None
        client = self.get(str(unverified.get("iss", "")))
        if client is None:
            raise SmartError("invalid_client", "no client is registered with this id (iss)")
        if header.get("alg") not in ALGORITHMS:
            raise SmartError("invalid_client", f"sign the assertion with {' or '.join(ALGORITHMS)}, not {header.get('alg')}")
        candidates = [k for k in _key_set(client.jwks).keys if header.get("kid") in (None, k.key_id)]
        claims: dict[str, Any] | None = None
        for key in candidates:
            try:
                claims = jwt.decode(assertion, key.key, algorithms=[str(header["alg"])], audience=audience, leeway=10,
                                    options={"require": ["iss", "sub", "aud", "exp", "jti"]})
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError:
                raise SmartError("invalid_client", f"the client_assertion's audience (aud) must be this token endpoint: {audience}") from None
            except jwt.ExpiredSignatureError:
                raise SmartError("invalid_client", "the client_assertion has expired (exp): sign a new one") from None
            except jwt.PyJWTError as err:
                raise SmartError("invalid_client", f"the client_assertion is refused: {err}") from None
        if claims is None:
            raise SmartError("invalid_client", "the client_assertion's signature matches none of the client's keys")
        if claims["sub"] != claims["iss"]:
            raise SmartError("invalid_client", "the client_assertion's sub must be its iss, the client id")
        now = self.clock()
        if float(claims["exp"]) > now + MAX_ASSERTION_SECONDS + 10:
            raise SmartError("invalid_client", f"the client_assertion may expire {MAX_ASSERTION_SECONDS // 60} minutes ahead at most")
        return client, str(claims["jti"]), float(claims["exp"])

    def _forget_expired(self, now: float) -> None:
        """Tokens, used assertions and apps' codes past their expiry (and a minute) are of no more use: a token request
        clears them."""
        old = [(namespace, key) for namespace in (SEEN_ASSERTIONS, TOKENS, CODES, USED_CODES)
               for key, value in self.store.list_state(namespace) if float(value.get("expires", 0)) + 60 < now]
        if old:
            self.store.write(lambda tx: [tx.put_state(namespace, key, None) for namespace, key in old])

    # -- using a token

    def grant(self, token: str) -> Grant | None:
        """What a presented access token stands for; None if unknown, expired, or its account or client is gone."""
        if not token.startswith("rbs_"):
            return None
        key = _digest(token)
        now = time.monotonic()
        with self._lock:
            read_at, grant = self._grants.get(key, (None, None))
        if read_at is None or now - read_at > TOKEN_CACHE_SECONDS:
            value = self.store.get_state(TOKENS, key)
            account = self.accounts.get(value["username"]) if value else None
            grant = None
            context = "user" if value and value["scope"].startswith("user/") else "system"
            client_known = value and (self.get(value["client_id"]) if context == "system" else self.app(value["client_id"]))
            if value and account is not None and client_known:
                grant = Grant(account, value["client_id"], merged(s for _t, s in parse_scopes(value["scope"], context)),
                              float(value["expires"]), context)
            with self._lock:
                if len(self._grants) > 10_000:
                    self._grants.clear()
                self._grants[key] = (now, grant)
        if grant is None or grant.expires < self.clock() or not grant.account.active:
            return None
        return grant

    def configuration(self, base_url: str) -> dict[str, Any]:
        """`.well-known/smart-configuration`: how a backend service, or an app a person uses, gets a token here."""
        return {
            "authorization_endpoint": f"{base_url}/auth/authorize",
            "token_endpoint": f"{base_url}/auth/token",
            "grant_types_supported": ["client_credentials", "authorization_code"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["system/*.read", "system/*.write", "system/*.rs", "system/*.cud", "system/*.cruds",
                                 "user/*.read", "user/*.write", "user/*.rs", "user/*.cruds"],
            "capabilities": ["client-confidential-asymmetric", "launch-standalone", "client-public", "permission-v1",
                             "permission-v2", "permission-user"],
        }


def _key_set(jwks: dict[str, Any]) -> jwt.PyJWKSet:
    """The client's public keys; ValueError if they are not a JWK Set of RSA or EC keys, or hold a private part."""
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError("the keys must be a JWK Set: {\"keys\": [ … ]}")
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") not in ("RSA", "EC"):
            raise ValueError("each key must be an RSA or EC public key (kty RSA or EC)")
        if "d" in key:
            raise ValueError("a key holds its private part ('d'): give the public keys only, the client keeps its private key")
    try:
        return jwt.PyJWKSet.from_dict({"keys": keys})
    except jwt.PyJWTError as err:
        raise ValueError(f"the keys cannot be read: {err}") from None
