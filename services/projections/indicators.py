"""The city's indicators, each defined once as code, computed from `case_facts`.

An `Indicator` is data: its id (the Kolada id where one exists), titles, kind (a share, or
the mean or median of a number of days), its numerator and denominator, the period rule,
the breakdowns it may be cut by and its small-count rule. `compute` turns one into figures
per district and city-wide in one set-based statement, as the follow-up report is computed
(`reports.py`): Python only composes the statement and shapes the rows.

How numerator and denominator are written: as SQL fragments over one row `c` per case,
the case's facts (every column of `case_facts`) plus

* ``district``: the district at intake, mapped to the chosen structure (`reports.py`);
* ``first_closed``: the time of the case's first `CaseClosed` (from `timeline`);
* ``reactualised_within_year``: whether, within 365 days after that first closing, the case
  was reopened (`CaseReopened`) or the same person had an intake of another case.

SQL rather than Python predicates, because the figures must be computed where the rows are
(hundreds of thousands of cases) and the fragment is the definition an auditor can read
(`GET /indicators` shows it). The fragments are constants of this module, never caller text.

* ``denominator``: how many units of the denominator the case contributes; a boolean
  predicate counts 1 or 0 (a case), an integer counts items (the user-assessment answers
  of a case, of which there can be several). Cases contributing 0 are not in the figure.
* ``numerator`` (shares only): how many of those units are in the numerator (never more
  than the denominator's). share = sum(numerator) / sum(denominator).
* ``days`` (mean and median only): the case's number of days; its denominator predicate
  says which cases have one.

Days are calendar days in the city's time zone (Europe/Stockholm), as Kolada counts "antal
dagar": intake on Monday and visit on Thursday is 3, whatever the hours. A case whose end
is before its start (data out of order) is left out, not counted as a negative wait. Cases
still waiting are not in these figures (Kolada's indicators count completed waits); the
waiting times with censoring are the survival analysis's.

Period rule: a case is in the figure when the local date of its `period` timestamp is
within [start, end] (both included): intake for most, the decision for investigation
times, the first visit for time to first visit, the first closing for re-actualisation.

Breakdowns: every figure is per district (at intake, in the structure asked for) with a
city-wide figure (district ``"city"``, each person counted once); one more breakdown can be
asked for (gender, age band or need level), which adds a figure per group in each district
and city-wide. A missing value is its own group (``NOT_STATED``, ``UNKNOWN``,
``NOT_ASSESSED``), so groups always add up to the total.

Small counts: a figure whose denominator holds fewer than `min_persons` distinct persons
has n, numerator and value None and ``suppressed=True``. The case ids behind a figure are
returned only when asked (`with_cases`, for auditors: the API and CLI decide who and log
the view), for suppressed figures too: an auditor checks the suppression as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql

from likvard.db import check_schema_name
from likvard.districts import DistrictRegistry
from services.projections import readmodels, reports

__all__ = [
    "BREAKDOWNS",
    "INDICATORS",
    "Breakdown",
    "Figure",
    "Indicator",
    "Kind",
    "NotAvailable",
    "Period",
    "UnknownIndicator",
    "compute",
    "get",
]

CITY = reports.CITY
TIME_ZONE = reports.TIME_ZONE


class Kind(StrEnum):
    SHARE = "share"  # sum(numerator) / sum(denominator), in [0, 1]
    MEAN_DAYS = "mean_days"
    MEDIAN_DAYS = "median_days"


@dataclass(frozen=True)
class Period:
    """Which time of a case puts it in a period: its local date within [from, to]."""

    name: str
    at: str  # a timestamptz expression over `c`
    description: str


INTAKE = Period("intake", "c.intake_at", "The case's intake (IntakeRegistered) date")
FIRST_VISIT = Period("first_visit", "c.first_visit_at", "The date of the first personal visit")
DECISION = Period(
    "decision", "c.investigation_decided_at", "The date of the investigation's first decision"
)
FIRST_CLOSING = Period("first_closing", "c.first_closed", "The date the case was first closed")
FIRST_REFERRAL = Period("first_referral", "c.first_referral_at", "The case's first referral date")
SIP_AGREED = Period("sip_agreed", "c.sip_agreed_at", "The date the first SIP was agreed")


@dataclass(frozen=True)
class Breakdown:
    """A cut of the figures: a text expression over `c` (never NULL: a missing value is its
    own group, so the groups add up to the total)."""

    name: str
    expression: str
    description: str
    columns: frozenset[str] = frozenset()


BREAKDOWNS: dict[str, Breakdown] = {
    b.name: b
    for b in (
        Breakdown(
            "gender",
            "COALESCE(c.gender, 'NOT_STATED')",
            "Gender recorded at intake (WOMAN, MAN, OTHER, NOT_STATED)",
            frozenset({"gender"}),
        ),
        Breakdown(
            "age_band",
            "COALESCE(c.age_band, 'UNKNOWN')",
            "Age band at intake (a code; the birth year is sealed)",
        ),
        Breakdown(
            "need_level",
            "COALESCE(c.need_level, 'NOT_ASSESSED')",
            "The latest assessed need level",
        ),
    )
}
ALL_BREAKDOWNS = tuple(BREAKDOWNS)


@dataclass(frozen=True)
class Indicator:
    """One indicator, defined once (see the module's docstring for the fragments' rules)."""

    id: str
    title_sv: str
    title_en: str
    kind: Kind
    period: Period
    denominator: str
    numerator: str | None = None  # shares
    days: str | None = None  # mean and median of days
    unit: str = "cases"  # what the denominator counts
    description: str = ""
    kolada: bool = False  # the id is Kolada's (else a Likvärd id: likvard-...)
    breakdowns: tuple[str, ...] = ALL_BREAKDOWNS
    min_persons: int = 5
    columns: frozenset[str] = field(default_factory=frozenset)  # case_facts columns it needs

    def __post_init__(self) -> None:
        if (self.kind is Kind.SHARE) != (self.numerator is not None):
            raise ValueError(f"{self.id}: a share has a numerator, and only a share")
        if (self.kind is not Kind.SHARE) != (self.days is not None):
            raise ValueError(f"{self.id}: a mean or median has days, and only they")
        if unknown := set(self.breakdowns) - set(BREAKDOWNS):
            raise ValueError(f"{self.id}: unknown breakdowns {sorted(unknown)}")
        if self.min_persons < 1:
            raise ValueError(f"{self.id}: min_persons must be at least 1")

    def missing(self, breakdown: str | None = None) -> list[str]:
        """The read-model columns it needs (with `breakdown`) that `case_facts` lacks."""
        needed = self.columns | (BREAKDOWNS[breakdown].columns if breakdown else frozenset())
        return sorted(needed - set(readmodels.FACT_NAMES))

    def definition(self) -> dict[str, Any]:
        """The definition as plain values (what `GET /indicators` lists)."""
        return {
            "id": self.id,
            "kolada": self.kolada,
            "title_sv": self.title_sv,
            "title_en": self.title_en,
            "kind": str(self.kind),
            "unit": self.unit,
            "description": self.description,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "days": self.days,
            "period": self.period.name,
            "period_rule": self.period.description,
            "breakdowns": ["district", *self.breakdowns],
            "min_persons": self.min_persons,
            "available": not self.missing(),
        }


def _days(start: str, end: str) -> tuple[str, str]:
    """The denominator (both times known, in order) and days (calendar days, local)."""
    local = f"AT TIME ZONE '{TIME_ZONE}'"
    return (
        f"c.{start} IS NOT NULL AND c.{end} IS NOT NULL AND c.{end} >= c.{start}",
        f"(c.{end} {local})::date - (c.{start} {local})::date",
    )


_VISIT_DEN, _VISIT_DAYS = _days("intake_at", "first_visit_at")
_INVESTIGATION_DEN, _INVESTIGATION_DAYS = _days(
    "investigation_opened_at", "investigation_decided_at"
)

# The six items of the national user survey, as UserAssessmentRecorded names them. No
# Kolada id is known here for each item, so they have Likvärd ids (likvard-ua-<item>).
UA_ITEMS: dict[str, tuple[str, str]] = {
    "contact_easy": ("Lätt att komma i kontakt", "Got in contact easily"),
    "clear_information": ("Tydlig information", "Clear information"),
    "felt_understood": ("Kände sig förstådd", "Felt understood"),
    "influence": ("Inflytande över hjälpen", "Influence over the help"),
    "whole_situation": ("Hjälpen tog hänsyn till hela situationen", "Help saw the whole situation"),
    "situation_improved": ("Situationen har förbättrats", "The situation improved"),
}


def _user_assessment(item: str) -> Indicator:
    sv, en = UA_ITEMS[item]
    return Indicator(
        id=f"likvard-ua-{item.replace('_', '-')}",
        title_sv=f"Brukarbedömning: {sv.lower()}, andel ja",
        title_en=f"User assessment: {en.lower()}, share yes",
        kind=Kind.SHARE,
        period=INTAKE,
        denominator=f"c.ua_{item}_answered",
        numerator=f"c.ua_{item}_yes",
        unit="answers",
        description=f"Of the answers to '{en}' in UserAssessmentRecorded (YES, PARTLY or NO;"
        " NO_ANSWER is not an answer), the share YES. Every assessment of a case counts; the"
        " case is in the period of its intake (the read model keeps the answers' counts, not"
        " their dates).",
        columns=frozenset({f"ua_{item}_answered", f"ua_{item}_yes"}),
    )


INDICATORS: dict[str, Indicator] = {
    i.id: i
    for i in (
        Indicator(
            id="U35537",
            kolada=True,
            title_sv="Tid till första personliga besök, median antal dagar",
            title_en="Time to first personal visit, median days",
            kind=Kind.MEDIAN_DAYS,
            period=FIRST_VISIT,
            denominator=_VISIT_DEN,
            days=_VISIT_DAYS,
            description="Calendar days from intake (the first contact) to the first personal"
            " visit (FirstVisitHeld), for cases whose first visit was in the period.",
            columns=frozenset({"first_visit_at"}),
        ),
        Indicator(
            id="U35400",
            kolada=True,
            title_sv="Utredningstid, medelvärde antal dagar",
            title_en="Investigation time, mean days",
            kind=Kind.MEAN_DAYS,
            period=DECISION,
            denominator=_INVESTIGATION_DEN,
            days=_INVESTIGATION_DAYS,
            description="Calendar days from InvestigationOpened to the first"
            " InvestigationDecided, for investigations decided in the period.",
            columns=frozenset({"investigation_opened_at", "investigation_decided_at"}),
        ),
        Indicator(
            id="U35401",
            kolada=True,
            title_sv="Utredningstid, median antal dagar",
            title_en="Investigation time, median days",
            kind=Kind.MEDIAN_DAYS,
            period=DECISION,
            denominator=_INVESTIGATION_DEN,
            days=_INVESTIGATION_DAYS,
            description="As U35400, the median.",
            columns=frozenset({"investigation_opened_at", "investigation_decided_at"}),
        ),
        Indicator(
            id="U35409",
            kolada=True,
            title_sv="Andel som inte aktualiserats på nytt inom ett år efter avslut",
            title_en="Share not re-actualised within a year of the case ending",
            kind=Kind.SHARE,
            period=FIRST_CLOSING,
            # Judged only once the year has passed (as of the computation's as_of).
            denominator="c.first_closed IS NOT NULL"
            " AND c.first_closed + interval '365 days' <= %(as_of)s",
            numerator="NOT c.reactualised_within_year",
            description="Of the cases first closed (CaseClosed) in the period, at least 365"
            " days before the as-of time, the share with neither a CaseReopened of the case"
            " nor an intake of another case of the same person within 365 days after that"
            " closing (in any district). Cases closed less than a year ago are left out.",
        ),
        *(_user_assessment(item) for item in UA_ITEMS),
        Indicator(
            id="likvard-referrals-accepted",
            title_sv="Andel remisser som accepterats, av besvarade",
            title_en="Share of answered referrals that were accepted",
            kind=Kind.SHARE,
            period=FIRST_REFERRAL,
            denominator="c.referrals_accepted + c.referrals_declined",
            numerator="c.referrals_accepted",
            unit="referral answers",
            description="Of the referrals of cases first referred in the period that a unit"
            " answered (ReferralAccepted or ReferralDeclined), the share accepted; referrals"
            " still unanswered are not in it.",
        ),
        Indicator(
            id="likvard-followups-completed",
            title_sv="Andel uppföljningar som genomförts, av avgjorda",
            title_en="Share of settled follow-ups that were completed",
            kind=Kind.SHARE,
            period=INTAKE,
            denominator="c.followups_completed + c.followups_missed",
            numerator="c.followups_completed",
            unit="follow-ups",
            description="Of the follow-ups of cases with intake in the period that were settled"
            " (FollowUpCompleted or FollowUpMissed), the share completed; those still"
            " scheduled are not in it.",
        ),
        Indicator(
            id="likvard-sip-followed-up",
            title_sv="Andel SIP som följts upp",
            title_en="Share of coordinated plans (SIP) followed up",
            kind=Kind.SHARE,
            period=SIP_AGREED,
            denominator="c.sip_agreed_at IS NOT NULL",
            numerator="c.sip_followed_up_at IS NOT NULL",
            description="Of the cases whose first SIP (CoordinatedPlanAgreed) was agreed in the"
            " period, the share with a CoordinatedPlanFollowedUp so far.",
            columns=frozenset({"sip_agreed_at", "sip_followed_up_at"}),
        ),
    )
}


class UnknownIndicator(KeyError):
    """No indicator has this id."""


class NotAvailable(ValueError):
    """The read models of this version do not hold what the indicator needs."""


def get(indicator_id: str) -> Indicator:
    try:
        return INDICATORS[indicator_id]
    except KeyError:
        raise UnknownIndicator(indicator_id) from None


@dataclass(frozen=True)
class Figure:
    """One figure: an indicator in one district (or "city") and breakdown group (None: all).
    Suppressed: n, numerator and value are None."""

    indicator: str
    district: str
    group: str | None
    suppressed: bool
    persons: int | None  # distinct persons in the denominator
    n: int | None  # the denominator, in the indicator's unit
    numerator: int | None  # shares only
    value: float | None  # a share in [0, 1], or days
    case_ids: list[str] | None = None  # the denominator's cases, when asked for
    numerator_case_ids: list[str] | None = None  # shares: the numerator's, when asked for


_QUERY = """
WITH facts AS ({facts}),
closing AS (
    SELECT case_id, min(occurred_at) AS first_closed
    FROM {t}.timeline WHERE event_type = 'CaseClosed' GROUP BY case_id
),
c AS (
    SELECT f.*, cl.first_closed,
           CASE WHEN cl.first_closed IS NOT NULL THEN
               EXISTS (SELECT 1 FROM {t}.timeline r
                        WHERE r.case_id = f.case_id AND r.event_type = 'CaseReopened'
                          AND r.occurred_at >= cl.first_closed
                          AND r.occurred_at < cl.first_closed + interval '365 days')
               OR EXISTS (SELECT 1 FROM {t}.case_facts o
                           WHERE o.person = f.person AND o.case_id <> f.case_id
                             AND o.intake_at >= cl.first_closed
                             AND o.intake_at < cl.first_closed + interval '365 days')
           END AS reactualised_within_year
    FROM facts f LEFT JOIN closing cl ON cl.case_id = f.case_id
),
rows AS (
    SELECT c.case_id, c.person, c.district, {group} AS grp,
           COALESCE(({den})::int, 0) AS den,
           COALESCE(({num})::int, 0) AS num,
           ({days})::float8 AS days
    FROM c
    WHERE ({at} AT TIME ZONE %(tz)s)::date BETWEEN %(start)s AND %(end)s
)
SELECT GROUPING(district) = 1, GROUPING(grp) = 1, district, grp,
       count(DISTINCT person)::int, sum(den)::int, sum(num)::int, {value}, {cases}
