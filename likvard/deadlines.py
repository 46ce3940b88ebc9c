"""When something waiting is overdue: one rule for the referral inbox, the follow-ups due and
the report, so a list and a report never disagree about the same item. Pure, no I/O.

Days are the city's calendar days (Europe/Stockholm): an item that started on day S is
`today - S` days old, whatever the clock time of either. It is overdue when that is MORE
than the allowed days: a referral requested on 1 March with 14 days to answer is due an
answer by 15 March (14 days: not overdue) and is overdue from 16 March (15 days).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from likvard.domain import CITY_TZ, local_date


def city_today(now: datetime | None = None) -> date:
    """The city's calendar date now (or at `now`)."""
    return local_date(now if now is not None else datetime.now(UTC))


def days_since(start: date, today: date) -> int:
    """Calendar days from `start` to `today` (0 on the same day; negative if in the future)."""
    return (today - start).days


def is_overdue(start: date, today: date, allowed_days: int) -> bool:
    """Whether an item that started on `start` has waited more than `allowed_days` by
    `today` (exactly `allowed_days` is not overdue, one more is)."""
    return days_since(start, today) > allowed_days


def last_day_on_time(today: date, allowed_days: int) -> date:
    """The earliest start day that is not overdue on `today`: a start before it is."""
    return today - timedelta(days=allowed_days)


def overdue_before(today: date, allowed_days: int) -> datetime:
    """The moment (aware, UTC) before which a start time is overdue on `today`: the start
    of the city's day `last_day_on_time`, so a query can compare timestamps directly."""
    day = last_day_on_time(today, allowed_days)
    return datetime.combine(day, time(0), tzinfo=CITY_TZ).astimezone(UTC)
