"""What every pure decider shares (no I/O): the event shape, refusals, the city's calendar
and the checks every command repeats. Services share this kernel, never each other."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

CITY_TZ = ZoneInfo("Europe/Stockholm")
"""Dates (district validity, review, due and expiry dates) are the city's calendar dates: a
command at 00:30 on 1 January local time belongs to the new year."""


def local_date(moment: datetime) -> date:
    """The city's calendar date at this moment."""
    return moment.astimezone(CITY_TZ).date()


@dataclass(frozen=True)
class DomainEvent:
    """An event as a domain sees it: `data` is the Avro payload (arrays as lists, enums as
    symbols, dates as `date`); the event store adds the metadata."""

    type: str
    data: dict[str, Any]
    occurred_at: datetime


class DomainError(Exception):
    """A refused command: `code` is for machines (kebab-case, stable), `detail` for people.

    The detail never repeats submitted free text, so it cannot leak personal data into
    responses or logs.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class RuleViolation(DomainError):
    """A command that breaks a rule (HTTP 422)."""


def require_symbol(value: str | None, allowed: frozenset[str], code: str, what: str) -> None:
    if value not in allowed:
        raise RuleViolation(code, f"The {what} must be one of " + ", ".join(sorted(allowed)) + ".")


AGE_BANDS: tuple[tuple[int, int | None, str], ...] = (
    (0, 17, "0-17"),
    (18, 24, "18-24"),
    (25, 34, "25-34"),
    (35, 44, "35-44"),
    (45, 54, "45-54"),
    (55, 64, "55-64"),
    (65, None, "65+"),
)
"""The reports' age bands (the open comparisons' breakdown): a code, never the birth year."""


def age_band(birth_year: int | None, year: int) -> str | None:
    """The age band of someone born in `birth_year` in `year` (the age they reach that
    year): the reports need the band, and the birth year itself is sealed."""
    if birth_year is None:
        return None
    age = year - birth_year
    for low, high, code in AGE_BANDS:
        if age >= low and (high is None or age <= high):
            return code
    return None


def require_uuid(value: str, what: str) -> None:
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise RuleViolation("invalid-id", f"The {what} must be a UUID.") from None
