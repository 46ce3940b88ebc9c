"""The follow-up report and audit rows over projected case facts on a real PostgreSQL.

58 generated cases (57 persons): intakes in January and February 2024 in four current
districts plus the old code "lundby" (rolls up into "hisingen"); the person of centrum's
first January case has a second case in nordost; sydvast has 3 persons (suppressed).

Per case, with k its index within its (district, month) batch, the generator gives:
assessment unless k % 4 == 3 (need LOW/MODERATE/HIGH by k % 3); for even k a referral
(across districts when k % 4 == 0) and an intervention 3*(k+1) days after intake (top
guideline priority when k % 4 == 0); children in household when k % 3 == 0, a family member
engaged when k % 6 == 0; a follow-up completed when k % 5 == 0, missed when k % 5 == 1;
closed on day 20 when k % 3 == 1, reopened when k % 6 == 1 (80 days after closing if k < 6,
400 days after otherwise).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from likvard.inbox import Incoming
from services.projections import readmodels
from services.projections.reports import ReportRow, audit_rows, followup_report, to_csv

pytestmark = pytest.mark.integration

JAN = datetime(2024, 1, 10, 10, 0, tzinfo=UTC)
FEB = datetime(2024, 1, 31, 23, 30, tzinfo=UTC)  # 1 February 00:30 in Stockholm
AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
BATCHES = (  # (district code at intake, month start, cases)
    ("centrum", JAN, 12),
    ("nordost", JAN, 10),
    ("sydvast", JAN, 3),
    ("hisingen", JAN, 6),
    ("lundby", JAN, 4),
    ("centrum", FEB, 8),
    ("nordost", FEB, 8),
    ("hisingen", FEB, 6),
)
SHARED = "person-centrum-01-00"
TOPICS = {"i": "likvard.intake.v1", "r": "likvard.referral.v1", "f": "likvard.followup.v1"}


class Case:
    def __init__(self, case_id: str, district: str, intake_at: datetime) -> None:
        self.case_id, self.district, self.intake_at = case_id, district, intake_at
        self.versions: dict[str, int] = {}
        self.events: list[Incoming] = []

    def __call__(self, service: str, event_type: str, days: float, **data: Any) -> None:
        topic = TOPICS[service]
        version = self.versions[topic] = self.versions.get(topic, 0) + 1
        event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{topic}/{self.case_id}/{version}"))
        metadata = {
            "event_id": event_id,
            "event_type": event_type,
            "case_id": self.case_id,
            "stream_version": version,
            "occurred_at": self.intake_at + timedelta(days=days),
            "district": self.district,
            "actor": "cw-1",
        }
        self.events.append(
            Incoming(topic, 0, 0, event_id, event_type, self.case_id, metadata, data)
        )


def intake(c: Case, person: str, children: bool) -> None:
    c(
        "i",
        "IntakeRegistered",
        0,
        person=person,
        district=c.district,
        substances=["ALCOHOL"],
        referral_source="SELF",
        children_in_household="YES" if children else "NO",
    )


def generated() -> Iterator[Incoming]:
    for district, month, n in BATCHES:
        label = "01" if month == JAN else "02"
        for k in range(n):
            case_id = f"case-{district}-{label}-{k:02d}"
            c = Case(case_id, district, month + timedelta(hours=k))
            intake(c, f"person-{district}-{label}-{k:02d}", children=k % 3 == 0)
            if k % 4 != 3:
                c("i", "AssessmentCompleted", 1, need_level=("LOW", "MODERATE", "HIGH")[k % 3])
            if k % 2 == 0:
                c("r", "ReferralRequested", 2)
                if k % 4 == 0:
                    c("r", "ReferredAcrossDistrict", 2.1)
                priority = 1 if k % 4 == 0 else 3
                c("r", "InterventionStarted", 3 * (k + 1), guideline_priority=priority)
            if k % 6 == 0:
                c("f", "FamilyMemberEngaged", 4, accepted=True, is_child=False)
            if k % 5 in (0, 1):
                c("f", "FollowUpScheduled", 5)
                if k % 5 == 0:
                    c(
                        "f",
                        "FollowUpCompleted",
                        60,
                        goals_reached="YES" if k < 10 else "PARTLY",
                        situation_improved="BETTER" if k % 2 == 0 else "SAME",
                    )
                else:
                    c("f", "FollowUpMissed", 60)
            if k % 3 == 1:
                c("i", "CaseClosed", 20)
                if k % 6 == 1:
                    c("i", "CaseReopened", 20 + (80 if k < 6 else 400))
            yield from c.events
    shared = Case("case-shared-nordost", "nordost", JAN + timedelta(days=10))
    intake(shared, SHARED, children=False)
    shared("i", "AssessmentCompleted", 1, need_level="HIGH")
    yield from shared.events


EVENTS = list(generated())


@pytest.fixture
def projected(database_url: str, schema: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, EVENTS)
        yield conn


def report(conn: psycopg.Connection[Any], schema: str, **kw: Any) -> dict[tuple[str, str], Any]:
    args: dict[str, Any] = {"start": date(2024, 1, 1), "end": date(2024, 12, 31)}
    rows = followup_report(conn, schema, as_of=AS_OF, **(args | kw))
    return {(r.period, r.district): r for r in rows}


def test_month_report_numbers(projected: psycopg.Connection[Any], schema: str) -> None:
    rows = report(projected, schema, period="month")
    assert list(rows) == [
        ("2024-01", "centrum"),
        ("2024-01", "hisingen"),
        ("2024-01", "nordost"),
        ("2024-01", "sydvast"),
        ("2024-01", "city"),
        ("2024-02", "centrum"),
        ("2024-02", "hisingen"),
        ("2024-02", "nordost"),
        ("2024-02", "city"),
    ]
    assert rows["2024-01", "centrum"] == ReportRow(
        period="2024-01",
        district="centrum",
        suppressed=False,
        persons=12,
        new_intakes=12,
        assessed=9,
        referrals=6,
        referrals_across_share=0.5,
        days_to_first_intervention_median=18.0,  # 3, 9, 15, 21, 27, 33 days
        days_to_first_intervention_p90=30.0,
        top_guideline_share=0.5,
        family_members_engaged=2,
        cases_with_children=4,
        family_engaged_share_with_children=0.5,
        followups_completed=3,
        followups_missed=3,
        goals_reached_share=2 / 3,  # completed at k = 0, 5, 10; goals reached for k < 10
        situation_improved_share=2 / 3,  # better for even k: 0 and 10
        closed_not_reopened_share=0.75,  # k=1 reopened after 80 days; k=7 after 400
    )
    # lundby (old structure) rolls up: hisingen's 6 cases plus lundby's 4
    hisingen = rows["2024-01", "hisingen"]
    assert (hisingen.persons, hisingen.new_intakes, hisingen.referrals) == (10, 10, 5)
    assert hisingen.referrals_across_share == pytest.approx(0.6)
    # the shared person is in both centrum and nordost, once in the city row
    nordost = rows["2024-01", "nordost"]
    assert (nordost.persons, nordost.new_intakes, nordost.assessed) == (11, 11, 9)
    city = rows["2024-01", "city"]
    assert (city.persons, city.new_intakes, city.referrals) == (35, 36, 18)
    sydvast = rows["2024-01", "sydvast"]
    assert sydvast.suppressed and sydvast.persons is None and sydvast.referrals is None
    # intakes at 23:30 UTC on 31 January fall in February in Stockholm
    assert rows["2024-02", "city"].persons == 22
    assert rows["2024-02", "centrum"].new_intakes == 8


def test_year_report_and_district_filter(projected: psycopg.Connection[Any], schema: str) -> None:
    rows = report(projected, schema, period="year")
    assert rows["2024", "city"].persons == 57
    assert rows["2024", "city"].new_intakes == 58
    assert rows["2024", "centrum"].persons == 20
    only = report(projected, schema, period="year", district="hisingen")
    assert list(only) == [("2024", "hisingen")]
    assert only["2024", "hisingen"].persons == 16
    # a window that ends in January leaves February out
    jan = report(projected, schema, period="year", end=date(2024, 1, 31))
    assert jan["2024", "city"].persons == 35


def test_as_recorded_structure_keeps_old_codes(
    projected: psycopg.Connection[Any], schema: str
) -> None:
    rows = report(projected, schema, period="month", structure="as-recorded")
    assert rows["2024-01", "hisingen"].persons == 6
    lundby = rows["2024-01", "lundby"]
    assert lundby.suppressed and lundby.persons is None
    assert rows["2024-01", "city"].persons == 35
    assert not report(projected, schema, period="month", min_cell=50)["2024-01", "city"].persons


def test_closed_share_waits_a_year(projected: psycopg.Connection[Any], schema: str) -> None:
    early = datetime(2024, 6, 1, tzinfo=UTC)  # no closing is a year old yet
    rows = followup_report(
        projected, schema, start=date(2024, 1, 1), end=date(2024, 1, 31), period="month",
        as_of=early,
    )  # fmt: skip
    assert all(r.closed_not_reopened_share is None for r in rows)


def test_csv(projected: psycopg.Connection[Any], schema: str) -> None:
    rows = followup_report(
        projected, schema, start=date(2024, 1, 1), end=date(2024, 1, 31), period="month",
        as_of=AS_OF,
    )  # fmt: skip
    lines = to_csv(rows).splitlines()
    assert lines[0] == (
        "period,district,suppressed,persons,new_intakes,assessed,referrals,"
        "referrals_across_share,days_to_first_intervention_median,"
        "days_to_first_intervention_p90,top_guideline_share,family_members_engaged,"
        "cases_with_children,family_engaged_share_with_children,followups_completed,"
        "followups_missed,goals_reached_share,situation_improved_share,closed_not_reopened_share"
    )
    assert lines[1] == (
        "2024-01,centrum,false,12,12,9,6,0.5000,18.0000,30.0000,0.5000,2,4,0.5000,3,3,"
        "0.6667,0.6667,0.7500"
    )
    assert "2024-01,sydvast,true,,,,,,,,,,,,,,,," in lines  # 16 empty numbers
    assert len(lines) == 1 + 5


def test_audit_rows(projected: psycopg.Connection[Any], schema: str) -> None:
    rows = {r.person: r for r in audit_rows(projected, schema)}
    assert len(rows) == 45  # 57 persons, 12 whose most recent case has no assessment
    first = rows["person-lundby-01-00"]
    assert (first.district, first.need_level) == ("hisingen", "LOW")
    assert dict(first.outcomes) == {
        "specialist_access": True,
        "timely_start": True,
        "guideline_adherence": True,
        "family_engagement": True,
        "followup_completion": True,
    }
    second = rows["person-lundby-01-01"]
    assert dict(second.outcomes) == {
        "specialist_access": False,
        "timely_start": None,
        "guideline_adherence": None,
        "family_engagement": None,
        "followup_completion": False,
    }
    late = rows["person-centrum-01-10"]  # intervention on day 33, not top priority
    assert (late.outcomes["timely_start"], late.outcomes["guideline_adherence"]) == (False, False)
    # the shared person's most recent case is in nordost
    assert (rows[SHARED].district, rows[SHARED].need_level) == ("nordost", "HIGH")
    assert "person-centrum-01-03" not in rows  # never assessed
    recorded = {r.person: r for r in audit_rows(projected, schema, structure="as-recorded")}
    assert recorded["person-lundby-01-00"].district == "lundby"


def test_a_follow_up_not_yet_due_says_nothing_about_completion(
    database_url: str, schema: str
) -> None:
    pending = Case("case-pending", "centrum", JAN)
    intake(pending, "person-pending", children=False)
    pending("i", "AssessmentCompleted", 1, need_level="LOW")
    pending("f", "FollowUpScheduled", 5)
    done = Case("case-done", "centrum", JAN)
    intake(done, "person-done", children=False)
    done("i", "AssessmentCompleted", 1, need_level="LOW")
    done("f", "FollowUpScheduled", 5)
    done("f", "FollowUpMissed", 60)
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, pending.events + done.events)
        rows = {r.person: r.outcomes["followup_completion"] for r in audit_rows(conn, schema)}
    assert rows == {"person-pending": None, "person-done": False}
