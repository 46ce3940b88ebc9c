"""The development provider's browser sign-in (authorization code with PKCE S256) for the
web console: the login form, the code, its exchange, the refusals, and the whole flow
against the provider process the session runs, its token verified as a service does."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet

from likvard.cli.devidp import (
    CONSOLE_CLIENT_ID,
    CodeStore,
    Grant,
    create_app,
    dev_users,
    load_or_create_keys,
    redirect_allowed,
)
from likvard.identity import Role
from likvard.oidc import OidcVerifier, pkce_s256
from tests.identity import DevIdp

ISSUER = "http://127.0.0.1:9"
REDIRECT = "http://localhost:8004/console/callback"
LISTED = "https://console.example.se/console/callback"
USERS = dev_users(["nordost"], ["hisingen-bostad-forst"])


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Form(HTMLParser):
    """What a browser (and axe) would see of the login page: its inputs, labels, button,
    alerts, and any inline script or style."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.inputs: dict[str, dict[str, str]] = {}
        self.labels: dict[str, str] = {}
        self.buttons: list[dict[str, str]] = []
        self.tags: list[str] = []
        self.alerts: list[str] = []
        self.inline: list[str] = []
        self._label: str | None = None
        self._alert = False
        self._button = False
        self.texts: dict[str, str] = {}
        self._tag: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self._tag = tag
        if "style" in a or tag == "script" or any(k.startswith("on") for k in a):
            self.inline.append(tag)
        if tag == "input":
            self.inputs[a.get("id") or a["name"]] = a
        if tag == "label":
            self._label = a["for"]
        if tag == "button":
            self.buttons.append(a)
            self._button = True
        if a.get("role") == "alert":
            self._alert = True

    def handle_endtag(self, tag: str) -> None:
        self._label, self._alert, self._button = None, False, False

    def handle_data(self, data: str) -> None:
        if self._label:
            self.labels[self._label] = data.strip()
        if self._alert:
            self.alerts.append(data.strip())
        if self._button:
            self.buttons[-1]["text"] = data.strip()
        if self._tag in ("title", "h1") and data.strip():
            self.texts[self._tag] = data.strip()

    def hidden(self) -> dict[str, str]:
        return {n: a["value"] for n, a in self.inputs.items() if a.get("type") == "hidden"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return load_or_create_keys(tmp_path_factory.mktemp("idp") / "keys.json")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(keys: KeySet, clock: Clock) -> Iterator[TestClient]:
    app = create_app(keys, ISSUER, users=USERS, clients=[], redirects=[LISTED], clock=clock)
    with TestClient(app, base_url=ISSUER) as c:
        yield c


def verifier() -> str:
    return secrets.token_urlsafe(48)


def request_params(code_verifier: str, **changes: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CONSOLE_CLIENT_ID,
        "redirect_uri": REDIRECT,
        "state": "st-1",
        "code_challenge": pkce_s256(code_verifier),
        "code_challenge_method": "S256",
        "nonce": "nonce-1",
        "scope": "openid",
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


def sign_in(c: TestClient, code_verifier: str, username: str = "auditor", **changes: str) -> str:
    """The form's fields back with the credentials; the code from the redirect."""
    page = c.get("/authorize", params=request_params(code_verifier, **changes))
    assert page.status_code == 200, page.text
    fields = Form(page.text).hidden() | {"username": username, "password": "dev"}
    answer = c.post("/authorize", data=fields, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["state"] == [changes.get("state", "st-1")]
    code: str = query["code"][0]
    return code


def exchange(
    c: TestClient, code: str, code_verifier: str, changes: dict[str, str] | None = None
) -> httpx.Response:
    form: dict[str, str] = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": CONSOLE_CLIENT_ID,
        "code_verifier": code_verifier,
    } | (changes or {})
    answer: httpx.Response = c.post("/token", data=form)
    return answer


def claims(token: str, keys: KeySet) -> dict[str, Any]:
    return dict(jwt.decode(token, keys, algorithms=["RS256"]).claims)


# --- discovery, the redirect rule -------------------------------------------------------
def test_discovery_names_the_code_flow_with_pkce_s256_and_logout(client: TestClient) -> None:
    doc = client.get("/.well-known/openid-configuration").json()
    assert doc["authorization_endpoint"] == f"{ISSUER}/authorize"
    assert doc["end_session_endpoint"] == f"{ISSUER}/logout"
    assert "code" in doc["response_types_supported"]
    assert {"authorization_code", "password", "client_credentials"} <= set(
        doc["grant_types_supported"]
    )
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["scopes_supported"] == ["openid"]
    assert {"none", "client_secret_post"} <= set(doc["token_endpoint_auth_methods_supported"])


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("http://localhost:8004/console/callback", True),
        ("https://127.0.0.1/cb?x=1", True),
        ("http://[::1]:8004/console/", True),
        ("http://LOCALHOST:8004/console/", True),
        (LISTED, True),
        (LISTED + "/more", False),
        ("https://evil.example/cb", False),
        ("http://localhost.evil.example/cb", False),
        ("http://localhost@evil.example/cb", False),
        ("http://evil.example@localhost/cb", False),
        ("http://localhost:8004/cb#fragment", False),
        ("javascript://localhost/%0aalert(1)", False),
        ("http://localhost:port/cb", False),
        ("http://localhost/a b", False),
        ("http://localhost/\r\nSet-Cookie:x", False),
        ("", False),
    ],
)
def test_loopback_or_listed_redirects_only(uri: str, allowed: bool) -> None:
    assert redirect_allowed(uri, {LISTED}) is allowed


