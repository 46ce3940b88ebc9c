"""HTTP entrypoint of the referral service: it only translates HTTP to commands and back,
and asks the access policy first.

Who may do what (`likvard.policy`): the case's own district refers a case and withdraws
its referrals (case workers; the case as known from intake, with its transfers); the
addressed unit's staff read, accept, decline, start and end interventions; a unit's staff
read its inbox, and every case the inbox shows is recorded in the access log. A referral
is read by the addressed unit and by the case's district (the sending district after a
transfer for 30 days; anyone's case worker with an emergency reason). Unit staff see of the
case only what the referral carries: its id, the districts and the intervention.

Overdue referrals (`services.referral.overdue`): requested and unanswered for more than
LIKVARD_REFERRAL_ANSWER_DAYS calendar days. The inbox marks them; a district's case workers
list their cases' overdue referrals (the policy's district-list action, `followups.due`,
as for the follow-ups due), and every case shown is recorded in the access log.

An id that names no referral (or intervention) answers 404 to any signed-in caller: a
random id shows nothing of a person, and there is no case to check or log.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from pydantic import BaseModel, Field

from likvard import deadlines, guard, http
from likvard.catalogue import ReferenceCatalogue
from likvard.codec import Catalogue
from likvard.config import Settings, load_settings
from likvard.eventstore import open_store
from likvard.identity import Principal
from likvard.known_cases import CaseDirectory, KnownCase
from likvard.policy import Action, CaseScope, Decision, DistrictScope, ReferralScope, UnitScope
from likvard.service import Decided
from likvard.telemetry import setup_tracing
from services.referral import domain as d
from services.referral.domain import (
    ConsentOverride,
    DeclineReason,
    InterventionOutcome,
    WithdrawReason,
)
from services.referral.overdue import overdue_in_districts, waiting
from services.referral.service import ReferralService

ReferralId = Annotated[uuid.UUID, Path(description="The referral id returned by POST /referrals")]
IfMatch = http.IfMatch
ETAG = {"description": 'The referral\'s stream version, e.g. "3"', "schema": {"type": "string"}}
COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"headers": {"ETag": ETAG}}}


class RequestReferralBody(http.Timed):
    case_id: uuid.UUID
    unit_id: str = Field(..., max_length=64, examples=["region-beroendevard"])
    intervention_code: str = Field(..., max_length=64)
    consent_id: uuid.UUID | None = Field(
        None, description="The recorded consent relied on (units outside social services)"
    )
    consent_override: ConsentOverride | None = Field(
        None, description="Why information is shared without consent, if it is"
    )


class AcceptBody(http.Timed):
    planned_start: http.Day | None = None


class DeclineBody(http.Timed):
    reason: DeclineReason


class WithdrawBody(http.Timed):
    reason: WithdrawReason


class StartBody(http.Timed):
    intervention_code: str | None = Field(
        None, max_length=64, description="Defaults to the referral's intervention"
    )


class EndBody(http.Timed):
    outcome: InterventionOutcome


class ReferralResult(BaseModel):
    referral_id: uuid.UUID
    case_id: uuid.UUID | None
    version: int
    events: list[http.EventRef]
    intervention_id: uuid.UUID | None = None


class ReferralView(BaseModel):
    referral_id: uuid.UUID
    case_id: uuid.UUID | None
    version: int
    status: str
    unit_id: str | None
    intervention_code: str | None
    recipient_kind: str | None
    person_district: str | None
    unit_district: str | None
    across_district: bool
    running_interventions: list[uuid.UUID]
    ended_interventions: list[uuid.UUID]


class InboxEntry(BaseModel):
    referral_id: uuid.UUID
    case_id: uuid.UUID
    intervention_code: str
    person_district: str
    status: str
    requested_at: datetime
    days_waiting: int | None = Field(
        ..., description="Calendar days since the request while it is unanswered, else null"
    )
    overdue: bool = Field(..., description="Unanswered more than LIKVARD_REFERRAL_ANSWER_DAYS")
    version: int = Field(..., description="The referral's stream version (If-Match of an answer)")
    running_interventions: list[uuid.UUID] = Field(
        ..., description="Interventions started under the referral and not yet ended"
    )


class OverdueEntry(BaseModel):
    referral_id: uuid.UUID
    case_id: uuid.UUID
    unit_id: str
    intervention_code: str
    district: str = Field(..., description="The case's current district")
    requested_at: datetime
    days_waiting: int


_NO_DISTRICT = "*"  # the scope of "the caller's own districts" for one who has none


def _district_scopes(principal: Principal, district: str | None) -> list[DistrictScope]:
    """The districts asked for: the one named, else the caller's own."""
    if district is not None:
        return [DistrictScope(district)]
    return [DistrictScope(x) for x in sorted(principal.districts)] or [DistrictScope(_NO_DISTRICT)]


