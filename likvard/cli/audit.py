"""The auditor's questions on the command line: `likvard access-log` (who read case X, which
cases did actor Y read, which emergency reads happened, between days).

It reads the access-log store itself (`likvard.access_log_audit.search`, the decoded chained
bytes), not the reporting API's projection: the source of truth, with no relay or
projection lag, so an entry committed before an answer left is listed at once. Like the
other commands that read straight from the database, the operator's read is logged first
(`likvard.cli.operator.record_read`): with LIKVARD_TOKEN the policy decides (auditors
only), an operating-system login is recorded as itself."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from likvard.cli.base import app, console, fail, settings_or_exit, stdout
from likvard.config import ConfigError

if TYPE_CHECKING:
    from likvard.access_log_audit import AccessRecord

COLUMNS = (
    "accessed_at",
    "actor",
    "roles",
    "action",
    "resource",
    "outcome",
    "reason",
    "emergency_reason",
)


@app.command("access-log")
def access_log(
    case: str | None = typer.Option(None, "--case", help="Only the accesses of this case"),
    actor: str | None = typer.Option(None, "--actor", help="Only this actor's accesses"),
    start: datetime | None = typer.Option(
        None, "--from", formats=["%Y-%m-%d"], help="From this day (city time zone, included)"
    ),
    end: datetime | None = typer.Option(
        None, "--to", formats=["%Y-%m-%d"], help="Up to this day (city time zone, included)"
    ),
    emergency: bool = typer.Option(
        False, "--emergency", help="Only emergency reads (break the glass)"
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line"),
    schema: str = typer.Option("access_log", help="The access log's schema"),
) -> None:
    """List the access log's entries in order (time, actor, roles, action, resource,
    outcome, reason, emergency reason): every case-level read and every refusal."""
    import psycopg

    from likvard.access_log_audit import search
    from likvard.cli.operator import record_read
    from likvard.db import check_schema_name
    from likvard.policy import Action

    settings = settings_or_exit()
    first, last = (start.date() if start else None), (end.date() if end else None)
    if first and last and last < first:
        raise fail("--to is before --from")
    try:
        check_schema_name(schema)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    record_read(settings, Action.ACCESS_LOG_READ, "access-log")
    try:
        records = search(
            settings,
            case_id=case,
            actor=actor,
            start=first,
            end=last,
            emergency=True if emergency else None,
            schema=schema,
        )
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc)) from exc
    except psycopg.Error as exc:
        raise fail(f"the access log cannot be read: {type(exc).__name__}: {exc}", 1) from exc
    out = stdout()
    if as_json:
        for r in records:
            out.print(json.dumps(as_row(r), ensure_ascii=False), markup=False, highlight=False)
        return
    table = Table(*(c.replace("_", " ") for c in COLUMNS), box=None, pad_edge=False)
    for r in records:
        row = as_row(r)
        table.add_row(*("" if row[c] is None else str(row[c]) for c in COLUMNS))
    out.print(table)
    console.print(f"{len(records)} entries")


def as_row(r: AccessRecord) -> dict[str, Any]:
    """An entry as plain JSON values (times in ISO 8601, UTC)."""
    return {
        "accessed_at": r.accessed_at.isoformat(),
        "actor": r.actor,
        "roles": r.roles,
        "action": r.action,
        "resource": r.resource,
        "case_id": r.case_id,
        "outcome": r.outcome,
        "reason": r.reason,
        "emergency_reason": r.emergency_reason,
        "service": r.service,
        "trace_id": r.trace_id,
        "event_id": r.event_id,
        "stream_id": r.stream_id,
        "stream_version": r.stream_version,
    }
