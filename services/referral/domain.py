"""The referral decider: a referral's commands, events and state, with no I/O.

One stream is one referral. `decide(command, state, case=..., catalogue=...)` says which
events a command leads to, or raises a `DomainError`; `evolve(state, event)` folds one event
into the state. Event payloads are exactly the Avro payloads of `schemas/referral/` (without
metadata). What the service knows of the case (district, open or closed, consents in force)
comes from the intake topic; the caller passes it as a `CaseSnapshot`, since services never
import each other.

A referral to a unit outside the city's social services follows Primero's rule: it needs a
consent in force that covers the recipient, or a recorded override with its reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, Literal, Protocol, assert_never, get_args

from likvard.catalogue import Intervention, SpecialistUnit
from likvard.domain import (
    CITY_TZ as CITY_TZ,
    DomainError as DomainError,
    DomainEvent as DomainEvent,
    RuleViolation as RuleViolation,
    local_date as local_date,
    require_symbol,
    require_uuid,
)

# --- Avro enum symbols ---------------------------------------------------------------
RecipientKind = Literal["CITY_SOCIAL_SERVICES", "HEALTHCARE", "PRISON_PROBATION", "NON_PROFIT"]
ConsentOverride = Literal[
    "RISK_TO_LIFE_OR_HEALTH", "LEGAL_DUTY_TO_REPORT", "COURT_OR_AUTHORITY_DECISION", "OTHER"
]
DeclineReason = Literal[
    "LACK_OF_CAPACITY",
    "NOT_THE_RIGHT_INTERVENTION",
    "PERSON_DECLINED",
    "UNABLE_TO_CONTACT",
    "OTHER",
]
WithdrawReason = Literal[
    "NO_LONGER_NEEDED", "PERSON_DECLINED", "REFERRED_ELSEWHERE", "CASE_CLOSED", "OTHER"
]
InterventionOutcome = Literal[
    "COMPLETED_AS_PLANNED", "DROPPED_OUT", "MOVED", "NO_LONGER_NEEDED", "OTHER"
]
ReferralStatus = Literal["unrequested", "requested", "accepted", "declined", "withdrawn"]

CITY_SOCIAL_SERVICES: RecipientKind = "CITY_SOCIAL_SERVICES"
RECIPIENT_KINDS: frozenset[str] = frozenset(get_args(RecipientKind))
CONSENT_OVERRIDES: frozenset[str] = frozenset(get_args(ConsentOverride))
DECLINE_REASONS: frozenset[str] = frozenset(get_args(DeclineReason))
WITHDRAW_REASONS: frozenset[str] = frozenset(get_args(WithdrawReason))
INTERVENTION_OUTCOMES: frozenset[str] = frozenset(get_args(InterventionOutcome))

EVENT_TYPES: tuple[str, ...] = (
    "ReferralRequested",
    "ReferredAcrossDistrict",
    "ReferralAccepted",
    "ReferralDeclined",
    "ReferralWithdrawn",
    "InterventionStarted",
    "InterventionEnded",
)


class CatalogueLookup(Protocol):
    """What the decider needs of `likvard.catalogue.ReferenceCatalogue`."""

    def unit(self, unit_id: str, /) -> SpecialistUnit | None: ...
    def intervention(self, code: str, /) -> Intervention | None: ...


@dataclass(frozen=True)
class CaseSnapshot:
    """What the referral service has seen of a case on the intake topic, built by the
    caller. `consents` holds only the consents in force on the command's day
    (consent_id -> recipients, symbols of se.goteborg.likvard.ConsentRecipient)."""

    case_id: str
    exists: bool
    status: Literal["open", "closed"]
    district: str
    consents: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


# --- errors ----------------------------------------------------------------------------
class CaseNotFound(DomainError):
    """A referral for a case the service has never seen (HTTP 422 "unknown case")."""

    def __init__(self) -> None:
        super().__init__("case-not-found", "No case with this id is known to the service.")


class ReferralNotFound(DomainError):
    """A command on a referral that was never requested (HTTP 404)."""

    def __init__(self) -> None:
        super().__init__("referral-not-found", "No referral has this id.")


class ReferralAlreadyExists(DomainError):
    """A request for a referral id that already has a stream."""

    def __init__(self) -> None:
        super().__init__("referral-already-exists", "A referral with this id already exists.")


# --- commands --------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestReferral:
    referral_id: str
    occurred_at: datetime
    case_id: str
    unit_id: str
    intervention_code: str
    consent_id: str | None = None
    consent_override: str | None = None


@dataclass(frozen=True)
class AcceptReferral:
    referral_id: str
    occurred_at: datetime
    planned_start: date | None = None


@dataclass(frozen=True)
class DeclineReferral:
    referral_id: str
    occurred_at: datetime
    reason: str


@dataclass(frozen=True)
class WithdrawReferral:
    referral_id: str
    occurred_at: datetime
    reason: str


@dataclass(frozen=True)
class StartIntervention:
    referral_id: str
    occurred_at: datetime
    intervention_id: str
    intervention_code: str | None = None
    """None: the referral's intervention code."""


