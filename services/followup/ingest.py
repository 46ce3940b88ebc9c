"""District systems' follow-up events, judged by the follow-up decider (pure), and the
wiring of the service's ingest worker (`build`).

An ingested event is turned into the command that would have made it and decided on the
case's follow-up stream, with the same rules as the HTTP API: family work, scheduling and
user assessments need a case the service knows from intake; completing or missing needs a
follow-up the case has scheduled (its kind must be that follow-up's, checked by
`likvard.ingest.check_matches`). A FollowUpScheduled for an id the case already has is a
repeat: nothing is stored and the record counts as a duplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.district_keys import DistrictKeys
from likvard.districts import DistrictRegistry
from likvard.eventstore import open_store
from likvard.inbox import Incoming
from likvard.ingest import IngestProcessor, StreamView
from likvard.known_cases import CaseDirectory, KnownCase
from services.followup import domain as d
from services.followup.service import make_service, prepare

NEEDS_KNOWN_CASE = frozenset(
    {
        "ChildrenInHouseholdRecorded",
        "FamilyMemberEngaged",
        "FollowUpScheduled",
        "UserAssessmentRecorded",
    }
)


def command_for(
    event_type: str, data: Mapping[str, Any], occurred_at: datetime, case_id: str
) -> d.Command:
    """The command whose decision is this event (KeyError/ValueError: not a follow-up one)."""
    match event_type:
        case "ChildrenInHouseholdRecorded":
            return d.RecordChildrenInHousehold(
                case_id, occurred_at, data["number_of_children"], data.get("youngest_age")
            )
        case "FamilyMemberEngaged":
            return d.EngageFamilyMember(
                case_id=case_id,
                occurred_at=occurred_at,
                member_id=data["member_id"],
                relation=data["relation"],
                is_child=data["is_child"],
                support_offered=tuple(data["support_offered"]),
                accepted=data["accepted"],
            )
        case "FollowUpScheduled":
            return d.ScheduleFollowUp(
                case_id=case_id,
                occurred_at=occurred_at,
                followup_id=data["followup_id"],
                kind=data["kind"],
                due_on=data["due_on"],
                intervention_id=data.get("intervention_id"),
                referral_id=data.get("referral_id"),
                district=data["district"],
            )
        case "FollowUpCompleted":
            return d.CompleteFollowUp(
                case_id=case_id,
                occurred_at=occurred_at,
                followup_id=data["followup_id"],
                days_of_use_last_30=data.get("days_of_use_last_30"),
                housing=data["housing"],
                occupation=data["occupation"],
                self_rated_health=data.get("self_rated_health"),
                goals_reached=data["goals_reached"],
                situation_improved=data["situation_improved"],
            )
        case "FollowUpMissed":
            return d.MarkFollowUpMissed(case_id, occurred_at, data["followup_id"], data["reason"])
        case "UserAssessmentRecorded":
            return d.RecordUserAssessment(
                case_id=case_id,
                occurred_at=occurred_at,
                assessment_id=data["assessment_id"],
                contact_easy=data["contact_easy"],
                clear_information=data["clear_information"],
                felt_understood=data["felt_understood"],
                influence=data["influence"],
                whole_situation=data["whole_situation"],
                situation_improved=data["situation_improved"],
            )
    raise ValueError(f"{event_type} is not a follow-up event")


class FollowUpRules:
    """`likvard.ingest.IngestRules` for the follow-up service: the stream is the case."""

    service = "followup"

    def __init__(self, is_district: Callable[[str], bool]) -> None:
        self.is_district = is_district

    def stream_id(self, event: Incoming) -> str:
        return event.case_id

    def needs_case(self, event: Incoming) -> bool:
        return True  # also for the district of a completed or missed follow-up

    def decide(
        self, event: Incoming, stream: StreamView, case: KnownCase | None
    ) -> Sequence[d.DomainEvent]:
        known = case is not None and case.status != "unknown"
        if event.event_type in NEEDS_KNOWN_CASE and not known:
            raise d.RuleViolation(
                "case-not-known",
                "The follow-up service has not (yet) seen this case from intake. If the case"
                " was registered a moment ago, retry the record later (likvard dlq retry).",
            )
        district = str(event.data.get("district") or "")
        if (
            event.event_type == "FollowUpScheduled"
            and district.strip()
            and not self.is_district(district)
        ):
            # The scheduler takes districts from stored events; a district system's must
            # be checked, since reports and the due list count by it.
            raise d.RuleViolation(
                "unknown-district", "The follow-up's district is not a known district code."
            )
        occurred_at = event.metadata["occurred_at"]
        command = command_for(event.event_type, event.data, occurred_at, event.case_id)
        return d.decide(command, stream.state)

    def district(self, event: Incoming, state: Any, case: KnownCase | None) -> str | None:
        """As the HTTP API: a scheduled follow-up names its district; otherwise the case's
        district now, else the one its follow-up was scheduled in."""
        if event.event_type == "FollowUpScheduled":
            return str(event.data["district"])
        if case is not None and case.district:
            return case.district
        followup_id = str(event.data.get("followup_id"))
        if isinstance(state, d.FollowUpState) and followup_id in state.followups:
            return state.followups[followup_id].district
        return None


def build(settings: Settings, schema: str = "followup") -> IngestProcessor:
    """The follow-up service's ingest processor on its own pool (closed by the caller)."""
    catalogue = Catalogue.load()
    districts = DistrictRegistry.load()
    keys = DistrictKeys.from_env(districts)  # before the pool: bad key files fail first
    store = open_store(settings, "followup", schema=schema, catalogue=catalogue, max_size=2)
    directory = CaseDirectory(schema)
    with store.pool.connection() as conn:
        directory.migrate(conn)
        conn.commit()
        prepare(conn, schema)
    return IngestProcessor(
        make_service(store),
        FollowUpRules(districts.is_known),
        catalogue,
        districts.is_known,
        keys=keys,
        directory=directory,
        case_wait=settings.case_wait_seconds,
    )
