"""The follow-up decider: given these events, when this command, then these events (no I/O)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given as for_all, strategies as st

from likvard.codec import Catalogue
from services.followup import domain as d
from services.followup.domain import (
    Command,
    CompleteFollowUp,
    DomainError,
    DomainEvent,
    EngageFamilyMember,
    FollowUp,
    FollowUpNotFound,
    MarkFollowUpMissed,
    RecordChildrenInHousehold,
    RuleViolation,
    ScheduleFollowUp,
)

CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=7)
TODAY = date(2026, 3, 9)
MEMBER = "4f1c8d0e-5061-4273-8e4f-4a5b6c7d8e9f"
OTHER_MEMBER = "5a2d9e1f-6172-4384-9f50-5b6c7d8e9f0a"
FOLLOWUP = "6b3e0f2a-7283-4495-8a61-6c7d8e9f0a1b"
OTHER_FOLLOWUP = "7c4f1a3b-8394-45a6-9b72-7d8e9f0a1b2c"
INTERVENTION = "8d5a2b4c-94a5-46b7-8c83-8e9f0a1b2c3d"
REFERRAL = "9e6b3c5d-a5b6-47c8-9d94-9f0a1b2c3d4e"
DUE = date(2026, 4, 8)


# --- events ---------------------------------------------------------------------------
def children_recorded(number: int = 2, youngest: int | None = 4, at: datetime = T0) -> DomainEvent:
    return DomainEvent(
        "ChildrenInHouseholdRecorded",
        {"number_of_children": number, "youngest_age": youngest},
        at,
    )


def engaged(
    member_id: str = MEMBER,
    relation: str = "CHILD",
    is_child: bool = True,
    support: tuple[str, ...] = ("CHILD_SUPPORT_GROUP",),
    accepted: bool = True,
    at: datetime = T0,
) -> DomainEvent:
    return DomainEvent(
        "FamilyMemberEngaged",
        {
            "member_id": member_id,
            "relation": relation,
            "is_child": is_child,
            "support_offered": list(support),
            "accepted": accepted,
        },
        at,
    )


def scheduled(
    followup_id: str = FOLLOWUP,
    kind: str = "POST_INTERVENTION_INTERVIEW",
    due_on: date = DUE,
    at: datetime = T0,
    **data: Any,
) -> DomainEvent:
    payload = {
        "followup_id": followup_id,
        "kind": kind,
        "due_on": due_on,
        "intervention_id": INTERVENTION,
        "referral_id": REFERRAL,
        "district": "nordost",
    }
    return DomainEvent("FollowUpScheduled", {**payload, **data}, at)


def completed(
    followup_id: str = FOLLOWUP,
    kind: str = "POST_INTERVENTION_INTERVIEW",
    at: datetime = T0,
    **data: Any,
) -> DomainEvent:
    payload = {
        "followup_id": followup_id,
        "kind": kind,
        "days_of_use_last_30": 3,
        "housing": "OWN_HOME",
        "occupation": "EMPLOYED",
        "self_rated_health": 4,
        "goals_reached": "PARTLY",
        "situation_improved": "BETTER",
    }
    return DomainEvent("FollowUpCompleted", {**payload, **data}, at)


def missed(
    followup_id: str = FOLLOWUP,
    kind: str = "POST_INTERVENTION_INTERVIEW",
    reason: str = "NO_CONTACT",
    at: datetime = T0,
) -> DomainEvent:
    return DomainEvent(
        "FollowUpMissed", {"followup_id": followup_id, "kind": kind, "reason": reason}, at
    )


# --- commands with sensible defaults ---------------------------------------------------
def record_children(number: int = 2, youngest: int | None = 4) -> RecordChildrenInHousehold:
    return RecordChildrenInHousehold(
        case_id=CASE, occurred_at=NOW, number_of_children=number, youngest_age=youngest
    )


def engage(**kw: Any) -> EngageFamilyMember:
    base = EngageFamilyMember(
        case_id=CASE,
        occurred_at=NOW,
        member_id=MEMBER,
        relation="CHILD",
        is_child=True,
        support_offered=("CHILD_SUPPORT_GROUP",),
        accepted=True,
    )
    return replace(base, **kw)


def schedule(**kw: Any) -> ScheduleFollowUp:
    base = ScheduleFollowUp(
        case_id=CASE,
        occurred_at=NOW,
        followup_id=FOLLOWUP,
        kind="POST_INTERVENTION_INTERVIEW",
        due_on=DUE,
        intervention_id=INTERVENTION,
        referral_id=REFERRAL,
        district="nordost",
    )
    return replace(base, **kw)


def complete(**kw: Any) -> CompleteFollowUp:
    base = CompleteFollowUp(
        case_id=CASE,
        occurred_at=NOW,
        followup_id=FOLLOWUP,
        days_of_use_last_30=3,
        housing="OWN_HOME",
        occupation="EMPLOYED",
        self_rated_health=4,
        goals_reached="PARTLY",
        situation_improved="BETTER",
    )
    return replace(base, **kw)


def miss(followup_id: str = FOLLOWUP, reason: str = "NO_CONTACT") -> MarkFollowUpMissed:
    return MarkFollowUpMissed(case_id=CASE, occurred_at=NOW, followup_id=followup_id, reason=reason)


# --- given / when / then ---------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    history: tuple[DomainEvent, ...]
    command: Command | None = None

    def when(self, command: Command) -> Scenario:
        return replace(self, command=command)

    def _decide(self) -> list[DomainEvent]:
        assert self.command is not None, "when(command) first"
        return d.decide(self.command, d.fold(self.history))

    def then(self, *expected: DomainEvent) -> None:
        assert self._decide() == list(expected)

    def then_nothing(self) -> None:
        assert self._decide() == []

    def then_raises(self, error: type[DomainError], code: str) -> DomainError:
        with pytest.raises(error) as info:
            self._decide()
        assert info.value.code == code
        assert info.value.detail
        return info.value


def given(*events: DomainEvent) -> Scenario:
    return Scenario(events)


SCHEDULED = (scheduled(),)


def test_a_command_without_time_zone_is_refused() -> None:
    naive = datetime(2026, 3, 9, 10, 0)
    for cmd in (record_children(), engage(), schedule(), complete(), miss()):
        given(*SCHEDULED).when(replace(cmd, occurred_at=naive)).then_raises(
            RuleViolation, "occurred-at-naive"
        )


# --- children in household -------------------------------------------------------------
def test_record_children_with_exactly_the_avro_payload() -> None:
    given().when(record_children(2, 4)).then(children_recorded(2, 4, at=NOW))


@pytest.mark.parametrize(("number", "youngest"), [(0, None), (1, 0), (20, 17), (3, None)])
def test_record_children_accepts_counts_and_ages_at_the_edges(
    number: int, youngest: int | None
) -> None:
    given().when(record_children(number, youngest)).then(
        children_recorded(number, youngest, at=NOW)
    )


@pytest.mark.parametrize("number", [-1, 21, 100])
def test_record_children_refuses_a_count_outside_0_to_20(number: int) -> None:
    given().when(record_children(number, None)).then_raises(
        RuleViolation, "number-of-children-out-of-range"
    )


@pytest.mark.parametrize("youngest", [-1, 18, 40])
def test_record_children_refuses_a_youngest_age_outside_0_to_17(youngest: int) -> None:
    given().when(record_children(2, youngest)).then_raises(
        RuleViolation, "youngest-age-out-of-range"
    )


def test_no_youngest_age_when_there_are_no_children() -> None:
    given().when(record_children(0, 0)).then_raises(RuleViolation, "youngest-age-without-children")


def test_a_boolean_is_not_a_count_or_an_age() -> None:
    given().when(record_children(True, None)).then_raises(
        RuleViolation, "number-of-children-out-of-range"
    )
    given().when(record_children(1, False)).then_raises(RuleViolation, "youngest-age-out-of-range")


def test_children_may_be_recorded_again() -> None:
    given(children_recorded()).when(record_children(0, None)).then(
        children_recorded(0, None, at=NOW)
    )


@for_all(st.integers(min_value=-50, max_value=50))
def test_number_of_children_is_accepted_exactly_from_0_to_20(number: int) -> None:
    cmd = record_children(number, None)
    if 0 <= number <= 20:
        assert d.decide(cmd, d.initial_state()) == [children_recorded(number, None, at=NOW)]
    else:
        with pytest.raises(RuleViolation):
            d.decide(cmd, d.initial_state())


# --- family members --------------------------------------------------------------------
def test_engage_family_member_with_exactly_the_avro_payload() -> None:
    given().when(engage()).then(engaged(at=NOW))


def test_an_adult_child_partner_and_parent_can_be_engaged() -> None:
    given().when(engage(is_child=False)).then(engaged(is_child=False, at=NOW))
    for relation in ("PARTNER", "PARENT"):
        cmd = engage(relation=relation, is_child=False, support_offered=("CRAFT", "INFORMATION"))
        given().when(cmd).then(
            engaged(relation=relation, is_child=False, support=("CRAFT", "INFORMATION"), at=NOW)
        )


@pytest.mark.parametrize("relation", ["CHILD", "SIBLING", "OTHER"])
def test_a_child_can_be_a_child_sibling_or_other(relation: str) -> None:
    given().when(engage(relation=relation)).then(engaged(relation=relation, at=NOW))


@pytest.mark.parametrize("relation", ["PARTNER", "PARENT"])
def test_a_partner_or_parent_cannot_be_a_child(relation: str) -> None:
    given().when(engage(relation=relation, is_child=True)).then_raises(
        RuleViolation, "relation-cannot-be-a-child"
    )


def test_engage_refuses_an_unknown_relation_and_a_member_id_that_is_not_a_uuid() -> None:
    given().when(engage(relation="COUSIN")).then_raises(RuleViolation, "unknown-relation")
    given().when(engage(member_id="Anna Andersson")).then_raises(RuleViolation, "invalid-id")


@pytest.mark.parametrize(
    ("support", "code"),
    [
        ((), "support-offered-empty"),
        (("CRAFT", "CRAFT"), "support-offered-duplicated"),
        (("CRAFT", "MONEY"), "unknown-support"),
        (("craft",), "unknown-support"),
    ],
)
def test_support_offered_must_be_non_empty_known_and_unique(
    support: tuple[str, ...], code: str
) -> None:
    err = given().when(engage(support_offered=support)).then_raises(RuleViolation, code)
    assert "MONEY" not in err.detail


def test_the_same_engagement_twice_is_refused() -> None:
    given(engaged()).when(engage()).then_raises(RuleViolation, "family-member-already-engaged")
    reordered = engaged(support=("CRAFT", "INFORMATION"))
    given(reordered).when(engage(support_offered=("INFORMATION", "CRAFT"))).then_raises(
        RuleViolation, "family-member-already-engaged"
    )


def test_a_member_may_be_engaged_again_with_other_support_or_another_answer() -> None:
    declined = engaged(accepted=False)
    given(declined).when(engage(accepted=True)).then(engaged(accepted=True, at=NOW))
    given(engaged()).when(engage(support_offered=("COUNSELLING",))).then(
        engaged(support=("COUNSELLING",), at=NOW)
    )


def test_a_child_who_has_grown_up_is_engaged_again_as_an_adult_child() -> None:
    given(engaged()).when(engage(is_child=False, support_offered=("COUNSELLING",))).then(
        engaged(is_child=False, support=("COUNSELLING",), at=NOW)
    )


def test_a_member_keeps_their_relation() -> None:
    given(engaged(relation="CHILD")).when(
        engage(relation="SIBLING", support_offered=("COUNSELLING",))
    ).then_raises(RuleViolation, "family-member-relation-changed")


def test_another_member_may_be_engaged_with_the_same_relation_and_support() -> None:
    given(engaged()).when(engage(member_id=OTHER_MEMBER)).then(
        engaged(member_id=OTHER_MEMBER, at=NOW)
    )


# --- schedule --------------------------------------------------------------------------
def test_schedule_follow_up_with_exactly_the_avro_payload() -> None:
    given().when(schedule()).then(scheduled(at=NOW))


def test_scheduling_an_id_already_scheduled_yields_no_events() -> None:
    given(*SCHEDULED).when(schedule()).then_nothing()
    given(*SCHEDULED, completed()).when(schedule()).then_nothing()
    given(*SCHEDULED, missed()).when(schedule()).then_nothing()


def test_a_re_delivered_schedule_after_its_due_date_still_yields_nothing() -> None:
    late = schedule(occurred_at=datetime(2027, 1, 1, 9, tzinfo=UTC))
    given(*SCHEDULED).when(late).then_nothing()
    given().when(late).then_raises(RuleViolation, "due-date-in-past")


def test_schedule_without_intervention_or_referral() -> None:
    cmd = schedule(kind="OTHER", intervention_id=None, referral_id=None)
    given().when(cmd).then(scheduled(kind="OTHER", intervention_id=None, referral_id=None, at=NOW))


def test_schedule_refuses_unknown_kind_and_ids_that_are_not_uuids() -> None:
    given().when(schedule(kind="ASI_3_MONTHS")).then_raises(RuleViolation, "unknown-followup-kind")
    for field in ("followup_id", "intervention_id", "referral_id"):
        given().when(schedule(**{field: "not-a-uuid"})).then_raises(RuleViolation, "invalid-id")


@pytest.mark.parametrize("district", ["", "   "])
def test_schedule_needs_a_district(district: str) -> None:
    given().when(schedule(district=district)).then_raises(RuleViolation, "district-missing")


def test_a_follow_up_may_be_due_today_but_not_before() -> None:
    given().when(schedule(due_on=TODAY)).then(scheduled(due_on=TODAY, at=NOW))
    given().when(schedule(due_on=TODAY - timedelta(days=1))).then_raises(
        RuleViolation, "due-date-in-past"
    )


def test_the_due_date_is_judged_on_the_citys_calendar_date() -> None:
    new_years_night = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)  # 00:30 on 1 Jan in the city
    cmd = schedule(occurred_at=new_years_night, due_on=date(2026, 12, 31))
    given().when(cmd).then_raises(RuleViolation, "due-date-in-past")
    given().when(replace(cmd, due_on=date(2027, 1, 1))).then(
        scheduled(due_on=date(2027, 1, 1), at=new_years_night)
    )


# --- complete --------------------------------------------------------------------------
def test_complete_follow_up_with_exactly_the_avro_payload_and_its_kind() -> None:
    given(scheduled(kind="ASI_6_MONTHS")).when(complete()).then(
        completed(kind="ASI_6_MONTHS", at=NOW)
    )


def test_complete_with_unanswered_questions() -> None:
    cmd = complete(days_of_use_last_30=None, self_rated_health=None, housing="UNKNOWN")
    given(*SCHEDULED).when(cmd).then(
        completed(days_of_use_last_30=None, self_rated_health=None, housing="UNKNOWN", at=NOW)
    )


def test_complete_an_unknown_follow_up_is_not_found() -> None:
    given().when(complete()).then_raises(FollowUpNotFound, "followup-not-found")
    given(*SCHEDULED).when(complete(followup_id=OTHER_FOLLOWUP)).then_raises(
        FollowUpNotFound, "followup-not-found"
    )


def test_complete_refuses_a_follow_up_already_completed_or_missed() -> None:
    given(*SCHEDULED, completed()).when(complete()).then_raises(
        RuleViolation, "followup-already-completed"
    )
    given(*SCHEDULED, missed()).when(complete()).then_raises(
        RuleViolation, "followup-already-missed"
    )


@pytest.mark.parametrize(("days", "ok"), [(0, True), (30, True), (-1, False), (31, False)])
def test_days_of_use_must_be_0_to_30(days: int, ok: bool) -> None:
    scenario = given(*SCHEDULED).when(complete(days_of_use_last_30=days))
    if ok:
        scenario.then(completed(days_of_use_last_30=days, at=NOW))
    else:
        scenario.then_raises(RuleViolation, "days-of-use-out-of-range")


@pytest.mark.parametrize(("health", "ok"), [(1, True), (5, True), (0, False), (6, False)])
def test_self_rated_health_must_be_1_to_5(health: int, ok: bool) -> None:
    scenario = given(*SCHEDULED).when(complete(self_rated_health=health))
    if ok:
        scenario.then(completed(self_rated_health=health, at=NOW))
    else:
        scenario.then_raises(RuleViolation, "self-rated-health-out-of-range")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"housing": "CASTLE"}, "unknown-housing"),
        ({"occupation": "ASTRONAUT"}, "unknown-occupation"),
        ({"goals_reached": "MAYBE"}, "unknown-goals-reached"),
        ({"situation_improved": "GREAT"}, "unknown-improvement"),
        ({"days_of_use_last_30": True}, "days-of-use-out-of-range"),
        ({"self_rated_health": True}, "self-rated-health-out-of-range"),
    ],
)
def test_complete_refuses_unknown_symbols_and_booleans(change: dict[str, Any], code: str) -> None:
    given(*SCHEDULED).when(complete(**change)).then_raises(RuleViolation, code)


# --- missed ----------------------------------------------------------------------------
def test_mark_follow_up_missed_with_exactly_the_avro_payload_and_its_kind() -> None:
    given(scheduled(kind="ASI_12_MONTHS")).when(miss(reason="MOVED")).then(
        missed(kind="ASI_12_MONTHS", reason="MOVED", at=NOW)
    )


def test_missed_an_unknown_follow_up_is_not_found() -> None:
    given().when(miss()).then_raises(FollowUpNotFound, "followup-not-found")


def test_missed_refuses_a_follow_up_already_completed_or_missed() -> None:
    given(*SCHEDULED, completed()).when(miss()).then_raises(
        RuleViolation, "followup-already-completed"
    )
    given(*SCHEDULED, missed()).when(miss()).then_raises(RuleViolation, "followup-already-missed")


def test_missed_needs_a_known_reason() -> None:
    given(*SCHEDULED).when(miss(reason="FORGOT")).then_raises(
        RuleViolation, "unknown-missed-reason"
    )


# --- evolve / fold ---------------------------------------------------------------------
def test_initial_state_is_empty() -> None:
    state = d.initial_state()
    assert state.number_of_children is None and state.youngest_age is None
    assert state.family_members == {} and not state.child_engaged
    assert state.followups == {} and state.version == 0 and d.fold([]) == state


def test_state_after_a_whole_follow_up_stream() -> None:
    t = [T0 + timedelta(days=i) for i in range(8)]
    state = d.fold(
        [
            children_recorded(2, 4, at=t[0]),
            engaged(relation="PARTNER", is_child=False, support=("CRAFT",), at=t[1]),
            engaged(OTHER_MEMBER, at=t[2]),
            scheduled(at=t[3]),
            scheduled(OTHER_FOLLOWUP, "ASI_6_MONTHS", date(2026, 9, 5), at=t[4]),
            scheduled("8f7c4d6e-b6c7-48d9-8ea5-a01b2c3d4e5f", "ASI_12_MONTHS", at=t[5]),
            completed(at=t[6]),
            missed(OTHER_FOLLOWUP, "ASI_6_MONTHS", at=t[7]),
        ]
    )
    assert state.version == 8
    assert (state.number_of_children, state.youngest_age) == (2, 4)
    assert state.family_members == {MEMBER: "PARTNER", OTHER_MEMBER: "CHILD"}
    assert state.child_engaged
    assert state.followups[FOLLOWUP] == FollowUp(
        "POST_INTERVENTION_INTERVIEW", DUE, "completed", "nordost"
    )
    assert state.followups[OTHER_FOLLOWUP] == FollowUp(
        "ASI_6_MONTHS", date(2026, 9, 5), "missed", "nordost"
    )
    assert list(state.due(DUE)) == ["8f7c4d6e-b6c7-48d9-8ea5-a01b2c3d4e5f"]
    assert state.due(DUE - timedelta(days=1)) == {}


def test_only_children_engaged_as_children_count_as_a_child_engaged() -> None:
    assert not d.fold([engaged(is_child=False)]).child_engaged
    assert not d.fold([engaged(relation="PARENT", is_child=False)]).child_engaged
    assert d.fold([engaged(is_child=False), engaged(OTHER_MEMBER, "SIBLING")]).child_engaged


def test_latest_children_record_is_by_when_it_happened_not_when_it_arrived() -> None:
    newer = children_recorded(1, 16, at=NOW)
    older_reported_late = children_recorded(3, 2, at=T0)
    for events in ([newer, older_reported_late], [older_reported_late, newer]):
        state = d.fold(events)
        assert (state.number_of_children, state.youngest_age) == (1, 16)


def test_a_repeated_scheduled_event_does_not_reset_a_done_follow_up() -> None:
    state = d.fold([scheduled(), completed(), scheduled()])
    assert state.followups[FOLLOWUP].status == "completed" and state.version == 3


def test_a_completion_reported_without_its_scheduling_is_still_folded() -> None:
    state = d.fold([completed(kind="ASI_12_MONTHS")])
    assert state.followups[FOLLOWUP] == FollowUp("ASI_12_MONTHS", None, "completed", None)
    assert state.due(date(2030, 1, 1)) == {}


def test_version_counts_every_event_folded_even_unknown_types() -> None:
    events = [children_recorded(), DomainEvent("SomethingFromTheFuture", {}, T0), scheduled()]
    states = [d.fold(events[:n]) for n in range(len(events) + 1)]
    assert [s.version for s in states] == [0, 1, 2, 3]
    assert states[2].followups == states[1].followups


COMMANDS: list[Command] = [
    record_children(),
    engage(),
    engage(member_id=OTHER_MEMBER, relation="PARTNER", is_child=False, accepted=False),
    schedule(),
    schedule(followup_id=OTHER_FOLLOWUP, kind="ASI_6_MONTHS", intervention_id=None),
    complete(),
    miss(OTHER_FOLLOWUP),
    d.RecordUserAssessment(CASE, NOW, MEMBER, "YES", "PARTLY", "NO", "NO_ANSWER", "YES", "NO"),
]


def test_folding_decided_events_gives_the_same_state_as_evolving_while_deciding() -> None:
    state, events = d.initial_state(), []
    for cmd in [*COMMANDS, schedule()]:  # the repeated schedule adds nothing
        for event in d.decide(cmd, state):
            events.append(event)
            state = d.evolve(state, event)
    assert d.fold(events) == state and state.version == 8
    assert {f.status for f in state.followups.values()} == {"completed", "missed"}


SPEC_FIELDS = {
    "ChildrenInHouseholdRecorded": {"number_of_children", "youngest_age"},
    "FamilyMemberEngaged": {"member_id", "relation", "is_child", "support_offered", "accepted"},
    "FollowUpScheduled": {
        "followup_id",
        "kind",
        "due_on",
        "intervention_id",
        "referral_id",
        "district",
    },
    "FollowUpCompleted": {
        "followup_id",
        "kind",
        "days_of_use_last_30",
        "housing",
        "occupation",
        "self_rated_health",
        "goals_reached",
        "situation_improved",
    },
    "FollowUpMissed": {"followup_id", "kind", "reason"},
    "UserAssessmentRecorded": {"assessment_id", *d.USER_ASSESSMENT_ITEMS},
}


def _metadata(event_type: str, at: datetime) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "case_id": CASE,
        "stream_version": 1,
        "occurred_at": at,
        "recorded_at": at,
        "producer": "likvard-followup",
        "district": "nordost",
        "actor": "cw-7f3a",
        "correlation_id": str(uuid.uuid4()),
        "causation_id": None,
        "traceparent": None,
    }


def test_every_decided_event_is_exactly_its_avro_payload_and_round_trips() -> None:
    catalogue = Catalogue.load()
    state, seen = d.initial_state(), set()
    for cmd in COMMANDS:
        for event in d.decide(cmd, state):
            assert set(event.data) == SPEC_FIELDS[event.type], event.type
            assert event.occurred_at == cmd.occurred_at
            record = {"metadata": _metadata(event.type, event.occurred_at), **event.data}
            decoded = catalogue.decode(catalogue.encode(event.type, record))
            assert {k: v for k, v in decoded.record.items() if k != "metadata"} == event.data
            seen.add(event.type)
            state = d.evolve(state, event)
    assert seen == set(d.EVENT_TYPES) == set(SPEC_FIELDS)
    assert set(d.EVENT_TYPES) <= set(catalogue.event_types())


@pytest.mark.parametrize(
    ("symbols", "enum"),
    [
        (d.RELATIONS, "Relation"),
        (d.SUPPORTS, "Support"),
        (d.FOLLOWUP_KINDS, "FollowUpKind"),
        (d.HOUSING, "Housing"),
        (d.OCCUPATIONS, "Occupation"),
        (d.GOALS_REACHED, "GoalsReached"),
        (d.IMPROVEMENTS, "Improvement"),
        (d.MISSED_REASONS, "MissedReason"),
        (d.RATINGS, "Rating"),
    ],
)
def test_the_domain_symbols_are_the_schema_symbols(symbols: frozenset[str], enum: str) -> None:
    catalogue = Catalogue.load()
    found = [
        set(named["symbols"])
        for event_type in d.EVENT_TYPES
        for name, named in catalogue.reader(event_type).parsed["__named_schemas"].items()
        if name == f"se.goteborg.likvard.followup.{enum}"
    ]
    assert found and all(s == symbols for s in found)


def test_errors_carry_code_and_detail_and_are_domain_errors() -> None:
    for error in (FollowUpNotFound(), RuleViolation("x-y", "Why.")):
        assert isinstance(error, DomainError) and error.code and error.detail
        assert error.code in str(error)
