"""The access log read back: the auditor's search (who read case X, what did actor Y read,
which emergency reads, between days) and its verification (the hash chain of every
access-log stream, each row's JSON copy against its chained bytes, and the stream heads).

Read from the store itself, the source of truth: `likvard access-log` and `likvard verify
access-log` never wait for a projection. The writer is `likvard.access_log`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time as day_time, timedelta
from typing import Any

from psycopg import sql

from likvard.access_log import CITY_TZ, EVENT_TYPE, open_store, utc
from likvard.codec import Catalogue, CodecError
from likvard.config import Settings
from likvard.eventstore import ChainBreak, EventStore, StoredEvent, row_to_event


# --- reading ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AccessRecord:
    """One stored `CaseAccessed` event, as decoded from its chained bytes."""

    stream_id: str
    stream_version: int
    global_position: int
    event_id: str
    recorded_at: datetime
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
    accessed_at: datetime

    @property
    def emergency(self) -> bool:
        return self.emergency_reason is not None


def _bound(moment: datetime | date | None, *, end: bool) -> datetime | None:
    """A datetime as given (naive = UTC); a date is a day of the city's calendar, from its
    start (`start`) or to its end inclusive (`end`)."""
    if moment is None:
        return None
    if isinstance(moment, datetime):
        return utc(moment)
    day = moment + timedelta(days=1) if end else moment
    return datetime.combine(day, day_time(0), CITY_TZ)


def _record(event: StoredEvent, catalogue: Catalogue) -> AccessRecord:
    payload = dict(catalogue.decode(event.data).record)
    payload.pop("metadata")
    return AccessRecord(
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        global_position=event.global_position,
        event_id=str(event.event_id),
        recorded_at=event.recorded_at,
        **payload,
    )


def search(
    settings: Settings,
    *,
    case_id: str | None = None,
    actor: str | None = None,
    start: datetime | date | None = None,
    end: datetime | date | None = None,
    emergency: bool | None = None,
    schema: str | None = None,
) -> list[AccessRecord]:
    """The entries matching every filter given, oldest first (by access time, then store
    order). `start` is inclusive, `end` exclusive for a datetime and inclusive for a date.
    Read from the stored bytes (the chained truth), not the queryable JSON copy."""
    store = open_store(settings, schema=schema, service="access-log-reader", max_size=1)
    try:
        return _search(
            store, case_id, actor, _bound(start, end=False), _bound(end, end=True), emergency
        )
    finally:
        store.pool.close()


def _search(
    store: EventStore,
    case_id: str | None,
    actor: str | None,
    start: datetime | None,
    end: datetime | None,
    emergency: bool | None,
) -> list[AccessRecord]:
    conditions: list[sql.Composable] = [sql.SQL("event_type = %s")]
    params: list[Any] = [EVENT_TYPE]
    for column, value in (("case_id", case_id), ("actor", actor)):
        if value is not None:
            conditions.append(sql.SQL("payload->>{} = %s").format(sql.Literal(column)))
            params.append(value)
    if start is not None:
        conditions.append(sql.SQL("occurred_at >= %s"))
        params.append(start)
    if end is not None:
        conditions.append(sql.SQL("occurred_at < %s"))
        params.append(end)
    if emergency is not None:
        conditions.append(sql.SQL("(payload->>'emergency_reason' IS NOT NULL) = %s"))
        params.append(emergency)
    query = sql.SQL(
        "SELECT global_position, stream_id, stream_version, event_id, event_type,"
        " schema_fingerprint, data, metadata, payload, occurred_at, recorded_at, prev_hash,"
        " hash FROM {}.events WHERE {} ORDER BY occurred_at, global_position"
    ).format(sql.Identifier(store.schema), sql.SQL(" AND ").join(conditions))
    with store.pool.connection() as conn:
        rows = conn.execute(query, params).fetchall()
    records = [_record(row_to_event(row), store.catalogue) for row in rows]
    # The JSON copy chose the rows; the decoded bytes must agree (verify finds the rest).
    return [
        r
        for r in records
        if (case_id is None or r.case_id == case_id)
        and (actor is None or r.actor == actor)
        and (emergency is None or r.emergency == emergency)
    ]


# --- verification -----------------------------------------------------------------------
def _normal(value: Any) -> Any:
    """JSON values with timestamps as UTC instants, so equal times compare equal."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, datetime):
        return utc(value).astimezone(UTC)
    if isinstance(value, str) and len(value) >= 19 and value[4:5] == "-" and "T" in value:
        try:
            return datetime.fromisoformat(value).astimezone(UTC)
        except ValueError:
            return value
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def copy_breaks(events: Iterator[StoredEvent], catalogue: Catalogue) -> list[ChainBreak]:
    """Rows whose queryable JSON (payload, metadata) says something else than their chained
    bytes: an edit of the copy the search and the reporting API filter on."""
    breaks: list[ChainBreak] = []
    for e in events:
        try:
            record = dict(catalogue.decode(e.data).record)
        except CodecError:
            continue  # the chain check reports undecodable bytes
        metadata = record.pop("metadata")
        if _normal(record) != _normal(e.payload):
            breaks.append(
                ChainBreak(
                    e.stream_id,
                    e.stream_version,
                    e.global_position,
                    "the payload column does not match the event's bytes (row edited)",
                )
            )
        if _normal(metadata) != _normal(e.metadata):
            breaks.append(
                ChainBreak(
                    e.stream_id,
                    e.stream_version,
                    e.global_position,
                    "the metadata column does not match the event's bytes (row edited)",
                )
            )
    return breaks


def verify(store: EventStore, stream: str | None = None) -> list[ChainBreak]:
    """Every break of the access log (or of one stream): the hash chain, and the JSON copy
    of each row against its chained bytes. Also: a stream head that does not match its last
    event (rows deleted from the end)."""
    breaks = store.verify(stream)
    events = store.read_stream(stream) if stream is not None else store.read_all()
    breaks += copy_breaks(iter(events), store.catalogue)
    breaks += _head_breaks(store, stream)
    return sorted(breaks, key=lambda b: (b.stream_id, b.stream_version, b.reason))


def _head_breaks(store: EventStore, stream: str | None) -> list[ChainBreak]:
    query = sql.SQL(
        "SELECT s.stream_id, s.version, s.last_hash, e.stream_version, e.hash, e.global_position"
        " FROM {t}.streams s LEFT JOIN LATERAL (SELECT stream_version, hash, global_position"
        " FROM {t}.events WHERE stream_id = s.stream_id ORDER BY stream_version DESC LIMIT 1) e"
        " ON true WHERE %s::text IS NULL OR s.stream_id = %s"
    ).format(t=sql.Identifier(store.schema))
    with store.pool.connection() as conn:
        rows = conn.execute(query, (stream, stream)).fetchall()
    return [
        ChainBreak(
            sid,
            int(version),
            int(position or 0),
            f"the stream head says version {version}, its last stored event is"
            f" {last_version or 0} (events deleted?)",
        )
        for sid, version, head_hash, last_version, last_hash, position in rows
        if int(version) != int(last_version or 0)
        or (last_hash is not None and bytes(head_hash) != bytes(last_hash))
    ]


def streams(store: EventStore) -> list[str]:
    """The access-log streams in the store (one per service that logged)."""
    with store.pool.connection() as conn:
        rows = conn.execute(
            sql.SQL("SELECT stream_id FROM {}.streams ORDER BY stream_id").format(
                sql.Identifier(store.schema)
            )
        ).fetchall()
    return [str(r[0]) for r in rows]
