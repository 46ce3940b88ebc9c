"""The development OpenID Connect provider: a real OIDC server (discovery, JWKS, token
endpoint, a browser sign-in) with ready-made users for every role, district and specialist
unit, so that `likvard up`, the demo, the web console and the tests sign in exactly as
against a city's own provider.

Development only, never for production: every user's password is "dev", and the dev client
may ask for a token with any claims. A district's case system is a client, not a person: it
signs in with client credentials as `district-system-<district>` (secret "dev"), and its
token carries the district-system role and its district (`dev_clients`).

The web console (`likvard-console`, a public client) signs a person in with the
authorization-code flow and PKCE (S256 only): GET /authorize shows a login form (Swedish, or
English with `ui_locales=en`; accessible, no script, a strict Content-Security-Policy), POST
/authorize checks the ready-made user's password and redirects with a code (random, single
use, 60 s, in memory), POST /token exchanges it with the code verifier for an access token
(the password grant's claims for that user) and an id token. Being a development provider,
it accepts every loopback redirect_uri (127.0.0.1, localhost, ::1; http or https) and the
ones listed, exact, in LIKVARD_DEV_IDP_REDIRECTS (comma separated); any other gets an error
page, never a redirect. GET /logout redirects to an allowed post_logout_redirect_uri (the
provider keeps no session), else shows a "signed out" page.

The signing key (RSA, RS256) is generated into a JWKS file (with the private key, mode
0600) on first start and reused after; its `kid` is the key's RFC 7638 thumbprint, so a new
file is a new key the services learn from the JWKS.

Tokens carry the claims in Keycloak's shape, the default claim mapping of
`likvard.config`: `realm_access.roles`, `likvard_districts`, `likvard_unit`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import DictLoader, Environment, select_autoescape
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from likvard.identity import Role
from likvard.oidc import pkce_s256

DEFAULT_PORT = 8009
PASSWORD = "dev"
DEV_CLIENT_ID = "likvard-dev"
DEV_CLIENT_SECRET = "dev"
CONSOLE_CLIENT_ID = "likvard-console"
SYSTEM_CLIENT_PREFIX = "district-system-"
SYSTEM_CLIENT_SECRET = "dev"
ALGORITHM = "RS256"
CODE_LIFETIME = 60
REDIRECTS_ENV = "LIKVARD_DEV_IDP_REDIRECTS"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WARNING = (
    "Development OpenID provider: ready-made users with the password 'dev'."
    " Never use it for production; point LIKVARD_OIDC_ISSUER at the city's provider."
)
_SHORT = {
    Role.CASE_WORKER: "cw",
    Role.UNIT_STAFF: "us",
    Role.ANALYST: "analyst",
    Role.AUDITOR: "auditor",
    Role.RECORDS_OFFICER: "records",
    Role.OPS: "ops",
    Role.DISTRICT_SYSTEM: "system",
}


@dataclass(frozen=True)
class DevUser:
    """A ready-made user: its login name, pseudonymous subject and claims."""

    username: str
    subject: str
    role: Role
    districts: tuple[str, ...] = ()
    unit: str | None = None


@dataclass(frozen=True)
class DevClient:
    """A ready-made confidential client (a district system's service account): its client
    id, the subject of its tokens and its claims."""

    client_id: str
    subject: str
    role: Role
    districts: tuple[str, ...] = ()


def current_districts(day: date | None = None) -> list[str]:
    """The district codes valid today (reference data)."""
    from likvard.districts import DistrictRegistry

    return [d.code for d in DistrictRegistry.load().current(day or date.today())]


def unit_ids() -> list[str]:
    """The specialist units of the reference catalogue."""
    from likvard.catalogue import ReferenceCatalogue

    return [u.id for u in ReferenceCatalogue.load().units()]


def dev_users(districts: list[str] | None = None, units: list[str] | None = None) -> list[DevUser]:
    """One case worker per current district, one unit-staff user per specialist unit, one
    user for each other role."""
    users = [
        DevUser(f"case-worker-{d}", f"dev-cw-{d}", Role.CASE_WORKER, (d,))
        for d in (current_districts() if districts is None else districts)
    ]
    users += [
        DevUser(f"unit-staff-{u}", f"dev-us-{u}", Role.UNIT_STAFF, unit=u)
        for u in (unit_ids() if units is None else units)
    ]
    people = (Role.CASE_WORKER, Role.UNIT_STAFF, Role.DISTRICT_SYSTEM)  # systems are clients
    users += [DevUser(str(r), f"dev-{_SHORT[r]}", r) for r in Role if r not in people]
    return users


def dev_clients(districts: list[str] | None = None) -> list[DevClient]:
    """One district-system client per current district: `district-system-nordost` signs in
    with client credentials (secret "dev") as the subject `dev-system-nordost`."""
    return [
        DevClient(
            f"{SYSTEM_CLIENT_PREFIX}{d}",
            f"dev-{_SHORT[Role.DISTRICT_SYSTEM]}-{d}",
            Role.DISTRICT_SYSTEM,
            (d,),
        )
        for d in (current_districts() if districts is None else districts)
    ]


def username_for(role: str, district: str | None = None, unit: str | None = None) -> str:
    """The ready-made user's name for a role (and its district or unit)."""
    if role == Role.CASE_WORKER:
        return f"case-worker-{district}" if district else "case-worker"
    if role == Role.UNIT_STAFF:
        return f"unit-staff-{unit}" if unit else "unit-staff"
    return role


def load_or_create_keys(path: Path) -> KeySet:
    """The provider's signing keys from a JWKS file, generated (RSA 2048, RS256) when the
    file does not exist; written with mode 0600 because it holds the private key."""
    if path.exists():
        return KeySet.import_key_set(json.loads(path.read_text(encoding="utf-8")))
    key = RSAKey.generate_key(2048, parameters={"alg": ALGORITHM, "use": "sig"}, private=True)
    key.ensure_kid()
    keys = KeySet([key])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(keys.as_dict(private=True), f)
    return keys


def signing_key(keys: KeySet) -> RSAKey:
    """The key the provider signs with: the first RSA key of its set."""
    for key in keys.keys:
        if isinstance(key, RSAKey):
            return key
    raise ValueError("the keys file holds no RSA key")


def claims_for(
    issuer: str,
    audience: str,
    subject: str,
    roles: list[str],
    districts: list[str],
    unit: str | None,
    lifetime: int,
    now: int | None = None,
    client_id: str = DEV_CLIENT_ID,
) -> dict[str, Any]:
    """A token's claims, Keycloak's shape (realm_access.roles); `azp` is the client that
    asked."""
    issued = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "nbf": issued,
        "exp": issued + lifetime,
        "azp": client_id,
        "realm_access": {"roles": roles},
        "likvard_districts": districts,
    }
    if unit:
        claims["likvard_unit"] = unit
    return claims


