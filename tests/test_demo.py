"""Demo data: the pure planner (bias parsing, determinism, time window, rates), the
direct path into the read models and the equal-access audit (a planted disparity is
found, none is invented), and the executor over the three real services."""

from __future__ import annotations

import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard.cli import demo
from likvard.districts import DistrictRegistry
from likvard.domain import age_band, local_date
from likvard.pseudonym import normalise
from services.followup.scheduling import followup_id
from services.projections import readmodels
from services.projections.audit import BASE_RATES, PersonOutcome, audit, audit_report
from services.projections.reports import audit_rows, wait_rows
from services.projections.stats import WaitRow, wait_report
from tests.support import CareStack, wait_for

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
NORDOST_HALF = "nordost:specialist_access:0.5"
HISINGEN_SLOW = "hisingen:first_visit:2"
CARE_CHAIN_EVENTS = {
    "InvestigationOpened",
    "InvestigationDecided",
    "FirstVisitHeld",
    "CoordinatedPlanAgreed",
    "CoordinatedPlanFollowedUp",
    "UserAssessmentRecorded",
}


# --- bias parsing -------------------------------------------------------------------------


def test_parse_bias() -> None:
    assert demo.parse_bias(NORDOST_HALF, on=NOW.date()) == demo.Bias(
        "nordost", "specialist_access", 0.5
    )
    assert demo.parse_bias(" hisingen : timely_start : 1.5 ").factor == 1.5
    assert demo.parse_bias(HISINGEN_SLOW) == demo.Bias("hisingen", "first_visit", 2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nordost:specialist_access", "must be DISTRICT:metric:factor"),
        ("nordost:specialist_access:0.5:1", "must be DISTRICT:metric:factor"),
        ("nordost:waiting_time:0.5", "unknown metric 'waiting_time'.*first_visit"),
        ("narnia:specialist_access:0.5", "unknown district 'narnia'.*nordost, centrum"),
        ("lundby:specialist_access:0.5", "'lundby' is not in operation on 2026-11-01"),
        ("nordost:specialist_access:0", "must be a positive number"),
        ("nordost:specialist_access:-0.5", "must be a positive number"),
        ("nordost:specialist_access:half", "must be a positive number"),
        ("nordost:specialist_access:nan", "must be a positive number"),
        ("nordost:specialist_access:inf", "must be a positive number"),
    ],
)
def test_parse_bias_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        demo.parse_bias(text, on=NOW.date())


def test_a_district_and_metric_are_biased_once() -> None:
    with pytest.raises(ValueError, match="more than once"):
        demo.parse_biases([NORDOST_HALF, "nordost:specialist_access:0.7"])


# --- the plan -------------------------------------------------------------------------------


def test_same_seed_same_plans_other_seed_other_plans() -> None:
    first = demo.plan(11, 200, 3, [], NOW)
    assert demo.plan(11, 200, 3, [], NOW) == first
    assert demo.plan(12, 200, 3, [], NOW) != first
    assert demo.plan(11, 50, 3, [], NOW) == first[:50]  # a person depends on seed and index


def test_steps_lie_in_the_window_in_order_and_start_with_intake() -> None:
    plans = demo.plan(3, 500, 3, [], NOW)
    start = NOW - timedelta(days=3 * 366)
    for p in plans:
        times = [s.at for s in p.steps]
        assert p.steps[0].action == "intake"
        assert times == sorted(times)
        assert all(start <= t < NOW for t in times)
    actions = Counter(s.action for p in plans for s in p.steps)
    assert set(actions) == set(demo.SERVICE_OF), "every kind of step occurs"


def test_current_districts_only_within_the_last_years() -> None:
    codes = {p.district for p in demo.plan(3, 300, 3, [], NOW)}
    assert codes == {"nordost", "centrum", "sydvast", "hisingen"}


