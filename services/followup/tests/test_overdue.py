"""Overdue follow-ups: the rule (pure) and GET /followups/due's `overdue` mark and filter on
a real server and PostgreSQL, with the access log. The post-intervention interview is due
30 days after the intervention's end, so an intervention that ended 60 days ago has its
interview 30 days past due (in the default 30-day window) and one that ended 61 days ago
31 days past due (overdue)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta

import httpx
import pytest
from psycopg_pool import ConnectionPool

from likvard import access_log_audit, deadlines
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.domain import CITY_TZ
from likvard.eventstore import EventStore
from likvard.known_cases import CaseDirectory
from likvard.topics import SERVICE_TOPICS
from services.followup.overdue import Window, is_overdue
from services.followup.service import make_service
from services.followup.tests.test_api import (
    COMPLETE,
    Followup,
    assert_problem,
    followup as followup,  # the fixture
    intervention_ended,
    known_case,
    schedule,
)
from services.followup.tests.test_authorization import subject, worker
from tests.identity import bearer
from tests.support import serving

# --- the rule, pure -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("due_on", "overdue"),
    [
        (date(2024, 3, 1), False),  # 30 days past due on 31 March: still in the window
        (date(2024, 2, 29), True),  # 31 days: overdue
        (date(2024, 3, 31), False),  # due today
        (date(2024, 4, 30), False),  # not due yet
    ],
)
def test_a_followup_is_overdue_more_than_the_window_past_due(due_on: date, overdue: bool) -> None:
    today = date(2024, 3, 31)
    assert is_overdue(due_on, today, 30) is overdue
    window = Window(30, today)
    assert window.overdue(due_on) is overdue
    assert (due_on < window.overdue_before) is overdue  # the filter agrees with the mark


def test_a_zero_window_makes_yesterdays_followup_overdue() -> None:
    today = date(2024, 1, 1)
    assert is_overdue(date(2023, 12, 31), today, 0) and not is_overdue(today, today, 0)


# --- the API ----------------------------------------------------------------------------


def ended_days_ago(days: int) -> datetime:
    """Noon (city time) `days` calendar days ago."""
    day = deadlines.city_today() - timedelta(days=days)
    return datetime.combine(day, time(12), tzinfo=CITY_TZ).astimezone(UTC)


def tomorrow() -> str:
    return (deadlines.city_today() + timedelta(days=1)).isoformat()


def interviews(r: httpx.Response) -> dict[str, bool]:
    """case id -> overdue, for the post-intervention interviews of the answer."""
    assert r.status_code == 200, r.text
    return {
        f["case_id"]: f["overdue"] for f in r.json() if f["kind"] == "POST_INTERVENTION_INTERVIEW"
    }


@pytest.fixture
def client(followup: Followup) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=followup.base_url, timeout=30) as c:
        yield c


@pytest.mark.integration
def test_due_marks_and_filters_the_followups_past_their_window(
    client: httpx.Client, followup: Followup, database_url: str
) -> None:
    late, in_window = known_case(followup), known_case(followup)
    schedule(followup, intervention_ended(late, ended=ended_days_ago(61)))
    schedule(followup, intervention_ended(in_window, ended=ended_days_ago(60)))
    nordost = worker("nordost")

    r = client.get("/followups/due", params={"before": tomorrow()}, headers=nordost)
    assert interviews(r) == {late: True, in_window: False}
    assert all(not f["overdue"] for f in r.json() if f["kind"] != "POST_INTERVENTION_INTERVIEW")

    reader = subject("cw")
    only = client.get(
        "/followups/due",
        params={"before": tomorrow(), "overdue": "true"},
        headers=worker("nordost", who=reader),
    )
    assert interviews(only) == {late: True} and len(only.json()) == 1
    logged = access_log_audit.search(Settings(database_url=database_url), actor=reader)
    assert [str(e.case_id) for e in logged if e.case_id] == [late]  # only the case shown
    assert {(e.action, e.outcome) for e in logged} == {("followups.due", "allowed")}

    # `before` still applies: nothing overdue is due before the late interview's day.
    due_day = (deadlines.city_today() - timedelta(days=31)).isoformat()
    early = client.get(
        "/followups/due", params={"before": due_day, "overdue": "true"}, headers=nordost
    )
    assert early.json() == []
    within = client.get(
        "/followups/due",
        params={"before": "2099-01-01", "overdue": "false"},
        headers=nordost,
    )
    assert interviews(within) == {in_window: False} and len(within.json()) == 5  # + 4 ASI

    fid = only.json()[0]["followup_id"]
    done = client.post(f"/followups/{fid}/complete", json=COMPLETE, headers=nordost)
    assert done.status_code == 200, done.text
    again = client.get(
        "/followups/due", params={"before": tomorrow(), "overdue": "true"}, headers=nordost
    )
    assert again.json() == []

    # The same rules of who may ask as without the filter.
    staff = bearer("unit-staff", unit="hisingen-anhorigstod", subject="staff-anhorig")
    for headers, params in (
        (staff, {"before": tomorrow(), "overdue": "true"}),
        (nordost, {"before": tomorrow(), "overdue": "true", "district": "centrum"}),
    ):
        assert_problem(client.get("/followups/due", params=params, headers=headers), 403)
    bad = client.get(
        "/followups/due", params={"before": tomorrow(), "overdue": "maybe"}, headers=nordost
    )
    assert_problem(bad, 422)


@pytest.fixture
def short_window(
    database_url: str, schema: str, catalogue: Catalogue, pool: ConnectionPool
) -> Iterator[Followup]:
    """The follow-up service with LIKVARD_FOLLOWUP_WINDOW_DAYS=5."""
    from services.followup.api import create_app

    settings = Settings(database_url=database_url, topic_prefix="t-ow.", followup_window_days=5)
    app = create_app(settings, schema=schema, catalogue=catalogue, case_wait=0.2)
    topic = "t-ow." + SERVICE_TOPICS["followup"]
    store = EventStore(pool, schema, catalogue, producer="likvard-followup", topic=topic)
    with serving(app) as base_url:
        yield Followup(
            base_url,
            schema,
            store,
            make_service(store),
            CaseDirectory(schema),
            pool,
            database_url,
            catalogue,
        )


@pytest.mark.integration
def test_the_window_is_the_setting(short_window: Followup) -> None:
    late, in_window = known_case(short_window), known_case(short_window)
    schedule(short_window, intervention_ended(late, ended=ended_days_ago(36)))  # due 6 days ago
    schedule(short_window, intervention_ended(in_window, ended=ended_days_ago(35)))  # 5 days
    with httpx.Client(base_url=short_window.base_url, timeout=30) as client:
        r = client.get("/followups/due", params={"before": tomorrow()}, headers=worker("nordost"))
    assert interviews(r) == {late: True, in_window: False}
