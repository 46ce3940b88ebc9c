"""The follow-up report and the audit's per-person rows, computed from `case_facts`.

Both are set-based SQL over the read model (one statement each); Python only maps the
district codes and shapes the rows.

* A case belongs to the period (month or year) and district of its intake. Periods are
  calendar periods in the city's time zone (Europe/Stockholm), so an intake at 23:30 UTC on
  31 January counts in February.
* District structure: ``"as-recorded"`` groups by the code recorded at intake;
  ``"current"`` maps old codes to the newest structure with
  `DistrictRegistry.successor_of` (e.g. "lundby" rolls up into "hisingen"). The mapping is
  a VALUES list joined in SQL; unknown codes keep their own code.
* Unique persons: a district row counts the distinct persons with an intake there in the
  period; the city row (district ``"city"``) counts each person once across all districts
  (one way of counting), so it can be less than the sum of the district rows.
* Suppression: a row with fewer than ``min_cell`` persons has every number None and
  ``suppressed=True``; its figures are never computed into the output.
* Closed cases not reopened within a year: among cases whose first closing is at least a
  year before ``as_of`` (default: now), the share with no reopening within 365 days of that
  closing (closing and reopening times from `timeline`). Cases closed less than a year ago
  cannot be judged yet and are left out of the share.
* Outcome change between intake and follow-up: the intake records no baseline for the
  follow-up's measures (days of use, housing, health), so the change is the person's own
  answer at the follow-up interview, as the national open comparisons ask it: the share of
  completed follow-ups where the situation is BETTER than at intake, and where the person's
  own goals were reached (YES).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import date, datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from likvard.db import check_schema_name
from likvard.districts import DistrictRegistry
from services.projections.audit import AuditCell, PersonOutcome
from services.projections.stats import WaitRow

__all__ = [
    "CITY",
    "TIME_ZONE",
    "WAITS",
    "ReportRow",
    "audit_csv",
    "audit_rows",
    "followup_report",
    "to_csv",
    "wait_rows",
]

CITY = "city"
TIME_ZONE = "Europe/Stockholm"
TIMELY_DAYS = 30

Period = Literal["month", "year"]
Structure = Literal["current", "as-recorded"]


@dataclass(frozen=True)
class ReportRow:
    """One (period, district) cell of the follow-up report; all numbers None if suppressed."""

    period: str  # "2024-03" (month) or "2024" (year)
    district: str  # a district code, or "city"
    suppressed: bool
    persons: int | None
    new_intakes: int | None
    assessed: int | None
    referrals: int | None
    referrals_across_share: float | None
    days_to_first_intervention_median: float | None
    days_to_first_intervention_p90: float | None
    top_guideline_share: float | None
    family_members_engaged: int | None
    cases_with_children: int | None
    family_engaged_share_with_children: float | None
    followups_completed: int | None
    followups_missed: int | None
    goals_reached_share: float | None  # of completed follow-ups: own goals reached (YES)
    situation_improved_share: float | None  # of completed follow-ups: situation BETTER
    closed_not_reopened_share: float | None


NUMBERS = tuple(f.name for f in fields(ReportRow))[3:]


def _district_map(registry: DistrictRegistry, structure: Structure) -> list[tuple[str, str]]:
    if structure == "current":
        return sorted((d.code, registry.successor_of(d.code)) for d in registry)
    if structure == "as-recorded":
        return []
    raise ValueError(f"structure must be 'current' or 'as-recorded', not {structure!r}")


def _mapped_facts(schema: str, pairs: list[tuple[str, str]]) -> tuple[sql.Composed, dict[str, Any]]:
    """A subquery of case_facts (intake seen) with `district` mapped; its named parameters."""
    t = sql.Identifier(check_schema_name(schema))
    return (
        sql.SQL(
            "SELECT f.*, COALESCE(m.to_code, f.district_at_intake) AS district"
            " FROM {}.case_facts f LEFT JOIN"
            " unnest(%(codes)s::text[], %(to_codes)s::text[]) AS m(code, to_code)"
            " ON m.code = f.district_at_intake"
            " WHERE f.person IS NOT NULL AND f.intake_at IS NOT NULL"
        ).format(t),
        {"codes": [a for a, _ in pairs], "to_codes": [b for _, b in pairs]},
    )


_REPORT = """
WITH facts AS ({facts}),
closing AS (
    SELECT c.case_id, min(c.occurred_at) AS first_closed
    FROM {t}.timeline c WHERE c.event_type = 'CaseClosed' GROUP BY c.case_id
),
reopening AS (
    SELECT cl.case_id,
           bool_or(r.event_id IS NOT NULL) AS reopened_within_year
    FROM closing cl
    LEFT JOIN {t}.timeline r
      ON r.case_id = cl.case_id AND r.event_type = 'CaseReopened'
     AND r.occurred_at >= cl.first_closed AND r.occurred_at < cl.first_closed + interval '365 days'
    WHERE cl.first_closed + interval '365 days' <= %(as_of)s
    GROUP BY cl.case_id
),
cases AS (
    SELECT f.*,
           date_trunc(%(period)s, f.intake_at AT TIME ZONE %(tz)s)::date AS period_start,
           EXTRACT(EPOCH FROM f.first_intervention_at - f.intake_at) / 86400.0 AS days_to_first,
           ro.reopened_within_year
    FROM facts f LEFT JOIN reopening ro ON ro.case_id = f.case_id
    WHERE (f.intake_at AT TIME ZONE %(tz)s)::date BETWEEN %(start)s AND %(end)s
)
SELECT period_start,
       CASE WHEN GROUPING(district) = 1 THEN NULL ELSE district END AS district,
       count(DISTINCT person)::int AS persons,
       count(*)::int AS new_intakes,
       count(*) FILTER (WHERE assessments > 0)::int AS assessed,
       sum(referrals)::int AS referrals,
       (sum(referrals_across)::float8 / NULLIF(sum(referrals), 0)) AS referrals_across_share,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY days_to_first) AS days_median,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY days_to_first) AS days_p90,
       (sum(interventions_guideline_top)::float8 / NULLIF(sum(interventions), 0)) AS top_share,
       sum(family_members_engaged)::int AS family_members_engaged,
       count(*) FILTER (WHERE children_in_household = 'YES')::int AS cases_with_children,
       (count(*) FILTER (WHERE children_in_household = 'YES' AND family_members_engaged > 0)
        ::float8 / NULLIF(count(*) FILTER (WHERE children_in_household = 'YES'), 0))
           AS family_share,
       sum(followups_completed)::int AS followups_completed,
       sum(followups_missed)::int AS followups_missed,
       (sum(goals_reached_yes)::float8 / NULLIF(sum(followups_completed), 0))
           AS goals_reached_share,
       (sum(situation_improved_better)::float8 / NULLIF(sum(followups_completed), 0))
           AS situation_improved_share,
       (count(*) FILTER (WHERE reopened_within_year = false)::float8
        / NULLIF(count(reopened_within_year), 0)) AS closed_not_reopened_share
