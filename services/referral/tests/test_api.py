"""The referral HTTP API on a real server and a real PostgreSQL; known cases are seeded as
the intake consumer would write them. Callers sign in with tokens from the development
OpenID provider (case workers refer and withdraw, the addressed unit's staff answer)."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

import httpx
import psycopg
import pytest

from likvard.known_cases import CaseDirectory
from tests.identity import bearer
from tests.support import RunningService, intake_event

pytestmark = pytest.mark.integration

HEALTHCARE_UNIT = "region-beroendevard"


def worker(district: str) -> dict[str, str]:
    """A case worker of `district` (subject `cw-<district>`)."""
    return bearer("case-worker", districts=[district], subject=f"cw-{district}")


def staff(unit: str) -> dict[str, str]:
    """Staff of the specialist unit `unit` (subject `staff-<unit>`)."""
    return bearer("unit-staff", unit=unit, subject=f"staff-{unit}")


@pytest.fixture
def client(referral: RunningService) -> httpx.Client:
    """Signed in as a case worker of Nordost unless a request says otherwise."""
    return httpx.Client(base_url=referral.base_url, timeout=30, headers=worker("nordost"))


def seed_case(
    referral: RunningService, database_url: str, district: str = "nordost", *extra: Any
) -> str:
    """Make the referral service know an open case, as its intake consumer would."""
    case_id = str(uuid.uuid4())
    events = [
        intake_event(case_id, "IntakeRegistered", {"district": district}, 1, district),
        *[
            intake_event(case_id, t, data, v, district)
            for v, (t, data) in enumerate(extra, start=2)
        ],
    ]
    with psycopg.connect(database_url) as conn, conn.transaction():
        CaseDirectory(referral.schema).handle(conn, events)
    return case_id


def city_unit_in(district: str) -> tuple[str, str]:
    from likvard.catalogue import ReferenceCatalogue

    reference = ReferenceCatalogue.load()
    for unit in reference.units():
        if unit.host_district == district and unit.recipient_kind == "CITY_SOCIAL_SERVICES":
            return unit.id, sorted(unit.intervention_codes)[0]
    raise AssertionError(f"no city unit in {district}")


def healthcare_code() -> str:
    from likvard.catalogue import ReferenceCatalogue

    unit = ReferenceCatalogue.load().unit(HEALTHCARE_UNIT)
    assert unit is not None
    return sorted(unit.intervention_codes)[0]


def counts(referral: RunningService) -> tuple[int, int]:
    return referral.store.count(), referral.store.outbox_depth()


def assert_problem(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    if code:
        assert r.json()["type"].endswith("/" + code), r.json()


def test_referral_across_districts_through_its_life(
    client: httpx.Client, referral: RunningService, database_url: str
) -> None:
    case = seed_case(referral, database_url, "nordost")
    unit, code = city_unit_in("hisingen")
    r = client.post(
        "/referrals", json={"case_id": case, "unit_id": unit, "intervention_code": code}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    rid = body["referral_id"]
    assert r.headers["location"] == f"/referrals/{rid}"
    assert [e["event_type"] for e in body["events"]] == [
        "ReferralRequested",
        "ReferredAcrossDistrict",
    ]
    stored = referral.store.read_stream(rid)
    assert stored[1].payload["from_district"] == "nordost"
    assert stored[1].payload["to_district"] == "hisingen"
    assert all(e.metadata["case_id"] == case for e in stored)

    assert stored[0].metadata["actor"] == "cw-nordost"  # the token's subject

    unit_staff = staff(unit)
    inbox = client.get(
        f"/units/{unit}/referrals", params={"status": "requested"}, headers=unit_staff
    ).json()
    assert [i["referral_id"] for i in inbox] == [rid]
    assert inbox[0]["person_district"] == "nordost"
    assert inbox[0]["version"] == 2 and inbox[0]["running_interventions"] == []

    accepted = client.post(
        f"/referrals/{rid}/accept", json={}, headers={"If-Match": '"2"', **unit_staff}
    )
    assert accepted.status_code == 200, accepted.text
    started = client.post(f"/referrals/{rid}/interventions", json={}, headers=unit_staff)
    assert started.status_code == 201, started.text
    iid = started.json()["intervention_id"]
    running = client.get(f"/units/{unit}/referrals", headers=unit_staff).json()
    assert running[0]["version"] == 4 and running[0]["running_interventions"] == [iid]
    ended = client.post(
        f"/interventions/{iid}/end", json={"outcome": "COMPLETED_AS_PLANNED"}, headers=unit_staff
    )
    assert ended.status_code == 200, ended.text
    assert ended.json()["version"] == 5
    assert referral.store.read_stream(rid)[2].metadata["actor"] == f"staff-{unit}"

    view = client.get(f"/referrals/{rid}").json()
    assert view["status"] == "accepted" and view["across_district"] is True
    assert view["ended_interventions"] == [iid] and view["case_id"] == case
    assert client.get(f"/referrals/{rid}", headers=unit_staff).json() == view
    requested = client.get(
        f"/units/{unit}/referrals", params={"status": "requested"}, headers=unit_staff
    )
    assert requested.json() == []
    assert referral.store.verify() == []


def test_same_district_referral_is_not_across(
    client: httpx.Client, referral: RunningService, database_url: str
) -> None:
    case = seed_case(referral, database_url, "hisingen")
    unit, code = city_unit_in("hisingen")
    r = client.post(
        "/referrals",
        json={"case_id": case, "unit_id": unit, "intervention_code": code},
        headers=worker("hisingen"),
    )
    assert [e["event_type"] for e in r.json()["events"]] == ["ReferralRequested"]


def test_unit_outside_social_services_needs_consent_or_override(
    client: httpx.Client, referral: RunningService, database_url: str
) -> None:
    consent = str(uuid.uuid4())
    case = seed_case(
        referral,
        database_url,
        "centrum",
        (
            "ConsentRecorded",
            {"consent_id": consent, "recipients": ["HEALTHCARE"], "valid_until": None},
        ),
    )
    code = healthcare_code()
    base = {"case_id": case, "unit_id": HEALTHCARE_UNIT, "intervention_code": code}
    client.headers.update(worker("centrum"))
    before = counts(referral)
    assert_problem(client.post("/referrals", json=base), 422, "consent-required")
    assert counts(referral) == before
    with_consent = client.post("/referrals", json={**base, "consent_id": consent})
    assert with_consent.status_code == 201, with_consent.text
    override = client.post(
        "/referrals", json={**base, "consent_override": "RISK_TO_LIFE_OR_HEALTH"}
    )
    assert override.status_code == 201, override.text
    stored = referral.store.read_stream(override.json()["referral_id"])
    assert stored[0].payload["consent_override"] == "RISK_TO_LIFE_OR_HEALTH"


def test_bad_input_to_every_endpoint_is_4xx_problem_and_changes_nothing(
    client: httpx.Client, referral: RunningService, database_url: str
) -> None:
    case = seed_case(referral, database_url, "nordost")
    closed = seed_case(referral, database_url, "nordost", ("CaseClosed", {"reason": "OTHER"}))
    unit, code = city_unit_in("nordost")
    ok = client.post(
        "/referrals", json={"case_id": case, "unit_id": unit, "intervention_code": code}
    )
    rid = ok.json()["referral_id"]
    missing = str(uuid.uuid4())
    before = counts(referral)
    answer = staff(unit)  # the addressed unit answers; the case's district withdraws
    cases: list[tuple[str, str, dict[str, Any], dict[str, str], int, str | None]] = [
        (
            "post",
            "/referrals",
            {"case_id": missing, "unit_id": unit, "intervention_code": code},
            {},
            422,
            "case-not-found",
        ),
        (
            "post",
            "/referrals",
            {"case_id": closed, "unit_id": unit, "intervention_code": code},
            {},
            422,
            "case-closed",
        ),
        (
            "post",
            "/referrals",
            {"case_id": case, "unit_id": "nowhere", "intervention_code": code},
            {},
            422,
            "unknown-unit",
        ),
        (
            "post",
            "/referrals",
            {"case_id": case, "unit_id": unit, "intervention_code": "X"},
            {},
            422,
            None,
        ),
        (
            "post",
            "/referrals",
            {"case_id": "not-a-uuid", "unit_id": unit},
            {},
            422,
            "validation-error",
        ),
        ("post", f"/referrals/{rid}/decline", {"reason": "BORED"}, answer, 422, "validation-error"),
        (
            "post",
            f"/referrals/{rid}/withdraw",
            {"reason": "NO_LONGER_NEEDED", "occurred_at": "2999-01-01T00:00:00Z"},
            {},
            422,
            None,
        ),
        ("post", f"/referrals/{rid}/interventions", {}, answer, 422, "referral-not-accepted"),
        ("post", f"/referrals/{missing}/accept", {}, answer, 404, "referral-not-found"),
        ("post", f"/interventions/{missing}/end", {"outcome": "MOVED"}, answer, 404, None),
        (
            "post",
            f"/referrals/{rid}/accept",
            {"planned_start": str(date(2000, 1, 1))},
            answer,
            422,
            None,
        ),
        ("get", f"/referrals/{missing}", {}, {}, 404, None),
        ("get", "/units/nowhere/referrals", {}, staff("nowhere"), 404, "unknown-unit"),
        ("get", f"/units/{unit}/referrals?status=lost", {}, answer, 422, None),
    ]
    for method, path, body, headers, status, code_ in cases:
        r = client.request(
            method.upper(), path, json=body if method == "post" else None, headers=headers
        )
        assert_problem(r, status, code_)
    stale = client.post(f"/referrals/{rid}/accept", json={}, headers={"If-Match": '"7"', **answer})
    assert_problem(stale, 409, "version-conflict")
    assert counts(referral) == before


def test_openapi_lists_the_routes(client: httpx.Client) -> None:
    paths = client.get("/openapi.json", headers=bearer("ops")).json()["paths"]
    for path in [
        "/referrals",
        "/referrals/{referral_id}",
        "/referrals/{referral_id}/accept",
        "/referrals/{referral_id}/decline",
        "/referrals/{referral_id}/withdraw",
        "/referrals/{referral_id}/interventions",
        "/interventions/{intervention_id}/end",
        "/units/{unit_id}/referrals",
        "/healthz",
        "/readyz",
    ]:
        assert path in paths, path
