"""Keyed pseudonyms: stable across formats, keyed, never the number itself."""

from __future__ import annotations

from datetime import date

import pytest

from likvard.pseudonym import InvalidIdentityNumber, normalise, pseudonymise

SECRET = b"a-test-secret-of-enough-length"


@pytest.mark.parametrize("number", ["19121212-1212", "191212121212", "121212+1212"])
def test_formats_of_one_number_give_one_pseudonym(number: str) -> None:
    assert normalise(number) == "191212121212"
    assert pseudonymise(number, SECRET) == pseudonymise("191212121212", SECRET)


def test_pseudonym_is_keyed_hex_and_hides_the_number() -> None:
    p = pseudonymise("19121212-1212", SECRET)
    assert len(p) == 64 and all(c in "0123456789abcdef" for c in p)
    assert "121212" not in p
    assert pseudonymise("19121212-1212", b"another-secret-of-length") != p


def test_coordination_number_is_accepted() -> None:
    # day 72 = 12 + 60: a coordination number
    assert normalise("701072-1236") == "197010721236"


@pytest.mark.parametrize("bad", ["19121212-1213", "abc", "1912121212", "19121312-1212", ""])
def test_invalid_numbers_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(InvalidIdentityNumber) as info:
        normalise(bad)
    if bad:
        assert bad not in str(info.value)


@pytest.mark.parametrize(
    ("number", "born"),
    [
        ("261130-0001", "20261130"),  # earlier this year: born this year
        ("261215-0009", "19261215"),  # later this year: a hundred years ago
        ("280101-0006", "19280101"),  # 2028 would be in the future
        ("000101-0008", "20000101"),
        ("990101-0000", "19990101"),
        ("000101+0008", "19000101"),  # '+': over 100
    ],
)
def test_a_ten_digit_number_is_born_on_the_latest_date_not_in_the_future(
    number: str, born: str
) -> None:
    assert normalise(number, today=date(2026, 12, 1))[:8] == born