def test_the_listed_redirects_come_from_the_environment(
    keys: KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIKVARD_DEV_IDP_REDIRECTS", f" {LISTED} , https://other.example/cb")
    c = TestClient(create_app(keys, ISSUER, users=USERS, clients=[]))
    params = request_params(verifier(), redirect_uri="https://other.example/cb")
    assert c.get("/authorize", params=params).status_code == 200
    params["redirect_uri"] = "https://third.example/cb"
    assert c.get("/authorize", params=params).status_code == 400


# --- the login form ---------------------------------------------------------------------
def test_the_form_is_swedish_accessible_and_carries_the_request(client: TestClient) -> None:
    params = request_params(verifier())
    page = client.get("/authorize", params=params)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text.startswith('<!doctype html>\n<html lang="sv">')
    form = Form(page.text)
    assert {"title", "main", "h1", "form", "label"} <= set(form.tags)
    assert form.texts["h1"] == "Logga in på Likvärd" and "Likvärd" in form.texts["title"]
    assert form.labels == {"username": "Användarnamn", "password": "Lösenord"}
    assert form.inputs["username"]["name"] == "username"
    assert form.inputs["password"]["type"] == "password"
    assert form.buttons == [{"type": "submit", "text": "Logga in"}]
    assert form.hidden() == params | {"ui_locales": "sv"}
    assert form.inline == [] and form.alerts == []
    assert '"dev"' in page.text or "”dev”" in page.text  # the development note
    assert "case-worker-nordost" in page.text  # the ready-made users listed
    assert page.headers["content-security-policy"] == (
        "default-src 'none'; style-src 'self'; form-action 'self' http://localhost:8004;"
        " frame-ancestors 'none'; base-uri 'none'"
    )
    assert page.headers["cache-control"] == "no-store"
    css = client.get("/login.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_ui_locales_en_gives_the_english_form(client: TestClient) -> None:
    page = client.get("/authorize", params=request_params(verifier(), ui_locales="de en-GB"))
    form = Form(page.text)
    assert '<html lang="en">' in page.text
    assert form.labels == {"username": "Username", "password": "Password"}
    assert form.buttons[0]["text"] == "Sign in"
    assert form.hidden()["ui_locales"] == "en"


def test_every_echoed_value_is_escaped(client: TestClient) -> None:
    evil = '"><script>alert(1)</script>'
    page = client.get("/authorize", params=request_params(verifier(), state=evil, nonce=evil))
    assert page.status_code == 200
    assert "<script" not in page.text and "&lt;script&gt;" in page.text
    assert Form(page.text).hidden()["state"] == evil  # intact after the browser decodes it


# --- the refusals of the request ---------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        {"client_id": "someone-else"},
        {"client_id": None},
        {"redirect_uri": "https://evil.example/console/callback"},
        {"redirect_uri": None},
        {"code_challenge_method": "plain"},
        {"code_challenge_method": None},
        {"code_challenge": None},
        {"code_challenge": "too-short"},
    ],
)
def test_a_bad_request_gets_an_error_page_never_a_redirect(
    client: TestClient, changes: dict[str, str | None]
) -> None:
    page = client.get("/authorize", params=request_params(verifier(), **changes))
    assert page.status_code == 400
    assert "location" not in page.headers
    assert page.text.startswith("<!doctype html>") and "<main>" in page.text
    assert Form(page.text).inline == []