def test_older_intakes_use_the_district_codes_of_their_day() -> None:
    plans = demo.plan(3, 300, 8, [], NOW)  # back to 2018: the district committees
    registry = DistrictRegistry.load()
    for p in plans:
        assert registry.valid_on(p.district, p.steps[0].at.date())
    assert any(not registry.valid_on(p.district, NOW.date()) for p in plans)


def test_identity_numbers_are_valid_distinct_and_not_in_the_repr() -> None:
    plans = demo.plan(5, 1000, 3, [], NOW)
    numbers = [p.personal_identity_number for p in plans]
    assert len(set(numbers)) == len(numbers)
    for n in numbers:
        assert len(normalise(n)) == 12  # raises on a wrong check digit
    assert all(p.personal_identity_number not in repr(p) for p in plans[:20])


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def test_rates_follow_the_audit_base_rates_by_need_level_times_the_bias() -> None:
    # Persons whose intake is at least 200 days old: their intervention (if any) is due.
    plans = [
        p
        for p in demo.plan(21, 3000, 3, [demo.parse_bias(NORDOST_HALF)], NOW)
        if p.steps[0].at < NOW - timedelta(days=200)
    ]
    for need in ("LOW", "MODERATE", "HIGH"):
        for nordost, factor in ((False, 1.0), (True, 0.5)):
            group = [
                p for p in plans if p.need_level == need and (p.district == "nordost") == nordost
            ]
            started = [any(s.action == "start" for s in p.steps) for p in group]
            expected = BASE_RATES["specialist_access"][need] * factor
            assert abs(_share(started) - expected) < 0.06, (need, nordost, len(group))
        starters = [
            p for p in plans if p.need_level == need and any(s.action == "start" for s in p.steps)
        ]
        timely = [
            next(s.at for s in p.steps if s.action == "start") - p.steps[0].at <= timedelta(days=30)
            for p in starters
        ]
        assert abs(_share(timely) - BASE_RATES["timely_start"][need]) < 0.07, need


def test_genders_have_realistic_shares() -> None:
    plans = demo.plan(21, 3000, 3, [], NOW)
    genders = Counter(str(p.steps[0].body["gender"]) for p in plans)
    assert abs(genders["MAN"] / 3000 - 0.70) < 0.03
    assert abs(genders["WOMAN"] / 3000 - 0.28) < 0.03
    assert 0 < genders["OTHER"] < 0.03 * 3000 and 0 < genders["NOT_STATED"] < 0.03 * 3000


INTAKE_CARE_CHAIN = {"investigation", "decision", "first_visit", "sip", "sip_followup"}


def test_the_care_chain_keeps_the_services_rules() -> None:
    """Intake's care-chain steps fall while the case is open (before its first closing), a
    decision after its investigation (a refusal deciding no intervention), a SIP on a
    consent covering healthcare recorded before it and not withdrawn, its follow-up after
    it, and a user assessment at a completed follow-up."""
    plans = demo.plan(3, 1000, 3, [], NOW)
    for p in plans:
        acts = [s.action for s in p.steps]
        at = {a: s.at for s, a in zip(p.steps, acts, strict=True) if a not in ("close",)}
        closes = [s.at for s in p.steps if s.action == "close"]
        for s in p.steps:
            if s.action in INTAKE_CARE_CHAIN:
                assert not closes or s.at < closes[0], (p.key, s.action)
        assert acts.count("investigation") <= 1 and acts.count("first_visit") <= 1
        if "decision" in acts:
            assert at["investigation"] < at["decision"]
            decided = next(s.body for s in p.steps if s.action == "decision")
            assert (decided["decision"] == "REFUSED") == (decided["intervention_kinds"] == [])
        if "sip" in acts:
            sip = next(s for s in p.steps if s.action == "sip")
            consent = next(
                s for s in p.steps if s.action == "consent" and s.ref == sip.body["consent"]
            )
            assert consent.at < sip.at and "HEALTHCARE" in consent.body["recipients"]
            withdrawn = [
                s.at for s in p.steps if s.action == "withdraw_consent" and s.ref == consent.ref
            ]
            assert all(sip.at < w for w in withdrawn)
            assert sip.body["lead"] in sip.body["parties"]
            assert "SOCIAL_SERVICES" in sip.body["parties"] and len(sip.body["parties"]) >= 2
            assert sip.body["follow_up_on"] >= local_date(sip.at)
        if "sip_followup" in acts:
            assert at["sip"] < at["sip_followup"]
        completed = [s.at for s in p.steps if s.action == "followup_completed"]
        for s in p.steps:
            if s.action == "user_assessment":
                assert any(c < s.at < c + timedelta(days=1) for c in completed)
                assert set(s.body) == {
                    "contact_easy",
                    "clear_information",
                    "felt_understood",
                    "influence",
                    "whole_situation",
                    "situation_improved",
                }
    actions = Counter(s.action for p in plans for s in p.steps)
    assert actions["investigation"] > 0.95 * len(plans)
    assert actions["first_visit"] > 0.85 * len(plans)
    assert actions["sip"] > 10 and actions["sip_followup"] > 5
    assert actions["user_assessment"] > 0.5 * actions["followup_completed"]