# -- the browser sign-in (authorization code with PKCE) ------------------------------------

_PARAMETERS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "nonce",
    "scope",
    "ui_locales",
)
_MAX_PARAMETER = 2048
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256 digest, unpadded
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 section 4.1
_URI_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # printable ASCII: safe in a Location header
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:\d+)?|https?://\[[0-9a-fA-F:]+\](:\d+)?")
_LOOPBACK_ORIGIN = r"https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?"


def listed_redirects(environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The redirect URIs LIKVARD_DEV_IDP_REDIRECTS allows besides loopback ones (exact)."""
    return frozenset(u.strip() for u in environ.get(REDIRECTS_ENV, "").split(",") if u.strip())


def redirect_allowed(uri: str, listed: Collection[str] = ()) -> bool:
    """The provider may send a browser to `uri`: printable ASCII, http(s), no fragment or
    user info, and a loopback host or listed exactly (a development provider's rule; a
    city's provider registers each URI)."""
    if not _URI_CHARACTERS.fullmatch(uri):
        return False
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.fragment or "@" in parts.netloc:
        return False
    return uri in listed or parts.hostname in LOOPBACK_HOSTS


def _origin(uri: str) -> str | None:
    """The origin of an allowed redirect URI, for the form-action of the CSP; None when it
    is not a plain origin (the browser then refuses the redirect: safe)."""
    parts = urlsplit(uri)
    origin = f"{parts.scheme}://{parts.netloc}"
    return origin if _ORIGIN.fullmatch(origin) else None


def _with_query(uri: str, params: Mapping[str, str | None]) -> str:
    """`uri` with the parameters added to its query (those that are None left out)."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return uri + ("&" if urlsplit(uri).query else "?") + query


def _locale(ui_locales: str | None) -> str:
    """sv or en: the first of them among the request's ui_locales, else sv."""
    for tag in (ui_locales or "").split():
        language = tag.split("-")[0].lower()
        if language in _TEXTS:
            return language
    return "sv"


@dataclass(frozen=True)
class AuthRequest:
    """A checked authorization request: the values the form carries and the code binds."""

    client_id: str
    redirect_uri: str
    state: str | None
    challenge: str
    nonce: str | None
    scope: str
    lang: str

    def hidden(self) -> list[tuple[str, str]]:
        """The request's parameters as the form's hidden fields."""
        fields = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "state": self.state,
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "nonce": self.nonce,
            "scope": self.scope,
            "ui_locales": self.lang,
        }
        return [(k, v) for k, v in fields.items() if v is not None]


@dataclass(frozen=True)
class Refusal:
    """An authorization request refused: an error page (`redirect` None; the redirect_uri
    cannot be trusted) or a redirect with an RFC 6749 error."""

    reason: str
    lang: str
    redirect: str | None = None


def check_authorization(
    pairs: Iterable[tuple[str, str]], listed: Collection[str] = ()
) -> AuthRequest | Refusal:
    """The authorization request's parameters checked, in the order that decides whether
    the redirect_uri may be used to report an error (RFC 6749 section 4.1.2.1)."""
    params: dict[str, str] = {}
    repeated = False
    for name, value in pairs:
        if name in _PARAMETERS:
            repeated = repeated or name in params
            params[name] = value
    lang = _locale(params.get("ui_locales"))
    if repeated or any(len(v) > _MAX_PARAMETER for v in params.values()):
        return Refusal("request", lang)
    if params.get("client_id") != CONSOLE_CLIENT_ID:
        return Refusal("client", lang)
    redirect_uri = params.get("redirect_uri", "")
    if not redirect_allowed(redirect_uri, listed):
        return Refusal("redirect", lang)
    state = params.get("state") or None
    if params.get("response_type") != "code":
        error = {"error": "unsupported_response_type", "state": state}
        return Refusal("request", lang, _with_query(redirect_uri, error))
    challenge = params.get("code_challenge", "")
    if params.get("code_challenge_method") != "S256" or not _CHALLENGE.fullmatch(challenge):
        return Refusal("pkce", lang)
    scope = params.get("scope", "")
    if "openid" not in scope.split():
        error = {"error": "invalid_scope", "state": state}
        return Refusal("request", lang, _with_query(redirect_uri, error))
    nonce = params.get("nonce") or None
    return AuthRequest(CONSOLE_CLIENT_ID, redirect_uri, state, challenge, nonce, scope, lang)


@dataclass(frozen=True)
class Grant:
    """What an authorization code stands for: who signed in, for which client, redirect
    and PKCE challenge."""

    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str | None
    user: DevUser
    auth_time: int
    expires: float


class CodeStore:
    """Authorization codes in memory: random (256 bits), single use, short-lived.
    Thread-safe: the token endpoint may run in several threads."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}

    def issue(self, grant: Grant) -> str:
        code = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            self._grants = {c: g for c, g in self._grants.items() if g.expires > now}
            self._grants[code] = grant
        return code

    def take(self, code: str) -> Grant | None:
        """The code's grant, once: every attempt uses the code up, a failed one too (so a
        stolen code cannot be tried against many verifiers)."""
        with self._lock:
            grant = self._grants.pop(code, None)
        return grant if grant is not None and grant.expires > self.clock() else None


_TEXTS: dict[str, dict[str, str]] = {
    "sv": {
        "title": "Logga in – Likvärd (utvecklingsmiljö)",
        "heading": "Logga in på Likvärd",
        "note": "Det här är utvecklingsmiljöns inloggning (likvard dev-idp), aldrig för"
        " produktion. Alla färdiga användare har lösenordet ”dev”.",
        "username": "Användarnamn",
        "password": "Lösenord",
        "submit": "Logga in",
        "wrong": "Fel användarnamn eller lösenord.",
        "users": "Färdiga användare",
        "error_title": "Inloggningen kan inte göras – Likvärd",
        "error_heading": "Inloggningen kan inte göras",
        "request": "Begäran är ofullständig eller felaktig.",
        "client": "Klienten (client_id) är okänd.",
        "redirect": "Adressen att gå tillbaka till (redirect_uri) är inte tillåten.",
        "pkce": "Begäran saknar en PKCE-utmaning (code_challenge) med metoden S256.",
        "out_title": "Utloggad – Likvärd",
        "out_heading": "Du är utloggad",
        "out": "Du kan stänga fönstret.",
    },
    "en": {
        "title": "Sign in – Likvärd (development)",
        "heading": "Sign in to Likvärd",
        "note": "This is the development sign-in (likvard dev-idp), never for production."
        " Every ready-made user has the password “dev”.",
        "username": "Username",
        "password": "Password",
        "submit": "Sign in",
        "wrong": "Wrong username or password.",
        "users": "Ready-made users",
        "error_title": "Cannot sign in – Likvärd",
        "error_heading": "Cannot sign in",
        "request": "The request is incomplete or malformed.",
        "client": "The client (client_id) is unknown.",
        "redirect": "The address to return to (redirect_uri) is not allowed.",
        "pkce": "The request has no PKCE challenge (code_challenge) with the method S256.",
        "out_title": "Signed out – Likvärd",
        "out_heading": "You are signed out",
        "out": "You may close this window.",
    },
}

_PAGES = Environment(
    loader=DictLoader(
        {
            "page.html": """<!doctype html>
