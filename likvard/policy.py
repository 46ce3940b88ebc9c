"""The access policy: who may do what to which resource. One pure function, no I/O.

`allowed(principal, action, resource, now=..., emergency=...)` is what every API, the
console and the command line ask. A handler finds the resource (a case's current district
and its transfers, a referral's unit), asks, and answers 403 on a refusal; the access log
records both. Tested as a table in `tests/test_policy.py`.

The rules (docs/security.md says the same to operators):
- case-worker: registers cases in their districts; reads and changes cases whose current
  district is theirs; after a transfer the sending district keeps read access for
  `FORMER_DISTRICT_READ_DAYS`; an emergency read of any case with a reason code from
  `EMERGENCY_REASONS` is always allowed, and flagged.
- unit-staff: their unit's inbox, and the referrals addressed to their unit (read them,
  accept, decline, start and end interventions); nothing else of the case.
- analyst: aggregate reports only. auditor: read-only history (events, timelines), the
  aggregate reports, the access log, replay and verification.
- records-officer: erasure and retention, nothing else. ops: health, readiness, metrics
  and the API documents.
- district-system: a district's case system asks for pseudonyms (it never holds the
  secret); its records on Kafka are judged by their signatures, not by this policy.

Personal text (a care plan's goals, a birth year), decrypted with the person's data key, is
shown only where the role needs it: `sees_personal_text`. The pseudonym, which links a
person's cases, only to those who link cases: `sees_pseudonym`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from likvard.identity import Principal, Role

FORMER_DISTRICT_READ_DAYS = 30

# Why a case worker read a case outside their district (Swedish social services: an acute
# situation that cannot wait for the case's own district). Fixed codes, never free text.
EMERGENCY_REASONS: dict[str, str] = {
    "risk-to-life-or-health": "Acute risk to the person's life or health",
    "child-at-risk": "A child in the household may be at risk",
    "person-present-urgent": "The person is present and needs help that cannot wait",
    "out-of-hours-duty": "Out-of-hours social services duty (socialjour)",
}


class Action(StrEnum):
    CASE_REGISTER = "case.register"
    CASE_READ = "case.read"
    CASE_HISTORY = "case.history"  # a case's events or timeline
    CASE_CHANGE = "case.change"  # any command on a case, including referring it
    REFERRAL_READ = "referral.read"
    REFERRAL_ANSWER = "referral.answer"  # accept, decline, start and end interventions
    UNIT_INBOX = "unit.inbox"
    FOLLOWUPS_DUE = "followups.due"
    REPORT_READ = "report.read"
    ACCESS_LOG_READ = "access-log.read"
    REPLAY = "history.replay"
    VERIFY = "history.verify"
    RECORDS_MANAGE = "records.manage"  # erasure of a person's data, retention runs
    PSEUDONYMS = "pseudonyms.compute"  # identity numbers in, pseudonyms out
    OPS_READ = "ops.read"


# Actions on one person's record: recorded in the access log when allowed, and when refused.
CASE_LEVEL: frozenset[Action] = frozenset(
    {
        Action.CASE_READ,
        Action.CASE_HISTORY,
        Action.CASE_CHANGE,
        Action.REFERRAL_READ,
        Action.REFERRAL_ANSWER,
        Action.UNIT_INBOX,
        Action.FOLLOWUPS_DUE,
    }
)
# The case-level actions that only read: these an emergency reason may open.
READS: frozenset[Action] = frozenset(
    {
        Action.CASE_READ,
        Action.CASE_HISTORY,
        Action.REFERRAL_READ,
        Action.UNIT_INBOX,
        Action.FOLLOWUPS_DUE,
    }
)


@dataclass(frozen=True)
class Transfer:
    """The case left `from_district` at `at` (a CaseTransferred event)."""

    from_district: str
    at: datetime


@dataclass(frozen=True)
class CaseScope:
    """A case as the policy sees it. `district` None: no such case is known (the handler
    answers 404 to those who could read it)."""

    case_id: str
    district: str | None
    transfers: tuple[Transfer, ...] = ()


@dataclass(frozen=True)
class DistrictScope:
    """Something of one district that is not one case: registering a case there, the
    follow-ups due there."""

    district: str


@dataclass(frozen=True)
class UnitScope:
    unit: str


@dataclass(frozen=True)
class ReferralScope:
    """A referral: the case it is about and the unit it is addressed to."""

    referral_id: str
    case: CaseScope
    unit: str | None


@dataclass(frozen=True)
class SystemScope:
    """Not of any case: a report, the access log, a replay, the metrics. `name` is the
    resource's label in the access log."""

    name: str


Resource = CaseScope | DistrictScope | UnitScope | ReferralScope | SystemScope


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str
    emergency: bool = False

    def __bool__(self) -> bool:
        return self.allow


def _yes(reason: str, emergency: bool = False) -> Decision:
    return Decision(True, reason, emergency)


def _no(reason: str) -> Decision:
    return Decision(False, reason)


