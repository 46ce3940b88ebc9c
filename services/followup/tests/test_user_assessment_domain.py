"""The follow-up decider's user assessment: the person's own rating on the national
user-survey items. Given these events, when this command, then these events (no I/O)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from services.followup import domain as d
from services.followup.domain import DomainEvent, RecordUserAssessment, RuleViolation
from services.followup.tests.test_domain import (
    CASE,
    NOW,
    OTHER_MEMBER,
    SCHEDULED,
    completed,
    given,
)

ASSESSMENT = "4b5c6d7e-8f90-4a1b-9c2d-3e4f5a6b7c8d"
RATINGS = {
    "contact_easy": "YES",
    "clear_information": "PARTLY",
    "felt_understood": "YES",
    "influence": "NO",
    "whole_situation": "NO_ANSWER",
    "situation_improved": "YES",
}


def assessed(assessment_id: str = ASSESSMENT, **ratings: str) -> DomainEvent:
    data = {"assessment_id": assessment_id, **RATINGS, **ratings}
    return DomainEvent("UserAssessmentRecorded", data, NOW)


def assess(**kw: Any) -> RecordUserAssessment:
    base = RecordUserAssessment(case_id=CASE, occurred_at=NOW, assessment_id=ASSESSMENT, **RATINGS)
    return replace(base, **kw)


def test_a_user_assessment_is_recorded_with_exactly_the_avro_payload() -> None:
    given().when(assess()).then(assessed())


def test_a_user_assessment_follows_a_follow_up_or_stands_alone() -> None:
    # The survey is asked at the follow-up interview, but a person may answer it at any
    # time: the decider does not tie it to one follow-up.
    given(*SCHEDULED, completed()).when(assess()).then(assessed())


@pytest.mark.parametrize("rating", ["YES", "PARTLY", "NO", "NO_ANSWER"])
@pytest.mark.parametrize("item", d.USER_ASSESSMENT_ITEMS)
def test_every_item_takes_every_rating(item: str, rating: str) -> None:
    given().when(assess(**{item: rating})).then(assessed(**{item: rating}))


@pytest.mark.parametrize("item", d.USER_ASSESSMENT_ITEMS)
@pytest.mark.parametrize("rating", ["yes", "MAYBE", "", "Mycket bra bemötande"])
def test_a_rating_off_the_scale_is_refused_without_repeating_it(item: str, rating: str) -> None:
    err = given().when(assess(**{item: rating})).then_raises(RuleViolation, "unknown-rating")
    assert not rating or rating not in err.detail


def test_an_assessment_id_is_a_uuid_and_used_once() -> None:
    given().when(assess(assessment_id="survey-1")).then_raises(RuleViolation, "invalid-id")
    given(assessed()).when(assess()).then_raises(RuleViolation, "user-assessment-id-used")
    given(assessed()).when(assess(assessment_id=OTHER_MEMBER)).then(assessed(OTHER_MEMBER))


def test_the_state_knows_the_assessments_and_nothing_else_changes() -> None:
    state = d.fold([*SCHEDULED, assessed(), assessed(OTHER_MEMBER)])
    assert state.user_assessment_ids == {ASSESSMENT, OTHER_MEMBER}
    assert state.followups == d.fold(SCHEDULED).followups and state.version == 3
