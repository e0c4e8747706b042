"""Every page a demo account can reach by following links opens: no error page, no broken link, in both languages.

A page people rarely open (a box, a register, an empty list) is where a template or a reader breaks unseen. Each demo
account follows every link of the web app from its home page, as a person clicking through would (GET only, no forms
sent), and each page must answer without a server error or a link to nowhere.
"""
from __future__ import annotations

import re
from collections import deque
from urllib.parse import urldefrag, urljoin, urlsplit

import httpx
import pytest

from tests.server import RebondServer
from tests.web_client import signed_in

LINK = re.compile(r'href="([^"]+)"')
#: links that change the session rather than show a page
LEAVE_ALONE = ("/logout", "/language/")
#: pages read per account: every kind of page is reached well within it (a census leads to its patients, and so on)
MOST = 120


def _links(base: str, here: str, html: str) -> list[str]:
    out = []
    for found in LINK.findall(html):
        target = urldefrag(urljoin(here, found.replace("&amp;", "&")))[0]
        if target.startswith(base) and not target[len(base):].startswith(LEAVE_ALONE) and "/static/" not in target:
            out.append(target[len(base):] or "/")
    return out


def _kind(path: str) -> str:
    """A page's kind: its path without ids (every chart is one kind)."""
    return re.sub(r"[0-9a-f-]{36}|\d+", "…", urlsplit(path).path)


def _crawl(web: RebondServer, account: str, language: str) -> dict[str, int]:
    """Every page reached from home by links, breadth first (the first of each path without its query seen first); its
    status by path."""
    client: httpx.Client = signed_in(web.base, account)
    if language == "en":
        client.get("/language/en", params={"next": "/"})
    seen: dict[str, int] = {}
    kinds: set[str] = set()
    queue: deque[str] = deque(["/"])
    while queue and len(seen) < MOST:
        path = queue.popleft()
        if path in seen:
            continue
        response = client.get(path)
        seen[path] = response.status_code
        assert response.status_code < 500, f"{account} ({language}): {path} answered {response.status_code}"
        assert "incident" not in response.text, f"{account} ({language}): {path} shows an error page"
        if response.status_code in (301, 302, 303, 307):
            queue.append(urlsplit(response.headers["location"]).path or "/")
            continue
        if not response.headers.get("content-type", "").startswith("text/html"):
            continue
        for link in _links(web.base, f"{web.base}{path}", response.text):
            kind = _kind(link)
            # a new kind of page first; more of a kind already seen (another patient, another box) after
            (queue.appendleft if kind not in kinds else queue.append)(link)
            kinds.add(kind)
    client.close()
    return seen


@pytest.mark.parametrize("account", ["nurse", "doctor", "lab", "pharma", "admin", "crisis"])
def test_every_page_an_account_reaches_by_its_links_opens(web: RebondServer, account: str) -> None:
    for language in ("fr", "en"):
        seen = _crawl(web, account, language)
        broken = {path: status for path, status in seen.items() if status == 404}
        assert not broken, f"{account} ({language}) follows links to nowhere: {broken}"
        assert len(seen) >= {"admin": 8, "crisis": 4}.get(account, MOST), f"{account} reached only {sorted(seen)}"
        print(f"\n{account} ({language}): {len(seen)} pages, {len({_kind(p) for p in seen})} kinds")
