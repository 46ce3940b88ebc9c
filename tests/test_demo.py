"""Demo data: the pure planner (bias parsing, determinism, time window, rates), the
direct path into the read models and the equal-access audit (a planted disparity is
found, none is invented), and the executor over the three real services."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard.cli import demo
from likvard.districts import DistrictRegistry
from likvard.pseudonym import normalise
from services.followup.scheduling import followup_id
from services.projections import readmodels
from services.projections.audit import BASE_RATES, AuditCell, audit
from services.projections.reports import audit_rows
from tests.support import CareStack, wait_for

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
NORDOST_HALF = "nordost:specialist_access:0.5"


# --- bias parsing -------------------------------------------------------------------------


def test_parse_bias() -> None:
    assert demo.parse_bias(NORDOST_HALF, on=NOW.date()) == demo.Bias(
        "nordost", "specialist_access", 0.5
    )
    assert demo.parse_bias(" hisingen : timely_start : 1.5 ").factor == 1.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nordost:specialist_access", "must be DISTRICT:metric:factor"),
        ("nordost:specialist_access:0.5:1", "must be DISTRICT:metric:factor"),
        ("nordost:waiting_time:0.5", "unknown metric 'waiting_time'"),
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


# --- the direct path --------------------------------------------------------------------------


def test_to_events_are_the_services_events_with_followups_scheduled_by_rule() -> None:
    plans = demo.plan(8, 200, 3, [], NOW)
    events = demo.to_events(plans)
    assert len({e.event_id for e in events}) == len(events)
    assert demo.to_events(plans) == events  # deterministic ids
    steps = Counter(s.action for p in plans for s in p.steps)
    types = Counter(e.event_type for e in events)
    assert types["IntakeRegistered"] == steps["intake"]
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


def _audited(database_url: str, schema: str, biases: list[str]) -> list[AuditCell]:
    plans = demo.plan(AUDIT_SEED, AUDIT_PERSONS, 3, demo.parse_biases(biases, on=NOW.date()), NOW)
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, demo.to_events(plans))
        rows = audit_rows(conn, schema)
    assert len(rows) > 0.99 * AUDIT_PERSONS  # all but the newest intakes have a need level
    return audit(rows)


@pytest.mark.integration
def test_audit_flags_the_planted_disparity(database_url: str, schema: str) -> None:
    cells = _audited(database_url, schema, [NORDOST_HALF])
    flagged = [c for c in cells if c.flagged]
    nordost = next(c for c in cells if (c.district, c.metric) == ("nordost", "specialist_access"))
    assert nordost.flagged and nordost.adjusted_ratio is not None
    assert 0.4 < nordost.adjusted_ratio < 0.65
    assert all(c.metric == "specialist_access" for c in flagged), flagged
    lower = [c.district for c in flagged if c.adjusted_ratio is not None and c.adjusted_ratio < 1]
    assert lower == ["nordost"]


@pytest.mark.integration
def test_audit_flags_nothing_without_a_planted_disparity(database_url: str, schema: str) -> None:
    cells = _audited(database_url, schema, [])
    assert [c for c in cells if c.flagged] == []
    assert len(cells) == 4 * 5 and not any(c.suppressed for c in cells)


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
    plans = demo.plan(4, 15, 3, [], datetime.now(UTC))
    urls = demo.DemoUrls(intake.base_url, referral.base_url, followup.base_url)
    seen: list[int] = []
    stats = demo.run(plans, urls, concurrency=8, progress=seen.append)

    assert (stats.failed, stats.skipped) == (0, 0), stats.summary()
    assert stats.done == stats.steps == sum(seen) == sum(len(p.steps) for p in plans)
    expected = Counter(e.event_type for e in demo.to_events(plans))
    schemas = [intake.schema, referral.schema, followup.schema]
    # Follow-ups nobody completed yet are scheduled by the consumer in its own time.
    wait_for(lambda: _stored(pool, schemas) == expected, 60, "the planned events in the stores")
    assert all(p.personal_identity_number not in stats.summary() for p in plans)
    _signed_in_as_the_staff_of_each_step(pool, schemas)


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
