"""Claims to principal, without a provider: the claim paths of Keycloak and Entra ID, the
sign-in settings and their refusals, and the development provider's users and claims."""

from __future__ import annotations

from datetime import date

import pytest

from likvard.cli.devidp import claims_for, dev_users, username_for
from likvard.config import ConfigError, Settings, load_settings
from likvard.identity import InvalidPrincipal, Principal, Role, principal_from_claims
from likvard.oidc import OidcVerifier, claim_at

KEYCLOAK = {
    "sub": "f3c1a6e0-2f7b-4c55-9d52-0a6b8f1e2d11",
    "realm_access": {"roles": ["case-worker", "offline_access", "uma_authorization"]},
    "resource_access": {"likvard": {"roles": ["auditor"]}},
    "likvard_districts": ["Nordost", " hisingen "],
}
ENTRA = {
    "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
    "oid": "00000000-0000-0000-66f3-3332eca7ea81",
    "roles": ["unit-staff", "Some.Other.App"],
    "extension_likvardUnit": "Hisingen-Bostad-Forst",
}


def test_claim_paths_pick_keycloak_realm_and_client_roles() -> None:
    assert claim_at(KEYCLOAK, "realm_access.roles") == KEYCLOAK["realm_access"]["roles"]  # type: ignore[index]
    assert claim_at(KEYCLOAK, "resource_access.likvard.roles") == ["auditor"]
    assert claim_at(KEYCLOAK, "realm_access.missing") is None
    assert claim_at(KEYCLOAK, "likvard_districts.deeper") is None  # a list has no members


def test_a_claim_named_with_dots_is_taken_whole() -> None:
    claims = {"https://likvard.example/roles": ["ops"]}
    assert claim_at(claims, "https://likvard.example/roles") == ["ops"]


def test_keycloak_claims_give_the_case_worker_of_two_districts() -> None:
    c = KEYCLOAK
    principal = principal_from_claims(
        c["sub"],
        claim_at(c, "realm_access.roles"),
        claim_at(c, "likvard_districts"),
        claim_at(c, "likvard_unit"),
    )
    assert principal == Principal(
        str(c["sub"]), frozenset({Role.CASE_WORKER}), frozenset({"nordost", "hisingen"})
    )


def test_entra_id_app_roles_and_an_extension_unit_claim() -> None:
    c = ENTRA
    principal = principal_from_claims(
        c["sub"], claim_at(c, "roles"), claim_at(c, "likvard_districts"), c["extension_likvardUnit"]
    )
    assert principal.roles == {Role.UNIT_STAFF}
    assert principal.unit == "hisingen-bostad-forst"
    assert principal.districts == frozenset()


def test_roles_and_districts_as_one_space_or_comma_separated_string() -> None:
    principal = principal_from_claims("dev-x", "auditor analyst", "nordost,centrum", None)
    assert principal.roles == {Role.AUDITOR, Role.ANALYST}
    assert principal.districts == {"nordost", "centrum"}


@pytest.mark.parametrize(
    ("subject", "roles", "districts", "unit"),
    [
        ("19121212-1212", ["auditor"], None, None),
        ("u:191212121212", ["auditor"], None, None),
        (None, ["auditor"], None, None),
        ("", ["auditor"], None, None),
        ("dev-x", {"auditor": True}, None, None),
        ("dev-x", ["auditor"], [1, 2], None),
        ("dev-x", ["unit-staff"], None, ["a", "b"]),
    ],
)
def test_claims_that_name_no_principal_are_refused(
    subject: object, roles: object, districts: object, unit: object
) -> None:
    with pytest.raises(InvalidPrincipal) as caught:
        principal_from_claims(subject, roles, districts, unit)
    assert "1212" not in str(caught.value)


def test_the_default_settings_read_keycloaks_shape() -> None:
    s = load_settings({"LIKVARD_OIDC_ISSUER": "https://login.example.se/realms/likvard"})
    assert s.oidc_issuer == "https://login.example.se/realms/likvard"
    assert (s.oidc_audience, s.oidc_roles_claim) == ("likvard", "realm_access.roles")
    assert (s.oidc_districts_claim, s.oidc_unit_claim) == ("likvard_districts", "likvard_unit")
    assert s.oidc_algorithms == ("RS256", "PS256", "ES256")
    assert s.oidc_leeway_seconds == 30 and not s.public_docs
    assert s.oidc_discovery == (
        "https://login.example.se/realms/likvard/.well-known/openid-configuration"
    )


