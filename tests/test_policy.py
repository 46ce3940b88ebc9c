"""The access policy as a table: every role x every action x the resource's relation to the
principal (own, other, former and expired district after a transfer, an emergency read).
The expectations are written out here, not derived from likvard/policy.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from likvard.identity import Principal, Role
from likvard.policy import (
    EMERGENCY_REASONS,
    FORMER_DISTRICT_READ_DAYS,
    Action,
    CaseScope,
    DistrictScope,
    ReferralScope,
    Resource,
    SystemScope,
    Transfer,
    UnitScope,
    allowed,
    sees_personal_text,
    sees_pseudonym,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
OWN_DISTRICT, OTHER_DISTRICT = "nordost", "hisingen"
OWN_UNIT, OTHER_UNIT = "beroendeenheten", "familjeenheten"
REASON = "child-at-risk"

PRINCIPALS = {
    Role.CASE_WORKER: Principal("cw-1", frozenset({Role.CASE_WORKER}), frozenset({OWN_DISTRICT})),
    Role.UNIT_STAFF: Principal("us-1", frozenset({Role.UNIT_STAFF}), unit=OWN_UNIT),
    Role.ANALYST: Principal("an-1", frozenset({Role.ANALYST})),
    Role.AUDITOR: Principal("au-1", frozenset({Role.AUDITOR})),
    Role.RECORDS_OFFICER: Principal("ro-1", frozenset({Role.RECORDS_OFFICER})),
    Role.OPS: Principal("ops-1", frozenset({Role.OPS})),
    Role.DISTRICT_SYSTEM: Principal("sys-1", frozenset({Role.DISTRICT_SYSTEM})),
}


def case(scope: str) -> CaseScope:
    """A case in the principal's district, another, or one that left theirs 5 (former) or
    31 (expired) days ago."""
    if scope == "own":
        return CaseScope("c", OWN_DISTRICT)
    days = {"former": 5, "expired": FORMER_DISTRICT_READ_DAYS + 1}.get(scope)
    if days is None:  # other, emergency
        return CaseScope("c", OTHER_DISTRICT)
    return CaseScope("c", OTHER_DISTRICT, (Transfer(OWN_DISTRICT, NOW - timedelta(days=days)),))


def referral(scope: str) -> ReferralScope:
    """Own: about a case of the principal's district and addressed to their unit."""
    return ReferralScope("r", case(scope), OWN_UNIT if scope == "own" else OTHER_UNIT)


CASE_SCOPES = ("own", "other", "former", "expired", "emergency")
PLACE_SCOPES = ("own", "other", "emergency")
RESOURCES: dict[Action, tuple[tuple[str, ...], Callable[[str], Resource]]] = {
    Action.CASE_REGISTER: (
        PLACE_SCOPES,
        lambda s: DistrictScope(OWN_DISTRICT if s == "own" else OTHER_DISTRICT),
    ),
    Action.CASE_READ: (CASE_SCOPES, case),
    Action.CASE_HISTORY: (CASE_SCOPES, case),
    Action.CASE_CHANGE: (CASE_SCOPES, case),
    Action.REFERRAL_READ: (CASE_SCOPES, referral),
    Action.REFERRAL_ANSWER: (CASE_SCOPES, referral),
    Action.UNIT_INBOX: (PLACE_SCOPES, lambda s: UnitScope(OWN_UNIT if s == "own" else OTHER_UNIT)),
    Action.FOLLOWUPS_DUE: (
        PLACE_SCOPES,
        lambda s: DistrictScope(OWN_DISTRICT if s == "own" else OTHER_DISTRICT),
    ),
    **{
        a: (("any",), lambda s: SystemScope("system"))
        for a in (
            Action.REPORT_READ,
            Action.ACCESS_LOG_READ,
            Action.REPLAY,
            Action.VERIFY,
            Action.RECORDS_MANAGE,
            Action.PSEUDONYMS,
            Action.OPS_READ,
        )
    },
}

CW, US, AN, AU, RO, OPS, SYS = (
    Role.CASE_WORKER,
    Role.UNIT_STAFF,
    Role.ANALYST,
    Role.AUDITOR,
    Role.RECORDS_OFFICER,
    Role.OPS,
    Role.DISTRICT_SYSTEM,
)
READ_OF_A_CASE = {"own", "former", "emergency"}
# (role, action) -> the scopes allowed; every other cell is refused.
EXPECTED: dict[tuple[Role, Action], set[str]] = {
    (CW, Action.CASE_REGISTER): {"own"},
    (CW, Action.CASE_READ): READ_OF_A_CASE,
    (CW, Action.CASE_HISTORY): READ_OF_A_CASE,
    (CW, Action.CASE_CHANGE): {"own"},
    (CW, Action.REFERRAL_READ): READ_OF_A_CASE,
    (CW, Action.FOLLOWUPS_DUE): {"own", "emergency"},
    (US, Action.REFERRAL_READ): {"own"},
    (US, Action.REFERRAL_ANSWER): {"own"},
    (US, Action.UNIT_INBOX): {"own"},
    (AN, Action.REPORT_READ): {"any"},
    (AU, Action.REPORT_READ): {"any"},
    (AU, Action.ACCESS_LOG_READ): {"any"},
    (AU, Action.REPLAY): {"any"},
    (AU, Action.VERIFY): {"any"},
    (AU, Action.CASE_HISTORY): set(CASE_SCOPES),  # timelines of any case, read-only
    (RO, Action.RECORDS_MANAGE): {"any"},
    (OPS, Action.OPS_READ): {"any"},
    (SYS, Action.PSEUDONYMS): {"any"},
}

