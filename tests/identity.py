"""Tokens for tests, from the development OpenID provider running as a real process.

conftest.py starts one provider for the session (`SESSION`) and puts its issuer in
os.environ (LIKVARD_OIDC_ISSUER, LIKVARD_OIDC_AUDIENCE) before any app is built, so every
app verifies against it exactly as against a city's provider.

- `token(role, districts=, unit=, subject=)` / `bearer(...)`: a token from the provider's
  token endpoint (a ready-made user's password grant when one fits, else the dev client
  naming the claims); cached while it has more than five minutes left. `token_from(issuer,
  role, ...)`: the same from another dev provider (one a `likvard up` under test started).
- `system_token(district)` / `system_bearer(district)`: a district system's token, by the
  client-credentials grant of its own client `district-system-<district>` (as a district
  system signs in against the city's provider), subject `dev-system-<district>`.
- Forged tokens for the refusals: `SESSION.claims(...)` gives valid claims to change,
  `SESSION.forge(claims)` signs them with the provider's own key (from its keys file),
  `forge(claims, other_key())` with a key it never published, `unsigned(claims)` is
  `alg: none`, `hs256_with_public_key(claims, SESSION.signing_key())` the key-confusion
  attack.
- `DevIdp` / `running_idp(directory)`: a provider process of a test's own (restart it,
  rotate its key, stop it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from likvard.identity import Role
from tests.support import stop_process, wait_for

DEV_CLIENT = {"client_id": "likvard-dev", "client_secret": "dev"}
PASSWORD = "dev"

SESSION: DevIdp | None = None
"""The session's provider (conftest.py sets it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DevIdp:
    """`likvard dev-idp` as a process of its own, with its keys file in `directory`."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        audience: str = "likvard",
        lifetime: int = 3600,
    ) -> None:
        self.directory = directory
        self.keys = directory / "dev-idp-keys.json"
        self.log = directory / "dev-idp.log"
        self.port = port or free_port()
        self.audience = audience
        self.lifetime = lifetime
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "LIKVARD_OIDC_AUDIENCE": self.audience}
        command = [sys.executable, "-m", "likvard.cli", "dev-idp"]
        command += ["--port", str(self.port), "--keys", str(self.keys)]
        command += ["--lifetime", str(self.lifetime)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the dev IdP exited {proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                return httpx.get(f"{self.issuer}/jwks", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 30, "the development OpenID provider")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, 15, 10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def rotate_key(self) -> None:
        """A new signing key (new kid): the keys file is replaced and the provider restarted."""
        self.stop()
        self.keys.unlink(missing_ok=True)
        self.start()

    def signing_key(self) -> RSAKey:
        keys = KeySet.import_key_set(json.loads(self.keys.read_text(encoding="utf-8")))
        key = keys.keys[0]
        assert isinstance(key, RSAKey)
        return key

    def claims(
        self,
        role: Role | str = Role.CASE_WORKER,
        *,
        districts: Iterable[str] = ("nordost",),
        unit: str | None = None,
        subject: str = "dev-test-forged",
        **overrides: Any,
    ) -> dict[str, Any]:
        """Claims the verifier accepts (as this provider issues them); `overrides` replace
        or, with the value None, remove a claim."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "realm_access": {"roles": [str(role)]},
            "likvard_districts": list(_codes(districts)),
        }
        if unit:
            claims["likvard_unit"] = unit
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def forge(
        self,
        claims: dict[str, Any],
        key: RSAKey | None = None,
        *,
        header: dict[str, Any] | None = None,
    ) -> str:
        """Claims signed (RS256) with this provider's own key, or with `key`."""
        return forge(claims, key or self.signing_key(), header=header)

    def token(
        self,
        role: Role | str,
        *,
        districts: Iterable[str] = (),
        unit: str | None = None,
        subject: str | None = None,
    ) -> str:
        return _fetch(self.issuer, str(role), _codes(districts), unit, subject)


@contextmanager
def running_idp(directory: Path, **options: Any) -> Iterator[DevIdp]:
    """A development provider process of the caller's own, stopped afterwards."""
    idp = DevIdp(directory, **options)
    idp.start()
    try:
        yield idp
    finally:
        idp.stop()


def _codes(districts: Iterable[str]) -> tuple[str, ...]:
    return (districts,) if isinstance(districts, str) else tuple(districts)


def _issuer() -> str:
    issuer = os.environ.get("LIKVARD_OIDC_ISSUER")
    if not issuer:
        raise RuntimeError("no LIKVARD_OIDC_ISSUER: conftest.py's dev IdP fixture is not running")
    return issuer


def token(
    role: Role | str,
    *,
    districts: Iterable[str] = (),
    unit: str | None = None,
    subject: str | None = None,
) -> str:
    """An access token from the session's provider (LIKVARD_OIDC_ISSUER) for a principal
    with this role, districts, unit and (default: the ready-made user's) subject."""
    return _fetch(_issuer(), str(role), _codes(districts), unit, subject)


