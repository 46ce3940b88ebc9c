"""The intake decider: given these events, when this command, then these events (no I/O)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, get_args

import pytest
from hypothesis import given as for_all, strategies as st

from likvard.districts import District, DistrictRegistry
from likvard.domain import age_band, local_date
from likvard.policy import Transfer
from services.intake import domain as d
from services.intake.domain import (
    AgreeCarePlan,
    CaseAlreadyExists,
    CaseNotFound,
    CloseCase,
    Command,
    CompleteAssessment,
    DomainError,
    DomainEvent,
    RecordConsent,
    RegisterIntake,
    ReopenCase,
    RuleViolation,
    Score,
    TransferCase,
    WithdrawConsent,
)
from services.intake.instruments import GUIDELINE_PRIORITY, INSTRUMENTS, guideline_priority


def _district(code: str, start: int, end: int | None, successor: str | None = None) -> District:
    return District(
        code=code,
        name=code.title(),
        valid_from=date(start, 1, 1),
        valid_to=None if end is None else date(end, 12, 31),
        kind="district-committee" if end else "social-services-area",
        successor=successor,
        successor_confirmed=successor == "hisingen",
    )


DISTRICTS = DistrictRegistry(
    [_district(code, 2021, None) for code in ("nordost", "centrum", "sydvast", "hisingen")]
    + [_district("angered", 2011, 2020, "nordost"), _district("lundby", 2011, 2020, "hisingen")]
)

CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
PERSON = hashlib.sha256(b"a keyed pseudonym").hexdigest()
PNR = "19121212-1212"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=7)
TODAY = date(2026, 3, 9)
ASSESSMENT = "0b7e4f6a-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
PLAN = "1c8f5a7b-2d3e-4f40-9b1c-1d2e3f4a5b6c"
CONSENT = "2d9a6b8c-3e4f-4051-8c2d-2e3f4a5b6c7d"
OTHER_ID = "3e0b7c9d-4f50-4162-9d3e-3f4a5b6c7d8e"


# --- events ---------------------------------------------------------------------------
def registered(at: datetime = T0, **data: Any) -> DomainEvent:
    payload = {
        "person": PERSON,
        "district": "nordost",
        "substances": ["ALCOHOL", "GAMBLING"],
        "referral_source": "HEALTHCARE",
        "children_in_household": "YES",
        "birth_year": 1975,
        "archive_sample": False,
        "gender": "NOT_STATED",
    }
    merged = {**payload, **data}
    merged.setdefault("age_band", age_band(merged["birth_year"], local_date(at).year))
    return DomainEvent("IntakeRegistered", merged, at)


def assessed(
    assessment_id: str = ASSESSMENT, need_level: str = "HIGH", at: datetime = T0
) -> DomainEvent:
    return DomainEvent(
        "AssessmentCompleted",
        {
            "assessment_id": assessment_id,
            "instrument": "AUDIT",
            "scores": [{"scale": "total", "value": 23}],
            "need_level": need_level,
        },
        at,
    )


def plan_agreed(plan_id: str = PLAN, at: datetime = T0) -> DomainEvent:
    return DomainEvent(
        "CarePlanAgreed",
        {
            "plan_id": plan_id,
            "goals": ["Sluta dricka på vardagar"],
            "person_participated": True,
            "review_on": None,
        },
        at,
    )


def consented(
    consent_id: str = CONSENT,
    recipients: tuple[str, ...] = ("HEALTHCARE",),
    valid_until: date | None = None,
    at: datetime = T0,
) -> DomainEvent:
    return DomainEvent(
        "ConsentRecorded",
        {
            "consent_id": consent_id,
            "recipients": list(recipients),
            "valid_until": valid_until,
        },
        at,
    )


def withdrawn(consent_id: str = CONSENT, at: datetime = T0) -> DomainEvent:
    return DomainEvent("ConsentWithdrawn", {"consent_id": consent_id}, at)


def transferred(to: str = "hisingen", frm: str = "nordost", at: datetime = T0) -> DomainEvent:
    return DomainEvent(
        "CaseTransferred", {"from_district": frm, "to_district": to, "reason": "PERSON_MOVED"}, at
    )


def closed(at: datetime = T0, reason: str = "GOALS_REACHED") -> DomainEvent:
    return DomainEvent("CaseClosed", {"reason": reason}, at)


def reopened(at: datetime = T0, reason: str = "RELAPSE") -> DomainEvent:
    return DomainEvent("CaseReopened", {"reason": reason}, at)


# --- commands with sensible defaults ---------------------------------------------------
def register(**kw: Any) -> RegisterIntake:
    base = RegisterIntake(
        case_id=CASE,
        occurred_at=NOW,
        person=PERSON,
        district="nordost",
        substances=("ALCOHOL", "GAMBLING"),
        referral_source="HEALTHCARE",
        children_in_household="YES",
        birth_year=1975,
    )
    return replace(base, **kw)


def assess(instrument: str = "AUDIT", *scores: tuple[str, int], **kw: Any) -> CompleteAssessment:
    base = CompleteAssessment(
        case_id=CASE,
        occurred_at=NOW,
        assessment_id=OTHER_ID,
        instrument=instrument,
        scores=tuple(Score(s, v) for s, v in scores or (("total", 23),)),
        need_level="HIGH",
    )
    return replace(base, **kw)


def agree(**kw: Any) -> AgreeCarePlan:
    base = AgreeCarePlan(
        case_id=CASE,
        occurred_at=NOW,
        plan_id=OTHER_ID,
        goals=("Sluta dricka på vardagar", "Behålla jobbet"),
        person_participated=True,
        review_on=date(2026, 9, 1),
    )
    return replace(base, **kw)


def consent(**kw: Any) -> RecordConsent:
    base = RecordConsent(
        case_id=CASE,
        occurred_at=NOW,
        consent_id=OTHER_ID,
        recipients=("HEALTHCARE", "NON_PROFIT"),
        valid_until=date(2027, 3, 9),
    )
    return replace(base, **kw)


def withdraw(consent_id: str = CONSENT, at: datetime = NOW) -> WithdrawConsent:
    return WithdrawConsent(case_id=CASE, occurred_at=at, consent_id=consent_id)


def transfer(
    to: str = "hisingen", reason: str = "PERSON_MOVED", at: datetime = NOW
) -> TransferCase:
    return TransferCase(case_id=CASE, occurred_at=at, to_district=to, reason=reason)


def close(reason: str = "GOALS_REACHED") -> CloseCase:
    return CloseCase(case_id=CASE, occurred_at=NOW, reason=reason)


def reopen(reason: str = "RELAPSE") -> ReopenCase:
    return ReopenCase(case_id=CASE, occurred_at=NOW, reason=reason)


# --- given / when / then ---------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    history: tuple[DomainEvent, ...]
    command: Command | None = None

    def when(self, command: Command) -> Scenario:
        return replace(self, command=command)

    def _decide(self) -> list[DomainEvent]:
        assert self.command is not None, "when(command) first"
        return d.decide(self.command, d.fold(self.history), DISTRICTS)

    def then(self, *expected: DomainEvent) -> None:
        assert self._decide() == list(expected)

    def then_raises(self, error: type[DomainError], code: str) -> DomainError:
        with pytest.raises(error) as info:
            self._decide()
        assert info.value.code == code
        assert info.value.detail and PERSON not in info.value.detail
        return info.value


def given(*events: DomainEvent) -> Scenario:
    return Scenario(events)


OPEN = (registered(),)
CLOSED = (registered(), closed())


# --- register --------------------------------------------------------------------------
def test_register_opens_a_case_with_exactly_the_avro_payload() -> None:
    given().when(register()).then(registered(at=NOW))


def test_register_on_an_existing_case_is_refused() -> None:
    given(*OPEN).when(register()).then_raises(CaseAlreadyExists, "case-already-exists")


def test_register_needs_a_known_district() -> None:
    given().when(register(district="atlantis")).then_raises(RuleViolation, "unknown-district")


def test_register_in_a_2011_2020_committee_is_refused_in_2026_but_fine_in_2015() -> None:
    given().when(register(district="angered")).then_raises(RuleViolation, "district-not-valid")
    in_2015 = datetime(2015, 6, 1, 9, tzinfo=UTC)
    given().when(register(district="angered", occurred_at=in_2015)).then(
        registered(at=in_2015, district="angered")
    )


def test_district_validity_is_judged_on_the_citys_calendar_date() -> None:
    new_years_night = datetime(2020, 12, 31, 23, 30, tzinfo=UTC)  # 00:30 on 1 Jan in the city
    cmd = register(district="angered", occurred_at=new_years_night)
    given().when(cmd).then_raises(RuleViolation, "district-not-valid")
    given().when(replace(cmd, district="nordost")).then(
        registered(at=new_years_night, district="nordost")
    )


@pytest.mark.parametrize(
    ("substances", "code"),
    [
        ((), "substances-empty"),
        (("ALCOHOL", "ALCOHOL"), "substances-duplicated"),
        (("ALCOHOL", "COFFEE"), "unknown-substance"),
        (("alcohol",), "unknown-substance"),
    ],
)
def test_register_substances_must_be_non_empty_known_and_unique(
    substances: tuple[str, ...], code: str
) -> None:
    err = given().when(register(substances=substances)).then_raises(RuleViolation, code)
    assert "COFFEE" not in err.detail


def test_register_refuses_unknown_referral_source_and_children_answer() -> None:
    given().when(register(referral_source="NEIGHBOUR")).then_raises(
        RuleViolation, "unknown-referral-source"
    )
    given().when(register(children_in_household="MAYBE")).then_raises(
        RuleViolation, "unknown-children-in-household"
    )


@pytest.mark.parametrize("birth_year", [None, 1900, 1975, 2008])
def test_register_accepts_adult_birth_years_or_none(birth_year: int | None) -> None:
    given().when(register(birth_year=birth_year)).then(registered(at=NOW, birth_year=birth_year))


@pytest.mark.parametrize("birth_year", [1899, 2009, 2026, 0, -1975])
def test_register_refuses_birth_years_of_minors_or_before_1900(birth_year: int) -> None:
    given().when(register(birth_year=birth_year)).then_raises(
        RuleViolation, "birth-year-out-of-range"
    )


@pytest.mark.parametrize(
    "person",
    [
        PNR,
        "191212121212",
        "121212-1212",
        "1212121212",
        "19121212+1212",
        "Anna Andersson",
        "",
        PERSON.upper(),
        PERSON[:-1],
        PERSON + "0",
        PERSON + "\n",
        "0" * 52 + "191212121212",  # an identity number padded to a pseudonym's length
    ],
)
def test_register_accepts_only_a_keyed_pseudonym_as_the_person(person: str) -> None:
    err = given().when(register(person=person)).then_raises(RuleViolation, "person-not-pseudonym")
    assert person not in err.detail or person == ""
    assert "1212" not in str(err)


def test_a_command_without_time_zone_is_refused() -> None:
    naive = datetime(2026, 3, 9, 10, 0)
    given().when(register(occurred_at=naive)).then_raises(RuleViolation, "occurred-at-naive")
    given(*OPEN).when(replace(close(), occurred_at=naive)).then_raises(
        RuleViolation, "occurred-at-naive"
    )


# --- assessment ------------------------------------------------------------------------
def test_complete_assessment_records_instrument_scores_and_need_level() -> None:
    given(*OPEN).when(assess("AUDIT", ("total", 23))).then(assessed(assessment_id=OTHER_ID, at=NOW))


def test_assessment_on_a_missing_or_closed_case_is_refused() -> None:
    given().when(assess()).then_raises(CaseNotFound, "case-not-found")
    given(*CLOSED).when(assess()).then_raises(RuleViolation, "case-closed")


def test_assessment_with_an_unknown_instrument_is_refused() -> None:
    given(*OPEN).when(assess("MMSE")).then_raises(RuleViolation, "unknown-instrument")


def test_assessment_with_an_unknown_need_level_is_refused() -> None:
    given(*OPEN).when(assess(need_level="EXTREME")).then_raises(RuleViolation, "unknown-need-level")


def test_assessment_id_may_not_be_used_twice_in_a_case() -> None:
    given(*OPEN, assessed()).when(assess(assessment_id=ASSESSMENT)).then_raises(
        RuleViolation, "assessment-id-used"
    )


def test_assessment_id_must_be_a_uuid() -> None:
    given(*OPEN).when(assess(assessment_id="assessment-1")).then_raises(RuleViolation, "invalid-id")


VALID_SCORES: list[tuple[str, tuple[tuple[str, int], ...]]] = [
    ("AUDIT", (("total", 0),)),
    ("AUDIT", (("total", 40),)),
    ("DUDIT", (("total", 44),)),
    ("PGSI", (("total", 27),)),
    ("NODS_PERC", (("total", 4),)),
    (
        "ASI_GRUND",
        (
            ("alcohol", 9),
            ("drugs", 0),
            ("physical_health", 3),
            ("employment_support", 4),
            ("legal", 5),
            ("family_social", 6),
            ("psychiatric", 7),
        ),
    ),
    ("ASI_UPPFOLJNING", (("alcohol", 2),)),
    ("ADDIS", (("criteria_alcohol", 11), ("criteria_drugs", 0))),
    ("ADDIS", (("criteria_drugs", 4),)),
]


@pytest.mark.parametrize(("instrument", "scores"), VALID_SCORES)
def test_scores_at_the_edges_of_each_scale_are_accepted(
    instrument: str, scores: tuple[tuple[str, int], ...]
) -> None:
    [event] = d.decide(assess(instrument, *scores), d.fold(OPEN), DISTRICTS)
    assert event.data["instrument"] == instrument
    assert event.data["scores"] == [{"scale": s, "value": v} for s, v in scores]


INVALID_SCORES: list[tuple[str, tuple[tuple[str, int], ...]]] = [
    ("AUDIT", (("total", 41),)),
    ("AUDIT", (("total", -1),)),
    ("AUDIT", (("sum", 10),)),
    ("AUDIT", (("total", 3), ("total", 3))),
    ("AUDIT", (("total", 3), ("alcohol", 3))),
    ("DUDIT", (("total", 45),)),
    ("PGSI", (("total", 28),)),
    ("NODS_PERC", (("total", 5),)),
    ("ASI_GRUND", (("alcohol", 10),)),
    ("ASI_GRUND", (("alcohol", 1), ("alcohol", 2))),
    ("ASI_GRUND", (("gambling", 1),)),
    ("ASI_UPPFOLJNING", (("legal", -1),)),
    ("ADDIS", (("criteria_alcohol", 12),)),
    ("ADDIS", (("total", 3),)),
]


@pytest.mark.parametrize(("instrument", "scores"), INVALID_SCORES)
def test_scores_outside_the_instrument_are_refused(
    instrument: str, scores: tuple[tuple[str, int], ...]
) -> None:
    given(*OPEN).when(assess(instrument, *scores)).then_raises(RuleViolation, "invalid-scores")


@pytest.mark.parametrize("instrument", sorted(INSTRUMENTS))
def test_every_instrument_needs_at_least_one_score(instrument: str) -> None:
    cmd = replace(assess(instrument), scores=())
    given(*OPEN).when(cmd).then_raises(RuleViolation, "invalid-scores")


def test_a_boolean_is_not_a_score() -> None:
    cmd = replace(assess("NODS_PERC"), scores=(Score("total", True),))
    given(*OPEN).when(cmd).then_raises(RuleViolation, "invalid-scores")


def test_invalid_score_detail_names_the_range_but_not_free_text() -> None:
    err = (
        given(*OPEN)
        .when(assess("AUDIT", ("Anna Andersson", 3)))
        .then_raises(RuleViolation, "invalid-scores")
    )
    assert "Anna" not in err.detail and "total" in err.detail
    err = (
        given(*OPEN)
        .when(assess("AUDIT", ("total", 41)))
        .then_raises(RuleViolation, "invalid-scores")
    )
    assert err.detail.startswith("AUDIT") and "0 to 40" in err.detail


@for_all(st.integers(min_value=-1000, max_value=1000))
def test_audit_total_is_accepted_exactly_from_0_to_40(value: int) -> None:
    cmd = assess("AUDIT", ("total", value))
    if 0 <= value <= 40:
        assert d.decide(cmd, d.fold(OPEN), DISTRICTS)[0].data["scores"][0]["value"] == value
    else:
        with pytest.raises(RuleViolation):
            d.decide(cmd, d.fold(OPEN), DISTRICTS)


def test_guideline_priority_is_known_for_asi_audit_dudit_and_unknown_otherwise() -> None:
    assert set(GUIDELINE_PRIORITY) == set(INSTRUMENTS) == d.INSTRUMENT_CODES
    assert guideline_priority("AUDIT") == 1
    assert guideline_priority("ASI_GRUND") == guideline_priority("ASI_UPPFOLJNING") == 1
    assert guideline_priority("DUDIT") == 3
    assert guideline_priority("PGSI") is None and guideline_priority("MMSE") is None


# --- care plan -------------------------------------------------------------------------
def test_agree_care_plan_records_the_persons_own_goals() -> None:
    given(*OPEN).when(agree()).then(
        DomainEvent(
            "CarePlanAgreed",
            {
                "plan_id": OTHER_ID,
                "goals": ["Sluta dricka på vardagar", "Behålla jobbet"],
                "person_participated": True,
                "review_on": date(2026, 9, 1),
            },
            NOW,
        )
    )


def test_care_plan_on_a_missing_or_closed_case_is_refused() -> None:
    given().when(agree()).then_raises(CaseNotFound, "case-not-found")
    given(*CLOSED).when(agree()).then_raises(RuleViolation, "case-closed")


@pytest.mark.parametrize("count", [0, 21])
def test_care_plan_needs_1_to_20_goals(count: int) -> None:
    goals = tuple(f"Mål {i}" for i in range(count))
    given(*OPEN).when(agree(goals=goals)).then_raises(RuleViolation, "goals-count")


def test_care_plan_with_20_goals_of_500_characters_is_fine() -> None:
    goals = tuple(str(i).ljust(500, "x") for i in range(20))
    [event] = d.decide(agree(goals=goals), d.fold(OPEN), DISTRICTS)
    assert event.data["goals"] == list(goals)


@pytest.mark.parametrize("goal", ["", "   ", "\n\t"])
def test_care_plan_goal_may_not_be_blank(goal: str) -> None:
    given(*OPEN).when(agree(goals=("Behålla jobbet", goal))).then_raises(
        RuleViolation, "goal-blank"
    )


def test_care_plan_goal_may_be_at_most_500_characters() -> None:
    given(*OPEN).when(agree(goals=("x" * 501,))).then_raises(RuleViolation, "goal-too-long")


def test_care_plan_review_date_may_be_today_but_not_earlier() -> None:
    given(*OPEN).when(agree(review_on=TODAY - timedelta(days=1))).then_raises(
        RuleViolation, "review-date-in-past"
    )
    [event] = d.decide(agree(review_on=TODAY), d.fold(OPEN), DISTRICTS)
    assert event.data["review_on"] == TODAY
    [event] = d.decide(agree(review_on=None), d.fold(OPEN), DISTRICTS)
    assert event.data["review_on"] is None


def test_care_plan_id_may_not_be_used_twice() -> None:
    given(*OPEN, plan_agreed()).when(agree(plan_id=PLAN)).then_raises(
        RuleViolation, "care-plan-id-used"
    )


# --- consent ---------------------------------------------------------------------------
def test_record_consent() -> None:
    given(*OPEN).when(consent()).then(
        consented(OTHER_ID, ("HEALTHCARE", "NON_PROFIT"), date(2027, 3, 9), at=NOW)
    )


def test_consent_on_a_missing_or_closed_case_is_refused() -> None:
    given().when(consent()).then_raises(CaseNotFound, "case-not-found")
    given(*CLOSED).when(consent()).then_raises(RuleViolation, "case-closed")


@pytest.mark.parametrize(
    ("recipients", "code"),
    [
        ((), "consent-recipients-empty"),
        (("HEALTHCARE", "EMPLOYER"), "unknown-consent-recipient"),
        (("HEALTHCARE", "HEALTHCARE"), "consent-recipients-duplicated"),
    ],
)
def test_consent_recipients_must_be_non_empty_known_and_unique(
    recipients: tuple[str, ...], code: str
) -> None:
    given(*OPEN).when(consent(recipients=recipients)).then_raises(RuleViolation, code)


def test_consent_may_end_today_but_not_before() -> None:
    given(*OPEN).when(consent(valid_until=TODAY - timedelta(days=1))).then_raises(
        RuleViolation, "consent-expiry-in-past"
    )
    given(*OPEN).when(consent(valid_until=TODAY)).then(
        consented(OTHER_ID, ("HEALTHCARE", "NON_PROFIT"), TODAY, at=NOW)
    )
    [event] = d.decide(consent(valid_until=None), d.fold(OPEN), DISTRICTS)
    assert event.data["valid_until"] is None


def test_consent_id_may_not_be_reused_even_after_withdrawal() -> None:
    given(*OPEN, consented()).when(consent(consent_id=CONSENT)).then_raises(
        RuleViolation, "consent-id-used"
    )
    given(*OPEN, consented(), withdrawn()).when(consent(consent_id=CONSENT)).then_raises(
        RuleViolation, "consent-id-used"
    )


# --- withdraw consent ------------------------------------------------------------------
def test_withdraw_consent() -> None:
    given(*OPEN, consented()).when(withdraw()).then(withdrawn(at=NOW))


def test_a_consent_can_be_withdrawn_on_a_closed_case() -> None:
    given(*OPEN, consented(), closed()).when(withdraw()).then(withdrawn(at=NOW))


def test_withdraw_on_a_missing_case_is_refused() -> None:
    given().when(withdraw()).then_raises(CaseNotFound, "case-not-found")


def test_withdraw_needs_a_recorded_consent() -> None:
    given(*OPEN, consented()).when(withdraw(OTHER_ID)).then_raises(
        RuleViolation, "consent-not-found"
    )


def test_withdraw_needs_a_consent_still_active() -> None:
    given(*OPEN, consented(), withdrawn()).when(withdraw()).then_raises(
        RuleViolation, "consent-already-withdrawn"
    )
    expired = consented(valid_until=TODAY - timedelta(days=1))
    given(*OPEN, expired).when(withdraw()).then_raises(RuleViolation, "consent-expired")
    on_last_day = consented(valid_until=TODAY)
    given(*OPEN, on_last_day).when(withdraw()).then(withdrawn(at=NOW))


# --- transfer --------------------------------------------------------------------------
def test_transfer_moves_the_case_and_names_both_districts() -> None:
    given(*OPEN).when(transfer("hisingen")).then(transferred("hisingen", "nordost", at=NOW))


def test_transfer_on_a_missing_or_closed_case_is_refused() -> None:
    given().when(transfer()).then_raises(CaseNotFound, "case-not-found")
    given(*CLOSED).when(transfer()).then_raises(RuleViolation, "case-closed")


def test_transfer_needs_a_known_district_valid_on_the_date() -> None:
    given(*OPEN).when(transfer("atlantis")).then_raises(RuleViolation, "unknown-district")
    given(*OPEN).when(transfer("angered")).then_raises(RuleViolation, "district-not-valid")


def test_transfer_to_the_current_district_is_refused() -> None:
    given(*OPEN).when(transfer("nordost")).then_raises(RuleViolation, "same-district")


def test_transfer_needs_a_known_reason() -> None:
    given(*OPEN).when(transfer(reason="BORED")).then_raises(
        RuleViolation, "unknown-transfer-reason"
    )


def test_a_case_from_an_old_committee_is_moved_to_its_successor_at_reorganisation() -> None:
    in_2019 = datetime(2019, 5, 1, 8, tzinfo=UTC)
    at_reorg = datetime(2021, 1, 1, 8, tzinfo=UTC)
    given(registered(at=in_2019, district="lundby")).when(
        transfer("hisingen", "REORGANISATION", at_reorg)
    ).then(
        DomainEvent(
            "CaseTransferred",
            {
                "from_district": "lundby",
                "to_district": "hisingen",
                "reason": "REORGANISATION",
            },
            at_reorg,
        )
    )


# --- close and reopen ------------------------------------------------------------------
def test_close_case() -> None:
    given(*OPEN).when(close("PLANNED_END")).then(closed(at=NOW, reason="PLANNED_END"))


def test_close_refuses_a_missing_or_already_closed_case() -> None:
    given().when(close()).then_raises(CaseNotFound, "case-not-found")
    given(*CLOSED).when(close()).then_raises(RuleViolation, "case-already-closed")


def test_close_needs_a_known_reason() -> None:
    given(*OPEN).when(close("BORED")).then_raises(RuleViolation, "unknown-close-reason")


def test_reopen_case() -> None:
    given(*CLOSED).when(reopen("NEW_NEED")).then(reopened(at=NOW, reason="NEW_NEED"))


def test_reopen_refuses_a_missing_or_open_case() -> None:
    given().when(reopen()).then_raises(CaseNotFound, "case-not-found")
    given(*OPEN).when(reopen()).then_raises(RuleViolation, "case-not-closed")
    given(*CLOSED, reopened()).when(reopen()).then_raises(RuleViolation, "case-not-closed")


def test_reopen_needs_a_known_reason() -> None:
    given(*CLOSED).when(reopen("BORED")).then_raises(RuleViolation, "unknown-reopen-reason")


def test_a_reopened_case_takes_commands_again() -> None:
    given(*CLOSED, reopened()).when(assess()).then(assessed(OTHER_ID, at=NOW))


# --- evolve / fold ---------------------------------------------------------------------
def test_initial_state_is_no_case() -> None:
    state = d.initial_state()
    assert not state.exists and not state.is_open and state.status == "unregistered"
    assert state.version == 0 and d.fold([]) == state


def test_state_after_the_whole_life_of_a_case() -> None:
    t = [T0 + timedelta(days=i) for i in range(9)]
    state = d.fold(
        [
            registered(at=t[0]),
            assessed(at=t[1]),
            plan_agreed(at=t[2]),
            consented(recipients=("HEALTHCARE", "NON_PROFIT"), at=t[3]),
            consented(OTHER_ID, ("PRISON_PROBATION",), at=t[4]),
            transferred(at=t[5]),
            closed(at=t[6]),
            reopened(at=t[7]),
            withdrawn(OTHER_ID, at=t[8]),
        ]
    )
    assert state.exists and state.is_open and state.status == "open"
    assert state.version == 9
    assert state.person == PERSON and state.district == "hisingen"
    assert state.substances == ("ALCOHOL", "GAMBLING")
    assert state.referral_source == "HEALTHCARE" and state.children_in_household == "YES"
    assert state.age_band == age_band(1975, t[0].year) and state.registered_at == t[0]
    assert state.assessment_ids == {ASSESSMENT} and state.need_level == "HIGH"
    assert state.care_plan_ids == {PLAN}
    assert dict(state.consents) == {CONSENT: ("HEALTHCARE", "NON_PROFIT")}
    assert state.consent_ids == {CONSENT, OTHER_ID}
    assert state.closed_at is None


def test_closing_records_when_and_reopening_clears_it() -> None:
    state = d.fold([registered(), closed(at=NOW)])
    assert state.status == "closed" and not state.is_open and state.closed_at == NOW
    assert d.evolve(state, reopened()).closed_at is None


def test_version_counts_every_event_folded_even_unknown_types() -> None:
    events = [registered(), assessed(), DomainEvent("SomethingFromTheFuture", {}, T0), closed()]
    states = [d.fold(events[:n]) for n in range(len(events) + 1)]
    assert [s.version for s in states] == [0, 1, 2, 3, 4]
    assert states[3].need_level == states[2].need_level  # the unknown event changed nothing


def test_latest_need_level_is_by_when_it_happened_not_when_it_arrived() -> None:
    newer = assessed(need_level="LOW", at=NOW)
    older_reported_late = assessed(OTHER_ID, need_level="HIGH", at=T0)
    state = d.fold([registered(), newer, older_reported_late])
    assert state.need_level == "LOW" and state.assessment_ids == {ASSESSMENT, OTHER_ID}
    assert d.fold([registered(), older_reported_late, newer]).need_level == "LOW"


def test_a_withdrawn_consent_no_longer_covers() -> None:
    state = d.fold([registered(), consented(recipients=("HEALTHCARE", "NON_PROFIT"))])
    assert state.consents_cover("HEALTHCARE", TODAY)
    assert state.consents_cover("NON_PROFIT", TODAY)
    assert not state.consents_cover("PRISON_PROBATION", TODAY)
    state = d.evolve(state, withdrawn())
    assert not state.consents_cover("HEALTHCARE", TODAY)
    assert state.consents == {} and state.active_consents(TODAY) == {}


def test_another_consent_still_covers_after_one_is_withdrawn() -> None:
    state = d.fold([registered(), consented(), consented(OTHER_ID, ("HEALTHCARE",)), withdrawn()])
    assert state.consents_cover("HEALTHCARE", TODAY)


def test_an_expired_consent_covers_up_to_and_including_its_last_day() -> None:
    state = d.fold([registered(), consented(valid_until=TODAY)])
    assert state.consents_cover("HEALTHCARE", TODAY)
    assert not state.consents_cover("HEALTHCARE", TODAY + timedelta(days=1))
    assert state.active_consents(TODAY + timedelta(days=1)) == {}
    assert CONSENT in state.consents  # not withdrawn, only out of force


def test_folding_decided_events_gives_the_same_state_as_evolving_while_deciding() -> None:
    state = d.initial_state()
    events: list[DomainEvent] = []
    commands: list[Command] = [
        register(),
        assess(),
        agree(),
        consent(),
        transfer(),
        close(),
        reopen(),
    ]
    for cmd in commands:
        for event in d.decide(cmd, state, DISTRICTS):
            events.append(event)
            state = d.evolve(state, event)
    assert d.fold(events) == state and state.version == 7
    assert state.consents_cover("NON_PROFIT", TODAY) and state.district == "hisingen"


SPEC_FIELDS = {
    "IntakeRegistered": {
        "person",
        "district",
        "substances",
        "referral_source",
        "children_in_household",
        "birth_year",
        "age_band",
        "archive_sample",
        "gender",
    },
    "AssessmentCompleted": {"assessment_id", "instrument", "scores", "need_level"},
    "CarePlanAgreed": {"plan_id", "goals", "person_participated", "review_on"},
    "ConsentRecorded": {"consent_id", "recipients", "valid_until"},
    "ConsentWithdrawn": {"consent_id"},
    "CaseTransferred": {"from_district", "to_district", "reason"},
    "CaseClosed": {"reason"},
    "CaseReopened": {"reason"},
    "PersonalDataErased": {"legal_basis", "key_ids"},
    "InvestigationOpened": {"investigation_id", "basis"},
    "InvestigationDecided": {"investigation_id", "decision", "intervention_kinds"},
    "FirstVisitHeld": {"visit_id"},
    "CoordinatedPlanAgreed": {"plan_id", "parties", "lead", "follow_up_on", "consent_id"},
    "CoordinatedPlanFollowedUp": {"plan_id"},
}


def test_every_decided_event_carries_exactly_the_spec_payload_fields() -> None:
    state, seen = d.initial_state(), set()
    commands: list[Command] = [
        register(),
        assess(),
        agree(),
        consent(consent_id=CONSENT),
        withdraw(),
        transfer(),
        close(),
        reopen(),
        d.ErasePersonalData(CASE, NOW, "ERASURE_REQUEST", (OTHER_ID,)),
        d.OpenInvestigation(CASE, NOW, ASSESSMENT, "APPLICATION"),
        d.DecideInvestigation(CASE, NOW, ASSESSMENT, "GRANTED", ("OUTPATIENT",)),
        d.HoldFirstVisit(CASE, NOW, PLAN),
        consent(),
        d.AgreeCoordinatedPlan(
            CASE, NOW, PLAN, ("SOCIAL_SERVICES", "PSYCHIATRY"), "PSYCHIATRY", TODAY, OTHER_ID
        ),
        d.FollowUpCoordinatedPlan(CASE, NOW, PLAN),
    ]
    for cmd in commands:
        for event in d.decide(cmd, state, DISTRICTS):
            assert set(event.data) == SPEC_FIELDS[event.type], event.type
            assert event.occurred_at == cmd.occurred_at
            seen.add(event.type)
            state = d.evolve(state, event)
    assert seen == set(d.EVENT_TYPES) == set(SPEC_FIELDS)


def test_errors_carry_code_and_detail_and_are_domain_errors() -> None:
    for error in (CaseNotFound(), CaseAlreadyExists(), RuleViolation("x-y", "Why.")):
        assert isinstance(error, DomainError) and error.code and error.detail
        assert error.code in str(error)


def test_the_instrument_symbols_are_the_instruments_with_score_rules() -> None:
    assert frozenset(get_args(d.Instrument)) == frozenset(INSTRUMENTS)


def test_the_state_keeps_each_district_a_case_left_and_when() -> None:
    later = T0 + timedelta(days=3)
    state = d.fold(
        [
            registered(),
            transferred("hisingen", "nordost", T0),
            transferred("angered", "hisingen", later),
        ]
    )
    assert state.district == "angered"
    assert state.transfers == (Transfer("nordost", T0), Transfer("hisingen", later))


# --- personal data: age band, archive sample, identity numbers in free text, erasure -----
@pytest.mark.parametrize(
    ("birth_year", "band"),
    [(2008, "18-24"), (2002, "18-24"), (2001, "25-34"), (1962, "55-64"), (1961, "65+")],
)
def test_the_age_band_is_derived_from_the_birth_year_in_the_year_of_intake(
    birth_year: int, band: str
) -> None:
    # NOW is in 2026: born 2002 is 24 that year, 2001 is 25, 1961 is 65.
    (event,) = d.decide(register(birth_year=birth_year), d.initial_state(), DISTRICTS)
    assert event.data["age_band"] == band


def test_an_age_band_without_a_birth_year_is_kept_and_checked() -> None:
    (event,) = d.decide(register(birth_year=None, age_band="35-44"), d.initial_state(), DISTRICTS)
    assert event.data["age_band"] == "35-44" and event.data["birth_year"] is None
    given().when(register(birth_year=None, age_band="40-50")).then_raises(
        RuleViolation, "unknown-age-band"
    )
    given().when(register(birth_year=1975, age_band="18-24")).then_raises(
        RuleViolation, "age-band-mismatch"
    )


def test_the_archive_sample_flag_is_recorded_and_folded() -> None:
    (event,) = d.decide(register(archive_sample=True), d.initial_state(), DISTRICTS)
    assert event.data["archive_sample"] is True
    assert d.fold([event]).archive_sample and not d.fold([registered()]).archive_sample


@pytest.mark.parametrize(
    "goal",
    [
        "Ring 19121212-1212 om bostaden",
        "pnr 191212121212",
        "samordningsnummer 701063-2391",
    ],
)
def test_a_goal_holding_an_identity_number_is_refused_without_echoing_it(goal: str) -> None:
    error = (
        given(*OPEN)
        .when(agree(goals=("Behålla jobbet", goal)))
        .then_raises(RuleViolation, "identity-number-in-free-text")
    )
    assert not any(ch.isdigit() for ch in error.detail)


def test_a_goal_with_numbers_that_fail_the_check_digit_is_accepted() -> None:
    # Ten digits with a wrong Luhn digit, a phone number, a date: not identity numbers.
    goals = ("Ring 19121212-1213 i morgon", "Träffas 2026-05-01", "Telefon 031-123 45 67")
    (event,) = d.decide(agree(goals=goals), d.fold(OPEN), DISTRICTS)
    assert tuple(event.data["goals"]) == goals


def test_erasure_is_recorded_once_per_set_of_keys_and_on_closed_cases_too() -> None:
    erase = d.ErasePersonalData(CASE, NOW, "RETENTION_PERIOD_ENDED", (OTHER_ID,))
    (event,) = d.decide(erase, d.fold(CLOSED), DISTRICTS)
    assert event.type == "PersonalDataErased"
    assert event.data == {"legal_basis": "RETENTION_PERIOD_ENDED", "key_ids": [OTHER_ID]}
    after = d.fold([*CLOSED, event])
    assert after.erased_key_ids == {OTHER_ID} and after.status == "closed"
    assert d.decide(erase, after, DISTRICTS) == []  # already recorded: nothing new
    given().when(erase).then_raises(CaseNotFound, "case-not-found")
    given(*OPEN).when(replace(erase, legal_basis="BORED")).then_raises(
        RuleViolation, "unknown-legal-basis"
    )
