"""`POST /pseudonyms`: a district system's identity numbers in, Likvärd's pseudonyms out.

The pseudonym secret stays in the intake service: a district system that writes
`IntakeRegistered` to Kafka asks here for the person's pseudonym instead of computing it
(docs/district-integration.md). Only a verified token with the district-system role may ask
(policy action `pseudonyms.compute`): 401 without one, 403 (and an access-log entry) for
any other role, before the body is looked at. Every answered call is in the access log
before the answer leaves, with its counts and never a number: the resource is
`pseudonyms:requested=<n>,computed=<n>,invalid=<n>`. An invalid number fails only itself,
with a code at its index; nothing in an answer or an error repeats a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from likvard import guard
from likvard.identity import Principal
from likvard.policy import Action, Decision, SystemScope
from likvard.pseudonym import MAX_BATCH, VERSION, pseudonymise_all

RESOURCE = "pseudonyms"

IdentityNumberText = Annotated[
    str,
    Field(
        max_length=32,
        description="A personal identity or coordination number, 10 or 12 digits as"
        " (YY)YYMMDD-NNNC (the separator optional, '+' for 100 or older). One that is none"
        " gets an error at its index; a string over 32 characters fails the request (422).",
        examples=["19121212-1212"],
    ),
]


class PseudonymsRequest(BaseModel):
    identity_numbers: list[IdentityNumberText] = Field(
        ...,
        min_length=1,
        max_length=MAX_BATCH,
        description=f"1 to {MAX_BATCH} numbers; more gives 422 (send several batches).",
    )


class PseudonymError(BaseModel):
    index: int = Field(..., description="The position of the number in identity_numbers")
    error: Literal["malformed", "wrong-check-digit", "invalid-date"] = Field(
        ...,
        description="malformed: not 10 or 12 digits in that form; wrong-check-digit: the Luhn"
        " digit does not hold; invalid-date: no such month and day (day + 60 for a"
        " coordination number)",
    )


class PseudonymsAnswer(BaseModel):
    version: str = Field(
        ..., description="The pseudonyms' generation (changes when the secret is rotated)"
    )
    pseudonyms: list[str | None] = Field(
        ...,
        description="One per number, in the same order: 64 lowercase hex characters, the"
        " `person` of IntakeRegistered; null where `errors` names the index",
    )
    errors: list[PseudonymError] = Field(..., description="The numbers that have none, why")


@dataclass(frozen=True)
class _Allowed:
    principal: Principal
    decision: Decision


def _district_system(request: Request, caller: guard.Caller) -> _Allowed:
    """The caller, if a district system: a refusal is logged and answered 403 here, before
    the body is validated (nobody else learns what this endpoint accepts)."""
    decision = guard.authorize(request, caller, Action.PSEUDONYMS, SystemScope(RESOURCE))
    return _Allowed(caller, decision)


def _record_call(request: Request, allowed: _Allowed, label: str) -> None:
    """The allowed call in the access log, committed before the answer (503 if it cannot
    be). The guard's own entry and writer, so the rule "never answer unlogged" stays in
    one place; the guard records refusals itself, and allowed calls of case-level actions."""
    entry = guard._entry(
        request,
        allowed.principal,
        Action.PSEUDONYMS,
        label,
        None,
        allowed.decision,
        None,
        datetime.now(UTC),
    )
    guard._record(request, [entry])


def pseudonyms_router(secret: bytes) -> APIRouter:
    """The route, keyed with the intake service's secret (the one `pseudonymise` is
    given when a case is registered, so both give a person the same pseudonym)."""
    router = APIRouter()

    @router.post(
        "/pseudonyms",
        response_model=PseudonymsAnswer,
        tags=["pseudonyms"],
        summary="The pseudonyms of a batch of identity numbers (district systems only)",
        openapi_extra=guard.policy(Action.PSEUDONYMS),
    )
    def compute_pseudonyms(
        body: PseudonymsRequest,
        request: Request,
        response: Response,
        allowed: Annotated[_Allowed, Depends(_district_system)],
    ) -> PseudonymsAnswer:
        """A district system's way to the `person` of an IntakeRegistered it produces: the
        same pseudonym the intake service stores for the person. Recorded in the access
        log with the counts only."""
        batch = pseudonymise_all(body.identity_numbers, secret)
        invalid = len(batch.errors)
        computed = len(batch.pseudonyms) - invalid
        label = (
            f"{RESOURCE}:requested={len(batch.pseudonyms)},computed={computed},invalid={invalid}"
        )
        _record_call(request, allowed, label)
        response.headers["Cache-Control"] = "no-store"
        return PseudonymsAnswer(
            version=VERSION,
            pseudonyms=batch.pseudonyms,
            errors=[
                PseudonymError.model_validate({"index": e.index, "error": e.error})
                for e in batch.errors
            ],
        )

    return router