@dataclass(frozen=True)
class EndIntervention:
    referral_id: str
    occurred_at: datetime
    intervention_id: str
    outcome: str


Command = (
    RequestReferral
    | AcceptReferral
    | DeclineReferral
    | WithdrawReferral
    | StartIntervention
    | EndIntervention
)


# --- events and state ------------------------------------------------------------------


@dataclass(frozen=True)
class ReferralState:
    """A referral folded from its events ("unrequested" until its ReferralRequested).

    `running` maps the running intervention (at most one) to when it started; `ended` holds
    the ids of ended ones; `intervention_codes` the code of every intervention started.
    """

    exists: bool = False
    status: ReferralStatus = "unrequested"
    referral_id: str | None = None
    case_id: str | None = None
    unit_id: str | None = None
    intervention_code: str | None = None
    recipient_kind: str | None = None
    person_district: str | None = None
    unit_district: str | None = None
    across_district: bool = False
    running: Mapping[str, datetime] = field(default_factory=dict)
    ended: frozenset[str] = frozenset()
    intervention_codes: Mapping[str, str] = field(default_factory=dict)
    version: int = 0

    @property
    def has_running_intervention(self) -> bool:
        return bool(self.running)


def initial_state() -> ReferralState:
    return ReferralState()


def evolve(state: ReferralState, event: DomainEvent) -> ReferralState:
    """Fold one event. Unknown event types are counted and skipped, so an older reader can
    still fold a stream that a newer producer extended."""
    d = event.data
    new = state
    match event.type:
        case "ReferralRequested":
            new = replace(
                state,
                exists=True,
                status="requested",
                referral_id=d["referral_id"],
                unit_id=d["unit_id"],
                intervention_code=d["intervention_code"],
                recipient_kind=d["recipient_kind"],
                person_district=d["person_district"],
                unit_district=d["unit_district"],
                across_district=d["person_district"] != d["unit_district"],
            )
        case "ReferredAcrossDistrict":
            new = replace(state, across_district=True)
        case "ReferralAccepted":
            new = replace(state, status="accepted")
        case "ReferralDeclined":
            new = replace(state, status="declined")
        case "ReferralWithdrawn":
            new = replace(state, status="withdrawn")
        case "InterventionStarted":
            iid = d["intervention_id"]
            new = replace(
                state,
                running={**state.running, iid: event.occurred_at},
                intervention_codes={**state.intervention_codes, iid: d["intervention_code"]},
            )
        case "InterventionEnded":
            iid = d["intervention_id"]
            new = replace(
                state,
                running={k: v for k, v in state.running.items() if k != iid},
                ended=state.ended | {iid},
            )
    return replace(new, version=state.version + 1)


def fold(events: Iterable[DomainEvent]) -> ReferralState:
    state = initial_state()
    for event in events:
        state = evolve(state, event)
    return state


def fold_with_case(events: Iterable[DomainEvent], case_id: str) -> ReferralState:
    """`fold`, plus the case id the stream belongs to (it is in the events' metadata, not in
    their payloads)."""
    return replace(fold(events), case_id=case_id)


