"""Sign-in on the command line: the development OpenID provider (`likvard dev-idp`) and a
token from it (`likvard token`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from likvard.cli.base import app, console, fail
from likvard.cli.devidp import (
    DEFAULT_PORT,
    PASSWORD,
    SYSTEM_CLIENT_PREFIX,
    SYSTEM_CLIENT_SECRET,
    WARNING,
)

DEFAULT_KEYS = Path(".likvard") / "dev-idp-keys.json"


@app.command("dev-idp")
def dev_idp(
    port: int = typer.Option(DEFAULT_PORT, min=1, max=65535, help="Port to listen on"),
    keys: Path = typer.Option(
        DEFAULT_KEYS,
        help="JWKS file with the signing key (private; created, mode 0600, if missing)",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (also the issuer's host)"),
    lifetime: int = typer.Option(3600, min=10, help="Token lifetime in seconds"),
) -> None:
    """Run the development OpenID Connect provider (never for production).

    Discovery at http://HOST:PORT/.well-known/openid-configuration, keys at /jwks, tokens
    at /token (grant_type=password). The web console signs in in the browser at /authorize
    (authorization code with PKCE S256, client likvard-console; loopback redirect URIs or
    those in LIKVARD_DEV_IDP_REDIRECTS, comma separated) and out at /logout. Ready-made
    users, every one with the password "dev":
    case-worker-<district> for each district in operation (case-worker-nordost,
    case-worker-centrum, case-worker-sydvast, case-worker-hisingen),
    unit-staff-<unit> for each specialist unit (e.g. unit-staff-hisingen-bostad-forst),
    analyst, auditor, records-officer and ops; GET /users lists them. District systems
    are clients (grant_type=client_credentials): district-system-<district>, secret "dev",
    for each district in operation; GET /clients lists them. The audience is
    LIKVARD_OIDC_AUDIENCE (default likvard).
    """
    from likvard.cli.devidp import serve

    audience = os.environ.get("LIKVARD_OIDC_AUDIENCE") or "likvard"
    console.print(f"[yellow]{WARNING}[/yellow]")
    console.print(
        f"issuer http://{host}:{port} (audience {audience}); password for every user:"
        f" {PASSWORD!r}; keys in {keys}"
    )
    try:
        serve(port, keys, audience, lifetime, host)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot run the development provider: {exc}", 1) from exc


@app.command()
def token(
    role: str = typer.Option(..., help="case-worker, unit-staff, analyst, auditor, ..."),
    district: str | None = typer.Option(
        None, help="The case worker's or district system's district, e.g. nordost"
    ),
    unit: str | None = typer.Option(None, help="The unit-staff user's specialist unit"),
    issuer: str | None = typer.Option(
        None, help="The development provider (default LIKVARD_OIDC_ISSUER, else port 8009)"
    ),
) -> None:
    """Print an access token of a ready-made user of the development provider, and only
    the token: TOKEN=$(likvard token --role case-worker --district nordost); then
    curl -H "Authorization: Bearer $TOKEN" ... A district system's token (client
    credentials of its client district-system-<district>): --role district-system
    --district nordost."""
    import httpx

    from likvard.cli.devidp import username_for
    from likvard.identity import Role

    if role not in Role._value2member_map_:
        raise fail(f"unknown role {role!r}; known: {', '.join(Role)}")
    if role == Role.CASE_WORKER and not district:
        raise fail("a case worker works for a district: add --district, e.g. nordost")
    if role == Role.UNIT_STAFF and not unit:
        raise fail("unit staff work for a unit: add --unit, e.g. hisingen-bostad-forst")
    if role == Role.DISTRICT_SYSTEM and not district:
        raise fail("a district system is its district's: add --district, e.g. nordost")
    base = issuer or os.environ.get("LIKVARD_OIDC_ISSUER") or f"http://127.0.0.1:{DEFAULT_PORT}"
    username = username_for(role, district, unit)
    form = {"grant_type": "password", "username": username, "password": PASSWORD}
    if role == Role.DISTRICT_SYSTEM:
        username = f"{SYSTEM_CLIENT_PREFIX}{district}"
        form = {
            "grant_type": "client_credentials",
            "client_id": username,
            "client_secret": SYSTEM_CLIENT_SECRET,
        }
    try:
        response = httpx.post(base.rstrip("/") + "/token", data=form, timeout=5)
    except httpx.HTTPError as exc:
        raise fail(
            f"the development provider at {base} does not answer ({type(exc).__name__}):"
            " start it with `likvard up` or `likvard dev-idp`",
            1,
        ) from exc
    if response.status_code == 400 and "invalid_grant" in response.text:
        raise fail(
            f"the provider at {base} has no user {username!r} (see its GET /users, or"
            " `likvard dev-idp --help`)",
            1,
        )
    if response.status_code == 401 and role == Role.DISTRICT_SYSTEM:
        raise fail(
            f"the provider at {base} has no client {username!r} (see its GET /clients, or"
            " `likvard dev-idp --help`)",
            1,
        )
    if response.status_code != 200:
        raise fail(f"the provider at {base} answered {response.status_code}", 1)
    try:
        access = response.json()["access_token"]
    except (ValueError, KeyError, TypeError) as exc:
        raise fail(f"the provider at {base} gave no access token", 1) from exc
    sys.stdout.write(f"{access}\n")
