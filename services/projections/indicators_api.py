"""The indicators on the reporting API: `GET /indicators` (their definitions) and
`GET /indicators/{id}` (the figures per district and city-wide, JSON or CSV).

Both need REPORT_READ (analysts and auditors), checked as a dependency before the query is
judged, so another role gets 403 (logged) whatever it asks. An auditor also gets the case
ids behind each figure (`indicators.compute(with_cases=True)`): that is a case-level view,
so every case shown is recorded in the access log (`guard.record_reads`, one entry per
case in one commit) before the answer leaves. An analyst never sees a case id.

Included in the app of `services/projections/api.py` with
``app.include_router(indicators_router(schema, registry))``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from psycopg_pool import ConnectionPool
from pydantic import BaseModel

from likvard import guard, http
from likvard.districts import DistrictRegistry
from likvard.identity import Role
from likvard.policy import Action, Decision, SystemScope
from services.projections import indicators, params, reports

Structure = Literal["current", "as-recorded"]
BreakdownName = Literal["gender", "age_band", "need_level"]
INDICATORS_SCOPE = SystemScope("report:indicators")
FIGURE_COLUMNS = [f.name for f in dataclasses.fields(indicators.Figure)]


class IndicatorDefinition(BaseModel):
    """An indicator as defined in code: the SQL fragments over one case's facts (`c`)."""

    id: str
    kolada: bool
    title_sv: str
    title_en: str
    kind: Literal["share", "mean_days", "median_days"]
    unit: str
    description: str
    numerator: str | None
    denominator: str
    days: str | None
    period: str
    period_rule: str
    breakdowns: list[str]
    min_persons: int
    available: bool


class FigureView(BaseModel):
    """One figure; n, numerator and value are null when suppressed. The case ids are
    shown to auditors only (null for anyone else)."""

    indicator: str
    district: str
    group: str | None
    suppressed: bool
    persons: int | None
    n: int | None
    numerator: int | None
    value: float | None
    case_ids: list[str] | None
    numerator_case_ids: list[str] | None


class IndicatorFigures(BaseModel):
    """The figures of one indicator for a period, with its definition and the parameters."""

    indicator: IndicatorDefinition
    start: str
    end: str
    structure: Structure
    district: str | None
    breakdown: str | None
    figures: list[FigureView]


def _conn(request: Request) -> Iterator[psycopg.Connection[Any]]:
    pool: ConnectionPool = request.app.state.pool
    with pool.connection() as conn:
        yield conn


Conn = Annotated[psycopg.Connection[Any], Depends(_conn)]


def _report_read(request: Request, caller: guard.Caller) -> Decision:
    """REPORT_READ, else 403 (logged); the decision is kept for the auditor's reads."""
    return guard.authorize(request, caller, Action.REPORT_READ, INDICATORS_SCOPE)


Allowed = Annotated[Decision, Depends(_report_read)]


def _csv(figures: list[indicators.Figure]) -> Response:
    """A header row, then one row per figure (case ids space-separated)."""
    rows = (dataclasses.asdict(f) for f in figures)
    return Response(reports.csv_text(rows, FIGURE_COLUMNS), media_type="text/csv; charset=utf-8")


