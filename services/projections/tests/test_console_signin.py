"""The console signs people in through the real development OpenID provider (the session's
`likvard dev-idp` process): authorization code with PKCE, a sealed session cookie, the
pages each role may open, refusals logged, forms guarded against forgery."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import closing
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from likvard import access_log_audit
from likvard.config import Settings
from services.projections.tests.reporting_app import reporting_app
from services.projections.tests.test_reports import EVENTS

pytestmark = pytest.mark.integration

SECRET = "console-test-secret-0123456789-abcdefghij"
CASE = "case-centrum-01-00"  # a centrum case of EVENTS


class _Form(HTMLParser):
    """The login form's action and hidden fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.action = a.get("action") or ""
        if tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields[str(a["name"])] = a.get("value") or ""


@pytest.fixture
def console(
    database_url: str,
    schema: str,
    new_schema: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[str, str]]:
    """The projections app with its console, serving; (base URL, access-log schema)."""
    monkeypatch.setenv("LIKVARD_CONSOLE_SECRET", SECRET)
    log_schema = new_schema("al")
    with reporting_app(database_url, schema, log_schema, EVENTS) as base:
        yield base, log_schema


def sign_in(
    base: str, username: str, start: str = "/console/"
) -> tuple[httpx.Client, httpx.Response]:
    """Open `start`, follow the sign-in through the provider's form, and land back."""
    client = httpx.Client(timeout=30)
    page = client.get(base + start)
    assert page.status_code == 303 and page.headers["location"].startswith("/console/login")
    to_provider = client.get(urljoin(base, page.headers["location"]))
    assert to_provider.status_code == 303
    authorize = to_provider.headers["location"]
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["client_id"] == ["likvard-console"]
    form_page = client.get(authorize)
    assert form_page.status_code == 200, form_page.text
    form = _Form()
    form.feed(form_page.text)
    sent = client.post(
        urljoin(authorize, form.action),
        data=form.fields | {"username": username, "password": "dev"},
    )
    assert sent.status_code == 303, sent.text
    back = client.get(sent.headers["location"])  # /console/callback?code=...&state=...
    assert back.status_code == 303, back.text
    cookie = back.headers["set-cookie"]
    assert "likvard_session=" in cookie and "HttpOnly" in cookie and "Path=/console" in cookie
    assert "samesite=lax" in cookie.lower()
    landed = client.get(urljoin(base, back.headers["location"]))
    return client, landed


def nav(page: httpx.Response) -> list[str]:
    found = re.search(r'<nav aria-label="[^"]*">(.*?)</nav>', page.text, re.S)
    assert found is not None
    return re.findall(r'href="/console(/[a-z-]+)"', found.group(1))


@pytest.mark.parametrize(
    ("username", "pages"),
    [
        ("analyst", ["/equal-access", "/indicators", "/waits"]),
        (
            "auditor",
            ["/equal-access", "/indicators", "/waits", "/cases", "/access-log", "/history"],
        ),
        ("case-worker-centrum", ["/cases"]),
        ("records-officer", []),
        ("ops", []),
    ],
)
def test_each_role_signs_in_and_sees_its_pages(
    console: tuple[str, str], username: str, pages: list[str]
) -> None:
    base, _ = console
    client, home = sign_in(base, username)
    with closing(client):
        assert home.status_code == 200, home.text
        assert '<html lang="sv">' in home.text and "Logga ut" in home.text
        assert nav(home) == pages
        csp = home.headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert home.headers["cache-control"] == "no-store"


def test_the_sign_in_returns_to_the_page_asked_for(console: tuple[str, str]) -> None:
    base, _ = console
    client, landed = sign_in(base, "auditor", start="/console/access-log?outcome=refused")
    with closing(client):
        assert landed.status_code == 200
        assert str(landed.url).endswith("/console/access-log?outcome=refused")


def test_an_analyst_is_refused_a_case_timeline_and_the_refusal_is_logged(
    console: tuple[str, str], database_url: str
) -> None:
    base, log_schema = console
    client, _ = sign_in(base, "analyst")
    with closing(client):
        refused = client.get(f"{base}/console/cases/{CASE}")
        assert refused.status_code == 403
        assert "Inte tillåtet" in refused.text and "ärendets tidslinje" not in refused.text.lower()
    entries = access_log_audit.search(
        Settings(database_url=database_url), case_id=CASE, schema=log_schema
    )
    assert [(e.actor, e.action, e.outcome) for e in entries] == [
        ("dev-analyst", "case.history", "refused")
    ]


