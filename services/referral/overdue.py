"""Overdue referrals: requested and not answered (accepted, declined or withdrawn) for more
than LIKVARD_REFERRAL_ANSWER_DAYS (default 14) of the city's calendar days. Requested on
1 March: waiting 14 days on 15 March (not overdue), overdue from 16 March. The rule is
`likvard.deadlines`, shared with the follow-ups and the report.

`waiting` is pure; `overdue_in_districts` is the district list's query over the service's
own event store and its known cases (a case's district is its current one as learnt from
intake, else the district the referral recorded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from psycopg import sql

from likvard import deadlines
from likvard.domain import local_date
from likvard.eventstore import EventStore

ANSWERS = ("ReferralAccepted", "ReferralDeclined", "ReferralWithdrawn")


@dataclass(frozen=True)
class Waiting:
    """How long a referral has waited for its answer, judged on `today`."""

    days_waiting: int | None  # None: answered (or withdrawn), it waits no longer
    overdue: bool


def waiting(status: str, requested_at: datetime, today: date, answer_days: int) -> Waiting:
    """A referral's wait: only a requested one waits, and it is overdue after `answer_days`."""
    if status != "requested":
        return Waiting(None, False)
    start = local_date(requested_at)
    return Waiting(
        deadlines.days_since(start, today), deadlines.is_overdue(start, today, answer_days)
    )


@dataclass(frozen=True)
class OverdueReferral:
    referral_id: str
    case_id: str
    unit_id: str
    intervention_code: str
    district: str
    requested_at: datetime


_OVERDUE_SQL = """
SELECT r.stream_id, r.metadata->>'case_id', r.payload->>'unit_id',
    r.payload->>'intervention_code', COALESCE(k.district, r.payload->>'person_district'),
    r.occurred_at
FROM {s}.events r
LEFT JOIN {s}.known_cases k
    ON k.case_id = r.metadata->>'case_id' AND k.status <> 'unknown' AND k.district IS NOT NULL
WHERE r.event_type = 'ReferralRequested'
  AND r.occurred_at < %(before)s
  AND COALESCE(k.district, r.payload->>'person_district') = ANY(%(districts)s::text[])
  AND NOT EXISTS (
    SELECT 1 FROM {s}.events e
    WHERE e.stream_id = r.stream_id AND e.event_type = ANY(%(answers)s::text[])
  )
ORDER BY r.occurred_at, r.stream_id
LIMIT %(limit)s
"""


def overdue_in_districts(
    store: EventStore,
    districts: Sequence[str],
    today: date,
    answer_days: int,
    *,
    limit: int = 10_000,
) -> list[OverdueReferral]:
    """The referrals of cases in `districts` overdue for an answer on `today`, oldest first."""
    with store.pool.connection() as conn:
        rows = conn.execute(
            sql.SQL(_OVERDUE_SQL).format(s=sql.Identifier(store.schema)),
            {
                "before": deadlines.overdue_before(today, answer_days),
                "districts": list(districts),
                "answers": list(ANSWERS),
                "limit": limit,
            },
        ).fetchall()
    return [OverdueReferral(str(r[0]), r[1], r[2], r[3], r[4], r[5].astimezone(UTC)) for r in rows]
