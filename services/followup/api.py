"""HTTP entrypoint of the follow-up service: it only translates HTTP to commands and back.

The service learns which cases exist only from `likvard.intake.v1` (its `known_cases`
table, filled by the consumer in `services.followup.process`); a command on a case it has
not seen yet waits a moment for the intake event, then answers 404 "case-not-known".

Who may do what (`likvard.policy`): case workers of the case's current district record
family work and complete follow-ups, and read the case's follow-ups (the sending district
for 30 days after a transfer; any case worker with an emergency reason, logged and
flagged); the follow-ups due are read per district, the caller's own unless one is named,
and every case the answer shows is recorded in the access log.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import date
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from pydantic import BaseModel, Field

from likvard import guard, http
from likvard.codec import Catalogue
from likvard.config import Settings, load_settings
from likvard.eventstore import open_store
from likvard.identity import Principal
from likvard.known_cases import CaseDirectory, KnownCase
from likvard.policy import Action, CaseScope, Decision, DistrictScope
from likvard.telemetry import setup_tracing
from services.followup import domain as d
from services.followup.domain import (
    GoalsReached,
    Housing,
    Improvement,
    MissedReason,
    Occupation,
    Rating,
    Relation,
    Support,
)
from services.followup.overdue import Window, due_in_window
from services.followup.service import (
    FollowUpService,
    case_of_followup,
    make_service,
    prepare,
)

ETAG_HEADER = {
    "description": 'The case\'s follow-up stream version as an entity tag, e.g. "3": send it'
    " in If-Match.",
    "schema": {"type": "string"},
}
COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"headers": {"ETag": ETAG_HEADER}}}

CaseId = Annotated[uuid.UUID, Path(description="The case id (as registered by intake)")]
FollowUpId = Annotated[uuid.UUID, Path(description="The follow-up id (see GET followups)")]
IfMatch = http.IfMatch


class RecordChildren(http.Timed):
    number_of_children: int = Field(
        ..., ge=0, le=d.MAX_CHILDREN, description="Children under 18 in the household; 0 if none"
    )
    youngest_age: int | None = Field(
        None, ge=0, le=d.MAX_CHILD_AGE, description="Age of the youngest child, if known"
    )


class EngageFamilyMember(http.Timed):
    member_id: uuid.UUID | None = Field(
        None,
        description="Id of the family member within the case; leave out for a new member"
        " (one is generated), give it again to engage the same member again.",
    )
    relation: Relation
    is_child: bool = Field(..., description="Whether the member is under 18 now")
    support_offered: list[Support] = Field(..., min_length=1, max_length=7)
    accepted: bool


class CompleteFollowUp(http.Timed):
    days_of_use_last_30: int | None = Field(None, ge=0, le=d.MAX_DAYS_OF_USE)
    housing: Housing
    occupation: Occupation
    self_rated_health: int | None = Field(None, ge=1, le=5)
    goals_reached: GoalsReached
    situation_improved: Improvement


class MarkMissed(http.Timed):
    reason: MissedReason


class RecordUserAssessment(http.Timed):
    """The national user survey's items, each on its fixed scale (NO_ANSWER: not answered)."""

    contact_easy: Rating = Field(..., description="It was easy to get in contact")
    clear_information: Rating = Field(..., description="The information was clear")
    felt_understood: Rating = Field(..., description="The person felt understood")
    influence: Rating = Field(..., description="The person could influence the help")
    whole_situation: Rating = Field(
        ..., description="The help took the person's whole situation into account"
    )
    situation_improved: Rating = Field(..., description="The situation has improved")


class CommandResult(BaseModel):
    case_id: uuid.UUID
    version: int = Field(..., description="The case's follow-up stream version after the command")
    events: list[http.EventRef]
    member_id: uuid.UUID | None = Field(None, description="The family member's id (family only)")
    assessment_id: uuid.UUID | None = Field(
        None, description="The user assessment's id (user assessments only)"
    )


