"""The `--from`/`--to` days of `likvard report` and `likvard indicators`: `--to` defaults to
the city's today, not the host's (between 23:00 and 24:00 UTC in winter the two differ,
and an intake made then fell after the report's window)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from likvard.cli.base import day_window


def test_to_defaults_to_the_city_day_after_midnight_in_stockholm() -> None:
    late_evening_utc = datetime(2026, 12, 4, 23, 30, tzinfo=UTC)  # 00:30 on 5 December there
    assert day_window(None, None, late_evening_utc) == (date(2026, 1, 1), date(2026, 12, 5))


def test_from_defaults_to_the_first_of_january_of_the_to_year() -> None:
    assert day_window(None, datetime(2025, 3, 9)) == (date(2025, 1, 1), date(2025, 3, 9))
    assert day_window(datetime(2024, 6, 1), datetime(2025, 3, 9)) == (
        date(2024, 6, 1),
        date(2025, 3, 9),
    )