def _visit_days(plans: list[demo.PersonPlan]) -> float:
    return statistics.median(
        (next(s.at for s in p.steps if s.action == "first_visit") - p.steps[0].at)
        / timedelta(days=1)
        for p in plans
        if any(s.action == "first_visit" for s in p.steps)
    )


def test_a_first_visit_bias_multiplies_the_district_s_days_to_the_first_visit() -> None:
    plans = demo.plan(21, 3000, 3, [demo.parse_bias(HISINGEN_SLOW)], NOW)
    moderate = [p for p in plans if p.need_level == "MODERATE"]
    hisingen = _visit_days([p for p in moderate if p.district == "hisingen"])
    others = _visit_days([p for p in moderate if p.district != "hisingen"])
    assert abs(others - demo.FIRST_VISIT_DAYS["MODERATE"]) < 1.0
    assert 1.6 < hisingen / others < 2.5


def test_a_first_visit_bias_changes_the_first_visits_only() -> None:
    """The care chain draws from a stream of its own, and a wait's bias only stretches
    the days: every other step of a seed is as it was."""
    plain = demo.plan(6, 300, 3, [], NOW)
    slow = demo.plan(6, 300, 3, [demo.parse_bias(HISINGEN_SLOW)], NOW)
    for a, b in zip(plain, slow, strict=True):
        keep = [s for s in a.steps if s.action != "first_visit"]
        assert keep == [s for s in b.steps if s.action != "first_visit"]


# --- the direct path --------------------------------------------------------------------------


def test_to_events_are_the_services_events_with_followups_scheduled_by_rule() -> None:
    plans = demo.plan(8, 200, 3, [], NOW)
    events = demo.to_events(plans)
    assert len({e.event_id for e in events}) == len(events)
    assert demo.to_events(plans) == events  # deterministic ids
    steps = Counter(s.action for p in plans for s in p.steps)
    types = Counter(e.event_type for e in events)
    assert types["IntakeRegistered"] == steps["intake"]
    assert set(types) >= CARE_CHAIN_EVENTS
    assert types["FirstVisitHeld"] == steps["first_visit"]
    assert types["UserAssessmentRecorded"] == steps["user_assessment"]
    assert types["CoordinatedPlanAgreed"] == steps["sip"]
    intakes = [s for p in plans for s in p.steps if s.action == "intake"]
    registered = [e for e in events if e.event_type == "IntakeRegistered"]
    for s, e in zip(intakes, registered, strict=True):  # the age band follows the birth year
        assert e.data["gender"] == s.body["gender"]
        assert e.data["age_band"] == age_band(s.body["birth_year"], local_date(s.at).year)
    assert any(e.data["age_band"] is None for e in registered)  # no birth year: no band
    assert types["InterventionEnded"] == steps["end"]
    assert types["ReferralRequested"] == steps["referral"]
    assert 2 * types["InterventionEnded"] <= types["FollowUpScheduled"]
    assert types["FollowUpScheduled"] <= 3 * types["InterventionEnded"]
    scheduled = {e.data["followup_id"] for e in events if e.event_type == "FollowUpScheduled"}
    for e in events:
        if e.event_type in ("FollowUpCompleted", "FollowUpMissed"):
            assert e.data["followup_id"] in scheduled
        if e.event_type == "FollowUpScheduled":
            assert e.data["followup_id"] == followup_id(e.data["intervention_id"], e.data["kind"])
    for p in plans[:20]:  # the person is a pseudonym, never the number
        assert all(p.personal_identity_number not in str(e.data) for e in events)


