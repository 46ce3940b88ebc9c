"""Keyed pseudonyms for persons: the personal identity number never enters an event.

The pseudonym is HMAC-SHA256(secret, DOMAIN + normalised 12-digit number), so the same
person gets the same pseudonym in every district and service (one way of counting persons),
while nobody without the secret can turn a pseudonym back into a number. `DOMAIN` names
what the HMAC is for and its generation (`VERSION`): the secret keys nothing else by
accident, and a rotation (a new secret, the next version: docs/pseudonyms.md) can never
give a pseudonym of the old generation.

Only the intake service holds the secret: it pseudonymises the numbers of the cases it
registers, and answers district systems' `POST /pseudonyms` (`pseudonymise_all`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

VERSION = "v1"
"""The pseudonyms' generation: part of the HMAC input, named in every answer of
`POST /pseudonyms`. The next rotation of the secret makes it v2."""
DOMAIN = b"likvard/pseudonym/" + VERSION.encode("ascii") + b"\x00"
"""What precedes the number in the HMAC input (the NUL ends the tag: no number can
extend it)."""
MAX_BATCH = 1000
"""Identity numbers per `POST /pseudonyms` call."""

_PNR = re.compile(r"^(\d{2})?(\d{6})[-+]?(\d{4})$")

MALFORMED = "malformed"
WRONG_CHECK_DIGIT = "wrong-check-digit"
INVALID_DATE = "invalid-date"
ERROR_CODES: tuple[str, ...] = (MALFORMED, WRONG_CHECK_DIGIT, INVALID_DATE)
"""Why a number is not a personal identity or coordination number (one code each)."""


class InvalidIdentityNumber(ValueError):
    """Not a valid Swedish personal identity or coordination number. The text says why and
    `code` names it (one of `ERROR_CODES`), without repeating the number."""

    def __init__(self, message: str, code: str = MALFORMED) -> None:
        super().__init__(message)
        self.code = code


def luhn_check_digit(nine_digits: str) -> int:
    """The check digit of an identity number's first nine digits (YYMMDDNNN), by Luhn."""
    total = 0
    for i, ch in enumerate(nine_digits):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10


def _luhn_ok(ten_digits: str) -> bool:
    return luhn_check_digit(ten_digits[:9]) == int(ten_digits[9])


def normalise(number: str, today: date | None = None) -> str:
    """Twelve digits YYYYMMDDNNNC. A ten-digit number is born on the latest such date that
    is not after today, a hundred years earlier with '+' (over 100), as the Tax Agency's
    convention has it."""
    text = number.strip().replace(" ", "")
    m = _PNR.match(text)
    if not m:
        raise InvalidIdentityNumber(
            "the personal identity number must be 10 or 12 digits, as YYYYMMDD-NNNN", MALFORMED
        )
    century, date_part, tail = m.group(1), m.group(2), m.group(3)
    if not _luhn_ok(date_part + tail):
        raise InvalidIdentityNumber(
            "the personal identity number has a wrong check digit", WRONG_CHECK_DIGIT
        )
    month, day = int(date_part[2:4]), int(date_part[4:6])
    if day > 60:  # coordination number: day + 60
        day -= 60
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise InvalidIdentityNumber(
            "the personal identity number does not hold a valid date", INVALID_DATE
        )
    if century is None:
        century = _century(int(date_part[:2]), month, day, "+" in text, today or date.today())
    return century + date_part + tail


def _century(yy: int, month: int, day: int, plus: bool, today: date) -> str:
    year = today.year - (today.year - yy) % 100  # the latest year ending in yy, up to now
    if (year, month, day) > (today.year, today.month, today.day):
        year -= 100
    if plus:
        year -= 100
    return str(year // 100)


def _hmac(twelve_digits: str, secret: bytes) -> str:
    return hmac.new(secret, DOMAIN + twelve_digits.encode("ascii"), hashlib.sha256).hexdigest()


def pseudonymise(number: str, secret: bytes) -> str:
    """The person's keyed pseudonym: 64 lowercase hex characters (InvalidIdentityNumber
    for a number that is none). The one function every pseudonym comes from."""
    return _hmac(normalise(number), secret)


@dataclass(frozen=True)
class ItemError:
    """Why the number at `index` of a batch has no pseudonym (never the number itself)."""

    index: int
    error: str


@dataclass(frozen=True)
class Batch:
    """A batch's answer: a pseudonym per number, in order (None where `errors` says why)."""

    pseudonyms: list[str | None]
    errors: list[ItemError]


def pseudonymise_all(numbers: Sequence[str], secret: bytes, today: date | None = None) -> Batch:
    """The pseudonyms of a batch of numbers, as `pseudonymise` gives each; an invalid
    number gets an error code at its index instead, and does not fail the others."""
    day = today or date.today()
    pseudonyms: list[str | None] = []
    errors: list[ItemError] = []
    for index, number in enumerate(numbers):
        try:
            pseudonyms.append(_hmac(normalise(number, day), secret))
        except InvalidIdentityNumber as exc:
            pseudonyms.append(None)
            errors.append(ItemError(index, exc.code))
    return Batch(pseudonyms, errors)
