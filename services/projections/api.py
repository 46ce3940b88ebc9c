"""The reporting API over the read models: the follow-up report, the equal-access audit,
the waits, the overdue referrals and follow-ups, case timelines (JSON or CSV,
`?format=csv`) and the access log. It only reads; every figure comes from the events that
the projection workers folded into the read models.

Who may ask what (`likvard.policy`): the reports need REPORT_READ (analyst, auditor), a
timeline CASE_HISTORY on the case as the read models know it (its current district and its
transfers: a case worker of that district, of the sending district for 30 days, anyone of
them with an emergency reason; an auditor), the access log ACCESS_LOG_READ (auditor). The
checks that need no case run as dependencies, before the query parameters are judged, so
a caller without the role gets 403 whatever they ask; every refusal and every timeline
read is in the access log before the answer leaves.

Provenance: a report's answer (JSON or CSV) carries its record in the `Likvard-Provenance`
header (compact ASCII JSON: the offsets per topic partition, the chain-heads digest, the
code and reference-data versions, the parameters), read in the same snapshot as its rows.
A header keeps the JSON body the list it always was and the CSV plain CSV; with
`provenance=true` a JSON answer is instead an object `{"provenance": ..., "rows": [...]}`
for a client that keeps one file.

The audit and the waits also say how many comparisons their Holm flags were controlled
over, in the `Likvard-Comparisons` header (and on each row, `comparisons`, for the audit;
in the envelope too): the whole family, whatever `district` filter is asked for."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, create_model

from likvard import deadlines, guard, http
from likvard.codec import Catalogue
from likvard.config import Settings, load_settings
from likvard.db import check_schema_name, make_pool
from likvard.districts import DistrictRegistry
from likvard.identity import Principal
from likvard.keys import open_key_store
from likvard.policy import Action, Decision, SystemScope
from likvard.sealing import Sealer
from likvard.telemetry import setup_tracing
from services.projections import (
    access_log,
    case_view,
    caught_up,
    params,
    readmodels,
    reports,
    reproduce,
    stats,
)
from services.projections.audit import AuditCell
from services.projections.console import install_console
from services.projections.history_api import install_history
from services.projections.indicators_api import indicators_router
from services.projections.overdue import OverdueCounts, overdue_counts

log = logging.getLogger("likvard.projections")

Format = Literal["json", "csv"]
PROVENANCE_HEADER = "Likvard-Provenance"
COMPARISONS_HEADER = "Likvard-Comparisons"
Structure = Literal["current", "as-recorded"]
FORMAT = Query(description="`json` (default) or `csv` (`text/csv`, a header row first)")
STRUCTURE = Query(
    description="`current`: old district codes are counted in the district that succeeded"
    " them (comparable across the 2021 reorganisation); `as-recorded`: as recorded at intake"
)


class TimelineRow(BaseModel):
    """One event of a case's timeline, as the read model holds it."""

    event_id: uuid.UUID
    case_id: str
    occurred_at: datetime
    recorded_at: datetime
    topic: str
    event_type: str
    stream_version: int
    district: str | None
    actor: str | None
    payload: dict[str, Any]