def test_entra_id_settings() -> None:
    s = load_settings(
        {
            "LIKVARD_OIDC_ISSUER": "https://login.microsoftonline.com/tid/v2.0",
            "LIKVARD_OIDC_AUDIENCE": "api://likvard",
            "LIKVARD_OIDC_ROLES_CLAIM": "roles",
            "LIKVARD_OIDC_DISCOVERY_URL": "https://proxy.internal/oidc/config",
            "LIKVARD_OIDC_ALGORITHMS": "RS256",
            "LIKVARD_PUBLIC_DOCS": "1",
            "LIKVARD_DATABASE_URL": "postgresql://a@b/c",
        }
    )
    assert (s.oidc_audience, s.oidc_roles_claim) == ("api://likvard", "roles")
    assert s.oidc_discovery == "https://proxy.internal/oidc/config"
    assert s.oidc_algorithms == ("RS256",) and s.public_docs
    assert s.require_access_log_database() == "postgresql://a@b/c"
    assert (
        load_settings(
            {"LIKVARD_ACCESS_LOG_DATABASE_URL": "postgresql://x@y/z"}
        ).require_access_log_database()
        == "postgresql://x@y/z"
    )


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"LIKVARD_OIDC_ALGORITHMS": "RS256,HS256"}, "LIKVARD_OIDC_ALGORITHMS"),
        ({"LIKVARD_OIDC_ALGORITHMS": "none"}, "LIKVARD_OIDC_ALGORITHMS"),
        ({"LIKVARD_OIDC_ALGORITHMS": "RS257"}, "LIKVARD_OIDC_ALGORITHMS"),
        ({"LIKVARD_OIDC_ALGORITHMS": ","}, "LIKVARD_OIDC_ALGORITHMS"),
        ({"LIKVARD_OIDC_ISSUER": "login.example.se"}, "LIKVARD_OIDC_ISSUER"),
        ({"LIKVARD_OIDC_DISCOVERY_URL": "file:///etc/passwd"}, "LIKVARD_OIDC_DISCOVERY_URL"),
        ({"LIKVARD_OIDC_ROLES_CLAIM": "realm_access..roles"}, "LIKVARD_OIDC_ROLES_CLAIM"),
        ({"LIKVARD_OIDC_UNIT_CLAIM": "a b"}, "LIKVARD_OIDC_UNIT_CLAIM"),
        ({"LIKVARD_OIDC_LEEWAY_SECONDS": "-1"}, "LIKVARD_OIDC_LEEWAY_SECONDS"),
        ({"LIKVARD_OIDC_LEEWAY_SECONDS": "3600"}, "LIKVARD_OIDC_LEEWAY_SECONDS"),
        ({"LIKVARD_PUBLIC_DOCS": "maybe"}, "LIKVARD_PUBLIC_DOCS"),
    ],
)
def test_bad_sign_in_settings_are_refused_at_load(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_settings(env)


def test_no_issuer_says_how_to_get_one() -> None:
    with pytest.raises(ConfigError, match=r"LIKVARD_OIDC_ISSUER.*likvard up"):
        Settings(oidc_issuer=None).require_oidc()
    with pytest.raises(ConfigError, match="LIKVARD_ACCESS_LOG_DATABASE_URL"):
        Settings().require_access_log_database()


def test_a_verifier_is_never_built_with_a_symmetric_or_no_algorithm() -> None:
    for algorithms in (["HS256"], ["none"], []):
        with pytest.raises(ValueError):
            OidcVerifier("https://idp", "likvard", algorithms=algorithms)


def test_the_dev_provider_has_a_user_per_district_unit_and_role() -> None:
    users = {u.username: u for u in dev_users(["nordost", "hisingen"], ["hisingen-bostad-forst"])}
    assert set(users) == {
        "case-worker-nordost",
        "case-worker-hisingen",
        "unit-staff-hisingen-bostad-forst",
        "analyst",
        "auditor",
        "records-officer",
        "ops",
    }
    assert users["case-worker-hisingen"].districts == ("hisingen",)
    assert users["unit-staff-hisingen-bostad-forst"].unit == "hisingen-bostad-forst"
    for u in users.values():
        Principal(u.subject, frozenset({u.role}))  # pseudonymous, never an identity number
    assert username_for("case-worker", "nordost") == "case-worker-nordost"
    assert username_for("unit-staff", unit="x") == "unit-staff-x"
    assert username_for("ops") == "ops"


def test_the_dev_provider_knows_todays_districts_and_every_unit() -> None:
    from likvard.catalogue import ReferenceCatalogue
    from likvard.districts import DistrictRegistry

    names = {u.username for u in dev_users()}
    today = DistrictRegistry.load().current(date.today())
    assert {f"case-worker-{d.code}" for d in today} <= names
    assert "case-worker-angered" not in names  # a district of the old structure
    assert {f"unit-staff-{u.id}" for u in ReferenceCatalogue.load().units()} <= names


def test_dev_tokens_carry_keycloaks_claim_shape() -> None:
    claims = claims_for(
        "http://idp",
        "likvard",
        "dev-cw-nordost",
        ["case-worker"],
        ["nordost"],
        None,
        3600,
        now=1000,
    )
    assert claims["realm_access"] == {"roles": ["case-worker"]}
    assert claims["likvard_districts"] == ["nordost"] and "likvard_unit" not in claims
    assert (claims["iss"], claims["aud"], claims["iat"], claims["exp"]) == (
        "http://idp",
        "likvard",
        1000,
        4600,
    )


def test_an_identity_number_anywhere_in_a_subject_is_refused_but_not_its_mere_shape() -> None:
    from likvard.identity import looks_like_identity_number

    for subject in ("19121212-1212", "u:191212121212", "121212-1212", "x191212121212y"):
        assert looks_like_identity_number(subject), subject
        with pytest.raises(InvalidPrincipal):
            Principal(subject, frozenset({Role.CASE_WORKER}))
    # the shape with a wrong check digit or an impossible date is a staff id, not a number
    for subject in ("19121212-1213", "19121312-1212", "dev-cw-nordost"):
        assert not looks_like_identity_number(subject), subject
    # Keycloak's subjects are UUIDs; their digit runs often have the shape (12 digits)
    assert not looks_like_identity_number("0f1e2d3c-4b5a-4978-8123-191212121212")