# Actions that need no resource beyond the role: who may do them.
_BY_ROLE: dict[Action, frozenset[Role]] = {
    Action.REPORT_READ: frozenset({Role.ANALYST, Role.AUDITOR}),
    Action.ACCESS_LOG_READ: frozenset({Role.AUDITOR}),
    Action.REPLAY: frozenset({Role.AUDITOR}),
    Action.VERIFY: frozenset({Role.AUDITOR}),
    Action.RECORDS_MANAGE: frozenset({Role.RECORDS_OFFICER}),
    Action.PSEUDONYMS: frozenset({Role.DISTRICT_SYSTEM}),
    Action.OPS_READ: frozenset({Role.OPS}),
}


def allowed(
    principal: Principal,
    action: Action,
    resource: Resource,
    *,
    now: datetime,
    emergency: str | None = None,
) -> Decision:
    """May `principal` do `action` to `resource` at `now`? `emergency` is a reason code
    from EMERGENCY_REASONS given with a read outside the worker's district."""
    if emergency is not None and emergency not in EMERGENCY_REASONS:
        return _no("unknown-emergency-reason")
    if action in _BY_ROLE:
        if principal.roles & _BY_ROLE[action]:
            return _yes("role")
        return _no("role-not-allowed")
    match resource:
        case CaseScope():
            return _case(principal, action, resource, now, emergency)
        case DistrictScope(district=district):
            return _district(principal, action, district, emergency)
        case UnitScope(unit=unit):
            if action is Action.UNIT_INBOX and principal.has(Role.UNIT_STAFF):
                return _yes("own-unit") if principal.unit == unit else _no("not-your-unit")
            return _no("role-not-allowed")
        case ReferralScope():
            return _referral(principal, action, resource, now, emergency)
    return _no("no-rule")  # an action on a resource it does not apply to: never allowed


def _case(
    p: Principal, action: Action, case: CaseScope, now: datetime, emergency: str | None
) -> Decision:
    if action is Action.CASE_HISTORY and p.has(Role.AUDITOR):
        return _yes("auditor")
    if action not in (Action.CASE_READ, Action.CASE_HISTORY, Action.CASE_CHANGE):
        return _no("no-rule")
    if not p.has(Role.CASE_WORKER):
        return _no("role-not-allowed")
    if case.district is None:
        return _yes("no-such-case")  # the handler answers 404; nothing of a case is shown
    if case.district in p.districts:
        return _yes("own-district")
    if action is not Action.CASE_CHANGE:
        since = now - timedelta(days=FORMER_DISTRICT_READ_DAYS)
        if any(t.from_district in p.districts and t.at >= since for t in case.transfers):
            return _yes("former-district")
        if emergency is not None:
            return _yes("emergency", emergency=True)
        if any(t.from_district in p.districts for t in case.transfers):
            return _no("former-district-expired")
    return _no("not-your-district")


def _district(p: Principal, action: Action, district: str, emergency: str | None) -> Decision:
    if action not in (Action.CASE_REGISTER, Action.FOLLOWUPS_DUE):
        return _no("no-rule")
    if not p.has(Role.CASE_WORKER):
        return _no("role-not-allowed")
    if district in p.districts:
        return _yes("own-district")
    if action is Action.FOLLOWUPS_DUE and emergency is not None:
        return _yes("emergency", emergency=True)
    return _no("not-your-district")


def _referral(
    p: Principal, action: Action, referral: ReferralScope, now: datetime, emergency: str | None
) -> Decision:
    if action not in (Action.REFERRAL_READ, Action.REFERRAL_ANSWER, Action.CASE_CHANGE):
        return _no("no-rule")
    if p.has(Role.UNIT_STAFF) and action is not Action.CASE_CHANGE:
        if referral.unit is not None and p.unit == referral.unit:
            return _yes("own-unit")
        if not p.has(Role.CASE_WORKER):
            return _no("not-your-unit")
    if action is Action.REFERRAL_ANSWER:
        return _no("role-not-allowed" if not p.has(Role.UNIT_STAFF) else "not-your-unit")
    # The referring side: the case's own district reads the referral and withdraws it.
    as_case = Action.CASE_READ if action is Action.REFERRAL_READ else Action.CASE_CHANGE
    return _case(p, as_case, referral.case, now, emergency)


def sees_personal_text(principal: Principal, action: Action, decision: Decision) -> bool:
    """Whether an allowed read shows the person's decrypted text: a case worker's read of a
    case they may read (their own, a former district's, an emergency), or an auditor's
    history. Aggregates never need it; unit staff see the referral, not the person."""
    if not decision.allow or action not in (Action.CASE_READ, Action.CASE_HISTORY):
        return False
    return principal.has(Role.CASE_WORKER) or (
        action is Action.CASE_HISTORY and principal.has(Role.AUDITOR)
    )


def sees_pseudonym(principal: Principal) -> bool:
    """Whether a response may show the person's pseudonym: only to those who link a
    person's cases (case workers, auditors), never to unit staff or analysts."""
    return bool(principal.roles & {Role.CASE_WORKER, Role.AUDITOR})