def _table(row: type) -> dict[int | str, dict[str, Any]]:
    """The 200 answer of a report: a JSON array of `row`, or CSV with `format=csv`."""
    return {
        200: {
            "model": list[row],  # type: ignore[valid-type]
            "description": "The rows as JSON, or as CSV (a header row first) with `format=csv`",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    }


def _report_table(row: type, *, comparisons: bool = False) -> dict[int | str, dict[str, Any]]:
    """A report's 200 answer: the rows (or `{provenance, rows}` with `provenance=true`), or
    CSV; its provenance in the `Likvard-Provenance` header (and, for a report that flags by
    Holm, the number of comparisons in `Likvard-Comparisons` and the envelope)."""
    extra: dict[str, Any] = {"comparisons": (int, ...)} if comparisons else {}
    envelope = create_model(
        f"{row.__name__}WithProvenance",
        provenance=(dict[str, Any], ...),
        rows=(list[row], ...),  # type: ignore[valid-type]
        **extra,
    )
    headers: dict[str, Any] = {
        PROVENANCE_HEADER: {
            "description": "The report's provenance as compact JSON: offsets per topic"
            " partition, chain-heads digest, code and reference-data versions,"
            " parameters",
            "schema": {"type": "string"},
        }
    }
    if comparisons:
        headers[COMPARISONS_HEADER] = {
            "description": "How many comparisons (district x metric or wait) the Holm"
            " adjustment was made over, whatever the district filter",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    answer = _table(row)
    answer[200] |= {"model": list[row] | envelope, "headers": headers}  # type: ignore[valid-type]
    return answer


class AccessLogEntry(BaseModel):
    """One read or refusal, as the access log holds it (no personal data: actors are staff
    ids, cases are case ids)."""

    event_id: uuid.UUID
    accessed_at: datetime
    actor: str
    roles: str
    action: str
    resource: str
    case_id: str | None
    outcome: Literal["allowed", "refused"]
    reason: str
    emergency_reason: str | None
    service: str
    trace_id: str | None
    stream_id: str
    stream_version: int


class AccessLogPage(BaseModel):
    """Entries in order (accessed_at, then position in the access-log stream); `next` is
    the `after` of the next page, null on the last one."""

    entries: list[AccessLogEntry]
    next: uuid.UUID | None


DistrictQuery = Annotated[str | None, Query(min_length=1, max_length=64)]
REPORT_FOLLOWUP = SystemScope("report:followup")
REPORT_EQUAL_ACCESS = SystemScope("report:equal-access")
REPORT_WAITS = SystemScope("report:waits")
REPORT_OVERDUE = SystemScope("report:overdue")
FlagRuleQuery = Literal["holm", "band"]
NeedLevelQuery = Literal["LOW", "MODERATE", "HIGH"]
GenderQuery = Literal["WOMAN", "MAN", "OTHER", "NOT_STATED"]
AgeBandQuery = Literal["0-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65+", "UNKNOWN"]
WAIT_COLUMNS = [f.name for f in dataclasses.fields(stats.WaitSummary) if f.name != "curve"]
ACCESS_LOG = SystemScope("access-log")


def _may(action: Action, scope: SystemScope) -> Callable[[Request, Principal], Principal]:
    """A dependency: the caller may do `action` (a role-only rule), else 403 (logged)."""

    def check(request: Request, caller: guard.Caller) -> Principal:
        guard.authorize(request, caller, action, scope)
        return caller

    return check


def _conn(request: Request) -> Iterator[psycopg.Connection[Any]]:
    pool: ConnectionPool = request.app.state.pool
    with pool.connection() as conn:
        yield conn


Conn = Annotated[psycopg.Connection[Any], Depends(_conn)]


def _cell(value: Any) -> Any:
    """JSON-ready value: times and dates as ISO text, ids as text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_cell(v) for v in value]
    if isinstance(value, dict):
        return {k: _cell(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _rows(items: Sequence[Any]) -> list[dict[str, Any]]:
    plain = [
        dataclasses.asdict(i) if dataclasses.is_dataclass(i) and not isinstance(i, type) else i
        for i in items
    ]
    return [{k: _cell(v) for k, v in row.items()} for row in plain]


def _csv(rows: list[dict[str, Any]], columns: Sequence[str]) -> Response:
    return Response(reports.csv_text(rows, columns), media_type="text/csv; charset=utf-8")


def _respond(rows: list[dict[str, Any]], columns: Sequence[str], fmt: Format) -> Response:
    return _csv(rows, columns) if fmt == "csv" else JSONResponse(rows)


PROVENANCE = Query(
    description="`true`: a JSON answer is `{provenance, rows}` instead of the list of rows"
    " (the `Likvard-Provenance` header carries the same provenance either way)"
)


def _with_provenance(
    rows: list[dict[str, Any]],
    columns: Sequence[str],
    fmt: Format,
    prov: dict[str, Any],
    envelope: bool,
    comparisons: int | None = None,
) -> Response:
    """The answer with its provenance in a header (and, asked for, in a JSON envelope);
    with `comparisons`, the Holm family's size beside it."""
    if envelope and fmt == "json":
        body: dict[str, Any] = {"provenance": prov, "rows": rows}
        if comparisons is not None:
            body["comparisons"] = comparisons
        response: Response = JSONResponse(body)
    else:
        response = _respond(rows, columns, fmt)
    response.headers[PROVENANCE_HEADER] = reproduce.provenance_header(prov)
    if comparisons is not None:
        response.headers[COMPARISONS_HEADER] = str(comparisons)
    return response


def _case_not_found() -> http.ProblemError:
    return http.ProblemError(
        404, "case-not-found", "Case not found", "No event of this case has been seen."
    )


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def create_app(
    settings: Settings | None = None,
    *,
    schema: str = "projections",
    access_log_schema: str | None = None,
    keys_schema: str = "keys",
) -> FastAPI:
    """The reporting API over the read models in `schema`; its own reads and refusals go
    to the access-log store in `access_log_schema`. With LIKVARD_KEK, a timeline opens the
    sealed personal details for those who see them (the key store in `keys_schema`)."""
    settings = settings or load_settings()
    dsn = settings.require_database()
    check_schema_name(schema)
    registry = DistrictRegistry.load()
    setup_tracing("projections")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = make_pool(dsn, max_size=10, name="likvard-projections")
        try:
            with pool.connection() as conn, conn.transaction():
                readmodels.migrate(conn, schema)
        except Exception:
            pool.close()
            raise
        app.state.pool = pool
        keys = None
        if settings.kek:
            try:
                keys = open_key_store(settings, schema=keys_schema, max_size=3)
            except Exception:
                pool.close()
                raise
        else:
            log.warning("LIKVARD_KEK is not set: timelines show no personal details to anyone")
        app.state.sealer = Sealer(Catalogue.load(), keys)
        try:
            yield
        finally:
            pool.close()
            if keys is not None:
                keys.pool.close()

    app = FastAPI(
        title="Likvärd reporting",
        version="1.0.0",
        description="Follow-up reports per district and city-wide, the equal-access audit and"
        " case timelines, computed from the read models that the projection workers fold from"
        " every event. One person is counted once city-wide; cells under 5 persons are"
        " suppressed, never shown. Add `format=csv` for CSV. Read your writes: pass the"
        " `Likvard-Position` tokens of your writes as `?after=TOKEN,...` (or the"
        " `Likvard-After` header, the only way on `/access-log`, whose `after` is its page"
        " cursor): the answer waits until the read models hold them (at most"
        " LIKVARD_READ_WAIT_SECONDS, else 503 with Retry-After; a malformed token is 400).",
        lifespan=lifespan,
        responses=http.PROBLEM_RESPONSES,
        # read your writes: `?after=TOKEN` or Likvard-After waits for those writes
        dependencies=[Depends(caught_up.caught_up_dependency(schema))],
    )
    http.install(app, "projections", max_request_bytes=settings.max_request_bytes)
    guard.install(app, settings, "projections", access_log_schema=access_log_schema)
    app.include_router(indicators_router(schema, registry))
    install_history(app, settings, schema)  # replays and verifications (auditors)
    install_console(app, settings, schema, registry)  # the web console under /console

    def check_district(code: str | None, structure: Structure) -> None:
        params.check_district(registry, code, structure)

    @app.get(
        "/reports/followup",
        tags=["reports"],
        summary="The follow-up report",
        responses=_report_table(reports.ReportRow),
        description="Per period (month or year of intake, city time zone) and district, with a"
        " city-wide row (`district=city`) after each period's districts. Analysts and"
        " auditors.",
        openapi_extra=guard.policy(Action.REPORT_READ),
        dependencies=[Depends(_may(Action.REPORT_READ, REPORT_FOLLOWUP))],
    )
    def followup_report(
        conn: Conn,
        start: Annotated[http.Day, Query(alias="from", description="First intake day")],
        end: Annotated[
            http.Day, Query(alias="to", description="Last intake day; not before `from`")
        ],
        district: Annotated[
            DistrictQuery, Query(description="Only this district (or `city`)")
        ] = None,
        structure: Annotated[Structure, STRUCTURE] = "current",
        period: Annotated[Literal["month", "year"], Query(description="Rows per")] = "month",
        format: Annotated[Format, FORMAT] = "json",
        provenance: Annotated[bool, PROVENANCE] = False,
    ) -> Response:
        if end < start:
            raise http.ProblemError(422, "bad-period", "Bad period", "`to` is before `from`.")
        check_district(district, structure)
        params = reproduce.Parameters(start, end, structure, period, reproduce.default_as_of())
        with reproduce.snapshot_transaction(conn):
            rows = reports.followup_report(
                conn,
                schema,
                start=start,
                end=end,
                period=period,
                structure=structure,
                district=district,
                registry=registry,
                as_of=params.as_of,
            )
            given = params.to_json() | {"report": "followup", "district": district}
            prov = reproduce.provenance_of(conn, schema, given)
        return _with_provenance(
            _rows(rows), _field_names(reports.ReportRow), format, prov, provenance
        )

    @app.get(
        "/reports/equal-access",
        tags=["reports"],
        summary="The equal-access audit",
        responses=_report_table(AuditCell, comparisons=True),
        description="Per district and metric: the rate, the rest of the city's rate, the crude"
        " and need-adjusted (model-based) ratio with its 95% interval, the Mantel-Haenszel"
        " ratio; the standardised ratio O/E (expected from the city's rates within strata of"
        " need level, age band and gender) with its score interval, the district's place on"
        " the funnel plot, its p-value and Holm-adjusted p over every district x metric"
        " comparison (their number in `Likvard-Comparisons` and each row's `comparisons`);"
        " `holm_flagged` (Holm p < 0.05), `band_flagged` (the interval excludes 1 and the"
        " ratio is outside 0.8-1.25), and `flagged` by the rule asked for (`flag_rule`, Holm"
        " by default). `from`/`to` (the intake day of the person's case), `need_level`,"
        " `gender` and `age_band` narrow who is compared (recorded in the provenance when"
        " given). Cells under 5 persons are suppressed. Analysts and auditors.",
        openapi_extra=guard.policy(Action.REPORT_READ),
        dependencies=[Depends(_may(Action.REPORT_READ, REPORT_EQUAL_ACCESS))],
    )
    def equal_access(
        conn: Conn,
        structure: Annotated[Structure, STRUCTURE] = "current",
        district: Annotated[DistrictQuery, Query(description="Only this district")] = None,
        flag_rule: Annotated[
            FlagRuleQuery,
            Query(
                description="`holm` (default): flagged when the Holm-adjusted p < 0.05 over"
                " every comparison; `band`: the need-adjusted ratio's interval excludes 1 and"
                " the ratio is outside 0.8-1.25"
            ),
        ] = "holm",
        start: Annotated[
            http.Day | None,
            Query(alias="from", description="Only persons whose case's intake is from this day"),
        ] = None,
        end: Annotated[
            http.Day | None, Query(alias="to", description="... and up to this day (included)")
        ] = None,
        need_level: Annotated[
            NeedLevelQuery | None, Query(description="Only persons of this need level")
        ] = None,
        gender: Annotated[GenderQuery | None, Query(description="Only this gender")] = None,
        age_band: Annotated[AgeBandQuery | None, Query(description="Only this age band")] = None,
        format: Annotated[Format, FORMAT] = "json",
        provenance: Annotated[bool, PROVENANCE] = False,
    ) -> Response:
        check_district(district, structure)
        if start is not None and end is not None and end < start:
            raise http.ProblemError(422, "bad-period", "Bad period", "`to` is before `from`.")
        asked = reproduce.EqualAccessAsked(
            structure=structure,
            district=district,
            start=start,
            end=end,
            need_level=need_level,
            gender=gender,
            age_band=age_band,
            flag_rule=flag_rule,
        )
        made, prov = reproduce.equal_access(conn, schema, registry, asked)
        cells = made.cells
        if district is not None:
            cells = [c for c in cells if c.district == district]
        return _with_provenance(
            _rows(cells), _field_names(AuditCell), format, prov, provenance, made.comparisons
        )

    @app.get(
        "/reports/waits",
        tags=["reports"],
        summary="Waiting times, persons still waiting censored",
        responses=_report_table(stats.WaitSummary, comparisons=True),
        description="Per wait (intake to first visit, referral to answer, referral to start,"
        " end of intervention to follow-up) and district, with a city-wide row"
        " (`district=city`): persons, waits ended, still waiting (censored at the as-of"
        " time or at the case's closing), the Kaplan-Meier median and 90th percentile in"
        " days (null when too many still wait), the need-stratified Cox hazard ratio to the"
        " rest of the city with its 95% interval (below 1: longer waits), the stratified"
        " log-rank p and its Holm adjustment over every district x wait compared (their"
        " number in `Likvard-Comparisons`), the flag (Holm p < 0.05), and in JSON the"
        " Kaplan-Meier curve as [days, share still waiting] pairs (not in CSV). Cells under 5"
        " persons or 5 ended waits are suppressed. Analysts and auditors.",
        openapi_extra=guard.policy(Action.REPORT_READ),
        dependencies=[Depends(_may(Action.REPORT_READ, REPORT_WAITS))],
    )
    def waits_report(
        conn: Conn,
        structure: Annotated[Structure, STRUCTURE] = "current",
        district: Annotated[
            DistrictQuery, Query(description="Only this district (or `city`)")
        ] = None,
        format: Annotated[Format, FORMAT] = "json",
        provenance: Annotated[bool, PROVENANCE] = False,
    ) -> Response:
        check_district(district, structure)
        as_of = reproduce.default_as_of()
        with reproduce.snapshot_transaction(conn):
            made = stats.wait_report(
                reports.wait_rows(conn, schema, structure=structure, registry=registry),
                as_of=as_of,
                min_cell=reproduce.MIN_CELL,
            )
            given = {
                "report": "waits",
                "structure": structure,
                "district": district,
                "min_cell": reproduce.MIN_CELL,
                "as_of": as_of.isoformat(),
            }
            prov = reproduce.provenance_of(conn, schema, given)
        rows = [s for s in made.summaries if district is None or s.district == district]
        plain = _rows(rows)
        if format == "csv":
            plain = [{k: v for k, v in r.items() if k != "curve"} for r in plain]
        return _with_provenance(plain, WAIT_COLUMNS, format, prov, provenance, made.comparisons)

    @app.get(
        "/reports/overdue",
        tags=["reports"],
        summary="Overdue referrals and follow-ups per district",
        responses=_report_table(OverdueCounts),
        description="Per district (the districts with something overdue) and for the city"
        " (`district=city`, always there): the referrals not answered (accepted, declined or"
        " withdrawn) more than `answer_days` after they were requested, and the follow-ups"
        " not completed or missed more than `window_days` after their due date, as of the"
        " end of `day` (city time zone); the two day settings are those of the overdue"
        " lists (LIKVARD_REFERRAL_ANSWER_DAYS, LIKVARD_FOLLOWUP_WINDOW_DAYS) and are in the"
        " provenance. A referral counts in the case's district on the day, a follow-up in the"
        " district it was scheduled in. Counts only, no case ids; counts under 5 are"
        " suppressed (null). Analysts and auditors.",
        openapi_extra=guard.policy(Action.REPORT_READ),
        dependencies=[Depends(_may(Action.REPORT_READ, REPORT_OVERDUE))],
    )
    def overdue_report(
        conn: Conn,
        day: Annotated[
            http.Day | None, Query(description="Counted as of the end of this day (default: today)")
        ] = None,
        structure: Annotated[Structure, STRUCTURE] = "current",
        district: Annotated[
            DistrictQuery, Query(description="Only this district (or `city`)")
        ] = None,
        format: Annotated[Format, FORMAT] = "json",
        provenance: Annotated[bool, PROVENANCE] = False,
    ) -> Response:
        check_district(district, structure)
        on = day or deadlines.city_today()
        answer_days, window_days = settings.referral_answer_days, settings.followup_window_days
        with reproduce.snapshot_transaction(conn):
            counts = overdue_counts(
                conn,
                schema,
                on,
                answer_days=answer_days,
                window_days=window_days,
                district_map=dict(reports._district_map(registry, structure)),
                min_cell=reproduce.MIN_CELL,
            )
            given = {
                "report": "overdue",
                "day": on.isoformat(),
                "structure": structure,
                "district": district,
                "answer_days": answer_days,
                "window_days": window_days,
                "min_cell": reproduce.MIN_CELL,
                "time_zone": reports.TIME_ZONE,
            }
            prov = reproduce.provenance_of(conn, schema, given)
        rows = [c for c in counts if district is None or c.district == district]
        return _with_provenance(_rows(rows), _field_names(OverdueCounts), format, prov, provenance)

    def _authorized_case(
        request: Request,
        caller: Principal,
        conn: psycopg.Connection[Any],
        case_id: str,
        emergency: str | None,
    ) -> Decision:
        """CASE_HISTORY on the case as the read models know it (logged), else 403/404."""
        if case_view.not_a_case_id(case_id):
            raise _case_not_found()  # nothing read, and no identity number in the log
        return guard.authorize(
            request,
            caller,
            Action.CASE_HISTORY,
            case_view.scope(conn, schema, case_id),
            emergency=emergency,
        )

    @app.get(
        "/cases/{case_id}/timeline",
        tags=["cases"],
        summary="A case's events in order",
        responses=_table(TimelineRow),
        description="A case worker of the case's current district (of the sending district"
        " for 30 days after a transfer; of any district with an emergency reason in"
        f" `{guard.EMERGENCY_HEADER}`), or an auditor. Every read and every refusal is"
        " recorded in the access log.",
        openapi_extra=guard.policy(Action.CASE_HISTORY),
    )
    def case_timeline(
        request: Request,
        case_id: str,
        caller: guard.Caller,
        conn: Conn,
        emergency: guard.EmergencyReason = None,
        format: Annotated[Format, FORMAT] = "json",
    ) -> Response:
        decision = _authorized_case(request, caller, conn, case_id, emergency)
        sealer: Sealer = request.app.state.sealer
        rows = case_view.opened_timeline(conn, schema, case_id, sealer, caller, decision)
        if not rows:
            raise _case_not_found()
        columns = list(rows[0])
        if format == "csv":
            for row in rows:
                row["payload"] = readmodels.canonical_json(row["payload"])
        return _respond(_rows(rows), columns, format)

    @app.get(
        "/cases/{case_id}/chain",
        tags=["cases"],
        summary="The hash-chain status of each stream of a case",
        response_model=list[readmodels.StreamChain],
        description="Per event stream of the case (per topic), from the links its timeline"
        " rows keep: `verified` (versions 1..N all there, each record's hash recomputes from"
        " its bytes and links to the previous version's hash), `broken` at `broken_at` with"
        " a `reason` (missing version, version claimed twice, hash mismatch, link mismatch,"
        " malformed chain headers), or `unknown` (records without chain headers). Who may"
        " ask: as for the timeline; every read and every refusal is recorded in the access"
        " log.",
        openapi_extra=guard.policy(Action.CASE_HISTORY),
    )
    def case_chain(
        request: Request,
        case_id: str,
        caller: guard.Caller,
        conn: Conn,
        emergency: guard.EmergencyReason = None,
    ) -> list[readmodels.StreamChain]:
        _authorized_case(request, caller, conn, case_id, emergency)
        streams = readmodels.chain_status(conn, schema, case_id)
        if not streams:
            raise _case_not_found()
        return streams

    @app.get(
        "/access-log",
        tags=["access log"],
        summary="Who read or was refused what",
        response_model=AccessLogPage,
        description="The access log's entries in order (accessed_at, then position in the"
        " access-log stream), filtered: the reads of one case, the reads of one actor, the"
        " emergency reads, between days (city time zone, both included). At most `limit`"
        " entries; pass the answer's `next` as `after` for the next page. Auditors only."
        " Projected from the access-log topic (`likvard access-log` reads the store itself).",
        openapi_extra=guard.policy(Action.ACCESS_LOG_READ),
        dependencies=[Depends(_may(Action.ACCESS_LOG_READ, ACCESS_LOG))],
    )
    def read_access_log(
        conn: Conn,
        case_id: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=255,
                pattern=r"^[A-Za-z0-9._:@-]+$",
                description="Only this case (its id)",
            ),
        ] = None,
        actor: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=255,
                pattern=r"^[A-Za-z0-9._:@-]+$",
                description="Only this actor (a token's subject)",
            ),
        ] = None,
        start: Annotated[
            http.Day | None, Query(alias="from", description="From this day (included)")
        ] = None,
        end: Annotated[
            http.Day | None, Query(alias="to", description="Up to this day (included)")
        ] = None,
        emergency: Annotated[
            bool | None,
            Query(description="true: only emergency reads; false: none of them"),
        ] = None,
        outcome: Annotated[
            Literal["allowed", "refused"] | None, Query(description="Only this outcome")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="Entries per page")] = 100,
        after: Annotated[
            uuid.UUID | None, Query(description="The `next` of the previous page")
        ] = None,
    ) -> AccessLogPage:
        if start is not None and end is not None and end < start:
            raise http.ProblemError(422, "bad-period", "Bad period", "`to` is before `from`.")
        first, last = access_log.day_window(start, end)
        wanted = access_log.Filter(case_id, actor, first, last, emergency, outcome)
        try:
            found = access_log.query(conn, schema, wanted, limit=limit + 1, after=after)
        except access_log.UnknownCursor as exc:
            raise http.ProblemError(
                422, "unknown-cursor", "Unknown cursor", "`after` names no access-log entry."
            ) from exc
        page = found[:limit]
        return AccessLogPage(
            entries=[AccessLogEntry(**dataclasses.asdict(e)) for e in page],
            next=page[-1].event_id if len(found) > limit else None,
        )

    def ping(request: Request) -> None:
        with request.app.state.pool.connection() as conn:
            conn.execute("SELECT 1")

    http.add_health(app, ping)
    return app