class FollowUpView(BaseModel):
    followup_id: uuid.UUID
    kind: str
    due_on: date | None
    status: str
    district: str | None


class CaseFollowUpsView(BaseModel):
    case_id: uuid.UUID
    version: int
    number_of_children: int | None
    youngest_age: int | None
    family_members: dict[str, str] = Field(..., description="member_id -> relation")
    child_engaged: bool
    followups: list[FollowUpView]


class DueView(BaseModel):
    case_id: uuid.UUID
    followup_id: uuid.UUID
    kind: str
    due_on: date
    district: str
    intervention_id: uuid.UUID | None
    referral_id: uuid.UUID | None
    overdue: bool = Field(..., description="More than LIKVARD_FOLLOWUP_WINDOW_DAYS past due")


def _service(request: Request) -> FollowUpService:
    svc: FollowUpService = request.app.state.service
    return svc


def _directory(request: Request) -> CaseDirectory:
    directory: CaseDirectory = request.app.state.directory
    return directory


Svc = Annotated[FollowUpService, Depends(_service)]
Directory = Annotated[CaseDirectory, Depends(_directory)]
Ctx = guard.Ctx

_NO_DISTRICT = "*"  # the scope of "the caller's own districts" for one who has none


def _known(svc: FollowUpService, directory: CaseDirectory, case_id: str) -> KnownCase | None:
    with svc.store.pool.connection() as conn:
        return directory.get(conn, case_id)


def _registered(known: KnownCase | None) -> KnownCase | None:
    return known if known is not None and known.status != "unknown" else None


def _scope(case_id: str, known: KnownCase | None, district: str | None) -> CaseScope:
    """The case as the policy sees it: as known from intake (current district, transfers),
    else the district its follow-up stream names (None: no such case)."""
    registered = _registered(known)
    return registered.scope() if registered is not None else CaseScope(case_id, district)


def _due_scopes(principal: Principal, district: str | None) -> list[DistrictScope]:
    """The districts whose follow-ups are asked for: the one named, else the caller's own."""
    if district is not None:
        return [DistrictScope(district)]
    return [DistrictScope(x) for x in sorted(principal.districts)] or [DistrictScope(_NO_DISTRICT)]


