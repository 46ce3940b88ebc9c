"""District systems' intake events, judged by the intake decider (pure), and the wiring
of the service's ingest worker (`build`).

An ingested event is turned into the command that would have made it, and the decider
decides that command on the case's current state, with the same rules as the HTTP API; the
kernel (`likvard.ingest`) then checks that the decider made exactly the event the district
system sent (a transfer's `from_district` must be the case's district in Likvärd).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.district_keys import DistrictKeys
from likvard.districts import DistrictRegistry
from likvard.eventstore import open_store
from likvard.inbox import Incoming
from likvard.ingest import IngestProcessor, StreamView
from likvard.known_cases import KnownCase
from services.intake import domain as d
from services.intake.service import make_service


def command_for(
    event_type: str, data: Mapping[str, Any], occurred_at: datetime, case_id: str
) -> d.Command:
    """The command whose decision is this event (KeyError/ValueError: not an intake event)."""
    match event_type:
        case "IntakeRegistered":
            return d.RegisterIntake(
                case_id=case_id,
                occurred_at=occurred_at,
                person=data["person"],
                district=data["district"],
                substances=tuple(data["substances"]),
                referral_source=data["referral_source"],
                children_in_household=data["children_in_household"],
                birth_year=data.get("birth_year"),
            )
        case "AssessmentCompleted":
            return d.CompleteAssessment(
                case_id=case_id,
                occurred_at=occurred_at,
                assessment_id=data["assessment_id"],
                instrument=data["instrument"],
                scores=tuple(d.Score(scale=s["scale"], value=s["value"]) for s in data["scores"]),
                need_level=data["need_level"],
            )
        case "CarePlanAgreed":
            return d.AgreeCarePlan(
                case_id=case_id,
                occurred_at=occurred_at,
                plan_id=data["plan_id"],
                goals=tuple(data["goals"]),
                person_participated=data["person_participated"],
                review_on=data.get("review_on"),
            )
        case "ConsentRecorded":
            return d.RecordConsent(
                case_id=case_id,
                occurred_at=occurred_at,
                consent_id=data["consent_id"],
                recipients=tuple(data["recipients"]),
                valid_until=data.get("valid_until"),
            )
        case "ConsentWithdrawn":
            return d.WithdrawConsent(case_id, occurred_at, data["consent_id"])
        case "CaseTransferred":
            return d.TransferCase(case_id, occurred_at, data["to_district"], data["reason"])
        case "CaseClosed":
            return d.CloseCase(case_id, occurred_at, data["reason"])
        case "CaseReopened":
            return d.ReopenCase(case_id, occurred_at, data["reason"])
    raise ValueError(f"{event_type} is not an intake event")


class IntakeRules:
    """`likvard.ingest.IngestRules` for the intake service: the stream is the case."""

    service = "intake"

    def __init__(self, districts: d.DistrictLookup) -> None:
        self.districts = districts

    def stream_id(self, event: Incoming) -> str:
        return event.case_id

    def needs_case(self, event: Incoming) -> bool:
        return False

    def decide(
        self, event: Incoming, stream: StreamView, case: KnownCase | None
    ) -> Sequence[d.DomainEvent]:
        command = command_for(
            event.event_type, event.data, event.metadata["occurred_at"], event.case_id
        )
        return d.decide(command, stream.state, self.districts)

    def district(self, event: Incoming, state: Any, case: KnownCase | None) -> str | None:
        return None  # the case's district after the event, as for the HTTP API


def build(settings: Settings, schema: str = "intake") -> IngestProcessor:
    """The intake service's ingest processor on its own pool (closed by the caller)."""
    catalogue = Catalogue.load()
    districts = DistrictRegistry.load()
    keys = DistrictKeys.from_env(districts)  # before the pool: bad key files fail first
    store = open_store(settings, "intake", schema=schema, catalogue=catalogue, max_size=2)
    return IngestProcessor(
        make_service(store, districts),
        IntakeRules(districts),
        catalogue,
        districts.is_known,
        keys=keys,
    )