def test_a_case_worker_reads_their_case_and_an_auditor_sees_the_read(
    console: tuple[str, str], database_url: str
) -> None:
    base, log_schema = console
    client, _ = sign_in(base, "case-worker-centrum")
    with closing(client):
        page = client.get(f"{base}/console/cases/{CASE}")
        assert page.status_code == 200, page.text
        assert page.text.count("<tr>") > 2  # the chains' and the events' rows
    entries = access_log_audit.search(
        Settings(database_url=database_url), case_id=CASE, schema=log_schema
    )
    assert [(e.actor, e.outcome) for e in entries] == [("dev-cw-centrum", "allowed")]


def test_a_case_worker_of_another_district_is_asked_for_an_emergency_reason(
    console: tuple[str, str], database_url: str
) -> None:
    base, log_schema = console
    client, _ = sign_in(base, "case-worker-hisingen")
    with closing(client):
        asked = client.get(f"{base}/console/cases/{CASE}")
        assert asked.status_code == 403 and 'name="emergency"' in asked.text
        read = client.get(f"{base}/console/cases/{CASE}", params={"emergency": "child-at-risk"})
        assert read.status_code == 200 and "Nödåtkomst" in read.text
    entries = access_log_audit.search(
        Settings(database_url=database_url), case_id=CASE, schema=log_schema
    )
    assert [(e.outcome, e.emergency_reason) for e in entries] == [
        ("refused", None),
        ("allowed", "child-at-risk"),
    ]


def test_forms_need_the_sessions_token(console: tuple[str, str]) -> None:
    base, _ = console
    client, home = sign_in(base, "auditor")
    with closing(client):
        token = re.search(r'name="csrf" value="([^"]+)"', home.text)
        assert token is not None
        forged = client.post(f"{base}/console/logout", data={"csrf": "not-it"})
        assert forged.status_code == 403
        assert forged.headers["content-type"].startswith("text/html")  # a page, not JSON
        assert client.get(f"{base}/console/").status_code == 200  # still signed in
        foreign = client.post(
            f"{base}/console/logout",
            data={"csrf": token.group(1)},
            headers={"Origin": "http://evil.example"},
        )
        assert foreign.status_code == 403
        out = client.post(f"{base}/console/logout", data={"csrf": token.group(1)})
        assert out.status_code == 303 and "/logout" in out.headers["location"]
        assert client.get(f"{base}/console/").status_code == 303  # signed out


def test_a_callback_of_another_sign_in_is_refused(console: tuple[str, str]) -> None:
    base, _ = console
    with httpx.Client(timeout=30) as client:
        started = client.get(f"{base}/console/login")
        assert started.status_code == 303
        forged = client.get(f"{base}/console/callback", params={"code": "x", "state": "other"})
        assert forged.status_code == 400
        assert "likvard_session=" not in forged.headers.get("set-cookie", "")


def test_english_by_the_switch(console: tuple[str, str]) -> None:
    base, _ = console
    client, _home = sign_in(base, "analyst")
    with closing(client):
        switched = client.get(
            f"{base}/console/language", params={"lang": "en", "next": "/console/"}
        )
        assert switched.status_code == 303
        english = client.get(f"{base}/console/")
        assert '<html lang="en">' in english.text and "Sign out" in english.text
        away = client.get(
            f"{base}/console/language", params={"lang": "sv", "next": "https://evil.example/"}
        )
        assert away.headers["location"] == "/console/"  # never an open redirect


def test_without_a_secret_the_console_says_so(
    database_url: str,
    schema: str,
    new_schema: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LIKVARD_CONSOLE_SECRET", raising=False)
    with reporting_app(database_url, schema, new_schema("al"), []) as base:
        answer = httpx.get(f"{base}/console/", timeout=30)
        assert answer.status_code == 503
        assert "LIKVARD_CONSOLE_SECRET" in answer.text


def test_console_errors_are_pages_and_api_errors_stay_problems(console: tuple[str, str]) -> None:
    base, _ = console
    client, _home = sign_in(base, "auditor")
    with closing(client):
        missing = client.get(f"{base}/console/no-such-page")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("text/html")
        assert "Sidan finns inte" in missing.text
        assert "content-security-policy" in missing.headers
        api = client.get(f"{base}/no-such-route")
        assert api.status_code == 404
        assert api.headers["content-type"] == "application/problem+json"