FROM cases
GROUP BY GROUPING SETS ((period_start, district), (period_start))
ORDER BY period_start, GROUPING(district), district
"""


def _label(period_start: date, period: Period) -> str:
    return f"{period_start:%Y}" if period == "year" else f"{period_start:%Y-%m}"


def followup_report(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    start: date,
    end: date,
    period: Period,
    structure: Structure = "current",
    district: str | None = None,
    min_cell: int = 5,
    registry: DistrictRegistry | None = None,
    as_of: datetime | None = None,
) -> list[ReportRow]:
    """The follow-up report for intakes from `start` to `end` (local dates, inclusive), per
    period and district, with a city-wide row per period after its districts. With
    `district`, only that district's rows (in the chosen structure) are returned."""
    if period not in ("month", "year"):
        raise ValueError(f"period must be 'month' or 'year', not {period!r}")
    if min_cell < 1:
        raise ValueError("min_cell must be at least 1")
    if end < start:
        raise ValueError("end is before start")
    pairs = _district_map(registry or DistrictRegistry.load(), structure)
    facts, params = _mapped_facts(schema, pairs)
    t = sql.Identifier(check_schema_name(schema))
    query = sql.SQL(_REPORT).format(facts=facts, t=t)
    params |= {
        "period": period,
        "tz": TIME_ZONE,
        "start": start,
        "end": end,
        "as_of": as_of if as_of is not None else datetime.now().astimezone(),
    }
    rows: list[ReportRow] = []
    for r in conn.execute(query, params).fetchall():
        period_start, code, persons = r[0], r[1], r[2]
        name = CITY if code is None else str(code)
        if district is not None and name != district:
            continue
        label = _label(period_start, period)
        if persons < min_cell:
            rows.append(ReportRow(label, name, True, *(None for _ in NUMBERS)))
            continue
        rows.append(ReportRow(label, name, False, *r[2:]))
    return rows


def to_csv(rows: list[ReportRow]) -> str:
    """The rows as CSV (header first); suppressed cells are empty, shares with 4 decimals."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [f.name for f in fields(ReportRow)]
    writer.writerow(names)
    for row in rows:
        cells: list[str] = []
        for name in names:
            value = getattr(row, name)
            if value is None:
                cells.append("")
            elif isinstance(value, bool):
                cells.append("true" if value else "false")
            elif isinstance(value, float):
                cells.append(f"{value:.4f}")
            else:
                cells.append(str(value))
        writer.writerow(cells)
    return out.getvalue()


def csv_cell(value: Any) -> Any:
    """A value as the reporting CSVs write it: empty for None, true/false, a list as its
    items separated by spaces (case ids), anything else as Python writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return value


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The reporting API's CSV: a header row even when there are no rows, then each row's
    cells (`csv_cell`) in `columns` order; the console's downloads are the same files."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return out.getvalue()


def audit_csv(cells: list[AuditCell]) -> str:
    """The audit's cells as `GET /reports/equal-access?format=csv` writes them."""
    return csv_text((asdict(c) for c in cells), [f.name for f in fields(AuditCell)])


