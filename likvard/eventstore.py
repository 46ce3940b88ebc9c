"""The append-only event store of one service, with its outbox and per-stream hash chain.

Every event is stored as the exact Avro single-object bytes that go to Kafka, so the
hash chain covers what consumers receive. Each event's hash is
SHA-256(previous hash of the stream || its own bytes); the first event of a stream
chains from 32 zero bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from likvard import telemetry
from likvard.codec import Catalogue, CodecError
from likvard.config import Settings
from likvard.db import autocommit, check_schema_name, make_pool, migrate
from likvard.topics import SERVICE_TOPICS

GENESIS_HASH = bytes(32)
_CONFLICT = "likvard-append-conflict"

_meter = telemetry.meter("likvard.eventstore")
_appended = _meter.create_counter(
    "likvard.events.appended", unit="{event}", description="Events appended to an event store."
)
_append_seconds = _meter.create_histogram(
    "likvard.eventstore.append.duration",
    unit="s",
    description="Time of one append transaction (one or more streams).",
)


class ConcurrencyError(Exception):
    """The stream moved on since the caller read it: retry with the new state (HTTP 409)."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream_id} is at version {actual}, not the expected version {expected}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


def append_error(stream_id: str, expected: int, actual: int) -> Exception:
    """Why an append of a stream was refused: it moved on (ConcurrencyError), or it is at
    the expected version but its head's last hash is not the hash the caller read."""
    if actual != expected:
        return ConcurrencyError(stream_id, expected, actual)
    return RuntimeError(
        f"stream {stream_id} is at version {actual}, but its head's last hash is not the"
        " hash of its last event as read"
    )


@dataclass(frozen=True)
class NewEvent:
    """An event decided by a domain, before the store gives it a position and a hash."""

    event_type: str
    data: dict[str, Any]
    occurred_at: datetime
    district: str
    actor: str
    correlation_id: str
    causation_id: str | None = None
    traceparent: str | None = None
    case_id: str | None = None  # defaults to the stream id
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    producer: str | None = None
    """Who produced it, if not this service (a district system's id, for ingested events)."""


@dataclass(frozen=True)
class StoredEvent:
    global_position: int
    stream_id: str
    stream_version: int
    event_id: uuid.UUID
    event_type: str
    schema_fingerprint: bytes
    data: bytes
    metadata: dict[str, Any]
    payload: dict[str, Any]
    occurred_at: datetime
    recorded_at: datetime
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True)
class PreparedAppend:
    """One stream's events sealed, encoded and chained from `known_hash`, ready to write:
    the head goes from `expected` to `version` and `last_hash` if still at `known_hash`."""

    stream_id: str
    expected: int
    known_hash: bytes
    rows: list[tuple[Any, ...]]
    last_hash: bytes

    @property
    def version(self) -> int:
        return self.expected + len(self.rows)


@dataclass(frozen=True)
class ChainBreak:
    """One place where the stored history does not match its hash chain."""

    stream_id: str
    stream_version: int
    global_position: int
    reason: str


def chain_hash(prev_hash: bytes, data: bytes) -> bytes:
    return hashlib.sha256(prev_hash + data).digest()


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | bytes):
        return str(value) if isinstance(value, uuid.UUID) else value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(value: dict[str, Any]) -> Jsonb:
    """JSON for the queryable copy of an event; the Avro bytes stay the source of truth."""
    return Jsonb(value, dumps=lambda v: json.dumps(v, default=_json_default))


_COLUMNS = (
    "global_position, stream_id, stream_version, event_id, event_type, schema_fingerprint,"
    " data, metadata, payload, occurred_at, recorded_at, prev_hash, hash"
)


