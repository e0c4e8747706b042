"""Signing in to a running Rebond web app from a test, as a browser would (cookies and CSRF tokens)."""
from __future__ import annotations

import re

import httpx

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def entry_of(html: str) -> str:
    """The form's entry (one filling of it: sent twice, it records once)."""
    match = re.search(r'name="entry" value="([0-9a-f-]{36})"', html)
    assert match, "the form names its entry"
    return match.group(1)


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "the page carries a CSRF token"
    return match.group(1)


def signed_in(base: str, username: str, password: str = "rebond-demo") -> httpx.Client:
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=30)
    page = client.get("/login")
    response = client.post("/login", data={"username": username, "password": password, "csrf": csrf_of(page.text), "next": "/"})
    assert response.status_code == 303, response.text[:500]
    return client