def test_a_repeated_parameter_is_refused(client: TestClient) -> None:
    params = [*request_params(verifier()).items(), ("redirect_uri", "https://evil.example")]
    page = client.get("/authorize", params=params)
    assert page.status_code == 400 and "location" not in page.headers


def test_errors_after_a_good_redirect_uri_go_back_with_rfc6749_errors(
    client: TestClient,
) -> None:
    for changes, error in (
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "profile"}, "invalid_scope"),
    ):
        answer = client.get(
            "/authorize", params=request_params(verifier(), **changes), follow_redirects=False
        )
        assert answer.status_code == 303
        target = urlsplit(answer.headers["location"])
        assert f"{target.scheme}://{target.netloc}{target.path}" == REDIRECT
        assert parse_qs(target.query) == {"error": [error], "state": ["st-1"]}


# --- the credentials --------------------------------------------------------------------
def test_a_wrong_password_shows_the_form_again_with_an_alert(client: TestClient) -> None:
    page = client.get("/authorize", params=request_params(verifier(), ui_locales="en"))
    secret = "not-the-password-7319"
    fields = Form(page.text).hidden() | {"username": "auditor", "password": secret}
    again = client.post("/authorize", data=fields, follow_redirects=False)
    assert again.status_code == 401 and "location" not in again.headers
    form = Form(again.text)
    assert form.alerts == ["Wrong username or password."]
    assert form.inputs["username"]["value"] == "auditor"
    assert form.inputs["username"]["aria-describedby"] == "login-error"
    assert secret not in again.text and form.inputs["password"].get("value") is None
    unknown = fields | {"username": "nobody", "password": "dev"}
    assert client.post("/authorize", data=unknown, follow_redirects=False).status_code == 401


def test_a_posted_foreign_redirect_uri_is_refused_even_with_the_right_password(
    client: TestClient,
) -> None:
    fields = request_params(verifier(), redirect_uri="https://evil.example/cb")
    answer = client.post(
        "/authorize",
        data=fields | {"username": "auditor", "password": "dev"},
        follow_redirects=False,
    )
    assert answer.status_code == 400 and "location" not in answer.headers


# --- the code and its exchange ----------------------------------------------------------
def test_the_code_gives_the_users_access_token_and_an_id_token(
    client: TestClient, keys: KeySet, clock: Clock
) -> None:
    v = verifier()
    code = sign_in(client, v, username="case-worker-nordost")
    clock.now += 5
    answer = exchange(client, code, v)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    access = claims(body["access_token"], keys)
    password = client.post(
        "/token",
        data={"grant_type": "password", "username": "case-worker-nordost", "password": "dev"},
    ).json()
    assert set(access) == set(claims(password["access_token"], keys))  # the same shape
    assert access["sub"] == "dev-cw-nordost" and access["aud"] == "likvard"
    assert access["realm_access"] == {"roles": ["case-worker"]}
    assert access["likvard_districts"] == ["nordost"] and access["azp"] == CONSOLE_CLIENT_ID
    ident = claims(body["id_token"], keys)
    assert ident["iss"] == ISSUER and ident["aud"] == CONSOLE_CLIENT_ID
    assert ident["sub"] == "dev-cw-nordost" and ident["nonce"] == "nonce-1"
    assert ident["auth_time"] == int(clock.now) - 5 and ident["iat"] == int(clock.now)
    assert ident["exp"] == ident["iat"] + 3600
    digest = hashlib.sha256(body["access_token"].encode()).digest()[:16]
    assert ident["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_a_code_is_single_use(client: TestClient) -> None:
    v = verifier()
    code = sign_in(client, v)
    assert exchange(client, code, v).status_code == 200
    again = exchange(client, code, v)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_a_wrong_verifier_is_refused_and_uses_the_code_up(client: TestClient) -> None:
    v = verifier()
    code = sign_in(client, v)
    wrong = exchange(client, code, verifier())
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert "access_token" not in wrong.json()
    assert exchange(client, code, v).json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"redirect_uri": "http://localhost:8004/console/other"}, 400, "invalid_grant"),
        ({"client_id": "likvard"}, 401, "invalid_client"),
        ({"code": "made-up"}, 400, "invalid_grant"),
        ({"code_verifier": "short"}, 400, "invalid_grant"),
    ],
)
def test_an_exchange_for_another_request_is_refused(
    client: TestClient, changes: dict[str, str], status: int, error: str
) -> None:
    v = verifier()
    answer = exchange(client, sign_in(client, v), v, changes)
    assert answer.status_code == status and answer.json()["error"] == error


