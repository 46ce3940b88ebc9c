"""The access log as a read model: one row per `CaseAccessed` event, for the auditor's
questions (who read case X, which cases did actor Y read, which emergency reads happened,
between dates) on the reporting API.

The rows are written by `readmodels.apply` in the same transaction that records the event
ids in `processed`, so a re-delivered or replayed entry is stored once, and a replay of the
access-log topic rebuilds the table exactly (its checksum is one of the read models').
The source of truth stays the hash-chained access-log store (`likvard.access_log`); this
table is its projection and may lag it by the relay and the worker.

Entries are answered in the order of `accessed_at`, then the position in the access-log
stream (`stream_id`, `stream_version`: one stream per service), then the event id, so a
page boundary is a total order and keyset paging (`after` an event id) never skips or
repeats an entry.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

import psycopg
from psycopg import sql

from likvard.db import check_schema_name
from likvard.domain import CITY_TZ
from likvard.inbox import Incoming

EVENT_TYPE = "CaseAccessed"
TABLE = "access_log"

# Columns after event_id, in COPY order.
COLUMNS = (
    "stream_id",
    "stream_version",
    "accessed_at",
    "actor",
    "roles",
    "action",
    "resource",
    "case_id",
    "outcome",
    "reason",
    "emergency_reason",
    "service",
    "trace_id",
)
ORDER = "accessed_at, stream_id, stream_version, event_id"


def migrate(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create the table and the indexes the filters use (idempotent; the caller holds the
    schema's migration lock, see `readmodels.migrate`)."""
    t = sql.Identifier(check_schema_name(schema))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.access_log (event_id uuid PRIMARY KEY,"
            ' stream_id text COLLATE "C" NOT NULL, stream_version integer NOT NULL,'
            " accessed_at timestamptz NOT NULL, actor text NOT NULL, roles text NOT NULL,"
            " action text NOT NULL, resource text NOT NULL, case_id text,"
            " outcome text NOT NULL CHECK (outcome IN ('allowed', 'refused')),"
            " reason text NOT NULL, emergency_reason text, service text NOT NULL,"
            " trace_id text)"
        ).format(t)
    )
    for name, columns, where in (
        ("access_log_order", ORDER, ""),
        ("access_log_case", f"case_id, {ORDER}", ""),
        ("access_log_actor", f"actor, {ORDER}", ""),
        ("access_log_emergency", ORDER, " WHERE emergency_reason IS NOT NULL"),
    ):
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {}.access_log ({}){}").format(
                sql.Identifier(name), t, sql.SQL(columns), sql.SQL(where)
            )
        )


def is_access(e: Incoming) -> bool:
    return e.event_type == EVENT_TYPE


def row(e: Incoming) -> tuple[Any, ...]:
    """The table row of one decoded CaseAccessed event (pure)."""
    d, m = e.data, e.metadata
    return (
        e.event_id,
        str(m["case_id"]),  # the access-log stream, access-log-<service>
        int(m["stream_version"]),
        d["accessed_at"],
        d["actor"],
        d["roles"],
        d["action"],
        d["resource"],
        d.get("case_id"),
        str(d["outcome"]),
        d["reason"],
        d.get("emergency_reason"),
        d["service"],
        d.get("trace_id"),
    )


def copy(conn: psycopg.Connection[Any], schema: str, fresh: Sequence[Incoming]) -> None:
    """Write the rows of events new to `processed` (so new here too) with one COPY."""
    if not fresh:
        return
    t = sql.Identifier(check_schema_name(schema))
    names = sql.SQL(", ").join(sql.Identifier(n) for n in ("event_id", *COLUMNS))
    with conn.cursor().copy(sql.SQL("COPY {}.access_log ({}) FROM STDIN").format(t, names)) as cp:
        for e in fresh:
            cp.write_row(row(e))


def day_window(first: date | None, last: date | None) -> tuple[datetime | None, datetime | None]:
    """Days in the city's time zone as instants: from the start of `first` (inclusive) to
    the end of `last` (exclusive), so `--from 2025-03-01 --to 2025-03-01` is that whole
    local day."""
    start = datetime.combine(first, time.min, CITY_TZ) if first else None
    end = datetime.combine(last + timedelta(days=1), time.min, CITY_TZ) if last else None
    return start, end


@dataclass(frozen=True)
class Filter:
    """What the auditor asks for; every field None means "any". `start` is inclusive and
    `end` exclusive (the API and the command line turn days into these instants)."""

    case_id: str | None = None
    actor: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    emergency: bool | None = None
    outcome: str | None = None


@dataclass(frozen=True)
class Entry:
    event_id: uuid.UUID
    accessed_at: datetime
    actor: str
    roles: str
    action: str
    resource: str
    case_id: str | None
    outcome: str
    reason: str
    emergency_reason: str | None
    service: str
    trace_id: str | None
    stream_id: str
    stream_version: int


class UnknownCursor(LookupError):
    """`after` names an event id that is not in the access log."""


def _where(f: Filter) -> tuple[list[sql.Composable], list[Any]]:
    clauses: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in (("case_id", f.case_id), ("actor", f.actor), ("outcome", f.outcome)):
        if value is not None:
            clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if f.start is not None:
        clauses.append(sql.SQL("accessed_at >= %s"))
        params.append(f.start)
    if f.end is not None:
        clauses.append(sql.SQL("accessed_at < %s"))
        params.append(f.end)
    if f.emergency is True:
        clauses.append(sql.SQL("emergency_reason IS NOT NULL"))
    elif f.emergency is False:
        clauses.append(sql.SQL("emergency_reason IS NULL"))
    return clauses, params


def query(
    conn: psycopg.Connection[Any],
    schema: str,
    f: Filter,
    *,
    limit: int = 100,
    after: uuid.UUID | None = None,
) -> list[Entry]:
    """The entries that match, in order, at most `limit`, starting after the entry whose
    event id is `after` (keyset paging); UnknownCursor if that entry does not exist."""
    t = sql.Identifier(check_schema_name(schema))
    clauses, params = _where(f)
    if after is not None:
        key = conn.execute(
            sql.SQL(
                "SELECT accessed_at, stream_id, stream_version FROM {}.access_log"
                " WHERE event_id = %s"
            ).format(t),
            (after,),
        ).fetchone()
        if key is None:
            raise UnknownCursor(str(after))
        clauses.append(sql.SQL(f"({ORDER}) > (%s, %s, %s, %s)"))
        params.extend([*key, after])
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("")
    names = [field.name for field in dataclasses.fields(Entry)]
    cur = conn.execute(
        sql.SQL("SELECT {} FROM {}.access_log{} ORDER BY {} LIMIT %s").format(
            sql.SQL(", ").join(sql.Identifier(n) for n in names), t, where, sql.SQL(ORDER)
        ),
        (*params, limit),
    )
    return [Entry(*r) for r in cur.fetchall()]
