"""API credentials for tests: an interface account (role system) and its bearer token, as an integration would have."""
from __future__ import annotations

from typing import TYPE_CHECKING

from rebond.app import create_app
from rebond.security.accounts import Accounts
from rebond.store import open_store
from rebond.store.base import Store

if TYPE_CHECKING:
    from starlette.testclient import TestClient


def api_token(store: Store, username: str = "interface-tests", role: str = "system") -> str:
    accounts = Accounts(store)
    if accounts.get(username) is None:
        accounts.save(username, "not-used-for-sign-in", role, username)
    return accounts.issue_token(username, "tests")


def api_token_for(db_url: str) -> str:
    store = open_store(db_url)
    try:
        return api_token(store)
    finally:
        store.close()


def api_client(store: Store) -> TestClient:
    """An in-process client of the whole app, sending an API token on every request."""
    from starlette.testclient import TestClient

    client = TestClient(create_app(store))
    client.headers["Authorization"] = f"Bearer {api_token(store)}"
    return client
