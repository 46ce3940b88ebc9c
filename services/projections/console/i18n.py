"""The console's words: one gettext catalogue (Babel), Swedish by default, English by a
switch. Message ids are the English texts; `locale/sv/LC_MESSAGES/messages.po` holds the
Swedish, compiled in memory when the console starts (no build step, no .mo in the tree).
Dates and times are shown in the city's time zone, Europe/Stockholm."""

from __future__ import annotations

import io
from datetime import date, datetime
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

from babel import Locale
from babel.dates import format_date, format_datetime
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal, format_percent
from babel.support import NullTranslations, Translations

LANGUAGES = ("sv", "en")
DEFAULT_LANGUAGE = "sv"
TIME_ZONE = ZoneInfo("Europe/Stockholm")
LOCALE_DIR = Path(__file__).parent / "locale"


@cache
def translations(language: str) -> NullTranslations:
    """The catalogue of a language; English is the message ids themselves."""
    po = LOCALE_DIR / language / "LC_MESSAGES" / "messages.po"
    if language == "en" or not po.exists():
        return NullTranslations()
    with po.open("rb") as f:
        catalog = read_po(f, locale=language)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return Translations(buffer)


def language_of(asked: str | None) -> str:
    return asked if asked in LANGUAGES else DEFAULT_LANGUAGE


def when(value: datetime | str | None, language: str) -> str:
    """A moment in the city's time zone, e.g. 3 dec. 2026 10:51."""
    if value is None or value == "":
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return format_datetime(
        moment.astimezone(TIME_ZONE), "medium", tzinfo=TIME_ZONE, locale=Locale(language)
    )


def day(value: date | str | None, language: str) -> str:
    if value is None or value == "":
        return ""
    d = date.fromisoformat(value[:10]) if isinstance(value, str) else value
    return format_date(d, "medium", locale=Locale(language))


def number(value: float | int | None, language: str, digits: int = 2) -> str:
    if value is None:
        return "–"
    return format_decimal(
        value, format=f"#,##0.{'0' * digits}" if digits else "#,##0", locale=Locale(language)
    )


def share(value: float | None, language: str) -> str:
    if value is None:
        return "–"
    return format_percent(value, format="#,##0.0 %", locale=Locale(language))
