"""The access log: every case-level read and every refusal, as `CaseAccessed` events in a
hash-chained stream per service (`access-log-<service>`), in an event store of its own
(PostgreSQL schema `access_log`, on LIKVARD_ACCESS_LOG_DATABASE_URL), published to
`likvard.access-log.v1` through its outbox by `likvard relay access-log`.

Durability: `AccessLogWriter.record(entries)` returns only after the transaction holding
the entries has committed (PostgreSQL's synchronous commit: on disk, and on the synchronous
standbys if the cluster has them). The guard calls it before the answer is built, so an
answer never leaves for a read that is not in the log: a process that dies after answering
has lost no entry, and one that dies before the commit sent no answer (the client sees the
connection drop or a 503 and may retry). If the commit fails, `record` raises and the
request fails: it never answers unlogged. A commit whose outcome is unknown (the
connection broke during COMMIT) is reported as a failure, so at worst an entry is logged
for an answer that was never sent; never the other way round.

Group commit: `record` is called from many request threads at once. It queues the entries
and waits; one writer thread takes everything queued, appends it in one transaction and
wakes every caller of the batch. While a transaction is in flight the next batch gathers,
so N concurrent reads cost one round trip, not N, and no timer delays a lone read. Writers
of one stream in several processes (replicas) are serialised by the event store's stream
row lock and expected version: a writer that finds the stream moved on retries at the new
version. The queue is bounded; when it is full or the database does not answer, `record`
raises `AccessLogUnavailable` (a psycopg.OperationalError, so the HTTP layer answers 503).

Nothing personal is written: actors are pseudonymous ids, resources are ids and codes.
Metrics: `likvard.access_log.entries`, `.batch_size`, `.commit_failures`, `.rejected`,
labelled only by the service. Reading it back (search, verify): `likvard.access_log_audit`.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from fastavro import schemaless_writer
from psycopg_pool import ConnectionPool

from likvard import telemetry
from likvard.codec import SINGLE_OBJECT_MARKER, Catalogue, CodecError, EncodeError
from likvard.config import Settings
from likvard.eventstore import (
    ConcurrencyError,
    EventStore,
    NewEvent,
)
from likvard.guard import AccessEntry
from likvard.topics import ACCESS_LOG_TOPIC

__all__ = [
    "CITY_TZ",
    "EVENT_TYPE",
    "SCHEMA",
    "SERVICE",
    "AccessLogError",
    "AccessLogUnavailable",
    "AccessLogWriter",
    "WriterStats",
    "database_url",
    "event_of",
    "open_access_log",
    "open_store",
    "schema_name",
    "stream_id",
    "utc",
]

log = logging.getLogger("likvard.access_log")

EVENT_TYPE = "CaseAccessed"
SCHEMA = "access_log"
SERVICE = "access-log"
"""The name the command line gives the access log (`likvard relay access-log`, ...)."""
STREAM_PREFIX = "access-log-"
CITY_TZ = ZoneInfo("Europe/Stockholm")

_meter = telemetry.meter("likvard.access_log")
_entries = _meter.create_counter(
    "likvard.access_log.entries",
    unit="{entry}",
    description="Access-log entries committed (case-level reads and refusals).",
)
_batch_size = _meter.create_histogram(
    "likvard.access_log.batch_size",
    unit="{entry}",
    description="Entries per access-log transaction (group commit).",
)
_failures = _meter.create_counter(
    "likvard.access_log.commit_failures",
    unit="{batch}",
    description="Access-log transactions that failed; their requests failed too.",
)
_rejected = _meter.create_counter(
    "likvard.access_log.rejected",
    unit="{entry}",
    description="Entries refused because the writer's queue was full or it was closed.",
)


class AccessLogError(RuntimeError):
    """The entries could not be logged (a bug or a closed writer): the request must fail."""


class AccessLogUnavailable(psycopg.OperationalError):
    """The access log's database does not answer, or the writer is too far behind: the
    request fails with 503 (it is an OperationalError so the HTTP layer says so)."""


def schema_name(schema: str | None = None) -> str:
    """The access log's PostgreSQL schema: as given, else LIKVARD_ACCESS_LOG_SCHEMA (tests
    and a second stack on one database), else `access_log`."""
    return schema or os.environ.get("LIKVARD_ACCESS_LOG_SCHEMA") or SCHEMA


def stream_id(service: str) -> str:
    return STREAM_PREFIX + service


def database_url(settings: Settings) -> str:
    """Where the access log lives: LIKVARD_ACCESS_LOG_DATABASE_URL, else the database."""
    return settings.require_access_log_database()


def utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


_TEXT = ("actor", "roles", "action", "resource", "reason", "service")
_OPTIONAL_TEXT = ("case_id", "emergency_reason", "trace_id")


def _check(entry: AccessEntry) -> None:
    """The entry's fields have CaseAccessed's types (checked here, in the caller's thread,
    so that the writer can encode without the codec's slower validation)."""
    bad = [n for n in _TEXT if not isinstance(getattr(entry, n), str)]
    bad += [n for n in _OPTIONAL_TEXT if not isinstance(getattr(entry, n), str | None)]
    if not isinstance(entry.allowed, bool):
        bad.append("allowed")
    if not isinstance(entry.occurred_at, datetime):
        bad.append("occurred_at")
    if bad:
        raise AccessLogError(f"an access-log entry has wrongly typed fields: {', '.join(bad)}")


def event_of(entry: AccessEntry, traceparent: str | None = None) -> NewEvent:
    """The `CaseAccessed` event of one entry (pure; AccessLogError for a wrongly typed one)."""
    _check(entry)
    accessed_at = utc(entry.occurred_at)
    event_id = uuid.uuid4()
    return NewEvent(
        event_type=EVENT_TYPE,
        data={
            "actor": entry.actor,
            "roles": entry.roles,
            "action": entry.action,
            "resource": entry.resource,
            "case_id": entry.case_id,
            "outcome": "allowed" if entry.allowed else "refused",
            "reason": entry.reason,
            "emergency_reason": entry.emergency_reason,
            "service": entry.service,
            "trace_id": entry.trace_id,
            "accessed_at": accessed_at,
        },
        occurred_at=accessed_at,
        district="",  # an access belongs to no district (see the schema's doc)
        actor=entry.actor,
        correlation_id=entry.trace_id or str(event_id),
        traceparent=traceparent,
        event_id=event_id,
        producer=f"likvard-{entry.service}",
    )


# --- the writer -------------------------------------------------------------------------
@dataclass
class _Request:
    events: list[NewEvent]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(frozen=True)
class WriterStats:
    """What the writer did so far (tests and the bench read it)."""

    entries: int
    batches: int
    failures: int
    largest_batch: int


class AccessLogWriter:
    """Group-committing writer of one service's access-log stream; implements
    `likvard.guard.AccessRecorder`. Thread-safe; `close()` drains the queue first."""

    def __init__(
        self,
        store: EventStore,
        service: str,
        *,
        max_queue: int = 10_000,
        max_batch: int = 2_000,
        timeout: float = 10.0,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.stream_id = stream_id(service)
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.timeout = timeout
        self._before_commit = before_commit
        self._attributes = {"service": service}
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._queued = 0
        self._closed = False
        self._version: int | None = None
        self._entries = self._batches = self._failures = self._largest = 0
        self._thread = threading.Thread(target=self._run, name=f"access-log-{service}", daemon=True)
        self._thread.start()

    # The AccessRecorder protocol.
    def record(self, entries: Sequence[AccessEntry]) -> None:
        """Log the entries; return once they are committed. Raises AccessLogUnavailable
        (database down, queue full, no commit within `timeout`) or AccessLogError."""
        if not entries:
            return
        traceparent = telemetry.current_traceparent()
        request = _Request([event_of(e, traceparent) for e in entries])
        with self._cond:
            if self._closed:
                _rejected.add(len(entries), self._attributes)
                raise AccessLogError("the access log is closed: the request cannot be logged")
            if self._queued + len(entries) > self.max_queue:
                _rejected.add(len(entries), self._attributes)
                raise AccessLogUnavailable(
                    f"the access log's queue is full ({self._queued} entries waiting):"
                    " its database is too slow or down"
                )
            self._queue.append(request)
            self._queued += len(entries)
            self._cond.notify()
        if not request.done.wait(self.timeout):
            raise AccessLogUnavailable(
                f"the access log did not commit within {self.timeout:g}s: its database does"
                " not answer"
            )
        if request.error is not None:
            raise request.error

    def close(self) -> None:
        """Commit what is queued, stop the writer thread, close the store's pool."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self.timeout + 5)
        self.store.pool.close()

    @property
    def stats(self) -> WriterStats:
        with self._cond:
            return WriterStats(self._entries, self._batches, self._failures, self._largest)

    # The writer thread.
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, size = self._take()
            self._commit(batch, size)

    def _take(self) -> tuple[list[_Request], int]:
        """Everything queued, up to max_batch entries (at least one request). Under _cond."""
        batch: list[_Request] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].events) <= self.max_batch):
            request = self._queue.pop(0)
            batch.append(request)
            size += len(request.events)
        self._queued -= size
        return batch, size

    def _commit(self, batch: list[_Request], size: int) -> None:
        try:
            self._append([e for r in batch for e in r.events])
        except CodecError:
            if len(batch) > 1:  # one bad entry must not fail the others' requests
                for request in batch:
                    self._commit([request], len(request.events))
                return
            self._failed(batch, AccessLogError("an access-log entry does not fit CaseAccessed"))
            return
        except psycopg.OperationalError as exc:
            self._failed(batch, AccessLogUnavailable(f"the access log's database: {exc}"))
            return
        except Exception as exc:  # any failure fails the requests; the writer lives on
            log.exception("access-log commit failed")
            self._failed(batch, AccessLogError(f"the access log failed: {type(exc).__name__}"))
            return
        with self._cond:
            self._entries += size
            self._batches += 1
            self._largest = max(self._largest, size)
        _entries.add(size, self._attributes)
        _batch_size.record(size, self._attributes)
        for request in batch:
            request.done.set()

    def _failed(self, batch: list[_Request], error: BaseException) -> None:
        log.warning(
            "access log: a commit of %d entries failed (%s)",
            sum(len(r.events) for r in batch),
            type(error.__cause__ or error).__name__,
        )
        with self._cond:
            self._failures += 1
        _failures.add(1, self._attributes)
        self._version = None  # a commit of unknown outcome: read the head again
        for request in batch:
            request.error = error
            request.done.set()

    def _append(self, events: list[NewEvent]) -> None:
        """One transaction; retried at the new version if another process moved the stream
        on, and once on a broken pooled connection (the database restarted)."""
        reconnected = False
        for _attempt in range(100):
            try:
                if self._version is None:
                    self._version = self.store.stream_version(self.stream_id)
                stored = self.store.append(
                    self.stream_id, self._version, events, before_commit=self._before_commit
                )
            except ConcurrencyError as exc:
                self._version = exc.actual
                continue
            except psycopg.OperationalError:
                if reconnected or not self._pool_was_stale():
                    raise
                reconnected = True
                self._version = None
                continue
            self._version = stored[-1].stream_version
            return
        raise AccessLogUnavailable("the access-log stream is contended: gave up after 100 tries")

    def _pool_was_stale(self) -> bool:
        """Whether a fresh connection answers (the failed one was left from before a
        database restart): then the append is tried once more."""
        self.store.pool.check()
        try:
            with self.store.pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False


class _AccessLogStore(EventStore):
    """The event store, encoding `CaseAccessed` with fastavro's writer directly: the entries
    are checked field by field when recorded (`_check`), and the codec's generic validation
    would cost the writer thread about a millisecond an entry. The bytes are the same, and
    any other event type goes through the codec."""

    def _encode(
        self, stream_id: str, version: int, event: NewEvent, recorded_at: datetime
    ) -> tuple[bytes, dict[str, Any]]:
        if event.event_type != EVENT_TYPE:
            return super()._encode(stream_id, version, event, recorded_at)
        metadata = self._metadata(stream_id, version, event, recorded_at)
        writer = self.catalogue.writer(EVENT_TYPE)
        body = io.BytesIO()
        body.write(SINGLE_OBJECT_MARKER)
        body.write(writer.fingerprint)
        try:
            schemaless_writer(body, writer.parsed, {"metadata": metadata, **event.data})
        except Exception as exc:  # a value that does not fit: as the codec would say
            raise EncodeError(f"a CaseAccessed record could not be written ({exc!r})") from None
        return body.getvalue(), metadata


def _pool(dsn: str, name: str, max_size: int) -> ConnectionPool:
    """A pool that gives up fast: a request waits on the access log, so a database that does
    not answer must fail it within seconds, not the pool's default 30."""
    pool = ConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        name=name,
        open=False,
        timeout=5.0,
        kwargs={"application_name": name, "connect_timeout": 5},
    )
    pool.open(wait=True, timeout=10)
    return pool


def open_store(
    settings: Settings,
    *,
    schema: str | None = None,
    service: str = SERVICE,
    catalogue: Catalogue | None = None,
    max_size: int = 4,
) -> EventStore:
    """The migrated access-log event store (for the writer, the relay, verify, search);
    `service` names its connections. The caller closes `store.pool`."""
    pool = _pool(database_url(settings), f"likvard-access-log-{service}", max_size)
    store = _AccessLogStore(
        pool,
        schema_name(schema),
        catalogue or Catalogue.load(),
        producer="likvard-access-log",  # the appends' metric label; events name their service
        topic=settings.topic(ACCESS_LOG_TOPIC),
    )
    try:
        store.migrate()
    except Exception:
        pool.close()
        raise
    return store


def open_access_log(
    settings: Settings,
    service: str,
    *,
    schema: str | None = None,
    catalogue: Catalogue | None = None,
    **options: Any,
) -> AccessLogWriter:
    """The access-log writer of `service` (intake, referral, followup, projections, cli);
    `options` go to AccessLogWriter (max_queue, max_batch, timeout)."""
    store = open_store(settings, schema=schema, service=service, catalogue=catalogue)
    options.setdefault("timeout", wait_timeout())
    try:
        return AccessLogWriter(store, service, **options)
    except Exception:
        store.pool.close()
        raise


def wait_timeout() -> float:
    """Seconds a request waits on the log at most (LIKVARD_ACCESS_LOG_TIMEOUT, default 10)."""
    try:
        return max(0.5, float(os.environ.get("LIKVARD_ACCESS_LOG_TIMEOUT", "10")))
    except ValueError:
        return 10.0
