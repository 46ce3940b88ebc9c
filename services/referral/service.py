"""Wires the pure referral decider to the event store and to what the service knows of cases.

A referral is one stream (id = referral id); its events carry the case id in their metadata,
so they are keyed by case on Kafka like every other event of the case.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from likvard.catalogue import ReferenceCatalogue
from likvard.eventstore import EventStore
from likvard.http import RequestContext
from likvard.known_cases import CaseDirectory, KnownCase
from likvard.service import Decided, StreamService
from services.referral import domain as d

STATUS_EVENTS = {
    "ReferralRequested": "requested",
    "ReferralAccepted": "accepted",
    "ReferralDeclined": "declined",
    "ReferralWithdrawn": "withdrawn",
}


@dataclass(frozen=True)
class InboxItem:
    referral_id: str
    case_id: str
    intervention_code: str
    person_district: str
    status: str
    requested_at: datetime
    version: int = 1  # the referral stream's version: the If-Match of an answer to it
    running_interventions: tuple[str, ...] = ()


def _to_domain(event_type: str, data: dict[str, Any], occurred_at: datetime) -> d.DomainEvent:
    return d.DomainEvent(event_type, data, occurred_at)


class ReferralService:
    def __init__(
        self,
        store: EventStore,
        directory: CaseDirectory,
        reference: ReferenceCatalogue,
        *,
        case_wait: float = 5.0,
    ) -> None:
        self.store = store
        self.directory = directory
        self.reference = reference
        self.case_wait = case_wait
        self.streams: StreamService[Any, d.ReferralState, d.DomainEvent] = StreamService(
            store,
            initial_state=d.initial_state,
            evolve=d.evolve,
            decide=lambda c, s: d.decide(c, s, case=None, catalogue=reference),
            to_domain=_to_domain,
            district_of=lambda state, _e: state.person_district or "",
        )

    def known_case(self, case_id: str) -> KnownCase | None:
        """The case as learnt from the intake topic, waiting up to `case_wait` seconds for
        a case registered a moment ago whose event is still on its way."""
        return self.directory.wait_for(self.store.pool, case_id, self.case_wait)

    def request(
        self, command: d.RequestReferral, ctx: RequestContext, known: KnownCase | None
    ) -> Decided[d.ReferralState]:
        """Request a referral of the case `known` (as `known_case` found it: the caller
        looked it up once, for the access check too)."""
        snapshot = None
        if known is not None and known.district is not None:
            snapshot = d.CaseSnapshot(
                case_id=known.case_id,
                exists=True,
                status="closed" if known.status == "closed" else "open",
                district=known.district,
                consents=known.consents_in_force(d.local_date(command.occurred_at)),
            )
        return self.streams.execute(
            command.referral_id,
            command,
            0,
            ctx,
            decide=lambda c, s: d.decide(c, s, case=snapshot, catalogue=self.reference),
            case_id=command.case_id,
        )

    def act(
        self,
        referral_id: str,
        command: Any,
        expected: int | None,
        ctx: RequestContext,
        case_id: str | None,
    ) -> Decided[d.ReferralState]:
        """A command on a referral of `case_id` (from `load`, which the caller did first)."""
        return self.streams.execute(referral_id, command, expected, ctx, case_id=case_id)

    def load(self, referral_id: str) -> tuple[d.ReferralState, int, str | None]:
        state, version, events = self.streams.load(referral_id)
        case_id = str(events[0].metadata["case_id"]) if events else None
        return state, version, case_id

    def referral_of_intervention(self, intervention_id: str) -> str | None:
        with self.store.pool.connection() as conn:
            row = conn.execute(
                sql.SQL(
                    "SELECT stream_id FROM {}.events WHERE event_type = 'InterventionStarted'"
                    " AND payload->>'intervention_id' = %s LIMIT 1"
                ).format(sql.Identifier(self.store.schema)),
                (intervention_id,),
            ).fetchone()
        return None if row is None else str(row[0])

    def unit_inbox(self, unit_id: str, status: str | None) -> list[InboxItem]:
        """A unit's referrals with their current status, newest first."""
        with self.store.pool.connection() as conn:
            rows = conn.execute(
                sql.SQL(
                    "SELECT r.stream_id, r.metadata->>'case_id', r.payload->>'intervention_code',"
                    " r.payload->>'person_district', r.occurred_at,"
                    " (SELECT e.event_type FROM {s}.events e WHERE e.stream_id = r.stream_id"
                    "  AND e.event_type = ANY(%s) ORDER BY e.stream_version DESC LIMIT 1),"
                    " (SELECT max(v.stream_version) FROM {s}.events v"
                    "  WHERE v.stream_id = r.stream_id),"
                    " ARRAY(SELECT b.payload->>'intervention_id' FROM {s}.events b"
                    "  WHERE b.stream_id = r.stream_id AND b.event_type = 'InterventionStarted'"
                    "  AND NOT EXISTS (SELECT 1 FROM {s}.events x WHERE x.stream_id = r.stream_id"
                    "   AND x.event_type = 'InterventionEnded'"
                    "   AND x.payload->>'intervention_id' = b.payload->>'intervention_id')"
                    "  ORDER BY b.stream_version)"
                    " FROM {s}.events r WHERE r.event_type = 'ReferralRequested'"
                    " AND r.payload->>'unit_id' = %s ORDER BY r.occurred_at DESC"
                ).format(s=sql.Identifier(self.store.schema)),
                (list(STATUS_EVENTS), unit_id),
            ).fetchall()
        items = [
            InboxItem(
                r[0], r[1], r[2], r[3], STATUS_EVENTS[r[5]], r[4].astimezone(UTC), r[6], tuple(r[7])
            )
            for r in rows
        ]
        return [i for i in items if status is None or i.status == status]
