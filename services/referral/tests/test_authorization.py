"""Who may do what with referrals, against the development OpenID provider as a real
process and the access log in PostgreSQL: refusals are 403 problems and recorded, an inbox
read is recorded once per case it shows."""

from __future__ import annotations

import random
import string
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from likvard import access_log_audit
from likvard.config import Settings
from likvard.known_cases import CaseDirectory
from services.referral.tests.test_api import assert_problem, city_unit_in, seed_case
from tests.identity import bearer
from tests.support import RunningService, intake_event

pytestmark = pytest.mark.integration


def subject(prefix: str) -> str:
    """A subject of this test's own, so its access-log entries can be found by actor
    (letters only: never shaped like an identity number)."""
    return prefix + "-" + "".join(random.choices(string.ascii_lowercase, k=12))


def worker(district: str, who: str | None = None) -> dict[str, str]:
    return bearer("case-worker", districts=[district], subject=who or f"cw-{district}")


def staff(unit: str, who: str | None = None) -> dict[str, str]:
    return bearer("unit-staff", unit=unit, subject=who or f"staff-{unit}")


@pytest.fixture
def client(referral: RunningService) -> httpx.Client:
    return httpx.Client(base_url=referral.base_url, timeout=30)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


def refer(client: httpx.Client, case: str, unit: str, code: str, district: str) -> str:
    r = client.post(
        "/referrals",
        json={"case_id": case, "unit_id": unit, "intervention_code": code},
        headers=worker(district),
    )
    assert r.status_code == 201, r.text
    rid: str = r.json()["referral_id"]
    return rid


def test_only_the_addressed_units_staff_answer_and_read_its_inbox(
    client: httpx.Client, referral: RunningService, database_url: str, settings: Settings
) -> None:
    case = seed_case(referral, database_url, "nordost")
    unit, code = city_unit_in("hisingen")
    other_unit, _ = city_unit_in("nordost")
    rid = refer(client, case, unit, code, "nordost")
    intruder = subject("staff")
    before = referral.store.count()

    refused = client.post(f"/referrals/{rid}/accept", json={}, headers=staff(other_unit, intruder))
    assert_problem(refused, 403, "forbidden")
    assert "not-your-unit" in refused.json()["detail"]
    inbox = client.get(f"/units/{unit}/referrals", headers=staff(other_unit, intruder))
    assert_problem(inbox, 403, "forbidden")
    assert referral.store.count() == before  # nothing was accepted

    logged = access_log_audit.search(settings, actor=intruder)
    assert [(e.action, e.resource, e.case_id, e.outcome, e.reason) for e in logged] == [
        ("referral.answer", f"referral:{rid}", case, "refused", "not-your-unit"),
        ("unit.inbox", f"unit:{unit}", None, "refused", "not-your-unit"),
    ]
    assert all(e.service == "referral" and e.roles == "unit-staff" for e in logged)

    accepted = client.post(f"/referrals/{rid}/accept", json={}, headers=staff(unit))
    assert accepted.status_code == 200, accepted.text
    assert referral.store.read_stream(rid)[-1].event_type == "ReferralAccepted"


def test_a_case_worker_refers_only_cases_of_their_own_district(
    client: httpx.Client, referral: RunningService, database_url: str, settings: Settings
) -> None:
    case = seed_case(referral, database_url, "nordost")
    unit, code = city_unit_in("hisingen")
    who = subject("cw")
    before = referral.store.count()
    r = client.post(
        "/referrals",
        json={"case_id": case, "unit_id": unit, "intervention_code": code},
        headers=worker("hisingen", who),
    )
    assert_problem(r, 403, "forbidden")
    assert referral.store.count() == before
    [entry] = access_log_audit.search(settings, case_id=case)
    assert (entry.actor, entry.action, entry.resource, entry.outcome, entry.reason) == (
        who,
        "case.change",
        f"case:{case}",
        "refused",
        "not-your-district",
    )
    # Nor may unit staff refer, even to their own unit; the Nordost worker may.
    assert_problem(
        client.post(
            "/referrals",
            json={"case_id": case, "unit_id": unit, "intervention_code": code},
            headers=staff(unit),
        ),
        403,
        "forbidden",
    )
    refer(client, case, unit, code, "nordost")