<html lang="{{ lang }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<link rel="stylesheet" href="login.css">
</head>
<body>
<main>
<h1>{{ heading }}</h1>
{% block content %}<p>{{ message }}</p>{% endblock %}
</main>
</body>
</html>
""",
            "login.html": """{% extends "page.html" %}{% block content %}
<p class="note">{{ t.note }}</p>
{% if wrong %}<p class="error" id="login-error" role="alert">{{ t.wrong }}</p>
{% endif %}<form method="post" action="authorize">
{% for name, value in hidden %}<input type="hidden" name="{{ name }}" value="{{ value }}">
{% endfor %}<label for="username">{{ t.username }}</label>
<input id="username" name="username" type="text" autocomplete="username"
 autocapitalize="none" spellcheck="false" required value="{{ username }}"
 {%- if wrong %} aria-describedby="login-error"{% endif %}>
<label for="password">{{ t.password }}</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">{{ t.submit }}</button>
</form>
<h2>{{ t.users }}</h2>
<ul class="users">
{% for name in usernames %}<li><code>{{ name }}</code></li>
{% endfor %}</ul>
{% endblock %}""",
        }
    ),
    autoescape=select_autoescape(default=True, default_for_string=True),
)

LOGIN_CSS = """body{margin:0;background:#f3f4f6;color:#1b1f24;font:1rem/1.5 system-ui,sans-serif}
main{max-width:30rem;margin:2rem auto;padding:1.5rem 2rem;background:#fff;
border:1px solid #c4cad3;border-radius:.5rem}
h1{margin-top:0;font-size:1.5rem}
h2{font-size:1.125rem}
.note{padding:.5rem .75rem;background:#fff4d6;border-left:.25rem solid #8a5a00}
.error{padding:.5rem .75rem;background:#fdecec;border-left:.25rem solid #a11b1b;color:#7a1212}
label{display:block;margin-top:1rem;font-weight:600}
input{display:block;box-sizing:border-box;width:100%;padding:.5rem;font:inherit;
border:1px solid #5f6b7a;border-radius:.25rem}
button{margin-top:1.25rem;padding:.6rem 1.25rem;font:inherit;font-weight:600;color:#fff;
background:#1d4f91;border:0;border-radius:.25rem;cursor:pointer}
:focus-visible{outline:3px solid #1d4f91;outline-offset:2px}
.users{padding-left:1.25rem;columns:2}
"""


def _page_headers(form_target: str | None = None) -> dict[str, str]:
    """A strict CSP (no script, the provider's own style sheet, forms only to itself and
    the redirect's origin), never framed, never cached."""
    form_action = "'self'" + (f" {form_target}" if form_target else "")
    return {
        "Content-Security-Policy": "default-src 'none'; style-src 'self'; form-action"
        f" {form_action}; frame-ancestors 'none'; base-uri 'none'",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


def login_page(
    request: AuthRequest, usernames: Iterable[str], username: str = "", *, wrong: bool = False
) -> HTMLResponse:
    """The login form (again, with the error, after a wrong password: 401); the password
    is never echoed."""
    t = _TEXTS[request.lang]
    html = _PAGES.get_template("login.html").render(
        lang=request.lang,
        title=t["title"],
        heading=t["heading"],
        t=t,
        wrong=wrong,
        hidden=request.hidden(),
        username=username,
        usernames=list(usernames),
    )
    headers = _page_headers(_origin(request.redirect_uri))
    return HTMLResponse(html, status_code=401 if wrong else 200, headers=headers)


def message_page(
    lang: str, kind: str, reason: str | None = None, status: int = 200
) -> HTMLResponse:
    """The error page (kind "error") or the signed-out page (kind "out")."""
    t = _TEXTS[lang]
    html = _PAGES.get_template("page.html").render(
        lang=lang,
        title=t[f"{kind}_title"],
        heading=t[f"{kind}_heading"],
        message=t[reason or kind],
    )
    return HTMLResponse(html, status_code=status, headers=_page_headers())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _error(code: str, detail: str, status: int = 400) -> JSONResponse:
    return JSONResponse(
        {"error": code, "error_description": detail},
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


def create_app(
    keys: KeySet,
    issuer: str,
    audience: str = "likvard",
    lifetime: int = 3600,
    users: list[DevUser] | None = None,
    clients: list[DevClient] | None = None,
    redirects: Collection[str] | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The provider's HTTP API: discovery, the public JWKS, the token endpoint and the
    browser sign-in. `redirects`: the non-loopback redirect URIs allowed (default:
    LIKVARD_DEV_IDP_REDIRECTS)."""
    key = signing_key(keys)
    by_name = {u.username: u for u in (dev_users() if users is None else users)}
    by_client = {c.client_id: c for c in (dev_clients() if clients is None else clients)}
    listed = listed_redirects() if redirects is None else frozenset(redirects)
    codes = CodeStore(clock)
    app = FastAPI(title="Likvärd development OpenID provider", description=WARNING)
    # The console's script may read discovery and the keys and exchange its code itself.
    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=_LOOPBACK_ORIGIN,
        allow_origins=sorted({o for o in map(_origin, listed) if o}),
        allow_methods=["GET", "POST"],
        allow_headers=["Content-Type"],
    )

    def encode(claims: dict[str, Any]) -> str:
        return jwt.encode({"alg": ALGORITHM, "kid": key.kid, "typ": "JWT"}, claims, key)

    def sign(
        subject: str,
        roles: list[str],
        districts: list[str],
        unit: str | None,
        client_id: str = DEV_CLIENT_ID,
    ) -> str:
        claims = claims_for(
            issuer,
            audience,
            subject,
            roles,
            districts,
            unit,
            lifetime,
            now=int(clock()),
            client_id=client_id,
        )
        return encode(claims)

    def answer(token: str, **more: str) -> JSONResponse:
        body = {"access_token": token, "token_type": "Bearer", "expires_in": lifetime} | more
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def id_token(grant: Grant, access: str) -> str:
        """The OIDC id token for the console: who signed in, when, and the request's nonce;
        `at_hash` ties it to the access token issued with it."""
        now = int(clock())
        claims: dict[str, Any] = {
            "iss": issuer,
            "aud": grant.client_id,
            "azp": grant.client_id,
            "sub": grant.user.subject,
            "iat": now,
            "exp": now + lifetime,
            "auth_time": grant.auth_time,
            "at_hash": _b64(hashlib.sha256(access.encode("ascii")).digest()[:16]),
        }
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        return encode(claims)

    def refused(refusal: Refusal) -> Response:
        if refusal.redirect is not None:
            return RedirectResponse(refusal.redirect, status_code=303)
        return message_page(refusal.lang, "error", refusal.reason, 400)

    @app.get("/.well-known/openid-configuration")
    def discovery() -> dict[str, Any]:
        return {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "end_session_endpoint": f"{issuer}/logout",
            "jwks_uri": f"{issuer}/jwks",
            "scopes_supported": ["openid"],
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "password", "client_credentials"],
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "none"],
            "ui_locales_supported": sorted(_TEXTS),
            "claims_supported": [
                "sub",
                "auth_time",
                "nonce",
                "realm_access",
                "likvard_districts",
                "likvard_unit",
            ],
        }

    @app.get("/jwks")
    def jwks() -> dict[str, Any]:
        return dict(keys.as_dict(private=False))

    @app.get("/users")
    def list_users() -> list[dict[str, Any]]:
        """The ready-made users (development only: their password is 'dev')."""
        return [
            {"username": u.username, "subject": u.subject, "role": str(u.role)}
            | ({"districts": list(u.districts)} if u.districts else {})
            | ({"unit": u.unit} if u.unit else {})
            for u in by_name.values()
        ]

    @app.get("/clients")
    def list_clients() -> list[dict[str, Any]]:
        """The ready-made district-system clients (development only: their secret is 'dev')."""
        return [
            {
                "client_id": c.client_id,
                "subject": c.subject,
                "role": str(c.role),
                "districts": list(c.districts),
            }
            for c in by_client.values()
        ]

    @app.get("/authorize", response_model=None)
    def authorize_form(request: Request) -> Response:
        """The login form for an authorization request (or why it is refused)."""
        checked = check_authorization(request.query_params.multi_items(), listed)
        if isinstance(checked, Refusal):
            return refused(checked)
        return login_page(checked, by_name)

    @app.post("/authorize", response_model=None)
    async def authorize(request: Request) -> Response:
        """The filled-in form: the request checked again (its fields came back from the
        browser), then the password; a code for the redirect_uri when it is right."""
        pairs = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
        checked = check_authorization(pairs, listed)
        if isinstance(checked, Refusal):
            return refused(checked)
        form = dict(pairs)  # the last of a repeated username or password: harmless
        username = form.get("username", "")[:200]
        user = by_name.get(username)
        if user is None or not hmac.compare_digest(form.get("password", ""), PASSWORD):
            return login_page(checked, by_name, username, wrong=True)
        now = clock()
        grant = Grant(
            checked.client_id,
            checked.redirect_uri,
            checked.challenge,
            checked.nonce,
            user,
            int(now),
            now + CODE_LIFETIME,
        )
        target = _with_query(
            checked.redirect_uri, {"code": codes.issue(grant), "state": checked.state}
        )
        return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})

    def exchange(one: Callable[[str], str | None]) -> JSONResponse:
        """The authorization-code grant (RFC 6749 4.1.3, PKCE RFC 7636 4.6)."""
        client_id = one("client_id")
        if client_id != CONSOLE_CLIENT_ID:
            return _error("invalid_client", "unknown client", 401)
        grant = codes.take(one("code") or "")
        if grant is None:
            return _error("invalid_grant", "the code is unknown, used or expired")
        verifier = one("code_verifier") or ""
        if (
            grant.client_id != client_id
            or grant.redirect_uri != one("redirect_uri")
            or not _VERIFIER.fullmatch(verifier)
            or not hmac.compare_digest(pkce_s256(verifier), grant.challenge)
        ):
            return _error("invalid_grant", "the code was issued for another request")
        user = grant.user
        roles, districts = [str(user.role)], list(user.districts)
        access = sign(user.subject, roles, districts, user.unit, client_id)
        return answer(access, id_token=id_token(grant, access), scope="openid")

    @app.post("/token")
    async def token(request: Request) -> JSONResponse:
        form = {k: v for k, v in parse_qs((await request.body()).decode("utf-8")).items()}

        def one(name: str) -> str | None:
            values = form.get(name)
            return values[0] if values else None

        grant = one("grant_type")
        if grant == "authorization_code":
            return exchange(one)
        if grant == "password":
            user = by_name.get(one("username") or "")
            if user is None or one("password") != PASSWORD:
                return _error("invalid_grant", "unknown user or wrong password")
            districts = list(user.districts)
            return answer(sign(user.subject, [str(user.role)], districts, user.unit))
        system = by_client.get(one("client_id") or "")
        if grant == "client_credentials" and system is not None:
            # A district system's service account: its claims are the client's, never asked.
            if one("client_secret") != SYSTEM_CLIENT_SECRET:
                return _error("invalid_client", "unknown client or wrong secret", 401)
            roles, districts = [str(system.role)], list(system.districts)
            return answer(sign(system.subject, roles, districts, None, system.client_id))
        if grant == "client_credentials":
            # The dev client may name any claims: the tests' way to a token for any role,
            # districts, unit and subject (development only).
            if one("client_id") != DEV_CLIENT_ID or one("client_secret") != DEV_CLIENT_SECRET:
                return _error("invalid_client", "unknown client or wrong secret", 401)
            roles = form.get("role", [])
            unknown = [r for r in roles if r not in Role._value2member_map_]
            if unknown:
                return _error("invalid_request", "unknown role")
            districts, unit = form.get("district", []), one("unit")
            named = [f"dev-{_SHORT[Role(roles[0])]}" if roles else DEV_CLIENT_ID]
            subject = one("subject") or "-".join([*named, *districts, *([unit] if unit else [])])
            return answer(sign(subject, roles, districts, unit))
        return _error(
            "unsupported_grant_type", "use authorization_code, password or client_credentials"
        )

    @app.get("/logout", response_model=None)
    def logout(request: Request) -> Response:
        """RP-initiated logout: the provider keeps no session, so this only sends the
        browser back to an allowed post_logout_redirect_uri (with its state)."""
        params = request.query_params
        target = params.get("post_logout_redirect_uri", "")
        client_id = params.get("client_id")
        if client_id in (None, CONSOLE_CLIENT_ID) and redirect_allowed(target, listed):
            back = (
                _with_query(target, {"state": params.get("state")})
                if params.get("state")
                else target
            )
            return RedirectResponse(back, status_code=303, headers={"Cache-Control": "no-store"})
        return message_page(_locale(params.get("ui_locales")), "out")

    @app.get("/login.css")
    def login_css() -> Response:
        return Response(LOGIN_CSS, media_type="text/css", headers={"Cache-Control": "max-age=300"})

    return app


def serve(port: int, keys_path: Path, audience: str, lifetime: int, host: str) -> None:
    """Run the provider (blocks) with uvicorn; issuer http://<host>:<port>."""
    import uvicorn

    keys = load_or_create_keys(keys_path)
    issuer = f"http://{host}:{port}"
    app = create_app(keys, issuer, audience, lifetime)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


__all__ = [
    "CODE_LIFETIME",
    "CONSOLE_CLIENT_ID",
    "DEFAULT_PORT",
    "DEV_CLIENT_ID",
    "DEV_CLIENT_SECRET",
    "LOOPBACK_HOSTS",
    "PASSWORD",
    "REDIRECTS_ENV",
    "SYSTEM_CLIENT_PREFIX",
    "SYSTEM_CLIENT_SECRET",
    "WARNING",
    "AuthRequest",
    "CodeStore",
    "DevClient",
    "DevUser",
    "Grant",
    "Refusal",
    "check_authorization",
    "claims_for",
    "create_app",
    "dev_clients",
    "dev_users",
    "listed_redirects",
    "load_or_create_keys",
    "pkce_s256",
    "redirect_allowed",
    "serve",
    "username_for",
]