def _service(request: Request) -> ReferralService:
    svc: ReferralService = request.app.state.service
    return svc


Svc = Annotated[ReferralService, Depends(_service)]
Ctx = guard.Ctx


def _case_scope(case_id: str, known: KnownCase | None, district: str | None) -> CaseScope:
    """The case as the policy sees it: as known from intake (current district, transfers),
    else the district the referral recorded."""
    if known is not None and known.status != "unknown":
        return known.scope()
    return CaseScope(case_id, district)


def _referral_scope(
    referral_id: str, state: d.ReferralState, case_id: str, known: KnownCase | None = None
) -> ReferralScope:
    return ReferralScope(
        referral_id, _case_scope(case_id, known, state.person_district), state.unit_id
    )


_NO_REFERRAL = ("referral-not-found", "Referral not found", "No referral has this id.")


def _result(
    referral_id: str,
    case_id: str | None,
    decided: Decided[d.ReferralState],
    response: Response,
    intervention_id: str | None = None,
) -> ReferralResult:
    response.headers["ETag"] = http.etag(decided.version)
    http.set_position(response, decided.stored)
    return ReferralResult(
        referral_id=uuid.UUID(referral_id),
        case_id=uuid.UUID(case_id) if case_id else None,
        version=decided.version,
        events=http.event_refs(decided.stored),
        intervention_id=uuid.UUID(intervention_id) if intervention_id else None,
    )


def _domain_problem(exc: d.DomainError) -> http.ProblemError:
    if isinstance(exc, d.ReferralNotFound):
        return http.ProblemError(404, exc.code, "Referral not found", exc.detail)
    if isinstance(exc, d.CaseNotFound):
        return http.ProblemError(422, exc.code, "Unknown case", exc.detail)
    return http.ProblemError(422, exc.code, "Rule violated", exc.detail)