def indicators_router(schema: str, registry: DistrictRegistry) -> APIRouter:
    """The indicator routes over the read models in `schema` (the app's pool and guard)."""
    router = APIRouter(tags=["indicators"])

    def check_district(code: str | None, structure: Structure) -> None:
        params.check_district(registry, code, structure)

    @router.get(
        "/indicators",
        summary="The indicators and their definitions",
        response_model=list[IndicatorDefinition],
        description="Every indicator defined in code: its id (the Kolada id where one"
        " exists, else `likvard-...`), titles, kind, numerator and denominator (SQL over one"
        " case's facts), period rule, breakdowns and small-count rule. Analysts and auditors.",
        openapi_extra=guard.policy(Action.REPORT_READ),
    )
    def list_indicators(allowed: Allowed) -> list[IndicatorDefinition]:
        return [IndicatorDefinition(**i.definition()) for i in indicators.INDICATORS.values()]

    @router.get(
        "/indicators/{indicator_id}",
        summary="One indicator's figures",
        response_model=IndicatorFigures,
        responses={
            200: {
                "description": "The figures as JSON, or as CSV (a header row first) with"
                " `format=csv`",
                "content": {"text/csv": {"schema": {"type": "string"}}},
            }
        },
        description="Per district (at intake, in the chosen structure) and city-wide"
        " (`district=city`, each person once), with a figure per group of `breakdown` if"
        " asked. Figures whose denominator holds fewer than the indicator's `min_persons`"
        " persons are suppressed. An auditor also gets the case ids behind each figure (each"
        " case shown is recorded in the access log; `cases=false` for the figures alone);"
        " nobody else does. Analysts and auditors.",
        openapi_extra=guard.policy(Action.REPORT_READ),
    )
    def indicator_figures(
        request: Request,
        caller: guard.Caller,
        allowed: Allowed,
        conn: Conn,
        indicator_id: str,
        start: Annotated[http.Day, Query(alias="from", description="First day of the period")],
        end: Annotated[
            http.Day, Query(alias="to", description="Last day of the period; not before `from`")
        ],
        district: Annotated[
            str | None,
            Query(min_length=1, max_length=64, description="Only this district (or `city`)"),
        ] = None,
        structure: Annotated[
            Structure,
            Query(
                description="`current`: old district codes count in their successor;"
                " `as-recorded`: as recorded at intake"
            ),
        ] = "current",
        breakdown: Annotated[
            BreakdownName | None, Query(description="Also a figure per group of this")
        ] = None,
        cases: Annotated[
            bool,
            Query(description="Auditors: list the case ids behind each figure (logged)"),
        ] = True,
        format: Annotated[
            Literal["json", "csv"], Query(description="`json` (default) or `csv`")
        ] = "json",
    ) -> Response:
        try:
            indicator = indicators.get(indicator_id)
        except indicators.UnknownIndicator:
            raise http.ProblemError(
                404, "unknown-indicator", "Unknown indicator", "No indicator has this id."
            ) from None
        if end < start:
            raise http.ProblemError(422, "bad-period", "Bad period", "`to` is before `from`.")
        check_district(district, structure)
        if breakdown is not None and breakdown not in indicator.breakdowns:
            raise http.ProblemError(
                422,
                "unknown-breakdown",
                "Breakdown not defined",
                f"{indicator.id} is broken down by: {', '.join(indicator.breakdowns)}.",
            )
        if indicator.missing(breakdown):
            raise http.ProblemError(
                422,
                "indicator-not-available",
                "Indicator not available",
                f"The read models of this version cannot compute {indicator.id} (with this"
                " breakdown) yet.",
            )
        auditor = cases and caller.has(Role.AUDITOR)
        figures = indicators.compute(
            conn,
            schema,
            indicator,
            start=start,
            end=end,
            structure=structure,
            district=district,
            breakdown=breakdown,
            with_cases=auditor,
            registry=registry,
        )
        if auditor:  # a case-level view: in the access log before it is shown
            guard.record_reads(
                request,
                caller,
                Action.REPORT_READ,
                allowed,
                SystemScope(f"indicator:{indicator.id}"),
                sorted({c for f in figures for c in f.case_ids or ()}),
            )
        if format == "csv":
            return _csv(figures)
        body = IndicatorFigures(
            indicator=IndicatorDefinition(**indicator.definition()),
            start=start.isoformat(),
            end=end.isoformat(),
            structure=structure,
            district=district,
            breakdown=breakdown,
            figures=[FigureView(**dataclasses.asdict(f)) for f in figures],
        )
        return JSONResponse(body.model_dump(mode="json"))

    return router