def _fact_columns(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    """The columns case_facts has now (read models migrate columns in over releases)."""
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'case_facts'",
        (check_schema_name(schema),),
    ).fetchall()
    return {str(r[0]) for r in rows}


def audit_rows(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    structure: Structure = "current",
    registry: DistrictRegistry | None = None,
) -> list[PersonOutcome]:
    """One row per person for the equal-access audit: the person's most recent case (latest
    intake, then greatest case id), its district at intake in the chosen structure, its need
    level (persons whose most recent case has none are left out), age band and gender (the
    standardisation strata; "UNKNOWN" and "NOT_STATED" when not recorded), the five
    outcomes and the case's intake date in the city's time zone (`audit.select` picks a
    period by it)."""
    pairs = _district_map(registry or DistrictRegistry.load(), structure)
    facts, params = _mapped_facts(schema, pairs)
    gender = "gender" if "gender" in _fact_columns(conn, schema) else "NULL::text"
    query = sql.SQL(
        "SELECT DISTINCT ON (person) person, district, need_level,"
        " COALESCE(age_band, 'UNKNOWN'), COALESCE(" + gender + ", 'NOT_STATED'),"
        " interventions > 0,"
        " CASE WHEN first_intervention_at IS NULL THEN NULL"
        "      ELSE first_intervention_at - intake_at"
        " <= make_interval(days => %(timely_days)s) END,"
        " CASE WHEN interventions = 0 THEN NULL ELSE interventions_guideline_top > 0 END,"
        " CASE WHEN children_in_household = 'YES' THEN family_members_engaged > 0 END,"
        # follow-ups still pending (not yet due) say nothing about completion yet
        " CASE WHEN followups_completed > 0 OR followups_missed > 0"
        "      THEN followups_completed > 0 END,"
        " (intake_at AT TIME ZONE %(tz)s)::date"
        " FROM ({}) c ORDER BY person, intake_at DESC, case_id DESC"
    ).format(facts)
    out: list[PersonOutcome] = []
    for (
        person,
        district,
        need,
        age,
        sex,
        access,
        timely,
        guideline,
        family,
        followup,
        intake_day,
    ) in conn.execute(query, params | {"timely_days": TIMELY_DAYS, "tz": TIME_ZONE}).fetchall():
        if need is None:
            continue
        out.append(
            PersonOutcome(
                person=person,
                district=district,
                need_level=need,
                outcomes={
                    "specialist_access": access,
                    "timely_start": timely,
                    "guideline_adherence": guideline,
                    "family_engagement": family,
                    "followup_completion": followup,
                },
                age_band=age,
                gender=sex,
                intake_day=intake_day,
            )
        )
    return out


# The audit's waits: the start (a case_facts column, or the first timeline event of a type)
# and the event types that end it (the first at or after the start).
WAITS: dict[str, tuple[str, tuple[str, ...]]] = {
    "intake_to_first_visit": ("f.intake_at", ("FirstVisitHeld",)),
    "referral_to_answer": ("f.first_referral_at", ("ReferralAccepted", "ReferralDeclined")),
    "referral_to_start": ("f.first_referral_at", ("InterventionStarted",)),
    "intervention_end_to_followup": (
        "(SELECT min(x.occurred_at) FROM {t}.timeline x"
        " WHERE x.case_id = f.case_id AND x.event_type = 'InterventionEnded')",
        ("FollowUpCompleted",),
    ),
}

_WAIT = """
WITH facts AS ({facts})
SELECT DISTINCT ON (f.person) f.district, f.need_level, s.start_at, e.end_at,
       CASE WHEN f.status = 'closed' THEN f.closed_at END
FROM facts f
CROSS JOIN LATERAL (SELECT {start} AS start_at) s
LEFT JOIN LATERAL (
    SELECT min(x.occurred_at) AS end_at FROM {t}.timeline x
    WHERE x.case_id = f.case_id AND x.event_type = ANY(%(ends)s)
      AND x.occurred_at >= s.start_at
) e ON true
WHERE s.start_at IS NOT NULL AND f.need_level IS NOT NULL
ORDER BY f.person, s.start_at DESC, f.case_id DESC
"""


def wait_rows(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    structure: Structure = "current",
    registry: DistrictRegistry | None = None,
) -> dict[str, list[WaitRow]]:
    """Per wait in ``WAITS``, one row per person (their most recent case where the wait
    started): district at intake, need level, start, end (None: still waiting) and, for a
    closed case still waiting, the closing time (observation stops there: censored).
    Ends come from the timeline, so no read-model column is needed for them."""
    pairs = _district_map(registry or DistrictRegistry.load(), structure)
    facts, params = _mapped_facts(schema, pairs)
    t = sql.Identifier(check_schema_name(schema))
    out: dict[str, list[WaitRow]] = {}
    for name, (start, ends) in WAITS.items():
        query = sql.SQL(_WAIT).format(facts=facts, t=t, start=sql.SQL(start).format(t=t))
        out[name] = [
            WaitRow(start_at, end_at, district, need, censored_at=closed)
            for district, need, start_at, end_at, closed in conn.execute(
                query, params | {"ends": list(ends)}
            ).fetchall()
        ]
    return out