def create_app(
    settings: Settings | None = None,
    *,
    schema: str = "referral",
    catalogue: Catalogue | None = None,
    reference: ReferenceCatalogue | None = None,
    case_wait: float | None = None,
) -> FastAPI:
    """Build the referral app; the pool, migrations and the case table are set up at start."""
    settings = settings or load_settings()
    wait = settings.case_wait_seconds if case_wait is None else case_wait
    settings.require_database()
    catalogue = catalogue or Catalogue.load()
    reference = reference or ReferenceCatalogue.load()
    setup_tracing("referral")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings, "referral", schema=schema, catalogue=catalogue, max_size=20)
        directory = CaseDirectory(schema)
        with store.pool.connection() as conn:
            directory.migrate(conn)
        app.state.service = ReferralService(store, directory, reference, case_wait=wait)
        try:
            yield
        finally:
            store.pool.close()

    app = FastAPI(
        title="Likvärd referral service",
        version="1.0.0",
        description="Referrals to specialist units in any district, acceptance, and the"
        " interventions given (codes from the national guidelines). A referral to a unit in"
        " another district than the person's also records `ReferredAcrossDistrict`. A unit"
        " outside the city's social services needs a recorded consent covering it, or an"
        " override with its reason. The service knows cases only from the intake topic: a"
        " case registered a moment ago may take a few seconds to be known here.",
        lifespan=lifespan,
        responses=http.PROBLEM_RESPONSES,
    )
    http.install(app, "referral", max_request_bytes=settings.max_request_bytes)
    guard.install(app, settings, "referral")

    def loaded(svc: ReferralService, referral_id: str) -> tuple[d.ReferralState, int, str]:
        """The referral and its case (one read of its stream), or 404."""
        state, version, case_id = svc.load(referral_id)
        if version == 0 or case_id is None:
            raise http.ProblemError(404, *_NO_REFERRAL)
        return state, version, case_id

    def act(
        request: Request,
        principal: Principal,
        action: Action,
        svc: ReferralService,
        referral_id: str,
        command: Any,
        if_match: str | None,
        ctx: http.RequestContext,
        response: Response,
        intervention_id: str | None = None,
    ) -> ReferralResult:
        """Check, then run a command on an existing referral. Answering it (the addressed
        unit) needs only what the referral holds; withdrawing it (the case's district)
        needs the case as known now."""
        expected = http.parse_if_match(if_match)
        state, _, case_id = loaded(svc, referral_id)
        known = None
        if action is not Action.REFERRAL_ANSWER:
            with svc.store.pool.connection() as conn:
                known = svc.directory.get(conn, case_id)
        scope = _referral_scope(referral_id, state, case_id, known)
        guard.authorize(request, principal, action, scope)
        try:
            decided = svc.act(referral_id, command, expected, ctx, case_id)
        except d.DomainError as exc:
            raise _domain_problem(exc) from exc
        return _result(referral_id, case_id, decided, response, intervention_id)

    @app.post(
        "/referrals",
        status_code=201,
        response_model=ReferralResult,
        tags=["referrals"],
        summary="Refer a case to a specialist unit (in any district)",
        description="A case worker of the case's current district refers it.",
        responses={201: {"headers": {"ETag": ETAG, "Location": {"schema": {"type": "string"}}}}},
        openapi_extra=guard.policy(Action.CASE_CHANGE),
    )
    def request_referral(
        request: Request,
        body: RequestReferralBody,
        svc: Svc,
        principal: guard.Caller,
        ctx: Ctx,
        response: Response,
    ) -> ReferralResult:
        known = svc.known_case(str(body.case_id))
        scope = _case_scope(str(body.case_id), known, None)
        guard.authorize(request, principal, Action.CASE_CHANGE, scope)
        referral_id = str(uuid.uuid4())
        command = d.RequestReferral(
            referral_id=referral_id,
            occurred_at=body.when(),
            case_id=str(body.case_id),
            unit_id=body.unit_id,
            intervention_code=body.intervention_code,
            consent_id=str(body.consent_id) if body.consent_id else None,
            consent_override=body.consent_override,
        )
        try:
            decided = svc.request(command, ctx, known)
        except d.DomainError as exc:
            raise _domain_problem(exc) from exc
        response.headers["Location"] = f"/referrals/{referral_id}"
        return _result(referral_id, str(body.case_id), decided, response)

    @app.post(
        "/referrals/{referral_id}/accept",
        response_model=ReferralResult,
        responses=COMMAND_RESPONSES,
        tags=["referrals"],
        summary="The unit accepts the referral",
        description="Staff of the unit the referral is addressed to.",
        openapi_extra=guard.policy(Action.REFERRAL_ANSWER),
    )
    def accept(
        request: Request,
        referral_id: ReferralId,
        body: AcceptBody,
        svc: Svc,
        principal: guard.Caller,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> ReferralResult:
        command = d.AcceptReferral(str(referral_id), body.when(), body.planned_start)
        return act(
            request,
            principal,
            Action.REFERRAL_ANSWER,
            svc,
            str(referral_id),
            command,
            if_match,
            ctx,
            response,
        )

    @app.post(
        "/referrals/{referral_id}/decline",
        response_model=ReferralResult,
        responses=COMMAND_RESPONSES,
        tags=["referrals"],
        summary="The unit declines the referral, with its reason",
        description="Staff of the unit the referral is addressed to.",
        openapi_extra=guard.policy(Action.REFERRAL_ANSWER),
    )
    def decline(
        request: Request,
        referral_id: ReferralId,
        body: DeclineBody,
        svc: Svc,
        principal: guard.Caller,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> ReferralResult:
        command = d.DeclineReferral(str(referral_id), body.when(), body.reason)
        return act(
            request,
            principal,
            Action.REFERRAL_ANSWER,
            svc,
            str(referral_id),
            command,
            if_match,
            ctx,
            response,
        )

    @app.post(
        "/referrals/{referral_id}/withdraw",
        response_model=ReferralResult,
        responses=COMMAND_RESPONSES,
        tags=["referrals"],
        summary="The referring district withdraws the referral",
        description="A case worker of the case's current district.",
        openapi_extra=guard.policy(Action.CASE_CHANGE),
    )
    def withdraw(
        request: Request,
        referral_id: ReferralId,
        body: WithdrawBody,
        svc: Svc,
        principal: guard.Caller,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> ReferralResult:
        command = d.WithdrawReferral(str(referral_id), body.when(), body.reason)
        return act(
            request,
            principal,
            Action.CASE_CHANGE,
            svc,
            str(referral_id),
            command,
            if_match,
            ctx,
            response,
        )

    @app.post(
        "/referrals/{referral_id}/interventions",
        status_code=201,
        response_model=ReferralResult,
        responses={201: {"headers": {"ETag": ETAG}}},
        tags=["interventions"],
        summary="Start an intervention under an accepted referral",
        description="Staff of the unit the referral is addressed to.",
        openapi_extra=guard.policy(Action.REFERRAL_ANSWER),
    )
    def start_intervention(
        request: Request,
        referral_id: ReferralId,
        body: StartBody,
        svc: Svc,
        principal: guard.Caller,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> ReferralResult:
        intervention_id = str(uuid.uuid4())
        command = d.StartIntervention(
            str(referral_id), body.when(), intervention_id, body.intervention_code
        )
        return act(
            request,
            principal,
            Action.REFERRAL_ANSWER,
            svc,
            str(referral_id),
            command,
            if_match,
            ctx,
            response,
            intervention_id,
        )

    @app.post(
        "/interventions/{intervention_id}/end",
        response_model=ReferralResult,
        responses=COMMAND_RESPONSES,
        tags=["interventions"],
        summary="End an intervention, with its outcome",
        description="Staff of the unit the referral is addressed to.",
        openapi_extra=guard.policy(Action.REFERRAL_ANSWER),
    )
    def end_intervention(
        request: Request,
        intervention_id: uuid.UUID,
        body: EndBody,
        svc: Svc,
        principal: guard.Caller,
        ctx: Ctx,
        response: Response,
        if_match: IfMatch = None,
    ) -> ReferralResult:
        referral_id = svc.referral_of_intervention(str(intervention_id))
        if referral_id is None:
            raise http.ProblemError(
                404,
                "intervention-not-found",
                "Intervention not found",
                "No intervention has this id.",
            )
        command = d.EndIntervention(referral_id, body.when(), str(intervention_id), body.outcome)
        return act(
            request,
            principal,
            Action.REFERRAL_ANSWER,
            svc,
            referral_id,
            command,
            if_match,
            ctx,
            response,
            str(intervention_id),
        )

    @app.get(
        "/referrals/overdue",
        response_model=list[OverdueEntry],
        tags=["referrals"],
        summary="Referrals of a district's cases unanswered for too long",
        description="Referrals requested and neither accepted, declined nor withdrawn for"
        " more than LIKVARD_REFERRAL_ANSWER_DAYS calendar days, oldest first, by the case's"
        " current district. Case workers, for their own districts (all of them when none is"
        " named; another district only with an emergency reason, logged and flagged). Every"
        " case the answer shows is recorded in the access log.",
        openapi_extra=guard.policy(Action.FOLLOWUPS_DUE),
    )
    def overdue_referrals(
        request: Request,
        svc: Svc,
        principal: guard.Caller,
        district: Annotated[
            str | None,
            Query(min_length=1, max_length=64, description="e.g. 'nordost'; default: yours"),
        ] = None,
        emergency: guard.EmergencyReason = None,
    ) -> list[OverdueEntry]:
        checked: list[tuple[DistrictScope, Decision]] = [
            (
                scope,
                guard.authorize(
                    request, principal, Action.FOLLOWUPS_DUE, scope, emergency=emergency
                ),
            )
            for scope in _district_scopes(principal, district)
        ]
        today = deadlines.city_today()
        days = settings.referral_answer_days
        shown = overdue_in_districts(svc.store, [s.district for s, _ in checked], today, days)
        for scope, decision in checked:
            guard.record_reads(
                request,
                principal,
                Action.FOLLOWUPS_DUE,
                decision,
                scope,
                (r.case_id for r in shown if r.district == scope.district),
                emergency=emergency,
            )
        return [
            OverdueEntry(
                referral_id=uuid.UUID(r.referral_id),
                case_id=uuid.UUID(r.case_id),
                unit_id=r.unit_id,
                intervention_code=r.intervention_code,
                district=r.district,
                requested_at=r.requested_at,
                days_waiting=deadlines.days_since(d.local_date(r.requested_at), today),
            )
            for r in shown
        ]

    @app.get(
        "/referrals/{referral_id}",
        response_model=ReferralView,
        responses={200: {"headers": {"ETag": ETAG}}},
        tags=["referrals"],
        summary="The referral's current state, folded from its events",
        description="The addressed unit's staff, and case workers of the case's district"
        " (the sending district for 30 days after a transfer; any case worker with an"
        " emergency reason, logged and flagged).",
        openapi_extra=guard.policy(Action.REFERRAL_READ),
    )
    def get_referral(
        request: Request,
        referral_id: ReferralId,
        svc: Svc,
        principal: guard.Caller,
        response: Response,
        emergency: guard.EmergencyReason = None,
    ) -> ReferralView:
        state, version, case_id = loaded(svc, str(referral_id))
        with svc.store.pool.connection() as conn:
            known = svc.directory.get(conn, case_id)
        scope = _referral_scope(str(referral_id), state, case_id, known)
        guard.authorize(request, principal, Action.REFERRAL_READ, scope, emergency=emergency)
        response.headers["ETag"] = http.etag(version)
        return ReferralView(
            referral_id=referral_id,
            case_id=uuid.UUID(case_id) if case_id else None,
            version=version,
            status=state.status,
            unit_id=state.unit_id,
            intervention_code=state.intervention_code,
            recipient_kind=state.recipient_kind,
            person_district=state.person_district,
            unit_district=state.unit_district,
            across_district=state.across_district,
            running_interventions=[uuid.UUID(i) for i in state.running],
            ended_interventions=[uuid.UUID(i) for i in sorted(state.ended)],
        )

    @app.get(
        "/units/{unit_id}/referrals",
        response_model=list[InboxEntry],
        tags=["units"],
        summary="A specialist unit's inbox of referrals, from every district",
        description="The unit's own staff. Every case the answer shows is recorded in the"
        " access log. A referral unanswered for more than LIKVARD_REFERRAL_ANSWER_DAYS"
        " calendar days is `overdue`.",
        openapi_extra=guard.policy(Action.UNIT_INBOX),
    )
    def unit_inbox(
        request: Request,
        unit_id: Annotated[str, Path(max_length=64)],
        svc: Svc,
        principal: guard.Caller,
        status: Literal["requested", "accepted", "declined", "withdrawn"] | None = Query(None),
        overdue: bool | None = Query(
            None, description="true: only overdue referrals; false: only those not overdue"
        ),
    ) -> list[InboxEntry]:
        scope = UnitScope(unit_id)
        decision = guard.authorize(request, principal, Action.UNIT_INBOX, scope)
        if svc.reference.unit(unit_id) is None:
            raise http.ProblemError(404, "unknown-unit", "Unknown unit", "No unit has this id.")
        today = deadlines.city_today()
        days = settings.referral_answer_days
        judged = [
            (i, waiting(i.status, i.requested_at, today, days))
            for i in svc.unit_inbox(unit_id, status)
        ]
        items = [(i, w) for i, w in judged if overdue is None or w.overdue is overdue]
        guard.record_reads(
            request, principal, Action.UNIT_INBOX, decision, scope, (i.case_id for i, _ in items)
        )
        return [
            InboxEntry(
                referral_id=uuid.UUID(i.referral_id),
                case_id=uuid.UUID(i.case_id),
                intervention_code=i.intervention_code,
                person_district=i.person_district,
                status=i.status,
                requested_at=i.requested_at,
                days_waiting=w.days_waiting,
                overdue=w.overdue,
                version=i.version,
                running_interventions=[uuid.UUID(r) for r in i.running_interventions],
            )
            for i, w in items
        ]

    http.add_health(app, lambda request: request.app.state.service.store.ping())

    return app
