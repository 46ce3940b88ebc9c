"""Wires the pure intake decider to the shared stream service (the only I/O is there)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from likvard.districts import DistrictRegistry
from likvard.eventstore import EventStore
from likvard.service import StreamService
from services.intake import domain as d

IntakeService = StreamService[Any, d.CaseState, d.DomainEvent]


def _to_domain(event_type: str, data: dict[str, Any], occurred_at: datetime) -> d.DomainEvent:
    return d.DomainEvent(type=event_type, data=data, occurred_at=occurred_at)


def make_service(store: EventStore, districts: DistrictRegistry) -> IntakeService:
    return StreamService(
        store,
        initial_state=d.initial_state,
        evolve=d.evolve,
        decide=lambda command, state: d.decide(command, state, districts),
        to_domain=_to_domain,
        # The district responsible after the event (a transfer's event names the new one).
        district_of=lambda state, _event: state.district or "",
    )
