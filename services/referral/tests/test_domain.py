"""The referral decider: given these events, when this command, then these events (no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from likvard.catalogue import CatalogueError, Intervention, ReferenceCatalogue, SpecialistUnit
from likvard.districts import District, DistrictRegistry
from services.referral import domain as d
from services.referral.domain import (
    AcceptReferral,
    CaseNotFound,
    CaseSnapshot,
    Command,
    DeclineReferral,
    DomainError,
    DomainEvent,
    EndIntervention,
    ReferralAlreadyExists,
    ReferralNotFound,
    RequestReferral,
    RuleViolation,
    StartIntervention,
    WithdrawReferral,
)

CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
REFERRAL = "7a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
CONSENT = "2d9a6b8c-3e4f-4051-8c2d-2e3f4a5b6c7d"
INTERVENTION = "8b3c4d5e-6f70-4b2c-9d3e-4f5a6b7c8d9e"
SECOND = "9c4d5e6f-7081-4c3d-8e4f-5a6b7c8d9e0f"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=7)
TODAY = date(2026, 3, 9)


def _district(code: str) -> District:
    return District(code, code.title(), date(2021, 1, 1), None, "social-services-area", None, True)


DISTRICTS = DistrictRegistry(_district(c) for c in ("nordost", "centrum", "sydvast", "hisingen"))


def _intervention(code: str, priority: int | None, verified: bool) -> Intervention:
    return Intervention(code, code, "psychosocial", frozenset({"ALCOHOL"}), priority, verified, "")


CATALOGUE = ReferenceCatalogue(
    [
        _intervention("acamprosate", 1, True),
        _intervention("relapse-prevention-alcohol", 2, True),
        _intervention("relapse-prevention-cannabis", 3, False),
        _intervention("craft", None, False),
    ],
    [
        SpecialistUnit(
            "nordost-team",
            "Nordost",
            "nordost",
            "CITY_SOCIAL_SERVICES",
            frozenset({"relapse-prevention-alcohol", "relapse-prevention-cannabis"}),
        ),
        SpecialistUnit(
            "centrum-team", "Centrum", "centrum", "CITY_SOCIAL_SERVICES", frozenset({"craft"})
        ),
        SpecialistUnit(
            "region",
            "Region",
            "centrum",
            "HEALTHCARE",
            frozenset({"acamprosate", "relapse-prevention-alcohol"}),
        ),
        SpecialistUnit("frivard", "Frivård", "hisingen", "PRISON_PROBATION", frozenset({"craft"})),
        SpecialistUnit(
            "ideell", "Ideell", "nordost", "NON_PROFIT", frozenset({"relapse-prevention-alcohol"})
        ),
    ],
    DISTRICTS,
    date(2026, 3, 9),
)

OPEN_CASE = CaseSnapshot(CASE, True, "open", "nordost", {CONSENT: ("HEALTHCARE", "NON_PROFIT")})


# --- events ---------------------------------------------------------------------------
def requested(at: datetime = T0, **data: Any) -> DomainEvent:
    payload = {
        "referral_id": REFERRAL,
        "unit_id": "nordost-team",
        "intervention_code": "relapse-prevention-alcohol",
        "person_district": "nordost",
        "unit_district": "nordost",
        "recipient_kind": "CITY_SOCIAL_SERVICES",
        "consent_id": None,
        "consent_override": None,
    }
    return DomainEvent("ReferralRequested", {**payload, **data}, at)


def across(unit_id: str, frm: str, to: str, at: datetime = T0) -> DomainEvent:
    return DomainEvent(
        "ReferredAcrossDistrict",
        {"referral_id": REFERRAL, "unit_id": unit_id, "from_district": frm, "to_district": to},
        at,
    )


def accepted(planned_start: date | None = None, at: datetime = T0) -> DomainEvent:
    return DomainEvent(
        "ReferralAccepted", {"referral_id": REFERRAL, "planned_start": planned_start}, at
    )


def declined(reason: str = "LACK_OF_CAPACITY", at: datetime = T0) -> DomainEvent:
    return DomainEvent("ReferralDeclined", {"referral_id": REFERRAL, "reason": reason}, at)


def withdrawn(reason: str = "NO_LONGER_NEEDED", at: datetime = T0) -> DomainEvent:
    return DomainEvent("ReferralWithdrawn", {"referral_id": REFERRAL, "reason": reason}, at)


def started(
    intervention_id: str = INTERVENTION,
    code: str = "relapse-prevention-alcohol",
    unit_id: str = "nordost-team",
    priority: int | None = 2,
    at: datetime = T0,
) -> DomainEvent:
    return DomainEvent(
        "InterventionStarted",
        {
            "intervention_id": intervention_id,
            "referral_id": REFERRAL,
            "intervention_code": code,
            "unit_id": unit_id,
            "guideline_priority": priority,
        },
        at,
    )


def ended(
    intervention_id: str = INTERVENTION,
    code: str = "relapse-prevention-alcohol",
    started_at: datetime = T0,
    outcome: str = "COMPLETED_AS_PLANNED",
    at: datetime = NOW,
) -> DomainEvent:
    return DomainEvent(
        "InterventionEnded",
        {
            "intervention_id": intervention_id,
            "referral_id": REFERRAL,
            "intervention_code": code,
            "started_at": started_at,
            "outcome": outcome,
        },
        at,
    )


# --- commands with sensible defaults ---------------------------------------------------
def request(**kw: Any) -> RequestReferral:
    base = RequestReferral(
        referral_id=REFERRAL,
        occurred_at=NOW,
        case_id=CASE,
        unit_id="nordost-team",
        intervention_code="relapse-prevention-alcohol",
        consent_id=None,
        consent_override=None,
    )
    return replace(base, **kw)


def accept(planned_start: date | None = None, at: datetime = NOW) -> AcceptReferral:
    return AcceptReferral(referral_id=REFERRAL, occurred_at=at, planned_start=planned_start)


def decline(reason: str = "LACK_OF_CAPACITY") -> DeclineReferral:
    return DeclineReferral(referral_id=REFERRAL, occurred_at=NOW, reason=reason)


def withdraw(reason: str = "NO_LONGER_NEEDED") -> WithdrawReferral:
    return WithdrawReferral(referral_id=REFERRAL, occurred_at=NOW, reason=reason)


def start(
    intervention_id: str = INTERVENTION, code: str | None = None, at: datetime = NOW
) -> StartIntervention:
    return StartIntervention(
        referral_id=REFERRAL,
        occurred_at=at,
        intervention_id=intervention_id,
        intervention_code=code,
    )


def end(
    intervention_id: str = INTERVENTION, outcome: str = "COMPLETED_AS_PLANNED", at: datetime = NOW
) -> EndIntervention:
    return EndIntervention(
        referral_id=REFERRAL, occurred_at=at, intervention_id=intervention_id, outcome=outcome
    )


# --- given / when / then ---------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    history: tuple[DomainEvent, ...]
    case: CaseSnapshot | None = field(default=OPEN_CASE)
    command: Command | None = None

    def with_case(self, case: CaseSnapshot | None) -> Scenario:
        return replace(self, case=case)

    def when(self, command: Command) -> Scenario:
        return replace(self, command=command)

    def _decide(self) -> list[DomainEvent]:
        assert self.command is not None, "when(command) first"
        return d.decide(self.command, d.fold(self.history), case=self.case, catalogue=CATALOGUE)

    def then(self, *expected: DomainEvent) -> None:
        assert self._decide() == list(expected)

    def then_raises(self, error: type[DomainError], code: str) -> DomainError:
        with pytest.raises(error) as info:
            self._decide()
        assert info.value.code == code
        assert info.value.detail
        return info.value


def given(*events: DomainEvent) -> Scenario:
    return Scenario(events)


def case(**kw: Any) -> CaseSnapshot:
    return replace(OPEN_CASE, **kw)


REQUESTED = (requested(),)
ACCEPTED = (requested(), accepted())
RUNNING = (requested(), accepted(), started())
AFTER_ONE = (requested(), accepted(), started(), ended())
DECLINED = (requested(), declined())
WITHDRAWN = (requested(), withdrawn())


# --- request ---------------------------------------------------------------------------
def test_request_in_the_same_district_emits_only_referral_requested() -> None:
    given().when(request()).then(requested(at=NOW))


def test_request_across_districts_emits_both_events_naming_both_districts() -> None:
    given().when(request(unit_id="centrum-team", intervention_code="craft")).then(
        requested(
            at=NOW,
            unit_id="centrum-team",
            intervention_code="craft",
            unit_district="centrum",
        ),
        across("centrum-team", "nordost", "centrum", at=NOW),
    )


def test_across_district_follows_the_cases_current_district() -> None:
    given().with_case(case(district="centrum")).when(
        request(unit_id="centrum-team", intervention_code="craft")
    ).then(
        requested(
            at=NOW,
            unit_id="centrum-team",
            intervention_code="craft",
            person_district="centrum",
            unit_district="centrum",
        )
    )


def test_request_on_an_existing_referral_is_refused() -> None:
    given(*REQUESTED).when(request()).then_raises(ReferralAlreadyExists, "referral-already-exists")


def test_request_for_an_unknown_case_is_refused() -> None:
    given().with_case(None).when(request()).then_raises(CaseNotFound, "case-not-found")
    given().with_case(case(exists=False)).when(request()).then_raises(
        CaseNotFound, "case-not-found"
    )
    given().with_case(case(case_id="another")).when(request()).then_raises(
        CaseNotFound, "case-not-found"
    )


def test_request_on_a_closed_case_is_refused() -> None:
    given().with_case(case(status="closed")).when(request()).then_raises(
        RuleViolation, "case-closed"
    )


def test_request_needs_a_uuid_referral_id() -> None:
    given().when(request(referral_id="r-1")).then_raises(RuleViolation, "invalid-id")


def test_request_needs_a_known_unit() -> None:
    given().when(request(unit_id="atlantis")).then_raises(RuleViolation, "unknown-unit")


def test_request_needs_a_known_intervention_the_unit_offers() -> None:
    given().when(request(intervention_code="homeopathy")).then_raises(
        RuleViolation, "unknown-intervention"
    )
    given().when(request(intervention_code="acamprosate")).then_raises(
        RuleViolation, "intervention-not-offered"
    )


# --- consent ---------------------------------------------------------------------------
def test_request_outside_social_services_with_a_covering_consent() -> None:
    given().when(
        request(unit_id="region", intervention_code="acamprosate", consent_id=CONSENT)
    ).then(
        requested(
            at=NOW,
            unit_id="region",
            intervention_code="acamprosate",
            unit_district="centrum",
            recipient_kind="HEALTHCARE",
            consent_id=CONSENT,
        ),
        across("region", "nordost", "centrum", at=NOW),
    )


def test_request_outside_social_services_without_consent_or_override_is_refused() -> None:
    for unit_id, code in (("region", "acamprosate"), ("frivard", "craft"), ("ideell", None)):
        cmd = request(unit_id=unit_id, intervention_code=code or "relapse-prevention-alcohol")
        err = given().when(cmd).then_raises(RuleViolation, "consent-required")
        assert CATALOGUE.unit(unit_id) is not None
        assert err.detail


def test_a_consent_not_covering_the_recipient_is_refused() -> None:
    given().when(
        request(unit_id="frivard", intervention_code="craft", consent_id=CONSENT)
    ).then_raises(RuleViolation, "consent-not-covering")


def test_a_consent_not_in_force_is_refused() -> None:
    cmd = request(unit_id="region", intervention_code="acamprosate", consent_id=CONSENT)
    given().with_case(case(consents={})).when(cmd).then_raises(
        RuleViolation, "consent-not-in-force"
    )
    given().when(replace(cmd, consent_id="not-a-uuid")).then_raises(RuleViolation, "invalid-id")


def test_an_override_with_its_reason_is_accepted_and_recorded() -> None:
    given().with_case(case(consents={})).when(
        request(
            unit_id="frivard", intervention_code="craft", consent_override="LEGAL_DUTY_TO_REPORT"
        )
    ).then(
        requested(
            at=NOW,
            unit_id="frivard",
            intervention_code="craft",
            unit_district="hisingen",
            recipient_kind="PRISON_PROBATION",
            consent_override="LEGAL_DUTY_TO_REPORT",
        ),
        across("frivard", "nordost", "hisingen", at=NOW),
    )


def test_a_non_profit_in_the_same_district_with_consent_emits_only_the_request() -> None:
    given().when(request(unit_id="ideell", consent_id=CONSENT)).then(
        requested(at=NOW, unit_id="ideell", recipient_kind="NON_PROFIT", consent_id=CONSENT)
    )


def test_an_unknown_override_reason_is_refused() -> None:
    given().when(
        request(unit_id="region", intervention_code="acamprosate", consent_override="HUNCH")
    ).then_raises(RuleViolation, "unknown-consent-override")


def test_consent_and_override_together_are_refused() -> None:
    given().when(
        request(
            unit_id="region",
            intervention_code="acamprosate",
            consent_id=CONSENT,
            consent_override="OTHER",
        )
    ).then_raises(RuleViolation, "consent-and-override")


@pytest.mark.parametrize(
    "kw", [{"consent_id": CONSENT}, {"consent_override": "RISK_TO_LIFE_OR_HEALTH"}]
)
def test_within_social_services_no_consent_or_override_applies(kw: dict[str, Any]) -> None:
    given().when(request(**kw)).then_raises(RuleViolation, "consent-not-needed")


# --- accept, decline, withdraw ---------------------------------------------------------
def test_accept_with_and_without_a_planned_start() -> None:
    given(*REQUESTED).when(accept()).then(accepted(at=NOW))
    given(*REQUESTED).when(accept(date(2026, 3, 9))).then(accepted(date(2026, 3, 9), at=NOW))


def test_planned_start_may_not_be_before_the_day_of_acceptance() -> None:
    given(*REQUESTED).when(accept(date(2026, 3, 8))).then_raises(
        RuleViolation, "planned-start-in-past"
    )


@pytest.mark.parametrize(
    "reason",
    [
        "LACK_OF_CAPACITY",
        "NOT_THE_RIGHT_INTERVENTION",
        "PERSON_DECLINED",
        "UNABLE_TO_CONTACT",
        "OTHER",
    ],
)
def test_decline_with_each_reason(reason: str) -> None:
    given(*REQUESTED).when(decline(reason)).then(declined(reason, at=NOW))


def test_decline_needs_a_known_reason() -> None:
    given(*REQUESTED).when(decline("BUSY")).then_raises(RuleViolation, "unknown-decline-reason")


@pytest.mark.parametrize("history", [REQUESTED, ACCEPTED, AFTER_ONE])
def test_withdraw_while_requested_or_accepted_with_nothing_running(
    history: tuple[DomainEvent, ...],
) -> None:
    given(*history).when(withdraw("REFERRED_ELSEWHERE")).then(
        withdrawn("REFERRED_ELSEWHERE", at=NOW)
    )


def test_withdraw_needs_a_known_reason() -> None:
    given(*REQUESTED).when(withdraw("BORED")).then_raises(RuleViolation, "unknown-withdraw-reason")


# --- interventions ---------------------------------------------------------------------
def test_start_uses_the_referrals_code_and_records_its_verified_priority() -> None:
    given(*ACCEPTED).when(start()).then(started(at=NOW))


def test_start_with_another_code_the_unit_offers() -> None:
    given(*ACCEPTED).when(start(code="relapse-prevention-cannabis")).then(
        started(code="relapse-prevention-cannabis", priority=None, at=NOW)
    )


def test_an_unverified_priority_is_not_recorded() -> None:
    history = (
        requested(unit_id="centrum-team", intervention_code="craft", unit_district="centrum"),
        across("centrum-team", "nordost", "centrum"),
        accepted(),
    )
    given(*history).when(start()).then(
        started(code="craft", unit_id="centrum-team", priority=None, at=NOW)
    )


def test_start_needs_a_known_code_the_unit_offers() -> None:
    given(*ACCEPTED).when(start(code="homeopathy")).then_raises(
        RuleViolation, "unknown-intervention"
    )
    given(*ACCEPTED).when(start(code="acamprosate")).then_raises(
        RuleViolation, "intervention-not-offered"
    )


def test_start_needs_a_uuid_never_used_on_the_referral() -> None:
    given(*ACCEPTED).when(start("i-1")).then_raises(RuleViolation, "invalid-id")
    given(*AFTER_ONE).when(start()).then_raises(RuleViolation, "intervention-id-used")


def test_only_one_intervention_runs_at_a_time() -> None:
    given(*RUNNING).when(start(SECOND)).then_raises(RuleViolation, "intervention-running")


def test_interventions_may_follow_one_another() -> None:
    given(*AFTER_ONE).when(start(SECOND)).then(started(SECOND, at=NOW))


def test_end_a_running_intervention_names_its_code_and_start() -> None:
    given(*RUNNING).when(end(outcome="DROPPED_OUT")).then(ended(outcome="DROPPED_OUT"))


def test_end_the_second_intervention_after_the_first() -> None:
    at = NOW + timedelta(days=1)
    given(*AFTER_ONE, started(SECOND, at=NOW)).when(end(SECOND, at=at)).then(
        ended(SECOND, started_at=NOW, at=at)
    )


def test_end_needs_a_running_intervention() -> None:
    given(*ACCEPTED).when(end()).then_raises(RuleViolation, "intervention-not-found")
    given(*RUNNING).when(end(SECOND)).then_raises(RuleViolation, "intervention-not-found")
    given(*AFTER_ONE).when(end()).then_raises(RuleViolation, "intervention-already-ended")


def test_end_may_not_be_before_the_start_and_needs_a_known_outcome() -> None:
    given(*RUNNING).when(end(at=T0 - timedelta(seconds=1))).then_raises(
        RuleViolation, "intervention-ends-before-start"
    )
    given(*RUNNING).when(end(at=T0)).then(ended(at=T0))
    given(*RUNNING).when(end(outcome="CURED")).then_raises(RuleViolation, "unknown-outcome")


# --- illegal transitions ---------------------------------------------------------------
@pytest.mark.parametrize(
    "command", [accept(), decline(), withdraw(), start(), end()], ids=lambda c: type(c).__name__
)
def test_commands_on_a_referral_never_requested_are_refused(command: Command) -> None:
    given().when(command).then_raises(ReferralNotFound, "referral-not-found")


@pytest.mark.parametrize(
    ("history", "command", "code"),
    [
        (ACCEPTED, accept(), "referral-not-requested"),
        (DECLINED, accept(), "referral-not-requested"),
        (WITHDRAWN, accept(), "referral-not-requested"),
        (ACCEPTED, decline(), "referral-not-requested"),
        (DECLINED, decline(), "referral-not-requested"),
        (WITHDRAWN, decline(), "referral-not-requested"),
        (RUNNING, decline(), "referral-not-requested"),
        (DECLINED, withdraw(), "referral-not-active"),
        (WITHDRAWN, withdraw(), "referral-not-active"),
        (RUNNING, withdraw(), "intervention-running"),
        (REQUESTED, start(), "referral-not-accepted"),
        (DECLINED, start(), "referral-not-accepted"),
        (WITHDRAWN, start(), "referral-not-accepted"),
        (REQUESTED, end(), "intervention-not-found"),
        (DECLINED, end(), "intervention-not-found"),
        ((*AFTER_ONE, withdrawn()), start(SECOND), "referral-not-accepted"),
    ],
)
def test_illegal_transitions_are_refused(
    history: tuple[DomainEvent, ...], command: Command, code: str
) -> None:
    given(*history).when(command).then_raises(RuleViolation, code)


def test_a_command_without_time_zone_is_refused() -> None:
    naive = NOW.replace(tzinfo=None)
    given().when(request(occurred_at=naive)).then_raises(RuleViolation, "occurred-at-naive")
    given(*REQUESTED).when(accept(at=naive)).then_raises(RuleViolation, "occurred-at-naive")


# --- state -----------------------------------------------------------------------------
def test_initial_state_is_no_referral() -> None:
    state = d.initial_state()
    assert (state.exists, state.status, state.version) == (False, "unrequested", 0)


def test_state_after_the_whole_life_of_a_referral() -> None:
    history = (
        requested(unit_id="centrum-team", intervention_code="craft", unit_district="centrum"),
        across("centrum-team", "nordost", "centrum"),
        accepted(),
        started(code="craft", unit_id="centrum-team", priority=None),
        ended(code="craft"),
        started(SECOND, code="craft", unit_id="centrum-team", priority=None, at=NOW),
    )
    state = d.fold_with_case(history, CASE)
    assert state.exists and state.status == "accepted"
    assert (state.case_id, state.unit_id, state.intervention_code) == (
        CASE,
        "centrum-team",
        "craft",
    )
    assert (state.person_district, state.unit_district, state.across_district) == (
        "nordost",
        "centrum",
        True,
    )
    assert state.running == {SECOND: NOW}
    assert state.ended == frozenset({INTERVENTION})
    assert state.version == 6


def test_same_district_referral_is_not_across() -> None:
    assert not d.fold(REQUESTED).across_district


def test_version_counts_every_event_folded_even_unknown_types() -> None:
    state = d.fold((*REQUESTED, DomainEvent("SomethingNew", {}, T0)))
    assert state.version == 2 and state.status == "requested"


def test_event_types_are_the_referral_schemas() -> None:
    from likvard.codec import Catalogue

    assert set(d.EVENT_TYPES) <= set(Catalogue.load().event_types())


# --- the shipped catalogue --------------------------------------------------------------
def test_the_shipped_catalogue_loads_and_states_the_verified_priorities() -> None:
    catalogue = ReferenceCatalogue.load(on=date(2026, 3, 9))
    verified = {i.code: i.guideline_priority for i in catalogue.interventions() if i.verified}
    assert verified == {
        "disulfiram": 1,
        "acamprosate": 1,
        "naltrexone": 1,
        "nalmefene": 4,
        "relapse-prevention-alcohol": 2,
    }
    kinds = {u.recipient_kind for u in catalogue.units()}
    assert kinds == {"CITY_SOCIAL_SERVICES", "HEALTHCARE", "PRISON_PROBATION", "NON_PROFIT"}
    for i in catalogue.interventions():
        assert i.verified or "to be verified against the guideline text" in i.note


def _write(tmp_path: Path, units: list[dict[str, Any]]) -> Path:
    path = tmp_path / "units.json"
    path.write_text(json.dumps({"units": units}), encoding="utf-8")
    return path


UNIT = {
    "id": "x",
    "name": "X",
    "host_district": "nordost",
    "recipient_kind": "HEALTHCARE",
    "intervention_codes": ["acamprosate"],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host_district": "angered"}, "not a district in operation"),
        ({"host_district": "atlantis"}, "not a district in operation"),
        ({"intervention_codes": ["acamprosate", "homeopathy"]}, "unknown intervention codes"),
        ({"recipient_kind": "POLICE"}, "unknown recipient kind"),
    ],
)
def test_loading_refuses_units_the_catalogue_contradicts(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(CatalogueError, match=message):
        ReferenceCatalogue.load(units_path=_write(tmp_path, [{**UNIT, **change}]), on=TODAY)


def test_loading_refuses_duplicate_units_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="listed twice"):
        ReferenceCatalogue.load(units_path=_write(tmp_path, [UNIT, UNIT]), on=TODAY)
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(CatalogueError, match="malformed"):
        ReferenceCatalogue.load(units_path=bad, on=TODAY)
    ReferenceCatalogue.load(units_path=_write(tmp_path, [UNIT]), on=TODAY)