# --- decide ----------------------------------------------------------------------------
def decide(
    command: Command,
    state: ReferralState,
    *,
    case: CaseSnapshot | None,
    catalogue: CatalogueLookup,
) -> list[DomainEvent]:
    """The events this command leads to on this state; raises DomainError if refused.

    `case` is needed only by RequestReferral (None: the service has not seen the case).
    """
    if command.occurred_at.tzinfo is None or command.occurred_at.utcoffset() is None:
        raise RuleViolation("occurred-at-naive", "The time of the command needs a time zone.")
    match command:
        case RequestReferral():
            return _request(command, state, case, catalogue)
        case AcceptReferral():
            return [_event("ReferralAccepted", _accept(command, state), command)]
        case DeclineReferral():
            return [_event("ReferralDeclined", _decline(command, state), command)]
        case WithdrawReferral():
            return [_event("ReferralWithdrawn", _withdraw(command, state), command)]
        case StartIntervention():
            return [_event("InterventionStarted", _start(command, state, catalogue), command)]
        case EndIntervention():
            return [_event("InterventionEnded", _end(command, state), command)]
        case _:
            assert_never(command)


def _event(event_type: str, data: dict[str, Any], command: Command) -> DomainEvent:
    return DomainEvent(event_type, data, command.occurred_at)


def _require_exists(state: ReferralState) -> None:
    if not state.exists:
        raise ReferralNotFound()


def _offered(unit: SpecialistUnit, code: str, catalogue: CatalogueLookup) -> Intervention:
    intervention = catalogue.intervention(code)
    if intervention is None:
        raise RuleViolation(
            "unknown-intervention", "The intervention code is not in the city's catalogue."
        )
    if code not in unit.intervention_codes:
        raise RuleViolation(
            "intervention-not-offered", f"The unit {unit.id} does not offer {code}."
        )
    return intervention


def _request(
    c: RequestReferral,
    state: ReferralState,
    case: CaseSnapshot | None,
    catalogue: CatalogueLookup,
) -> list[DomainEvent]:
    if state.exists:
        raise ReferralAlreadyExists()
    require_uuid(c.referral_id, "referral id")
    if case is None or not case.exists or case.case_id != c.case_id:
        raise CaseNotFound()
    if case.status != "open":
        raise RuleViolation("case-closed", "The case is closed; reopen it first.")
    unit = catalogue.unit(c.unit_id)
    if unit is None:
        raise RuleViolation("unknown-unit", "The unit is not in the city's catalogue.")
    _offered(unit, c.intervention_code, catalogue)
    _check_consent(c, unit, case)
    requested = {
        "referral_id": c.referral_id,
        "unit_id": unit.id,
        "intervention_code": c.intervention_code,
        "person_district": case.district,
        "unit_district": unit.host_district,
        "recipient_kind": unit.recipient_kind,
        "consent_id": c.consent_id,
        "consent_override": c.consent_override,
    }
    events = [_event("ReferralRequested", requested, c)]
    if unit.host_district != case.district:
        across = {
            "referral_id": c.referral_id,
            "unit_id": unit.id,
            "from_district": case.district,
            "to_district": unit.host_district,
        }
        events.append(_event("ReferredAcrossDistrict", across, c))
    return events


def _check_consent(c: RequestReferral, unit: SpecialistUnit, case: CaseSnapshot) -> None:
    """Consent or override, Primero style, for a unit outside the city's social services."""
    if unit.recipient_kind == CITY_SOCIAL_SERVICES:
        if c.consent_id is not None or c.consent_override is not None:
            raise RuleViolation(
                "consent-not-needed",
                "The unit is in the city's social services: no consent or override applies.",
            )
        return
    if c.consent_id is not None and c.consent_override is not None:
        raise RuleViolation(
            "consent-and-override",
            "Give either the consent relied on or the override reason, not both.",
        )
    if c.consent_override is not None:
        require_symbol(
            c.consent_override, CONSENT_OVERRIDES, "unknown-consent-override", "consent override"
        )
        return
    if c.consent_id is None:
        raise RuleViolation(
            "consent-required",
            f"A referral to {unit.recipient_kind} needs the person's consent or an override"
            " with its reason.",
        )
    require_uuid(c.consent_id, "consent id")
    recipients = case.consents.get(c.consent_id)
    if recipients is None:
        raise RuleViolation(
            "consent-not-in-force", "No consent with this id is in force on the case."
        )
    if unit.recipient_kind not in recipients:
        raise RuleViolation(
            "consent-not-covering", f"The consent does not cover {unit.recipient_kind}."
        )


