"""Overdue follow-ups: a follow-up neither completed nor missed whose due date lies more than
the window (LIKVARD_FOLLOWUP_WINDOW_DAYS, default 30) in the past, in the city's calendar
days. Due on 1 March with a 30-day window: still in its window on 31 March, overdue from
1 April. The rule is `likvard.deadlines`, shared with the report.

`is_overdue` and `Window` are pure; `due_in_window` is the query GET /followups/due asks
(over `service.due`, which already leaves out completed and missed follow-ups).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from likvard import deadlines
from likvard.eventstore import EventStore
from services.followup.service import DueFollowUp, due


def is_overdue(due_on: date, today: date, window: int) -> bool:
    """Whether a follow-up still to do, due on `due_on`, is past its window on `today`."""
    return deadlines.is_overdue(due_on, today, window)


@dataclass(frozen=True)
class Window:
    """The window judged on one day (one `today` for a whole answer, so the flag and the
    filter agree even across midnight)."""

    days: int
    today: date

    @classmethod
    def now(cls, days: int) -> Window:
        return cls(days, deadlines.city_today())

    def overdue(self, due_on: date) -> bool:
        return is_overdue(due_on, self.today, self.days)

    @property
    def overdue_before(self) -> date:
        """Due before this day (exclusive): overdue today."""
        return deadlines.last_day_on_time(self.today, self.days)


def due_in_window(
    store: EventStore,
    districts: Sequence[str],
    before: date,
    window: Window,
    overdue: bool | None = None,
) -> list[DueFollowUp]:
    """The follow-ups due before `before` in `districts` (as `service.due`); with `overdue`
    True only those past their window, False only those still within it, None all."""
    if overdue:
        return due(store, districts, min(before, window.overdue_before))
    shown = due(store, districts, before)
    if overdue is False:
        return [f for f in shown if not window.overdue(f.due_on)]
    return shown