def test_the_inbox_read_is_logged_once_per_case_shown(
    client: httpx.Client, referral: RunningService, database_url: str, settings: Settings
) -> None:
    unit, code = city_unit_in("hisingen")
    cases = [seed_case(referral, database_url, d) for d in ("nordost", "nordost", "centrum")]
    districts = ["nordost", "nordost", "centrum"]
    for case, district in zip(cases, districts, strict=True):
        refer(client, case, unit, code, district)
    # Two referrals of the first case: still one entry for it.
    refer(client, cases[0], unit, code, "nordost")
    reader = subject("staff")
    r = client.get(f"/units/{unit}/referrals", headers=staff(unit, reader))
    assert r.status_code == 200, r.text
    shown = [i["case_id"] for i in r.json()]
    assert sorted(set(shown)) == sorted(cases) and len(shown) == 4

    logged = access_log_audit.search(settings, actor=reader)
    assert logged[0].case_id is None and logged[0].resource == f"unit:{unit}"
    per_case = [str(e.case_id) for e in logged[1:]]
    assert sorted(per_case) == sorted(cases)  # once each
    assert {(e.action, e.resource, e.outcome, e.reason) for e in logged} == {
        ("unit.inbox", f"unit:{unit}", "allowed", "own-unit")
    }
    # An inbox answer holds only what the referral carries of the case.
    assert set(r.json()[0]) == {
        "referral_id",
        "case_id",
        "intervention_code",
        "person_district",
        "status",
        "requested_at",
        "days_waiting",
        "overdue",
        "version",
        "running_interventions",
    }


def test_withdraw_and_read_follow_the_cases_current_district(
    client: httpx.Client, referral: RunningService, database_url: str, settings: Settings
) -> None:
    """After a transfer to Hisingen the Hisingen worker withdraws; the Nordost worker reads
    the referral for 30 days but may not withdraw it; Centrum reads only in an emergency."""
    unit, code = city_unit_in("hisingen")
    case = seed_case(
        referral,
        database_url,
        "nordost",
        ("CaseTransferred", {"from_district": "nordost", "to_district": "hisingen"}),
    )
    rid = refer(client, case, unit, code, "hisingen")
    assert client.get(f"/referrals/{rid}", headers=worker("nordost")).status_code == 200
    assert_problem(
        client.post(
            f"/referrals/{rid}/withdraw",
            json={"reason": "NO_LONGER_NEEDED"},
            headers=worker("nordost"),
        ),
        403,
        "forbidden",
    )
    assert_problem(client.get(f"/referrals/{rid}", headers=worker("centrum")), 403, "forbidden")
    who = subject("cw")
    urgent = client.get(
        f"/referrals/{rid}",
        headers={**worker("centrum", who), "Likvard-Emergency-Reason": "child-at-risk"},
    )
    assert urgent.status_code == 200, urgent.text
    [flagged] = access_log_audit.search(settings, actor=who)
    assert (flagged.emergency_reason, flagged.reason, flagged.case_id) == (
        "child-at-risk",
        "emergency",
        case,
    )
    withdrawn = client.post(
        f"/referrals/{rid}/withdraw",
        json={"reason": "NO_LONGER_NEEDED"},
        headers=worker("hisingen"),
    )
    assert withdrawn.status_code == 200, withdrawn.text
    reads = [
        (e.actor, e.outcome)
        for e in access_log_audit.search(settings, case_id=case)
        if e.action == "referral.read"
    ]
    assert ("cw-nordost", "allowed") in reads and ("cw-centrum", "refused") in reads


def test_the_sending_district_reads_for_thirty_days_only(
    client: httpx.Client, referral: RunningService, database_url: str, settings: Settings
) -> None:
    """The transfer's time is when intake recorded it (the event's metadata)."""
    unit, code = city_unit_in("hisingen")
    case = seed_case(referral, database_url, "nordost")
    moved = intake_event(
        case,
        "CaseTransferred",
        {"from_district": "nordost", "to_district": "hisingen"},
        2,
        "hisingen",
    )
    moved.metadata["recorded_at"] = datetime.now(UTC) - timedelta(days=31)
    with psycopg.connect(database_url) as conn, conn.transaction():
        CaseDirectory(referral.schema).handle(conn, [moved])
    rid = refer(client, case, unit, code, "hisingen")
    r = client.get(f"/referrals/{rid}", headers=worker("nordost"))
    assert_problem(r, 403, "forbidden")
    assert "former-district-expired" in r.json()["detail"]


def test_no_token_is_401_and_the_probes_stay_open(client: httpx.Client) -> None:
    r = client.get(f"/referrals/{uuid.uuid4()}")
    assert_problem(r, 401, "missing-token")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/healthz").status_code == 200
