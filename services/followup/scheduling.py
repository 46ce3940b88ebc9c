"""The follow-up process manager's rule, as a pure function: which follow-ups an ended
intervention leads to.

Gothenburg follows up every intervention longer than 7 days with an interview within a
month of its end, and every intervention with ASI at 6 and 12 months. On InterventionEnded:

- if it lasted more than 7 days (ended - started_at > 7 days, exactly 7 days is not more),
  POST_INTERVENTION_INTERVIEW due 30 days after the end date;
- always ASI_6_MONTHS and ASI_12_MONTHS due 6 and 12 calendar months after the end date,
  with the day clamped to the month's last day (31 August -> 28 or 29 February).

Dates are the city's calendar dates (Europe/Stockholm). Each follow-up's id is
`uuid5(FOLLOWUP_NAMESPACE, f"{intervention_id}:{kind}")` and the commands' `occurred_at` is
the end of the intervention, so the same event always gives the same commands, and the
decider's idempotent scheduling makes a re-delivered event schedule nothing new.
"""

from __future__ import annotations

import calendar
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from services.followup.domain import ScheduleFollowUp, local_date

FOLLOWUP_NAMESPACE = uuid.UUID("a21a3cee-196c-5514-bd43-1dbc378553c3")
"""Namespace of the derived follow-up ids. Never change it: ids already scheduled would no
longer match, and a replayed InterventionEnded would schedule its follow-ups twice."""

INTERVIEW_AFTER_LONGER_THAN = timedelta(days=7)
INTERVIEW_DUE_AFTER = timedelta(days=30)
ASI_MONTHS: tuple[tuple[str, int], ...] = (("ASI_6_MONTHS", 6), ("ASI_12_MONTHS", 12))


def followup_id(intervention_id: str, kind: str) -> str:
    """The deterministic id of an intervention's follow-up of this kind."""
    return str(uuid.uuid5(FOLLOWUP_NAMESPACE, f"{intervention_id}:{kind}"))


def add_months(day: date, months: int) -> date:
    """The same day `months` calendar months later, clamped to the last day of the month."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def _moment(value: Any, what: str) -> datetime:
    """A timestamp-micros field as decoded (aware datetime) or raw (micros since epoch)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int) and not isinstance(value, bool):
        moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)
    else:
        raise ValueError(f"{what} must be a timestamp.")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} needs a time zone.")
    return moment


def followups_for_intervention_end(
    event_data: Mapping[str, Any], ended_at: datetime, district: str, case_id: str
) -> list[ScheduleFollowUp]:
    """The follow-ups to schedule for an InterventionEnded payload (`event_data`, without
    metadata), ended at `ended_at` (its metadata.occurred_at), in the responsible district.
    Raises ValueError if a time is missing or naive (the event breaks its schema)."""
    ended_at = _moment(ended_at, "ended_at")
    started_at = _moment(event_data.get("started_at"), "started_at")
    intervention_id = str(event_data["intervention_id"])
    referral = event_data.get("referral_id")
    referral_id = None if referral is None else str(referral)
    end_day = local_date(ended_at)

    due: list[tuple[str, date]] = []
    if ended_at - started_at > INTERVIEW_AFTER_LONGER_THAN:
        due.append(("POST_INTERVENTION_INTERVIEW", end_day + INTERVIEW_DUE_AFTER))
    due.extend((kind, add_months(end_day, months)) for kind, months in ASI_MONTHS)
    return [
        ScheduleFollowUp(
            case_id=case_id,
            occurred_at=ended_at,
            followup_id=followup_id(intervention_id, kind),
            kind=kind,
            due_on=due_on,
            intervention_id=intervention_id,
            referral_id=referral_id,
            district=district,
        )
        for kind, due_on in due
    ]
