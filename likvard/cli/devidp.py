"""The development OpenID Connect provider: a real OIDC server (discovery, JWKS, token
endpoint) with ready-made users for every role, district and specialist unit, so that
`likvard up`, the demo and the tests sign in exactly as against a city's own provider.

Development only, never for production: every user's password is "dev", and the dev client
may ask for a token with any claims. A district's case system is a client, not a person: it
signs in with client credentials as `district-system-<district>` (secret "dev"), and its
token carries the district-system role and its district (`dev_clients`).

The signing key (RSA, RS256) is generated into a JWKS file (with the private key, mode
0600) on first start and reused after; its `kid` is the key's RFC 7638 thumbprint, so a new
file is a new key the services learn from the JWKS.

Tokens carry the claims in Keycloak's shape, the default claim mapping of
`likvard.config`: `realm_access.roles`, `likvard_districts`, `likvard_unit`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from likvard.identity import Role

DEFAULT_PORT = 8009
PASSWORD = "dev"
DEV_CLIENT_ID = "likvard-dev"
DEV_CLIENT_SECRET = "dev"
SYSTEM_CLIENT_PREFIX = "district-system-"
SYSTEM_CLIENT_SECRET = "dev"
ALGORITHM = "RS256"
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


def _error(code: str, detail: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": detail}, status_code=status)


def create_app(
    keys: KeySet,
    issuer: str,
    audience: str = "likvard",
    lifetime: int = 3600,
    users: list[DevUser] | None = None,
    clients: list[DevClient] | None = None,
) -> FastAPI:
    """The provider's HTTP API: discovery, the public JWKS and the token endpoint."""
    key = signing_key(keys)
    by_name = {u.username: u for u in (dev_users() if users is None else users)}
    by_client = {c.client_id: c for c in (dev_clients() if clients is None else clients)}
    app = FastAPI(title="Likvärd development OpenID provider", description=WARNING)

    def sign(
        subject: str,
        roles: list[str],
        districts: list[str],
        unit: str | None,
        client_id: str = DEV_CLIENT_ID,
    ) -> str:
        claims = claims_for(
            issuer, audience, subject, roles, districts, unit, lifetime, client_id=client_id
        )
        return jwt.encode({"alg": ALGORITHM, "kid": key.kid, "typ": "JWT"}, claims, key)

    def answer(token: str) -> JSONResponse:
        body = {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/.well-known/openid-configuration")
    def discovery() -> dict[str, Any]:
        return {
            "issuer": issuer,
            "jwks_uri": f"{issuer}/jwks",
            "token_endpoint": f"{issuer}/token",
            "grant_types_supported": ["password", "client_credentials"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "token_endpoint_auth_methods_supported": ["client_secret_post"],
            "claims_supported": ["sub", "realm_access", "likvard_districts", "likvard_unit"],
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

    @app.post("/token")
    async def token(request: Request) -> JSONResponse:
        form = {k: v for k, v in parse_qs((await request.body()).decode("utf-8")).items()}

        def one(name: str) -> str | None:
            values = form.get(name)
            return values[0] if values else None

        grant = one("grant_type")
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
        return _error("unsupported_grant_type", "use password or client_credentials")

    return app


def serve(port: int, keys_path: Path, audience: str, lifetime: int, host: str) -> None:
    """Run the provider (blocks) with uvicorn; issuer http://<host>:<port>."""
    import uvicorn

    keys = load_or_create_keys(keys_path)
    issuer = f"http://{host}:{port}"
    app = create_app(keys, issuer, audience, lifetime)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


__all__ = [
    "DEFAULT_PORT",
    "DEV_CLIENT_ID",
    "DEV_CLIENT_SECRET",
    "PASSWORD",
    "SYSTEM_CLIENT_PREFIX",
    "SYSTEM_CLIENT_SECRET",
    "WARNING",
    "DevClient",
    "DevUser",
    "create_app",
    "dev_clients",
    "dev_users",
    "load_or_create_keys",
    "serve",
    "username_for",
]
