"""District systems' referral events, judged by the referral decider (pure), and the
wiring of the service's ingest worker (`build`).

An ingested event is turned into the command that would have made it and decided on the
referral's current state, with the same rules as the HTTP API: a ReferralRequested needs a
case the service knows from intake (open, with a consent or override where the unit is
outside social services), and the districts, recipient kind, unit and priority in the
event must be what Likvärd derives from the case and the city's catalogue (checked by
`likvard.ingest.check_matches`). `ReferredAcrossDistrict` is Likvärd's own conclusion from
a ReferralRequested, so district systems do not send it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from likvard.catalogue import ReferenceCatalogue
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.district_keys import DistrictKeys
from likvard.districts import DistrictRegistry
from likvard.eventstore import open_store
from likvard.inbox import Incoming
from likvard.ingest import IngestProcessor, StreamView
from likvard.known_cases import CaseDirectory, KnownCase
from services.referral import domain as d
from services.referral.service import ReferralService


def snapshot(case: KnownCase | None, case_id: str, occurred_at: datetime) -> d.CaseSnapshot | None:
    """What the decider needs of the case, with the consents in force on the event's day."""
    if case is None or case.district is None or case.case_id != case_id:
        return None
    return d.CaseSnapshot(
        case_id=case.case_id,
        exists=True,
        status="closed" if case.status == "closed" else "open",
        district=case.district,
        consents=case.consents_in_force(d.local_date(occurred_at)),
    )


def command_for(
    event_type: str, data: Mapping[str, Any], occurred_at: datetime, case_id: str
) -> d.Command:
    """The command whose decision is this event (KeyError/ValueError: not one of these)."""
    referral_id = data["referral_id"]
    match event_type:
        case "ReferralRequested":
            return d.RequestReferral(
                referral_id=referral_id,
                occurred_at=occurred_at,
                case_id=case_id,
                unit_id=data["unit_id"],
                intervention_code=data["intervention_code"],
                consent_id=data.get("consent_id"),
                consent_override=data.get("consent_override"),
            )
        case "ReferralAccepted":
            return d.AcceptReferral(referral_id, occurred_at, data.get("planned_start"))
        case "ReferralDeclined":
            return d.DeclineReferral(referral_id, occurred_at, data["reason"])
        case "ReferralWithdrawn":
            return d.WithdrawReferral(referral_id, occurred_at, data["reason"])
        case "InterventionStarted":
            return d.StartIntervention(
                referral_id, occurred_at, data["intervention_id"], data["intervention_code"]
            )
        case "InterventionEnded":
            return d.EndIntervention(
                referral_id, occurred_at, data["intervention_id"], data["outcome"]
            )
    raise ValueError(f"{event_type} is not a referral event a district system sends")


class ReferralRules:
    """`likvard.ingest.IngestRules` for the referral service: the stream is the referral."""

    service = "referral"

    def __init__(self, catalogue: d.CatalogueLookup) -> None:
        self.catalogue = catalogue

    def stream_id(self, event: Incoming) -> str:
        return str(event.data["referral_id"])

    def needs_case(self, event: Incoming) -> bool:
        return event.event_type == "ReferralRequested"

    def decide(
        self, event: Incoming, stream: StreamView, case: KnownCase | None
    ) -> Sequence[d.DomainEvent]:
        if event.event_type == "ReferredAcrossDistrict":
            raise d.RuleViolation(
                "derived-event",
                "ReferredAcrossDistrict is recorded by Likvärd itself when it accepts a"
                " ReferralRequested to a unit in another district than the person's:"
                " send only the ReferralRequested.",
            )
        if stream.case_id is not None and stream.case_id != event.case_id:
            raise d.RuleViolation(
                "referral-of-another-case",
                "The referral belongs to another case than the event's case_id.",
            )
        occurred_at = event.metadata["occurred_at"]
        command = command_for(event.event_type, event.data, occurred_at, event.case_id)
        found = snapshot(case, event.case_id, occurred_at)
        try:
            return d.decide(command, stream.state, case=found, catalogue=self.catalogue)
        except d.CaseNotFound:
            raise d.RuleViolation(
                "case-not-found",
                "The referral service has not (yet) seen this case from intake. If the case"
                " was registered a moment ago, retry the record later (likvard dlq retry).",
            ) from None

    def district(self, event: Incoming, state: Any, case: KnownCase | None) -> str | None:
        return None  # the person's district when the referral was made, as for HTTP


def build(settings: Settings, schema: str = "referral") -> IngestProcessor:
    """The referral service's ingest processor on its own pool (closed by the caller)."""
    catalogue = Catalogue.load()
    districts = DistrictRegistry.load()
    keys = DistrictKeys.from_env(districts)  # before the pool: bad key files fail first
    store = open_store(settings, "referral", schema=schema, catalogue=catalogue, max_size=2)
    directory = CaseDirectory(schema)
    with store.pool.connection() as conn:
        directory.migrate(conn)
    reference = ReferenceCatalogue.load()
    return IngestProcessor(
        ReferralService(store, directory, reference).streams,
        ReferralRules(reference),
        catalogue,
        districts.is_known,
        keys=keys,
        directory=directory,
        case_wait=settings.case_wait_seconds,
    )