def token_from(
    issuer: str,
    role: Role | str,
    *,
    districts: Iterable[str] = (),
    unit: str | None = None,
    subject: str | None = None,
) -> str:
    """`token(...)` from the development provider at `issuer` (e.g. the one a `likvard up`
    under test started)."""
    return _fetch(issuer.rstrip("/"), str(role), _codes(districts), unit, subject)


def bearer(
    role: Role | str,
    *,
    districts: Iterable[str] = (),
    unit: str | None = None,
    subject: str | None = None,
) -> dict[str, str]:
    """The Authorization header for `token(...)`."""
    return {
        "Authorization": "Bearer " + token(role, districts=districts, unit=unit, subject=subject)
    }


SYSTEM_SECRET = "dev"


def system_token(district: str, *, issuer: str | None = None) -> str:
    """A district system's access token: client credentials of `district-system-<district>`
    at the session's provider (or `issuer`); role district-system, the district's claim."""
    base = (issuer or _issuer()).rstrip("/")
    key = (base, "client", district)
    with _lock:
        cached = _cache.get(key)
    if cached is not None and cached[1] - time.time() > 300:
        return cached[0]
    form = {
        "grant_type": "client_credentials",
        "client_id": f"district-system-{district}",
        "client_secret": SYSTEM_SECRET,
    }
    response = httpx.post(f"{base}/token", data=form, timeout=10)
    response.raise_for_status()
    body = response.json()
    access: str = body["access_token"]
    with _lock:
        _cache[key] = (access, time.time() + float(body["expires_in"]))
    return access


def system_bearer(district: str) -> dict[str, str]:
    """The Authorization header for `system_token(district)`."""
    return {"Authorization": "Bearer " + system_token(district)}


_cache: dict[tuple[object, ...], tuple[str, float]] = {}
_users: dict[str, frozenset[str]] = {}
_lock = threading.Lock()


def _ready_made(issuer: str) -> frozenset[str]:
    with _lock:
        if issuer not in _users:
            listed = httpx.get(f"{issuer}/users", timeout=5).raise_for_status().json()
            _users[issuer] = frozenset(u["username"] for u in listed)
        return _users[issuer]


def _fetch(
    issuer: str, role: str, districts: tuple[str, ...], unit: str | None, subject: str | None
) -> str:
    key = (issuer, role, districts, unit, subject)
    with _lock:
        cached = _cache.get(key)
    if cached is not None and cached[1] - time.time() > 300:
        return cached[0]
    username = _username(role, districts, unit)
    form: dict[str, Any]
    if subject is None and username in _ready_made(issuer):
        form = {"grant_type": "password", "username": username, "password": PASSWORD}
    else:
        form = {"grant_type": "client_credentials", **DEV_CLIENT, "role": [role]}
        form |= {"district": list(districts), "subject": subject, "unit": unit}
        form = {k: v for k, v in form.items() if v is not None}
    response = httpx.post(f"{issuer}/token", data=form, timeout=10)
    response.raise_for_status()
    body = response.json()
    access: str = body["access_token"]
    with _lock:
        _cache[key] = (access, time.time() + float(body["expires_in"]))
    return access


def _username(role: str, districts: tuple[str, ...], unit: str | None) -> str | None:
    if role == Role.CASE_WORKER:
        return f"case-worker-{districts[0]}" if len(districts) == 1 and not unit else None
    if role == Role.UNIT_STAFF:
        return f"unit-staff-{unit}" if unit and not districts else None
    return role if not districts and not unit else None


def other_key() -> RSAKey:
    """A signing key no provider published (its kid is unknown to every verifier)."""
    key = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, private=True)
    key.ensure_kid()
    return key


def forge(claims: dict[str, Any], key: RSAKey, *, header: dict[str, Any] | None = None) -> str:
    """Claims signed RS256 with `key`, its kid in the header (or `header` as given)."""
    head = header if header is not None else {"alg": "RS256", "kid": key.kid, "typ": "JWT"}
    return jwt.encode(head, claims, key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


def unsigned(claims: dict[str, Any], kid: str | None = None) -> str:
    """An `alg: none` token (empty signature): must never be accepted."""
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"} | ({"kid": kid} if kid else {})
    return _segments(header, claims) + "."


def hs256_with_public_key(claims: dict[str, Any], public: RSAKey) -> str:
    """The key-confusion attack: HS256 with the provider's RSA public key (PEM, as a
    verifier that trusts the header's alg would use it) as the HMAC secret. The HMAC is
    computed here on purpose: JOSE libraries refuse to make such a token."""
    header = {"alg": "HS256", "kid": public.kid, "typ": "JWT"}
    signing_input = _segments(header, claims)
    secret = public.as_pem(private=False)
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


__all__ = [
    "SESSION",
    "DevIdp",
    "bearer",
    "forge",
    "free_port",
    "hs256_with_public_key",
    "other_key",
    "running_idp",
    "system_bearer",
    "system_token",
    "token",
    "token_from",
    "unsigned",
]
