"""Overdue referrals and follow-ups per district as of a report day, from the read models.

`case_facts` counts referrals and follow-ups per case but not which of them are still
unanswered or undone, nor their due dates, so the counts are taken from `timeline` (every
event with its payload), which a replay rebuilds like every other read model. The rule is
`likvard.deadlines`, the one the referral inbox and GET /followups/due apply live:

* a referral is overdue on day D when it was requested on a city calendar day more than
  `answer_days` before D and had no ReferralAccepted, ReferralDeclined or ReferralWithdrawn
  by the end of D; it counts in the case's district on D (the last CaseTransferred by then,
  else the district at intake, else the district the referral recorded);
* a follow-up is overdue on day D when it was scheduled by the end of D, is due more than
  `window_days` before D and had no FollowUpCompleted or FollowUpMissed by the end of D; it
  counts in the district it was scheduled in (as GET /followups/due lists it).

`known_by` keeps only events recorded by then (the figures as the city could have known
them); `district_map` rolls codes up into another structure (e.g. "lundby" -> "hisingen");
counts from 1 to `min_cell - 1` are suppressed (None), as the report's small cells are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
from psycopg import sql

from likvard import deadlines
from likvard.db import check_schema_name
from likvard.domain import CITY_TZ

CITY = "city"
REFERRAL_ANSWERS = ("ReferralAccepted", "ReferralDeclined", "ReferralWithdrawn")
FOLLOWUP_DONE = ("FollowUpCompleted", "FollowUpMissed")


@dataclass(frozen=True)
class OverdueCounts:
    """One district's overdue items on `day` (None: a small count, suppressed)."""

    day: date
    district: str  # a district code, or "city" (all districts)
    referrals_overdue: int | None
    followups_overdue: int | None


_KNOWN = "(%(known_by)s::timestamptz IS NULL OR {a}.recorded_at <= %(known_by)s)"

_REFERRALS_SQL = """
SELECT COALESCE(
    (SELECT m.payload->>'to_district' FROM {t}.timeline m
     WHERE m.case_id = r.case_id AND m.event_type = 'CaseTransferred'
       AND m.occurred_at < %(day_end)s AND {known_m}
     ORDER BY m.occurred_at DESC, m.stream_version DESC, m.event_id DESC LIMIT 1),
    f.district_at_intake, r.payload->>'person_district') AS district,
    count(*)
FROM {t}.timeline r
LEFT JOIN {t}.case_facts f ON f.case_id = r.case_id
WHERE r.event_type = 'ReferralRequested'
  AND r.occurred_at < %(requested_before)s AND {known_r}
  AND NOT EXISTS (
    SELECT 1 FROM {t}.timeline a
    WHERE a.case_id = r.case_id AND a.event_type = ANY(%(answers)s::text[])
      AND a.payload->>'referral_id' = r.payload->>'referral_id'
      AND a.occurred_at < %(day_end)s AND {known_a})
GROUP BY 1
"""

_FOLLOWUPS_SQL = """
SELECT s.payload->>'district', count(DISTINCT (s.case_id, s.payload->>'followup_id'))
FROM {t}.timeline s
WHERE s.event_type = 'FollowUpScheduled'
  AND s.occurred_at < %(day_end)s AND {known_s}
  AND s.payload->>'due_on' < %(due_before)s
  AND NOT EXISTS (
    SELECT 1 FROM {t}.timeline a
    WHERE a.case_id = s.case_id AND a.event_type = ANY(%(done)s::text[])
      AND a.payload->>'followup_id' = s.payload->>'followup_id'
      AND a.occurred_at < %(day_end)s AND {known_a})
GROUP BY 1
"""


def _day_end(day: date) -> datetime:
    """The first moment after the city's day `day`."""
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=CITY_TZ).astimezone(UTC)


def _query(text: str, schema: str, **aliases: str) -> sql.Composed:
    known = {f"known_{k}": sql.SQL(_KNOWN.format(a=a)) for k, a in aliases.items()}
    return sql.SQL(text).format(t=sql.Identifier(check_schema_name(schema)), **known)


def _suppress(n: int, min_cell: int) -> int | None:
    return None if 0 < n < min_cell else n


def overdue_counts(
    conn: psycopg.Connection[Any],
    schema: str,
    day: date,
    *,
    answer_days: int,
    window_days: int,
    known_by: datetime | None = None,
    district_map: Mapping[str, str] | None = None,
    min_cell: int = 1,
) -> list[OverdueCounts]:
    """Per district (sorted) and for the city, the referrals and follow-ups overdue on `day`.
    A district with nothing overdue has no row; the city row is always there."""
    params: dict[str, Any] = {
        "day_end": _day_end(day),
        "requested_before": deadlines.overdue_before(day, answer_days),
        "due_before": deadlines.last_day_on_time(day, window_days).isoformat(),
        "known_by": known_by,
        "answers": list(REFERRAL_ANSWERS),
        "done": list(FOLLOWUP_DONE),
    }
    mapping = district_map or {}
    tallies: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for index, query in (
        (0, _query(_REFERRALS_SQL, schema, m="m", r="r", a="a")),
        (1, _query(_FOLLOWUPS_SQL, schema, s="s", a="a")),
    ):
        for district, n in conn.execute(query, params).fetchall():
            code = str(district or "unknown")
            tallies[mapping.get(code, code)][index] += int(n)
    city = [sum(t[0] for t in tallies.values()), sum(t[1] for t in tallies.values())]
    return [
        OverdueCounts(day, code, _suppress(t[0], min_cell), _suppress(t[1], min_cell))
        for code, t in [*sorted(tallies.items()), (CITY, city)]
    ]
