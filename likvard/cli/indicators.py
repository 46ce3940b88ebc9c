"""`likvard indicators [ID]`: the indicators defined in code, listed, or one computed from
the read models (`services.projections.indicators`) per district and city-wide.

Listing reads no data. Computing reads the read models straight from the database, so the
operator's read is logged first (`record_read`, REPORT_READ: with LIKVARD_TOKEN the policy
decides, an operating-system login is recorded as itself). `--cases` also prints the case
ids behind each figure, a case-level view: only a verified auditor's token may, every case
shown is recorded in the access log before anything is printed, and anyone else is refused
(exit 1; a token's refusal is logged)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from likvard.cli.base import app, console, day_window, fail, settings_or_exit, stdout
from likvard.config import ConfigError, Settings
from likvard.policy import Action

if TYPE_CHECKING:
    from likvard.cli.operator import Operator
    from services.projections.indicators import Figure, Indicator

CASES_REFUSED = (
    "--cases prints the case ids behind each figure: only an auditor may see them."
    " Set LIKVARD_TOKEN to an auditor's token (without --cases the figures are shown)"
)


@app.command("indicators")
def indicators_command(
    indicator_id: str | None = typer.Argument(
        None, metavar="[ID]", help="The indicator to compute (none: list them all)"
    ),
    start: datetime | None = typer.Option(
        None, "--from", formats=["%Y-%m-%d"], help="First day (default: 1 January of --to)"
    ),
    end: datetime | None = typer.Option(
        None,
        "--to",
        formats=["%Y-%m-%d"],
        help="Last day (default: the city's today)",
    ),
    district: str | None = typer.Option(None, "--district", help="Only this district (or city)"),
    structure: str = typer.Option("current", help="District structure: current | as-recorded"),
    breakdown: str | None = typer.Option(
        None, "--breakdown", help="Also a figure per group: gender | age_band | need_level"
    ),
    cases: bool = typer.Option(
        False, "--cases", help="Also the case ids behind each figure (auditors, LIKVARD_TOKEN)"
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line"),
    schema: str = typer.Option("projections", help="Read-model schema"),
) -> None:
    """List the indicators (id, kind, period rule, title), or compute one: n, value and
    the small-count suppression per district and city-wide."""
    from services.projections import indicators

    if indicator_id is None:
        _list(indicators.INDICATORS.values(), as_json)
        return
    try:
        indicator = indicators.get(indicator_id)
    except indicators.UnknownIndicator:
        raise fail(f"no indicator {indicator_id!r}; `likvard indicators` lists them", 2) from None
    first, last = day_window(start, end)
    if last < first:
        raise fail("--to is before --from")
    if structure not in ("current", "as-recorded"):
        raise fail(f"--structure must be current or as-recorded, not {structure!r}")
    if breakdown is not None and breakdown not in indicator.breakdowns:
        raise fail(f"{indicator.id} is broken down by: {', '.join(indicator.breakdowns)}")
    _check_district(district, structure)
    if missing := indicator.missing(breakdown):
        raise fail(f"{indicator.id} needs read-model columns this version lacks: {missing}")
    settings = settings_or_exit()
    try:
        dsn = settings.require_database()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    resource = f"indicator:{indicator.id}"
    if cases:
        _require_auditor(settings, resource)
    from likvard.cli.operator import record_read

    record_read(settings, Action.REPORT_READ, resource)
    figures = _compute(dsn, schema, indicator, first, last, structure, district, breakdown, cases)
    if cases:
        _record_cases(settings, resource, sorted({c for f in figures for c in f.case_ids or ()}))
    _print(indicator, figures, as_json, cases)


def _check_district(code: str | None, structure: str) -> None:
    """A district of the structure (or `city`), else exit 2 naming what to ask instead."""
    from likvard.districts import DistrictRegistry

    if code is None or code == "city":
        return
    registry = DistrictRegistry.load()
    if registry.get(code) is None:
        raise fail(f"no district has the code {code!r}")
    if structure == "current" and registry.successor_of(code) != code:
        raise fail(
            f"{code!r} was succeeded by {registry.successor_of(code)!r}; ask for that"
            " district, or for --structure as-recorded"
        )


def _list(defined: Iterable[Indicator], as_json: bool) -> None:
    out = stdout()
    if as_json:
        for i in defined:
            out.print(json.dumps(i.definition(), ensure_ascii=False), markup=False, highlight=False)
        return
    table = Table("id", "kind", "period", "unit", "title", box=None, pad_edge=False)
    for i in defined:
        table.add_row(i.id, str(i.kind), i.period.name, i.unit, i.title_en)
    out.print(table)


def _compute(
    dsn: str,
    schema: str,
    indicator: Indicator,
    first: date,
    last: date,
    structure: str,
    district: str | None,
    breakdown: str | None,
    with_cases: bool,
) -> list[Figure]:
    import psycopg

    from likvard.db import check_schema_name
    from services.projections import indicators

    try:
        check_schema_name(schema)
        with psycopg.connect(dsn) as conn:
            return indicators.compute(
                conn,
                schema,
                indicator,
                start=first,
                end=last,
                structure="current" if structure == "current" else "as-recorded",
                district=district,
                breakdown=breakdown,
                with_cases=with_cases,
            )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise fail(
            f"no read models in schema {schema!r}: run `likvard project` or `likvard replay`"
        ) from exc
    except psycopg.Error as exc:
        raise fail(f"the read models cannot be read: {type(exc).__name__}", 1) from exc


def _require_auditor(settings: Settings, resource: str) -> None:
    """Before anything is read: the operator must be a verified token's subject with the
    auditor role (exit 1 otherwise). A token's refusal is recorded in the access log; an
    operating-system login has no Likvärd roles, so it cannot be an auditor."""
    from likvard.cli.operator import operator
    from likvard.identity import Role

    who = operator(settings)
    if who.principal is not None and who.principal.has(Role.AUDITOR):
        return
    if who.principal is not None:
        _write(settings, who, resource, [None], allow=False, reason="case-ids-for-auditors")
    raise fail(f"not allowed: {CASES_REFUSED}", 1)


def _record_cases(settings: Settings, resource: str, case_ids: list[str]) -> None:
    """One access-log entry per case shown, in one commit, before anything is printed."""
    from likvard.cli.operator import operator

    if case_ids:
        _write(settings, operator(settings), resource, case_ids, allow=True, reason="auditor")


def _write(
    settings: Settings,
    who: Operator,
    resource: str,
    case_ids: Sequence[str | None],
    *,
    allow: bool,
    reason: str,
) -> None:
    from likvard import access_log
    from likvard.cli.operator import SERVICE
    from likvard.guard import AccessEntry

    now = datetime.now(UTC)
    entries = [
        AccessEntry(
            actor=who.actor,
            roles=who.roles,
            action=str(Action.REPORT_READ),
            resource=resource,
            case_id=case_id,
            allowed=allow,
            reason=reason,
            emergency_reason=None,
            service=SERVICE,
            occurred_at=now,
            trace_id=None,
        )
        for case_id in case_ids
    ]
    try:
        writer = access_log.open_access_log(settings, SERVICE)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    except Exception as exc:  # the database: nothing is shown unlogged
        raise fail(f"cannot open the access log, so nothing is shown: {exc}", 1) from exc
    try:
        writer.record(entries)
    except Exception as exc:
        raise fail(f"cannot write the access log, so nothing is shown: {exc}", 1) from exc
    finally:
        writer.close()


def _shown(indicator: Indicator, value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if indicator.kind == "share" else f"{value:.1f}"


def _print(indicator: Indicator, figures: list[Figure], as_json: bool, cases: bool) -> None:
    out = stdout()
    if as_json:
        for f in figures:
            row = dataclasses.asdict(f)
            out.print(json.dumps(row, ensure_ascii=False), markup=False, highlight=False)
        return
    columns = ["district", "group", "persons", "n", "numerator", "value", "suppressed"]
    table = Table(*columns, *(["case ids"] if cases else []), box=None, pad_edge=False)
    for f in figures:
        cells = [
            f.district,
            f.group or "",
            *("" if v is None else str(v) for v in (f.persons, f.n, f.numerator)),
            _shown(indicator, f.value),
            "suppressed" if f.suppressed else "",
        ]
        table.add_row(*cells, *([" ".join(f.case_ids or ())] if cases else []))
    out.print(table)
    console.print(
        f"{indicator.id}: {indicator.title_en} ({indicator.unit}; {indicator.period.description})"
    )
