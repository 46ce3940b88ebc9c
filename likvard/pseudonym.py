"""Keyed pseudonyms for persons: the personal identity number never enters an event.

The pseudonym is HMAC-SHA256(secret, normalised 12-digit number), so the same person gets
the same pseudonym in every district and service (one way of counting persons), while
nobody without the secret can turn a pseudonym back into a number.
"""

from __future__ import annotations

import hashlib
import hmac
import re

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


def normalise(number: str) -> str:
    """Twelve digits YYYYMMDDNNNC. A ten-digit number is taken as born 1900s if '+' (over
    100) or if it would otherwise be in the future, as the Tax Agency's convention does."""
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
        century = "19" if "+" in text or int(date_part[:2]) > 30 else "20"
    return century + date_part + tail


def pseudonymise(number: str, secret: bytes) -> str:
    """The person's keyed pseudonym: 64 lowercase hex characters."""
    return hmac.new(secret, normalise(number).encode(), hashlib.sha256).hexdigest()
