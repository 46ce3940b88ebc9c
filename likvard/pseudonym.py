"""Keyed pseudonyms for persons: the personal identity number never enters an event.

The pseudonym is HMAC-SHA256(secret, normalised 12-digit number), so the same person gets
the same pseudonym in every district and service (one way of counting persons), while
nobody without the secret can turn a pseudonym back into a number.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import date

_PNR = re.compile(r"^(\d{2})?(\d{6})[-+]?(\d{4})$")


class InvalidIdentityNumber(ValueError):
    """Not a valid Swedish personal identity or coordination number (the text says why,
    without repeating the number)."""


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
            "the personal identity number must be 10 or 12 digits, as YYYYMMDD-NNNN"
        )
    century, date_part, tail = m.group(1), m.group(2), m.group(3)
    if not _luhn_ok(date_part + tail):
        raise InvalidIdentityNumber("the personal identity number has a wrong check digit")
    month, day = int(date_part[2:4]), int(date_part[4:6])
    if day > 60:  # coordination number: day + 60
        day -= 60
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise InvalidIdentityNumber("the personal identity number does not hold a valid date")
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


def pseudonymise(number: str, secret: bytes) -> str:
    """The person's keyed pseudonym: 64 lowercase hex characters."""
    return hmac.new(secret, normalise(number).encode(), hashlib.sha256).hexdigest()
