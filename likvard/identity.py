"""Who is asking: the principal a verified token names, and the roles Likvärd knows.

Pure: no token verification here (that is `likvard.oidc`), only what a verified identity
is. The subject is a pseudonymous staff id; one shaped like a Swedish personal or
coordination number is refused, so that no identity number reaches event metadata or the
access log as an actor."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from likvard.pseudonym import InvalidIdentityNumber, normalise


class Role(StrEnum):
    CASE_WORKER = "case-worker"
    UNIT_STAFF = "unit-staff"
    ANALYST = "analyst"
    AUDITOR = "auditor"
    RECORDS_OFFICER = "records-officer"
    OPS = "ops"
    DISTRICT_SYSTEM = "district-system"  # a district's case system (a client, not a person)


ROLES: tuple[Role, ...] = tuple(Role)

# A subject is at most 255 characters of a safe alphabet (Keycloak's are UUIDs, Entra ID's
# base64url object ids).
_SUBJECT = re.compile(r"^[A-Za-z0-9._:@-]{1,255}$")
# 10 or 12 digits, an optional - or + before the last four, anywhere in the subject: a
# candidate. It is an identity number (or a coordination number) if its date and its Luhn
# check digit hold, so "19121212-1212" and "u:191212121212" are refused, while a random
# Keycloak UUID (whose digit runs often have the shape, about 2 in 100) passes unless its
# digits happen to form a real number (about 1 in 7,000 of all UUIDs). A canonical UUID is
# no identity number's shape at all, and IdPs generate them: those always pass.
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_CANDIDATE = re.compile(r"(?=(?<![0-9])(([0-9]{2})?[0-9]{6}[-+]?[0-9]{4})(?![0-9]))")


class InvalidPrincipal(ValueError):
    """A verified token whose claims cannot name a Likvärd principal (the text says which
    claim, never its value)."""


def looks_like_identity_number(text: str) -> bool:
    """True if the text holds a personal or coordination number: ten or twelve digits with
    a valid date and check digit (a canonical UUID never is)."""
    if _UUID.fullmatch(text):
        return False
    for match in _CANDIDATE.finditer(text):
        try:
            normalise(match.group(1))
        except InvalidIdentityNumber:
            continue
        return True
    return False


@dataclass(frozen=True)
class Principal:
    """A signed-in person (or an operator at the command line): the token's subject, its
    Likvärd roles, and the districts and specialist unit they work for."""

    subject: str
    roles: frozenset[Role]
    districts: frozenset[str] = frozenset()
    unit: str | None = None

    def __post_init__(self) -> None:
        if not _SUBJECT.fullmatch(self.subject):
            raise InvalidPrincipal(
                "the token's subject must be 1-255 letters, digits or ._:@- (a staff id)"
            )
        if looks_like_identity_number(self.subject):
            raise InvalidPrincipal(
                "the token's subject is shaped like a personal identity number: Likvärd"
                " takes a pseudonymous staff id as the actor, never a person's number"
            )

    def has(self, role: Role) -> bool:
        return role in self.roles

    @property
    def role_names(self) -> str:
        """The roles as one sorted, comma-separated label (for the access log)."""
        return ",".join(sorted(self.roles))


def principal_from_claims(
    subject: object, roles: object, districts: object, unit: object
) -> Principal:
    """A principal from claim values already picked out of a token: unknown role names are
    ignored (an IdP holds roles of other applications too); districts and unit are codes."""
    if not isinstance(subject, str):
        raise InvalidPrincipal("the token has no subject (sub)")
    names = _strings(roles, "roles")
    known = frozenset(Role(r) for r in names if r in Role._value2member_map_)
    codes = frozenset(d.strip().lower() for d in _strings(districts, "districts") if d.strip())
    if unit is not None and not isinstance(unit, str):
        raise InvalidPrincipal("the token's unit claim must be a string")
    return Principal(subject, known, codes, unit.strip().lower() if unit else None)


def _strings(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # one value, or a space/comma separated list
        return [v for v in re.split(r"[\s,]+", value) if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidPrincipal(f"the token's {what} claim must be a string or a list of strings")
