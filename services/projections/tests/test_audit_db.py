"""The audit's per-person rows and waits over projected read models on a real PostgreSQL:
two persons with hand-built histories (a third, never assessed, is left out)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from services.projections import readmodels
from services.projections.reports import WAITS, audit_rows, wait_rows
from services.projections.stats import CITY, WaitRow, wait_report
from services.projections.tests.test_reports import Case

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 4, 9, 0, tzinfo=UTC)


def _intake(c: Case, person: str, **extra: Any) -> None:
    c(
        "i",
        "IntakeRegistered",
        0,
        person=person,
        district=c.district,
        substances=["ALCOHOL"],
        referral_source="SELF",
        children_in_household="NO",
        **extra,
    )


def events() -> list[Any]:
    a = Case("case-a", "centrum", T0)  # every wait ends
    _intake(a, "person-a", age_band="25-34")
    a("i", "AssessmentCompleted", 1, need_level="LOW")
    a("r", "ReferralRequested", 2)
    a("i", "FirstVisitHeld", 4, visit_id="00000000-0000-0000-0000-000000000001")
    a("r", "ReferralAccepted", 5)
    a("r", "InterventionStarted", 9, guideline_priority=1)
    a("r", "InterventionEnded", 30)
    a("f", "FollowUpCompleted", 50, goals_reached="YES", situation_improved="BETTER")
    b = Case("case-b", "nordost", T0)  # referred, never answered, closed on day 20
    _intake(b, "person-b")
    b("i", "AssessmentCompleted", 1, need_level="HIGH")
    b("r", "ReferralRequested", 2)
    b("i", "CaseClosed", 20)
    c = Case("case-c", "nordost", T0)  # never assessed: no need level, not audited
    _intake(c, "person-c")
    c("r", "ReferralRequested", 2)
    return [*a.events, *b.events, *c.events]


@pytest.fixture
def projected(database_url: str, schema: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, events())
        yield conn


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def test_audit_rows_carry_the_standardisation_strata(
    projected: psycopg.Connection[Any], schema: str
) -> None:
    rows = {r.person: r for r in audit_rows(projected, schema)}
    assert set(rows) == {"person-a", "person-b"}
    assert (rows["person-a"].age_band, rows["person-a"].gender) == ("25-34", "NOT_STATED")
    assert (rows["person-b"].age_band, rows["person-b"].gender) == ("UNKNOWN", "NOT_STATED")
    assert rows["person-a"].outcomes["timely_start"] is True


def test_wait_rows_end_at_the_first_answer_and_censor_at_closing(
    projected: psycopg.Connection[Any], schema: str
) -> None:
    waits = wait_rows(projected, schema)
    assert set(waits) == set(WAITS)
    closed = day(20)
    assert waits["intake_to_first_visit"] == [
        WaitRow(day(0), day(4), "centrum", "LOW"),
        WaitRow(day(0), None, "nordost", "HIGH", censored_at=closed),
    ]
    assert waits["referral_to_answer"] == [
        WaitRow(day(2), day(5), "centrum", "LOW"),
        WaitRow(day(2), None, "nordost", "HIGH", censored_at=closed),
    ]
    assert waits["referral_to_start"][0] == WaitRow(day(2), day(9), "centrum", "LOW")
    assert waits["intervention_end_to_followup"] == [WaitRow(day(30), day(50), "centrum", "LOW")]
    report = wait_report(waits, as_of=day(400), min_cell=1)
    city = {s.wait: s for s in report.summaries if s.district == CITY}
    # person b's wait is censored at the closing (18 days after the referral), not at as-of
    assert city["referral_to_answer"].median_days == pytest.approx(3)
    assert city["referral_to_answer"].censored == 1
    assert city["intervention_end_to_followup"].median_days == pytest.approx(20)
