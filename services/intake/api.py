"""HTTP entrypoint of the intake service: it translates HTTP to commands and back, and asks
the access policy first (every route declares its action; a case's scope is its current
district and the districts it left, folded from the same read that serves the request)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Request, Response
from pydantic import BaseModel, Field

from likvard import guard, http
from likvard.archive import in_archive_sample
from likvard.codec import Catalogue
from likvard.config import Settings, load_settings
from likvard.districts import DistrictRegistry
from likvard.eventstore import StoredEvent, open_store
from likvard.identity import Principal
from likvard.keys import kek_from_settings, open_key_store
from likvard.policy import (
    Action,
    CaseScope,
    DistrictScope,
    SystemScope,
    sees_personal_text,
    sees_pseudonym,
)
from likvard.pseudonym import InvalidIdentityNumber, pseudonymise
from likvard.telemetry import setup_tracing
from services.intake import domain as d
from services.intake.domain import (
    ChildrenInHousehold,
    CloseReason,
    ConsentRecipient,
    Gender,
    Instrument,
    InterventionKind,
    InvestigationBasis,
    InvestigationDecision,
    NeedLevel,
    Party,
    ReferralSource,
    ReopenReason,
    Substance,
    TransferReason,
)
from services.intake.erasure import LEGAL_BASES, erase_person
from services.intake.personal import IntakePersonalData, attach, keys_schema_for
from services.intake.pseudonyms_api import pseudonyms_router
from services.intake.service import IntakeService, make_service

ETAG_HEADER = {
    "description": 'The case\'s stream version as an entity tag, e.g. "3": send it in If-Match.',
    "schema": {"type": "string"},
}
LOCATION_HEADER = {
    "description": "Where the new case is: /cases/{case_id}",
    "schema": {"type": "string"},
}
COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"headers": {"ETag": ETAG_HEADER}}}

CaseId = Annotated[uuid.UUID, Path(description="The case id returned by POST /cases")]
IfMatch = http.IfMatch

# 10 or 12 digits, (YY)YYMMDD-NNNC with the separator optional ('+' for 100 years or older);
# the day is 61-91 in a coordination number. The Luhn check digit C is checked by the
# service (422 invalid-identity-number): no pattern can state it.
IDENTITY_NUMBER_PATTERN = (
    r"^([0-9]{2})?[0-9]{2}(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01]|6[1-9]|[78][0-9]|9[01])"
    r"[-+]?[0-9]{4}$"
)
District = Annotated[
    str,
    Field(
        description="District code valid on the date, e.g. 'nordost'; an unknown one, or one"
        " not valid on the date, gives 422.",
        examples=["nordost"],
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9-]{1,64}$",
    ),
]


class RegisterCase(http.Timed):
    personal_identity_number: str = Field(
        ...,
        description="Swedish personal identity or coordination number: 10 or 12 digits as"
        " (YY)YYMMDD-NNNC, the separator optional ('+' for a person 100 or older), the day"
        " plus 60 in a coordination number. C is the Luhn (mod 10) check digit of the ten"
        " digits YYMMDDNNN: a wrong one gives 422 `invalid-identity-number`. Only its keyed"
        " pseudonym is stored; the number itself never is.",
        examples=["19121212-1212"],
        min_length=10,
        max_length=13,
        pattern=IDENTITY_NUMBER_PATTERN,
    )
    district: District
    substances: list[Substance] = Field(..., min_length=1)
    referral_source: ReferralSource
    children_in_household: ChildrenInHousehold
    birth_year: int | None = Field(None, ge=1900, le=2100)
    gender: Gender = Field(
        "NOT_STATED",
        description="The person's gender as they state it, a code for the indicators'"
        " breakdowns (not sealed: it is not a personal detail); NOT_STATED if they do not say",
    )


class ScoreIn(BaseModel):
    scale: str = Field(..., max_length=64, examples=["total"])
    value: int


class CompleteAssessment(http.Timed):
    instrument: Instrument
    scores: list[ScoreIn] = Field(..., min_length=1, max_length=20)
    need_level: NeedLevel


class AgreeCarePlan(http.Timed):
    goals: list[str] = Field(
        ..., min_length=1, max_length=20, description="The person's own goals, in their words"
    )
    person_participated: bool
    review_on: http.Day | None = None


class RecordConsent(http.Timed):
    recipients: list[ConsentRecipient] = Field(..., min_length=1)
    valid_until: http.Day | None = None


class WithdrawConsent(http.Timed):
    pass


class TransferCase(http.Timed):
    to_district: District
    reason: TransferReason


class CloseCase(http.Timed):
    reason: CloseReason


class ReopenCase(http.Timed):
    reason: ReopenReason


class OpenInvestigation(http.Timed):
    basis: InvestigationBasis = Field(
        ..., description="What the investigation (SoL 11 kap. 1 §) was opened on"
    )


class DecideInvestigation(http.Timed):
    decision: InvestigationDecision
    intervention_kinds: list[InterventionKind] = Field(
        default_factory=list,
        max_length=5,
        description="The kinds of intervention decided, each once: at least one if granted or"
        " partly granted, none if refused",
    )


class HoldFirstVisit(http.Timed):
    pass


class AgreeCoordinatedPlan(http.Timed):
    parties: list[Party] = Field(
        ...,
        min_length=1,
        max_length=5,
        description="The parties by kind, each once: SOCIAL_SERVICES and at least one other",
    )
    lead: Party = Field(..., description="The party holding the overall responsibility")
    follow_up_on: http.Day = Field(..., description="When the plan is to be followed up")
    consent_id: uuid.UUID = Field(
        ..., description="The person's consent in force that covers HEALTHCARE"
    )


class FollowUpCoordinatedPlan(http.Timed):
    pass


class EraseData(BaseModel):
    legal_basis: Literal[
        "retention-period-ended", "erasure-request", "wrongly-recorded", "authority-decision"
    ] = Field(..., description="Why the person's personal data is erased (a fixed list)")


class ErasureResult(BaseModel):
    cases: list[uuid.UUID] = Field(..., description="The person's cases")
    recorded: list[uuid.UUID] = Field(
        ..., description="The cases that got a PersonalDataErased now (the others had it)"
    )
    keys_destroyed: int = Field(..., description="Data keys destroyed now (0: already done)")


class CommandResult(BaseModel):
    case_id: uuid.UUID
    version: int = Field(..., description="The case's stream version after the command")
    events: list[http.EventRef]
    investigation_id: uuid.UUID | None = Field(
        None, description="The investigation's id (opening an investigation only)"
    )
    plan_id: uuid.UUID | None = Field(
        None, description="The coordinated plan's id (agreeing a plan only)"
    )


class CaseView(BaseModel):
    case_id: uuid.UUID
    version: int
    status: str
    district: str | None
    person: str | None = Field(
        None,
        description="Keyed pseudonym of the person: shown to case workers and auditors only",
    )
    age_band: str | None = Field(None, description="Age band at intake, e.g. 25-34")
    gender: str | None = Field(None, description="Gender code at intake, e.g. NOT_STATED")
    archive_sample: bool = Field(
        False, description="Whether the city's archive decision keeps the case from culling"
    )
    personal_data_erased: bool = Field(
        False, description="Whether the person's personal details were erased"
    )
    substances: list[str]
    referral_source: str | None
    children_in_household: str | None
    need_level: str | None
    assessments: int
    care_plans: int
    active_consents: dict[str, list[str]]
    investigations: dict[str, str | None] = Field(
        default_factory=dict,
        description="investigation_id -> its decision (null while the investigation is open)",
    )
    first_visit_at: datetime | None = Field(
        None, description="When the first personal visit was held"
    )
    coordinated_plans: dict[str, bool] = Field(
        default_factory=dict, description="plan_id -> whether the plan was followed up"
    )


class EventView(BaseModel):
    event_id: uuid.UUID
    event_type: str
    stream_version: int
    global_position: int
    occurred_at: datetime
    recorded_at: datetime
    metadata: dict[str, Any]
    payload: dict[str, Any] = Field(
        ...,
        description="The event's data. Personal details (goals, birth year) are sealed with"
        " the person's key: `personal` says whether they are shown ('open'), not shown to"
        " your role ('withheld'), or gone ('erased')",
    )
    hash: str = Field(..., description="SHA-256 hash-chain link of this event (hex)")
    prev_hash: str


async def _service(request: Request) -> IntakeService:
    """A coroutine, so FastAPI resolves it on the event loop, not with a thread hop."""
    svc: IntakeService = request.app.state.service
    return svc


Svc = Annotated[IntakeService, Depends(_service)]
Ctx = guard.Ctx


def case_scope(case_id: str, state: d.CaseState) -> CaseScope:
    """The case as the policy sees it (no district: no such case)."""
    return CaseScope(case_id, state.district if state.exists else None, state.transfers)


def _result(case_id: uuid.UUID, decided: Any, response: Response) -> CommandResult:
    response.headers["ETag"] = http.etag(decided.version)
    http.set_position(response, decided.stored)
    return CommandResult(
        case_id=case_id,
        version=decided.version,
        events=http.event_refs(decided.stored),
        investigation_id=None,
        plan_id=None,
    )


def _json_answer(result: BaseModel, status: int, response: Response) -> Response:
    """The answer as JSON, with the headers set on `response`. Built here because FastAPI,
    given a model, validates it again against `response_model` (and for a plain function,
    in a thread-pool hop of its own); the model was built valid a line before."""
    answer = Response(result.model_dump_json(), status_code=status, media_type="application/json")
    answer.headers.raw.extend(response.headers.raw)
    return answer


def _event_view(e: StoredEvent, payload: dict[str, Any]) -> EventView:
    return EventView(
        event_id=e.event_id,
        event_type=e.event_type,
        stream_version=e.stream_version,
        global_position=e.global_position,
        occurred_at=e.occurred_at,
        recorded_at=e.recorded_at,
        metadata=e.metadata,
        payload=payload,
        hash=e.hash.hex(),
        prev_hash=e.prev_hash.hex(),
    )


def _case_view(
    case_id: uuid.UUID, state: d.CaseState, version: int, *, pseudonym: bool
) -> CaseView:
    return CaseView(
        case_id=case_id,
        version=version,
        status=state.status,
        district=state.district,
        person=state.person if pseudonym else None,
        age_band=state.age_band,
        gender=state.gender,
        archive_sample=state.archive_sample,
        personal_data_erased=state.erased,
        substances=list(state.substances),
        referral_source=state.referral_source,
        children_in_household=state.children_in_household,
        need_level=state.need_level,
        assessments=len(state.assessment_ids),
        care_plans=len(state.care_plan_ids),
        active_consents={
            k: list(v) for k, v in state.active_consents(datetime.now(UTC).date()).items()
        },
        investigations={k: decision for k, (_, decision) in state.investigations.items()},
        first_visit_at=state.first_visit_at,
        coordinated_plans={k: followed for k, (_, followed) in state.coordinated_plans.items()},
    )


def create_app(
    settings: Settings | None = None,
    *,
    schema: str = "intake",
    keys_schema: str | None = None,
    catalogue: Catalogue | None = None,
    districts: DistrictRegistry | None = None,
) -> FastAPI:
    """Build the intake app; the pools and migrations are set up when it starts. Every
    append seals the personal details with the person's key from the key store."""
    settings = settings or load_settings()
    secret = settings.require_pseudonym_secret()
    settings.require_database()
    kek_from_settings(settings)  # a missing or weak KEK stops the start, not the first write
    catalogue = catalogue or Catalogue.load()
    districts = districts or DistrictRegistry.load()
    setup_tracing("intake")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = open_key_store(settings, schema=keys_schema or keys_schema_for(schema))
        try:
            store = open_store(settings, "intake", schema=schema, catalogue=catalogue, max_size=20)
        except Exception:
            keys.pool.close()
            raise
        app.state.personal = attach(store, keys)
        app.state.service = make_service(store, districts)
        try:
            yield
        finally:
            store.pool.close()
            keys.pool.close()

    app = FastAPI(
        title="Likvärd intake service",
        version="1.0.0",
        description="Registers cases and the decisions on them: intake, assessments, care plans,"
        " consents, investigations and their decisions, the first personal visit,"
        " coordinated plans (SIP) with the region and their follow-up, transfers between"
        " districts, closing and reopening. Every accepted command"
        " becomes events in the case's stream (see `GET /cases/{id}/events`). Send the version"
        " you last saw in `If-Match` to be told (409) when someone changed the case meanwhile.",
        lifespan=lifespan,
        responses=http.PROBLEM_RESPONSES,
    )
    http.install(app, "intake", max_request_bytes=settings.max_request_bytes)
    guard.install(app, settings, "intake")
    app.include_router(pseudonyms_router(secret))

    def run(
        svc: Svc,
        case_id: uuid.UUID,
        command: Any,
        if_match: str | None,
        ctx: http.RequestContext,
        response: Response,
        *,
        request: Request | None = None,
        caller: Principal | None = None,
    ) -> CommandResult:
        """Decide and append. With a request and caller, the policy is asked about the state
        the command is decided on (CASE_CHANGE): the case is read once, and a refusal is
        recorded and answered 403 before anything is decided."""
        expected = http.parse_if_match(if_match)

        def decide(command: Any, state: d.CaseState) -> Sequence[d.DomainEvent]:
            if request is not None and caller is not None:
                scope = case_scope(str(case_id), state)
                guard.authorize(request, caller, Action.CASE_CHANGE, scope)
            return d.decide(command, state, districts)

        try:
            decided = svc.execute(str(case_id), command, expected, ctx, decide=decide)
        except d.CaseNotFound as exc:
            raise http.ProblemError(404, exc.code, "Case not found", exc.detail) from exc
        except d.InvestigationNotFound as exc:
            raise http.ProblemError(404, exc.code, "Investigation not found", exc.detail) from exc
        except d.CoordinatedPlanNotFound as exc:
            raise http.ProblemError(404, exc.code, "Plan not found", exc.detail) from exc
        except d.DomainError as exc:
            raise http.ProblemError(422, exc.code, "Rule violated", exc.detail) from exc
        return _result(case_id, decided, response)

    @app.post(
        "/cases",
        status_code=201,
        response_model=CommandResult,
        responses={201: {"headers": {"Location": LOCATION_HEADER, "ETag": ETAG_HEADER}}},
        tags=["cases"],
        summary="Register an intake (opens a case)",
        openapi_extra=guard.policy(Action.CASE_REGISTER),
    )
    def register_case(
        body: RegisterCase,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
    ) -> Response:
        guard.authorize(request, caller, Action.CASE_REGISTER, DistrictScope(body.district))
        try:
            person = pseudonymise(body.personal_identity_number, secret)
            archive_sample = in_archive_sample(body.personal_identity_number)
        except InvalidIdentityNumber as exc:
            raise http.ProblemError(
                422, "invalid-identity-number", "Invalid identity number", str(exc)
            ) from exc
        case_id = uuid.uuid4()
        command = d.RegisterIntake(
            case_id=str(case_id),
            occurred_at=body.when(),
            person=person,
            district=body.district,
            substances=tuple(body.substances),
            referral_source=body.referral_source,
            children_in_household=body.children_in_household,
            birth_year=body.birth_year,
            archive_sample=archive_sample,
            gender=body.gender,
        )
        result = run(svc, case_id, command, '"0"', ctx, response)
        response.headers["Location"] = f"/cases/{case_id}"
        return _json_answer(result, 201, response)

    @app.post(
        "/cases/{case_id}/assessments",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["cases"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Record a completed assessment (AUDIT, DUDIT, ASI, ...)",
    )
    def complete_assessment(
        case_id: CaseId,
        body: CompleteAssessment,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.CompleteAssessment(
            case_id=str(case_id),
            occurred_at=body.when(),
            assessment_id=str(uuid.uuid4()),
            instrument=body.instrument,
            scores=tuple(d.Score(scale=s.scale, value=s.value) for s in body.scores),
            need_level=body.need_level,
        )
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/care-plan",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["cases"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Record the care plan agreed with the person, in their own goals",
    )
    def agree_care_plan(
        case_id: CaseId,
        body: AgreeCarePlan,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.AgreeCarePlan(
            case_id=str(case_id),
            occurred_at=body.when(),
            plan_id=str(uuid.uuid4()),
            goals=tuple(body.goals),
            person_participated=body.person_participated,
            review_on=body.review_on,
        )
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/consents",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["cases"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Record the person's consent to share with other organisations",
    )
    def record_consent(
        case_id: CaseId,
        body: RecordConsent,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.RecordConsent(
            case_id=str(case_id),
            occurred_at=body.when(),
            consent_id=str(uuid.uuid4()),
            recipients=tuple(body.recipients),
            valid_until=body.valid_until,
        )
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/consents/{consent_id}/withdraw",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["cases"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Record that the person withdrew a consent",
    )
    def withdraw_consent(
        case_id: CaseId,
        consent_id: uuid.UUID,
        body: WithdrawConsent,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.WithdrawConsent(
            case_id=str(case_id), occurred_at=body.when(), consent_id=str(consent_id)
        )
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/transfer",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["cases"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Transfer the case to another district (the person moved)",
    )
    def transfer_case(
        case_id: CaseId,
        body: TransferCase,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.TransferCase(
            case_id=str(case_id),
            occurred_at=body.when(),
            to_district=body.to_district,
            reason=body.reason,
        )
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/close",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["cases"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Close the case",
    )
    def close_case(
        case_id: CaseId,
        body: CloseCase,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.CloseCase(case_id=str(case_id), occurred_at=body.when(), reason=body.reason)
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/reopen",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["cases"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Reopen a closed case",
    )
    def reopen_case(
        case_id: CaseId,
        body: ReopenCase,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.ReopenCase(case_id=str(case_id), occurred_at=body.when(), reason=body.reason)
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/investigations",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["care chain"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Open an investigation of the person's need (SoL 11 kap. 1 §)",
        description="One investigation is open at a time; the answer names its id, which the"
        " decision is recorded on.",
    )
    def open_investigation(
        case_id: CaseId,
        body: OpenInvestigation,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        investigation_id = uuid.uuid4()
        command = d.OpenInvestigation(
            case_id=str(case_id),
            occurred_at=body.when(),
            investigation_id=str(investigation_id),
            basis=body.basis,
        )
        result = run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)
        result.investigation_id = investigation_id
        return result

    @app.post(
        "/cases/{case_id}/investigations/{investigation_id}/decision",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["care chain"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Record the decision of an open investigation",
    )
    def decide_investigation(
        case_id: CaseId,
        investigation_id: uuid.UUID,
        body: DecideInvestigation,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.DecideInvestigation(
            case_id=str(case_id),
            occurred_at=body.when(),
            investigation_id=str(investigation_id),
            decision=body.decision,
            intervention_kinds=tuple(body.intervention_kinds),
        )
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/first-visit",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["care chain"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Record the first personal visit after the first contact (once per case)",
    )
    def hold_first_visit(
        case_id: CaseId,
        body: HoldFirstVisit,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.HoldFirstVisit(
            case_id=str(case_id), occurred_at=body.when(), visit_id=str(uuid.uuid4())
        )
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.post(
        "/cases/{case_id}/coordinated-plans",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["care chain"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Record a coordinated individual plan (SIP) agreed with the region",
        description="Needs the person's consent in force covering HEALTHCARE; the answer"
        " names the plan's id, which its follow-up is recorded on.",
    )
    def agree_coordinated_plan(
        case_id: CaseId,
        body: AgreeCoordinatedPlan,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        plan_id = uuid.uuid4()
        command = d.AgreeCoordinatedPlan(
            case_id=str(case_id),
            occurred_at=body.when(),
            plan_id=str(plan_id),
            parties=tuple(body.parties),
            lead=body.lead,
            follow_up_on=body.follow_up_on,
            consent_id=str(body.consent_id),
        )
        result = run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)
        result.plan_id = plan_id
        return result

    @app.post(
        "/cases/{case_id}/coordinated-plans/{plan_id}/follow-up",
        response_model=CommandResult,
        responses=COMMAND_RESPONSES,
        tags=["care chain"],
        openapi_extra=guard.policy(Action.CASE_CHANGE),
        summary="Record that a coordinated plan was followed up",
    )
    def follow_up_coordinated_plan(
        case_id: CaseId,
        plan_id: uuid.UUID,
        body: FollowUpCoordinatedPlan,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> CommandResult:
        command = d.FollowUpCoordinatedPlan(
            case_id=str(case_id), occurred_at=body.when(), plan_id=str(plan_id)
        )
        return run(svc, case_id, command, if_match, ctx, response, request=request, caller=caller)

    @app.get(
        "/cases/{case_id}",
        response_model=CaseView,
        responses={200: {"headers": {"ETag": ETAG_HEADER}}},
        tags=["cases"],
        summary="The case's current state, folded from its events",
        openapi_extra=guard.policy(Action.CASE_READ),
    )
    def get_case(
        case_id: CaseId,
        svc: Svc,
        caller: guard.Caller,
        request: Request,
        response: Response,
        emergency: guard.EmergencyReason = None,
    ) -> CaseView:
        state, version, _ = svc.load(str(case_id))
        scope = case_scope(str(case_id), state)
        guard.authorize(request, caller, Action.CASE_READ, scope, emergency=emergency)
        if version == 0:
            raise http.ProblemError(404, "case-not-found", "Case not found", "No case has this id.")
        response.headers["ETag"] = http.etag(version)
        return _case_view(case_id, state, version, pseudonym=sees_pseudonym(caller))

    @app.get(
        "/cases/{case_id}/events",
        response_model=list[EventView],
        tags=["cases"],
        summary="The case's events in stream order, with their hash-chain links",
        openapi_extra=guard.policy(Action.CASE_HISTORY),
    )
    def get_events(
        case_id: CaseId,
        svc: Svc,
        caller: guard.Caller,
        request: Request,
        emergency: guard.EmergencyReason = None,
    ) -> list[EventView]:
        state, _, events = svc.load(str(case_id))
        scope = case_scope(str(case_id), state)
        decision = guard.authorize(request, caller, Action.CASE_HISTORY, scope, emergency=emergency)
        if not events:
            raise http.ProblemError(404, "case-not-found", "Case not found", "No case has this id.")
        personal: IntakePersonalData = request.app.state.personal
        show = sees_personal_text(caller, Action.CASE_HISTORY, decision)
        payloads = personal.open_payloads(events, show=show)
        if not sees_pseudonym(caller):
            payloads = [{**p, "person": None} if "person" in p else p for p in payloads]
        return [_event_view(e, p) for e, p in zip(events, payloads, strict=True)]

    @app.post(
        "/persons/{pseudonym}/erasure",
        response_model=ErasureResult,
        tags=["persons"],
        summary="Erase a person's personal data (destroys their data key)",
        description="Destroys the person's data keys, then records `PersonalDataErased` on"
        " each of their cases: from then on every reader shows the sealed details (care-plan"
        " goals, year of birth) as erased. Counts, codes and the hash chain stay. Idempotent:"
        " asking again finishes an erasure that was cut short and changes nothing else.",
        openapi_extra=guard.policy(Action.RECORDS_MANAGE),
    )
    def erase(
        pseudonym: Annotated[
            str,
            Path(
                description="The person's pseudonym (64 lowercase hex characters)",
                pattern=r"^[0-9a-f]{64}$",
            ),
        ],
        body: EraseData,
        svc: Svc,
        caller: guard.Caller,
        ctx: Ctx,
        request: Request,
    ) -> ErasureResult:
        resource = SystemScope("person-erasure")
        decision = guard.authorize(request, caller, Action.RECORDS_MANAGE, resource)
        keys = request.app.state.personal.keys
        done = erase_person(svc, keys, pseudonym, LEGAL_BASES[body.legal_basis], ctx)
        # One access-log entry per case the erasure touched (the pseudonym is not logged).
        guard.record_reads(request, caller, Action.RECORDS_MANAGE, decision, resource, done.cases)
        return ErasureResult(
            cases=[uuid.UUID(c) for c in done.cases],
            recorded=[uuid.UUID(c) for c in done.recorded],
            keys_destroyed=len(done.destroyed_now),
        )

    def ready(request: Request) -> None:
        request.app.state.service.store.ping()
        request.app.state.personal.keys.ping()

    http.add_health(app, ready)

    return app
