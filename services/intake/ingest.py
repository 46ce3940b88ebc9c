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
from likvard.keys import open_key_store
from likvard.known_cases import KnownCase
from likvard.sealing import ERASED, PERSONAL
from services.intake import domain as d
from services.intake.personal import attach, keys_schema_for
from services.intake.service import make_service

SEALED_FIELDS = frozenset({"birth_year", "goals"})
"""The intake fields the contract seals (`likvard.personal` in schemas/intake)."""


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
                archive_sample=bool(data.get("archive_sample", False)),
                age_band=data.get("age_band"),
                gender=data.get("gender") or d.GENDER_NOT_STATED,
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
        case "InvestigationOpened":
            return d.OpenInvestigation(
                case_id, occurred_at, data["investigation_id"], data["basis"]
            )
        case "InvestigationDecided":
            return d.DecideInvestigation(
                case_id=case_id,
                occurred_at=occurred_at,
                investigation_id=data["investigation_id"],
                decision=data["decision"],
                intervention_kinds=tuple(data["intervention_kinds"]),
            )
        case "FirstVisitHeld":
            return d.HoldFirstVisit(case_id, occurred_at, data["visit_id"])
        case "CoordinatedPlanAgreed":
            return d.AgreeCoordinatedPlan(
                case_id=case_id,
                occurred_at=occurred_at,
                plan_id=data["plan_id"],
                parties=tuple(data["parties"]),
                lead=data["lead"],
                follow_up_on=data["follow_up_on"],
                consent_id=data["consent_id"],
            )
        case "CoordinatedPlanFollowedUp":
            return d.FollowUpCoordinatedPlan(case_id, occurred_at, data["plan_id"])
        case "PersonalDataErased":
            raise d.RuleViolation(
                "not-a-district-event",
                "Only Likvärd records an erasure (it destroys the person's key first).",
            )
    raise ValueError(f"{event_type} is not an intake event")


class IntakeRules:
    """`likvard.ingest.IngestRules` for the intake service: the stream is the case."""

    service = "intake"
    # A district may leave the age band null: Likvärd derives it from the birth year. The
    # gender of a record decoded from a v1 or v2 registration is NOT_STATED (the reader's
    # default); one handed over without it at all is taken as not stated.
    optional_fields = frozenset({"age_band", "gender"})

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

    def same_data(self, sent: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
        """A re-delivered event is the stored one if the district's fields agree: the
        stored age band may be derived, and details sealed under a key since destroyed
        (erasure, culling) can no longer be compared, so they are not."""
        ignore = {PERSONAL} | {f for f in self.optional_fields if sent.get(f) is None}
        if stored.get(PERSONAL) == ERASED:
            ignore |= SEALED_FIELDS
        return {k: v for k, v in sent.items() if k not in ignore} == {
            k: v for k, v in stored.items() if k not in ignore
        }


def build(settings: Settings, schema: str = "intake", keys_schema: str = "keys") -> IngestProcessor:
    """The intake service's ingest processor on its own pools (the caller closes
    `processor.store.pool`, and `processor.store.personal.keys.pool`)."""
    catalogue = Catalogue.load()
    districts = DistrictRegistry.load()
    keys = DistrictKeys.from_env(districts)  # before the pool: bad key files fail first
    data_keys = open_key_store(settings, schema=keys_schema or keys_schema_for(schema), max_size=2)
    try:
        store = open_store(settings, "intake", schema=schema, catalogue=catalogue, max_size=2)
    except Exception:
        data_keys.pool.close()
        raise
    attach(store, data_keys)
    return IngestProcessor(
        make_service(store, districts),
        IntakeRules(districts),
        catalogue,
        districts.is_known,
        keys=keys,
    )
