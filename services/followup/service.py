"""Wires the pure follow-up decider to the shared stream service, and the few queries the
follow-up API needs across cases (over the service's own `events` table)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg import sql

from likvard.db import check_schema_name, may_migrate
from likvard.eventstore import EventStore
from likvard.service import StreamService
from services.followup import domain as d

FollowUpService = StreamService[d.Command, d.FollowUpState, d.DomainEvent]


def _to_domain(event_type: str, data: dict[str, Any], occurred_at: datetime) -> d.DomainEvent:
    return d.DomainEvent(type=event_type, data=data, occurred_at=occurred_at)


def make_service(store: EventStore) -> FollowUpService:
    """The stream id is the case id. Callers pass `district=` (the known case's district or
    the ScheduleFollowUp command's); the fallback is the district an event names itself."""
    return StreamService(
        store,
        initial_state=d.initial_state,
        evolve=d.evolve,
        decide=d.decide,
        to_domain=_to_domain,
        district_of=lambda _state, event: str(event.data.get("district") or ""),
    )


def prepare(conn: psycopg.Connection[Any], schema: str) -> None:
    """Indexes for the follow-up queries, created idempotently (the event store's migrations
    are shared by every service, so they are not the place for these). Serialised by an
    advisory lock, since two processes may start at once."""
    t = sql.Identifier(check_schema_name(schema))
    with conn.transaction():
        if not may_migrate(conn, schema):  # a service's role: `likvard db migrate` made them
            return
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"likvard.followup.prepare.{schema}",)
        )
        conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS events_followup_id_idx ON {}.events"
                " ((payload->>'followup_id'), event_type)"
                " WHERE event_type IN ('FollowUpScheduled', 'FollowUpCompleted', 'FollowUpMissed')"
            ).format(t)
        )
        # ISO dates compare as text in date order, so the due query can use this index.
        conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS events_followup_due_idx ON {}.events"
                " ((payload->>'due_on')) WHERE event_type = 'FollowUpScheduled'"
            ).format(t)
        )


@dataclass(frozen=True)
class DueFollowUp:
    case_id: str
    followup_id: str
    kind: str
    due_on: date
    district: str
    intervention_id: str | None
    referral_id: str | None


def case_of_followup(store: EventStore, followup_id: str) -> str | None:
    """The case whose stream scheduled this follow-up, or None."""
    with store.pool.connection() as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT stream_id FROM {}.events WHERE event_type = 'FollowUpScheduled'"
                " AND payload->>'followup_id' = %s ORDER BY global_position LIMIT 1"
            ).format(sql.Identifier(store.schema)),
            (followup_id,),
        ).fetchone()
    return None if row is None else str(row[0])


_DUE_SQL = """
SELECT DISTINCT ON (s.payload->>'due_on', s.stream_id, s.payload->>'followup_id')
    s.stream_id, s.payload->>'followup_id', s.payload->>'kind', s.payload->>'due_on',
    s.payload->>'district', s.payload->>'intervention_id', s.payload->>'referral_id'
FROM {t}.events s
WHERE s.event_type = 'FollowUpScheduled'
  AND s.payload->>'due_on' < %(before)s
  AND s.payload->>'district' = ANY(%(districts)s::text[])
  AND NOT EXISTS (
    SELECT 1 FROM {t}.events e
    WHERE e.event_type IN ('FollowUpCompleted', 'FollowUpMissed')
      AND e.payload->>'followup_id' = s.payload->>'followup_id'
      AND e.stream_id = s.stream_id
  )
ORDER BY s.payload->>'due_on', s.stream_id, s.payload->>'followup_id'
LIMIT %(limit)s
"""


def due(
    store: EventStore, districts: Sequence[str], before: date, *, limit: int = 10_000
) -> list[DueFollowUp]:
    """Follow-ups scheduled and neither completed nor missed, due before `before`, in the
    districts they were scheduled in (the ones the caller may see), earliest first."""
    with store.pool.connection() as conn:
        rows = conn.execute(
            sql.SQL(_DUE_SQL).format(t=sql.Identifier(store.schema)),
            {"before": before.isoformat(), "districts": list(districts), "limit": limit},
        ).fetchall()
    return [
        DueFollowUp(
            case_id=str(r[0]),
            followup_id=str(r[1]),
            kind=str(r[2]),
            due_on=date.fromisoformat(r[3]),
            district=str(r[4]),
            intervention_id=r[5],
            referral_id=r[6],
        )
        for r in rows
    ]
