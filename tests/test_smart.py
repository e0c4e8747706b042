"""SMART Backend Services over a real server: a client's own key for short-lived tokens, limited by its scopes."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rebond.security.accounts import Accounts
from rebond.security.smart import SmartClients, SmartError, parse_scopes
from rebond.store import open_store
from tests.server import RebondServer, rebond

FHIR = {"Content-Type": "application/fhir+json"}
SCOPES = "system/Observation.cu system/Patient.rs"


def _jwks(key: Any, kid: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    public = json.loads(algorithm.to_jwk(key.public_key()))
    return {"keys": [{**public, "kid": kid, "use": "sig"}]}


def _assertion(key: Any, client_id: str, audience: str, *, kid: str = "k1", alg: str = "RS384", expires_in: float = 120,
               jti: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "exp": now + int(expires_in), "jti": jti or str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048), "ec": ec.generate_private_key(ec.SECP384R1()),
            "stranger": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


@pytest.fixture(scope="module")
def smart(demo_template: Path, tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> Iterator[tuple[RebondServer, str, str]]:
    """A server with an interface account and two clients registered on the command line: (server, RSA client, EC client)."""
    import shutil

    folder = tmp_path_factory.mktemp("smart")
    shutil.copyfile(demo_template, folder / "demo.db")
    db = f"sqlite:///{folder / 'demo.db'}"
    store = open_store(db)
    Accounts(store).save("lab-engine", "unused-9f2c", "system", "Lab middleware")  # an interface's account
    store.close()
    ids = []
    for name, alg in (("rsa", "RS384"), ("ec", "ES384")):
        (folder / f"{name}.json").write_text(json.dumps(_jwks(keys[name], "k1")))
        made = rebond("accounts", "client", "lab-engine", "--jwks", str(folder / f"{name}.json"), "--scope", SCOPES,
                      "--label", f"lab middleware ({alg})", "--db", db)
        assert made.returncode == 0, made.stderr
        ids.append(made.stdout.strip())
    server = RebondServer(db).start()
    yield server, ids[0], ids[1]
    server.stop()


def _token(server: RebondServer, assertion: str, scope: str = SCOPES) -> httpx.Response:
    return httpx.post(f"{server.base}/auth/token", data={
        "grant_type": "client_credentials", "scope": scope, "client_assertion": assertion,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}, timeout=10)


def test_a_client_finds_the_token_endpoint_and_gets_a_token_with_its_own_key(smart: tuple[RebondServer, str, str],
                                                                            keys: dict[str, Any]) -> None:
    server, rsa_client, ec_client = smart
    config = httpx.get(f"{server.fhir}/.well-known/smart-configuration", timeout=10).json()
    endpoint = config["token_endpoint"]
    assert endpoint == f"{server.base}/auth/token" and "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    security = httpx.get(f"{server.fhir}/metadata", timeout=10).json()["rest"][0]["security"]
    assert security["extension"][0]["extension"][0]["valueUri"] == endpoint

    for client, key, alg in ((rsa_client, keys["rsa"], "RS384"), (ec_client, keys["ec"], "ES384")):
        answer = _token(server, _assertion(key, client, endpoint, alg=alg))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["token_type"] == "bearer" and body["expires_in"] == 300 and body["scope"] == SCOPES
        assert answer.headers["cache-control"] == "no-store"


def test_a_token_does_what_its_scopes_say_and_no_more(smart: tuple[RebondServer, str, str], keys: dict[str, Any]) -> None:
    server, client, _ec = smart
    token = _token(server, _assertion(keys["rsa"], client, f"{server.base}/auth/token")).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    patients = httpx.get(f"{server.fhir}/Patient?_count=1", headers=auth, timeout=10)
    assert patients.status_code == 200 and patients.json()["entry"]
    patient = patients.json()["entry"][0]["resource"]["id"]
    made = httpx.post(f"{server.fhir}/Observation", headers={**auth, **FHIR}, timeout=10, json={
        "resourceType": "Observation", "status": "final", "code": {"text": "Potassium"}, "subject": {"reference": f"Patient/{patient}"},
        "valueQuantity": {"value": 4.1, "unit": "mmol/L"}})
    assert made.status_code == 201, made.text

    for method, path, needs in (("GET", "Observation?_count=1", "system/Observation.read"),
                                ("POST", "Patient", "system/Patient.write"),
                                ("GET", f"Patient?_id={patient}&_revinclude=Observation:subject", "system/*.read"),
                                ("GET", "_history", "system/*.read"),
                                ("POST", "", "system/*.write")):
        body = {"resourceType": "Bundle", "type": "batch", "entry": []} if path == "" else {"resourceType": "Patient"}
        refused = httpx.request(method, f"{server.fhir}/{path}", headers={**auth, **FHIR}, timeout=10,
                                json=body if method == "POST" else None)
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["resourceType"] == "OperationOutcome" and needs in refused.json()["issue"][0]["diagnostics"]
    time.sleep(1)  # the trail is written every quarter of a second
    listed = rebond("audit", "list", "--user", "lab-engine", "--json", "--db", server.db).stdout
    trail = [json.loads(line) for line in listed.splitlines()]
    assert len(trail) >= 7 and {line["outcome"] for line in trail} >= {200, 201, 403}, "on the trail, in the client's account's name"


def test_refused_token_requests_say_why_in_oauth_terms(smart: tuple[RebondServer, str, str], keys: dict[str, Any]) -> None:
    server, client, _ec = smart
    endpoint = f"{server.base}/auth/token"
    used = _assertion(keys["rsa"], client, endpoint)
    assert _token(server, used).status_code == 200
    cases = [
        (used, SCOPES, "invalid_client", "used already"),
        (_assertion(keys["stranger"], client, endpoint), SCOPES, "invalid_client", "matches none of the client's keys"),
        (_assertion(keys["rsa"], "nobody", endpoint), SCOPES, "invalid_client", "no client"),
        (_assertion(keys["rsa"], client, "https://elsewhere/auth/token"), SCOPES, "invalid_client", "audience"),
        (_assertion(keys["rsa"], client, endpoint, expires_in=3600), SCOPES, "invalid_client", "5 minutes ahead"),
        (_assertion(keys["rsa"], client, endpoint, expires_in=-60), SCOPES, "invalid_client", "expired"),
        (_assertion(keys["rsa"], client, endpoint, alg="RS256"), SCOPES, "invalid_client", "RS384 or ES384"),
        (_assertion(keys["rsa"], client, endpoint), "system/Encounter.read", "invalid_scope", "none of the scopes"),
        (_assertion(keys["rsa"], client, endpoint), "user/*.read", "invalid_scope", "not a scope of this server"),
        ("not-a-jwt", SCOPES, "invalid_client", "not a JWT"),
    ]
    for assertion, scope, error, said in cases:
        answer = _token(server, assertion, scope)
        assert answer.status_code == 400 and answer.json()["error"] == error, (said, answer.text)
        assert said in answer.json()["error_description"], (said, answer.json())
    subset = _token(server, _assertion(keys["rsa"], client, endpoint), "system/Patient.rs system/Encounter.read")
    assert subset.json()["scope"] == "system/Patient.rs", "what was registered is granted, the rest left out"
    wrong_grant = httpx.post(endpoint, data={"grant_type": "password", "username": "nurse"}, timeout=10)
    assert wrong_grant.status_code == 400 and wrong_grant.json()["error"] == "unsupported_grant_type"
    forged = httpx.get(f"{server.fhir}/Patient", headers={"Authorization": "Bearer rbs_forged"}, timeout=10)
    assert forged.status_code == 401 and "expired" in forged.json()["issue"][0]["diagnostics"]


def test_tokens_expire_and_go_with_their_client(tmp_path: Path, keys: dict[str, Any]) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    try:
        accounts = Accounts(store)
        accounts.save("lab-engine", "unused-9f2c", "system", "Lab middleware")
        now = [time.time()]
        clients = SmartClients(store, accounts, clock=lambda: now[0])
        client = clients.register("lab-engine", _jwks(keys["rsa"], "k1"), SCOPES)
        issued = clients.issue({"grant_type": "client_credentials", "scope": SCOPES, "client_assertion": _assertion(
            keys["rsa"], client.client_id, "https://rebond/auth/token"),
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}, "https://rebond/auth/token")
        grant = clients.grant(issued["access_token"])
        assert grant is not None and grant.account.username == "lab-engine" and grant.scopes.allows("Patient", write=False)
        assert not grant.scopes.allows("Patient", write=True) and grant.scopes.allows("Observation", write=True)
        now[0] += 301
        assert clients.grant(issued["access_token"]) is None, "five minutes, then a new token"
        now[0] -= 301
        assert clients.revoke(client.client_id) and clients.grant(issued["access_token"]) is None
        with pytest.raises(ValueError, match="private part"):
            private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["rsa"]))
            clients.register("lab-engine", {"keys": [private]}, SCOPES)
        with pytest.raises(ValueError, match="no account"):
            clients.register("nobody", _jwks(keys["rsa"], "k1"), SCOPES)
    finally:
        store.close()


def test_scopes_read_as_smart_v1_and_v2() -> None:
    def grants(scope: str) -> tuple[set[str], set[str]]:
        (_text, s), = parse_scopes(scope)
        return set(s.read), set(s.write)

    assert grants("system/Patient.read") == ({"Patient"}, set())
    assert grants("system/Patient.write") == (set(), {"Patient"})
    assert grants("system/*.*") == ({"*"}, {"*"})
    assert grants("system/Observation.rs") == ({"Observation"}, set())
    assert grants("system/Observation.cud") == (set(), {"Observation"})
    assert grants("system/*.cruds") == ({"*"}, {"*"})
    for wrong in ("patient/*.read", "system/Patient.sr", "system/Patient.", "openid", "system/patient.read"):
        with pytest.raises(SmartError):
            parse_scopes(wrong)


def test_one_assertion_sent_twice_at_once_gets_one_token(smart: tuple[RebondServer, str, str], keys: dict[str, Any]) -> None:
    """A stolen assertion replayed beside its first use: the assertion's jti is claimed in the token's own transaction."""
    from concurrent.futures import ThreadPoolExecutor

    server, client, _ec = smart
    assertion = _assertion(keys["rsa"], client, f"{server.base}/auth/token")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _i: _token(server, assertion).status_code, range(8)))
    assert sorted(answers) == [200] + [400] * 7


# -- an app a person uses (SMART App Launch, standalone)

APP_URI = "https://bedside.example/callback"


def _pkce() -> tuple[str, str]:
    import base64
    import hashlib
    import secrets

    verifier = secrets.token_urlsafe(48)
    return verifier, base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def test_a_nurse_lets_an_app_act_for_her_with_her_rights_and_its_scopes(demo_db: str) -> None:
    from urllib.parse import parse_qs, urlencode, urlsplit

    from tests.web_client import csrf_of, signed_in

    made = rebond("accounts", "app", "bedside-app", "--redirect-uri", APP_URI, "--scope", "user/Patient.rs user/Observation.cruds",
                  "--label", "Tablette de chevet", "--db", demo_db)
    assert made.returncode == 0, made.stderr
    server = RebondServer(demo_db).start()
    try:
        config = httpx.get(f"{server.fhir}/.well-known/smart-configuration", timeout=10).json()
        assert config["authorization_endpoint"] == f"{server.base}/auth/authorize" and "S256" in config["code_challenge_methods_supported"]
        verifier, challenge = _pkce()
        asked = {"response_type": "code", "client_id": "bedside-app", "redirect_uri": APP_URI, "state": "s-42", "aud": server.fhir,
                 "scope": "openid fhirUser user/Patient.rs user/Observation.rs user/Encounter.rs",
                 "code_challenge": challenge, "code_challenge_method": "S256"}
        url = f"/auth/authorize?{urlencode(asked)}"
        assert httpx.get(f"{server.base}{url}", follow_redirects=False).headers["location"].startswith("/login?next="), "sign in first"

        nurse = signed_in(server.base, "nurse")
        consent = nurse.get(url)
        assert consent.status_code == 200 and "Tablette de chevet" in consent.text
        assert "lire : les résultats et les constantes, l&#39;identité des patients" in consent.text, "said in words a nurse reads"
        assert "les séjours" not in consent.text, "what the app was not registered for is not asked"
        assert "form-action 'self' https://bedside.example" in consent.headers["content-security-policy"]
        given = nurse.post("/auth/authorize", data={**asked, "csrf": csrf_of(consent.text), "decision": "allow"})
        assert given.status_code == 303 and given.headers["location"].startswith(APP_URI + "?")
        answer = parse_qs(urlsplit(given.headers["location"]).query)
        assert answer["state"] == ["s-42"]
        code = answer["code"][0]

        token_url = f"{server.base}/auth/token"
        exchange = {"grant_type": "authorization_code", "code": code, "redirect_uri": APP_URI, "client_id": "bedside-app"}
        wrong = httpx.post(token_url, data={**exchange, "code_verifier": _pkce()[0]}, timeout=10)
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant", "PKCE: only the app that asked"
        issued = httpx.post(token_url, data={**exchange, "code_verifier": verifier}, timeout=10)
        assert issued.status_code == 200, issued.text
        assert issued.json()["scope"] == "user/Patient.rs user/Observation.rs" and issued.json()["expires_in"] == 1800
        again = httpx.post(token_url, data={**exchange, "code_verifier": verifier}, timeout=10)
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant", "a code is exchanged once"

        auth = {"Authorization": f"Bearer {issued.json()['access_token']}"}
        assert httpx.get(f"{server.fhir}/Patient?_count=1", headers=auth, timeout=10).status_code == 200
        assert httpx.get(f"{server.fhir}/Observation?_count=1", headers=auth, timeout=10).status_code == 200
        refused = httpx.get(f"{server.fhir}/Encounter?_count=1", headers=auth, timeout=10)
        assert refused.status_code == 403 and "user/Encounter.read" in refused.json()["issue"][0]["diagnostics"]
        time.sleep(1)
        listed = rebond("audit", "list", "--user", "nurse", "--json", "--db", demo_db).stdout
        assert any(json.loads(line)["entity"].startswith("GET /fhir/Observation") for line in listed.splitlines()), \
            "what the app read is on the trail in the nurse's name"

        # refused, or asked wrongly: the app is told at its redirect URI; an unknown app or URI is not sent anywhere
        page = nurse.get(url)
        denied = nurse.post("/auth/authorize", data={**asked, "csrf": csrf_of(page.text), "decision": "deny"})
        assert parse_qs(urlsplit(denied.headers["location"]).query) == {"error": ["access_denied"], "state": ["s-42"]}
        no_pkce = nurse.get(f"/auth/authorize?{urlencode({**asked, 'code_challenge_method': 'plain'})}")
        assert no_pkce.status_code == 303 and "error=invalid_request" in no_pkce.headers["location"]
        elsewhere = nurse.get(f"/auth/authorize?{urlencode({**asked, 'redirect_uri': 'https://evil.example/'})}")
        assert elsewhere.status_code == 400 and "evil.example" not in elsewhere.headers.get("location", "")
        admin = signed_in(server.base, "admin")
        assert admin.get(url).status_code == 403, "IT reads no records: it cannot let an app read them either"
    finally:
        server.stop()


def test_the_command_line_lists_clients_and_apps_and_removes_one(demo_db: str) -> None:
    assert rebond("accounts", "app", "viewer", "--redirect-uri", "https://viewer.example/cb", "--scope", "user/*.rs", "--db", demo_db).returncode == 0
    listed = rebond("accounts", "clients", "--db", demo_db)
    assert "viewer" in listed.stdout and "https://viewer.examp" in listed.stdout, "the redirect URI folded, never cut short"
    assert rebond("accounts", "clients", "--revoke", "viewer", "--db", demo_db).returncode == 0
    assert "viewer" not in rebond("accounts", "clients", "--db", demo_db).stdout
    bad = rebond("accounts", "app", "x", "--redirect-uri", "http://elsewhere.example/cb", "--scope", "user/*.rs", "--db", demo_db)
    assert bad.returncode == 1 and "https" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_endpoints_without_a_type_in_their_path_are_scoped_by_the_type_they_serve(smart: tuple[RebondServer, str, str],
                                                                                  keys: dict[str, Any]) -> None:
    server, client, _ec = smart
    token = _token(server, _assertion(keys["rsa"], client, f"{server.base}/auth/token")).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    for path, needs in ((f"{server.fhir}/$audit", "system/AuditEvent.read"),
                        (f"{server.base}/dicom-web/studies/1.2.250.1.999.9.9/metadata", "system/ImagingStudy.read")):
        refused = httpx.get(path, headers=auth, timeout=10)
        assert refused.status_code == 403 and needs in refused.json()["issue"][0]["diagnostics"], (path, refused.text)