_APPEND_SQL = f"""
WITH h AS MATERIALIZED (
    SELECT * FROM unnest(%b::text[], %b::int[], %b::int[], %b::bytea[], %b::bytea[])
        AS h(stream_id, expected, version, known_hash, last_hash)
), created AS (
    INSERT INTO {{s}}.streams (stream_id, version, last_hash)
    SELECT stream_id, version, last_hash FROM h WHERE expected = 0 ORDER BY stream_id
    ON CONFLICT (stream_id) DO NOTHING
    RETURNING stream_id
), moved AS (
    UPDATE {{s}}.streams st SET version = l.version, last_hash = l.last_hash
    FROM (
        SELECT cur.stream_id, h.expected, h.known_hash, h.version, h.last_hash
        FROM {{s}}.streams cur JOIN h ON h.stream_id = cur.stream_id
        WHERE h.expected > 0 ORDER BY cur.stream_id FOR UPDATE OF cur
    ) l
    WHERE st.stream_id = l.stream_id AND st.version = l.expected
        AND st.last_hash = l.known_hash
    RETURNING st.stream_id
), ok AS (
    SELECT stream_id FROM created UNION ALL SELECT stream_id FROM moved
), ev AS (
    INSERT INTO {{s}}.events (stream_id, stream_version, event_id, event_type,
        schema_fingerprint, data, metadata, payload, occurred_at, recorded_at, prev_hash, hash)
    SELECT u.stream_id, u.stream_version, u.event_id, u.event_type, u.schema_fingerprint,
        u.data, u.metadata, u.payload, u.occurred_at, u.recorded_at, u.prev_hash, u.hash
    FROM unnest(%b::text[], %b::int[], %b::uuid[], %b::text[], %b::bytea[],
        %b::bytea[], %b::jsonb[], %b::jsonb[], %b::timestamptz[], %b::timestamptz[],
        %b::bytea[], %b::bytea[]) WITH ORDINALITY AS u(stream_id, stream_version, event_id,
        event_type, schema_fingerprint, data, metadata, payload, occurred_at, recorded_at,
        prev_hash, hash, n)
    WHERE u.stream_id IN (SELECT stream_id FROM ok)
    ORDER BY u.n
    RETURNING {_COLUMNS}
), ob AS (
    INSERT INTO {{s}}.outbox (global_position, stream_id, stream_version, key, event_id,
        event_type, topic, value, traceparent)
    SELECT global_position, stream_id, stream_version, metadata->>'case_id', event_id,
        event_type, %b, data, metadata->>'traceparent'
    FROM ev ORDER BY stream_id, stream_version
), notified AS (
    SELECT pg_notify(%b, ''), CASE WHEN NOT %s OR (SELECT count(*) FROM ok) = %s THEN 0
        ELSE ('{_CONFLICT} ' || (SELECT count(*) FROM ok))::int END AS whole
)
SELECT ev.* FROM ev, notified ORDER BY ev.global_position
"""
"""One statement, so one round trip and (in autocommit) its own transaction: it checks
each stream's head (a new stream must not exist; an existing one must be at the expected
version with the last hash the chain was computed from, locked in id order as every
writer does, so two batches do not deadlock), moves the heads that pass, writes their
events (global positions in the order given: the semi-join must not reorder them) and
outbox rows (in version order per stream, which the relay keeps) and queues the NOTIFY.
Streams whose head check fails write nothing; when the batch is all or none, the cast in
`notified` fails the whole statement instead. Arrays go in binary (%b): text form would
escape every element."""


def row_to_event(row: tuple[Any, ...]) -> StoredEvent:
    return StoredEvent(
        global_position=row[0],
        stream_id=row[1],
        stream_version=row[2],
        event_id=row[3],
        event_type=row[4],
        schema_fingerprint=bytes(row[5]),
        data=bytes(row[6]),
        metadata=row[7],
        payload=row[8],
        occurred_at=row[9],
        recorded_at=row[10],
        prev_hash=bytes(row[11]),
        hash=bytes(row[12]),
    )


