"""Overdue referrals: the rule (pure), the unit inbox's marks and filter, and the district
list GET /referrals/overdue, on a real server, PostgreSQL, the development OpenID provider
and the access log. Referrals are requested in the past with `occurred_at`; the service's
default is 14 days to answer (one app here is started with 3)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta

import httpx
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from likvard import access_log_audit, deadlines
from likvard.codec import Catalogue
from likvard.config import ConfigError, Settings, load_settings
from likvard.domain import CITY_TZ
from likvard.known_cases import CaseDirectory
from services.referral.overdue import Waiting, waiting
from services.referral.tests.test_api import assert_problem, city_unit_in, seed_case
from services.referral.tests.test_authorization import staff, subject, worker
from tests.identity import bearer
from tests.support import RunningService, intake_event, serving

# --- the rule, pure -------------------------------------------------------------------


def local(day: date, hh: int = 12, mm: int = 0) -> datetime:
    return datetime.combine(day, time(hh, mm), tzinfo=CITY_TZ)


TODAY = date(2024, 3, 31)


@pytest.mark.parametrize(
    ("status", "requested", "expected"),
    [
        ("requested", local(date(2024, 3, 17)), Waiting(14, False)),  # exactly 14: on time
        ("requested", local(date(2024, 3, 16)), Waiting(15, True)),  # 15: overdue
        ("requested", local(date(2024, 3, 16), 23, 59), Waiting(15, True)),  # the city's day
        ("requested", local(date(2024, 3, 17), 0, 1), Waiting(14, False)),
        ("requested", local(TODAY, 0, 0), Waiting(0, False)),
        ("accepted", local(date(2023, 1, 1)), Waiting(None, False)),  # answered: waits no more
        ("declined", local(date(2023, 1, 1)), Waiting(None, False)),
        ("withdrawn", local(date(2023, 1, 1)), Waiting(None, False)),
    ],
)
def test_a_referral_is_overdue_after_more_than_the_allowed_days(
    status: str, requested: datetime, expected: Waiting
) -> None:
    # Given in UTC as stored: 23:59 local on 16 March is 22:59 UTC, still the 16th.
    assert waiting(status, requested.astimezone(UTC), TODAY, 14) == expected


def test_the_settings_are_whole_days_with_defaults() -> None:
    assert (load_settings({}).referral_answer_days, load_settings({}).followup_window_days) == (
        14,
        30,
    )
    env = {"LIKVARD_REFERRAL_ANSWER_DAYS": "7", "LIKVARD_FOLLOWUP_WINDOW_DAYS": "0"}
    assert (load_settings(env).referral_answer_days, load_settings(env).followup_window_days) == (
        7,
        0,
    )
    for name in ("LIKVARD_REFERRAL_ANSWER_DAYS", "LIKVARD_FOLLOWUP_WINDOW_DAYS"):
        for bad in ("-1", "x", "1.5", "3651", "²"):
            with pytest.raises(ConfigError, match=name):
                load_settings({name: bad})


# --- the API ----------------------------------------------------------------------------


def ago(days: int) -> str:
    """Noon (city time) `days` calendar days ago (0: now), as an RFC 3339 time."""
    if days == 0:
        return datetime.now(UTC).isoformat()
    return local(deadlines.city_today() - timedelta(days=days)).isoformat()


def refer(client: httpx.Client, case: str, unit: str, code: str, district: str, days: int) -> str:
    r = client.post(
        "/referrals",
        json={
            "case_id": case,
            "unit_id": unit,
            "intervention_code": code,
            "occurred_at": ago(days),
        },
        headers=worker(district),
    )
    assert r.status_code == 201, r.text
    rid: str = r.json()["referral_id"]
    return rid


@pytest.fixture
def client(referral: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=referral.base_url, timeout=30) as c:
        yield c


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


@pytest.mark.integration
def test_the_inbox_marks_overdue_referrals_and_filters_them(
    client: httpx.Client, referral: RunningService, database_url: str, settings: Settings
) -> None:
    unit, code = city_unit_in("hisingen")
    late, on_time, answered, fresh = (seed_case(referral, database_url) for _ in range(4))
    r_late = refer(client, late, unit, code, "nordost", 15)
    r_on_time = refer(client, on_time, unit, code, "nordost", 14)
    r_answered = refer(client, answered, unit, code, "nordost", 40)
    r_fresh = refer(client, fresh, unit, code, "nordost", 0)
    accept = client.post(f"/referrals/{r_answered}/accept", json={}, headers=staff(unit))
    assert accept.status_code == 200, accept.text

    r = client.get(f"/units/{unit}/referrals", headers=staff(unit))
    assert r.status_code == 200, r.text
    marks = {i["referral_id"]: (i["status"], i["days_waiting"], i["overdue"]) for i in r.json()}
    assert marks == {
        r_late: ("requested", 15, True),
        r_on_time: ("requested", 14, False),
        r_answered: ("accepted", None, False),
        r_fresh: ("requested", 0, False),
    }

    reader = subject("staff")
    only = client.get(f"/units/{unit}/referrals?overdue=true", headers=staff(unit, reader))
    assert [i["referral_id"] for i in only.json()] == [r_late]
    # Only the case shown is in the access log for that read.
    logged = access_log_audit.search(settings, actor=reader)
    assert [str(e.case_id) for e in logged if e.case_id] == [late]
    assert {(e.action, e.outcome) for e in logged} == {("unit.inbox", "allowed")}

    not_overdue = client.get(
        f"/units/{unit}/referrals",
        params={"overdue": "false", "status": "requested"},
        headers=staff(unit),
    )
    assert {i["referral_id"] for i in not_overdue.json()} == {r_on_time, r_fresh}

    # Another unit's staff, and a case worker, may not read this inbox, filtered or not.
    other_unit, _ = city_unit_in("nordost")
    intruder = subject("staff")
    for headers in (staff(other_unit, intruder), worker("nordost")):
        refused = client.get(f"/units/{unit}/referrals?overdue=true", headers=headers)
        assert_problem(refused, 403, "forbidden")
    [entry] = access_log_audit.search(settings, actor=intruder)
    assert (entry.action, entry.outcome, entry.reason) == ("unit.inbox", "refused", "not-your-unit")
    assert_problem(client.get(f"/units/{unit}/referrals?overdue=maybe", headers=staff(unit)), 422)


def transfer(referral: RunningService, database_url: str, case: str, to: str) -> None:
    """The case moves from Nordost to `to`, as the intake consumer would learn it."""
    event = intake_event(
        case, "CaseTransferred", {"from_district": "nordost", "to_district": to}, 2, to
    )
    with psycopg.connect(database_url) as conn, conn.transaction():
        CaseDirectory(referral.schema).handle(conn, [event])


@pytest.mark.integration
def test_the_district_list_shows_its_cases_overdue_referrals_and_logs_each_case(
    client: httpx.Client, referral: RunningService, database_url: str, settings: Settings
) -> None:
    unit, code = city_unit_in("hisingen")
    late, on_time, moved = (seed_case(referral, database_url, "nordost") for _ in range(3))
    centrum = seed_case(referral, database_url, "centrum")
    r_late = refer(client, late, unit, code, "nordost", 20)
    r_late_too = refer(client, late, unit, code, "nordost", 15)
    refer(client, on_time, unit, code, "nordost", 14)
    r_moved = refer(client, moved, unit, code, "nordost", 30)
    refer(client, centrum, unit, code, "centrum", 30)
    transfer(referral, database_url, moved, "sydvast")  # now Sydväst's case

    who = subject("cw")
    r = client.get("/referrals/overdue", headers=worker("nordost", who))
    assert r.status_code == 200, r.text
    assert [
        (i["referral_id"], i["case_id"], i["days_waiting"], i["district"]) for i in r.json()
    ] == [
        (r_late, late, 20, "nordost"),
        (r_late_too, late, 15, "nordost"),
    ]
    assert set(r.json()[0]) == {
        "referral_id",
        "case_id",
        "unit_id",
        "intervention_code",
        "district",
        "requested_at",
        "days_waiting",
    }
    logged = access_log_audit.search(settings, actor=who)
    # One entry per district asked (Nordost and the older districts it took over), then one
    # per case shown (two referrals of one case: one entry).
    asked = {e.resource for e in logged if e.case_id is None}
    assert "district:nordost" in asked and "district:centrum" not in asked
    assert [(e.resource, str(e.case_id)) for e in logged if e.case_id] == [
        ("district:nordost", late)
    ]
    assert {(e.action, e.outcome, e.reason) for e in logged} == {
        ("followups.due", "allowed", "own-district")
    }
    sydvast = client.get(
        "/referrals/overdue", params={"district": "sydvast"}, headers=worker("sydvast")
    )
    assert [i["referral_id"] for i in sydvast.json()] == [r_moved]

    # Another district: refused (and logged) unless with an emergency reason (flagged).
    nosy = subject("cw")
    other = client.get(
        "/referrals/overdue", params={"district": "centrum"}, headers=worker("nordost", nosy)
    )
    assert_problem(other, 403, "forbidden")
    [refusal] = access_log_audit.search(settings, actor=nosy)
    assert (refusal.resource, refusal.outcome, refusal.reason) == (
        "district:centrum",
        "refused",
        "not-your-district",
    )
    urgent = client.get(
        "/referrals/overdue",
        params={"district": "centrum"},
        headers={**worker("nordost", nosy), "Likvard-Emergency-Reason": "out-of-hours-duty"},
    )
    assert [i["case_id"] for i in urgent.json()] == [centrum]
    flagged = [e for e in access_log_audit.search(settings, actor=nosy) if e.case_id]
    assert [(e.emergency_reason, e.reason) for e in flagged] == [("out-of-hours-duty", "emergency")]
    # Unit staff, analysts and a made-up reason: refused.
    for headers in (
        staff(unit),
        bearer("analyst", subject="an-1"),
        {**worker("nordost"), "Likvard-Emergency-Reason": "curious"},
    ):
        assert_problem(client.get("/referrals/overdue", headers=headers), 403, "forbidden")

    # Answered: no longer overdue.
    declined = client.post(
        f"/referrals/{r_late}/decline", json={"reason": "LACK_OF_CAPACITY"}, headers=staff(unit)
    )
    assert declined.status_code == 200, declined.text
    after = client.get("/referrals/overdue", headers=worker("nordost"))
    assert [i["referral_id"] for i in after.json()] == [r_late_too]


@pytest.fixture
def strict_referral(
    database_url: str,
    new_schema: Callable[[str], str],
    catalogue: Catalogue,
    pool: ConnectionPool,
) -> Iterator[RunningService]:
    """The referral service with LIKVARD_REFERRAL_ANSWER_DAYS=3."""
    from likvard.eventstore import EventStore
    from services.referral.api import create_app

    schema = new_schema("ro")
    settings = Settings(database_url=database_url, referral_answer_days=3)
    app = create_app(settings, schema=schema, catalogue=catalogue, case_wait=0.5)
    store = EventStore(pool, schema, catalogue, producer="likvard-referral", topic="unused")
    with serving(app) as base_url:
        yield RunningService(base_url, schema, "unused", store)


@pytest.mark.integration
def test_the_number_of_days_is_the_setting(
    strict_referral: RunningService, database_url: str
) -> None:
    unit, code = city_unit_in("hisingen")
    late, on_time = (seed_case(strict_referral, database_url) for _ in range(2))
    with httpx.Client(base_url=strict_referral.base_url, timeout=30) as client:
        r_late = refer(client, late, unit, code, "nordost", 4)
        refer(client, on_time, unit, code, "nordost", 3)
        inbox = client.get(f"/units/{unit}/referrals?overdue=true", headers=staff(unit)).json()
        listed = client.get("/referrals/overdue", headers=worker("nordost")).json()
    assert [i["referral_id"] for i in inbox] == [r_late]
    assert [(i["referral_id"], i["days_waiting"]) for i in listed] == [(r_late, 4)]
