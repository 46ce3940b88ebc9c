"""Culling's plan and the archive decision (pure): who is past the period, who is kept."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from likvard.archive import in_archive_sample
from likvard.pseudonym import InvalidIdentityNumber, luhn_check_digit
from likvard.retention import Person, cutoff, plan

TODAY = date(2032, 6, 1)


def number(born: str, serial: str = "238") -> str:
    """A valid identity number YYYYMMDD-NNNC for a date (Luhn digit computed)."""
    nine = born[2:] + serial
    return f"{born}-{serial}{luhn_check_digit(nine)}"


@pytest.mark.parametrize(
    ("born", "kept"),
    [
        ("19800105", True),
        ("19800115", True),
        ("19801225", True),
        ("19800104", False),
        ("19800106", False),
        ("19800125", True),
        ("19800131", False),
        ("19800205", True),
    ],
)
def test_the_archive_keeps_those_born_on_the_5th_15th_and_25th(born: str, kept: bool) -> None:
    assert in_archive_sample(number(born)) is kept


def test_a_coordination_number_counts_its_day_less_60() -> None:
    assert in_archive_sample(number("19800165")) and not in_archive_sample(number("19800166"))


def test_an_invalid_number_is_refused_not_guessed() -> None:
    valid = number("19800105")
    wrong = valid[:-1] + str((int(valid[-1]) + 1) % 10)
    with pytest.raises(InvalidIdentityNumber):
        in_archive_sample(wrong)


def test_the_cutoff_is_the_same_day_years_back_and_29_february_falls_on_the_28th() -> None:
    assert cutoff(TODAY, 5) == date(2027, 6, 1)
    assert cutoff(date(2032, 2, 29), 5) == date(2027, 2, 28)


def person(name: str, last: date, *, district: str = "nordost", **kw: bool) -> Person:
    at = datetime(last.year, last.month, last.day, 12, tzinfo=UTC)
    return Person(name, district, at, kw.get("archive", False), kw.get("erased", False))


def test_only_those_past_the_period_outside_the_sample_and_not_yet_culled_are_culled() -> None:
    people = [
        person("p-old", date(2027, 5, 31)),
        person("p-edge", date(2027, 6, 1)),  # exactly five years: still within
        person("p-recent", date(2031, 1, 1)),
        person("p-archive", date(2020, 1, 1), archive=True),
        person("p-done", date(2020, 1, 1), erased=True),
        person("p-old-hisingen", date(2019, 3, 3), district="hisingen"),
    ]
    result = plan(people, TODAY, 5)
    assert result.cull == ("p-old", "p-old-hisingen")
    assert dict(result.counts) == {("nordost", 2027): 1, ("hisingen", 2019): 1}
    assert (result.kept_by_archive, result.already_culled, result.within_period) == (1, 1, 2)


def test_a_longer_period_culls_fewer() -> None:
    people = [person("a", date(2025, 1, 1)), person("b", date(2021, 1, 1))]
    assert plan(people, TODAY, 5).cull == ("a", "b")
    assert plan(people, TODAY, 10).cull == ("b",)
