"""Culling (gallring) as a pure plan: who is past the retention period, who the archive
decision keeps, and the counts a dry run may show (per district and year, never persons).

A person's records are culled when their last entry, in any of their cases, is older than
the retention period (LIKVARD_RETENTION_YEARS, five years by default: social services'
records of adults are culled five years after the last entry), unless the city's archive
decision keeps them (`likvard.archive`). Culling shreds: the person's data keys are
destroyed and every case records `PersonalDataErased`; codes and counts stay."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime

from likvard.domain import local_date


@dataclass(frozen=True)
class Person:
    """What culling needs to know of one person (from the read models)."""

    person: str
    district: str
    last_entry: datetime
    archive_sample: bool
    erased: bool
    """Every case of the person already records an erasure after their last entry."""


@dataclass(frozen=True)
class Plan:
    cull: tuple[str, ...]
    counts: Counter[tuple[str, int]] = field(default_factory=Counter)
    """(district, year of the last entry) -> persons to cull."""
    kept_by_archive: int = 0
    already_culled: int = 0
    within_period: int = 0


def cutoff(today: date, years: int) -> date:
    """The day `years` before today: entries before it are past the period (29 February
    goes to 28 February in a year that has none)."""
    try:
        return today.replace(year=today.year - years)
    except ValueError:
        return today.replace(year=today.year - years, day=28)


def plan(persons: Iterable[Person], today: date, years: int) -> Plan:
    """Who to cull, in a stable order, and why the others stay."""
    limit = cutoff(today, years)
    cull: list[str] = []
    counts: Counter[tuple[str, int]] = Counter()
    kept = done = within = 0
    for p in sorted(persons, key=lambda p: p.person):
        if local_date(p.last_entry) >= limit:
            within += 1
        elif p.archive_sample:
            kept += 1
        elif p.erased:
            done += 1
        else:
            cull.append(p.person)
            counts[(p.district, local_date(p.last_entry).year)] += 1
    return Plan(tuple(cull), counts, kept, done, within)
