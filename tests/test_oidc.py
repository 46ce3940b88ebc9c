"""The token verifier against the development OpenID provider running as a real process:
each role's token gives its principal; every forged or unfit token is refused with its own
code (and a 401 at the HTTP edge); an unknown kid makes it fetch the JWKS again (at most
once per interval); a provider that does not answer gives issuer-unavailable."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from likvard.config import load_settings
from likvard.guard import AuthenticationError, Caller
from likvard.http import ProblemError, problem
from likvard.identity import Principal, Role
from likvard.oidc import OidcVerifier, verifier_from_settings
from tests import identity
from tests.identity import (
    DevIdp,
    forge,
    hs256_with_public_key,
    other_key,
    running_idp,
    token,
    unsigned,
)
from tests.support import serving

pytestmark = pytest.mark.integration


def session() -> DevIdp:
    assert identity.SESSION is not None, "conftest.py starts the dev IdP for the session"
    return identity.SESSION


def verifier(idp: DevIdp | None = None, **options: Any) -> OidcVerifier:
    idp = idp or session()
    return OidcVerifier(idp.issuer, idp.audience, **options)


def refused(v: OidcVerifier, jwt: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        v.authenticate(jwt)
    # The reason never holds the token or any part of it.
    for part in jwt.split("."):
        assert len(part) < 8 or part not in caught.value.detail
    return caught.value


@pytest.mark.parametrize(
    ("role", "options", "expected"),
    [
        (
            "case-worker",
            {"districts": ["nordost"]},
            Principal("dev-cw-nordost", frozenset({Role.CASE_WORKER}), frozenset({"nordost"})),
        ),
        (
            "case-worker",
            {"districts": ["hisingen"]},
            Principal("dev-cw-hisingen", frozenset({Role.CASE_WORKER}), frozenset({"hisingen"})),
        ),
        (
            "unit-staff",
            {"unit": "hisingen-bostad-forst"},
            Principal(
                "dev-us-hisingen-bostad-forst",
                frozenset({Role.UNIT_STAFF}),
                unit="hisingen-bostad-forst",
            ),
        ),
        ("analyst", {}, Principal("dev-analyst", frozenset({Role.ANALYST}))),
        ("auditor", {}, Principal("dev-auditor", frozenset({Role.AUDITOR}))),
        ("records-officer", {}, Principal("dev-records", frozenset({Role.RECORDS_OFFICER}))),
        ("ops", {}, Principal("dev-ops", frozenset({Role.OPS}))),
    ],
)
def test_a_token_of_each_ready_made_user_gives_its_principal(
    role: str, options: dict[str, Any], expected: Principal
) -> None:
    assert verifier().authenticate(token(role, **options)) == expected


def test_the_settings_verifier_takes_the_issuer_of_the_environment() -> None:
    v = verifier_from_settings(load_settings())
    assert v.issuer == session().issuer
    principal = v.authenticate(token("case-worker", districts=["nordost", "centrum"]))
    # today's districts, and those they replaced (their cases recorded before 2021)
    assert {"nordost", "centrum", "angered", "centrum-2011"} <= principal.districts
    assert "lundby" not in principal.districts
    assert principal.subject == "dev-cw-nordost-centrum"


def test_a_token_within_the_leeway_and_one_for_several_audiences_are_accepted() -> None:
    idp = session()
    now = int(time.time())
    late = idp.forge(idp.claims(exp=now - 10, iat=now - 600, nbf=now - 600))
    assert verifier().authenticate(late).subject == "dev-test-forged"
    several = idp.forge(idp.claims(aud=["account", idp.audience]))
    assert verifier().authenticate(several).has(Role.CASE_WORKER)


def now() -> int:
    return int(time.time())


def _cases() -> list[tuple[str, Any]]:
    # Times are taken when a case runs, not when the tests are collected: a long session
    # reaches these many minutes after collection.
    return [
        ("expired", lambda idp: idp.forge(idp.claims(exp=now() - 120, iat=now() - 900))),
        ("not-yet-valid", lambda idp: idp.forge(idp.claims(nbf=now() + 600))),
        ("not-yet-valid", lambda idp: idp.forge(idp.claims(iat=now() + 600))),
        ("wrong-audience", lambda idp: idp.forge(idp.claims(aud="another-app"))),
        ("wrong-audience", lambda idp: idp.forge(idp.claims(aud=["a", "b"]))),
        ("wrong-audience", lambda idp: idp.forge(idp.claims(aud=None))),
        ("wrong-issuer", lambda idp: idp.forge(idp.claims(iss="http://127.0.0.1:1"))),
        ("unknown-key", lambda idp: forge(idp.claims(), other_key())),
        ("algorithm-not-allowed", lambda idp: unsigned(idp.claims())),
        (
            "algorithm-not-allowed",
            lambda idp: unsigned(idp.claims(), kid=idp.signing_key().kid),
        ),
        (
            "algorithm-not-allowed",
            lambda idp: hs256_with_public_key(idp.claims(), idp.signing_key()),
        ),
        (
            # The provider's own kid, but signed by another key.
            "bad-signature",
            lambda idp: forge(
                idp.claims(),
                other_key(),
                header={"alg": "RS256", "kid": idp.signing_key().kid},
            ),
        ),
        ("invalid-subject", lambda idp: idp.forge(idp.claims(subject="19121212-1212"))),
        ("invalid-subject", lambda idp: idp.forge(idp.claims(subject="staff:191212121212"))),
        ("invalid-subject", lambda idp: idp.forge(idp.claims(sub=None))),
        ("invalid-subject", lambda idp: idp.forge(idp.claims(subject="has space"))),
        ("malformed", lambda idp: idp.forge(idp.claims(exp=None))),
        ("malformed", lambda idp: idp.forge(idp.claims(exp="tomorrow"))),
        ("malformed", lambda idp: idp.forge(idp.claims(likvard_districts={"a": 1}))),
        ("malformed", lambda idp: "not-a-jwt"),
        ("malformed", lambda idp: "a.b.c"),
    ]


@pytest.mark.parametrize(("code", "make"), _cases())
def test_each_unfit_token_is_refused_with_its_code(code: str, make: Any) -> None:
    assert refused(verifier(), make(session())).code == code


def test_a_tampered_payload_is_a_bad_signature() -> None:
    good = token("case-worker", districts=["nordost"])
    header, _, signature = good.split(".")
    other = token("case-worker", districts=["hisingen"]).split(".")[1]
    assert refused(verifier(), f"{header}.{other}.{signature}").code == "bad-signature"


def test_the_reason_never_echoes_a_claim_value() -> None:
    idp = session()
    error = refused(verifier(), idp.forge(idp.claims(subject="19121212-1212")))
    assert "1212" not in error.detail and "1912" not in error.detail


def test_refusals_are_401_with_www_authenticate_at_the_http_edge() -> None:
    app = FastAPI()
    app.state.authenticator = verifier()

    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.title, exc.detail, headers=exc.headers)

    @app.get("/who")
    def who(caller: Caller) -> dict[str, str]:
        return {"subject": caller.subject}

    idp = session()
    with serving(app) as base_url, httpx.Client(base_url=base_url) as client:
        ok = client.get("/who", headers={"Authorization": "Bearer " + token("auditor")})
        assert ok.status_code == 200 and ok.json() == {"subject": "dev-auditor"}
        for jwt in (
            idp.forge(idp.claims(exp=int(time.time()) - 600)),
            idp.forge(idp.claims(aud="another-app")),
            forge(idp.claims(), other_key()),
            unsigned(idp.claims()),
            hs256_with_public_key(idp.claims(), idp.signing_key()),
        ):
            answer = client.get("/who", headers={"Authorization": f"Bearer {jwt}"})
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"].startswith("Bearer ")
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert jwt.split(".")[1] not in answer.text
        assert client.get("/who").status_code == 401


def test_entra_id_roles_at_the_top_level_are_read_by_configuration() -> None:
    idp = session()
    claims = idp.claims(realm_access=None, roles=["auditor", "Other.App.Role"])
    jwt = idp.forge(claims)
    assert verifier(roles_claim="roles").authenticate(jwt).roles == {Role.AUDITOR}
    assert verifier().authenticate(jwt).roles == frozenset()  # Keycloak's path: no roles


@pytest.fixture
def own_idp(tmp_path: Path) -> Iterator[DevIdp]:
    with running_idp(tmp_path) as idp:
        yield idp


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_an_unknown_kid_refetches_the_jwks_at_most_once_per_interval(own_idp: DevIdp) -> None:
    clock = Clock()
    v = verifier(own_idp, clock=clock, refetch_interval=10)
    before = own_idp.token("analyst")
    assert v.authenticate(before).subject == "dev-analyst"
    assert v.fetches == 1
    old_kid = own_idp.signing_key().kid

    own_idp.rotate_key()  # a new key file: a new kid, the old key no longer published
    assert own_idp.signing_key().kid != old_kid
    clock.now += 11
    assert v.authenticate(own_idp.token("auditor")).subject == "dev-auditor"
    assert v.fetches == 2  # the unknown kid made it fetch the keys again

    # Forged kids do not make it hammer the provider: within the interval, no fetch.
    assert refused(v, forge(own_idp.claims(), other_key())).code == "unknown-key"
    assert refused(v, before).code == "unknown-key"  # the retired key is gone
    assert v.fetches == 2
    clock.now += 11
    assert refused(v, forge(own_idp.claims(), other_key())).code == "unknown-key"
    assert v.fetches == 3


def test_a_provider_that_does_not_answer_is_issuer_unavailable(own_idp: DevIdp) -> None:
    clock = Clock()
    cached = verifier(own_idp, clock=clock)
    good = own_idp.token("ops")
    assert cached.authenticate(good).subject == "dev-ops"
    own_idp.stop()

    error = refused(verifier(own_idp), good)
    assert error.code == "issuer-unavailable"
    # Keys already fetched keep verifying while the provider is away...
    clock.now += 11
    assert cached.authenticate(good).subject == "dev-ops"
    # ...but a key it has not seen cannot be checked.
    assert refused(cached, forge(own_idp.claims(), other_key())).code == "issuer-unavailable"

    own_idp.start()  # back: a fresh verifier signs in again
    assert verifier(own_idp).authenticate(good).subject == "dev-ops"


def test_a_discovery_document_of_another_issuer_is_refused(own_idp: DevIdp) -> None:
    # LIKVARD_OIDC_DISCOVERY_URL that leads to another provider: its keys are never trusted.
    elsewhere = f"{session().issuer}/.well-known/openid-configuration"
    v = verifier(own_idp, discovery_url=elsewhere)
    assert refused(v, own_idp.token("ops")).code == "issuer-unavailable"
    right = verifier(own_idp, discovery_url=f"{own_idp.issuer}/.well-known/openid-configuration")
    assert right.authenticate(own_idp.token("ops")).subject == "dev-ops"


def test_concurrent_first_requests_fetch_the_keys_once() -> None:
    v = verifier()
    jwt = token("case-worker", districts=["sydvast"])
    results: list[str] = []
    errors: list[BaseException] = []

    def sign_in() -> None:
        try:
            results.append(v.authenticate(jwt).subject)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sign_in) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert results == ["dev-cw-sydvast"] * 16
    assert v.fetches == 1


def test_the_provider_publishes_no_private_key() -> None:
    jwks = httpx.get(f"{session().issuer}/jwks", timeout=5).json()
    assert jwks["keys"] and all("d" not in k and "p" not in k for k in jwks["keys"])
    assert (session().keys.stat().st_mode & 0o077) == 0  # the private key file is 0600