# --- the audit finds what was planted, and nothing else -----------------------------------

# Seed 1 was the first seed tried; it was kept, then checked against others. The same
# pipeline as below (plan 2000 persons -> to_events -> read models -> audit) over seeds
# 1-36 (today 2026-11-01):
# * without bias, no cell was flagged in 34 of 36 seeds; seeds 7 (nordost
#   followup_completion, adjusted ratio 0.73) and 33 (sydvast family_engagement, 0.79) had
#   one chance flag each: these metrics have the fewest eligible persons per district;
# * with nordost:specialist_access:0.5, nordost was flagged lower for specialist_access in
#   36 of 36 seeds (adjusted ratio 0.43-0.61); seeds 7, 8 and 33 also had one flag on
#   another metric, and in about half the seeds another district was flagged *higher* for
#   specialist_access (ratio 1.25-1.37), because the rest of the city it is compared with
#   includes Nordost's halved rate. That is the audit working as designed, so allowed here.
AUDIT_SEED = 1
AUDIT_PERSONS = 2000


def _audited(
    database_url: str, schema: str, biases: list[str]
) -> tuple[list[PersonOutcome], dict[str, list[WaitRow]]]:
    """The audit's rows and the waits, from the demo's events folded into the read models."""
    plans = demo.plan(AUDIT_SEED, AUDIT_PERSONS, 3, demo.parse_biases(biases, on=NOW.date()), NOW)
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, demo.to_events(plans))
        rows = audit_rows(conn, schema)
        waits = wait_rows(conn, schema)
    assert len(rows) > 0.99 * AUDIT_PERSONS  # all but the newest intakes have a need level
    assert {r.gender for r in rows} == {"MAN", "WOMAN", "OTHER", "NOT_STATED"}
    assert len({r.age_band for r in rows}) == 7  # six bands and UNKNOWN (no birth year)
    return rows, waits


def _first_visit_flags(waits: dict[str, list[WaitRow]]) -> dict[str, bool]:
    """District -> flagged for the wait to the first visit: True slower, False faster."""
    report = wait_report(waits, as_of=NOW)
    return {
        s.district: s.hazard_ratio is not None and s.hazard_ratio < 1
        for s in report.summaries
        if s.wait == "intake_to_first_visit" and s.flagged
    }


# The standardised ratio, the funnel and Holm on the same two runs (seed 1, as above):
# with nordost:specialist_access:0.5 Nordost's SR is about 0.6 (interval well below 1),
# its funnel point below the 99.8 % limit and p_holm < 1e-10; with no bias no cell is
# Holm-flagged. Hisingen's first visits twice as slow give it a hazard ratio well below 1;
# the other districts are then flagged *faster* than their rest of the city, which
# includes Hisingen (as for specialist access above): only Hisingen is flagged slower.


