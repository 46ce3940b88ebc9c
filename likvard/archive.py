"""The city's archive decision: what culling (gallring) keeps.

The common Swedish decision keeps, for research, the records of every person born on the
5th, 15th or 25th of a month. Intake records only whether a person is in that sample (a
boolean), never the date: the day of birth is personal data the reports do not need.
"""

from __future__ import annotations

from likvard.pseudonym import normalise

ARCHIVE_DAYS = frozenset({5, 15, 25})


def in_archive_sample(identity_number: str) -> bool:
    """Whether the archive decision keeps this person's records (a coordination number's
    day is the day of birth plus 60). Raises InvalidIdentityNumber as `normalise` does."""
    day = int(normalise(identity_number)[6:8])
    return (day - 60 if day > 60 else day) in ARCHIVE_DAYS