def _accept(c: AcceptReferral, state: ReferralState) -> dict[str, Any]:
    _require_exists(state)
    if state.status != "requested":
        raise RuleViolation(
            "referral-not-requested", f"Only a requested referral can be accepted ({state.status})."
        )
    if c.planned_start is not None and c.planned_start < local_date(c.occurred_at):
        raise RuleViolation(
            "planned-start-in-past", "The planned start may not be before the day of acceptance."
        )
    return {"referral_id": c.referral_id, "planned_start": c.planned_start}


def _decline(c: DeclineReferral, state: ReferralState) -> dict[str, Any]:
    _require_exists(state)
    if state.status != "requested":
        raise RuleViolation(
            "referral-not-requested", f"Only a requested referral can be declined ({state.status})."
        )
    require_symbol(c.reason, DECLINE_REASONS, "unknown-decline-reason", "decline reason")
    return {"referral_id": c.referral_id, "reason": c.reason}


def _withdraw(c: WithdrawReferral, state: ReferralState) -> dict[str, Any]:
    _require_exists(state)
    if state.status not in ("requested", "accepted"):
        raise RuleViolation(
            "referral-not-active",
            f"The referral is already {state.status}; it cannot be withdrawn.",
        )
    if state.has_running_intervention:
        raise RuleViolation(
            "intervention-running", "End the running intervention before withdrawing the referral."
        )
    require_symbol(c.reason, WITHDRAW_REASONS, "unknown-withdraw-reason", "withdraw reason")
    return {"referral_id": c.referral_id, "reason": c.reason}


def _start(
    c: StartIntervention, state: ReferralState, catalogue: CatalogueLookup
) -> dict[str, Any]:
    _require_exists(state)
    if state.status != "accepted":
        raise RuleViolation(
            "referral-not-accepted",
            f"An intervention starts only under an accepted referral ({state.status}).",
        )
    require_uuid(c.intervention_id, "intervention id")
    if c.intervention_id in state.intervention_codes:
        raise RuleViolation(
            "intervention-id-used", "This intervention is already recorded on the referral."
        )
    if state.has_running_intervention:
        raise RuleViolation(
            "intervention-running", "Another intervention is running under this referral."
        )
    assert state.unit_id is not None and state.intervention_code is not None
    code = c.intervention_code if c.intervention_code is not None else state.intervention_code
    unit = catalogue.unit(state.unit_id)
    if unit is None:
        raise RuleViolation("unknown-unit", "The unit is no longer in the city's catalogue.")
    intervention = _offered(unit, code, catalogue)
    # Events are history: only a priority checked against the guideline text is recorded.
    priority = intervention.guideline_priority if intervention.verified else None
    return {
        "intervention_id": c.intervention_id,
        "referral_id": c.referral_id,
        "intervention_code": code,
        "unit_id": unit.id,
        "guideline_priority": priority,
    }


def _end(c: EndIntervention, state: ReferralState) -> dict[str, Any]:
    _require_exists(state)
    started_at = state.running.get(c.intervention_id)
    if started_at is None:
        if c.intervention_id in state.ended:
            raise RuleViolation("intervention-already-ended", "This intervention has ended.")
        raise RuleViolation(
            "intervention-not-found", "No intervention with this id runs under the referral."
        )
    if c.occurred_at < started_at:
        raise RuleViolation(
            "intervention-ends-before-start", "An intervention cannot end before it started."
        )
    require_symbol(c.outcome, INTERVENTION_OUTCOMES, "unknown-outcome", "outcome")
    return {
        "intervention_id": c.intervention_id,
        "referral_id": c.referral_id,
        "intervention_code": state.intervention_codes[c.intervention_id],
        "started_at": started_at,
        "outcome": c.outcome,
    }
