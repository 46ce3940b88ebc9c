"""The report's overdue counts (services.projections.overdue) on a hand-built event history
folded into fresh read models on a real PostgreSQL, and the shared rule's calendar edges.

Times are local (Europe/Stockholm). The report day is 31 March 2024 (DST began that night
at 02:00) with 14 days to answer a referral and a 30-day window for follow-ups: a referral
requested on 17 March (14 days) is not overdue, one of 16 March (15 days) is; a follow-up
due on 1 March (30 days) is not, one due on 29 February (31 days) is.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from likvard import deadlines
from likvard.inbox import Incoming
from services.projections import readmodels
from services.projections.overdue import OverdueCounts, overdue_counts

LOCAL = ZoneInfo("Europe/Stockholm")
DAY = date(2024, 3, 31)
TOPICS = {"intake": "likvard.intake.v1", "referral": "likvard.referral.v1"}
TOPICS["followup"] = "likvard.followup.v1"


def at(m: int, d: int, hh: int = 9, mm: int = 0, y: int = 2024) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=LOCAL)


# --- the rule, pure -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "overdue"),
    [(date(2024, 3, 17), False), (date(2024, 3, 16), True), (DAY, False), (date(2023, 1, 1), True)],
)
def test_exactly_the_allowed_days_is_not_overdue_one_more_is(start: date, overdue: bool) -> None:
    assert deadlines.is_overdue(start, DAY, 14) is overdue
    assert (start < deadlines.last_day_on_time(DAY, 14)) is overdue


def test_the_cutoff_is_the_start_of_the_citys_day_across_a_dst_change() -> None:
    # 14 days before 10 April is 27 March, in winter time (UTC+1): 26 March 23:00 UTC.
    assert deadlines.overdue_before(date(2024, 4, 10), 14) == datetime(2024, 3, 26, 23, tzinfo=UTC)
    # In summer time (UTC+2): 1 April 00:00 local is 31 March 22:00 UTC.
    assert deadlines.overdue_before(date(2024, 4, 15), 14) == datetime(2024, 3, 31, 22, tzinfo=UTC)
    # 23:30 local on 16 March is 22:30 UTC, the city's 16 March: overdue on 31 March.
    late = at(3, 16, 23, 30)
    assert late.astimezone(UTC) < deadlines.overdue_before(DAY, 14)
    assert deadlines.city_today(late.astimezone(UTC)) == date(2024, 3, 16)


# --- the report's counts over the read models -------------------------------------------


class History:
    """Events of several cases, as the projection worker receives them."""

    def __init__(self) -> None:
        self.events: list[Incoming] = []
        self.versions: dict[tuple[str, str], int] = {}

    def add(
        self,
        case: str,
        service: str,
        event_type: str,
        when: datetime,
        district: str,
        data: dict[str, Any],
        recorded: datetime | None = None,
    ) -> None:
        topic = TOPICS[service]
        version = self.versions[case, topic] = self.versions.get((case, topic), 0) + 1
        event_id = str(uuid.uuid4())
        metadata = {
            "event_id": event_id,
            "event_type": event_type,
            "case_id": case,
            "stream_version": version,
            "occurred_at": when,
            "recorded_at": recorded or when,
            "producer": f"likvard-{service}",
            "district": district,
            "actor": "cw-1",
            "correlation_id": "c",
            "causation_id": None,
            "traceparent": None,
        }
        self.events.append(
            Incoming(topic, 0, len(self.events), event_id, event_type, case, metadata, data)
        )

    def case(self, district: str, when: datetime = at(1, 2)) -> str:
        case = f"case-{uuid.uuid4().hex[:8]}"
        data = {
            "person": uuid.uuid4().hex * 2,
            "district": district,
            "substances": ["ALCOHOL"],
            "referral_source": "SELF",
            "children_in_household": "NO",
        }
        self.add(case, "intake", "IntakeRegistered", when, district, data)
        return case

    def referral(
        self, case: str, district: str, when: datetime, recorded: datetime | None = None
    ) -> str:
        rid = str(uuid.uuid4())
        data = {
            "referral_id": rid,
            "unit_id": "u",
            "intervention_code": "X",
            "person_district": district,
            "unit_district": district,
            "recipient_kind": "CITY_SOCIAL_SERVICES",
            "consent_id": None,
            "consent_override": None,
        }
        self.add(case, "referral", "ReferralRequested", when, district, data, recorded)
        return rid

    def answer(self, case: str, rid: str, event_type: str, when: datetime, district: str) -> None:
        data: dict[str, Any] = {"referral_id": rid}
        data.update({"planned_start": None} if event_type == "ReferralAccepted" else {})
        data.update({} if event_type == "ReferralAccepted" else {"reason": "OTHER"})
        self.add(case, "referral", event_type, when, district, data)

    def followup(self, case: str, district: str, due_on: date, when: datetime = at(1, 5)) -> str:
        fid = str(uuid.uuid4())
        data = {
            "followup_id": fid,
            "kind": "POST_INTERVENTION_INTERVIEW",
            "due_on": due_on,
            "intervention_id": None,
            "referral_id": None,
            "district": district,
        }
        self.add(case, "followup", "FollowUpScheduled", when, district, data)
        return fid

    def missed(self, case: str, fid: str, when: datetime, district: str) -> None:
        data = {"followup_id": fid, "kind": "POST_INTERVENTION_INTERVIEW", "reason": "PERSON_MOVED"}
        self.add(case, "followup", "FollowUpMissed", when, district, data)


@pytest.fixture
def folded(database_url: str, schema: str) -> Any:
    def fold(history: History) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, history.events)

    return fold


def counts(database_url: str, schema: str, day: date = DAY, **options: Any) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn:
        rows = overdue_counts(conn, schema, day, answer_days=14, window_days=30, **options)
    assert all(isinstance(r, OverdueCounts) and r.day == day for r in rows)
    return {r.district: (r.referrals_overdue, r.followups_overdue) for r in rows}


@pytest.mark.integration
def test_overdue_counts_per_district_as_of_the_report_day(
    database_url: str, schema: str, folded: Any
) -> None:
    h = History()
    north, north2, south = h.case("nordost"), h.case("nordost"), h.case("sydvast")
    # Nordost referrals: 16 March (15 days, overdue), 17 March (14 days, not), 16 March at
    # 23:30 (the city's 16 March, overdue), 1 March accepted on 10 March (answered, not),
    # 1 March declined on 1 April (after the day: still unanswered on 31 March, overdue).
    h.referral(north, "nordost", at(3, 16))
    h.referral(north, "nordost", at(3, 17, 0, 5))
    h.referral(north2, "nordost", at(3, 16, 23, 30))
    accepted = h.referral(north2, "nordost", at(3, 1))
    h.answer(north2, accepted, "ReferralAccepted", at(3, 10), "nordost")
    late = h.referral(north2, "nordost", at(3, 1))
    h.answer(north2, late, "ReferralDeclined", at(4, 1, 8), "nordost")
    # Sydväst: one withdrawn on the day itself (answered by its end: not overdue).
    gone = h.referral(south, "sydvast", at(2, 1))
    h.answer(south, gone, "ReferralWithdrawn", at(3, 31, 23, 50), "sydvast")
    # Follow-ups: Nordost due 29 Feb (31 days: overdue), 1 March (30: not); Sydväst due
    # 1 Feb missed on 30 March (done: not), due 2 Feb missed 1 April (overdue on the day),
    # due 1 Jan but scheduled only on 1 April (not known to be due on the day: not).
    h.followup(north, "nordost", date(2024, 2, 29))
    h.followup(north, "nordost", date(2024, 3, 1))
    done = h.followup(south, "sydvast", date(2024, 2, 1))
    h.missed(south, done, at(3, 30), "sydvast")
    missed_later = h.followup(south, "sydvast", date(2024, 2, 2))
    h.missed(south, missed_later, at(4, 1), "sydvast")
    h.followup(south, "sydvast", date(2024, 1, 1), when=at(4, 1))
    folded(h)

    assert counts(database_url, schema) == {
        "nordost": (3, 1),
        "sydvast": (0, 1),
        "city": (3, 2),
    }
    # A day later: 17 March's referral is 15 days old; the declined and the missed ones are
    # done; the follow-up due 1 March is 31 days past due; the one scheduled on 1 April
    # (due 1 January) counts now.
    assert counts(database_url, schema, date(2024, 4, 1)) == {
        "nordost": (3, 2),
        "sydvast": (0, 1),
        "city": (3, 3),
    }
    # Rolled up into another structure, and small counts suppressed.
    rolled = counts(database_url, schema, district_map={"nordost": "x", "sydvast": "x"})
    assert rolled == {"x": (3, 2), "city": (3, 2)}
    assert counts(database_url, schema, min_cell=3) == {
        "nordost": (3, None),
        "sydvast": (0, None),
        "city": (3, None),
    }


@pytest.mark.integration
def test_a_referral_counts_in_the_cases_district_on_the_day_and_as_known_then(
    database_url: str, schema: str, folded: Any
) -> None:
    h = History()
    moved, stays = h.case("nordost"), h.case("centrum")
    h.referral(moved, "nordost", at(3, 1))
    # The case moved to Hisingen on 20 March: on 31 March its overdue referral is Hisingen's;
    # on 19 March (18 days after the request) it was still Nordost's.
    h.add(
        moved,
        "intake",
        "CaseTransferred",
        at(3, 20),
        "hisingen",
        {"from_district": "nordost", "to_district": "hisingen", "reason": "PERSON_MOVED"},
    )
    # Requested on 1 March but recorded only on 25 March (a district system sent it late).
    h.referral(stays, "centrum", at(3, 1), recorded=at(3, 25))
    folded(h)

    assert counts(database_url, schema) == {"centrum": (1, 0), "hisingen": (1, 0), "city": (2, 0)}
    assert counts(database_url, schema, date(2024, 3, 19)) == {
        "centrum": (1, 0),
        "nordost": (1, 0),
        "city": (2, 0),
    }
    # As the city could have known it on 24 March: the late referral was not recorded yet.
    known = counts(database_url, schema, known_by=at(3, 24, 23).astimezone(UTC))
    assert known == {"hisingen": (1, 0), "city": (1, 0)}
    # Nothing at all: only the city row, with zeros.
    assert counts(database_url, schema, date(2024, 3, 10)) == {"city": (0, 0)}