def create_app(
    settings: Settings | None = None,
    *,
    schema: str = "followup",
    catalogue: Catalogue | None = None,
    case_wait: float | None = None,
) -> FastAPI:
    """Build the follow-up app; the pool and migrations are set up when it starts."""
    settings = settings or load_settings()
    wait = settings.case_wait_seconds if case_wait is None else case_wait
    settings.require_database()
    catalogue = catalogue or Catalogue.load()
    setup_tracing("followup")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings, "followup", schema=schema, catalogue=catalogue, max_size=20)
        directory = CaseDirectory(schema)
        with store.pool.connection() as conn:
            directory.migrate(conn)
            conn.commit()
            prepare(conn, schema)
        app.state.service = make_service(store)
        app.state.directory = directory
        try:
            yield
        finally:
            store.pool.close()

    app = FastAPI(
        title="Likvärd follow-up service",
        version="1.0.0",
        description="Records the work with the person's family (children in the household,"
        " family members engaged and the support offered them), the person's own rating of"
        " the help (the national user-survey items) and the follow-ups after an"
        " intervention: scheduled by the service when an intervention ends (an interview"
        " within a month for interventions longer than 7 days, ASI at 6 and 12 months),"
        " completed with their outcomes or marked missed. Send the version you last saw in"
        " `If-Match` to be told (409) when someone changed the case meanwhile.",
        lifespan=lifespan,
        responses=http.PROBLEM_RESPONSES,
    )
    http.install(app, "followup", max_request_bytes=settings.max_request_bytes)
    guard.install(app, settings, "followup")

    def checked_case(
        request: Request,
        principal: Principal,
        svc: FollowUpService,
        directory: CaseDirectory,
        case_id: str,
    ) -> KnownCase:
        """The case as learnt from intake (waiting up to `case_wait` for its intake event),
        once the caller may change it. A closed case is fine: family work and follow-up go
        on after closing."""
        known = _registered(directory.wait_for(svc.store.pool, case_id, wait))
        guard.authorize(request, principal, Action.CASE_CHANGE, _scope(case_id, known, None))
        if known is None:
            raise http.ProblemError(
                404,
                "case-not-known",
                "Case not known",
                "The follow-up service has not (yet) seen a case with this id from intake:"
                " the case is unknown or its registration is still on its way. Check the"
                " id and retry in a few seconds.",
            )
        return known

    def run(
        svc: Svc,
        case_id: str,
        command: d.Command,
        if_match: str | None,
        ctx: http.RequestContext,
        response: Response,
        district: str | None,
    ) -> CommandResult:
        expected = http.parse_if_match(if_match)
        try:
            decided = svc.execute(case_id, command, expected, ctx, district=district)
        except d.FollowUpNotFound as exc:
            raise http.ProblemError(404, exc.code, "Follow-up not found", exc.detail) from exc
        except d.DomainError as exc:
            raise http.ProblemError(422, exc.code, "Rule violated", exc.detail) from exc
        response.headers["ETag"] = http.etag(decided.version)
        http.set_position(response, decided.stored)
        return CommandResult(
            case_id=uuid.UUID(case_id),
            version=decided.version,
            events=http.event_refs(decided.stored),
            member_id=None,
            assessment_id=None,
        )

    def followup_case(svc: FollowUpService, followup_id: uuid.UUID) -> str:
        case_id = case_of_followup(svc.store, str(followup_id))
        if case_id is None:
            raise http.ProblemError(
                404, "followup-not-found", "Follow-up not found", "No follow-up has this id."
            )
        return case_id

    def followup_district(
        request: Request,
        principal: Principal,
        svc: FollowUpService,
        directory: CaseDirectory,
        case_id: str,
        followup_id: uuid.UUID,
    ) -> str | None:
        """Check that the caller may change the follow-up's case; its district now (it may
        have moved), else the one the follow-up was scheduled in."""
        known = _registered(_known(svc, directory, case_id))
        district = None if known is None else known.district
        if known is None:
            state, _, _ = svc.load(case_id)
            followup = state.followups.get(str(followup_id))
            district = None if followup is None else followup.district
        scope = _scope(case_id, known, district)
        guard.authorize(request, principal, Action.CASE_CHANGE, scope)
        return district

    @app.post(
        "/cases/{case_id}/children",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["family"],
        summary="Record how many children live in the person's household",
        description="A case worker of the case's current district.",
        openapi_extra=guard.policy(Action.CASE_CHANGE),
    )
    def record_children(
        request: Request,
        principal: guard.Caller,
        case_id: CaseId,
        body: RecordChildren,
        svc: Svc,
        directory: Directory,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        http.parse_if_match(if_match)  # a malformed one is refused before waiting
        known = checked_case(request, principal, svc, directory, str(case_id))
        command = d.RecordChildrenInHousehold(
            case_id=str(case_id),
            occurred_at=body.when(),
            number_of_children=body.number_of_children,
            youngest_age=body.youngest_age,
        )
        return run(svc, str(case_id), command, if_match, ctx, response, known.district)

    @app.post(
        "/cases/{case_id}/family",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["family"],
        summary="Record that a family member was engaged and offered support",
        description="A case worker of the case's current district.",
        openapi_extra=guard.policy(Action.CASE_CHANGE),
    )
    def engage_family_member(
        request: Request,
        principal: guard.Caller,
        case_id: CaseId,
        body: EngageFamilyMember,
        svc: Svc,
        directory: Directory,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        http.parse_if_match(if_match)
        known = checked_case(request, principal, svc, directory, str(case_id))
        member_id = body.member_id or uuid.uuid4()
        command = d.EngageFamilyMember(
            case_id=str(case_id),
            occurred_at=body.when(),
            member_id=str(member_id),
            relation=body.relation,
            is_child=body.is_child,
            support_offered=tuple(body.support_offered),
            accepted=body.accepted,
        )
        result = run(svc, str(case_id), command, if_match, ctx, response, known.district)
        result.member_id = member_id
        return result

    @app.post(
        "/cases/{case_id}/user-assessments",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["follow-ups"],
        summary="Record the person's own rating of the help (the national user-survey items)",
        description="A case worker of the case's current district; closed cases too (the"
        " survey is often asked at the follow-up after the case closed).",
        openapi_extra=guard.policy(Action.CASE_CHANGE),
    )
    def record_user_assessment(
        request: Request,
        principal: guard.Caller,
        case_id: CaseId,
        body: RecordUserAssessment,
        svc: Svc,
        directory: Directory,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        http.parse_if_match(if_match)
        known = checked_case(request, principal, svc, directory, str(case_id))
        assessment_id = uuid.uuid4()
        command = d.RecordUserAssessment(
            case_id=str(case_id),
            occurred_at=body.when(),
            assessment_id=str(assessment_id),
            contact_easy=body.contact_easy,
            clear_information=body.clear_information,
            felt_understood=body.felt_understood,
            influence=body.influence,
            whole_situation=body.whole_situation,
            situation_improved=body.situation_improved,
        )
        result = run(svc, str(case_id), command, if_match, ctx, response, known.district)
        result.assessment_id = assessment_id
        return result

    @app.post(
        "/followups/{followup_id}/complete",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["follow-ups"],
        summary="Record a follow-up as done, with its outcomes",
        description="A case worker of the case's current district.",
        openapi_extra=guard.policy(Action.CASE_CHANGE),
    )
    def complete_followup(
        request: Request,
        principal: guard.Caller,
        followup_id: FollowUpId,
        body: CompleteFollowUp,
        svc: Svc,
        directory: Directory,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        case_id = followup_case(svc, followup_id)
        command = d.CompleteFollowUp(
            case_id=case_id,
            occurred_at=body.when(),
            followup_id=str(followup_id),
            days_of_use_last_30=body.days_of_use_last_30,
            housing=body.housing,
            occupation=body.occupation,
            self_rated_health=body.self_rated_health,
            goals_reached=body.goals_reached,
            situation_improved=body.situation_improved,
        )
        district = followup_district(request, principal, svc, directory, case_id, followup_id)
        return run(svc, case_id, command, if_match, ctx, response, district)

    @app.post(
        "/followups/{followup_id}/missed",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["follow-ups"],
        summary="Record that a follow-up could not be done, and why",
        description="A case worker of the case's current district.",
        openapi_extra=guard.policy(Action.CASE_CHANGE),
    )
    def mark_followup_missed(
        request: Request,
        principal: guard.Caller,
        followup_id: FollowUpId,
        body: MarkMissed,
        svc: Svc,
        directory: Directory,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        case_id = followup_case(svc, followup_id)
        command = d.MarkFollowUpMissed(
            case_id=case_id,
            occurred_at=body.when(),
            followup_id=str(followup_id),
            reason=body.reason,
        )
        district = followup_district(request, principal, svc, directory, case_id, followup_id)
        return run(svc, case_id, command, if_match, ctx, response, district)

    @app.get(
        "/cases/{case_id}/followups",
        response_model=CaseFollowUpsView,
        responses={200: {"headers": {"ETag": ETAG_HEADER}}},
        tags=["follow-ups"],
        summary="The case's family work and follow-ups, folded from its events",
        description="Case workers of the case's district (the sending district for 30 days"
        " after a transfer; any case worker with an emergency reason, logged and flagged).",
        openapi_extra=guard.policy(Action.CASE_READ),
    )
    def get_case_followups(
        request: Request,
        principal: guard.Caller,
        case_id: CaseId,
        svc: Svc,
        directory: Directory,
        response: Response,
        emergency: guard.EmergencyReason = None,
    ) -> CaseFollowUpsView:
        known = _registered(_known(svc, directory, str(case_id)))
        state, version, events = svc.load(str(case_id))
        named = str(events[-1].metadata.get("district") or "") if events else ""
        scope = _scope(str(case_id), known, named or None)
        guard.authorize(request, principal, Action.CASE_READ, scope, emergency=emergency)
        if version == 0 and known is None:
            raise http.ProblemError(
                404,
                "case-not-known",
                "Case not known",
                "The follow-up service has not (yet) seen a case with this id: the case is"
                " unknown or its registration is still on its way. Retry in a few seconds.",
            )
        response.headers["ETag"] = http.etag(version)
        return CaseFollowUpsView(
            case_id=case_id,
            version=version,
            number_of_children=state.number_of_children,
            youngest_age=state.youngest_age,
            family_members=dict(state.family_members),
            child_engaged=state.child_engaged,
            followups=sorted(
                (
                    FollowUpView(
                        followup_id=uuid.UUID(fid),
                        kind=f.kind,
                        due_on=f.due_on,
                        status=f.status,
                        district=f.district,
                    )
                    for fid, f in state.followups.items()
                ),
                key=lambda f: (f.due_on or date.max, str(f.followup_id)),
            ),
        )

    @app.get(
        "/followups/due",
        response_model=list[DueView],
        tags=["follow-ups"],
        summary="Follow-ups still to do (neither completed nor missed) due before a date",
        description="Case workers, for their own districts (all of them when no district is"
        " named; another district only with an emergency reason, logged and flagged). Every"
        " case the answer shows is recorded in the access log.",
        openapi_extra=guard.policy(Action.FOLLOWUPS_DUE),
    )
    def get_due(
        request: Request,
        principal: guard.Caller,
        svc: Svc,
        before: Annotated[
            http.Day,
            Query(description="Only follow-ups due before this date (exclusive), 1900-2099"),
        ],
        district: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=64,
                description="Only follow-ups scheduled in this district, e.g. 'nordost';"
                " by default those of every district of the caller",
            ),
        ] = None,
        overdue: Annotated[
            bool | None,
            Query(description="true: only those past their window; false: only those within"),
        ] = None,
        emergency: guard.EmergencyReason = None,
    ) -> list[DueView]:
        # Own districts need no reason (the policy flags nothing then); an unknown one is
        # refused by the policy whatever the district, as on every other read.
        reason = emergency
        checked: list[tuple[DistrictScope, Decision]] = [
            (
                scope,
                guard.authorize(request, principal, Action.FOLLOWUPS_DUE, scope, emergency=reason),
            )
            for scope in _due_scopes(principal, district)
        ]
        districts: Sequence[str] = [scope.district for scope, _ in checked]
        window = Window.now(settings.followup_window_days)
        shown = due_in_window(svc.store, districts, before, window, overdue)
        for scope, decision in checked:
            guard.record_reads(
                request,
                principal,
                Action.FOLLOWUPS_DUE,
                decision,
                scope,
                (f.case_id for f in shown if f.district == scope.district),
                emergency=reason,
            )
        return [
            DueView(
                case_id=uuid.UUID(f.case_id),
                followup_id=uuid.UUID(f.followup_id),
                kind=f.kind,
                due_on=f.due_on,
                district=f.district,
                intervention_id=None if f.intervention_id is None else uuid.UUID(f.intervention_id),
                referral_id=None if f.referral_id is None else uuid.UUID(f.referral_id),
                overdue=window.overdue(f.due_on),
            )
            for f in shown
        ]

    http.add_health(app, lambda request: request.app.state.service.store.ping())

    return app
