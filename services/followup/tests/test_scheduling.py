"""The process manager's rule: which follow-ups an ended intervention schedules (no I/O)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given as for_all, strategies as st

from services.followup import domain as d
from services.followup.domain import DomainEvent, ScheduleFollowUp
from services.followup.scheduling import (
    FOLLOWUP_NAMESPACE,
    add_months,
    followup_id,
    followups_for_intervention_end,
)

CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
INTERVENTION = "8d5a2b4c-94a5-46b7-8c83-8e9f0a1b2c3d"
OTHER_INTERVENTION = "0a7c4d6e-b6c7-48d9-8ea5-a01b2c3d4e5f"
REFERRAL = "9e6b3c5d-a5b6-47c8-9d94-9f0a1b2c3d4e"
ENDED = datetime(2026, 3, 9, 10, 0, tzinfo=UTC)
END_DAY = date(2026, 3, 9)


def intervention_ended(
    started_at: Any, intervention_id: Any = INTERVENTION, **data: Any
) -> dict[str, Any]:
    """An InterventionEnded payload as decoded from Kafka (without metadata)."""
    payload = {
        "intervention_id": intervention_id,
        "referral_id": REFERRAL,
        "intervention_code": "CRA",
        "started_at": started_at,
        "outcome": "COMPLETED_AS_PLANNED",
    }
    return {**payload, **data}


def plan(
    lasted: timedelta, ended_at: datetime = ENDED, intervention_id: str = INTERVENTION
) -> list[ScheduleFollowUp]:
    data = intervention_ended(ended_at - lasted, intervention_id)
    return followups_for_intervention_end(data, ended_at, "nordost", CASE)


def kinds_and_dates(commands: list[ScheduleFollowUp]) -> list[tuple[str, date]]:
    return [(c.kind, c.due_on) for c in commands]


def test_exactly_7_days_gets_no_interview_only_the_asi_follow_ups() -> None:
    assert kinds_and_dates(plan(timedelta(days=7))) == [
        ("ASI_6_MONTHS", date(2026, 9, 9)),
        ("ASI_12_MONTHS", date(2027, 3, 9)),
    ]


def test_7_days_and_1_second_gets_an_interview_due_30_days_after_the_end() -> None:
    assert kinds_and_dates(plan(timedelta(days=7, seconds=1))) == [
        ("POST_INTERVENTION_INTERVIEW", date(2026, 4, 8)),
        ("ASI_6_MONTHS", date(2026, 9, 9)),
        ("ASI_12_MONTHS", date(2027, 3, 9)),
    ]


def test_a_short_intervention_still_gets_the_asi_follow_ups() -> None:
    assert [c.kind for c in plan(timedelta(hours=2))] == ["ASI_6_MONTHS", "ASI_12_MONTHS"]


@pytest.mark.parametrize(
    ("end_day", "six", "twelve"),
    [
        (date(2025, 8, 31), date(2026, 2, 28), date(2026, 8, 31)),
        (date(2027, 8, 31), date(2028, 2, 29), date(2028, 8, 31)),  # leap year
        (date(2026, 12, 31), date(2027, 6, 30), date(2027, 12, 31)),
        (date(2028, 2, 29), date(2028, 8, 29), date(2029, 2, 28)),
        (date(2026, 7, 15), date(2027, 1, 15), date(2027, 7, 15)),
    ],
)
def test_asi_follow_ups_are_calendar_months_later_clamped_to_the_months_last_day(
    end_day: date, six: date, twelve: date
) -> None:
    ended_at = datetime(end_day.year, end_day.month, end_day.day, 10, tzinfo=UTC)
    assert kinds_and_dates(plan(timedelta(days=1), ended_at)) == [
        ("ASI_6_MONTHS", six),
        ("ASI_12_MONTHS", twelve),
    ]


def test_dates_are_the_citys_calendar_dates() -> None:
    # 22:30 UTC on 31 August is 00:30 on 1 September in Gothenburg (summer time).
    ended_at = datetime(2025, 8, 31, 22, 30, tzinfo=UTC)
    assert kinds_and_dates(plan(timedelta(days=10), ended_at)) == [
        ("POST_INTERVENTION_INTERVIEW", date(2025, 10, 1)),
        ("ASI_6_MONTHS", date(2026, 3, 1)),
        ("ASI_12_MONTHS", date(2026, 9, 1)),
    ]


def test_commands_carry_the_case_intervention_referral_district_and_end_time() -> None:
    for command in plan(timedelta(days=30)):
        assert command.case_id == CASE and command.district == "nordost"
        assert command.intervention_id == INTERVENTION and command.referral_id == REFERRAL
        assert command.occurred_at == ENDED


def test_ids_are_uuid5_of_intervention_and_kind_and_the_same_every_time() -> None:
    first, second = plan(timedelta(days=30)), plan(timedelta(days=30))
    assert first == second
    for command in first:
        expected = uuid.uuid5(FOLLOWUP_NAMESPACE, f"{INTERVENTION}:{command.kind}")
        assert command.followup_id == str(expected) == followup_id(INTERVENTION, command.kind)
    other = plan(timedelta(days=30), intervention_id=OTHER_INTERVENTION)
    ids = {c.followup_id for c in first} | {c.followup_id for c in other}
    assert len(ids) == 6


def test_the_namespace_never_changes() -> None:
    assert str(FOLLOWUP_NAMESPACE) == "a21a3cee-196c-5514-bd43-1dbc378553c3"


def test_uuid_values_and_raw_micros_are_read_like_decoded_strings_and_datetimes() -> None:
    started_at = ENDED - timedelta(days=8)
    micros = (started_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    data = intervention_ended(micros, uuid.UUID(INTERVENTION), referral_id=None)
    commands = followups_for_intervention_end(data, ENDED, "nordost", CASE)
    assert commands == [replace(c, referral_id=None) for c in plan(timedelta(days=8))]
    assert commands[0].kind == "POST_INTERVENTION_INTERVIEW"


@pytest.mark.parametrize(
    ("started_at", "ended_at"),
    [
        (datetime(2026, 3, 1, 10), ENDED),
        (datetime(2026, 3, 1, 10, tzinfo=UTC), datetime(2026, 3, 9, 10)),
        (None, ENDED),
        ("2026-03-01", ENDED),
    ],
)
def test_a_missing_or_naive_time_is_refused(started_at: Any, ended_at: datetime) -> None:
    with pytest.raises(ValueError):
        followups_for_intervention_end(intervention_ended(started_at), ended_at, "nordost", CASE)


def _apply(
    commands: list[ScheduleFollowUp], state: d.FollowUpState
) -> tuple[list[DomainEvent], d.FollowUpState]:
    events: list[DomainEvent] = []
    for command in commands:
        for event in d.decide(command, state):
            events.append(event)
            state = d.evolve(state, event)
    return events, state


def test_scheduled_through_the_decider_a_second_delivery_yields_no_new_events() -> None:
    first_events, state = _apply(plan(timedelta(days=30)), d.initial_state())
    assert [e.type for e in first_events] == ["FollowUpScheduled"] * 3
    again, after = _apply(plan(timedelta(days=30)), state)
    assert again == [] and after == state


def test_a_re_delivery_after_a_follow_up_was_done_does_not_reschedule_it() -> None:
    first_events, state = _apply(plan(timedelta(days=30)), d.initial_state())
    interview = first_events[0].data["followup_id"]
    state = d.evolve(
        state,
        DomainEvent(
            "FollowUpMissed",
            {"followup_id": interview, "kind": "POST_INTERVENTION_INTERVIEW", "reason": "MOVED"},
            ENDED + timedelta(days=31),
        ),
    )
    again, _ = _apply(plan(timedelta(days=30)), state)
    assert again == [] and state.followups[interview].status == "missed"


def test_scheduled_events_are_due_on_the_planned_dates() -> None:
    events, state = _apply(plan(timedelta(days=30)), d.initial_state())
    assert [e.data["due_on"] for e in events] == [
        END_DAY + timedelta(days=30),
        date(2026, 9, 9),
        date(2027, 3, 9),
    ]
    assert list(state.due(END_DAY + timedelta(days=30))) == [events[0].data["followup_id"]]


@for_all(st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)), st.integers(0, 24))
def test_add_months_moves_whole_months_and_never_past_the_months_end(
    day: date, months: int
) -> None:
    later = add_months(day, months)
    assert (later.year * 12 + later.month) - (day.year * 12 + day.month) == months
    assert later.day == day.day or (later.day < day.day and (later + timedelta(days=1)).day == 1)