def test_a_code_expires_after_a_minute(client: TestClient, clock: Clock) -> None:
    v = verifier()
    code = sign_in(client, v)
    clock.now += 61
    assert exchange(client, code, v).json()["error"] == "invalid_grant"


def test_concurrent_exchanges_of_one_code_give_one_grant() -> None:
    store = CodeStore()
    grant = Grant(CONSOLE_CLIENT_ID, REDIRECT, "c" * 43, None, USERS[0], 0, 1e12)
    code = store.issue(grant)
    with ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(lambda _: store.take(code), range(64)))
    assert [t for t in taken if t is not None] == [grant]


# --- logout -----------------------------------------------------------------------------
def test_logout_goes_back_to_an_allowed_uri_else_says_signed_out(client: TestClient) -> None:
    back = client.get(
        "/logout",
        params={"post_logout_redirect_uri": REDIRECT, "client_id": CONSOLE_CLIENT_ID, "state": "z"},
        follow_redirects=False,
    )
    assert back.status_code == 303 and back.headers["location"] == f"{REDIRECT}?state=z"
    for params in (
        {"post_logout_redirect_uri": "https://evil.example/"},
        {"post_logout_redirect_uri": REDIRECT, "client_id": "someone-else"},
        {},
    ):
        page = client.get("/logout", params=params, follow_redirects=False)
        assert page.status_code == 200 and "location" not in page.headers
        assert '<html lang="sv">' in page.text and "Du är utloggad" in page.text


# --- the whole flow against the provider process ----------------------------------------
@pytest.mark.integration
def test_the_console_signs_in_at_the_running_provider(identity_provider: DevIdp) -> None:
    issuer = identity_provider.issuer
    v = verifier()
    with httpx.Client(base_url=issuer, timeout=10, follow_redirects=False) as http:
        doc = http.get("/.well-known/openid-configuration").json()
        params = request_params(v, ui_locales="en")
        page = http.get(urlsplit(doc["authorization_endpoint"]).path, params=params)
        assert page.status_code == 200 and '<html lang="en">' in page.text
        fields = Form(page.text).hidden() | {"username": "analyst", "password": "dev"}
        back = http.post("/authorize", data=fields)
        assert back.status_code == 303
        target = urlsplit(back.headers["location"])
        assert f"{target.scheme}://{target.netloc}{target.path}" == REDIRECT
        code = parse_qs(target.query)["code"][0]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": CONSOLE_CLIENT_ID,
            "code_verifier": v,
        }
        body = http.post(urlsplit(doc["token_endpoint"]).path, data=form).json()
        assert http.post("/token", data=form).json()["error"] == "invalid_grant"
        published = KeySet.import_key_set(http.get("/jwks").json())
    verify = OidcVerifier(issuer, identity_provider.audience)
    try:
        principal = verify.authenticate(body["access_token"])
    finally:
        verify.close()
    assert principal.subject == "dev-analyst" and principal.roles == {Role.ANALYST}
    ident = jwt.decode(body["id_token"], published, algorithms=["RS256"]).claims
    assert ident["aud"] == CONSOLE_CLIENT_ID and ident["nonce"] == "nonce-1"
    assert ident["iss"] == issuer and ident["sub"] == principal.subject
    assert ident["auth_time"] <= ident["iat"]


def test_the_consoles_script_may_call_the_token_endpoint_from_a_loopback_origin(
    client: TestClient,
) -> None:
    def preflight(origin: str) -> str | None:
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        answer = client.options("/token", headers=headers)
        allowed: str | None = answer.headers.get("access-control-allow-origin")
        return allowed

    assert preflight("http://localhost:8004") == "http://localhost:8004"
    assert preflight("https://console.example.se") == "https://console.example.se"  # listed
    assert preflight("https://evil.example") is None
