"""What a service knows of cases, learnt only from `likvard.intake.v1`.

The referral and follow-up services never call intake: each folds the intake events it
consumes into a table of its own schema
`known_cases` (district, open or closed, consents in force, the transfers between
districts), in the same transaction as the inbox records the event ids, so a re-delivered
event changes nothing. Events of one case arrive in stream order (one key, one partition);
an event older than what is stored (a replay) is ignored by its stream version, except that
a transfer not yet known is still added to the history (keyed by its version), so the
history does not depend on the order events arrive in.

The transfers are what the access policy needs of a case (`KnownCase.scope()`): after a
transfer the sending district keeps read access for 30 days.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from likvard.db import may_migrate, require_relations
from likvard.inbox import Incoming
from likvard.policy import CaseScope, Transfer

INTAKE_EVENTS = frozenset(
    {
        "IntakeRegistered",
        "CaseTransferred",
        "CaseClosed",
        "CaseReopened",
        "ConsentRecorded",
        "ConsentWithdrawn",
    }
)


@dataclass(frozen=True)
class KnownTransfer:
    """A CaseTransferred of the case: its stream version (what makes it unique), the
    district it left and when that was recorded (from then the receiving district has it)."""

    version: int
    from_district: str
    to_district: str
    at: datetime


@dataclass(frozen=True)
class KnownCase:
    case_id: str
    district: str | None = None
    status: str = "unknown"
    version: int = 0
    # consent_id -> (recipients, valid_until ISO date or None)
    consents: dict[str, tuple[tuple[str, ...], str | None]] = field(default_factory=dict)
    # Every transfer of the case, in stream order.
    transfers: tuple[KnownTransfer, ...] = ()

    def scope(self) -> CaseScope:
        """The case as the access policy sees it (no district: not known to be registered)."""
        return CaseScope(
            self.case_id,
            self.district if self.status != "unknown" else None,
            tuple(Transfer(t.from_district, t.at) for t in self.transfers),
        )

    def consents_in_force(self, on: date) -> dict[str, tuple[str, ...]]:
        return {
            cid: recipients
            for cid, (recipients, until) in self.consents.items()
            if until is None or on <= date.fromisoformat(until)
        }


def _with_transfer(
    case: KnownCase, data: Mapping[str, Any], version: int, at: datetime
) -> KnownCase:
    if any(t.version == version for t in case.transfers):
        return case
    transfer = KnownTransfer(version, data["from_district"], data["to_district"], at)
    return replace(
        case, transfers=tuple(sorted((*case.transfers, transfer), key=lambda t: t.version))
    )


def apply(
    case: KnownCase,
    event_type: str,
    data: dict[str, Any],
    version: int,
    at: datetime | None = None,
) -> KnownCase:
    """Fold one intake event (pure). Older or repeated versions leave the case as it is,
    but for a transfer missing from the history. `at` is when the event was recorded
    (a transfer's start of the sending district's 30 days of read)."""
    if event_type == "CaseTransferred" and at is not None:
        case = _with_transfer(case, data, version, at)
    if version <= case.version:
        return case
    new = replace(case, version=version)
    match event_type:
        case "IntakeRegistered":
            return replace(new, district=data["district"], status="open")
        case "CaseTransferred":
            return replace(new, district=data["to_district"])
        case "CaseClosed":
            return replace(new, status="closed")
        case "CaseReopened":
            return replace(new, status="open")
        case "ConsentRecorded":
            until = data.get("valid_until")
            entry = (tuple(data["recipients"]), until.isoformat() if until else None)
            return replace(new, consents={**case.consents, data["consent_id"]: entry})
        case "ConsentWithdrawn":
            rest = {k: v for k, v in case.consents.items() if k != data["consent_id"]}
            return replace(new, consents=rest)
    return new


_COLUMNS = "case_id, district, status, version, consents, transfers"


def _row(row: tuple[Any, ...]) -> KnownCase:
    consents = {k: (tuple(v[0]), v[1]) for k, v in (row[4] or {}).items()}
    transfers = tuple(
        KnownTransfer(t["version"], t["from"], t["to"], datetime.fromisoformat(t["at"]))
        for t in (row[5] or [])
    )
    return KnownCase(row[0], row[1], row[2], row[3], consents, transfers)


def _transfers_json(case: KnownCase) -> Jsonb:
    return Jsonb(
        [
            {
                "version": t.version,
                "from": t.from_district,
                "to": t.to_district,
                "at": t.at.isoformat(),
            }
            for t in case.transfers
        ]
    )


def recorded_at(event: Incoming, default: datetime) -> datetime:
    """When the event was stored (its metadata's recorded_at), else `default`."""
    value = event.metadata.get("recorded_at") or event.metadata.get("occurred_at")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return default


class CaseDirectory:
    def __init__(self, schema: str) -> None:
        self._schema = schema
        self._t = sql.Identifier(schema)

    def migrate(self, conn: psycopg.Connection[Any]) -> None:
        """Create the table if missing. Under an advisory lock: the API, the consumer and
        the ingest worker of a service start at once, and CREATE TABLE IF NOT EXISTS run
        concurrently can still fail on PostgreSQL's catalogue."""
        with conn.transaction():
            if not may_migrate(conn, self._schema):  # a service's role: `likvard db migrate`
                require_relations(conn, self._schema, ["known_cases"])
                return
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))",
                (f"likvard.known_cases.{self._schema}",),
            )
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.known_cases (case_id text PRIMARY KEY,"
                    " district text, status text NOT NULL, version integer NOT NULL,"
                    " consents jsonb NOT NULL DEFAULT '{{}}')"
                ).format(self._t)
            )
            # Added by issue 12 (the access policy needs a case's transfers). A table made
            # before it gains the column empty: a case transferred before the upgrade gives
            # its sending district no 30 days of read (refused, never wrongly allowed).
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {}.known_cases"
                    " ADD COLUMN IF NOT EXISTS transfers jsonb NOT NULL DEFAULT '[]'"
                ).format(self._t)
            )

    def get(self, conn: psycopg.Connection[Any], case_id: str) -> KnownCase | None:
        row = conn.execute(
            sql.SQL("SELECT " + _COLUMNS + " FROM {}.known_cases WHERE case_id = %s").format(
                self._t
            ),
            (case_id,),
        ).fetchone()
        return None if row is None else _row(row)

    def get_many(self, conn: psycopg.Connection[Any], case_ids: list[str]) -> dict[str, KnownCase]:
        """The known ones of these cases, in one query."""
        rows = conn.execute(
            sql.SQL("SELECT " + _COLUMNS + " FROM {}.known_cases WHERE case_id = ANY(%s)").format(
                self._t
            ),
            (case_ids,),
        ).fetchall()
        return {r[0]: _row(r) for r in rows}

    def wait_for_many(
        self, pool: ConnectionPool, case_ids: list[str], timeout: float, interval: float = 0.1
    ) -> dict[str, KnownCase]:
        """`wait_for` for several cases at once: one query per poll, one wait in all."""
        deadline = time.monotonic() + timeout
        while True:
            with pool.connection() as conn:
                cases = self.get_many(conn, case_ids)
            if all(c in cases and cases[c].status != "unknown" for c in case_ids):
                return cases
            if time.monotonic() >= deadline:
                return cases
            time.sleep(interval)

    def wait_for(
        self, pool: ConnectionPool, case_id: str, timeout: float, interval: float = 0.1
    ) -> KnownCase | None:
        """The case, waiting up to `timeout` seconds for one registered a moment ago whose
        intake event is still on its way (None if it is still unknown then)."""
        return self.wait_for_many(pool, [case_id], timeout, interval).get(case_id)

    def handle(self, conn: psycopg.Connection[Any], events: list[Incoming]) -> None:
        """Inbox handler: fold a batch into `known_cases` with one read and one write."""
        relevant = [e for e in events if e.event_type in INTAKE_EVENTS]
        if not relevant:
            return
        ids = sorted({e.case_id for e in relevant})
        rows = conn.execute(
            sql.SQL(
                "SELECT " + _COLUMNS + " FROM {}.known_cases WHERE case_id = ANY(%s) FOR UPDATE"
            ).format(self._t),
            (ids,),
        ).fetchall()
        cases = {r[0]: _row(r) for r in rows}
        now = datetime.now(UTC)
        for e in sorted(relevant, key=lambda e: (e.case_id, e.metadata["stream_version"])):
            current = cases.get(e.case_id, KnownCase(e.case_id))
            cases[e.case_id] = apply(
                current, e.event_type, e.data, e.metadata["stream_version"], recorded_at(e, now)
            )
        conn.cursor().executemany(
            sql.SQL(
                "INSERT INTO {}.known_cases (" + _COLUMNS + ")"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (case_id) DO UPDATE SET"
                " district = excluded.district, status = excluded.status,"
                " version = excluded.version, consents = excluded.consents,"
                " transfers = excluded.transfers"
            ).format(self._t),
            [
                (
                    c.case_id,
                    c.district,
                    c.status,
                    c.version,
                    Jsonb({k: [list(v[0]), v[1]] for k, v in c.consents.items()}),
                    _transfers_json(c),
                )
                for c in (cases[i] for i in ids)
            ],
        )