@pytest.mark.integration
def test_audit_flags_the_planted_disparity(database_url: str, schema: str) -> None:
    rows, waits = _audited(database_url, schema, [NORDOST_HALF, HISINGEN_SLOW])
    cells = audit(rows)
    flagged = [c for c in cells if c.flagged]
    nordost = next(c for c in cells if (c.district, c.metric) == ("nordost", "specialist_access"))
    assert nordost.flagged and nordost.adjusted_ratio is not None
    assert 0.4 < nordost.adjusted_ratio < 0.65
    assert all(c.metric == "specialist_access" for c in flagged), flagged
    lower = [c.district for c in flagged if c.adjusted_ratio is not None and c.adjusted_ratio < 1]
    assert lower == ["nordost"]

    # The standardised ratio, the funnel plot and the Holm-controlled flag all find it.
    report = audit_report(rows)
    assert report.flag_rule == "holm" and report.comparisons == 4 * 5
    cell = next(
        c for c in report.cells if (c.district, c.metric) == ("nordost", "specialist_access")
    )
    assert cell.sr is not None and cell.sr_high is not None and cell.sr_high < 1
    assert cell.funnel_rate is not None and cell.funnel_low_95 is not None
    assert cell.funnel_rate < cell.funnel_low_95
    assert cell.funnel_position in ("low_95", "low_99.8")
    point = next(p for p in report.funnels["specialist_access"].points if p.unit == "nordost")
    assert point.position == cell.funnel_position
    assert cell.holm_flagged and cell.flagged
    assert cell.p_holm is not None and cell.p_holm < report.alpha
    holm_lower = [c for c in report.cells if c.holm_flagged and c.sr is not None and c.sr < 1]
    assert [(c.district, c.metric) for c in holm_lower] == [("nordost", "specialist_access")]

    # The slower first visits: Hisingen waits longer, need level as strata, and only it.
    slower = [d for d, slow in _first_visit_flags(waits).items() if slow]
    assert slower == ["hisingen"]
    hisingen = next(
        s
        for s in wait_report(waits, as_of=NOW).summaries
        if (s.wait, s.district) == ("intake_to_first_visit", "hisingen")
    )
    assert hisingen.hazard_ratio is not None and hisingen.hazard_ratio < 0.7


@pytest.mark.integration
def test_audit_flags_nothing_without_a_planted_disparity(database_url: str, schema: str) -> None:
    rows, waits = _audited(database_url, schema, [])
    cells = audit(rows)
    assert [c for c in cells if c.flagged] == []
    assert len(cells) == 4 * 5 and not any(c.suppressed for c in cells)
    report = audit_report(rows)
    assert [c for c in report.cells if c.holm_flagged] == []
    nordost = next(
        c for c in report.cells if (c.district, c.metric) == ("nordost", "specialist_access")
    )
    assert nordost.sr_low is not None and nordost.sr_high is not None
    assert nordost.sr_low < 1 < nordost.sr_high and nordost.funnel_position == "inside"
    assert _first_visit_flags(waits) == {}


# --- the executor over the real services ---------------------------------------------------

FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 200, "fetch.wait.max.ms": 10}


