"""The follow-up process manager: consumes `likvard.intake.v1` (which cases exist) and
`likvard.referral.v1` (ended interventions) and schedules the follow-ups Gothenburg's rule
asks for (`services.followup.scheduling`).

Exactly once in effect: the inbox skips event ids it has seen; and since follow-up ids are
derived from the intervention and the kind and the decider schedules nothing for an id the
case already has, an InterventionEnded delivered again (after a crash between the append
and the inbox commit, a republish, or a replay) schedules nothing more.

The follow-ups are appended through the service's event store (its own transaction), not in
the inbox transaction: if the inbox transaction then fails, the event comes again and the
idempotent decider makes the second pass a no-op.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from likvard.eventstore import ConcurrencyError
from likvard.http import RequestContext
from likvard.inbox import Handler, Incoming
from likvard.known_cases import CaseDirectory
from services.followup import domain as d
from services.followup.scheduling import followups_for_intervention_end
from services.followup.service import FollowUpService

log = logging.getLogger("likvard.followup.process")

ACTOR = "likvard-followup-scheduler"
ATTEMPTS = 5


def schedule_for(service: FollowUpService, event: Incoming) -> int:
    """Schedule an InterventionEnded's follow-ups; returns how many new events were stored.
    A malformed event (it breaks its schema) is logged and skipped, not retried forever."""
    try:
        commands = followups_for_intervention_end(
            event.data,
            ended_at=event.metadata["occurred_at"],
            district=event.metadata["district"],
            case_id=event.case_id,
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("skipping InterventionEnded %s: %s", event.event_id, exc)
        return 0
    ctx = RequestContext(
        actor=ACTOR,
        correlation_id=str(event.metadata.get("correlation_id") or event.event_id),
        traceparent=event.metadata.get("traceparent"),
    )
    stored = 0
    for command in commands:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                decided = service.execute(
                    command.case_id,
                    command,
                    None,
                    ctx,
                    district=command.district,
                    case_id=command.case_id,
                    causation_id=event.event_id,
                )
                stored += len(decided.stored)
                break
            except ConcurrencyError:
                # A case worker wrote to the case meanwhile: decide again on the new state.
                if attempt == ATTEMPTS:
                    raise
            except d.DomainError as exc:
                log.warning(
                    "not scheduling %s for InterventionEnded %s: %s",
                    command.kind,
                    event.event_id,
                    exc.code,
                )
                break
    return stored


def make_handler(service: FollowUpService, directory: CaseDirectory) -> Handler:
    """The inbox handler of the follow-up consumer (topics: intake and referral)."""

    def handle(conn: psycopg.Connection[Any], events: list[Incoming]) -> None:
        directory.handle(conn, events)
        for event in events:
            if event.event_type == "InterventionEnded":
                schedule_for(service, event)

    return handle
