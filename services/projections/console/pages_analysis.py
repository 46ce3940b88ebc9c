"""The analysts' and auditors' pages: the equal-access audit (with its CSV and the HTML
report to download), the indicators over time and the waiting times, each computed in this
process by the functions the reporting API calls (`GET /reports/equal-access`,
`/indicators/{id}`, `/reports/waits`), in one snapshot of the read models, after the same
policy question (REPORT_READ; a refusal is logged as the API logs it). An analyst sees
figures only: the indicators are computed without their case ids.

Query parameters are read here, after the policy check, and a value that is not one of
the form's is ignored with a notice: a page never answers 422 for a hand-edited address.
What the templates show is shaped in `analysis_views`.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import Response
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard import deadlines
from likvard.config import Settings
from likvard.db import check_schema_name
from likvard.districts import DistrictRegistry
from likvard.policy import Action, SystemScope
from services.projections import audit, html_report, indicators, reports, reproduce, stats
from services.projections.console.analysis_views import (
    AGE_BAND_CODES,
    GENDER_LABELS,
    NEED_LABELS,
    AuditFilters,
    IndicatorSection,
    Words,
    audit_filters,
    indicator_section,
    indicator_years,
    metric_sections,
    structure_of,
    wait_sections,
)
from services.projections.console.web import Console, Viewer

EQUAL_ACCESS = SystemScope("report:equal-access")
INDICATORS = SystemScope("report:indicators")
WAITS = SystemScope("report:waits")


def _first_intake(conn: psycopg.Connection[Any], schema: str) -> date | None:
    """The local date of the first intake in the read models (None: no case yet)."""
    row = conn.execute(
        sql.SQL(
            "SELECT min((intake_at AT TIME ZONE %s)::date) FROM {}.case_facts"
            " WHERE intake_at IS NOT NULL"
        ).format(sql.Identifier(check_schema_name(schema))),
        (reports.TIME_ZONE,),
    ).fetchone()
    return row[0] if row else None


# --- the routes -----------------------------------------------------------------------


def add_routes(
    router: APIRouter,
    console: Console,
    schema: str,
    registry: DistrictRegistry,
    settings: Settings,
) -> None:
    """GET /equal-access (and its CSV and HTML report downloads), /indicators, /waits."""
    names = html_report.display_names(registry)

    def pool(request: Request) -> ConnectionPool:
        found: ConnectionPool = request.app.state.pool
        return found

    def audit_of(
        request: Request, chosen: AuditFilters
    ) -> tuple[audit.AuditReport, dict[str, Any]]:
        with pool(request).connection() as conn:
            return reproduce.equal_access(conn, schema, registry, chosen)

    def viewer_for(request: Request, scope: SystemScope) -> Viewer:
        viewer = console.viewer(request)
        console.check(request, viewer, Action.REPORT_READ, scope)
        return viewer

    @router.get("/equal-access")
    def equal_access(request: Request) -> Response:
        viewer = viewer_for(request, EQUAL_ACCESS)
        chosen, ignored = audit_filters(request.query_params)
        made, prov = audit_of(request, chosen)
        return console.render(
            request,
            viewer,
            "equal_access.html",
            filters=chosen,
            ignored=ignored,
            made=made,
            sections=metric_sections(made, names, Words(console, viewer)),
            provenance=prov,
            parameters=sorted(
                (k, v) for k, v in prov["parameters"].items() if k != "replay" and v is not None
            ),
            need_levels=[(c, NEED_LABELS.get(c, c)) for c in audit.NEED_LEVELS],
            genders=[(c, GENDER_LABELS.get(c, c)) for c in audit.GENDERS],
            names=names,
            age_bands=AGE_BAND_CODES,
            query=chosen.query(),
            band=html_report.BAND,
            min_cell=reproduce.MIN_CELL,
        )

    @router.get("/equal-access.csv")
    def equal_access_csv(request: Request) -> Response:
        viewer_for(request, EQUAL_ACCESS)
        chosen, _ignored = audit_filters(request.query_params)
        made, prov = audit_of(request, chosen)
        response = Response(
            reports.audit_csv(made.cells),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": 'attachment; filename="equal-access.csv"',
                "Likvard-Provenance": reproduce.provenance_header(prov),
                "Likvard-Comparisons": str(made.comparisons),
            },
        )
        return console.headers(response)

    @router.get("/report.html")
    def report_file(request: Request) -> Response:
        viewer_for(request, EQUAL_ACCESS)
        chosen, _ignored = audit_filters(request.query_params)
        today = deadlines.city_today()
        end = chosen.end or today
        start = chosen.start or (end - timedelta(days=365) + timedelta(days=1))
        if start > end:
            start = end
        with pool(request).connection() as conn:
            document = html_report.build(
                conn,
                schema,
                start=start,
                end=end,
                structure=chosen.structure,
                flag_rule=chosen.flag_rule,
                answer_days=settings.referral_answer_days,
                window_days=settings.followup_window_days,
            )
        name = f"likvard-report-{start.isoformat()}-{end.isoformat()}.html"
        response = Response(
            document,
            media_type="text/html; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
        return console.headers(response)

    @router.get("/indicators")
    def indicator_page(request: Request) -> Response:
        viewer = viewer_for(request, INDICATORS)
        ignored: list[str] = []
        structure = structure_of(request.query_params, ignored)
        w = Words(console, viewer)
        as_of = reproduce.default_as_of()
        today = as_of.date()
        sections: list[IndicatorSection] = []
        with pool(request).connection() as conn, reproduce.snapshot_transaction(conn):
            years = indicator_years(today, _first_intake(conn, schema))
            labels = [
                w._("%(year)s to date") % {"year": y.year} if y.to_date else str(y.year)
                for y in years
            ]
            for indicator in indicators.INDICATORS.values():
                if indicator.missing():
                    title = indicator.title_sv if w.lang == "sv" else indicator.title_en
                    sections.append(IndicatorSection(indicator, title, None, [], False))
                    continue
                found = [
                    indicators.compute(
                        conn,
                        schema,
                        indicator,
                        start=y.start,
                        end=y.end,
                        structure=structure,
                        with_cases=False,
                        registry=registry,
                        as_of=as_of,
                    )
                    for y in years
                ]
                sections.append(indicator_section(indicator, years, found, names, labels, w))
        return console.render(
            request,
            viewer,
            "indicators.html",
            structure=structure,
            ignored=ignored,
            years=years,
            labels=labels,
            sections=sections,
            today=today,
            min_cell=reproduce.MIN_CELL,
        )

    @router.get("/waits")
    def waits_page(request: Request) -> Response:
        viewer = viewer_for(request, WAITS)
        ignored: list[str] = []
        structure = structure_of(request.query_params, ignored)
        as_of = reproduce.default_as_of()
        with pool(request).connection() as conn, reproduce.snapshot_transaction(conn):
            made = stats.wait_report(
                reports.wait_rows(conn, schema, structure=structure, registry=registry),
                as_of=as_of,
                min_cell=reproduce.MIN_CELL,
            )
        return console.render(
            request,
            viewer,
            "waits.html",
            structure=structure,
            ignored=ignored,
            made=made,
            sections=wait_sections(made, names, Words(console, viewer)),
            names=names,
            as_of=as_of,
            min_cell=reproduce.MIN_CELL,
        )


__all__ = ["add_routes"]