FROM rows WHERE den > 0
GROUP BY GROUPING SETS ({sets})
"""

_VALUE = {
    Kind.SHARE: "sum(num)::float8 / sum(den)",
    Kind.MEAN_DAYS: "avg(days)",
    Kind.MEDIAN_DAYS: "percentile_cont(0.5) WITHIN GROUP (ORDER BY days)",
}
_CASES = (
    "array_agg(case_id ORDER BY case_id),"
    " array_agg(case_id ORDER BY case_id) FILTER (WHERE num > 0)"
)
_NO_CASES = "NULL::text[], NULL::text[]"


def _statement(
    schema: str, indicator: Indicator, facts: sql.Composed, by: str | None, with_cases: bool
) -> sql.Composed:
    group = BREAKDOWNS[by].expression if by else "NULL::text"
    sets = "(district, grp), (district), (grp), ()" if by else "(district, grp), (grp)"
    return sql.SQL(_QUERY).format(
        facts=facts,
        t=sql.Identifier(check_schema_name(schema)),
        group=sql.SQL(group),
        den=sql.SQL(indicator.denominator),
        num=sql.SQL(indicator.numerator or "0"),
        days=sql.SQL(indicator.days or "NULL"),
        at=sql.SQL(indicator.period.at),
        value=sql.SQL(_VALUE[indicator.kind]),
        cases=sql.SQL(_CASES if with_cases else _NO_CASES),
        sets=sql.SQL(sets),
    )


def compute(
    conn: psycopg.Connection[Any],
    schema: str,
    indicator: Indicator,
    *,
    start: date,
    end: date,
    structure: reports.Structure = "current",
    district: str | None = None,
    breakdown: str | None = None,
    with_cases: bool = False,
    registry: DistrictRegistry | None = None,
    as_of: datetime | None = None,
) -> list[Figure]:
    """The indicator's figures for the period [start, end] (local dates, both included):
    per district in `structure` then city-wide; with `breakdown`, each followed by its
    groups. With `district`, only that district's figures (or the city's, ``"city"``).
    `as_of` (default now) is when time-bound rules (U35409's year) are judged. The case ids
    are filled in only `with_cases`."""
    if end < start:
        raise ValueError("end is before start")
    if breakdown is not None and breakdown not in indicator.breakdowns:
        raise ValueError(
            f"{indicator.id} has no breakdown {breakdown!r};"
            f" it has: {', '.join(indicator.breakdowns)}"
        )
    if missing := indicator.missing(breakdown):
        raise NotAvailable(
            f"{indicator.id} needs the read-model columns {', '.join(missing)},"
            " which this version does not have"
        )
    pairs = reports._district_map(registry or DistrictRegistry.load(), structure)
    facts, params = reports._mapped_facts(schema, pairs)
    params |= {
        "tz": TIME_ZONE,
        "start": start,
        "end": end,
        "as_of": as_of if as_of is not None else datetime.now().astimezone(),
    }
    figures: list[Figure] = []
    rows = conn.execute(
        _statement(schema, indicator, facts, breakdown, with_cases), params
    ).fetchall()
    for all_districts, all_groups, code, grp, persons, n, num, value, cases, num_cases in rows:
        name = CITY if all_districts else str(code)
        if district is not None and name != district:
            continue
        shown: tuple[list[str] | None, list[str] | None] = (None, None)
        if with_cases:
            share = indicator.kind is Kind.SHARE
            shown = (list(cases or []), list(num_cases or []) if share else None)
        group = None if all_groups or breakdown is None else str(grp)
        if persons < indicator.min_persons:
            figures.append(Figure(indicator.id, name, group, True, None, None, None, None, *shown))
            continue
        figures.append(
            Figure(
                indicator.id,
                name,
                group,
                False,
                persons,
                n,
                num if indicator.kind is Kind.SHARE else None,
                float(value),
                *shown,
            )
        )
    figures.sort(key=lambda f: (f.district == CITY, f.district, f.group is not None, f.group or ""))
    return figures