CELLS = [
    (role, action, scope) for role in Role for action in Action for scope in RESOURCES[action][0]
]


def test_every_action_has_resources_in_the_table() -> None:
    assert set(RESOURCES) == set(Action)
    assert len(CELLS) == len(Role) * (8 * 5 - 2 * 3 + 7)  # 7 roles x 41 cells


@pytest.mark.parametrize(("role", "action", "scope"), CELLS)
def test_the_policy_table(role: Role, action: Action, scope: str) -> None:
    resource = RESOURCES[action][1](scope)
    emergency = REASON if scope == "emergency" else None
    decision = allowed(PRINCIPALS[role], action, resource, now=NOW, emergency=emergency)
    expected = scope in EXPECTED.get((role, action), set())
    assert decision.allow is expected, decision
    # Flagged exactly when the emergency reason is what opened it.
    assert decision.emergency is (
        expected and emergency is not None and role is CW and action is not Action.CASE_CHANGE
    )


def test_the_former_district_reads_up_to_30_days_and_not_a_moment_after() -> None:
    worker = PRINCIPALS[CW]
    moved = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    scope = CaseScope("c", OTHER_DISTRICT, (Transfer(OWN_DISTRICT, moved),))
    limit = moved + timedelta(days=FORMER_DISTRICT_READ_DAYS)
    assert allowed(worker, Action.CASE_READ, scope, now=limit).reason == "former-district"
    late = allowed(worker, Action.CASE_READ, scope, now=limit + timedelta(seconds=1))
    assert (late.allow, late.reason) == (False, "former-district-expired")
    assert not allowed(worker, Action.CASE_CHANGE, scope, now=moved)


def test_a_case_that_came_back_is_the_districts_own_again() -> None:
    back = CaseScope(
        "c",
        OWN_DISTRICT,
        (
            Transfer(OWN_DISTRICT, NOW - timedelta(days=90)),
            Transfer(OTHER_DISTRICT, NOW - timedelta(days=60)),
        ),
    )
    decision = allowed(PRINCIPALS[CW], Action.CASE_CHANGE, back, now=NOW)
    assert (decision.allow, decision.reason) == (True, "own-district")


def test_an_emergency_needs_a_reason_from_the_fixed_list() -> None:
    worker = PRINCIPALS[CW]
    for reason in EMERGENCY_REASONS:
        d = allowed(worker, Action.CASE_READ, case("other"), now=NOW, emergency=reason)
        assert d.allow and d.emergency and d.reason == "emergency"
    made_up = allowed(worker, Action.CASE_READ, case("other"), now=NOW, emergency="curious")
    assert (made_up.allow, made_up.reason) == (False, "unknown-emergency-reason")
    # In their own district the reason changes nothing: no flag.
    own = allowed(worker, Action.CASE_READ, case("own"), now=NOW, emergency=REASON)
    assert own.allow and not own.emergency


def test_an_unknown_case_is_allowed_to_case_workers_only_so_they_get_404() -> None:
    unknown = CaseScope("c", None)
    assert allowed(PRINCIPALS[CW], Action.CASE_READ, unknown, now=NOW)
    assert allowed(PRINCIPALS[CW], Action.CASE_CHANGE, unknown, now=NOW)
    assert not allowed(PRINCIPALS[AN], Action.CASE_READ, unknown, now=NOW)
    assert not allowed(PRINCIPALS[US], Action.CASE_READ, unknown, now=NOW)


def test_several_roles_and_districts_add_up() -> None:
    both = Principal(
        "x-1",
        frozenset({Role.CASE_WORKER, Role.ANALYST}),
        frozenset({OWN_DISTRICT, OTHER_DISTRICT}),
    )
    assert allowed(both, Action.CASE_CHANGE, case("other"), now=NOW).reason == "own-district"
    assert allowed(both, Action.REPORT_READ, SystemScope("report"), now=NOW)
    assert not allowed(both, Action.ACCESS_LOG_READ, SystemScope("access-log"), now=NOW)


def test_a_worker_with_a_unit_answers_referrals_only_as_unit_staff() -> None:
    worker_with_unit = Principal(
        "cw-2", frozenset({Role.CASE_WORKER}), frozenset({OWN_DISTRICT}), unit=OWN_UNIT
    )
    assert not allowed(worker_with_unit, Action.REFERRAL_ANSWER, referral("own"), now=NOW)
    assert not allowed(worker_with_unit, Action.UNIT_INBOX, UnitScope(OWN_UNIT), now=NOW)


# Who sees the decrypted text: (role, action) pairs whose allowed reads show it.
SEES_TEXT = {(CW, Action.CASE_READ), (CW, Action.CASE_HISTORY), (AU, Action.CASE_HISTORY)}


@pytest.mark.parametrize(("role", "action", "scope"), CELLS)
def test_personal_text_only_on_allowed_reads_that_need_it(
    role: Role, action: Action, scope: str
) -> None:
    resource = RESOURCES[action][1](scope)
    emergency = REASON if scope == "emergency" else None
    decision = allowed(PRINCIPALS[role], action, resource, now=NOW, emergency=emergency)
    expected = decision.allow and (role, action) in SEES_TEXT
    assert sees_personal_text(PRINCIPALS[role], action, decision) is expected


@pytest.mark.parametrize("role", list(Role))
def test_the_pseudonym_only_to_those_who_link_cases(role: Role) -> None:
    assert sees_pseudonym(PRINCIPALS[role]) is (role in (CW, AU))