class PersonalData(Protocol):
    """Seals the personal details of events about to be stored (`likvard.sealing`), and
    reveals them again where the service itself must compare what it stored."""

    def seal(self, appends: Sequence[tuple[str, Sequence[NewEvent]]]) -> list[list[NewEvent]]: ...

    def reveal(self, events: Sequence[StoredEvent]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class EventStore:
    """Event store of one service in its own PostgreSQL schema. With `personal`, every
    append seals the events' personal details first, whichever path decided them."""

    personal: PersonalData | None = None

    def __init__(
        self,
        pool: ConnectionPool,
        schema: str,
        catalogue: Catalogue,
        *,
        producer: str,
        topic: str,
    ) -> None:
        self.pool = pool
        self.schema = check_schema_name(schema)
        self.catalogue = catalogue
        self.producer = producer
        self.topic = topic
        self._t = sql.Identifier(schema)
        self._personal_fields: dict[str, tuple[str, ...]] = {}

    @property
    def notify_channel(self) -> str:
        return f"likvard_outbox_{self.schema}"

    def migrate(self) -> list[int]:
        with self.pool.connection() as conn:
            return migrate(conn, self.schema, "eventstore")

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=self._t)

    def _refuse_unsealed(self, events: Sequence[NewEvent]) -> None:
        """Without a key store, personal details would be stored in clear: refuse."""
        for event in events:
            if any(event.data.get(n) not in (None, [], ()) for n in self._personal(event)):
                raise ValueError(
                    f"{event.event_type} holds personal details and this event store has"
                    " no key store to seal them (set EventStore.personal)"
                )

    def _personal(self, event: NewEvent) -> tuple[str, ...]:
        """The personal fields of an event type's newest schema (looked up once per type:
        the catalogue hands out a deep copy of the schema each time)."""
        names = self._personal_fields.get(event.event_type)
        if names is None:
            names = tuple(
                n
                for f in self.catalogue.schema(event.event_type)["fields"]
                if f["name"] == "personal"
                for n in f.get("likvard.personal", ())
            )
            self._personal_fields[event.event_type] = names
        return names

    def _encode(
        self, stream_id: str, version: int, event: NewEvent, recorded_at: datetime
    ) -> tuple[bytes, dict[str, Any]]:
        metadata = self._metadata(stream_id, version, event, recorded_at)
        data = self.catalogue.encode(event.event_type, {"metadata": metadata, **event.data})
        return data, metadata

    def _metadata(
        self, stream_id: str, version: int, event: NewEvent, recorded_at: datetime
    ) -> dict[str, Any]:
        """The shared metadata record of an event about to be stored at `version`."""
        return {
            "event_id": str(event.event_id),
            "event_type": event.event_type,
            "case_id": event.case_id or stream_id,
            "stream_version": version,
            "occurred_at": event.occurred_at,
            "recorded_at": recorded_at,
            "producer": event.producer or self.producer,
            "district": event.district,
            "actor": event.actor,
            "correlation_id": event.correlation_id,
            "causation_id": event.causation_id,
            "traceparent": event.traceparent,
        }

    def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
        *,
        last_hash: bytes | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> list[StoredEvent]:
        """Append events and their outbox rows atomically, if the stream is still at
        `expected_version` (0 = the stream must not exist). Raises ConcurrencyError otherwise.

        `last_hash` is the hash of the stream's last event as the caller read it (the
        service has just loaded the stream): with it the append is one round trip.
        `before_commit` runs inside the transaction after every row is written: the fault
        tests use it to hold a transaction open while others commit."""
        heads = None if last_hash is None else {stream_id: last_hash}
        return self.append_many(
            [(stream_id, expected_version, events)], heads=heads, before_commit=before_commit
        )

    def append_many(
        self,
        appends: Sequence[tuple[str, int, Sequence[NewEvent]]],
        *,
        heads: Mapping[str, bytes] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> list[StoredEvent]:
        """`append` for several streams (each at most once) in one transaction: all or none.
        Raises ConcurrencyError for a stream not at its expected version. Returns the stored
        events per stream in the order given, each stream's in version order.

        One statement writes the whole batch (`_APPEND_SQL`); `heads` (the last hash of
        streams the caller has read) saves reading the heads of existing streams first."""
        prepared = self.prepare(appends, heads=heads)
        if not prepared:
            return []
        hook = None if before_commit is None else (lambda _conn: before_commit())
        stored, failed = self.write(prepared, all_or_none=True, before_commit=hook)
        if failed:
            stream_id = min(failed)
            expected = next(p.expected for p in prepared if p.stream_id == stream_id)
            raise append_error(stream_id, expected, failed[stream_id])
        return stored

    def prepare(
        self,
        appends: Sequence[tuple[str, int, Sequence[NewEvent]]],
        *,
        heads: Mapping[str, bytes] | None = None,
    ) -> list[PreparedAppend]:
        """Seal, encode and chain the events of each stream (each at most once) without
        holding any lock: the rows `write` stores. Streams with no events are left out.
        The head of an existing stream not in `heads` is read first (a stream not at its
        expected version raises ConcurrencyError here)."""
        appends = [(s, v, list(e)) for s, v, e in appends if e]
        if not appends:
            return []
        if len({s for s, _, _ in appends}) != len(appends):
            raise ValueError("append_many takes each stream at most once")
        if self.personal is not None:
            sealed = self.personal.seal([(s, e) for s, _, e in appends])
            appends = [(s, v, e) for (s, v, _), e in zip(appends, sealed, strict=True)]
        else:
            self._refuse_unsealed([e for _, _, es in appends for e in es])
        known = dict(heads or {})
        unknown = sorted(s for s, v, _ in appends if v > 0 and s not in known)
        if unknown:
            found = self._heads(unknown)
            for stream_id, expected, _ in sorted(appends):
                if stream_id not in unknown:
                    continue
                actual, last_hash = found.get(stream_id, (0, GENESIS_HASH))
                if actual != expected:
                    raise ConcurrencyError(stream_id, expected, actual)
                known[stream_id] = last_hash
        recorded_at = datetime.now(UTC)
        prepared: list[PreparedAppend] = []
        for stream_id, expected, events in appends:
            start_hash = GENESIS_HASH if expected == 0 else known[stream_id]
            prev_hash, version = start_hash, expected
            rows: list[tuple[Any, ...]] = []
            for event in events:
                version += 1
                data, metadata = self._encode(stream_id, version, event, recorded_at)
                digest = chain_hash(prev_hash, data)
                rows.append(
                    (
                        stream_id,
                        version,
                        event.event_id,
                        event.event_type,
                        data[2:10],
                        data,
                        to_json(metadata),
                        to_json(event.data),
                        event.occurred_at,
                        recorded_at,
                        prev_hash,
                        digest,
                    )
                )
                prev_hash = digest
            prepared.append(PreparedAppend(stream_id, expected, start_hash, rows, prev_hash))
        return prepared

    def write(
        self,
        prepared: Sequence[PreparedAppend],
        *,
        all_or_none: bool,
        before_commit: Callable[[psycopg.Connection[Any]], None] | None = None,
    ) -> tuple[list[StoredEvent], dict[str, int]]:
        """Store prepared appends (each stream at most once) in one statement and one
        transaction. Returns the stored events (per stream in the order given, each
        stream's in version order) and, per stream whose head had moved on, its version
        now. `all_or_none` stores nothing when any stream fails; otherwise the others are
        stored (group commit). Without `before_commit` the statement runs in autocommit:
        one round trip is the whole transaction."""
        if not prepared:
            return [], {}
        rows = [r for p in prepared for r in p.rows]
        cols = [list(c) for c in zip(*rows, strict=True)]
        head_cols = [
            [p.stream_id for p in prepared],
            [p.expected for p in prepared],
            [p.version for p in prepared],
            [p.known_hash for p in prepared],
            [p.last_hash for p in prepared],
        ]
        params = (
            *head_cols,
            *cols,
            self.topic,
            self.notify_channel,
            all_or_none,
            len(prepared),
        )
        started = time.monotonic()
        with autocommit(self.pool) as conn:
            try:
                if before_commit is None:
                    result = conn.execute(self._q(_APPEND_SQL), params).fetchall()
                else:
                    with conn.transaction():
                        result = conn.execute(self._q(_APPEND_SQL), params).fetchall()
                        before_commit(conn)
            except psycopg.errors.InvalidTextRepresentation as exc:
                if _CONFLICT not in str(exc):
                    raise
                result = []  # all or none, and a stream failed: nothing was stored
            stored = [row_to_event(r) for r in result]
            written = {e.stream_id for e in stored}
            missing = [p for p in prepared if p.stream_id not in written]
            failed: dict[str, int] = {}
            if missing:
                versions = self._versions(conn, [p.stream_id for p in missing])
                failed = {
                    p.stream_id: versions.get(p.stream_id, 0)
                    for p in missing
                    if versions.get(p.stream_id, 0) != p.expected
                }
                if not all_or_none or not failed:
                    # At the expected version yet refused: its head's hash is not the
                    # one read (append_error says so).
                    failed = {p.stream_id: versions.get(p.stream_id, 0) for p in missing}
        attributes = {"service": self.producer}
        _appended.add(len(stored), attributes)
        _append_seconds.record(time.monotonic() - started, attributes)
        order = {p.stream_id: n for n, p in enumerate(prepared)}
        return sorted(stored, key=lambda e: (order[e.stream_id], e.stream_version)), failed

    def _heads(self, stream_ids: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """Version and last hash of each existing stream among these (one query)."""
        with autocommit(self.pool) as conn:
            rows = conn.execute(
                self._q(
                    "SELECT stream_id, version, last_hash FROM {s}.streams"
                    " WHERE stream_id = ANY(%s)"
                ),
                (list(stream_ids),),
            ).fetchall()
        return {r[0]: (int(r[1]), bytes(r[2])) for r in rows}

    def _versions(self, conn: psycopg.Connection[Any], stream_ids: list[str]) -> dict[str, int]:
        rows = conn.execute(
            self._q("SELECT stream_id, version FROM {s}.streams WHERE stream_id = ANY(%s)"),
            (stream_ids,),
        ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def _version(self, conn: psycopg.Connection[Any], stream_id: str) -> int:
        row = conn.execute(
            self._q("SELECT version FROM {s}.streams WHERE stream_id = %s"), (stream_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def stream_version(self, stream_id: str) -> int:
        with autocommit(self.pool) as conn:
            return self._version(conn, stream_id)

    def read_stream(self, stream_id: str) -> list[StoredEvent]:
        """One round trip: a lone SELECT in autocommit, no transaction of its own."""
        with autocommit(self.pool) as conn:
            cur = conn.execute(
                self._q(
                    f"SELECT {_COLUMNS} FROM {{s}}.events WHERE stream_id = %s"
                    " ORDER BY stream_version"
                ),
                (stream_id,),
            )
            return [row_to_event(r) for r in cur.fetchall()]

    def read_streams(self, stream_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        """Several streams in one query (every id is a key of the answer, [] if unknown)."""
        streams: dict[str, list[StoredEvent]] = {sid: [] for sid in stream_ids}
        if not streams:
            return streams
        with autocommit(self.pool) as conn:
            cur = conn.execute(
                self._q(
                    f"SELECT {_COLUMNS} FROM {{s}}.events WHERE stream_id = ANY(%s)"
                    " ORDER BY stream_id, stream_version"
                ),
                (list(streams),),
            )
            for row in cur.fetchall():
                streams[row[1]].append(row_to_event(row))
        return streams

    def find_events(self, event_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StoredEvent]:
        """The stored events with these ids (those not stored are absent), in one query."""
        if not event_ids:
            return {}
        with self.pool.connection() as conn:
            cur = conn.execute(
                self._q(f"SELECT {_COLUMNS} FROM {{s}}.events WHERE event_id = ANY(%s)"),
                (list(event_ids),),
            )
            return {e.event_id: e for e in map(row_to_event, cur.fetchall())}

    def read_all(self, from_position: int = 0, batch_size: int = 1000) -> Iterator[StoredEvent]:
        """Every event in global order, fetched in batches (for republish and replay)."""
        position = from_position
        while True:
            with self.pool.connection() as conn:
                rows = conn.execute(
                    self._q(
                        f"SELECT {_COLUMNS} FROM {{s}}.events WHERE global_position > %s"
                        " ORDER BY global_position LIMIT %s"
                    ),
                    (position, batch_size),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield row_to_event(row)
            position = rows[-1][0]

    def ping(self) -> None:
        """Raise unless the database answers and the schema is migrated (readiness)."""
        with self.pool.connection() as conn:
            conn.execute(self._q("SELECT 1 FROM {s}.streams LIMIT 1")).fetchall()

    def count(self) -> int:
        with self.pool.connection() as conn:
            row = conn.execute(self._q("SELECT count(*) FROM {s}.events")).fetchone()
            return int(row[0]) if row else 0

    def outbox_depth(self) -> int:
        with self.pool.connection() as conn:
            row = conn.execute(self._q("SELECT count(*) FROM {s}.outbox")).fetchone()
            return int(row[0]) if row else 0

    def verify(self, stream_id: str | None = None) -> list[ChainBreak]:
        """Recompute every hash chain (or one stream's) and report each break found."""
        return verify_chain(self._iter_for_verify(stream_id), self.catalogue)

    def _iter_for_verify(self, stream_id: str | None) -> Iterator[StoredEvent]:
        if stream_id is not None:
            yield from self.read_stream(stream_id)
            return
        with self.pool.connection() as conn:
            cur = conn.cursor(name="likvard_verify")
            cur.itersize = 2000
            cur.execute(
                self._q(f"SELECT {_COLUMNS} FROM {{s}}.events ORDER BY stream_id, stream_version")
            )
            for row in cur:
                yield row_to_event(row)


def verify_chain(
    events: Iterator[StoredEvent], catalogue: Catalogue | None = None
) -> list[ChainBreak]:
    """Check events ordered by (stream, version): contiguous versions, each prev_hash equal to
    the predecessor's hash, each hash equal to SHA-256(prev_hash || bytes), and (with a
    catalogue) bytes that still decode to the stored identity of the event."""
    breaks: list[ChainBreak] = []
    current: str | None = None
    expected_prev = GENESIS_HASH
    expected_version = 1
    for e in events:
        if e.stream_id != current:
            current, expected_prev, expected_version = e.stream_id, GENESIS_HASH, 1

        def broken(reason: str, e: StoredEvent = e) -> None:
            breaks.append(ChainBreak(e.stream_id, e.stream_version, e.global_position, reason))

        if e.stream_version != expected_version:
            broken(f"version {e.stream_version} found where {expected_version} was expected")
        if e.prev_hash != expected_prev:
            broken("previous-hash link does not match the hash of the preceding event")
        if chain_hash(e.prev_hash, e.data) != e.hash:
            broken("stored hash does not match the event's bytes (content changed)")
        if catalogue is not None:
            try:
                meta = catalogue.decode(e.data).record["metadata"]
                if (
                    str(meta["event_id"]) != str(e.event_id)
                    or meta["stream_version"] != e.stream_version
                ):
                    broken("event bytes carry another event id or version than the row")
            except CodecError as exc:
                broken(f"event bytes do not decode: {exc}")
        expected_prev = e.hash
        expected_version = e.stream_version + 1
    return breaks


def open_store(
    settings: Settings,
    service: str,
    *,
    schema: str | None = None,
    catalogue: Catalogue | None = None,
    max_size: int = 10,
) -> EventStore:
    """The migrated event store of `service` (schema: the service's name unless given), on a
    pool of its own; the caller closes it with `store.pool.close()`."""
    pool = make_pool(settings.require_database(), max_size=max_size, name=f"likvard-{service}")
    store = EventStore(
        pool,
        schema or service,
        catalogue or Catalogue.load(),
        producer=f"likvard-{service}",
        topic=settings.topic(SERVICE_TOPICS[service]),
    )
    try:
        store.migrate()
    except Exception:
        pool.close()
        raise
    return store