def _stored(pool: ConnectionPool, schemas: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    with pool.connection() as conn:
        for schema in schemas:
            query = sql.SQL("SELECT event_type, count(*) FROM {}.events GROUP BY 1").format(
                sql.Identifier(schema)
            )
            for event_type, n in conn.execute(query).fetchall():
                counts[str(event_type)] += int(n)
    return counts


@pytest.mark.integration
def test_executor_sends_every_due_step_through_the_services(
    care_stack: CareStack, pool: ConnectionPool
) -> None:
    intake, referral, followup = care_stack.intake, care_stack.referral, care_stack.followup
    now = datetime.now(UTC)
    plans = demo.plan(4, 15, 3, [], now)
    # and the first later persons of the seed with a followed-up SIP, and with a user
    # assessment after a transfer (the follow-up service learns the new district late)
    later = demo.plan(4, 400, 3, [], now)[15:]
    plans.append(next(p for p in later if any(s.action == "sip_followup" for s in p.steps)))
    plans.append(
        next(
            p
            for p in later
            if any(
                a.action == "transfer" and b.action == "user_assessment" and a.at < b.at
                for a in p.steps
                for b in p.steps
            )
        )
    )
    urls = demo.DemoUrls(intake.base_url, referral.base_url, followup.base_url)
    seen: list[int] = []
    stats = demo.run(plans, urls, concurrency=8, progress=seen.append)

    assert (stats.failed, stats.skipped) == (0, 0), stats.summary()
    assert stats.done == stats.steps == sum(seen) == sum(len(p.steps) for p in plans)
    expected = Counter(e.event_type for e in demo.to_events(plans))
    schemas = [intake.schema, referral.schema, followup.schema]
    # Follow-ups nobody completed yet are scheduled by the consumer in its own time.
    wait_for(lambda: _stored(pool, schemas) == expected, 60, "the planned events in the stores")
    assert set(expected) >= CARE_CHAIN_EVENTS  # the care chain went through the services
    _care_chain_stored_as_planned(pool, intake.schema, plans)
    assert all(p.personal_identity_number not in stats.summary() for p in plans)
    _signed_in_as_the_staff_of_each_step(pool, schemas)


def _care_chain_stored_as_planned(
    pool: ConnectionPool, schema: str, plans: list[demo.PersonPlan]
) -> None:
    """The intake store has each person's gender and decisions as planned, and the age
    band the service derived from the birth year."""
    query = sql.SQL(
        "SELECT event_type, payload, occurred_at FROM {}.events ORDER BY stream_id, stream_version"
    ).format(sql.Identifier(schema))
    with pool.connection() as conn:
        stored = [(str(a), b, c) for a, b, c in conn.execute(query).fetchall()]
    registered = Counter(
        (str(p["gender"]), p["age_band"]) for t, p, _ in stored if t == "IntakeRegistered"
    )
    planned = Counter(
        (
            str(p.steps[0].body["gender"]),
            age_band(p.steps[0].body["birth_year"], local_date(p.steps[0].at).year),
        )
        for p in plans
    )
    assert registered == planned
    decisions = Counter(str(p["decision"]) for t, p, _ in stored if t == "InvestigationDecided")
    assert decisions == Counter(
        str(s.body["decision"]) for p in plans for s in p.steps if s.action == "decision"
    )


UNIT_ANSWERS = {"ReferralAccepted", "ReferralDeclined", "InterventionStarted", "InterventionEnded"}


def _signed_in_as_the_staff_of_each_step(pool: ConnectionPool, schemas: list[str]) -> None:
    """Every event's actor is the subject of the token the step was sent with: the unit's
    staff for its answers to a referral, else the case worker of the case's district at
    the time (the receiving district's after a transfer)."""
    registry = DistrictRegistry.load()
    intake, referral, followup = schemas
    with pool.connection() as conn:

        def rows(schema: str) -> list[tuple[str, str, dict[str, object], dict[str, object]]]:
            query = sql.SQL(
                "SELECT stream_id, event_type, payload, metadata FROM {}.events"
                " ORDER BY stream_id, stream_version"
            ).format(sql.Identifier(schema))
            return [(str(a), str(b), c, d) for a, b, c, d in conn.execute(query).fetchall()]

        district: dict[str, str] = {}  # case id -> its current district
        transfers = 0
        for case_id, event_type, payload, meta in rows(intake):
            if event_type == "IntakeRegistered":
                district[case_id] = str(meta["district"])
            assert meta["actor"] == f"dev-cw-{registry.successor_of(district[case_id])}"
            if event_type == "CaseTransferred":
                district[case_id] = str(payload["to_district"])
                transfers += 1
        units: dict[str, str] = {}  # referral id -> the unit it is addressed to
        answers = 0
        for stream_id, event_type, payload, meta in rows(referral):
            if event_type == "ReferralRequested":
                units[stream_id] = str(payload["unit_id"])
            if event_type in UNIT_ANSWERS:
                assert meta["actor"] == f"dev-us-{units[stream_id]}", event_type
                answers += 1
            else:
                assert str(meta["actor"]).startswith("dev-cw-"), event_type
        for _, event_type, _, meta in rows(followup):
            if event_type != "FollowUpScheduled":  # scheduled by the service itself
                assert str(meta["actor"]).startswith("dev-cw-"), event_type
    assert transfers and answers  # the plans exercised both
